"""
The optimisers and the one training step every stage calls: AdamW for the embedding and the LM
head, Muon for the matrices inside the blocks, both data-parallel (ZeRO-2 style) when several
ranks run, and `step()`, which reduces, clips, sets the schedules and updates.

    optimizers = build(model, cfg)                          # [AdamW, Muon], see GPT.setup_optimizers
    for _ in range(grad_accum_steps):
        train_loss += micro_step(model, x, y, grad_accum_steps, compute.autocast)  # local gradients add up
    lrm = lr_multiplier(it, num_iterations)                 # the schedules, below
    grad_norm = step(optimizers, lrm, momentum=muon_momentum(it), grad_clip=1.0)

`step()` is the whole update, the same in base_train, mid_train, chat_sft and chat_rl: start the
cross-rank averaging, clip the averaged gradient (grad_clip > 0), set every group's lr to
initial_lr · lrm and (when given) Muon's momentum, update each rank's shards, all-gather the
weights, drop the gradients. The stages differ only in the values they pass (see each script).

- AdamW (Loshchilov & Hutter 2019): bias-corrected, weight decay decoupled from the gradient; the
  update torch.optim.AdamW applies (tests/test_optim.py checks step for step), written out so the
  same rule runs on a whole parameter (one rank) or on this rank's rows of it (several ranks).
- Muon (Keller Jordan 2024, kellerjordan.github.io/posts/muon, from the modded-nanogpt speedruns):
  Nesterov momentum, then the update G replaced by the nearest semi-orthogonal matrix (U·Vᵀ of
  G = U·S·Vᵀ), approximated by 5 quintic Newton-Schulz iterations whose coefficients (3.4445,
  -4.7750, 2.0315) push singular values into ~[0.7, 1.2] fast rather than converge exactly; scaled
  by sqrt(max(1, rows/cols)). Parameters are grouped by shape (ordered, the same on every rank).

Data parallelism: there is no DDP wrapper. Each rank keeps its local gradients and the optimisers
synchronise. Clipping must see the gradient that will be applied (one rank's local gradient
averages fewer examples: its norm is larger and ranks would disagree), so `clip_grad_norm` sums
the squared norms of the averaged shards each rank owns, all-reduces that sum, and scales them.
How the work is split over W ranks (this one is `rank`):
- "rows" (AdamW, ZeRO-2): each gradient is reduce-scattered (averaged) along dim 0 into W chunks of
  ceil(rows/W) rows, zero-padded when W does not divide the rows (e.g. a vocab of 65,537 rows on 8
  ranks); a rank updates, and keeps Adam state for, its chunk; the chunks are all-gathered.
- "matrices" (Muon): an orthogonalised update needs the whole matrix, so within each same-shape
  group matrix i belongs to rank i % W. Gradients are reduce-scattered over lists of W matrices
  (the last list padded with a zero matrix), each owner updates its matrices, weights all-gathered.
With W = 1 there is no copy and no collective: a rank's "shard" is the parameter and its .grad.
A rank's optimiser state, and its `state_dict()`, cover only its own shards, so every rank saves
its own file and a run resumes with the same world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info

# reduce_scatter_tensor / all_gather_into_tensor were renamed in recent torch releases
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -----------------------------------------------------------------------------
# Building the optimisers and the training step

# Every training stage's optimiser flags and their defaults (the reference's); DEFAULTS of each
# script spreads them (`**optim.FLAGS`), and the stage adds its grad_clip.
FLAGS = dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0)


def build(model, cfg, lr_scale: float = 1.0, states: list[dict] | None = None) -> list[ShardedOptimizer]:
    """[AdamW, Muon] for `model` (GPT.setup_optimizers) with the stage's flags in `cfg` (FLAGS),
    every LR times lr_scale; `states`, this rank's optimiser states from a checkpoint, are loaded."""
    optimizers = model.setup_optimizers(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                        matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, lr_scale=lr_scale)
    for opt, state in zip(optimizers, states or []):
        opt.load_state_dict(state)
    return optimizers


