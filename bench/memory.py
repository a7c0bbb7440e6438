"""
The memory planner (nanochat/memory_plan.py) against measured memory, side by side.

Run:
    python -m bench.memory                  # 3 small CPU configs of base_train + the d20 H200 figure
    python -m bench.memory --gpu_only=1     # only the d20 estimate vs the H200 measurement

- CPU: each config is a real `scripts.base_train` run of a few steps in a fresh subprocess. The
  child imports everything base_train imports, notes its RSS (the baseline), runs the script in
  the same process, and reports the peak RSS (getrusage ru_maxrss) minus that baseline next to the
  planner's estimate (memory_plan.LAST). Each config runs twice: with glibc's default malloc
  (compared with plan.rss(), which adds the freed activations glibc's heap keeps) and with
  MALLOC_MMAP_THRESHOLD_ pinned, where RSS is the live bytes (compared with plan.peak()). Needs what base_train needs in the base dir (a tokenizer
  and pretraining shards: the CPU preset of speedrun.sh makes both). The configs are fp32 and
  eager (the CPU's), with the fused loss, as base_train runs there.
- GPU: the planner's estimate for the run measured on one H200 (d20, device_batch_size 32, seq
  2048, vocab 65,536, bf16 embedding, compiled): max_memory_allocated 75.4 GB (82.8 GB with
  --fp32_embedding=1). Computed here on the CPU under bf16 autocast with the plain head (the path
  CUDA takes), at seq 64/128 and scaled. The planner counts the eager graph; for a compiled run it
  scales the activations by memory_plan.COMPILE_FACTOR, fitted on the bf16 figure: the fp32 one
  checks it.
"""

import json
import os
import resource
import runpy
import subprocess
import sys

CONFIGS = [  # base_train flags (each run: 2 steps: the second backward holds the optimiser state too)
    ["--depth=4", "--max_seq_len=512", "--device_batch_size=12", "--total_batch_size=6144"],
    ["--depth=6", "--max_seq_len=256", "--device_batch_size=16", "--total_batch_size=4096"],
    ["--depth=8", "--max_seq_len=1024", "--device_batch_size=2", "--total_batch_size=2048"],
]
COMMON = ["--device_type=cpu", "--num_iterations=2", "--eval_every=-1", "--eval_tokens=2048",
          "--core_metric_every=-1", "--sample_every=-1"]
PINNED = 65536  # MALLOC_MMAP_THRESHOLD_: blocks >= 64 kB are mmapped and go back to the OS when freed
H200 = dict(bf16=75.4e9, fp32=82.8e9)  # measured max_memory_allocated, d20 x 32 x 2048, compiled


def child(flags: list[str]) -> None:
    """Run base_train with `flags` in this process; print {"estimate", "measured", ...} as JSON."""
    import psutil
    import pyarrow.parquet  # noqa: F401  (imported by the loader: part of the baseline)
    import scripts  # noqa: F401
    from nanochat import (checkpoint_manager, common, dataloader, flags as _flags, gpt, loss_eval,  # noqa: F401
                          memory_plan, optim, progress, report, tokenizer)
    baseline = psutil.Process().memory_info().rss
    sys.argv = ["scripts.base_train", *flags]
    runpy.run_module("scripts.base_train", run_name="__main__")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    plan = memory_plan.LAST
    print("MEMORY " + json.dumps(dict(estimate=plan.peak(), rss_estimate=plan.rss(), measured=peak - baseline, static=plan.static(),
                                      activations=plan.activations(), head=plan.peak() - plan.static() - plan.activations())))


def run_config(flags: list[str], env: dict | None = None) -> dict:
    """One config in a fresh subprocess: the child's JSON line."""
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--child", *COMMON, *flags], env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("MEMORY ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"base_train {' '.join(flags)} failed (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("MEMORY "):])


def gpu_estimate(fp32_embedding: bool) -> tuple[float, float]:
    """The planner's peak for d20 x 32 x 2048, vocab 65,536 on one rank, as CUDA would run it."""
    import torch

    from nanochat import memory_plan
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048))
    model.to_empty(device="cpu")
    model.init_weights(embedding_dtype=torch.float32 if fp32_embedding else torch.bfloat16)
    model.fused_loss = False  # CUDA takes the plain head (nanochat.common.use_fused_loss)
    optimizers = model.setup_optimizers()
    plan = memory_plan.estimate(model, optimizers, 1, 32, 2048, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    print(f"  {'fp32' if fp32_embedding else 'bf16'} embedding: {plan.summary()}")
    eager = plan.peak()
    plan.compiled = True  # what base_train plans for the compiled run
    return eager, plan.peak()


def measure(flags: list[str]) -> tuple[dict, dict]:
    """One config twice: glibc's default malloc, and with its mmap threshold pinned (RSS = live bytes)."""
    return run_config(flags), run_config(flags, dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(PINNED)))


def main() -> None:
    gpu_only = "--gpu_only=1" in sys.argv
    if not gpu_only:
        print(f"{'base_train config':<66} {'estimate':>9} {'RSS pinned':>10} {'ratio':>6} {'RSS est.':>9} "
              f"{'RSS':>8} {'ratio':>6}")
        for flags in CONFIGS:
            default, pinned = measure(flags)
            print(f"{' '.join(flags):<66} {pinned['estimate'] / 1e6:>7.0f}MB {pinned['measured'] / 1e6:>8.0f}MB "
                  f"{pinned['estimate'] / pinned['measured']:>6.2f} {default['rss_estimate'] / 1e6:>7.0f}MB "
                  f"{default['measured'] / 1e6:>6.0f}MB {default['rss_estimate'] / default['measured']:>6.2f}", flush=True)
    print("d20, device_batch_size 32, seq 2048, vocab 65,536, one H200 (measured compiled):")
    for fp32 in (False, True):
        (eager, compiled), measured = gpu_estimate(fp32), H200["fp32" if fp32 else "bf16"]
        print(f"  measured {measured / 1e9:.1f} GB (compiled); eager estimate {eager / 1e9:.1f} GB (ratio "
              f"{eager / measured:.2f}), compiled estimate {compiled / 1e9:.1f} GB (ratio {compiled / measured:.2f}; "
              f"COMPILE_FACTOR is fitted on the bf16 figure)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
