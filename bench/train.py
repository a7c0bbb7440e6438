"""
Training-step throughput: forward + backward + optimiser step of a GPT on random tokens, as
tokens/s and as achieved model FLOP/s against a peak ("MFU").

Run:
    python -m bench.train                                   # CPU: depth 6, seq 512, vocab 65,536
    python -m bench.train --profile=1                       # + where the time goes (torch.profiler)
    python -m bench.train --fused_loss=0                    # the plain head + loss, for the ratio
    python -m bench.train --device_type=cuda --depth=20 --max_seq_len=2048 --device_batch_size=32

- Model FLOPs per token are GPT.estimate_flops() (6·matmul params + attention, forward and
  backward), the same number base_train's MFU uses; the optimiser's own work (Newton-Schulz,
  ~5·(4·r²·c + 2·r³) per r×c matrix per step) is not counted, so a small batch pays for it.
- The peak: on the CPU there is no data-sheet number worth trusting (shared cores, turbo, AVX
  width), so the script measures one in the same run: the best time of a large fp32 matmul
  (--matmul_size). On CUDA the peak is the device's dense bf16 data-sheet figure
  (nanochat.common.get_peak_flops; n/a for unknown devices), and the measured bf16 matmul is
  printed next to it.
- One step is --grad_accum_steps micro-batches of --device_batch_size x --max_seq_len tokens, then
  nanochat.optim.step (reduce, clip, update) exactly as scripts/base_train.py does. Data loading is
  not part of it (the tokens are random). The step time is the median of --steps timed steps after
  --warmup_steps; the peak and the step are measured alternately (peak, steps, peak), and the best
  peak is used, so a machine that gets busier mid-run cannot flatter the ratio.
- The head + loss is the fused one in eager fp32, as in base_train (nanochat/fused_loss.py);
  --fused_loss=0 measures the plain PyTorch ops instead.
- On a CPU shared with other work, run with `OMP_WAIT_POLICY=PASSIVE` (set before Python starts):
  by default OpenMP threads spin while waiting for each other, and when another process holds the
  other core every small op stalls. Measured on 2 busy cores (load ~3), depth 6: 53 tokens/s by
  default, 147 with PASSIVE (a 384x384 matmul: 24 ms -> 3.7 ms).
"""

import os
import statistics
import time

import torch

from nanochat import optim
from nanochat.common import compute_cleanup, compute_init, get_device_name, get_peak_flops, print0, use_fused_loss
from nanochat.flags import parse_flags, print_flags
from nanochat.gpt import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    device_type="",  # cuda | mps | cpu; empty = autodetect
    depth=6,
    max_seq_len=512,
    vocab_size=65536,
    device_batch_size=2,
    grad_accum_steps=4,  # micro-batches per optimiser step: 4,096 tokens amortise the optimisers
    grad_clip=1.0,
    steps=3,  # timed steps
    warmup_steps=1,
    compile=-1,  # -1 auto (on for CUDA), 0 off, 1 on
    fp32_embedding=0,  # 1: keep the embedding (and the residual stream) fp32 on CUDA; 0: bf16 there, as the reference
    fused_loss=1,  # 1: the model's default (fused head + loss in eager fp32), 0: the plain path
    matmul_size=4096,  # side of the square matmul that measures the peak
    threads=0,  # torch intra-op threads on the CPU; 0 = torch's default
    profile=0,  # 1: profile one step and print the top operators
)
cfg = parse_flags(DEFAULTS, doc=__doc__)

# -----------------------------------------------------------------------------
# Compute

compute = compute_init(cfg.device_type)
device, device_type = compute.device, compute.device_type
if cfg.threads > 0:
    torch.set_num_threads(cfg.threads)
print_flags(cfg, DEFAULTS)
print0(f"device: {get_device_name(device_type)}, torch {torch.__version__}, "
       f"{torch.get_num_threads()} CPU threads, world size {compute.world_size}")


