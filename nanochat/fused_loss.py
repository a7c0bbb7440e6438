"""
The model's last step, lm_head -> softcap -> cross-entropy, fused for eager PyTorch.

    losses = softcap_cross_entropy(x, weight, targets, softcap=15.0)   # (N,), 0 where targets == -1

computes exactly what gpt.py's plain path computes,

    logits = softcap * tanh((x @ weight.T) / softcap)
    losses = F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")

but faster and in less memory when nothing fuses it for us (the CPU and MPS, where base_train does
not compile; under torch.compile or autocast gpt.py takes the plain path).

Why: the logits are huge (1,024 tokens x 65,536 vocab = 268 MB in fp32), and the plain path walks
over them about ten times (divide, tanh, multiply, log_softmax, the NLL's zero-filled gradient, and
the backward of each), each pass a trip through main memory. Here the matmuls stay whole (they are
fast at full size), and every elementwise step runs on a block of `rows` rows (4 MB) while it is in
cache. The backward is written out by hand:

    d loss_i / d logit_ij = softmax_ij - [j == target_i]          (cross-entropy)
    d logit_ij / d z_ij   = 1 - tanh² = 1 - (logit_ij / softcap)²   (softcap, z = x @ weight.T)

Measured in bench/README.md. Tested against the plain path in tests/test_fused_loss.py.
"""

import torch

ROWS_PER_BLOCK = 16  # 16 x 65,536 fp32 = 4 MB: stays in cache between the elementwise steps


class SoftcapCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, rows):
        logits = x @ weight.t()  # (N, V), softcapped in place below
        lse = torch.empty(logits.size(0), dtype=logits.dtype, device=logits.device)
        for i in range(0, logits.size(0), rows):
            block = logits[i:i + rows]
            block.div_(softcap).tanh_().mul_(softcap)
            lse[i:i + rows] = torch.logsumexp(block, dim=-1)
        valid = targets != -1
        safe_targets = targets.clamp(min=0)  # ignored rows point at column 0; their weight is 0
        losses = (lse - logits.gather(1, safe_targets[:, None]).squeeze(1)) * valid
        ctx.save_for_backward(x, weight, logits, lse, safe_targets, valid)
        ctx.softcap, ctx.rows = softcap, rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, logits, lse, safe_targets, valid = ctx.saved_tensors
        softcap, rows = ctx.softcap, ctx.rows
        row_weight = grad_losses * valid  # (N,)
        grad_z = torch.empty_like(logits)
        block_rows = torch.arange(rows, device=logits.device)  # row indices within a block
        for i in range(0, logits.size(0), rows):
            block, grad = logits[i:i + rows], grad_z[i:i + rows]
            torch.sub(block, lse[i:i + rows, None], out=grad).exp_()  # softmax
            grad[block_rows[:grad.size(0)], safe_targets[i:i + rows]] -= 1.0
            grad.mul_(row_weight[i:i + rows, None])
            grad.mul_(torch.mul(block, block).mul_(-1.0 / softcap ** 2).add_(1.0))  # x (1 - tanh²)
        grad_x = grad_z @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_z.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None, None


def softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                          rows: int = ROWS_PER_BLOCK) -> torch.Tensor:
    """x (N, C), weight (V, C), targets (N,) with -1 = ignore -> per-row losses (N,), 0 where ignored."""
    assert x.dim() == 2 and weight.dim() == 2 and targets.shape == (x.size(0),), (
        f"want x (N, C), weight (V, C), targets (N,); "
        f"got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    return SoftcapCrossEntropy.apply(x, weight, targets, softcap, rows)
