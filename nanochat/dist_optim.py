"""
Data-parallel plumbing shared by the two optimisers (nanochat/adamw.py, nanochat/muon.py):
gradient averaging across ranks, sharded updates (ZeRO-2 style), re-assembly of the weights, and
gradient clipping on the averaged gradient. The update rules live in those two files, once each;
everything about ranks lives here, once.

nanochat has no DDP wrapper: each rank runs forward/backward on its own micro-batches and keeps
its local gradients, and the optimisers synchronise. One training step:

    for micro_step in range(grad_accum_steps):
        (model(x, y) / grad_accum_steps).backward()        # local gradients add up
    for opt in optimizers:
        opt.reduce_gradients()                             # launch the reduce-scatters (async)
    grad_norm = clip_grad_norm(optimizers, max_norm=1.0)   # norm of the averaged gradient
    for opt in optimizers:
        opt.step()                                         # update own shards, all-gather weights
    model.zero_grad(set_to_none=True)

`reduce_gradients()` and `clip_grad_norm()` are optional: `step()` reduces first if nobody did.
Clipping must see the gradient the optimisers will apply: one rank's local gradient is not it (it
averages fewer examples, so its noise and usually its norm are larger, and ranks would disagree),
so `clip_grad_norm` takes the squared norms of the shards each rank owns after averaging,
all-reduces their sum, and scales those shards.

How the work is split over W ranks (this one is `rank`):
- "rows" (AdamW, ZeRO-2): each parameter's gradient is reduce-scattered (averaged) along dim 0
  into W chunks of ceil(rows/W) rows, zero-padded when W does not divide the rows (e.g. a vocab of
  65,537 rows on 8 ranks); a rank updates, and keeps Adam state for, its chunk only; the chunks
  are then all-gathered into the full weight on every rank.
- "matrices" (Muon): an orthogonalised update needs the whole matrix, so within each group of
  same-shape matrices (groups ordered by shape, the same on every rank) matrix i belongs to rank
  i % W. Gradients are reduce-scattered over lists of W matrices (the last list padded with a zero
  matrix), each owner updates its matrices, and the weights are all-gathered.
With W = 1 there is no copy and no collective: a rank's "shard" is the parameter and its .grad.

State: a rank's optimiser state, and its `state_dict()`, cover only its own shards, so every rank
saves its own file and a run resumes with the same world size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# reduce_scatter_tensor / all_gather_into_tensor were renamed in recent torch releases
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def get_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        self.rank, self.world_size = get_world()
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
    if get_world()[1] > 1:
        dist.all_reduce(total_sq)  # each rank holds disjoint shards: the sum is the global norm²
    total_norm = total_sq.sqrt()
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in grads:
        g.mul_(clip_coef.to(g.dtype))
    return total_norm