def measure_matmul_flops(n: int, reps: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul: fp32 on CPU, bf16 elsewhere."""
    dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    compute.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        compute.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# -----------------------------------------------------------------------------
# Model, optimisers, a fixed random batch

config = GPTConfig.from_depth(cfg.depth, vocab_size=cfg.vocab_size, sequence_len=cfg.max_seq_len)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights(embedding_dtype=torch.float32 if cfg.fp32_embedding else compute.compute_dtype)
orig_model = model
compiled = cfg.compile == 1 or (cfg.compile == -1 and device_type == "cuda")
model.fused_loss = bool(cfg.fused_loss) and use_fused_loss(device_type, compiled)
if compiled:
    model = torch.compile(model, dynamic=False)
optimizers = orig_model.setup_optimizers()
flops_per_token = orig_model.estimate_flops()
tokens_per_step = cfg.device_batch_size * cfg.max_seq_len * cfg.grad_accum_steps * compute.world_size
print0(f"model: depth {cfg.depth}, n_embd {config.n_embd}, heads {config.n_head}, vocab {cfg.vocab_size:,}, "
       f"{orig_model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOP/token")
print0(f"step: {cfg.grad_accum_steps} x {cfg.device_batch_size} x {cfg.max_seq_len} tokens x {compute.world_size} "
       f"rank(s) = {tokens_per_step:,} tokens")
generator = torch.Generator().manual_seed(1234)
x = torch.randint(0, cfg.vocab_size, (cfg.device_batch_size, cfg.max_seq_len), generator=generator).to(device)
y = torch.randint(0, cfg.vocab_size, (cfg.device_batch_size, cfg.max_seq_len), generator=generator).to(device)


def train_step() -> tuple[float, float]:
    """One optimiser step, as base_train does it. Returns (fwd+bwd seconds, optimiser seconds)."""
    compute.synchronize()
    t0 = time.perf_counter()
    for _ in range(cfg.grad_accum_steps):
        with compute.autocast():
            loss = model(x, y)
        (loss / cfg.grad_accum_steps).backward()
    compute.synchronize()
    t1 = time.perf_counter()
    optim.step(optimizers, 1.0, grad_clip=cfg.grad_clip)
    compute.synchronize()
    return t1 - t0, time.perf_counter() - t1


# -----------------------------------------------------------------------------
# Measure: peak, steps, peak again

load_before = os.getloadavg()[0]  # other processes on the machine skew both numbers: show them
peaks = [measure_matmul_flops(cfg.matmul_size)]
for _ in range(cfg.warmup_steps):
    train_step()
timings = [train_step() for _ in range(cfg.steps)]
peaks.append(measure_matmul_flops(cfg.matmul_size))

fwdbwd = statistics.median(t[0] for t in timings)
optim_time = statistics.median(t[1] for t in timings)
step_time = statistics.median(t[0] + t[1] for t in timings)
achieved = flops_per_token * tokens_per_step / step_time / compute.world_size  # per device
measured_peak = max(peaks)
sheet_peak = get_peak_flops(get_device_name(device_type)) if device_type == "cuda" else None
peak, peak_name = (sheet_peak, "bf16 data sheet") if device_type == "cuda" else (measured_peak, "measured fp32 matmul")

head_loss = "fused" if orig_model.fused_loss else "plain"
rows = [
    ("tokens per step", f"{tokens_per_step:,}"),
    ("embedding dtype", str(orig_model.transformer.wte.weight.dtype).removeprefix("torch.")),
    ("head + loss (nanochat/fused_loss.py)", f"{head_loss}{', compiled' if compiled else ''}"),
    ("step time (median)", f"{step_time * 1000:.0f} ms"),
    ("  forward + backward", f"{fwdbwd * 1000:.0f} ms ({100 * fwdbwd / step_time:.0f}%)"),
    ("  optimisers (reduce, clip, step)", f"{optim_time * 1000:.0f} ms ({100 * optim_time / step_time:.0f}%)"),
    ("tokens/s", f"{tokens_per_step / step_time:,.0f}"),
    ("model FLOP/s (per device)", f"{achieved / 1e9:,.1f} GFLOP/s"),
    (f"matmul {cfg.matmul_size}² ({'fp32' if device_type == 'cpu' else 'bf16'}, best)",
     f"{measured_peak / 1e9:,.1f} GFLOP/s (runs: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})"),
]
if device_type == "cuda":
    rows.append(("bf16 data-sheet peak", f"{sheet_peak / 1e12:.0f} TFLOP/s" if sheet_peak else "unknown device"))
rows.append((f"MFU vs {peak_name}", f"{100 * achieved / peak:.1f}%" if peak else "n/a"))
rows.append(("peak memory (max_memory_allocated; CPU: peak RSS)", f"{compute.max_memory_allocated() / 1e9:.2f} GB"))
if device_type == "cpu":
    rows.append(("threads, OMP_WAIT_POLICY", f"{torch.get_num_threads()}, {os.environ.get('OMP_WAIT_POLICY', 'unset')}"))
rows.append(("load average before, after", f"{load_before:.1f}, {os.getloadavg()[0]:.1f}"))
width = max(len(name) for name, _ in rows)
print0("-" * (width + 30))
for name, value in rows:
    print0(f"{name:<{width}}  {value}")
print0("-" * (width + 30))

# -----------------------------------------------------------------------------
# Optional: where the time goes

if cfg.profile:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step()
    sort_by = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print0(prof.key_averages().table(sort_by=sort_by, row_limit=20))

compute_cleanup()
