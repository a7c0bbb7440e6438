"""
Tests for nanochat/engine.py.

- The calculator: arithmetic and str.count work; 40+ injection attempts return None and execute
  nothing (a canary file that any successful attack would create stays absent).
- The tool-use state machine and stop tokens, driven by `ScriptedModel`: a stand-in for the GPT
  whose logits favour a scripted next token. It is a legitimate test double here: the point is
  what the engine does with the tokens, and it goes through the real KVCache protocol (it stores
  the token ids it is fed as its "keys", so it also checks that prefill copies and concatenation
  keep every row's history intact).
- With the real GPT (tiny, random): the KV-cache forward equals the full forward; the engine at
  temperature 0 equals the naive `GPT.generate` token for token (batch 1 and N); first tokens
  differ across rows at temperature 1; runs repeat with the same seed.
"""

import threading
from types import SimpleNamespace

import pytest
import torch

from nanochat.engine import Engine, KVCache, sample_next_token, use_calculator
from nanochat.tokenizer import RustBPETokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """A real tiktoken tokenizer with the 256 bytes and no merges (needs no trained BPE)."""
    return RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})


# -----------------------------------------------------------------------------
# The calculator


@pytest.mark.parametrize("expr, value", [
    ("1+2", "3"), ("48/2", "24"), ("10/4", "2.5"), ("(3 + 4) * 5 - 6", "29"), ("-3*-2", "6"),
    ("1,000 + 2,500", "3500"), ("7//2", "3"), (".5*4", "2"), (" 12 ", "12"), ("0.1+0.2", str(0.1 + 0.2)),
    ("99999999999*99999999999", str(99999999999 * 99999999999)),
    ('"strawberry".count("r")', "3"), ("'banana'.count('an')", "2"), ('"a,b,c".count(",")', "2"),
])
def test_calculator_values(expr, value):
    assert use_calculator(expr) == value


CANARY = "/tmp/nanochat_calculator_canary"

INJECTIONS = [
    f"__import__('os').system('touch {CANARY}')",
    f"__import__('subprocess').run(['touch', '{CANARY}'])",
    f"open('{CANARY}', 'w')",
    f"exec(\"open('{CANARY}','w')\")",
    f"eval(\"open('{CANARY}','w')\")",
    "().__class__.__bases__[0].__subclasses__()",
    "''.__class__.__mro__[1].__subclasses__()",
    "(1).__class__",
    '"a".count.__self__',
    '"a".count.__self__.__class__',
    '"a".count("a").__class__',
    '"a".count.__call__("a")',
    "'x'.count(__import__('os').getcwd())",
    f"'x'.count(open('{CANARY}','w'))",
    "'x'.format(1)",
    "'x'.join(['a'])",
    "'x' * 10**9",
    "'x'.count('x') ** 2",
    "'x'.count('x', 0, 1)",
    "'x'.count(x='x')",
    "'a'.count(*['a'])",
    '"strawberry".count("r") + 1',
    "2**10", "9**9**9**9", "2 ** 1000000", "10**10**10",
    "pow(2, 3)", "abs(-1)", "len('abc')", "print(1)",
    "lambda: 1", "(lambda: __import__('os'))()",
    "f'{1+1}'", f"f\"{{__import__('os').system('touch {CANARY}')}}\"",
    "[1, 2]", "{1: 2}", "(1, 2)", "x", "x + 1", "True + 1", "None",
    "1 if 1 else 2", "1 < 2", "1 % 2", "1 & 3", "~1", "1e10", "0x10", "1_000", "3j",
    "globals()", "locals()", "vars()", "dir()", "breakpoint()", "input()",
    "[x for x in range(10**10)]", "(yield)", "await x", "a := 1",
    "1" * 1000, "(" * 300 + "1" + ")" * 300, "1+" * 200 + "1", "-" * 500 + "1",
    "1/0", "1//0", "9" * 200 + "/0.0",
    "1;2", "1\n2", "import os", "\x00", "", "   ", "1 2",
    b"1+1", None, 12,
]


def test_calculator_rejects_injections():
    import os
    if os.path.exists(CANARY):
        os.remove(CANARY)
    assert len(INJECTIONS) >= 30
    for expr in INJECTIONS:
        assert use_calculator(expr) is None, expr
    assert not os.path.exists(CANARY)


