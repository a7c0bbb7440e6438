"""
Midtraining: teach the base model the chat format, multiple-choice answers and calculator tool use,
by training it for one epoch on a mixture of rendered conversations packed like pretraining text.

Run:
    python -m scripts.mid_train                                     # one GPU (gradient accumulation)
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device_batch_size=16
    python -m scripts.mid_train --device_type=cpu --max_seq_len=256 --device_batch_size=4 \\
        --total_batch_size=4096 --num_iterations=100 --eval_every=50 --eval_tokens=65536   # a laptop CPU
    python -m scripts.mid_train --resume_from_step=400              # continue a run saved with --save_every
    python -m scripts.mid_train --resume_from_step=latest           # ... or after SIGTERM / Ctrl-C (saves, exits 0)

Data (tasks/), the reference's mixture: SmolTalk train (general chat), multiple-choice questions
(MMLU auxiliary_train, ~100K), GSM8K train (math with calculator calls), the identity
conversations twice (tasks/customjson.py), 200K SimpleSpelling and 80K SpellingBee
(tasks/spellingbee.py; --spelling_scale multiplies those two sizes, 0 drops them), plus your own
conversations with --custom_jsonl=a.jsonl,b.jsonl. Validation: SmolTalk test, the first 5,200
MMLU test questions and the first 420 GSM8K test problems.
--mcq_data picks the multiple-choice part: `auxiliary_train` (required), `standin` (MMLU dev +
validation + ARC-Easy/Challenge train) or `auto` (default): auxiliary_train, unless the local data
dir ($NANOCHAT_DATA_DIR) has no copy of it, in which case the stand-in is used and a warning says
so. (A failed Hugging Face download is an error, never a silent switch.)

Packing: conversations are rendered (BOS, <|user_start|> ... <|assistant_end|>) and concatenated
into one token stream, cut by the pretraining loader's packer (nanochat/dataloader.py): each
fwd/bwd takes device_batch_size · max_seq_len + 1 contiguous tokens, and every token is a target
(midtraining is still next-token prediction; SFT is where the loss is restricted to the
assistant's tokens). Rank r renders conversations r, r + world_size, ...

Horizon: one epoch. Progress = fraction of the mixture consumed (the maximum over ranks, so every
rank agrees on the LR and on when to stop); --num_iterations > 0 stops after that many steps instead.
LR: initial LR = base LR · --init_lr_frac, constant, then linear decay to 0 over the last 20% of
progress (nanochat.optim.lr_multiplier, the base schedule: it only ever decays). Muon momentum
ramps 0.85 -> 0.95 over 300 steps; no gradient clipping unless --grad_clip > 0 (as the reference).
The micro-batches go through nanochat.optim.micro_step, the update is nanochat.optim.step, as in
every stage. Val bits-per-byte every --eval_every steps and at the end.
Checkpoints go to <base>/mid_checkpoints/<model_tag>/ (same tag as the base model by default).
"""


import torch
import torch.distributed as dist

from nanochat import memory_plan, optim
from nanochat.checkpoint_manager import StageSaver, every_rank, load_start_model
from nanochat.common import compute_cleanup, compute_init, get_wandb, print0, use_fused_loss
from nanochat.dataloader import conversation_batches
from nanochat.flags import FlagError, parse_flags, print_flags, token_batch_plan
from nanochat.loss_eval import evaluate_bpb
from nanochat.progress import TrainProgress
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    run="dummy",  # wandb run name; "dummy" = no wandb
    device_type="",  # cuda | mps | cpu; empty = autodetect
    compile=-1,  # -1 auto (on for CUDA), 0 off, 1 on
    force=0,  # 1: train even when the memory plan says the batch will not fit
    # the base checkpoint to start from; also the output tag
    model_tag="",  # default: the largest base model
    step=-1,  # base checkpoint step; -1 = the latest
    # data
    mcq_data="auto",  # auto | auxiliary_train | standin (see the docstring)
    custom_jsonl="",  # comma-separated JSONL files of your own conversations
    spelling_scale=1.0,  # x the reference's 200K SimpleSpelling + 80K SpellingBee rows; 0 = none
    # optimisation
    max_seq_len=2048,
    device_batch_size=32,
    total_batch_size=524288,
    num_iterations=-1,  # -1 = one epoch of the mixture
    **optim.FLAGS,  # embedding_lr, unembedding_lr, matrix_lr, weight_decay
    grad_clip=0.0,  # 0 = no clipping (the reference clips only in base_train)
    init_lr_frac=1.0,
    # evaluation and checkpoints
    eval_every=150,
    eval_tokens=20 * 524288,
    save_every=-1,  # also save every N steps (for --resume_from_step); the final step is always saved
    resume_from_step=-1,
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
user_config = vars(cfg).copy()
if cfg.mcq_data not in ("auto", "auxiliary_train", "standin"):
    raise FlagError(f"--mcq_data must be auto, auxiliary_train or standin (got {cfg.mcq_data!r})")

