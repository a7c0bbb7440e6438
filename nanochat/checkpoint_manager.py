"""
Saving and loading checkpoints, and finding them again.

A checkpoint of step S in a directory such as `<base>/base_checkpoints/d20/` is three kinds of file:
- `model_{S:06d}.pt`: the (uncompiled) model's state dict, written by rank 0;
- `optim_{S:06d}_rank{r}.pt`: optimiser state, one per rank: the distributed optimisers keep only
  their own shard, so every rank must save (and later load) its own file;
- `meta_{S:06d}.json`: what the checkpoint describes: model config, user flags, step, val bpb,
  dataloader and loop state, world size.

Design choices:
- Every file is written to a temp name and renamed into place (`os.replace` is atomic), and the meta
  file goes last, after every rank's files are complete (a barrier under torchrun). A checkpoint
  counts as present only when its meta exists, so a process killed mid-save leaves the previous
  checkpoint as the latest one, and the partial one is never loaded. Re-saving a step first removes
  its meta, for the same reason.
- Models are built on the meta device, materialised with `to_empty`, given their buffers by
  `init_weights()`, then the saved weights are assigned. Names of a `torch.compile`d model carry
  an `_orig_mod.` prefix: it is removed with `str.removeprefix`. (`lstrip("_orig_mod.")` strips any
  leading characters from that set, not the prefix: it would turn `root.weight` into `t.weight`.)
- A damaged file (a truncated or empty .pt, a meta that is not JSON or lacks its keys) is a
  CheckpointError: a SystemExit carrying one line that names the file, what is wrong and which
  complete step to use instead, so every stage that loads checkpoints ends with that line, exit
  status 1, no traceback. Loading never writes or deletes anything.
- Stage directories: base -> base_checkpoints, mid -> mid_checkpoints, sft -> chatsft_checkpoints,
  rl -> chatrl_checkpoints; tags default to the largest `d<depth>` present, steps to the latest.
- What every training stage shares around its checkpoints: `StageSaver` (save at the last step,
  on SIGTERM / Ctrl-C and every --save_every steps, never the step just resumed from; then exit 0
  on a signal), `every_rank` / `this_rank` (each rank's loader position, gathered for the meta and
  handed back on resume), and, for mid/SFT/RL, `load_start_model` (the previous stage's model, or
  the stage's own checkpoint when resuming, as a `StartModel`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.common import Compute, atomic_write, base_dir_path, get_dist_info, print0, use_fused_loss
from nanochat.flags import FlagError, StopRun
from nanochat.preempt import Preemption

logger = logging.getLogger("nanochat")

SOURCES = {  # source -> (checkpoint directory, the command that produces it)
    "base": ("base_checkpoints", "python -m scripts.base_train"),
    "mid": ("mid_checkpoints", "python -m scripts.mid_train"),
    "sft": ("chatsft_checkpoints", "python -m scripts.chat_sft"),
    "rl": ("chatrl_checkpoints", "python -m scripts.chat_rl"),
}


class CheckpointError(StopRun):
    """A damaged checkpoint file. Like flags.FlagError: the script ends printing the message to
    stderr with exit status 1, not a traceback."""


def _damaged(checkpoint_dir: str, step: int, path: str, what: str) -> CheckpointError:
    others = [s for s in _complete_steps(checkpoint_dir) if s != step]
    earlier = [s for s in others if s < step]
    if earlier:
        advice = (f"use the previous complete checkpoint, step {earlier[-1]} (--resume_from_step={earlier[-1]} "
                  f"to resume training, --step={earlier[-1]} to load it), or delete step {step}'s files")
    elif others:
        advice = f"use step {others[-1]} instead, or delete step {step}'s files"
    else:
        advice = "there is no other complete checkpoint there: re-run the stage that wrote it"
    return CheckpointError(f"checkpoint file {path} {what}: {advice}")


def _load_pt(checkpoint_dir: str, step: int, path: str, device) -> dict:
    if os.path.getsize(path) == 0:
        raise _damaged(checkpoint_dir, step, path, "is empty")
    try:  # weights_only: tensors and plain data, never code (explicit: an environment variable can flip the default)
        data = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _damaged(checkpoint_dir, step, path, "is truncated or damaged (UnpicklingError)") from None
        raise _damaged(checkpoint_dir, step, path, "holds objects other than tensors and plain data (refused: "
                                                   "loading them could run code)") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, AttributeError, ImportError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise _damaged(checkpoint_dir, step, path, f"is truncated or damaged ({why})") from None
    if not isinstance(data, (dict, list)):
        raise _damaged(checkpoint_dir, step, path, f"holds a {type(data).__name__}, not a state dict")
    return data


def _load_meta(checkpoint_dir: str, step: int, path: str, required: tuple[str, ...]) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise _damaged(checkpoint_dir, step, path, "is empty")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(checkpoint_dir, step, path, f"is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise _damaged(checkpoint_dir, step, path, f"holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in required if k not in meta]
    if missing:
        raise _damaged(checkpoint_dir, step, path, f"lacks the key(s) {', '.join(missing)}")
    return meta


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_due(step: int, save_every: int, last_step: bool, stop: bool, resumed_step: int) -> bool:
    """Whether a training stage saves after `step` steps: at its last step, when it stops early
    (SIGTERM / Ctrl-C), and every `save_every` steps (<= 0: only those two), but never at the step
    it resumed from (that checkpoint is on disk already)."""
    periodic = save_every > 0 and step > 0 and step % save_every == 0
    return step != resumed_step and (last_step or stop or periodic)


def every_rank(state) -> list:
    """[rank 0's `state`, rank 1's, ...] on every rank: each rank's loader position (any picklable
    object), gathered for the checkpoint meta so that a resumed run restarts every rank exactly."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def this_rank(states: list, compute: Compute):
    """This rank's entry of a checkpoint's per-rank list (what every_rank gathered). The run must
    have as many ranks as the one that saved it: each rank continues its own loader position."""
    if len(states) != compute.world_size:
        raise FlagError(f"the checkpoint was saved by {len(states)} rank(s); resume it with as many "
                        f"(this run has {compute.world_size})")
    return states[compute.rank]


