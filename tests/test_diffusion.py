"""
Masked diffusion (nanochat/diffusion.py): the vectorised loss against a per-position loop, the
bound's closed form, BOS, the <|mask|> id, objective refusal, and base_train --objective=mdlm end to
end (exact resume, base_loss's bound). 2 ranks = 1 rank is in tests/test_distributed.py.
"""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import copy_checkpoint
from nanochat.checkpoint_manager import load_model
from nanochat.diffusion import (EPS, DiffusionEngine, add_mask_token, diffusion_loss, draw_noise, evaluate_bpb_bound,
                                mask_tokens, unmask_generate)
from nanochat.gpt import GPT, GPTConfig
from test_base_train import TINY, assert_identical, pretrain_dir, run, step_lines  # noqa: F401 (fixture)

V, MASK, BOS = 40, 39, 0  # a tiny vocabulary whose last id is <|mask|>


def tiny_model(seed=0, causal=False, vocab_size=V):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=12, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)  # not the near-uniform init: logits that differ
    model.causal = causal
    return model


def rows(B=3, T=12, seed=1):
    x = torch.randint(1, MASK, (B, T), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = BOS
    x[1, 5] = BOS  # a document starting mid-row
    return x


def reference_loss(model, x, t, u):
    """One position at a time: mask by the rule, then -log softmax over the real tokens, over t."""
    B, T = x.shape
    z = x.clone()
    for b in range(B):
        for i in range(T):
            if x[b, i] != BOS and u[b, i] < t[b]:
                z[b, i] = MASK
    logits = model(z)
    total = 0.0
    for b in range(B):
        for i in range(T):
            if z[b, i] == MASK:
                total += -F.log_softmax(logits[b, i, :MASK], dim=-1)[x[b, i]] / t[b]
    return total / x.numel()


def test_vectorised_loss_matches_a_per_position_loop():
    model, x = tiny_model(), rows()
    t, u = draw_noise(3, 12, seed=5, device="cpu")
    with torch.no_grad():
        fast, slow = diffusion_loss(model, x, t, u, MASK, BOS), reference_loss(model, x, t, u)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    assert fast.item() > 0


def test_noise_is_seeded_and_in_range():
    t, u = draw_noise(64, 12, seed=3, device="cpu")
    t2, u2 = draw_noise(64, 12, seed=3, device="cpu")
    assert torch.equal(t, t2) and torch.equal(u, u2)
    assert not torch.equal(t, draw_noise(64, 12, seed=4, device="cpu")[0])
    assert t.min() >= EPS and t.max() < 1 and u.min() >= 0 and u.max() < 1


def test_masking_never_touches_bos():
    x = rows(B=8, T=12)
    z, masked = mask_tokens(x, torch.ones(8), torch.zeros(8, 12), MASK, BOS)  # t = 1: mask everything
    assert torch.equal(z == MASK, x != BOS) and torch.equal(masked, x != BOS)
    t, u = draw_noise(8, 12, seed=0, device="cpu")
    z, masked = mask_tokens(x, t, u, MASK, BOS)
    assert torch.equal(z[x == BOS], x[x == BOS]) and masked.any()
    assert torch.equal(masked, (u < t[:, None]) & (x != BOS))


def test_bound_at_t_one_with_uniform_logits_is_the_closed_form():
    # lm_head = 0: every logit is 0, uniform over the V-1 real tokens; at t = 1 every token but BOS
    # is masked with weight 1, so the bound is (number of such tokens) · ln(V-1) / (ln 2 · bytes)
    model = tiny_model()
    torch.nn.init.zeros_(model.lm_head.weight)
    token_bytes = torch.randint(1, 5, (V,), generator=torch.Generator().manual_seed(0))
    token_bytes[BOS] = 0
    batches = [(rows(seed=s),) for s in range(3)]
    bound = evaluate_bpb_bound(model, batches, 3, token_bytes, MASK, BOS, t_samples=2, t=1.0)
    x = torch.cat([b[0] for b in batches])
    expected = (x != BOS).sum().item() * math.log(V - 1) / (math.log(2) * token_bytes[x].sum().item())
    assert bound == pytest.approx(expected, rel=1e-5)


def test_bound_is_repeatable_and_sees_every_t():
    model, batches = tiny_model(), [(rows(seed=s),) for s in range(2)]
    token_bytes = torch.ones(V, dtype=torch.int64)
    token_bytes[BOS] = 0
    a = evaluate_bpb_bound(model, batches, 2, token_bytes, MASK, BOS, t_samples=4, seed=7)
    b = evaluate_bpb_bound(model, batches, 2, token_bytes, MASK, BOS, t_samples=4, seed=7)
    c = evaluate_bpb_bound(model, batches, 2, token_bytes, MASK, BOS, t_samples=4, seed=8)
    assert a == b and a != c and 0 < a < 50


def test_mask_token_keeps_every_id(tiny_tokenizer):
    masked = add_mask_token(tiny_tokenizer)
    n = tiny_tokenizer.get_vocab_size()
    assert masked.get_vocab_size() == n + 1 and masked.encode_special("<|mask|>") == n
    assert add_mask_token(masked) is masked
    for name in tiny_tokenizer.get_special_tokens():
        assert masked.encode_special(name) == tiny_tokenizer.encode_special(name)
    text = "To be, or not to be: that is the question."
    assert masked.encode(text) == tiny_tokenizer.encode(text)
    assert masked.decode([n]) == "<|mask|>"


# -----------------------------------------------------------------------------
# The sampler


PROMPT = [BOS, 5, 9, 17]


@pytest.mark.parametrize("kwargs", [dict(), dict(steps=3), dict(block_len=4, steps=4), dict(order="random"),
                                    dict(temperature=1.0, top_k=5), dict(temperature=0.8, block_len=3)])
def test_sampler_leaves_no_mask_and_keeps_the_prompt(kwargs):
    model = tiny_model()
    out = unmask_generate(model, PROMPT, 10, MASK, num_samples=3, seed=1, **kwargs)
    assert len(out) == 3 and all(len(row) == len(PROMPT) + 10 for row in out)
    assert all(row[:len(PROMPT)] == PROMPT and MASK not in row for row in out)
    assert out == unmask_generate(model, PROMPT, 10, MASK, num_samples=3, seed=1, **kwargs)  # seeded


def test_sampler_at_temperature_zero_is_deterministic():
    model = tiny_model()
    runs = [unmask_generate(model, PROMPT, 8, MASK, steps=4, num_samples=2, seed=s) for s in (0, 1, 2)]
    assert runs[0] == runs[1] == runs[2] and runs[0][0] == runs[0][1]  # the seed plays no part
    sampled = {tuple(unmask_generate(model, PROMPT, 8, MASK, steps=4, temperature=1.0, seed=s)[0]) for s in range(4)}
    assert len(sampled) > 1  # while at temperature 1 it does


def test_blocks_of_one_are_greedy_left_to_right():
    # block_len=1 and one step per token: the obvious loop, one full forward pass per position
    model = tiny_model(seed=3)
    x = PROMPT + [MASK] * 6
    for i in range(len(PROMPT), len(x)):
        with torch.no_grad():
            logits = model(torch.tensor([x]))[0, i, :MASK]
        x[i] = int(logits.argmax())
    assert unmask_generate(model, PROMPT, 6, MASK, steps=6, block_len=1) == [x]


def test_confidence_order_commits_the_surest_position_first():
    model = tiny_model(seed=4)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPT + [MASK] * 5]))[0, len(PROMPT):, :MASK], dim=-1)
    best, surest = probs.max(dim=-1)
    first = int(best.argmax())  # the position unmasked by the first of 5 steps
    out = unmask_generate(model, PROMPT, 5, MASK, steps=5)[0]
    assert out[len(PROMPT) + first] == int(surest[first])