# -----------------------------------------------------------------------------
# Compute, logging

compute = compute_init(cfg.device_type)
device, master = compute.device, compute.master_process
print_flags(cfg, DEFAULTS)
grad_accum_steps, eval_steps, batch_line = token_batch_plan(cfg, compute.world_size)
wandb_run = get_wandb(cfg.run, project="nanochat-mid", config=user_config, master_process=master)
report = get_report()

# -----------------------------------------------------------------------------
# Model: the base checkpoint (or our own, when resuming)

start = load_start_model("mid", "base", compute, cfg.model_tag, cfg.step, cfg.resume_from_step)  # stops if none
model, tokenizer, meta = start.model, start.tokenizer, start.meta
if start.resumed_step >= 0 and meta["user_config"]["max_seq_len"] != cfg.max_seq_len:
    raise FlagError(f"the checkpoint was saved with --max_seq_len={meta['user_config']['max_seq_len']}: "
                    f"resume with the same")
model_config = meta["model_config"]
orig_model = model  # uncompiled: for saving
use_compile = cfg.compile == 1 or (cfg.compile == -1 and compute.device_type == "cuda")
orig_model.fused_loss = use_fused_loss(compute.device_type, use_compile)
if use_compile:
    model = torch.compile(model, dynamic=False)
num_flops_per_token = orig_model.estimate_flops()
print0(f"model: base {start.source['model_tag']} step {start.source['step']}, {model_config}, compile {use_compile}")
print0(batch_line)

# -----------------------------------------------------------------------------
# Optimisers: the base recipe's, every LR scaled by init_lr_frac

optimizers = optim.build(orig_model, cfg, lr_scale=cfg.init_lr_frac, states=start.optimizer_data)
memory_plan.check(orig_model, optimizers, compute, cfg.device_batch_size, cfg.max_seq_len, force=cfg.force,
                  batch_divides=cfg.total_batch_size // (cfg.max_seq_len * compute.world_size),
                  compiled=use_compile)  # stops here if it will not fit
start.optimizer_data = None  # loaded into the optimisers: free it

# -----------------------------------------------------------------------------
# Data: the mixtures, packed by nanochat/dataloader.py


