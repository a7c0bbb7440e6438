"""
The memory planner: before step 0, each training stage estimates its peak device memory per rank,
prints it, and stops with one clear line (naming the largest --device_batch_size that fits) when
the estimate exceeds the device's memory; --force=1 runs anyway.

    plan = memory_plan.check(orig_model, optimizers, compute, cfg.device_batch_size, cfg.max_seq_len,
                             force=cfg.force, batch_divides=...)      # prints; SystemExit if too big

The estimate, per rank, in bytes:
- parameters and gradients, each in the parameter's dtype (all gradients exist before optim.step);
- optimiser state, ZeRO-sharded as nanochat/optim.py does: AdamW's two moments for this rank's
  ceil(rows/W) rows of each parameter; Muon's momentum for the matrices this rank owns (ceil(n/W)
  of each same-shape group);
- activations: the bytes autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
  parameters excluded, each storage once) in real forwards of the model on its device under the
  run's autocast at (1, T0), (2, T0), (1, 2·T0), fitted as saved(B, T) = c0 + B·(a·T + b·T²): c0
  per forward (autocast's weight copies), a per token, b any T² part (none with SDPA's flash
  kernels; kept so a non-flash attention would show). Only forwards run: no gradient is touched;
- the head's transient: when backward starts, the gradient of the (B·T, V) logits exists next to
  everything saved: two fp32 copies on the plain path (cross-entropy's, log-softmax's), one with
  the fused loss (nanochat/fused_loss.py). At a large vocabulary this dominates.
On the CPU, glibc's malloc raises its mmap threshold as large blocks are freed, so the forward's
freed temporaries stay in its heap: peak RSS is about the estimate + CPU_HEAP_RETAINED x the
activations (bench/memory.py: 0.59-0.64 on 3 configs; with MALLOC_MMAP_THRESHOLD_ pinned, RSS is
the estimate within 20 %). The CPU's stop decision uses that RSS figure.
Activations are counted on the eager model; torch.compile fuses the head and elementwise ops and
keeps less, so a compiled run scales activations and head by COMPILE_FACTOR, measured once: d20 x
32 x 2048, vocab 65,536, one H200, max_memory_allocated 75.4 GB where the eager count gives
153.0 GB (6.7 GB static + 146.3 GB): 0.47. With --fp32_embedding=1: 79.3 GB estimated, 82.8 measured.
Not counted: the CUDA context (outside max_memory_allocated too), allocator fragmentation, the
optimiser step's temporaries (one matrix at a time), the data batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanochat.flags import StopRun
from nanochat.optim import AdamW, Muon

COMPILE_FACTOR = 0.47  # compiled / eager activations + head, measured on an H200 (see the docstring)
CPU_HEAP_RETAINED = 0.6  # glibc keeps ~0.6 x the activations in its heap (see the docstring)


@dataclass
class Plan:
    parameters: int
    gradients: int
    optimizer: int
    act_const: int  # saved bytes per forward that do not scale with the batch
    act_per_token: float  # saved bytes per token, linear part (a)
    act_per_token_t: float  # saved bytes per token per position (b: the T² part / B·T)
    head_per_token: int  # the head's transient gradient, bytes per token
    batch_size: int
    seq_len: int
    world_size: int
    compiled: bool = False  # activations and head x COMPILE_FACTOR

    def per_sequence(self) -> float:
        """Bytes one more sequence adds: activations and the head's transient."""
        T = self.seq_len
        return self.scale * T * (self.act_per_token + self.act_per_token_t * T + self.head_per_token)

    @property
    def scale(self) -> float:
        return COMPILE_FACTOR if self.compiled else 1.0

    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    def activations(self, batch_size: int | None = None) -> float:
        T, B = self.seq_len, batch_size or self.batch_size
        return self.scale * (self.act_const + B * T * (self.act_per_token + self.act_per_token_t * T))

    def peak(self, batch_size: int | None = None) -> float:
        B = batch_size or self.batch_size
        return self.static() + self.scale * self.act_const + B * self.per_sequence()

    def rss(self, batch_size: int | None = None) -> float:
        """The peak as the CPU's resident memory (glibc's heap keeps some freed activations)."""
        return self.peak(batch_size) + CPU_HEAP_RETAINED * self.activations(batch_size)

    def largest_batch(self, budget: float, divides: int | None = None, cpu: bool = False) -> int:
        """The largest device batch whose peak (`cpu`: its RSS) fits in `budget` bytes (0 if even 1
        does not), and, when `divides` is given, that divides it (the batch arithmetic must come out even)."""
        f = self.rss if cpu else self.peak  # linear in the batch
        per_seq = f(2) - f(1)
        best = max(0, int((budget - (f(1) - per_seq)) // per_seq))
        best = min(best, divides or best)
        while divides and best > 0 and divides % best:
            best -= 1
        return best

    def summary(self) -> str:
        B, T = self.batch_size, self.seq_len
        how = f"compiled: eager x {COMPILE_FACTOR}" if self.compiled else "eager"
        return (f"memory plan (per rank, {how}): parameters {fmt(self.parameters)}, gradients {fmt(self.gradients)}, "
                f"optimiser state {fmt(self.optimizer)} (rank's share of {self.world_size}), activations "
                f"{fmt(self.activations())} ({B} x {T} tokens, {fmt(self.activations() / (B * T))}/token), head "
                f"transient {fmt(self.scale * B * T * self.head_per_token)} -> estimated peak {fmt(self.peak())}")


def fmt(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def optimizer_state_bytes(optimizers, world_size: int) -> int:
    """This rank's optimiser state once every parameter has been stepped (ZeRO shards, see optim.py)."""
    total = 0
    for opt in optimizers:
        for group in opt.param_groups:
            params = group["params"]
            if isinstance(opt, AdamW):  # exp_avg, exp_avg_sq on ceil(rows/W) rows
                total += sum(2 * math.ceil(p.size(0) / world_size) * (p.numel() // p.size(0)) * p.element_size()
                             for p in params)
            elif isinstance(opt, Muon):  # one momentum buffer per owned matrix (groups have one shape)
                total += math.ceil(len(params) / world_size) * params[0].numel() * params[0].element_size()
            else:
                raise TypeError(f"memory_plan does not know the state of {type(opt).__name__}")
    return total


def saved_bytes(model, batch_size: int, seq_len: int, autocast) -> int:
    """Bytes autograd saves for backward in one forward (with targets: the loss) of `model` on a
    (batch_size, seq_len) batch; parameters excluded, each storage counted once."""
    device = model.lm_head.weight.device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
        return t

    idx = (torch.arange(batch_size * seq_len, device=device) % model.config.vocab_size).view(batch_size, seq_len)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = model(idx, idx.roll(-1, dims=1))
    del loss  # the graph and everything it saved go with it; no backward, no gradients
    return total


def estimate(model, optimizers, world_size: int, batch_size: int, seq_len: int, autocast,
             probe_len: int = 64, compiled: bool = False) -> Plan:
    """The Plan of a run of `model` at (batch_size, seq_len) on world_size ranks (see the docstring)."""
    T0 = min(probe_len, seq_len)
    s1, s2, s1_long = (saved_bytes(model, b, t, autocast) for b, t in ((1, T0), (2, T0), (1, 2 * T0)))
    per_seq = s2 - s1  # one sequence of T0: a·T0 + b·T0²
    const = max(0, s1 - per_seq)
    per_seq_long = s1_long - const  # a·2T0 + b·4T0²
    b = max(0.0, (per_seq_long - 2 * per_seq) / (2 * T0 * T0))
    a = per_seq / T0 - b * T0
    n_logit_copies = 1 if getattr(model, "fused_loss", False) else 2
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Plan(parameters=param_bytes, gradients=param_bytes, optimizer=optimizer_state_bytes(optimizers, world_size),
                act_const=const, act_per_token=a, act_per_token_t=b,
                head_per_token=n_logit_copies * 4 * model.config.vocab_size,
                batch_size=batch_size, seq_len=seq_len, world_size=world_size, compiled=compiled)


def device_budget(device: torch.device, already_allocated: int) -> tuple[float, str]:
    """(bytes the run may use, a description): the GPU's total memory on CUDA; elsewhere the RAM
    available now plus what the model already holds (its parameters are in the estimate)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name}'s {fmt(props.total_memory)}"
    import psutil
    available = psutil.virtual_memory().available + already_allocated
    return available, f"{fmt(available)} of available RAM"


def check(model, optimizers, compute, batch_size: int, seq_len: int, force: bool = False,
          batch_divides: int | None = None, compiled: bool = False) -> Plan:
    """Estimate, print (rank 0) and stop before an OOM: the one call each training script makes
    after building its model and optimisers. `batch_divides`: a number the device batch must
    divide (so the suggested --device_batch_size keeps the script's batch arithmetic exact);
    `compiled`: the run uses torch.compile (model is the eager module it wraps)."""
    plan = estimate(model, optimizers, compute.world_size, batch_size, seq_len, compute.autocast, compiled=compiled)
    budget, what = device_budget(compute.device, plan.parameters)
    cpu = compute.device.type == "cpu"
    peak = plan.rss() if cpu else plan.peak()
    if compute.master_process:
        print(f"{plan.summary()}{f' ({fmt(peak)} as RSS)' if cpu else ''} of {what}", flush=True)
    if peak > budget:
        fits = plan.largest_batch(budget, batch_divides, cpu=cpu)
        advice = (f"the largest --device_batch_size that fits is {fits}" if fits else
                  "even --device_batch_size=1 does not fit: lower --max_seq_len or the model size")
        message = (f"memory plan: the estimated peak {fmt(peak)} per rank exceeds {what}; {advice} "
                   f"(--force=1 runs anyway)")
        if not force:
            raise StopRun(message)
        if compute.master_process:
            print(f"{message}: --force=1, running anyway", flush=True)
    global LAST
    LAST = plan
    return plan


LAST: Plan | None = None  # the last plan check() made (bench/memory.py reads it after a run)
