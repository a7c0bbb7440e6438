"""
Tests for nanochat/gpt.py, on tiny models (2 layers, 64 wide) on the CPU.

- Sizes: the reference nanochat's parameter counts (d20, d32 at vocab 65,536), computed on the meta device
  without allocating; GPTConfig.from_depth; estimate_flops against its formula.
- init_weights sets every parameter and buffer (after filling them with NaN), with the reference's
  statistics; rotary tables are not saved in the state dict but recomputed.
- Forward: logits bounded by the soft cap and computed in fp32; the loss honours ignore_index=-1
  for every reduction; causality; GQA equals full attention with repeated key/value heads.
- The KV-cache protocol (with a minimal list-based cache written here): prefill + single-token
  decode + a chunk after a prefix give the same logits as one full forward, for MHA, GQA and MQA.
- Naive generate: temperature 0 is the argmax of a full forward each step; seeded sampling repeats.
- gpt.py has no device or rank code.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from nanochat.gpt import GPT, GPTConfig, apply_rotary_emb, precompute_rotary

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
    waiting for each other made them ~40x slower (0.5 s instead of 12 ms per forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(sequence_len=64, vocab_size=256, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)


def tiny_model(seed: int = 0, randomize_proj: bool = True, **overrides) -> GPT:
    """A tiny GPT built the production way (meta -> to_empty -> init_weights). With randomize_proj
    the zero-initialised output projections get random weights, so attention and MLP actually
    contribute to the output (a zero c_proj would make every attention test pass trivially)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**TINY, **overrides}))
    model.to_empty(device="cpu")
    model.init_weights()
    if randomize_proj:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(0, 0.1)
                block.mlp.c_proj.weight.normal_(0, 0.1)
            model.lm_head.weight.normal_(0, 0.1)
    return model.eval()


# -----------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("depth, expected", [(20, 560_988_160), (32, 1_879_048_192)])
def test_param_counts_on_meta_device(depth, expected):
    config = GPTConfig.from_depth(depth, vocab_size=65536)
    with torch.device("meta"):
        model = GPT(config)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    assert model.num_params() == expected


def test_from_depth_derives_sizes():
    c = GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.sequence_len) == (20, 1280, 10, 10, 2048)
    assert GPTConfig() == c  # the dataclass defaults are d20
    c = GPTConfig.from_depth(6, vocab_size=1000, sequence_len=512)
    assert (c.n_embd, c.n_head, c.vocab_size) == (384, 3, 1000)
    assert GPTConfig.from_depth(1).n_head == 1  # ceil(64 / 128)


def test_estimate_flops_formula():
    config = GPTConfig.from_depth(20, vocab_size=65536)
    with torch.device("meta"):
        model = GPT(config)
    n_matmul = 560_988_160 - 65536 * 1280  # the embedding lookup is not a matmul
    assert model.estimate_flops() == 6 * n_matmul + 12 * 20 * 10 * 128 * 2048
    small = tiny_model()
    n_matmul = small.num_params() - TINY["vocab_size"] * TINY["n_embd"]
    assert small.estimate_flops() == 6 * n_matmul + 12 * 2 * 4 * 16 * 64


# -----------------------------------------------------------------------------
# Initialisation


def test_init_weights_sets_every_parameter_and_buffer():
    config = GPTConfig(sequence_len=64, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=1, n_embd=128)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    with torch.no_grad():  # make the garbage explicit: anything init_weights misses stays NaN
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(t).all(), f"{name} was not initialised"

    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert abs(wte.mean().item()) < 0.01 and abs(wte.std().item() - 1.0) < 0.01  # normal(0, 1)
    assert abs(head.std().item() - 0.001) < 1e-5  # normal(0, 0.001)
    bound = math.sqrt(3) / math.sqrt(config.n_embd)
    for block in model.transformer.h:
        for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.c_fc.weight):
            assert w.abs().max().item() <= bound  # uniform in ±√3/√n_embd ...
            assert w.abs().max().item() > 0.95 * bound
            assert abs(w.std().item() * math.sqrt(config.n_embd) - 1.0) < 0.06  # ... so std 1/√n_embd
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
    cos, sin = precompute_rotary(10 * 64, 64)
    assert torch.equal(model.cos, cos) and torch.equal(model.sin, sin)
    assert model.cos.shape == (1, 640, 1, 32)  # 10x the sequence length


def test_rotary_tables_are_not_in_the_state_dict():
    model = tiny_model()
    assert not any("cos" in k or "sin" in k for k in model.state_dict())
    x = torch.randint(0, 256, (1, 16))
    with torch.device("meta"):
        fresh = GPT(model.config)
    fresh.to_empty(device="cpu")
    fresh.init_weights()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh.eval()(x), model(x))


