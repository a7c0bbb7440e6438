"""
Pretrain the base model: a GPT of `--depth` layers on FineWeb-Edu tokens, Muon for the matrices in
the blocks and AdamW for the embedding and the LM head, for a horizon set by a token budget.

Run:
    python -m scripts.base_train                                   # one GPU (gradient accumulation)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
    python -m scripts.base_train --device_type=cpu --depth=4 --max_seq_len=256 --device_batch_size=4 \\
        --total_batch_size=4096 --num_iterations=200 --eval_every=50 --eval_tokens=65536 \\
        --core_metric_every=-1 --sample_every=100                   # a laptop CPU
    python -m scripts.base_train --resume_from_step=2000           # continue a saved run exactly
    python -m scripts.base_train --resume_from_step=latest         # ... from its newest complete checkpoint
    python -m scripts.base_train --objective=mdlm                  # masked diffusion (nanochat/diffusion.py)

The horizon: --num_iterations if > 0, else --target_flops if > 0, else
--target_param_data_ratio · params tokens (20: Chinchilla). One step is --total_batch_size tokens:
device_batch_size · max_seq_len tokens per forward/backward on each of the world_size ranks, with
gradient accumulation making up the rest (it must divide exactly).

--compile: -1 = torch.compile on CUDA, off on CPU/MPS (a first compile costs ~1 min and does not
pay off for tiny models); 0 = off; 1 = on.

One step: grad_accum_steps forward/backward passes (nanochat.optim.micro_step), then
nanochat.optim.step (average across ranks, clip at --grad_clip, LR multiplier and Muon momentum,
update), as every stage does it.
Every step prints the progress line of nanochat/progress.py (the debiased EMA of the train loss,
the LR multiplier, step time, tokens/s over the global batch, MFU (n/a when the device's peak is
unknown), training time and an ETA). Checkpoints
(model, per-rank optimiser shards, meta JSON with the dataloader and loop state) go to
<base>/base_checkpoints/<model_tag>/ every --save_every steps and at the end. SIGTERM or a first
Ctrl-C: the step in flight finishes, a checkpoint is saved, the resume command printed, exit 0
(nanochat/preempt.py); a second Ctrl-C aborts.
"""

import os
from dataclasses import asdict

import torch

from nanochat import memory_plan, optim
from nanochat.checkpoint_manager import StageSaver, every_rank, load_checkpoint, resolve_resume_step, this_rank
from nanochat.common import compute_cleanup, compute_init, get_base_dir, get_wandb, print0, use_fused_loss
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.dataset import check_shards
from nanochat.diffusion import (OBJECTIVES, add_mask_token, check_objective, diffusion_loss, draw_noise,
                                evaluate_bpb_bound)
from nanochat.flags import FlagError, StopRun, parse_flags, print_flags, token_batch_plan
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb, greedy_samples
from nanochat.progress import TrainProgress
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    run="dummy",  # wandb run name; "dummy" = no wandb
    device_type="",  # cuda | mps | cpu; empty = autodetect
    compile=-1,  # -1 auto (on for CUDA), 0 off, 1 on
    force=0,  # 1: train even when the memory plan says the batch will not fit
    fp32_embedding=0,  # 1: keep the embedding (and the residual stream) fp32 on CUDA; 0: bf16 there, as the reference
    objective="ar",  # ar: next-token prediction; mdlm: masked diffusion, bidirectional (nanochat/diffusion.py)
    # model
    depth=20,
    max_seq_len=2048,
    # horizon, first positive one wins
    num_iterations=-1,
    target_flops=-1.0,
    target_param_data_ratio=20,
    # optimisation
    device_batch_size=32,
    total_batch_size=524288,
    **optim.FLAGS,  # embedding_lr, unembedding_lr, matrix_lr, weight_decay
    grad_clip=1.0,  # 0 = no clipping
    warmup_ratio=0.0,
    warmdown_ratio=0.2,
    final_lr_frac=0.0,
    # evaluation, sampling, checkpoints (every <= 0: off, except the final val bpb)
    eval_every=250,
    eval_tokens=20 * 524288,
    core_metric_every=2000,
    core_metric_max_per_task=500,
    sample_every=2000,
    save_every=-1,
    resume_from_step=-1,
    model_tag="",  # default d{depth}
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
user_config = vars(cfg).copy()
if cfg.objective not in OBJECTIVES:
    raise FlagError(f"--objective must be one of {', '.join(OBJECTIVES)} (got {cfg.objective!r})")
