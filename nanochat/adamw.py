"""
AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) for the embedding and
the LM head; bias-corrected, weight decay decoupled from the gradient. The update is the one
torch.optim.AdamW applies (tests/test_optim.py checks step for step), written out so that the
same rule runs on a whole parameter (one rank) or on this rank's rows of it (several ranks,
ZeRO-2: see nanochat/dist_optim.py for the communication and the training-step API).

    opt = AdamW([dict(params=[...], lr=...)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    opt.step()
"""

from __future__ import annotations

import math

import torch

from nanochat.dist_optim import ShardedOptimizer


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