def test_calculator_is_fast_and_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append((use_calculator("6*7"), use_calculator("9**9**9"),
                                                             use_calculator('"aaa".count("a")'))))
    thread.start()
    thread.join(5)
    assert results == [("42", None, "3")]
    # the longest accepted arithmetic (the length cap) evaluates quickly
    import time
    t0 = time.time()
    assert use_calculator("*".join(["99999999"] * 28)) is not None
    assert time.time() - t0 < 0.5


# -----------------------------------------------------------------------------
# KV cache and sampling


def test_kv_cache_writes_in_place_and_replicates_the_first_row():
    cache = KVCache(batch_size=3, num_layers=2, num_kv_heads=3, head_dim=4, max_len=8)
    k1, v1 = torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4)  # (B, H, T, D): a batch-1 prompt
    assert cache.positions(5).tolist() == [0, 1, 2, 3, 4]
    for layer in range(2):
        keys, values, mask = cache.insert_kv(layer, k1 + layer, v1 + layer)
        assert keys.shape == (1, 3, 8, 4) and torch.equal(keys[:, :, :5], k1 + layer)
        assert torch.equal(mask, torch.ones(5, 8, dtype=torch.bool).tril())  # causal, nothing past 5
        assert int(cache.pos) == 5 * layer  # advanced after the last layer only
    assert int(cache.pos) == 5 and cache.positions(1).tolist() == [5]
    cache.replicate_first_row(5)
    k2 = torch.randn(3, 3, 1, 4)
    keys, values, mask = cache.insert_kv(0, k2, k2 * 2)
    assert keys.shape == (3, 3, 8, 4) and mask.tolist() == [[True] * 6 + [False] * 2]
    for row in range(3):
        assert torch.equal(keys[row, :, :5], k1[0]) and torch.equal(keys[row, :, 5:6], k2[row])
        assert torch.equal(values[row, :, 5:6], 2 * k2[row])
    cache.insert_kv(1, k2, k2)
    assert int(cache.pos) == 6
    cache.reset()
    assert int(cache.pos) == 0


def test_kv_cache_refuses_to_wrap():
    """Writing past max_len is an error, never a write at position 0 again."""
    cache = KVCache(batch_size=1, num_layers=1, num_kv_heads=1, head_dim=2, max_len=4)
    cache.insert_kv(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    with pytest.raises((IndexError, RuntimeError)):
        cache.insert_kv(0, torch.full((1, 1, 2, 2), 7.0), torch.full((1, 1, 2, 2), 7.0))
    assert torch.equal(cache.k[0, :, :, :3], torch.ones(1, 1, 3, 2))  # nothing wrapped onto the start


def test_sample_next_token():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits, generator, temperature=0.0).tolist() == [[1], [0]]
    draws = torch.cat([sample_next_token(logits, generator, 1.0, top_k=2) for _ in range(300)], dim=1)
    assert set(draws[0].tolist()) == {1, 3} and set(draws[1].tolist()) <= {0, 1, 2, 3}
    assert set(draws[1].tolist()) & {1, 2, 3}  # ties among the top-2: both appear
    full = torch.cat([sample_next_token(logits, generator, 1.0) for _ in range(300)], dim=1)
    assert set(full[0].tolist()) == {0, 1, 2, 3}
    a = sample_next_token(logits.repeat(50, 1), torch.Generator().manual_seed(7), 1.0)
    b = sample_next_token(logits.repeat(50, 1), torch.Generator().manual_seed(7), 1.0)
    assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# Tool use and stop tokens, with a scripted stand-in model


class ScriptedModel(torch.nn.Module):
    """Logits that make `script(row, generated)` the next token, where `generated` is the list of
    tokens the row has been fed after the prompt. History is kept in the KV cache: the token ids
    are inserted as keys (B, 1, T, 1) in every layer and read back from it."""

    def __init__(self, vocab_size, prompt_len, script, n_layer=2):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the engine a device
        self.config = SimpleNamespace(n_layer=n_layer, vocab_size=vocab_size, n_head=1, n_kv_head=1, n_embd=1,
                                      sequence_len=256)
        self.vocab_size, self.prompt_len, self.script = vocab_size, prompt_len, script

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        ids = idx.float().view(B, 1, T, 1)
        for layer in range(self.config.n_layer):
            history, _, mask = kv_cache.insert_kv(layer, ids, ids)  # (B, 1, max_len, 1), (T, max_len)
        length = int(mask[-1].sum())  # positions cached, these included
        logits = torch.full((B, T, self.vocab_size), -30.0)
        for row in range(B):
            tokens = history[row, 0, :length, 0].long().tolist()
            logits[row, -1, self.script(row, tokens[self.prompt_len:])] = 30.0
        return logits