def micro_step(model, x: torch.Tensor, y: torch.Tensor, grad_accum_steps: int, autocast) -> torch.Tensor:
    """Forward and backward of one micro-batch (x, y: (B, T)): the mean loss `model(x, y)` (the
    model, or any callable (x, y) -> scalar loss) under `autocast()` (compute.autocast), its
    gradient scaled by 1/grad_accum_steps added to the parameters' .grad, so that the step's
    gradient is the mean over all its micro-batches. Returns the detached loss / grad_accum_steps:
    the micro-batches' returns add up to the step's mean train loss."""
    with autocast():
        loss = model(x, y)
    (loss / grad_accum_steps).backward()
    return loss.detach() / grad_accum_steps


@torch.no_grad()
def step(optimizers: list[ShardedOptimizer], lrm: float, momentum: float | None = None,
         grad_clip: float = 0.0) -> torch.Tensor | None:
    """One optimiser step after the micro-batches' backward passes: average the gradients across
    ranks, clip the averaged gradient to `grad_clip` (0 = no clipping), set lr = initial_lr · lrm in
    every group and Muon's momentum (None = leave it), update, and drop the gradients. Returns the
    gradient norm before clipping (the same on every rank), or None without clipping."""
    for opt in optimizers:
        opt.reduce_gradients()  # launch the reduce-scatters (asynchronous; no-op on one rank)
    grad_norm = clip_grad_norm(optimizers, grad_clip) if grad_clip > 0 else None
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if momentum is not None and "momentum" in group:  # Muon's groups
                group["momentum"] = momentum
    for opt in optimizers:
        opt.step()  # each rank updates its shards, then the weights are all-gathered
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def clip_grad_norm(optimizers: list[ShardedOptimizer], max_norm: float) -> torch.Tensor:
    """Scale the gradients the optimisers will apply so that their global L2 norm is at most
    `max_norm`; returns the norm before clipping (the same on every rank). On one rank this equals
    torch.nn.utils.clip_grad_norm_ over all parameters."""
    assert max_norm > 0, f"max_norm must be positive (got {max_norm})"
    grads = [g for opt in optimizers for g in opt.owned_gradients()]
    device = optimizers[0].param_groups[0]["params"][0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    total_sq = torch.stack(norms).square().sum() if norms else torch.zeros((), device=device)
    if get_dist_info()[3] > 1:
        dist.all_reduce(total_sq)  # each rank holds disjoint shards: the sum is the global norm²
    total_norm = total_sq.sqrt()
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in grads:
        g.mul_(clip_coef.to(g.dtype))
    return total_norm


# -----------------------------------------------------------------------------
# Schedules: pure functions of the step, so a resumed run gets the same values


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """The LR multiplier at `step` of a `num_iterations`-step run: linear warmup over
    warmup_ratio·T steps, then 1.0, then a linear warmdown over the last warmdown_ratio·T steps to
    `final_lr_frac` at step T. base_train and mid_train: warmup 0, warmdown 0.2, final 0; chat_sft
    and chat_rl's "linear to zero" is warmdown_ratio=1."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, ramp_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum at `step`: (1 − f)·0.85 + f·0.95 with f = min(step/300, 1). A lower momentum
    early lets the fast-moving first updates average over fewer steps (modded-nanogpt speedruns)."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


# -----------------------------------------------------------------------------
# Sharding: the communication around the update rules


class _Shard:
    """One unit of communication. On this rank it may hold a piece of the weights to update:
    `param` (a view into the model's parameter, or the parameter itself), its averaged `grad`,
    and `key`, the parameter whose optimiser state this is (None where this rank owns nothing)."""

    def __init__(self, group: dict, key: torch.Tensor | None, param: torch.Tensor | None,
                 grad: torch.Tensor | None, reduce_work=None,
                 all_gather: Callable[[], Callable[[], None]] | None = None):
        self.group, self.key, self.param, self.grad = group, key, param, grad
        self._reduce_work = reduce_work
        self._all_gather = all_gather

    def wait(self) -> None:
        """Block until this shard's gradient is averaged."""
        if self._reduce_work is not None:
            self._reduce_work.wait()
            self._reduce_work = None

    def all_gather(self) -> Callable[[], None]:
        """Launch the all-gather of the updated weights; returns the function that completes it."""
        return self._all_gather() if self._all_gather is not None else (lambda: None)


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        raise RuntimeError(f"a parameter of shape {tuple(p.shape)} has no gradient: with several ranks every "
                           "parameter must take part in the loss (and backward() must run before step())")
    return p.grad


def _shard_rows(group: dict, p: torch.Tensor, rank: int, world_size: int) -> _Shard:
    """ZeRO-2 for one parameter: this rank averages, updates and all-gathers rows [lo, hi)."""
    n, rest = p.size(0), p.shape[1:]
    chunk = -(-n // world_size)  # ceil
    lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
    padding = chunk * world_size - n
    grad = _grad_of(p)
    if padding:
        grad = torch.cat([grad, grad.new_zeros(padding, *rest)])  # (chunk·W, ...)
    grad_chunk = grad.new_empty(chunk, *rest)  # (chunk, ...) the average of every rank's rows [lo, hi)
    work = _reduce_scatter_single(grad_chunk, grad, op=dist.ReduceOp.AVG, async_op=True)

    def all_gather() -> Callable[[], None]:
        if not padding:  # in place: each rank's input is its own slice of the output
            return _all_gather_single(p, p[lo:hi], async_op=True).wait
        mine = torch.cat([p[lo:hi], p.new_zeros(chunk - (hi - lo), *rest)])  # (chunk, ...)
        full = p.new_empty(chunk * world_size, *rest)
        work = _all_gather_single(full, mine, async_op=True)

        def finish():
            work.wait()
            p.copy_(full[:n])
        return finish

    return _Shard(group, p, p[lo:hi], grad_chunk[:hi - lo], work, all_gather)


def _shard_matrices(group: dict, zero: torch.Tensor, rank: int, world_size: int) -> list[_Shard]:
    """Whole matrices, params[i] owned by rank i % W, for one group of same-shape matrices.
    `zero` is a zero matrix of that shape (padding for the last list; never written)."""
    params, shards = group["params"], []
    for base in range(0, len(params), world_size):
        members = params[base:base + world_size]
        owner = base + rank
        mine = params[owner] if owner < len(params) else None
        inputs = [_grad_of(p) for p in members] + [zero] * (world_size - len(members))
        output = mine.grad if mine is not None else torch.empty_like(zero)  # averaged in place
        work = dist.reduce_scatter(output, inputs, op=dist.ReduceOp.AVG, async_op=True)

        def all_gather(members=members, mine=mine) -> Callable[[], None]:
            outputs = list(members) + [torch.empty_like(zero) for _ in range(world_size - len(members))]
            return dist.all_gather(outputs, mine if mine is not None else zero, async_op=True).wait

        shards.append(_Shard(group, mine, mine, output if mine is not None else None, work, all_gather))
    return shards


class ShardedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set `shard_by` ("rows" or "matrices") and write `update()`, the rule
    applied in place to one shard; this class does the communication around it."""

    shard_by = "rows"

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        _, self.rank, _, self.world_size = get_dist_info()
        self._shards: list[_Shard] | None = None  # this step's shards, once reduce_gradients ran
        self._zeros: dict[tuple, torch.Tensor] = {}  # padding matrices for "matrices", by shape

    def update(self, group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Start averaging gradients across ranks (asynchronously); a no-op on one rank and when
        already done this step."""
        if self._shards is not None:
            return
        if self.world_size == 1:
            self._shards = [_Shard(group, p, p, p.grad) for group in self.param_groups
                            for p in group["params"] if p.grad is not None]
        elif self.shard_by == "rows":
            self._shards = [_shard_rows(group, p, self.rank, self.world_size)
                            for group in self.param_groups for p in group["params"]]
        else:
            self._shards = []
            for group in self.param_groups:
                p0 = group["params"][0]
                key = (tuple(p0.shape), p0.dtype, p0.device)
                if key not in self._zeros:
                    self._zeros[key] = torch.zeros_like(p0)
                self._shards += _shard_matrices(group, self._zeros[key], self.rank, self.world_size)

    def owned_gradients(self) -> list[torch.Tensor]:
        """The averaged gradients of the shards this rank updates (waits for the reduction)."""
        self.reduce_gradients()
        for shard in self._shards:
            shard.wait()
        return [shard.grad for shard in self._shards if shard.grad is not None]

    @torch.no_grad()
    def step(self) -> None:
        self.reduce_gradients()
        finishers = []
        for shard in self._shards:  # update each shard as soon as its gradient has arrived
            shard.wait()
            if shard.key is not None:
                self.update(shard.group, shard.param, shard.grad, self.state[shard.key])
            finishers.append(shard.all_gather())
        for finish in finishers:
            finish()
        self._shards = None


# -----------------------------------------------------------------------------
# The update rules


class AdamW(ShardedOptimizer):
    """Defaults as torch.optim.AdamW; nanochat passes betas (0.8, 0.95), eps 1e-10, weight decay 0."""

    shard_by = "rows"  # ZeRO-2: every rank owns a slice of rows of every parameter

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                assert p.ndim >= 1, "AdamW shards along dim 0: 0-d parameters are not supported"

    def update(self, group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        """One AdamW step, in place, on `param` (a parameter or this rank's rows of one)."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)  # first moment
            state["exp_avg_sq"] = torch.zeros_like(param)  # second moment
        state["step"] += 1
        lr, (beta1, beta2), eps, wd, t = group["lr"], group["betas"], group["eps"], group["weight_decay"], state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if wd != 0:
            param.mul_(1 - lr * wd)  # decoupled weight decay
        exp_avg.lerp_(grad, 1 - beta1)  # m = β1·m + (1 − β1)·g
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = β2·v + (1 − β2)·g²
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)  # √v̂ + eps (one temporary)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)  # p -= lr · m̂ / (√v̂ + eps)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise G (rows, cols): the quintic iteration X <- a·X + b·(X·Xᵀ)·X +
    c·(X·Xᵀ)²·X drives every singular value of the Frobenius-normalised G towards ~1 (to within the
    band ~0.7-1.2 the coefficients trade for speed). Computed in `dtype` (the caller picks: bf16 on CUDA)."""
    assert G.ndim == 2, f"Newton-Schulz needs a matrix (got shape {tuple(G.shape)})"
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    transposed = G.size(0) > G.size(1)
    if transposed:  # work with the wide orientation: X·Xᵀ is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm() + 1e-7)  # Frobenius norm >= spectral norm, so singular values are now <= 1
    for _ in range(steps):
        A = X @ X.mT  # (r, r)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A·A
        X = torch.addmm(X, B, X, beta=a)  # a·X + B·X
    if transposed:
        X = X.mT
    return X


# Compiled lazily, on the first call: one small graph per matrix shape.
zeropower_compiled = torch.compile(zeropower_via_newtonschulz5, dynamic=False)


class Muon(ShardedOptimizer):
    """SGD with Nesterov momentum whose update is orthogonalised; for 2-D parameters only."""

    shard_by = "matrices"  # the orthogonalisation needs whole matrices: each has one owner rank

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        for p in params:
            assert p.ndim == 2, f"Muon is for matrices; got a parameter of shape {tuple(p.shape)} (use AdamW)"
        shapes = sorted({tuple(p.shape) for p in params})  # a deterministic order, the same on every rank
        groups = [dict(params=[p for p in params if tuple(p.shape) == shape]) for shape in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    def update(self, group: dict, param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        """One Muon step, in place, on a whole matrix (consumes `grad`: it is overwritten)."""
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - momentum)  # buf = μ·buf + (1 − μ)·g
        update = grad.lerp_(buf, momentum) if group["nesterov"] else buf  # Nesterov: look one step ahead
        # as the reference: bf16 and compiled on CUDA; fp32 and eager elsewhere (no compiler needed)
        on_cuda = update.device.type == "cuda"
        newton_schulz = zeropower_compiled if on_cuda else zeropower_via_newtonschulz5
        update = newton_schulz(update, steps=group["ns_steps"], dtype=torch.bfloat16 if on_cuda else torch.float32)
        # an orthogonalised (rows, cols) update has RMS 1/sqrt(max(rows, cols)); scaling tall ones by
        # sqrt(rows/cols) makes that 1/sqrt(cols) for them, so c_fc (4C, C) is not under-updated
        scale = max(1.0, param.size(0) / param.size(1)) ** 0.5
        param.add_(update, alpha=-group["lr"] * scale)
