"""
Decode speed: today's engine (eager) vs the fast path, per batch size and context length.

    python -m bench.decode --device=cpu --depth=4 --json      # ~1-2 min on 2 cores
    python -m bench.decode --device=cuda --depth=20 --json    # d20 on one GPU

Prints one JSON object (with --json; a table otherwise):
    {"device": ..., "depth": ..., "cases": [{"batch": B, "context": C, "eager_tok_s": x,
     "fast_tok_s": y, "greedy_agree": "n/m"}, ...], "ttft_ms_1500": z, ...}
- eager: today's engine, re-stated in bench/engine.py (a KV cache grown by concatenation, fp32
  weights, under bf16 autocast on CUDA).
- fast: nanochat.engine.Engine as the chat scripts build it: weights cast once to
  Compute.compute_dtype (bf16 on CUDA), the preallocated cache, and on CUDA the one-token step
  captured as a CUDA graph in the batch's bucket, warmed up first.
- A case decodes at context C: the prompt is C - tokens random tokens, then tokens steps (greedy)
  end at position C. tok/s = batch x steps / seconds, prefill excluded.
- greedy_agree: the fast path's greedy tokens that equal the argmax of an eager, cache-free forward
  of the same weights over the same prefix (teacher-forced, so one near-tie does not derail the rest).
- ttft_ms_1500: time to the first token of a 1,500-token prompt, batch 1, fast path (median of 3).
- On CUDA also: kernels per decode step (torch.profiler's CUDA kernel events over 8 steps) and
  the seconds the warm-up (compile + capture) took.
The weights are random (normal / sqrt(fan_in)): speed does not depend on them.
"""

import json
import statistics
import sys
import time

import torch

from bench.engine import build_model, old_generate, timed
from nanochat.common import compute_init
from nanochat.engine import Engine
from nanochat.flags import parse_flags
from nanochat.tokenizer import RustBPETokenizer

sys.argv = [a if a != "--json" else "--json=1" for a in sys.argv]  # a bare --json, as documented
cfg = parse_flags(dict(device="", depth=4, vocab_size=65536, batches="1,8,32", contexts="256,1024,2048",
                       tokens=-1, eager_tokens=-1, json=0, compile_decode=-1), doc=__doc__)
compute = compute_init(cfg.device)
device, cuda = compute.device, compute.device_type == "cuda"
tokens = cfg.tokens if cfg.tokens > 0 else (64 if cuda else 8)  # fast-path steps per case
eager_tokens = cfg.eager_tokens if cfg.eager_tokens > 0 else (16 if cuda else tokens)
batches = [int(b) for b in cfg.batches.split(",")]
contexts = [int(c) for c in cfg.contexts.split(",")]
sequence_len = max(2048, max(contexts))

# tiktoken with the 256 bytes (no trained tokenizer needed; ids < 256 are what the prompts use)
tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
slow_model = build_model(cfg.depth, cfg.vocab_size, sequence_len, device)  # fp32, as today
fast_model = build_model(cfg.depth, cfg.vocab_size, sequence_len, device, compute.compute_dtype)
compile_decode = None if cfg.compile_decode < 0 else bool(cfg.compile_decode)
engine = Engine(fast_model, tokenizer, compile_decode=compile_decode)
t0 = time.perf_counter()
warmup_s = engine.warmup(batches)
log = lambda *a: None if cfg.json else print(*a, flush=True)
log(f"warm-up (compile_decode={engine.compile_decode}): {warmup_s:.1f}s")


def prompt_of(length, seed):
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def teacher_forced_agreement(prompt, columns):
    """(agreeing, total) greedy choices: each row's fast-path tokens against the argmax of one
    eager, cache-free forward of the same weights over the same prefix. (Comparing two free runs
    token by token counts everything after the first near-tie flip as a disagreement.)"""
    agree, total, seen = 0, 0, {}
    for row in range(len(columns[0])):
        tokens = tuple(column[row] for column in columns)
        if tokens not in seen:  # greedy rows of one prompt are usually identical: one forward each
            ids = torch.tensor([prompt + list(tokens)], dtype=torch.long, device=device)
            with torch.autocast(device.type, enabled=False):
                preds = fast_model(ids)[0, len(prompt) - 1:-1].argmax(-1).tolist()  # (len(tokens),)
            seen[tokens] = sum(p == t for p, t in zip(preds, tokens))
        agree, total = agree + seen[tokens], total + len(tokens)
    return agree, total


cases = []
for batch in batches:
    for context in contexts:
        prompt = prompt_of(context - tokens, context)
        greedy = dict(num_samples=batch, temperature=0.0)
        with compute.autocast():
            eager_s, eager_cols = timed(lambda: old_generate(slow_model, prompt, max_tokens=eager_tokens, **greedy),
                                        compute.synchronize)
        fast_s, fast_cols = timed(lambda: (c for c, _ in engine.generate(prompt, max_tokens=tokens, **greedy)),
                                  compute.synchronize)
        agree, total = teacher_forced_agreement(prompt, fast_cols)
        case = dict(batch=batch, context=context, eager_tok_s=round(batch * (len(eager_cols) - 1) / eager_s, 1),
                    fast_tok_s=round(batch * (len(fast_cols) - 1) / fast_s, 1),
                    greedy_agree=f"{agree}/{total}")
        cases.append(case)
        log(case)

ttfts = []
prompt = prompt_of(1500, 1500)
for _ in range(3):
    compute.synchronize()
    t = time.perf_counter()
    next(engine.generate(prompt, num_samples=1, max_tokens=1, temperature=0.0))  # the column is on the host
    ttfts.append(1000 * (time.perf_counter() - t))
result = dict(device=compute.device_type, depth=cfg.depth, cases=cases, ttft_ms_1500=round(statistics.median(ttfts), 1),
              compile_decode=engine.compile_decode, warmup_s=round(warmup_s, 1), tokens_per_case=tokens,
              eager_tokens_per_case=eager_tokens)

if cuda:  # kernels per decode step, from the profiler's CUDA kernel events over 8 steps
    try:
        from torch.profiler import ProfilerActivity, profile
        steps = 8
        stream = engine.generate(prompt_of(256, 1), num_samples=1, max_tokens=steps + 2, temperature=0.0)
        next(stream)  # prefill and the first token, outside the window
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                next(stream)
            torch.cuda.synchronize()
        events = prof.events()
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch",
                                                       "cudaLaunchKernelExC", "cuLaunchKernelEx"))
        graph_launches = sum(1 for e in events if e.name == "cudaGraphLaunch")
        result.update(kernels_per_step=round(kernels / steps, 1), host_launches_per_step=round(launches / steps, 1),
                      graph_launches_per_step=round(graph_launches / steps, 1))
    except Exception as e:  # the numbers above stand without it
        result["kernels_per_step"] = f"profiler failed: {type(e).__name__}: {e}"
result["total_s"] = round(time.perf_counter() - t0, 1)

if cfg.json:
    print(json.dumps(result), flush=True)
else:
    print(f"{'batch':>6} {'context':>8} {'eager tok/s':>12} {'fast tok/s':>11} {'ratio':>7} {'greedy agree':>13}")
    for c in cases:
        print(f"{c['batch']:>6} {c['context']:>8} {c['eager_tok_s']:>12} {c['fast_tok_s']:>11} "
              f"{c['fast_tok_s'] / c['eager_tok_s']:>7.2f} {c['greedy_agree']:>13}")
    print({k: v for k, v in result.items() if k != "cases"})
