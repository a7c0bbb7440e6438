"""
Muon: MomentUm Orthogonalized by Newton-Schulz, for the 2-D matrices inside the Transformer
blocks. Source: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024,
kellerjordan.github.io/posts/muon, and the modded-nanogpt speedrun repository it came from).

Each step: Nesterov momentum on the gradient, then replace the update G by the nearest
semi-orthogonal matrix (U·Vᵀ of G's SVD U·S·Vᵀ: every singular value set to 1), computed
approximately by 5 quintic Newton-Schulz iterations, and scale by sqrt(max(1, rows/cols)).
The iteration's coefficients (3.4445, -4.7750, 2.0315) were tuned to push singular values into
roughly [0.7, 1.2] as fast as possible rather than to converge exactly: that is enough for
training and cheap enough to run in bf16 (on CUDA; fp32 elsewhere).

    opt = Muon(model.transformer.h.parameters(), lr=0.02, momentum=0.95)
    opt.step()

Parameters are grouped by shape (groups ordered by shape, the same on every rank); with several
ranks each matrix has one owner that orthogonalises it (nanochat/dist_optim.py has the
communication and the training-step API: reduce_gradients, clip_grad_norm, step).
"""

from __future__ import annotations

import torch

from nanochat.dist_optim import ShardedOptimizer


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