def mcq_tasks():
    """Multiple-choice training questions: MMLU auxiliary_train, or the stand-in (see docstring)."""
    if cfg.mcq_data != "standin":
        try:
            return [MMLU("auxiliary_train", "train")], "MMLU auxiliary_train"
        except FileNotFoundError as e:
            if cfg.mcq_data == "auxiliary_train":
                raise
            why = (str(e).splitlines() or [""])[0][:160]
            print0(f"note: MMLU auxiliary_train is not available ({why}); the multiple-choice data is the "
                   f"stand-in, MMLU dev + validation + ARC-Easy/ARC-Challenge train "
                   f"(--mcq_data=standin chooses it without this note)")
    return ([MMLU("all", "dev"), MMLU("all", "validation"), ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train")],
            "stand-in: MMLU dev+validation, ARC-Easy/Challenge train")


mcq, mcq_description = mcq_tasks()
custom = [CustomJSON(path.strip()) for path in cfg.custom_jsonl.split(",") if path.strip()]
identity = CustomJSON(identity_conversations_path())
spelling = [SimpleSpelling(size=round(200_000 * cfg.spelling_scale), split="train"),
            SpellingBee(size=round(80_000 * cfg.spelling_scale), split="train")] if cfg.spelling_scale > 0 else []
train_dataset = TaskMixture([SmolTalk("train"), *mcq, GSM8K("train"), identity, identity, *spelling, *custom])
val_dataset = TaskMixture([SmolTalk("test"), MMLU("all", "test", stop=5200), GSM8K("test", stop=420)])
print0(f"train mixture: {len(train_dataset):,} conversations (multiple choice: {mcq_description}"
       f"{', custom: ' + cfg.custom_jsonl if custom else ''}); val mixture: {len(val_dataset):,}")
for name, dataset in (("train", train_dataset), ("val", val_dataset)):
    if len(dataset) < compute.world_size:
        raise ValueError(f"the {name} mixture has {len(dataset)} conversations, fewer than the {compute.world_size} ranks")


def packed_batches(dataset, loop: bool, state: dict | None = None):
    """(inputs, targets, state, progress) batches of this rank's conversations: the pretraining packer."""
    return conversation_batches(dataset, tokenizer, cfg.device_batch_size, cfg.max_seq_len, loop, device, state)


def max_over_ranks(value: float) -> float:
    if not compute.ddp:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


dataloader_state = start.dataloader_state  # None: from the start of the mixture
train_loader = packed_batches(train_dataset, loop=True, state=dataloader_state)
x, y, x_state, x_progress = next(train_loader)  # prefetch; x_state = stream position right after (x, y)
token_bytes = get_token_bytes(device=device)

# -----------------------------------------------------------------------------
# Schedules: LR by progress through the epoch (or by step with --num_iterations)

PROGRESS_TICKS = 10_000  # lr_multiplier counts in steps: measure epoch progress in 1/10,000ths


def get_lr_multiplier(step: int, progress: float) -> float:
    if cfg.num_iterations > 0:
        return optim.lr_multiplier(step, cfg.num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0)
    return optim.lr_multiplier(min(round(progress * PROGRESS_TICKS), PROGRESS_TICKS), PROGRESS_TICKS,
                         warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0)


# -----------------------------------------------------------------------------
# Training loop: step counts optimiser updates done so far

step, loop_state = start.step, start.loop_state
progress = loop_state.get("progress", 0.0)  # fraction of the epoch consumed before this step
min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
val_bpb = loop_state.get("val_bpb")
progress_line = TrainProgress(compute, cfg.num_iterations if cfg.num_iterations > 0 else None, num_flops_per_token,
                              first_step=step, state=loop_state)
saver = StageSaver("scripts.mid_train", compute, start.checkpoint_dir, cfg.save_every, start.resumed_step, wandb_run)
while True:
    last_step = step == cfg.num_iterations if cfg.num_iterations > 0 else progress >= 1.0
    stop = saver.should_stop(last_step)  # SIGTERM / Ctrl-C on any rank: no evaluations, save, exit 0

    if not stop and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
        model.eval()
        with compute.autocast():
            val_bpb = evaluate_bpb(model, packed_batches(val_dataset, loop=False), eval_steps, token_bytes,
                                   name="val bpb")
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        model.train()

    saver.save_if_due(step, last_step, stop, orig_model, optimizers, lambda: dict(  # the meta, built to save
        model_config=model_config, user_config=user_config, val_bpb=val_bpb, start_source=start.source,
        dataloader_state=every_rank(dataloader_state),
        loop_state=dict(progress=progress, min_val_bpb=min_val_bpb, val_bpb=val_bpb, **progress_line.state())))
    if last_step:
        break

    # one optimiser step: grad_accum_steps forward/backward passes, then optim.step (sync, clip, update)
    progress_line.start_step()
    lrm = get_lr_multiplier(step, progress)
    train_loss = 0.0
    for _ in range(grad_accum_steps):
        train_loss += optim.micro_step(model, x, y, grad_accum_steps, compute.autocast)
        dataloader_state, data_progress = x_state, x_progress  # (x, y) is consumed
        x, y, x_state, x_progress = next(train_loader)
    optim.step(optimizers, lrm, momentum=optim.muon_momentum(step), grad_clip=cfg.grad_clip)
    train_loss = train_loss.item()
    step += 1
    progress = step / cfg.num_iterations if cfg.num_iterations > 0 else max_over_ranks(data_progress)

    # logging
    step_metrics = progress_line.update(step, train_loss, lrm, cfg.total_batch_size, fraction=progress)
    wandb_run.log({"step": step, **{f"train/{k}": v for k, v in step_metrics.items()}, "train/progress": progress})

# -----------------------------------------------------------------------------
# Totals, report, cleanup

totals = progress_line.totals(compute)  # prints peak memory and training time
print0(f"min val bpb: {min_val_bpb:.4f}")
report.log(section="Midtraining", data=[
    user_config,
    {"base model": f"{start.source['model_tag']} step {start.source['step']}", "multiple-choice data": mcq_description,
     "train conversations": len(train_dataset), "val conversations": len(val_dataset), "iterations": step,
     "DDP world size": compute.world_size},
    {"min val bpb": min_val_bpb, "final val bpb": val_bpb,
     **totals},
])
wandb_run.finish()
compute_cleanup()