mdlm = cfg.objective == "mdlm"
bound = " bound" if mdlm else ""  # masked diffusion's val bpb is an upper bound: every label says so
if mdlm:  # CORE scores answers by their left-to-right likelihood: it needs an AR model
    cfg.core_metric_every = -1

# -----------------------------------------------------------------------------
# Compute, tokenizer, logging

compute = compute_init(cfg.device_type)
device, master = compute.device, compute.master_process
print_flags(cfg, DEFAULTS)

# one optimiser step = total_batch_size tokens = grad_accum_steps x (device batch on every rank)
grad_accum_steps, eval_steps, batch_line = token_batch_plan(cfg, compute.world_size)
wandb_run = get_wandb(cfg.run, project="nanochat", config=user_config, master_process=master)
report = get_report()  # a no-op on ranks other than 0
try:
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
except FileNotFoundError as e:  # the message says how to train one
    raise StopRun(f"base_train: {e}") from None
if mdlm:  # one more id, after every existing one
    tokenizer = add_mask_token(tokenizer)
    mask_id, bos_id = tokenizer.encode_special("<|mask|>"), tokenizer.get_bos_token_id()
vocab_size = tokenizer.get_vocab_size()

# -----------------------------------------------------------------------------
# Model: every size follows from --depth

model_config = GPTConfig.from_depth(cfg.depth, vocab_size=vocab_size, sequence_len=cfg.max_seq_len)
with torch.device("meta"):
    model = GPT(model_config)
model.to_empty(device=device)
model.init_weights(embedding_dtype=torch.float32 if cfg.fp32_embedding else compute.compute_dtype)
model.causal = not mdlm
model_tag = cfg.model_tag or f"d{cfg.depth}"
checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
try:  # --resume_from_step=latest -> the newest complete checkpoint's step
    cfg.resume_from_step = resolve_resume_step(checkpoint_dir, cfg.resume_from_step)
except FileNotFoundError as e:
    raise StopRun(f"base_train: {e}") from None
resuming = cfg.resume_from_step >= 0
if resuming:
    print0(f"resuming from step {cfg.resume_from_step} of {checkpoint_dir}")
    model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, cfg.resume_from_step, device,
                                                       load_optimizer=True, rank=compute.rank,
                                                       required=("model_config", "dataloader_state", "loop_state"))
    check_objective(meta.get("objective", "ar"), cfg.objective, f"base_train: checkpoint step {cfg.resume_from_step}")
    if meta["model_config"] != asdict(model_config):
        raise FlagError(f"the checkpoint's model {meta['model_config']} differs from the flags' "
                        f"{asdict(model_config)}: resume with the flags it was trained with")
    model.load_state_dict(model_data, strict=True, assign=True)
    del model_data
orig_model = model  # uncompiled: for saving, CORE and sampling
use_compile = cfg.compile == 1 or (cfg.compile == -1 and compute.device_type == "cuda")
orig_model.fused_loss = use_fused_loss(compute.device_type, use_compile) and not mdlm  # mdlm's loss takes the logits
if use_compile:
    model = torch.compile(model, dynamic=False)