def scripted_engine(tokenizer, prompt, script):
    return Engine(ScriptedModel(tokenizer.get_vocab_size(), len(prompt), script), tokenizer)


def test_tool_use_injects_calculator_output_with_mask_zero(tokenizer):
    special = tokenizer.encode_special
    Z = tokenizer.encode("Z")[0]  # what the model "would" say where the tool output goes
    intended = ([special("<|python_start|>")] + tokenizer.encode("12*3+4") + [special("<|python_end|>")]
                + [Z] * 4 + tokenizer.encode(" so 40") + [special("<|assistant_end|>")])
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "12*3+4?"},
                                                           {"role": "assistant", "content": ""}]})
    engine = scripted_engine(tokenizer, prompt, lambda row, generated: intended[len(generated)])
    steps = list(engine.generate(prompt, num_samples=3, max_tokens=50, temperature=1.0, seed=1))
    forced = [special("<|output_start|>")] + tokenizer.encode("40") + [special("<|output_end|>")]
    call = intended.index(special("<|python_end|>")) + 1  # tokens up to and including <|python_end|>
    expected = intended[:call] + forced + intended[call + 4:]
    assert len(forced) == 4 and len(steps) == len(expected)  # stops right after <|assistant_end|>
    for row in range(3):
        assert [column[row] for column, _ in steps] == expected
        assert [mask[row] for _, mask in steps] == [1] * call + [0] * 4 + [1] * (len(expected) - call - 4)
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=50)
    assert sequences == [prompt + expected[:-1]] * 2  # prompt included, stop token excluded
    assert masks == [[0] * len(prompt) + [1] * call + [0] * 4 + [1] * (len(expected) - call - 5)] * 2
    assert tokenizer.decode(sequences[0][len(prompt):]) == \
        "<|python_start|>12*3+4<|python_end|><|output_start|>40<|output_end|> so 40"


def test_rejected_expression_forces_nothing(tokenizer):
    import os
    canary = "/tmp/nanochat_engine_canary"
    if os.path.exists(canary):
        os.remove(canary)
    special = tokenizer.encode_special
    intended = ([special("<|python_start|>")] + tokenizer.encode(f"__import__('os').system('touch {canary}')")
                + [special("<|python_end|>")] + tokenizer.encode("ok") + [special("<|assistant_end|>")])
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("hi")
    engine = scripted_engine(tokenizer, prompt, lambda row, generated: intended[len(generated)])
    sequences, masks = engine.generate_batch(prompt, max_tokens=200)
    assert sequences[0] == prompt + intended[:-1] and masks[0] == [0] * len(prompt) + [1] * (len(intended) - 1)
    assert not os.path.exists(canary)


def test_rows_stop_on_their_own_stop_token(tokenizer):
    """Row r says 'x' r+1 times then stops, on <|assistant_end|> (even rows) or <|bos|> (odd)."""
    x = tokenizer.encode("x")[0]
    stops = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]
    script = lambda row, generated: x if len(generated) <= row else stops[row % 2]
    prompt = tokenizer.encode("go")
    engine = scripted_engine(tokenizer, prompt, script)
    steps = list(engine.generate(prompt, num_samples=4, max_tokens=100))
    assert len(steps) == 5  # until the slowest row (4 x's + its stop token) is done
    for row in range(4):
        column = [c[row] for c, _ in steps]
        assert column[:row + 2] == [x] * (row + 1) + [stops[row % 2]]
    sequences, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=100)
    assert [len(s) - len(prompt) for s in sequences] == [1, 2, 3, 4]
    # max_tokens cuts every row
    sequences, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=2)
    assert [len(s) - len(prompt) for s in sequences] == [1, 2, 2, 2]
    assert len(list(engine.generate(prompt, num_samples=4, max_tokens=3))) == 3


# -----------------------------------------------------------------------------
# With the real GPT: tiny, random weights everywhere


def tiny_gpt(vocab_size, seed=0):
    """A 2-layer, 32-wide GPT (2 query heads sharing 1 KV head) with every weight random, so
    attention and the MLPs matter (the real init zeroes the output projections)."""
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def gpt(tokenizer):
    return tiny_gpt(tokenizer.get_vocab_size())