def test_diffusion_engine_streams_whole_replies(tiny_tokenizer):
    tokenizer = add_mask_token(tiny_tokenizer)
    model = tiny_model(vocab_size=tokenizer.get_vocab_size())
    engine = DiffusionEngine(model, tokenizer, steps=4)
    prompt = tokenizer.encode("To be", prepend=tokenizer.get_bos_token_id())
    columns = list(engine.generate(prompt, num_samples=2, max_tokens=6, temperature=0))
    assert len(columns) == 6 and all(len(c) == 2 and mask == [1, 1] for c, mask in columns)
    rows = unmask_generate(model, prompt, 6, tokenizer.encode_special("<|mask|>"), steps=4, num_samples=2)
    assert [list(c) for c in zip(*[c for c, _ in columns])] == [row[len(prompt):] for row in rows]
    sequences, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=6, temperature=0)
    assert sequences[0][:len(prompt)] == prompt and tokenizer.encode_special("<|mask|>") not in sequences[0]


@pytest.mark.slow
def test_mdlm_trains_resumes_exactly_and_loaders_check_the_objective(pretrain_dir):
    flags = [*TINY, "--objective=mdlm", "--num_iterations=6", "--eval_every=3", "--warmdown_ratio=0.5"]
    straight = run("scripts.base_train", *flags, "--save_every=3", "--model_tag=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert re.search(r"step 00006 \| val bpb bound [\d.]+", straight.stdout)
    assert "min val bpb bound" in straight.stdout
    root = pretrain_dir / "base_checkpoints"
    meta = json.loads((root / "straight" / "meta_000006.json").read_text())
    assert meta["objective"] == "mdlm" and meta["model_config"]["vocab_size"] == 513  # 512 + <|mask|>

    copy_checkpoint(root / "straight", root / "resumed", 3)
    resumed = run("scripts.base_train", *flags, "--model_tag=resumed", "--resume_from_step=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model_000006.pt", "optim_000006_rank0.pt"):  # the same masks after the resume
        assert_identical(torch.load(root / "straight" / name), torch.load(root / "resumed" / name))
    la, lb = step_lines(straight.stdout), step_lines(resumed.stdout)
    assert sorted(lb) == [4, 5, 6] and all(la[s] == lb[s] for s in (4, 5, 6))
    assert json.loads((root / "resumed" / "meta_000006.json").read_text())["val_bpb"] == meta["val_bpb"]

    # the wrong objective: one line, no traceback
    as_ar = run("scripts.base_train", *TINY, "--num_iterations=6", "--model_tag=resumed", "--resume_from_step=3")
    assert as_ar.returncode == 1 and "Traceback" not in as_ar.stderr
    assert "was trained with --objective=mdlm" in as_ar.stderr and "--objective=ar" in as_ar.stderr
    with pytest.raises(SystemExit, match="was trained with --objective=mdlm"):  # what every AR stage calls
        load_model("base", "cpu", phase="eval", model_tag="straight")
    model, tokenizer, _ = load_model("base", "cpu", phase="eval", model_tag="straight", objectives=("ar", "mdlm"))
    assert model.causal is False and tokenizer.get_vocab_size() == 513
    bad = run("scripts.base_train", *TINY, "--objective=gpt", "--num_iterations=1")
    assert bad.returncode != 0 and "--objective must be one of ar, mdlm" in bad.stderr

    loss = run("scripts.base_loss", "--device_type=cpu", "--device_batch_size=2", "--split_tokens=256",
               "--model_tag=straight")
    assert loss.returncode == 0, loss.stderr[-3000:]
    bounds = dict(re.findall(r"(train|val) bpb bound \(ELBO\): ([\d.]+)", loss.stdout))
    assert set(bounds) == {"train", "val"} and all(0 < float(v) < 20 for v in bounds.values())
    assert "The capital of France is" in loss.stdout  # samples by iterative unmasking
    chat = run("scripts.chat_cli", "--device_type=cpu", "-i", "base", "--model_tag=straight", "-p", "Hello",
               "-m", "8", "-t", "0", "--unmask_steps=4", "--block_len=4")
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr[-3000:]
    assert "<|mask|>" not in chat.stdout
    # the report card says bound wherever the figure is one
    report = pretrain_dir / "report"
    assert "- val bpb bound (ELBO): " in (report / "base-model-loss.md").read_text()
    training = (report / "base-model-training.md").read_text()
    assert "- final val bpb bound: " in training and "- final val bpb:" not in training
    history = [json.loads(line) for line in (report / "base_train_history.jsonl").read_text().splitlines()]
    assert any("val_bpb_bound" in row for row in history) and not any("val_bpb" in row for row in history)
