"""
Supervised fine-tuning (SFT): train the midtrained model on whole conversations, one per row, with
the loss only on the assistant's tokens.

Run:
    python -m scripts.chat_sft                                      # one GPU, from the mid checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft
    python -m scripts.chat_sft --device_type=cpu --max_seq_len=256 --device_batch_size=4 \\
        --target_examples_per_step=8 --num_iterations=50 --eval_every=25 --eval_steps=4 \\
        --eval_metrics_every=-1                                     # a laptop CPU
    python -m scripts.chat_sft --source=base                        # skip midtraining
    python -m scripts.chat_sft --resume_from_step=latest            # after SIGTERM / Ctrl-C (saves, exits 0)

Data (tasks/), the reference's mixture: ARC-Easy train + ARC-Challenge train + GSM8K train + the
first 10K SmolTalk train conversations + the identity conversations + 300 SimpleSpelling + 300
SpellingBee (--spelling_scale multiplies those two sizes, 0 drops them), shuffled together with a
fixed seed; validation: SmolTalk test.

Batches: each row is one conversation rendered with its mask (tokenizer.render_conversation, cut
at max_seq_len + 1 tokens), right-padded; targets are -1 where the next token's mask is 0 (user
turns, tool outputs) and in the padding (nanochat.chat_evaluation.collate_masked). A conversation
whose assistant tokens all fall beyond max_seq_len teaches nothing and is skipped. Rank r takes
conversations r, r + world_size, ...; gradients accumulate over
target_examples_per_step / (device_batch_size · world_size) fwd/bwd passes (must divide).

Horizon: --num_epochs passes (--num_iterations > 0 overrides). LR: base LR · --init_lr_frac (0.02),
linear to zero over the run; Muon's momentum stays 0.95 and there is no gradient clipping unless
--grad_clip > 0 (as the reference). The micro-batches go through nanochat.optim.micro_step, the
update is nanochat.optim.step, as in every stage; each step prints the progress line of
nanochat/progress.py (loss = the step's own train loss).
Every --eval_every steps: val loss on --eval_steps batches; every --eval_metrics_every steps and at
the end: MMLU and ARC-Easy accuracy on at most --eval_metrics_max_problems questions (categorical
evaluation, as chat_eval does it).
Checkpoints go to <base>/chatsft_checkpoints/<model_tag>/.
"""


import torch

from nanochat import memory_plan, optim
from nanochat.chat_evaluation import all_reduce_sum, collate_masked, load_task, run_categorical_eval
from nanochat.checkpoint_manager import StageSaver, every_rank, load_start_model
from nanochat.common import compute_cleanup, compute_init, get_wandb, print0
from nanochat.flags import FlagError, parse_flags, print_flags
from nanochat.progress import TrainProgress
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    run="dummy",  # wandb run name; "dummy" = no wandb
    device_type="",  # cuda | mps | cpu; empty = autodetect
    force=0,  # 1: train even when the memory plan says the batch will not fit
    # the checkpoint to start from; its tag is also the output tag
    source="mid",  # mid | base
    model_tag="",  # default: the largest model of the source stage
    step=-1,  # source checkpoint step; -1 = the latest
    spelling_scale=1.0,  # x the reference's 300 SimpleSpelling + 300 SpellingBee rows; 0 = none
    # optimisation
    max_seq_len=2048,  # conversations are cut at max_seq_len + 1 tokens
    device_batch_size=4,
    num_epochs=1,
    num_iterations=-1,  # -1 = num_epochs passes over the mixture
    target_examples_per_step=32,
    **optim.FLAGS,  # embedding_lr, unembedding_lr, matrix_lr, weight_decay
    grad_clip=0.0,  # 0 = no clipping (the reference clips only in base_train)
    init_lr_frac=0.02,
    # evaluation and checkpoints
    eval_every=100,
    eval_steps=100,
    eval_metrics_every=200,
    eval_metrics_max_problems=1024,
    save_every=-1,  # also save every N steps (for --resume_from_step); the final step is always saved
    resume_from_step=-1,
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
user_config = vars(cfg).copy()
if cfg.source not in ("mid", "base"):
    raise FlagError(f"--source must be mid or base (got {cfg.source!r})")
if cfg.eval_steps < 1:
    raise FlagError(f"--eval_steps must be at least 1 (got {cfg.eval_steps}); turn evaluation off with --eval_every=-1")

# -----------------------------------------------------------------------------
# Compute, logging