class StageSaver:
    """When a training stage saves, and what it does on SIGTERM / Ctrl-C (nanochat/preempt.py).
    At the top of every iteration `should_stop` (every rank agrees); after the evaluations
    `save_if_due`: saves when checkpoint_due says so and, when stopping, prints the resume command
    and exits 0."""

    def __init__(self, module: str, compute: Compute, checkpoint_dir: str, save_every: int, resumed_step: int,
                 wandb_run=None):
        self.compute, self.checkpoint_dir, self.wandb_run = compute, checkpoint_dir, wandb_run
        self.save_every, self.resumed_step = save_every, resumed_step
        self.preemption = Preemption(module, compute)  # watches for the signals from here on

    def should_stop(self, last_step: bool) -> bool:
        """Whether any rank got a signal (the last step saves and ends anyway). Call it at the same
        point of every iteration on every rank: it is a collective."""
        return self.preemption.should_stop() and not last_step

    def save_if_due(self, step: int, last_step: bool, stop: bool, model: torch.nn.Module, optimizers: list,
                    meta: Callable[[], dict]) -> None:
        """Save step `step` (the uncompiled model, every rank's optimiser shard, meta() as the
        meta data) if it is due; then, if stopping, exit 0. meta is called only when saving (it
        may gather from every rank)."""
        if checkpoint_due(step, self.save_every, last_step, stop, self.resumed_step):
            save_checkpoint(self.checkpoint_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers],
                            meta(), rank=self.compute.rank)
        if stop:
            self.preemption.exit(step, self.checkpoint_dir, self.wandb_run)


