"""
Two training checks for dev/gpu_check.sh, on whatever device is given.

    python -m dev.gpu_train_check --check=compile --device=cuda
    torchrun --standalone --nproc_per_node=2 -m dev.gpu_train_check --check=ranks --device=cuda --out=DIR
    python -m dev.gpu_train_check --check=ranks --device=cuda --out=DIR    # after the torchrun line

- compile: the same model, initial weights and batches, trained a few steps eagerly and under
  torch.compile (autocast as base_train uses it); the losses must agree within --tolerance
  (relative). Kernel fusion sums in another order, so a bf16 run agrees to ~1e-2, not bit for bit.
- ranks: one global batch per step, split over the torchrun ranks (NCCL on CUDA, gloo on the CPU),
  then the same global batch in one process with gradient accumulation: the parameters must agree
  within --tolerance (a norm per tensor, relative to how far training moved it; fp32 weights and
  math, so only the all-reduce's summation order differs).
  The torchrun run writes DIR/rank0.pt; the plain run computes the single-process reference and
  compares. With one GPU there is nothing to split: the torchrun line is skipped by gpu_check.sh.
Random tokens and random weights: no dataset, no tokenizer. Prints one JSON line; exit status 1 on
a mismatch.
"""

import json
import os

import torch

from nanochat import optim
from nanochat.common import compute_cleanup, compute_init
from nanochat.flags import parse_flags
from nanochat.gpt import GPT, GPTConfig

cfg = parse_flags(dict(check="compile", device="", out="", depth=4, seq=256, vocab=8192, steps=4, tolerance=-1.0),
                  doc=__doc__)
compute = compute_init(cfg.device)
config = GPTConfig(sequence_len=cfg.seq, vocab_size=cfg.vocab, n_layer=cfg.depth, n_head=cfg.depth,
                   n_kv_head=cfg.depth, n_embd=64 * cfg.depth)
ROWS, MICRO_BATCHES = 2, 4  # per micro-batch; per step (the global batch is ROWS * MICRO_BATCHES rows)


def build() -> GPT:
    torch.manual_seed(0)  # the same initial weights in every run and on every rank
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=compute.device)
    model.init_weights()
    return model


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: the same on every rank and in every run."""
    g = torch.Generator().manual_seed(1000 + step)
    xy = torch.randint(0, cfg.vocab, (2, ROWS * MICRO_BATCHES, cfg.seq), generator=g)
    return xy[0].to(compute.device), xy[1].to(compute.device)


def train(model, rank: int, world_size: int, autocast: bool, compiled: bool = False) -> list[float]:
    """`cfg.steps` steps of nanochat.optim.step on this rank's share of each global batch; the losses."""
    forward = torch.compile(model, dynamic=False) if compiled else model
    optimizers = model.setup_optimizers()
    accum = MICRO_BATCHES // world_size
    losses = []
    for step in range(cfg.steps):
        x, y = batches(step)
        total = 0.0
        for k in range(accum):
            rows = slice((rank * accum + k) * ROWS, (rank * accum + k + 1) * ROWS)
            with compute.autocast() if autocast else torch.autocast(compute.device_type, enabled=False):
                loss = forward(x[rows], y[rows]) / accum
            loss.backward()
            total += loss.item()
        optim.step(optimizers, 1.0, momentum=optim.muon_momentum(step), grad_clip=1.0)
        losses.append(total)
    return losses


result = {"check": cfg.check, "device": compute.device_type, "world_size": compute.world_size}
if cfg.check == "compile":
    tolerance = cfg.tolerance if cfg.tolerance > 0 else 2e-2
    eager = train(build(), 0, 1, autocast=True)
    compiled = train(build(), 0, 1, autocast=True, compiled=True)
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    result.update(eager=[round(v, 4) for v in eager], compiled=[round(v, 4) for v in compiled],
                  worst_relative_diff=worst, ok=worst <= tolerance)
elif cfg.check == "ranks":
    assert cfg.out, "--out=DIR: where the torchrun ranks leave rank0.pt for the single-process run"
    # Adam divides by the gradient's size and Muon orthogonalises it, so both magnify the all-reduce's
    # rounding where a gradient nearly cancels (a few embedding entries, weak directions; more so in
    # bf16 on CUDA). The gap is therefore a norm over the whole tensor, relative to how far training
    # moved it, and the bar sits above that noise; a wrong reduction (a sum, a missing rank) is ~1.
    tolerance = cfg.tolerance if cfg.tolerance > 0 else (2e-2 if compute.device_type == "cuda" else 2e-3)
    model = build()
    initial = {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()}
    losses = train(model, compute.rank, compute.world_size, autocast=False)
    params = {name: p.detach().float().cpu() for name, p in model.named_parameters()}
    if compute.ddp:  # the torchrun run: leave the result for the reference
        if compute.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            torch.save({"params": params, "world_size": compute.world_size}, os.path.join(cfg.out, "rank0.pt"))
        result.update(ok=True, saved=os.path.join(cfg.out, "rank0.pt"))
    else:  # the reference: one process, the whole global batch by accumulation
        ranks = torch.load(os.path.join(cfg.out, "rank0.pt"))
        gaps = {n: ((ranks["params"][n] - p).norm() / (p - initial[n]).norm().clamp(min=1e-12)).item()
                for n, p in params.items()}
        worst = max(gaps, key=gaps.get)
        result.update(ranks=ranks["world_size"], worst_relative_diff=gaps[worst], worst_param=worst,
                      tolerance=tolerance, ok=gaps[worst] <= tolerance)
else:
    raise SystemExit(f"--check={cfg.check!r}: use compile or ranks")
if compute.rank == 0:
    print(json.dumps(result), flush=True)
compute_cleanup()
raise SystemExit(0 if result["ok"] else 1)