num_params = sum(p.numel() for p in orig_model.parameters())
num_flops_per_token = orig_model.estimate_flops()
print0(f"model: depth {cfg.depth}, n_embd {model_config.n_embd} (64·depth), heads {model_config.n_head} "
       f"(head dim 128), vocab {vocab_size:,}, "
       f"{num_params:,} parameters, {num_flops_per_token:e} FLOPs/token, compile {use_compile}")

# -----------------------------------------------------------------------------
# Horizon

if cfg.num_iterations > 0:
    num_iterations = cfg.num_iterations
elif cfg.target_flops > 0:
    num_iterations = round(cfg.target_flops / (num_flops_per_token * cfg.total_batch_size))
elif cfg.target_param_data_ratio > 0:
    num_iterations = cfg.target_param_data_ratio * num_params // cfg.total_batch_size
else:
    raise FlagError("no horizon: set --num_iterations, --target_flops or --target_param_data_ratio > 0")
num_iterations = max(1, num_iterations)
total_tokens = cfg.total_batch_size * num_iterations
print0(batch_line)
print0(f"horizon: {num_iterations:,} steps, {total_tokens:,} tokens ({total_tokens / num_params:.2f} tokens/param), "
       f"{num_flops_per_token * total_tokens:e} FLOPs")

# -----------------------------------------------------------------------------
# Optimisers (Muon for block matrices, AdamW for embedding and head) and data

optimizers = optim.build(orig_model, cfg, states=optimizer_data if resuming else None)
memory_plan.check(orig_model, optimizers, compute, cfg.device_batch_size, cfg.max_seq_len, force=cfg.force,
                  batch_divides=cfg.total_batch_size // (cfg.max_seq_len * compute.world_size),
                  compiled=use_compile)  # stops here if it will not fit
dataloader_state, loop_state = None, {}
if resuming:
    del optimizer_data
    dataloader_state, loop_state = this_rank(meta["dataloader_state"], compute), meta["loop_state"]

train_loader = tokenizing_distributed_data_loader(cfg.device_batch_size, cfg.max_seq_len, "train", device=device,
                                                  resume_state_dict=dataloader_state)
try:
    check_shards()  # every train and val shard's footer and `text` column, before step 0
    x, y, x_state = next(train_loader)  # prefetch; x_state = loader position right after (x, y)
except FileNotFoundError as e:  # no shards: the message says how to download them
    raise StopRun(f"base_train: {e}") from None


def val_batches():
    return tokenizing_distributed_data_loader(cfg.device_batch_size, cfg.max_seq_len, "val", device=device)


# -----------------------------------------------------------------------------
# Loop state

step = cfg.resume_from_step if resuming else 0
min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
progress_line = TrainProgress(compute, num_iterations, num_flops_per_token, first_step=step, state=loop_state)
val_bpb = loop_state.get("val_bpb")
core_results = {}
saver = StageSaver("scripts.base_train", compute, checkpoint_dir, cfg.save_every, cfg.resume_from_step, wandb_run)

# -----------------------------------------------------------------------------
# Training loop: step counts optimiser updates done so far

