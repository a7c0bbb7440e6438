"""The fused head + softcap + cross-entropy (nanochat/fused_loss.py) against the plain PyTorch path:
the same losses and the same gradients, on its own and inside the GPT."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.fused_loss import softcap_cross_entropy
from test_gpt import tiny_model


def plain(x, weight, targets, softcap):
    logits = softcap * torch.tanh((x @ weight.t()) / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")


def losses_and_grads(fn, x, weight, targets, grad_out):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    losses = fn(x, weight, targets)
    (losses * grad_out).sum().backward()
    return losses.detach(), x.grad, weight.grad


@pytest.mark.parametrize("rows", [1, 7, 16, 64])  # 7 does not divide 50: a short last block
def test_fused_equals_plain_losses_and_gradients(rows):
    gen = torch.Generator().manual_seed(0)
    N, C, V = 50, 24, 300
    x = torch.randn(N, C, generator=gen)
    weight = torch.randn(V, C, generator=gen) * 2  # raw logits up to ~±30: the softcap bends them
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::6] = -1
    grad_out = torch.rand(N, generator=gen)
    want = losses_and_grads(lambda a, b, t: plain(a, b, t, 15.0), x, weight, targets, grad_out)
    got = losses_and_grads(lambda a, b, t: softcap_cross_entropy(a, b, t, 15.0, rows=rows), x, weight, targets,
                           grad_out)
    assert (x @ weight.t()).abs().max() > 15  # the cap is active
    for name, a, b in zip(("losses", "grad x", "grad weight"), want, got):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{name}: max diff {(a - b).abs().max()}"
    assert torch.all(got[0][targets == -1] == 0)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_works():
    x, weight, targets = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4), torch.randint(0, 10, (8,))
    softcap_cross_entropy(x, weight, targets, 15.0).sum().backward()
    assert x.grad is not None and weight.grad is None
    with torch.no_grad():
        assert torch.allclose(softcap_cross_entropy(x, weight, targets, 15.0), plain(x, weight, targets, 15.0),
                              atol=1e-5)


def test_shapes_are_checked():
    with pytest.raises(AssertionError, match="want x"):
        softcap_cross_entropy(torch.randn(8, 4), torch.randn(10, 4), torch.zeros(7, dtype=torch.long), 15.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpt_fused_loss_equals_plain_loss_and_gradients(reduction):
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    y[0, :5] = -1
    results = []
    for fused in (True, False):
        model = tiny_model().train()
        model.fused_loss = fused
        loss = model(x, y, loss_reduction=reduction)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_the_fused_path_is_chosen_in_one_place():
    """gpt.py takes whichever path model.fused_loss says (plain by default); common.use_fused_loss
    decides it: fused only in eager fp32, i.e. off CUDA (bf16 autocast) and uncompiled."""
    from nanochat.common import use_fused_loss
    assert use_fused_loss("cpu") and use_fused_loss("mps")
    assert not use_fused_loss("cuda") and not use_fused_loss("cpu", compiled=True)
    assert tiny_model().fused_loss is False


def test_gpt_mean_over_only_ignored_targets_is_nan_like_torch():
    model = tiny_model()
    model.fused_loss = True
    x, y = torch.randint(0, 256, (1, 8)), torch.full((1, 8), -1)
    assert torch.isnan(model(x, y))
    model.fused_loss = False
    assert torch.isnan(model(x, y))