def save_checkpoint(checkpoint_dir: str, step: int, model_data: dict | None, optimizer_data: dict | None,
                    meta_data: dict, rank: int = 0) -> None:
    """Save one checkpoint. Under torchrun every rank calls this (it contains barriers): each rank
    writes its optimiser shard, rank 0 the model and, once all are complete, the meta file."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if rank == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # re-saving this step: it is incomplete until the new meta lands
    _barrier()
    if optimizer_data is not None:
        atomic_write(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"),
                      lambda f: torch.save(optimizer_data, f))
    if rank == 0 and model_data is not None:
        atomic_write(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), lambda f: torch.save(model_data, f))
    _barrier()  # every rank's files are complete
    if rank == 0:
        # temp files left by a process killed during an earlier save; nobody is writing now
        for stale in glob.glob(os.path.join(checkpoint_dir, "*.tmp*")):
            os.remove(stale)
        meta = {"step": step, "world_size": get_dist_info()[3],
                "has_optimizer": optimizer_data is not None, **meta_data}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")
    _barrier()


def load_checkpoint(checkpoint_dir: str, step: int, device: torch.device | str, load_optimizer: bool = False,
                    rank: int = 0, required: tuple[str, ...] = ("step",)) -> tuple[dict, dict | None, dict]:
    """(model state dict, this rank's optimiser state or None, meta dict) of a complete checkpoint;
    the meta must have the keys `required` (a CheckpointError names the missing ones)."""
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(meta_path):
        steps = _complete_steps(checkpoint_dir)
        raise FileNotFoundError(f"no complete checkpoint of step {step} in {checkpoint_dir} "
                                f"(complete steps there: {', '.join(map(str, steps)) or 'none'})")
    meta = _load_meta(checkpoint_dir, step, meta_path, required)
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if not os.path.exists(model_path):
        raise _damaged(checkpoint_dir, step, model_path, "is missing (its meta file is there)")
    model_data = _load_pt(checkpoint_dir, step, model_path, device)
    optimizer_data = None
    if load_optimizer:
        optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
        if not os.path.exists(optim_path):
            raise FileNotFoundError(f"{optim_path} is missing: the checkpoint was saved by "
                                    f"{meta.get('world_size', '?')} rank(s) (with optimiser state: "
                                    f"{meta.get('has_optimizer', '?')}); resume with the same number of ranks")
        optimizer_data = _load_pt(checkpoint_dir, step, optim_path, device)
    return model_data, optimizer_data, meta


def _complete_steps(checkpoint_dir: str) -> list[int]:
    paths = glob.glob(os.path.join(checkpoint_dir, "meta_*.json"))
    return sorted(int(m.group(1)) for p in paths if (m := re.fullmatch(r"meta_(\d+)\.json", os.path.basename(p))))


def find_last_step(checkpoint_dir: str) -> int:
    """The largest step with a complete checkpoint (its meta file exists)."""
    steps = _complete_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
    return steps[-1]


def resolve_resume_step(checkpoint_dir: str, requested: int) -> int:
    """The step a stage resumes from: -1 (not resuming) stays -1; LATEST (-2, from
    `--resume_from_step=latest`) becomes the newest complete checkpoint; a step must exist. A
    missing one is a FileNotFoundError naming the steps that do exist."""
    from nanochat.flags import LATEST
    if requested == -1:
        return -1
    steps = _complete_steps(checkpoint_dir)
    if requested == LATEST:
        if not steps:
            raise FileNotFoundError(f"--resume_from_step=latest: no complete checkpoint in {checkpoint_dir} "
                                    f"(check --model_tag, or start without --resume_from_step)")
        return steps[-1]
    if requested not in steps:
        raise FileNotFoundError(f"--resume_from_step={requested}: no complete checkpoint of step {requested} in "
                                f"{checkpoint_dir}; complete steps there: {', '.join(map(str, steps)) or 'none'}"
                                f"{f' (--resume_from_step=latest takes {steps[-1]})' if steps else ''}")
    return requested


def find_largest_model(checkpoints_dir: str) -> str:
    """The model tag with the largest depth (`d20` > `d12`); without dN tags, the newest one."""
    if not os.path.isdir(checkpoints_dir):
        raise FileNotFoundError(f"no checkpoints directory {checkpoints_dir}")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise FileNotFoundError(f"no model tags in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def build_model(checkpoint_dir: str, step: int, device: torch.device | str, phase: str,
                objectives: tuple[str, ...] = ("ar",)):
    """(model, tokenizer, meta) from a checkpoint. phase 'train' or 'eval' sets the model's mode.
    The checkpoint's objective (meta "objective", "ar" when absent) must be one of `objectives`;
    an 'mdlm' model comes with bidirectional attention and the tokenizer with <|mask|>."""
    from nanochat.diffusion import add_mask_token, check_objective
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer
    assert phase in ("train", "eval"), f"phase must be 'train' or 'eval' (got {phase!r})"
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device, required=("step", "model_config"))
    objective = meta.get("objective", "ar")
    check_objective(objective, objectives, f"checkpoint {checkpoint_dir} step {step}")
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    if device.type in ("cpu", "mps"):  # bf16 weights saved on CUDA: compute in fp32 here
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    try:
        config = GPTConfig(**meta["model_config"])
    except TypeError as e:
        raise _damaged(checkpoint_dir, step, os.path.join(checkpoint_dir, f"meta_{step:06d}.json"),
                       f"has a model_config that is not a GPT's ({e})") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the state dict
    model.load_state_dict(model_data, strict=True, assign=True)
    model.fused_loss = use_fused_loss(device.type)  # a script that compiles the model sets it again
    model.causal = objective == "ar"
    model.train(phase == "train")
    tokenizer = get_tokenizer() if objective == "ar" else add_mask_token(get_tokenizer())
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model in {checkpoint_dir} "
                         f"was trained with {config.vocab_size}: it belongs to another tokenizer")
    return model, tokenizer, meta


def load_model(source: str, device: torch.device | str, phase: str, model_tag: str | None = None,
               step: int | None = None, objectives: tuple[str, ...] = ("ar",)):
    """(model, tokenizer, meta) of stage `source` (base|mid|sft|rl): the largest model tag and its
    latest step unless given. A model of another objective than `objectives` stops with one line."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)} (got {source!r})")
    dirname, producer = SOURCES[source]
    checkpoints_dir = os.path.join(base_dir_path(), dirname)  # reading: never create the base dir
    try:
        model_tag = model_tag or find_largest_model(checkpoints_dir)
        checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
        step = find_last_step(checkpoint_dir) if step is None else step
        return build_model(checkpoint_dir, step, device, phase, objectives)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no usable {source} checkpoint ({e}); `{producer}` writes them") from e


