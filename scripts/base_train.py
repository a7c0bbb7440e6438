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

The horizon: --num_iterations if > 0, else --target_flops if > 0, else
--target_param_data_ratio · params tokens (20: Chinchilla). One step is --total_batch_size tokens:
device_batch_size · max_seq_len tokens per forward/backward on each of the world_size ranks, with
gradient accumulation making up the rest (it must divide exactly).

--compile: -1 = torch.compile on CUDA, off on CPU/MPS (a first compile costs ~1 min and does not
pay off for tiny models); 0 = off; 1 = on.

Every step prints the debiased EMA of the train loss, the LR multiplier, step time, tokens/s over
the global batch, MFU (n/a when the device's peak is unknown) and an ETA. Checkpoints
(model, per-rank optimiser shards, meta JSON with the dataloader and loop state) go to
<base>/base_checkpoints/<model_tag>/ every --save_every steps and at the end.
"""

import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.common import (compute_cleanup, compute_init, get_base_dir, get_device_name, get_peak_flops,
                             get_wandb, print0)
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.dist_optim import clip_grad_norm
from nanochat.engine import Engine
from nanochat.flags import FlagError, accumulation_steps, parse_flags, print_flags
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.schedules import lr_multiplier, muon_momentum
from nanochat.tokenizer import get_token_bytes, get_tokenizer

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    run="dummy",  # wandb run name; "dummy" = no wandb
    device_type="",  # cuda | mps | cpu; empty = autodetect
    compile=-1,  # -1 auto (on for CUDA), 0 off, 1 on
    fp32_embedding=0,  # 1: keep the embedding (and the residual stream) fp32 on CUDA; 0: bf16 there, as the reference
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
    embedding_lr=0.2,
    unembedding_lr=0.004,
    matrix_lr=0.02,
    weight_decay=0.0,
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

# -----------------------------------------------------------------------------
# Compute, tokenizer, logging

compute = compute_init(cfg.device_type)
device, master = compute.device, compute.master_process
print_flags(cfg, DEFAULTS)

# one optimiser step = total_batch_size tokens = grad_accum_steps x (device batch on every rank)
tokens_per_fwdbwd = cfg.device_batch_size * cfg.max_seq_len
world_tokens_per_fwdbwd = tokens_per_fwdbwd * compute.world_size
grad_accum_steps = accumulation_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len,
                                      compute.world_size)
wandb_run = get_wandb(cfg.run, project="nanochat", config=user_config, master_process=master)
report = get_report()  # a no-op on ranks other than 0
try:
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
except FileNotFoundError as e:  # the message says how to train one
    raise SystemExit(f"base_train: {e}") from None
vocab_size = tokenizer.get_vocab_size()

# -----------------------------------------------------------------------------
# Model: every size follows from --depth

model_config = GPTConfig.from_depth(cfg.depth, vocab_size=vocab_size, sequence_len=cfg.max_seq_len)
with torch.device("meta"):
    model = GPT(model_config)
model.to_empty(device=device)
model.init_weights(embedding_dtype=torch.float32 if cfg.fp32_embedding else compute.compute_dtype)
model_tag = cfg.model_tag or f"d{cfg.depth}"
checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
resuming = cfg.resume_from_step >= 0
if resuming:
    print0(f"resuming from step {cfg.resume_from_step} of {checkpoint_dir}")
    model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, cfg.resume_from_step, device,
                                                       load_optimizer=True, rank=compute.rank)
    if meta["model_config"] != asdict(model_config):
        raise FlagError(f"the checkpoint's model {meta['model_config']} differs from the flags' "
                        f"{asdict(model_config)}: resume with the flags it was trained with")
    model.load_state_dict(model_data, strict=True, assign=True)
    del model_data
orig_model = model  # uncompiled: for saving, CORE and sampling
use_compile = cfg.compile == 1 or (cfg.compile == -1 and compute.device_type == "cuda")
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
print0(f"batch: {cfg.total_batch_size:,} tokens/step = {tokens_per_fwdbwd:,} per fwd/bwd x "
       f"{compute.world_size} rank(s) x {grad_accum_steps} accumulation step(s)")
print0(f"horizon: {num_iterations:,} steps, {total_tokens:,} tokens ({total_tokens / num_params:.2f} tokens/param), "
       f"{num_flops_per_token * total_tokens:e} FLOPs")

# -----------------------------------------------------------------------------
# Optimisers (Muon for block matrices, AdamW for embedding and head) and data

optimizers = orig_model.setup_optimizers(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                         matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
adamw_optimizer, muon_optimizer = optimizers
dataloader_state, loop_state = None, {}
if resuming:
    for opt, state in zip(optimizers, optimizer_data):
        opt.load_state_dict(state)
    del optimizer_data
    states = meta["dataloader_state"]
    if len(states) != compute.world_size:
        raise FlagError(f"the checkpoint was saved by {len(states)} rank(s); resume it with the same number "
                        f"(this run has {compute.world_size})")
    dataloader_state, loop_state = states[compute.rank], meta["loop_state"]

train_loader = tokenizing_distributed_data_loader(cfg.device_batch_size, cfg.max_seq_len, "train", device=device,
                                                  resume_state_dict=dataloader_state)
try:
    x, y, x_state = next(train_loader)  # prefetch; x_state = loader position right after (x, y)
except FileNotFoundError as e:  # no shards: the message says how to download them
    raise SystemExit(f"base_train: {e}") from None
eval_steps = max(1, cfg.eval_tokens // world_tokens_per_fwdbwd)


def val_batches():
    return tokenizing_distributed_data_loader(cfg.device_batch_size, cfg.max_seq_len, "val", device=device)


# -----------------------------------------------------------------------------
# Loop state, sampling

step = cfg.resume_from_step if resuming else 0
min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
smooth_train_loss = loop_state.get("smooth_train_loss", 0.0)  # EMA, debiased when printed
total_training_time = loop_state.get("total_training_time", 0.0)  # seconds of training steps, no evals
timed_steps = loop_state.get("timed_steps", 0)  # steps counted in total_training_time
first_step = step  # this process's first step includes compilation and warm-up: not timed
val_bpb = loop_state.get("val_bpb")
ema_beta = 0.9
peak_flops = get_peak_flops(get_device_name(compute.device_type)) if compute.device_type == "cuda" else None
core_results = {}
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def print_samples():
    engine = Engine(orig_model, tokenizer, compile_decode=False)  # greedy; 16 tokens do not repay a compile
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with compute.autocast():
            sequences, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        print0(f"  {tokenizer.decode(sequences[0][1:])!r}")


# -----------------------------------------------------------------------------
# Training loop: step counts optimiser updates done so far

while True:
    last_step = step == num_iterations

    if last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
        model.eval()
        with compute.autocast():
            val_bpb = evaluate_bpb(model, val_batches(), eval_steps, token_bytes)
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        report.log_history({"step": step, "val_bpb": val_bpb})
        model.train()

    if cfg.core_metric_every > 0 and (last_step or (step > 0 and step % cfg.core_metric_every == 0)):
        from nanochat.core_eval import evaluate_core
        orig_model.eval()
        with compute.autocast():
            core_results = evaluate_core(orig_model, tokenizer, device, max_per_task=cfg.core_metric_max_per_task)
        print0(f"step {step:05d} | CORE {core_results['core_metric']:.4f}")
        wandb_run.log({"step": step, "core_metric": core_results["core_metric"]})
        orig_model.train()

    if master and cfg.sample_every > 0 and (last_step or (step > 0 and step % cfg.sample_every == 0)):
        orig_model.eval()
        print0(f"step {step:05d} | greedy samples:")
        print_samples()
        orig_model.train()

    if step != cfg.resume_from_step and (last_step or (cfg.save_every > 0 and step > 0
                                                       and step % cfg.save_every == 0)):
        states = [None] * compute.world_size  # every rank's loader position, for an exact resume
        if compute.ddp:
            dist.all_gather_object(states, dataloader_state)
        else:
            states = [dataloader_state]
        loop_state = dict(min_val_bpb=min_val_bpb, smooth_train_loss=smooth_train_loss, val_bpb=val_bpb,
                          total_training_time=total_training_time, timed_steps=timed_steps)
        save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), [opt.state_dict() for opt in optimizers],
                        dict(model_config=asdict(model_config), user_config=user_config, val_bpb=val_bpb,
                             dataloader_state=states, loop_state=loop_state,
                             device_batch_size=cfg.device_batch_size, max_seq_len=cfg.max_seq_len),
                        rank=compute.rank)

    if last_step:
        break

    # one optimiser step: grad_accum_steps forward/backward passes, sync, clip, update
    compute.synchronize()
    t0 = time.time()
    train_loss = 0.0
    for micro_step in range(grad_accum_steps):
        with compute.autocast():
            loss = model(x, y)
        train_loss += loss.detach() / grad_accum_steps
        (loss / grad_accum_steps).backward()  # gradients add up over micro-steps: mean over the batch
        dataloader_state = x_state  # (x, y) is consumed
        x, y, x_state = next(train_loader)  # the next batch loads while the device works
    for opt in optimizers:
        opt.reduce_gradients()  # average across ranks (no-op on one rank)
    grad_norm = clip_grad_norm(optimizers, cfg.grad_clip) if cfg.grad_clip > 0 else None  # averaged gradient
    lrm = lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for group in muon_optimizer.param_groups:
        group["momentum"] = muon_momentum(step)
    for opt in optimizers:
        opt.step()  # each rank updates its shards, then the weights are all-gathered
    orig_model.zero_grad(set_to_none=True)
    train_loss = train_loss.item()
    compute.synchronize()
    dt = time.time() - t0
    step += 1

    # logging
    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased = smooth_train_loss / (1 - ema_beta ** step)
    if step > first_step + 1:
        total_training_time += dt
        timed_steps += 1
    tok_per_sec = int(cfg.total_batch_size / dt)
    flops_per_sec = num_flops_per_token * cfg.total_batch_size / dt
    mfu = 100 * flops_per_sec / (peak_flops * compute.world_size) if peak_flops else None  # percent
    eta = (num_iterations - step) * (total_training_time / timed_steps if timed_steps else dt)
    print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss {debiased:.6f} | "
           f"lrm {lrm:.2f} | dt {dt * 1000:.2f}ms | tok/s {tok_per_sec:,} | mfu {f'{mfu:.2f}%' if mfu else 'n/a'} | "
           f"time {total_training_time / 60:.2f}m | eta {eta / 60:.1f}m")
    wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/dt": dt,
                   "train/tok_per_sec": tok_per_sec, **({"train/mfu": mfu} if mfu else {}),
                   **({"train/grad_norm": grad_norm.item()} if grad_norm is not None else {})})
    report.log_history({"step": step, "train_loss": debiased})

# -----------------------------------------------------------------------------
# Totals, report, cleanup

print0(f"peak memory: {compute.max_memory_allocated() / 1024 ** 2:.2f} MiB")
print0(f"total training time: {total_training_time / 60:.2f}m")
print0(f"min val bpb: {min_val_bpb:.4f}")
report.log(section="Base model training", data=[
    user_config,
    {"parameters": num_params, "FLOPs per token": f"{num_flops_per_token:e}", "iterations": num_iterations,
     "training tokens": total_tokens, "tokens : params": round(total_tokens / num_params, 2),
     "DDP world size": compute.world_size},
    {"min val bpb": min_val_bpb, "final val bpb": val_bpb,
     **({"CORE": core_results["core_metric"]} if core_results else {}),
     "peak memory (MiB)": round(compute.max_memory_allocated() / 1024 ** 2, 2),
     "total training time (m)": round(total_training_time / 60, 2)},
])
wandb_run.finish()
compute_cleanup()