compute = compute_init(cfg.device_type)
device, master = compute.device, compute.master_process
print_flags(cfg, DEFAULTS)
examples_per_fwdbwd = cfg.device_batch_size * compute.world_size
if cfg.target_examples_per_step % examples_per_fwdbwd != 0:
    raise FlagError(f"--target_examples_per_step={cfg.target_examples_per_step} must be a multiple of "
                    f"device_batch_size · world_size = {cfg.device_batch_size} · {compute.world_size}")
grad_accum_steps = cfg.target_examples_per_step // examples_per_fwdbwd
wandb_run = get_wandb(cfg.run, project="nanochat-sft", config=user_config, master_process=master)
report = get_report()

# -----------------------------------------------------------------------------
# Model: the mid (or base) checkpoint, or our own when resuming

start = load_start_model("sft", cfg.source, compute, cfg.model_tag, cfg.step, cfg.resume_from_step)  # stops if none
model, tokenizer, model_config = start.model, start.tokenizer, start.meta["model_config"]
print0(f"model: {start.source['source']} {start.source['model_tag']} step {start.source['step']}, {model_config}")

# -----------------------------------------------------------------------------
# Optimisers: every LR scaled by init_lr_frac

optimizers = optim.build(model, cfg, lr_scale=cfg.init_lr_frac, states=start.optimizer_data)
memory_plan.check(model, optimizers, compute, cfg.device_batch_size, cfg.max_seq_len, force=cfg.force,
                  batch_divides=cfg.target_examples_per_step // compute.world_size)  # stops here if it will not fit
start.optimizer_data = None  # loaded into the optimisers: free it

# -----------------------------------------------------------------------------
# Data: the SFT mixture, one conversation per row

spelling = [SimpleSpelling(size=round(300 * cfg.spelling_scale), split="train"),
            SpellingBee(size=round(300 * cfg.spelling_scale), split="train")] if cfg.spelling_scale > 0 else []
train_dataset = TaskMixture([ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), GSM8K("train"),
                             SmolTalk("train", stop=10_000), CustomJSON(identity_conversations_path()), *spelling])
val_dataset = SmolTalk("test")
for name, dataset in (("train", train_dataset), ("val", val_dataset)):
    if len(dataset) < compute.world_size:
        raise ValueError(f"the {name} set has {len(dataset)} conversations, fewer than the {compute.world_size} ranks")
pad_id = tokenizer.get_bos_token_id()  # any id: padded positions have target -1
skipped = {"train": 0, "val": 0}  # conversations with nothing to learn within max_seq_len, this rank


def sft_batches(split: str, state: dict | None = None):
    """Yield (inputs (B, T), targets (B, T), state) with this rank's conversations rank,
    rank + world_size, ... of the split; `state` (epoch, index of the next conversation) restarts
    the stream exactly. train loops over epochs; val is one pass, ending with a possibly smaller batch."""
    dataset, loop = (train_dataset, True) if split == "train" else (val_dataset, False)
    epoch, index = (state["epoch"], state["index"]) if state else (0, compute.rank)
    rows = []
    while True:
        if index >= len(dataset):
            if not loop:
                break
            epoch, index = epoch + 1, compute.rank
        ids, mask = tokenizer.render_conversation(dataset[index], max_tokens=cfg.max_seq_len + 1)
        index += compute.world_size
        if not any(mask[1:]):
            skipped[split] += 1
            continue
        rows.append((ids, mask))
        if len(rows) == cfg.device_batch_size:
            yield *collate_masked(rows, pad_id, device), dict(epoch=epoch, index=index)
            rows = []
    if rows:
        yield *collate_masked(rows, pad_id, device), dict(epoch=epoch, index=index)


if cfg.num_iterations > 0:
    num_iterations = cfg.num_iterations
else:
    num_iterations = len(train_dataset) // cfg.target_examples_per_step * cfg.num_epochs
    if num_iterations < 1:
        raise FlagError(f"{len(train_dataset)} conversations x {cfg.num_epochs} epoch(s) make no step of "
                        f"{cfg.target_examples_per_step} examples: lower --target_examples_per_step")
print0(f"train mixture: {len(train_dataset):,} conversations, val: {len(val_dataset):,}; {num_iterations} steps "
       f"of {cfg.target_examples_per_step} examples = {cfg.device_batch_size} per fwd/bwd x {compute.world_size} "
       f"rank(s) x {grad_accum_steps} accumulation step(s)")