@dataclass
class StartModel:
    """What a fine-tuning stage (mid, sft or rl) begins from: see load_start_model."""
    model: torch.nn.Module  # the GPT, in train mode
    tokenizer: object
    meta: dict  # the loaded checkpoint's meta
    optimizer_data: object  # this rank's optimiser shard when resuming, else None
    checkpoint_dir: str  # where the stage saves
    source: dict  # {"source", "model_tag", "step"}: the model the stage began from (kept in its checkpoints)
    step: int  # the first step to run: 0, or the step resumed from
    resumed_step: int  # the step resumed from, -1 when not resuming
    loop_state: dict  # the loop's numbers at that step ({} when not resuming)
    dataloader_state: object  # this rank's loader position at that step (None when not resuming, or for rl)


def load_start_model(stage: str, source: str, compute: Compute, model_tag: str = "", step: int = -1,
                     resume_from_step: int = -1) -> StartModel:
    """The model a fine-tuning stage (mid, sft or rl) trains, and where its loop starts.

    Normally: checkpoint `step` of `source` (default: its largest tag, latest step), from step 0.
    With `resume_from_step >= 0`: that step of the stage's own checkpoints instead, with this
    rank's optimiser shard, loop state and (mid, sft) loader position; the run needs as many ranks
    as the one that saved it. resume_from_step LATEST (-2) resumes the newest complete checkpoint.
    The stage keeps `source` in its checkpoints' meta ("start_source"), so a resumed run still
    knows what it began from. No checkpoint to start from stops the run with one line, prefixed
    with the stage's script, naming the command that writes one."""
    try:
        return _load_start_model(stage, source, compute, model_tag, step, resume_from_step)
    except FileNotFoundError as e:
        script = SOURCES[stage][1].split("scripts.")[-1]  # e.g. chat_sft
        raise StopRun(f"{script}: {e}") from None


def _load_start_model(stage: str, source: str, compute: Compute, model_tag: str, step: int,
                      resume_from_step: int) -> StartModel:
    checkpoints_root = os.path.join(base_dir_path(), SOURCES[stage][0])
    if resume_from_step != -1:
        checkpoint_dir = os.path.join(checkpoints_root, model_tag or find_largest_model(checkpoints_root))
        resume_from_step = resolve_resume_step(checkpoint_dir, resume_from_step)
        print0(f"resuming from step {resume_from_step} of {checkpoint_dir}")
        model, tokenizer, meta = build_model(checkpoint_dir, resume_from_step, compute.device, phase="train")
        loader = stage in ("mid", "sft")  # rl draws its problems from the step: no loader position
        required = ("step", "start_source", "loop_state") + (("dataloader_state",) if loader else ())
        _, optimizer_data, _ = load_checkpoint(checkpoint_dir, resume_from_step, compute.device, load_optimizer=True,
                                               rank=compute.rank, required=required)
        return StartModel(model, tokenizer, meta, optimizer_data, checkpoint_dir, meta["start_source"],
                          step=meta["step"], resumed_step=meta["step"], loop_state=meta["loop_state"],
                          dataloader_state=this_rank(meta["dataloader_state"], compute) if loader else None)
    model, tokenizer, meta = load_model(source, compute.device, phase="train", model_tag=model_tag or None,
                                        step=None if step < 0 else step)
    model_tag = model_tag or find_largest_model(os.path.join(base_dir_path(), SOURCES[source][0]))
    start = {"source": source, "model_tag": model_tag, "step": meta["step"]}
    return StartModel(model, tokenizer, meta, None, os.path.join(checkpoints_root, model_tag), start,
                      step=0, resumed_step=-1, loop_state={}, dataloader_state=None)