while True:
    last_step = step == num_iterations
    stop = saver.should_stop(last_step)  # SIGTERM / Ctrl-C on any rank: no evaluations, save, exit 0

    if not stop and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
        model.eval()
        with compute.autocast():
            if mdlm:  # an upper bound from the ELBO, repeatable (fixed t draws)
                val_bpb = evaluate_bpb_bound(model, val_batches(), eval_steps, token_bytes, mask_id, bos_id,
                                             name=f"val bpb{bound}")
            else:
                val_bpb = evaluate_bpb(model, val_batches(), eval_steps, token_bytes, name="val bpb")
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step:05d} | val bpb{bound} {val_bpb:.4f}")
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        report.log_history({"step": step, "val_bpb_bound" if mdlm else "val_bpb": val_bpb})
        model.train()

    if not stop and cfg.core_metric_every > 0 and (last_step or (step > 0 and step % cfg.core_metric_every == 0)):
        from nanochat.core_eval import evaluate_core
        orig_model.eval()
        with compute.autocast():
            core_results = evaluate_core(orig_model, tokenizer, device, max_per_task=cfg.core_metric_max_per_task)
        print0(f"step {step:05d} | CORE {core_results['core_metric']:.4f}")
        wandb_run.log({"step": step, "core_metric": core_results["core_metric"]})
        orig_model.train()

    if not stop and master and cfg.sample_every > 0 and (last_step or (step > 0 and step % cfg.sample_every == 0)):
        orig_model.eval()
        print0(f"step {step:05d} | greedy samples:")
        for sample in greedy_samples(orig_model, tokenizer, compute.autocast):
            print0(f"  {sample!r}")
        orig_model.train()

    saver.save_if_due(step, last_step, stop, orig_model, optimizers, lambda: dict(  # the meta, built to save
        model_config=asdict(model_config), user_config=user_config, objective=cfg.objective, val_bpb=val_bpb,
        device_batch_size=cfg.device_batch_size, max_seq_len=cfg.max_seq_len,
        dataloader_state=every_rank(dataloader_state),
        loop_state=dict(min_val_bpb=min_val_bpb, val_bpb=val_bpb, **progress_line.state())))
    if last_step:
        break

    # one optimiser step: grad_accum_steps forward/backward passes, then optim.step (sync, clip, update)
    progress_line.start_step()
    train_loss = 0.0
    if mdlm:  # the masks of the whole global batch, from the step: the same on resume and any rank count
        rows = cfg.device_batch_size * grad_accum_steps * compute.world_size
        noise_t, noise_u = draw_noise(rows, cfg.max_seq_len, step, device)
    for micro in range(grad_accum_steps):
        if mdlm:  # this micro-batch's rows of the global batch's masks
            first = (compute.rank * grad_accum_steps + micro) * cfg.device_batch_size
            r = slice(first, first + cfg.device_batch_size)
            masked_loss = lambda x, y: diffusion_loss(model, x, noise_t[r], noise_u[r], mask_id, bos_id)  # noqa: E731
            train_loss += optim.micro_step(masked_loss, x, y, grad_accum_steps, compute.autocast)
        else:
            train_loss += optim.micro_step(model, x, y, grad_accum_steps, compute.autocast)  # gradients add up: mean
        dataloader_state = x_state  # (x, y) is consumed
        x, y, x_state = next(train_loader)  # the next batch loads while the device works
    lrm = optim.lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    grad_norm = optim.step(optimizers, lrm, momentum=optim.muon_momentum(step), grad_clip=cfg.grad_clip)
    train_loss = train_loss.item()
    step += 1

    # logging
    step_metrics = progress_line.update(step, train_loss, lrm, cfg.total_batch_size)  # stops the clock, prints
    wandb_run.log({"step": step, **{f"train/{k}": v for k, v in step_metrics.items()},
                   **({"train/grad_norm": grad_norm.item()} if grad_norm is not None else {})})
    report.log_history({"step": step, "train_loss": step_metrics["loss"]})

# -----------------------------------------------------------------------------
# Totals, report, cleanup

totals = progress_line.totals(compute)  # prints peak memory and training time
print0(f"min val bpb{bound}: {min_val_bpb:.4f}")
report.log(section="Base model training", data=[
    user_config,
    {"parameters": num_params, "FLOPs per token": f"{num_flops_per_token:e}", "iterations": num_iterations,
     "training tokens": total_tokens, "tokens : params": round(total_tokens / num_params, 2),
     "DDP world size": compute.world_size},
    {**({"objective": "mdlm (val bpb: an ELBO upper bound)"} if mdlm else {}),
     f"min val bpb{bound}": min_val_bpb, f"final val bpb{bound}": val_bpb,
     **({"CORE": core_results["core_metric"]} if core_results else {}),
     **totals},
])
wandb_run.finish()
compute_cleanup()