def test_rotary_depends_only_on_relative_position():
    cos, sin = precompute_rotary(64, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):  # <rot(q, m), rot(k, n)>
        qm = apply_rotary_emb(q, cos[:, m:m + 1], sin[:, m:m + 1])
        kn = apply_rotary_emb(k, cos[:, n:n + 1], sin[:, n:n + 1])
        return (qm * kn).sum().item()

    assert score(5, 3) == pytest.approx(score(40, 38), abs=1e-4)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)
    rotated = apply_rotary_emb(q, cos[:, 7:8], sin[:, 7:8])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation


# -----------------------------------------------------------------------------
# Forward


def test_logits_are_fp32_and_soft_capped():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # raw logits in the hundreds
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256) and logits.dtype == torch.float32
    assert logits.abs().max().item() <= 15.0
    assert logits.abs().max().item() > 14.0  # the cap is reached, not just respected
    with torch.no_grad():  # 15·tanh(raw/15) of the head's raw output
        h = model.transformer.wte(x)
        h = F.rms_norm(h, (64,))
        cos_sin = model.cos[:, :16], model.sin[:, :16]
        for block in model.transformer.h:
            h = block(h, cos_sin)
        raw = model.lm_head(F.rms_norm(h, (64,)))
    assert torch.allclose(logits, 15 * torch.tanh(raw / 15), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 logits even under bf16 autocast
        assert model(x).dtype == torch.float32


def test_loss_ignores_minus_one_targets():
    model = tiny_model()
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    y[0, :5] = -1
    y[1, 10:] = -1
    logits = model(x)
    per_token = F.cross_entropy(logits.view(-1, 256), y.clamp(min=0).view(-1), reduction="none").view(2, 16)
    keep = y != -1
    none = model(x, y, loss_reduction="none")
    assert none.shape == (2, 16)
    assert torch.allclose(none[keep], per_token[keep], atol=1e-5)
    assert torch.count_nonzero(none[~keep]) == 0
    assert model(x, y).item() == pytest.approx(per_token[keep].mean().item(), rel=1e-5)
    assert model(x, y, loss_reduction="sum").item() == pytest.approx(per_token[keep].sum().item(), rel=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    x = torch.randint(0, 256, (1, 20))
    x2 = x.clone()
    x2[0, 12:] = (x2[0, 12:] + 1) % 256
    a, b = model(x), model(x2)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("n_kv_head", [2, 1])  # GQA, MQA
def test_gqa_equals_full_attention_with_repeated_kv_heads(n_kv_head):
    """A GQA model equals an MHA model whose k/v heads are copies of the GQA heads: query head h
    uses key/value head h // (n_head / n_kv_head)."""
    gqa = tiny_model(n_kv_head=n_kv_head)
    mha = tiny_model(seed=1, n_kv_head=4)
    state = gqa.state_dict()
    head_dim, group = 16, 4 // n_kv_head
    for key, value in state.items():
        if key.endswith(("attn.c_k.weight", "attn.c_v.weight")):  # (n_kv_head·D, C) -> (n_head·D, C)
            value = value.view(n_kv_head, head_dim, -1).repeat_interleave(group, dim=0).reshape(4 * head_dim, -1)
        mha.state_dict()[key].copy_(value)
    x = torch.randint(0, 256, (2, 24))
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)


# -----------------------------------------------------------------------------
# KV cache


class ListKVCache:
    """The smallest cache that follows gpt.py's protocol: per-layer lists of chunks, concatenated
    on read, with the mask of what each new token may attend to; the position advances after the
    last layer inserted."""

    def __init__(self, num_layers: int):
        self.num_layers, self.pos = num_layers, 0
        self.k = [[] for _ in range(num_layers)]
        self.v = [[] for _ in range(num_layers)]

    def get_pos(self) -> int:
        return self.pos

    def positions(self, T: int) -> torch.Tensor:
        return torch.arange(self.pos, self.pos + T)

    def insert_kv(self, layer_idx, k, v):
        self.k[layer_idx].append(k)
        self.v[layer_idx].append(v)
        T = k.size(2)
        mask = torch.arange(self.pos + T)[None, :] <= self.positions(T)[:, None]  # (T, T_total)
        if layer_idx == self.num_layers - 1:
            self.pos += T
        return torch.cat(self.k[layer_idx], dim=2), torch.cat(self.v[layer_idx], dim=2), mask


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_forward_equals_full_forward(n_kv_head):
    model = tiny_model(n_kv_head=n_kv_head)
    x = torch.randint(0, 256, (2, 20))
    full = model(x)  # (2, 20, V)
    cache = ListKVCache(model.config.n_layer)
    pieces = [model(x[:, :8], kv_cache=cache)]  # prefill: causal
    assert cache.get_pos() == 8
    for t in range(8, 11):  # decode one token at a time: attend to everything cached
        pieces.append(model(x[:, t:t + 1], kv_cache=cache))
    pieces.append(model(x[:, 11:15], kv_cache=cache))  # a chunk after a prefix: prefix + causal
    pieces.append(model(x[:, 15:20], kv_cache=cache))
    assert cache.get_pos() == 20
    assert cache.k[0][0].shape == (2, n_kv_head, 8, 16)  # (B, n_kv_head, T_new, head_dim)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_rotary_tables_cover_ten_times_the_sequence_length():
    model = tiny_model(sequence_len=8)
    cache = ListKVCache(model.config.n_layer)
    x = torch.randint(0, 256, (1, 80))
    model(x[:, :70], kv_cache=cache)
    model(x[:, 70:80], kv_cache=cache)  # exactly the 80 positions the tables cover
    with pytest.raises(IndexError):  # position 80: past the tables
        model(x[:, :1], kv_cache=cache)
    with pytest.raises(AssertionError, match="rotary tables"):
        model(torch.randint(0, 256, (1, 81)))


# -----------------------------------------------------------------------------
# Naive generation


def test_generate_greedy_is_argmax_of_full_forward():
    model = tiny_model()
    prompt = [3, 14, 15, 92, 65]
    out = list(model.generate(prompt, max_tokens=12, temperature=0.0))
    assert len(out) == 12 and out == list(model.generate(prompt, max_tokens=12, temperature=0.0))
    ids = list(prompt)
    for token in out:  # each token is the argmax given everything before it
        assert token == model(torch.tensor([ids]))[0, -1].argmax().item()
        ids.append(token)
    # top_k=1 sampling is greedy too
    assert list(model.generate(prompt, max_tokens=12, temperature=1.0, top_k=1)) == out


def test_generate_sampling_is_seeded():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)  # nearly uniform next-token distribution
    prompt = [1, 2, 3]
    a = list(model.generate(prompt, max_tokens=20, temperature=1.0, seed=7))
    assert a == list(model.generate(prompt, max_tokens=20, temperature=1.0, seed=7))
    assert a != list(model.generate(prompt, max_tokens=20, temperature=1.0, seed=8))
    assert all(0 <= t < 256 for t in a)
    kept = set(list(model.generate(prompt, max_tokens=30, temperature=1.0, top_k=3)))
    assert len(kept) >= 2


