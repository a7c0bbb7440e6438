"""
The KV cache, old vs new: decode tokens/s at 256, 1,024 and 2,048 positions of context, side by side.

    python -m bench.engine                      # CPU, depth 4, vocab 65,536, batch 1
    python -m bench.engine --depth=20 --device_type=cuda --batch=8

- old: the engine before the preallocated cache, re-stated here (`ConcatKVCache`, `old_generate`):
  every decoded token concatenated onto each layer's keys and values, so each step copies the whole
  cache, and a reply costs time quadratic in its length.
- new: nanochat.engine.Engine, eager (`compile_decode=False`, the CPU path): one preallocated cache
  written in place, read through a length mask.
Both run the same model on the same prompt (random tokens of the given context length) at
temperature 0 and decode --tokens tokens; the table gives tokens/s (rows x tokens / seconds, prefill
excluded), the ratio, and the per-token time, which stays flat for the new cache as the context grows.
"""

import json
import time

import torch

from nanochat.common import compute_init, print0
from nanochat.engine import Engine, sample_next_token
from nanochat.flags import parse_flags
from nanochat.gpt import GPT, GPTConfig


class ConcatKVCache:
    """The old cache: grown by concatenation along time (the model's KV-cache protocol)."""

    def __init__(self, batch_size: int, num_layers: int):
        self.batch_size, self.num_layers = batch_size, num_layers
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.pos = 0

    def positions(self, T):
        return torch.arange(self.pos, self.pos + T, device=self.device)

    def insert_kv(self, layer_idx, k, v):
        self.device = k.device
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)  # copies the whole cache
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        T, Tk = k.size(2), self.keys[layer_idx].size(2)
        mask = None  # one new token attends to everything cached: no mask, as the old attention did
        if T > 1:  # a prompt or a chunk after a prefix (not timed here)
            mask = torch.arange(Tk, device=k.device)[None, :] <= torch.arange(Tk - T, Tk, device=k.device)[:, None]
        if layer_idx == self.num_layers - 1:
            self.pos += T
        return self.keys[layer_idx], self.values[layer_idx], mask

    def prefill(self, other):
        for i in range(self.num_layers):
            self.keys[i] = other.keys[i].expand(self.batch_size, -1, -1, -1).clone()
            self.values[i] = other.values[i].expand(self.batch_size, -1, -1, -1).clone()
        self.pos = other.pos


@torch.inference_mode()
def old_generate(model, tokens, num_samples=1, max_tokens=16, temperature=1.0, top_k=None, seed=42):
    """The old engine's loop without tool use: yields token columns (lists of num_samples ints)."""
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    prefill = ConcatKVCache(1, model.config.n_layer)
    prefill.device = device
    logits = model(torch.tensor([tokens], device=device), kv_cache=prefill)[:, -1, :]
    cache = ConcatKVCache(num_samples, model.config.n_layer)
    cache.prefill(prefill)
    cache.device = device
    logits = logits.expand(num_samples, -1)
    for i in range(max_tokens):
        column = sample_next_token(logits, generator, temperature, top_k)[:, 0].tolist()
        yield column
        if i < max_tokens - 1:
            ids = torch.tensor(column, device=device).unsqueeze(1)
            logits = model(ids, kv_cache=cache)[:, -1, :]


def build_model(depth, vocab_size, sequence_len, device, dtype=torch.float32):
    config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everywhere (the real init zeroes the output projections)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(p.device) / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def timed(fn, sync):
    """Seconds for decoding, prefill excluded: from the first column (after prefill) to the last."""
    it = fn()
    first = next(it)
    sync()
    t0 = time.perf_counter()
    columns = [first] + list(it)
    sync()
    return time.perf_counter() - t0, columns


if __name__ == "__main__":
    cfg = parse_flags(dict(device_type="", depth=4, vocab_size=65536, batch=1, tokens=32,
                           contexts="256,1024,2048", json=0), doc=__doc__)
    compute = compute_init(cfg.device_type)
    contexts = [int(c) for c in cfg.contexts.split(",")]
    model = build_model(cfg.depth, cfg.vocab_size, max(contexts) + cfg.tokens, compute.device, compute.compute_dtype)
    from nanochat.tokenizer import RustBPETokenizer
    tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
    engine = Engine(model, tokenizer, compile_decode=False)
    results = []
    for context in contexts:
        prompt = torch.randint(0, 256, (context,), generator=torch.Generator().manual_seed(context)).tolist()
        kwargs = dict(num_samples=cfg.batch, max_tokens=cfg.tokens, temperature=0.0)
        old_s, old_cols = timed(lambda: old_generate(model, prompt, **kwargs), compute.synchronize)
        new_s, new_cols = timed(lambda: (c for c, _ in engine.generate(prompt, **kwargs)), compute.synchronize)
        steps = len(new_cols) - 1
        agree = sum(a == b for a, b in zip(old_cols, new_cols))
        results.append(dict(context=context, old_tok_s=round(cfg.batch * steps / old_s, 1),
                            new_tok_s=round(cfg.batch * steps / new_s, 1), ratio=round(old_s / new_s, 2),
                            old_ms_per_step=round(1000 * old_s / steps, 2), new_ms_per_step=round(1000 * new_s / steps, 2),
                            greedy_agree=f"{agree}/{len(new_cols)}"))
    if cfg.json:
        print(json.dumps(dict(device=compute.device_type, depth=cfg.depth, batch=cfg.batch, cases=results)))
    else:
        print0(f"depth {cfg.depth}, batch {cfg.batch}, {cfg.tokens} decoded tokens, {compute.device_type}")
        print0(f"{'context':>8} {'old tok/s':>10} {'new tok/s':>10} {'new/old':>8} {'old ms/step':>12} {'new ms/step':>12} {'agree':>7}")
        for r in results:
            print0(f"{r['context']:>8} {r['old_tok_s']:>10} {r['new_tok_s']:>10} {r['ratio']:>8} "
                   f"{r['old_ms_per_step']:>12} {r['new_ms_per_step']:>12} {r['greedy_agree']:>7}")