dataloader_state = start.dataloader_state  # None: from the first conversation
train_loader = sft_batches("train", state=dataloader_state)


@torch.no_grad()
def evaluate_val_loss() -> float:
    """Mean of the per-batch val losses over the first eval_steps batches of every rank."""
    total, count = 0.0, 0
    for b, (x, y, _) in enumerate(sft_batches("val")):
        if b == cfg.eval_steps:
            break
        with compute.autocast():
            total += model(x, y).item()
        count += 1
    total, count = all_reduce_sum([total, count], device)
    if count == 0:
        raise ValueError(f"no validation conversation has an assistant token within {cfg.max_seq_len + 1} tokens: "
                         f"raise --max_seq_len")
    return total / count


# -----------------------------------------------------------------------------
# Training loop: step counts optimiser updates done so far

step, loop_state = start.step, start.loop_state
progress_line = TrainProgress(compute, num_iterations, model.estimate_flops(), first_step=step, state=loop_state,
                              ema_beta=0.0)  # the step's own loss, as the reference prints it
val_loss = loop_state.get("val_loss")
metrics = loop_state.get("metrics", {})
metric_tasks = {}
saver = StageSaver("scripts.chat_sft", compute, start.checkpoint_dir, cfg.save_every, start.resumed_step, wandb_run)
while True:
    last_step = step == num_iterations
    stop = saver.should_stop(last_step)  # SIGTERM / Ctrl-C on any rank: no evaluations, save, exit 0

    if not stop and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
        model.eval()
        val_loss = evaluate_val_loss()
        print0(f"step {step:05d} | val loss {val_loss:.6f}")
        wandb_run.log({"step": step, "val/loss": val_loss})
        model.train()

    if not stop and cfg.eval_metrics_every > 0 and (last_step or (step > 0 and step % cfg.eval_metrics_every == 0)):
        model.eval()
        with compute.autocast():
            for name in ("MMLU", "ARC-Easy"):
                if name not in metric_tasks:
                    metric_tasks[name] = load_task(name)
                metrics[name] = run_categorical_eval(metric_tasks[name], model, tokenizer, cfg.device_batch_size * 2,
                                                     cfg.eval_metrics_max_problems, name)
        print0(f"step {step:05d} | " + " | ".join(f"{name} acc {acc:.4f}" for name, acc in metrics.items()))
        wandb_run.log({"step": step, **{f"val/{name}_acc": acc for name, acc in metrics.items()}})
        model.train()

    saver.save_if_due(step, last_step, stop, model, optimizers, lambda: dict(  # the meta, built to save
        model_config=model_config, user_config=user_config, val_loss=val_loss, metrics=metrics,
        start_source=start.source, dataloader_state=every_rank(dataloader_state),
        loop_state=dict(val_loss=val_loss, metrics=metrics, **progress_line.state())))
    if last_step:
        break

    # one optimiser step over target_examples_per_step conversations
    progress_line.start_step()
    train_loss, num_tokens, num_processed = 0.0, 0, 0
    for _ in range(grad_accum_steps):
        x, y, dataloader_state = next(train_loader)
        train_loss += optim.micro_step(model, x, y, grad_accum_steps, compute.autocast)  # loss: mean over target != -1
        num_tokens += int((y >= 0).sum())
        num_processed += y.numel()  # padding included: the work the device did
    lrm = optim.lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)
    optim.step(optimizers, lrm, grad_clip=cfg.grad_clip)  # Muon's momentum stays 0.95, as in the reference
    train_loss = train_loss.item()
    num_tokens, num_processed = (int(n) for n in all_reduce_sum([num_tokens, num_processed], device))
    step += 1
    step_metrics = progress_line.update(step, train_loss, lrm, num_processed, extra={"num_tokens": num_tokens})
    wandb_run.log({"step": step, **{f"train/{k}": v for k, v in step_metrics.items()}})

# -----------------------------------------------------------------------------
# Report, cleanup

print0(f"conversations skipped on rank 0 (no assistant token within {cfg.max_seq_len + 1} tokens): "
       f"{skipped['train']} in training, {skipped['val']} in validation passes")
report.log(section="Chat SFT", data=[
    user_config,
    {"start model": f"{start.source['source']} {start.source['model_tag']} step {start.source['step']}",
     "train conversations": len(train_dataset), "iterations": num_iterations, "DDP world size": compute.world_size},
    {"final val loss": val_loss, **{f"{name} accuracy": acc for name, acc in metrics.items()}},
])
wandb_run.finish()
compute_cleanup()
