"""
Why the engine captures the eager decode step as a CUDA graph instead of torch.compile's
reduce-overhead mode: per batch size, the time of one step for torch.compile(mode="reduce-overhead"),
the eager bf16 step, and a hand-captured CUDA graph of the eager and of the torch.compile(default)
step; then profiler tables for the reduce-overhead step at the largest batch.

    python -m dev.decode_diag --depth=20 --batches=1,32 --steps=10

Measured on one H200 (torch 2.11, d20, bf16, random weights, cache of 2,048 positions), GPU time
per step (the engine then used the reduce-overhead step; it now uses the captured eager step):

    variant                               batch 1    batch 32
    torch.compile reduce-overhead         2.40 ms    55.07 ms
    eager bf16                            19.79 ms   20.57 ms
    CUDA graph of the eager step          2.14 ms     3.93 ms
    CUDA graph of torch.compile(default)  2.39 ms    55.11 ms

The profile at batch 32 showed why: inductor's graph spent ~95 % of the step in pointwise copy
kernels (triton_poi_fused_copy_*, ~4.5-5.3 ms each): the in-place write into the KV-cache view is
functionalised into a copy of the whole layer cache (32 rows x 2,048 positions), which costs
nothing at batch 1 and everything at batch 32.
"""

import time
import traceback

import torch

from bench.engine import build_model
from nanochat.common import compute_init
from nanochat.engine import Engine, _decode_step
from nanochat.flags import parse_flags
from nanochat.tokenizer import RustBPETokenizer

cfg = parse_flags(dict(depth=20, batches="1,8,32", steps=20, profile=1), doc=__doc__)
compute = compute_init("cuda")
device = compute.device
model = build_model(cfg.depth, 65536, 2048, device, torch.bfloat16)
tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
engine = Engine(model, tokenizer, compile_decode=True)
reduce_overhead = torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)
batches = [int(b) for b in cfg.batches.split(",")]
t0 = time.time()
engine.warmup(batches)
print(f"warmup {time.time() - t0:.1f}s", flush=True)


@torch.inference_mode()
def per_step_ms(fn, steps=cfg.steps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, 1000 * (time.perf_counter() - t) / steps


@torch.inference_mode()
def prefill(cache, B):
    cache.reset()
    with torch.inference_mode():
        model(torch.randint(0, 256, (1, 1000), device=device), kv_cache=cache)
    cache.replicate_first_row(1000)


for B in batches:
    print(f"\n=== batch {B}", flush=True)
    ids = torch.randint(0, 256, (B, 1), device=device)
    cache, _ = engine._static_cache(B, torch.bfloat16)
    variants = {}
    variants["torch.compile reduce-overhead"] = lambda: reduce_overhead(model, ids, cache)
    variants["eager bf16"] = lambda: _decode_step(model, ids, cache)
    for name, fn in variants.items():
        try:
            prefill(cache, B)
            with torch.inference_mode():
                gpu, wall = per_step_ms(lambda: (fn(), cache.pos.sub_(1)))
            print(f"{name:40s} gpu {gpu:8.2f} ms/step   wall {wall:8.2f} ms/step", flush=True)
        except Exception:
            print(f"{name}: FAILED\n{traceback.format_exc()[-1500:]}", flush=True)
    # hand-captured graphs (gpt-fast style): static ids in, static logits out
    for name, step in [("manual graph of eager", _decode_step),
                       ("manual graph of compile(default)", torch.compile(_decode_step, dynamic=False))]:
        try:
            prefill(cache, B)
            static_ids = ids.clone()
            with torch.inference_mode():
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        step(model, static_ids, cache)
                        cache.pos.sub_(1)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = step(model, static_ids, cache)
                cache.pos.sub_(1)
                gpu, wall = per_step_ms(lambda: (graph.replay(), cache.pos.sub_(1)))
            print(f"{name:40s} gpu {gpu:8.2f} ms/step   wall {wall:8.2f} ms/step  out {tuple(out.shape)}", flush=True)
        except Exception:
            print(f"{name}: FAILED\n{traceback.format_exc()[-1500:]}", flush=True)
    # the whole engine loop, host part included
    try:
        prompt = torch.randint(0, 256, (1000,)).tolist()
        it = engine.generate(prompt, num_samples=B, max_tokens=40, temperature=0.0)
        next(it)
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = sum(1 for _ in it)
        print(f"{'engine.generate loop':40s} wall {1000 * (time.perf_counter() - t) / n:8.2f} ms/step ({n} steps)", flush=True)
    except Exception:
        print(f"engine.generate: FAILED\n{traceback.format_exc()[-1500:]}", flush=True)

if cfg.profile:
    from torch.profiler import ProfilerActivity, profile
    B = batches[-1]
    ids = torch.randint(0, 256, (B, 1), device=device)
    cache, _ = engine._static_cache(B, torch.bfloat16)
    prefill(cache, B)
    with torch.inference_mode():
        for _ in range(3):
            reduce_overhead(model, ids, cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                reduce_overhead(model, ids, cache)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