def new_cache(gpt, batch_size, max_len):
    cfg = gpt.config
    return KVCache(batch_size, cfg.n_layer, cfg.n_kv_head, cfg.n_embd // cfg.n_head, max_len)


def test_kv_cache_forward_equals_full_forward(gpt):
    """Prefill, a chunk after a prefix, single-token steps; then batch 3 after a replicated prefill."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 14))
    with torch.no_grad():
        full = gpt(ids)  # (1, 14, V)
        cache = new_cache(gpt, 1, 20)
        pieces = [gpt(ids[:, :5], kv_cache=cache), gpt(ids[:, 5:9], kv_cache=cache)]
        pieces += [gpt(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 14)]
        assert int(cache.pos) == 14
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
        # three different continuations of one prompt, prefilled into row 0
        batch = new_cache(gpt, 3, 11)
        gpt(ids[:, :9], kv_cache=batch)
        batch.replicate_first_row(9)
        tails = torch.randint(0, 256, (3, 2))
        out = [gpt(tails[:, :1], kv_cache=batch), gpt(tails[:, 1:], kv_cache=batch)]
        out = torch.cat(out, dim=1)  # (3, 2, V)
        for row in range(3):
            reference = gpt(torch.cat([ids[:, :9], tails[row:row + 1]], dim=1))[:, -2:]
            torch.testing.assert_close(out[row:row + 1], reference, atol=1e-4, rtol=1e-4)


def test_engine_greedy_equals_naive_generate(gpt, tokenizer):
    engine = Engine(gpt, tokenizer)
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("The capital of")
    naive = list(gpt.generate(prompt, max_tokens=24, temperature=0.0))
    assert len(naive) == 24
    for num_samples in (1, 4):
        steps = list(engine.generate(prompt, num_samples=num_samples, max_tokens=24, temperature=0.0))
        for row in range(num_samples):
            column = [c[row] for c, _ in steps]
            assert column == naive
    assert not set(naive) & (engine.stop_tokens | {engine.python_start}), "pick a prompt whose greedy reply neither stops nor calls the tool"
    # top_k=1 is greedy too
    steps = list(engine.generate(prompt, max_tokens=24, temperature=1.0, top_k=1, seed=3))
    assert [c[0] for c, _ in steps] == naive


@pytest.mark.parametrize("temperature, top_k, seed", [(1.0, None, 2), (0.8, 20, 3)])
def test_engine_sampling_equals_naive_generate_with_the_same_seed(gpt, tokenizer, temperature, top_k, seed):
    """Batch 1 draws from the same distributions with the same generator: the same tokens."""
    engine = Engine(gpt, tokenizer)
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("If 5*x + 3 = 13, then x is")
    naive = list(gpt.generate(prompt, max_tokens=20, temperature=temperature, top_k=top_k, seed=seed))
    # seeds chosen so the sample neither stops nor calls the tool (where the engine acts on its own)
    assert not set(naive) & (engine.stop_tokens | {engine.python_start}) and len(set(naive)) > 5, naive
    column = [c[0] for c, _ in engine.generate(prompt, max_tokens=20, temperature=temperature, top_k=top_k, seed=seed)]
    assert column == naive


def test_first_token_sampled_independently_per_row(gpt, tokenizer):
    engine = Engine(gpt, tokenizer)
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("Once upon a")
    first = [c for c, _ in engine.generate(prompt, num_samples=16, max_tokens=1, temperature=1.0, seed=5)][0]
    assert len(set(first)) >= 4, f"the first tokens of 16 samples: {first}"
    again = engine.generate_batch(prompt, num_samples=16, max_tokens=6, temperature=1.0, seed=5)
    assert again == engine.generate_batch(prompt, num_samples=16, max_tokens=6, temperature=1.0, seed=5)
    assert again != engine.generate_batch(prompt, num_samples=16, max_tokens=6, temperature=1.0, seed=6)


# -----------------------------------------------------------------------------
# The preallocated cache and the compiled decode step (issue: fast decoding)


@pytest.fixture(scope="module")
def compiled_engine(gpt, tokenizer):
    """compile_decode on the CPU: torch.compile (inductor, no CUDA graphs). One bucket only, 4: batch 1
    and 3 run in it with padding rows, batch 8 eagerly (each bucket takes ~30-90 s to compile on a
    busy 2-core CPU)."""
    engine = Engine(gpt, tokenizer, compile_decode=True, batch_buckets=(4,))
    assert engine.warmup((1,)) > 0 and engine.compile_decode, "compiling the decode step failed"
    return engine


def columns(engine, prompt, num_samples, **kwargs):
    steps = list(engine.generate(prompt, num_samples=num_samples, **kwargs))
    return [[column[row] for column, _ in steps] for row in range(num_samples)]


@pytest.mark.parametrize("num_samples", [1, 3, 8])
def test_static_cache_engines_equal_naive_generate(gpt, tokenizer, compiled_engine, num_samples):
    """Greedy: eager and compiled (bucket 1, 4 with a padding row, 8) equal the naive generate,
    with a reply that runs to the last position of the context (sequence_len 64)."""
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("The capital of")
    max_tokens = gpt.config.sequence_len - len(prompt)  # fills the static cache exactly
    naive = list(gpt.generate(prompt, max_tokens=max_tokens, temperature=0.0))
    assert not set(naive) & (compiled_engine.stop_tokens | {compiled_engine.python_start})
    for engine in (Engine(gpt, tokenizer, compile_decode=False), compiled_engine):
        assert columns(engine, prompt, num_samples, max_tokens=max_tokens, temperature=0.0) == [naive] * num_samples


def test_compiled_engine_samples_like_the_eager_one_and_the_old_engine(gpt, tokenizer, compiled_engine):
    """Temperature 1, batch 8, the same seed: the same draws from the compiled step, the eager one
    and the old concatenating engine (re-stated in bench/engine.py)."""
    from bench.engine import old_generate
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("Once upon a")
    kwargs = dict(max_tokens=12, temperature=1.0, top_k=50, seed=25)
    old = [list(row) for row in zip(*old_generate(gpt, prompt, num_samples=8, **kwargs))]
    eager = columns(Engine(gpt, tokenizer, compile_decode=False), prompt, 8, **kwargs)
    stop = compiled_engine.stop_tokens | {compiled_engine.python_start}
    assert not any(set(row) & stop for row in old), "pick a seed whose samples neither stop nor call the tool"
    assert eager == old and columns(compiled_engine, prompt, 8, **kwargs) == old
    assert len({tuple(row) for row in old}) > 1


def test_prompt_that_nearly_fills_the_cache(gpt, tokenizer, compiled_engine):
    torch.manual_seed(3)
    prompt = torch.randint(0, 256, (gpt.config.sequence_len - 3,)).tolist()
    naive = list(gpt.generate(prompt, max_tokens=3, temperature=0.0))
    assert columns(compiled_engine, prompt, 2, max_tokens=3, temperature=0.0) == [naive] * 2
    # past sequence_len: an eager cache sized for the request, still the same tokens
    naive = list(gpt.generate(prompt, max_tokens=20, temperature=0.0))
    assert columns(compiled_engine, prompt, 2, max_tokens=20, temperature=0.0) == [naive] * 2


def test_request_longer_than_the_model_is_a_clear_error(gpt, tokenizer, compiled_engine):
    prompt = [1] * (gpt.rotary_seq_len - 5)
    with pytest.raises(ValueError, match=r"needs \d+ positions; the model has \d+"):
        next(compiled_engine.generate(prompt, max_tokens=10))


def test_compiled_step_equals_eager_step(gpt, compiled_engine):
    """The compiled one-token step's logits equal the eager step's at the same cache state."""
    from nanochat.engine import _decode_step
    cache, _ = compiled_engine._static[(4, torch.float32)]
    ids = torch.randint(0, 256, (4, 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        results = []
        for step in (_decode_step, compiled_engine._compiled):
            cache.reset()
            gpt(torch.arange(10).view(1, 10), kv_cache=cache)
            cache.replicate_first_row(10)
            results.append(step(gpt, ids, cache).clone())
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


def test_tool_use_through_the_compiled_step(tokenizer):
    """The tool's forced tokens reach the model through the compiled step (the scripted model
    reads its history back from the cache, so a forced token that was not fed would change it)."""
    special = tokenizer.encode_special
    intended = ([special("<|python_start|>")] + tokenizer.encode("6*7") + [special("<|python_end|>")]
                + [tokenizer.encode("Z")[0]] * 4 + tokenizer.encode(" ok") + [special("<|assistant_end|>")])
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("6*7?")
    model = ScriptedModel(tokenizer.get_vocab_size(), len(prompt), lambda row, generated: intended[len(generated)])
    eager = Engine(model, tokenizer, compile_decode=False).generate_batch(prompt, num_samples=3, max_tokens=40)
    compiled = Engine(model, tokenizer, compile_decode=True).generate_batch(prompt, num_samples=3, max_tokens=40)
    assert compiled == eager
    assert tokenizer.decode(eager[0][0][len(prompt):]) == "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> ok"