# -----------------------------------------------------------------------------
# Optimiser setup and purity


def test_setup_optimizers_groups_and_rates():
    model = tiny_model(n_embd=192, n_head=3, n_kv_head=3)
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    s = (192 / 768) ** -0.5
    head_group, emb_group = adamw.param_groups
    assert head_group["params"] == [model.lm_head.weight]
    assert emb_group["params"] == [model.transformer.wte.weight]
    assert head_group["lr"] == pytest.approx(0.004 * s) and emb_group["lr"] == pytest.approx(0.2 * s)
    for g in adamw.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.0
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert {id(p) for p in muon_params} == {id(p) for p in model.transformer.h.parameters()}
    assert len(muon_params) == 6 * 2
    for g in muon.param_groups:
        assert g["lr"] == 0.02 and g["momentum"] == 0.95 and g["nesterov"]
    for opt in (adamw, muon):
        assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)


def test_gpt_file_has_no_device_or_rank_code():
    """STYLE point 2: no device or rank logic in the model (names in the code; docstrings may talk)."""
    import io
    import tokenize
    source = (REPO_ROOT / "nanochat" / "gpt.py").read_text()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    names = {t.string for t in tokens if t.type == tokenize.NAME}
    strings = {t.string.strip("'\"") for t in tokens if t.type == tokenize.STRING}
    for forbidden in ("cuda", "distributed", "get_rank", "get_world", "environ", "mps"):
        assert forbidden not in names, f"gpt.py must stay pure math, but uses {forbidden!r}"
    assert not strings & {"cuda", "cpu", "mps", "RANK", "LOCAL_RANK", "WORLD_SIZE"}
    # one forward path: no decision by device, dtype or compile state (nanochat.common.use_fused_loss
    # chooses the fused loss); docstrings and comments may talk about them
    code = "".join(t.string for t in tokens if t.type not in (tokenize.STRING, tokenize.COMMENT))
    for branch in ("device.type", "torch.cuda", "is_compiling", "is_autocast_enabled", "torch.compiler"):
        assert branch not in code, f"gpt.py branches on {branch!r}"
