"""
Tests for nanochat/optim.py on one process (the
2-rank equivalence is tests/test_distributed.py).

- AdamW equals torch.optim.AdamW step for step (two groups, weight decay on and off, changing lr).
- Newton-Schulz: the fused (addmm) iteration equals the textbook one; singular values of the
  output lie in the quintic's band around 1; the output is close to U·Vᵀ of the SVD.
- Muon equals a hand-written reference (Nesterov momentum, orthogonalised update, aspect-ratio
  scale) over several steps with a changing momentum.
- Gradient accumulation (micro_step): one micro-batch of 4 rows equals 2 micro-batches of 2 (loss
  / 2 each) for one full update with both optimisers and clipping, and the step's train loss is
  the whole batch's mean loss.
- clip_grad_norm equals torch.nn.utils.clip_grad_norm_ (clipping and not clipping).
- state_dict / load_state_dict: a run interrupted and resumed equals the uninterrupted run.
- bench/train.py runs end to end on a tiny config.
"""

import contextlib
import copy
import re

import pytest
import torch

from nanochat import optim
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import AdamW, Muon, clip_grad_norm, zeropower_via_newtonschulz5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads (and lose a lot on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=16, vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# -----------------------------------------------------------------------------
# AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, None])  # torch's per-tensor loop, and its default
def test_adamw_matches_torch_step_for_step(weight_decay, foreach):
    torch.manual_seed(0)
    shapes = [(13, 5), (7,), (4, 3, 2)]
    ours_params = [torch.randn(s, requires_grad=True) for s in shapes]
    torch_params = [p.detach().clone().requires_grad_(True) for p in ours_params]

    def groups(params):
        return [dict(params=params[:2], lr=0.01), dict(params=params[2:], lr=0.3, betas=(0.9, 0.999))]

    ours = AdamW(groups(ours_params), betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    ref = torch.optim.AdamW(groups(torch_params), betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay,
                            foreach=foreach)
    for step in range(6):
        for a, b in zip(ours_params, torch_params):
            g = torch.randn_like(a) * (step + 1)
            a.grad, b.grad = g.clone(), g.clone()
        for opt in (ours, ref):
            for group in opt.param_groups:
                group["lr"] *= 0.7  # a schedule, applied between steps
        ours.step()
        ref.step()
        for a, b in zip(ours_params, torch_params):
            if foreach is False:  # same operations in the same order: bit for bit
                assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"
            else:
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours_params[0], torch_params[0].detach() * 0)  # it moved


def test_adamw_rejects_scalars():
    with pytest.raises(AssertionError, match="0-d"):
        AdamW([torch.zeros((), requires_grad=True)])


# -----------------------------------------------------------------------------
# Muon


def newton_schulz_textbook(G, steps=5):
    """The iteration written plainly: X <- a·X + b·(X Xᵀ) X + c·(X Xᵀ)² X, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    if G.size(0) > G.size(1):
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.size(0) > G.size(1) else X


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (96, 256)])
def test_newton_schulz_orthogonalises(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == torch.float32  # fp32 on the CPU
    assert torch.allclose(X, newton_schulz_textbook(G), atol=1e-5)
    sv = torch.linalg.svdvals(X)
    # The quintic's coefficients trade exactness for speed: singular values land in ~[0.7, 1.2].
    # Only a square Gaussian matrix's very smallest singular values (near 0) may still be on the way.
    bulk = sv[: min(shape) - 2] if shape[0] == shape[1] else sv
    assert bulk.min() > 0.6 and sv.max() < 1.25, f"singular values {sv.min():.3f}..{sv.max():.3f}"
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    exact = U @ Vh  # the orthogonal polar factor Muon approximates
    cosine = (X * exact).sum() / (X.norm() * exact.norm())
    assert cosine > 0.97


def test_newton_schulz_low_rank_input_stays_in_its_span():
    torch.manual_seed(0)
    G = torch.randn(64, 4) @ torch.randn(4, 96)  # rank 4
    sv = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
    assert (sv[:4] > 0.6).all() and (sv[4:] < 1e-3).all()


def muon_reference(params, grads_per_step, lrs, momenta):
    """Muon written out by hand: buf = μ·buf + (1−μ)·g; u = (1−μ)·g + μ·buf (Nesterov);
    p -= lr · sqrt(max(1, rows/cols)) · NS(u)."""
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads, lr, mu in zip(grads_per_step, lrs, momenta):
        for i, (p, g) in enumerate(zip(params, grads)):
            bufs[i] = mu * bufs[i] + (1 - mu) * g
            u = (1 - mu) * g + mu * bufs[i]
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            params[i] = p - lr * scale * newton_schulz_textbook(u)
    return params


def test_muon_matches_reference_with_aspect_ratio_scaling():
    torch.manual_seed(0)
    shapes = [(32, 8), (8, 32), (16, 16), (32, 8)]  # tall (scale 2), wide (1), square, tall again
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    lrs, momenta = [0.02, 0.02, 0.01, 0.005], [0.85, 0.88, 0.9, 0.95]
    opt = Muon(params, lr=0.02, momentum=0.95)
    assert [tuple(g["params"][0].shape) for g in opt.param_groups] == [(8, 32), (16, 16), (32, 8)]  # by shape
    for step in range(4):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lrs[step], momenta[step]
        opt.step()
    expected = muon_reference(start, grads, lrs, momenta)
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, atol=1e-5)


def test_muon_first_step_size():
    """With zero momentum the step is lr·scale·NS(g): RMS 1/sqrt(cols) for tall, 1/sqrt(cols) for wide."""
    torch.manual_seed(0)
    tall = torch.zeros(128, 32, requires_grad=True)
    wide = torch.zeros(32, 128, requires_grad=True)
    opt = Muon([tall, wide], lr=1.0, momentum=0.0)
    tall.grad, wide.grad = torch.randn(128, 32), torch.randn(32, 128)
    opt.step()
    rms = lambda t: t.detach().pow(2).mean().sqrt().item()
    # NS singular values average ~0.9 rather than exactly 1: compare relative to sqrt(32)
    assert 0.7 < rms(tall) * 32 ** 0.5 < 1.2  # 1/sqrt(128) · sqrt(128/32)
    assert 0.7 < rms(wide) * 128 ** 0.5 < 1.2  # 1/sqrt(128), no scaling for wide


def test_muon_rejects_non_matrices():
    with pytest.raises(AssertionError, match="matrices"):
        Muon([torch.zeros(5, requires_grad=True)])


# -----------------------------------------------------------------------------
# The training step: accumulation, clipping, state


def train_step(model, optimizers, batches, max_norm=None, losses=None):
    """One optimiser step over micro-batches, the way every training script does it; the step's
    train loss (the sum of what micro_step returns) is appended to `losses`."""
    train_loss = 0.0
    for x, y in batches:
        train_loss += optim.micro_step(model, x, y, len(batches), contextlib.nullcontext)
    if losses is not None:
        losses.append(train_loss.item())
    return optim.step(optimizers, 1.0, grad_clip=max_norm or 0.0)


def test_grad_accumulation_4x1_equals_2x2():
    torch.manual_seed(1)
    x = torch.randint(0, 97, (4, 16))
    y = torch.randint(0, 97, (4, 16))
    one, two = tiny_gpt(), tiny_gpt()
    norms, losses = [], []
    for model, batches in [(one, [(x, y)]), (two, [(x[:2], y[:2]), (x[2:], y[2:])])]:
        optimizers = model.setup_optimizers()
        norms.append(train_step(model, optimizers, batches, max_norm=0.5, losses=losses))
    assert losses[0] == pytest.approx(tiny_gpt()(x, y).item(), rel=1e-6)  # the mean loss of the whole batch
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # micro-batch means, averaged
    assert norms[0].item() > 0.5  # clipping was active
    assert norms[0].item() == pytest.approx(norms[1].item(), rel=1e-5)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    # it moved (c_proj: at step 1 the zero-initialised projections block every gradient before them)
    assert not torch.equal(one.transformer.h[0].attn.c_proj.weight, tiny_gpt().transformer.h[0].attn.c_proj.weight)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clips / leaves alone
def test_clip_grad_norm_matches_torch(max_norm):
    model = tiny_gpt()
    x = torch.randint(0, 97, (2, 16))
    model(x, x).backward()
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    norm = clip_grad_norm(model.setup_optimizers(), max_norm)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-9), name
    if max_norm < 1:
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert total.item() == pytest.approx(max_norm, rel=1e-4)


def test_optimizer_state_dict_resumes_exactly():
    torch.manual_seed(2)
    data = [(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))) for _ in range(4)]
    straight = tiny_gpt()
    opts = straight.setup_optimizers()
    for batch in data:
        train_step(straight, opts, [batch], max_norm=1.0)

    first = tiny_gpt()
    opts = first.setup_optimizers()
    for batch in data[:2]:
        train_step(first, opts, [batch], max_norm=1.0)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opts = [copy.deepcopy(o.state_dict()) for o in opts]
    resumed = tiny_gpt(seed=123)  # different weights, overwritten by the checkpoint
    resumed.load_state_dict(saved_model)
    opts = resumed.setup_optimizers()
    for opt, state in zip(opts, saved_opts):
        opt.load_state_dict(state)
    assert opts[1].state[resumed.transformer.h[0].attn.c_q.weight]["momentum_buffer"].abs().sum() > 0
    for batch in data[2:]:
        train_step(resumed, opts, [batch], max_norm=1.0)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_bench_train_runs_and_reports():
    """bench/train.py end to end on a tiny config (a real subprocess; its numbers are not checked)."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT
    cmd = [sys.executable, "-m", "bench.train", "--device_type=cpu", "--depth=1", "--vocab_size=256",
           "--max_seq_len=32", "--device_batch_size=2", "--grad_accum_steps=2", "--steps=2",
           "--matmul_size=128", "--threads=1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("tokens per step", "tokens/s", "model FLOP/s", "MFU vs measured fp32 matmul"):
        assert row in proc.stdout
    assert "128 tokens" in proc.stdout  # 2 micro-batches x 2 rows x 32 tokens


# -----------------------------------------------------------------------------
# One step for every stage


STAGES = {"base_train": 1.0, "mid_train": 0.0, "chat_sft": 0.0, "chat_rl": 0.0}  # the reference's grad_clip


def stage_default(path, flag: str):
    """The value of `flag` in the script's `DEFAULTS = dict(...)`, read with ast (importing a script
    would run it)."""
    import ast
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DEFAULTS":
            return next(ast.literal_eval(k.value) for k in node.value.keywords if k.arg == flag)
    raise AssertionError(f"{path} has no DEFAULTS")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_takes_the_one_step_and_clips_by_flag(stage):
    """Every training script updates through nanochat.optim.step with its --grad_clip flag, and
    writes no update logic of its own (no reduce, clip, lr/momentum assignment or opt.step()); the
    next-token stages accumulate through optim.micro_step."""
    from conftest import REPO_ROOT
    path = REPO_ROOT / "scripts" / f"{stage}.py"
    source = path.read_text()
    calls = [line.strip() for line in source.splitlines() if "optim.step(" in line]
    assert len(calls) == 1 and calls[0].startswith(("optim.step(optimizers", "grad_norm = optim.step(optimizers"))
    assert "grad_clip=cfg.grad_clip" in calls[0]
    assert re.search(r"^from nanochat import (\w+, )*optim(, \w+)*$", source, re.M)
    for own_logic in ("reduce_gradients", "clip_grad_norm", 'group["lr"]', 'group["momentum"]', "opt.step()",
                      "zero_grad"):
        assert own_logic not in source, f"{stage} does {own_logic} itself"
    assert stage_default(path, "grad_clip") == STAGES[stage]
    ramps = "momentum=optim.muon_momentum(step)" in calls[0]
    assert ramps == (stage in ("base_train", "mid_train"))  # as the reference: SFT and RL keep 0.95
    # the next-token stages take their micro-batches through optim.micro_step (RL's loss is its own)
    next_token = stage != "chat_rl"
    assert ("optim.micro_step(model, x, y, grad_accum_steps, compute.autocast)" in source) == next_token
    assert (".backward()" not in source) == next_token


def test_step_sets_schedules_clips_and_drops_gradients():
    torch.manual_seed(3)
    x = torch.randint(0, 97, (2, 16))
    model, reference = tiny_gpt(), tiny_gpt()
    optimizers = model.setup_optimizers()
    model(x, x).backward()
    reference(x, x).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    norm = optim.step(optimizers, 0.5, momentum=0.9, grad_clip=0.1)
    assert norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
    adamw, muon = optimizers
    assert all(g["lr"] == 0.5 * g["initial_lr"] for opt in optimizers for g in opt.param_groups)
    assert all(g["momentum"] == 0.9 for g in muon.param_groups)
    assert all(p.grad is None for p in model.parameters())
    model(x, x).backward()
    assert optim.step(optimizers, 1.0) is None  # no clipping: no norm, momentum left as it was
    assert all(g["momentum"] == 0.9 for g in muon.param_groups)
