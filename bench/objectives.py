"""
Autoregressive vs masked diffusion, side by side: `base_train --objective=ar` and
`--objective=mdlm` at the same depth, batch, steps (so the same tokens and the same FLOPs: the two
objectives run the same network, one <|mask|> row apart), on the same data and tokenizer, and one
table of the final val bpb (AR: exact; MDLM: the ELBO upper bound, nanochat/diffusion.py) and the
training tokens/s.

Run:
    python -m bench.objectives                                  # CPU: depth 4, seq 256, 200 steps (~15 min on 2 cores)
    python -m bench.objectives --num_iterations=50 --depth=2    # a quick look
    python -m bench.objectives --device_type=cuda --depth=12 --max_seq_len=1024 --device_batch_size=16 \\
        --total_batch_size=65536 --num_iterations=500

- Data: the CPU preset's sample (dev/cpu_sample/pretrain, OpenStax text; the last shard is val)
  through NANOCHAT_PRETRAIN_DIR, and a tokenizer trained on it (--vocab_size) in a temporary
  NANOCHAT_BASE_DIR (or --base_dir, kept). Both runs are real `python -m scripts.base_train`
  subprocesses with identical flags but --objective.
- tok/s is the median of the per-step figures base_train prints, after the first 3 steps. The two
  runs are sequential, so on a shared machine tok/s also measures the other load: the table prints
  the 1-minute load average at the start and end of each run (os.getloadavg).
- The bound averages 4 masking rates per val row, so it is repeatable; it is an upper bound on the
  MDLM's bpb, while the AR figure is exact: a gap in the AR's favour is partly the bound's slack.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile

from nanochat.flags import parse_flags, print_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = dict(
    device_type="cpu",
    depth=4,
    max_seq_len=256,
    device_batch_size=8,
    total_batch_size=2048,
    num_iterations=200,
    eval_tokens=32768,
    vocab_size=4096,
    threads=2,  # OMP_NUM_THREADS of the training runs
    base_dir="",  # default: a temporary directory
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
print_flags(cfg, DEFAULTS)


def run(env, module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"bench.objectives: {module} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def measure(stdout):
    """(final val bpb or bound, median tok/s after the first 3 steps, FLOPs/token, greedy samples)."""
    bpb = float(re.findall(r"step \d+ \| val bpb (?:bound )?([\d.]+)", stdout)[-1])
    rates = [int(r.replace(",", "")) for r in re.findall(r"tok/s ([\d,]+)", stdout)]
    flops = float(re.search(r"([\d.e+]+) FLOPs/token", stdout).group(1))
    samples = re.findall(r"^  ('.*'|\".*\")$", stdout, flags=re.M)
    return bpb, statistics.median(rates[3:] or rates), flops, samples


with tempfile.TemporaryDirectory() as tmp:
    base_dir = cfg.base_dir or tmp
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, WANDB_MODE="disabled", OMP_NUM_THREADS=str(cfg.threads),
               NANOCHAT_PRETRAIN_DIR=os.path.join(REPO_ROOT, "dev", "cpu_sample", "pretrain"))
    run(env, "scripts.tok_train", "--max_chars=10000000", f"--vocab_size={cfg.vocab_size}")
    common = [f"--device_type={cfg.device_type}", f"--depth={cfg.depth}", f"--max_seq_len={cfg.max_seq_len}",
              f"--device_batch_size={cfg.device_batch_size}", f"--total_batch_size={cfg.total_batch_size}",
              f"--num_iterations={cfg.num_iterations}", f"--eval_tokens={cfg.eval_tokens}", "--eval_every=-1",
              "--core_metric_every=-1", f"--sample_every={cfg.num_iterations}"]
    results, loads = {}, {}
    for objective in ("ar", "mdlm"):
        print(f"training --objective={objective} ...", flush=True)
        start = os.getloadavg()[0]
        results[objective] = measure(run(env, "scripts.base_train", *common, f"--objective={objective}",
                                         f"--model_tag={objective}"))
        loads[objective] = f"{start:.1f} / {os.getloadavg()[0]:.1f}"

tokens = cfg.total_batch_size * cfg.num_iterations
print(f"\ndepth {cfg.depth}, seq {cfg.max_seq_len}, vocab {cfg.vocab_size}, {cfg.num_iterations} steps of "
      f"{cfg.total_batch_size:,} tokens = {tokens:,} tokens, on {cfg.device_type}\n")
print("| objective | val bpb | which | FLOPs/token | training FLOPs | tok/s (median) | load avg start / end |")
print("|---|---:|---|---:|---:|---:|---:|")
for objective, (bpb, rate, flops, _) in results.items():
    kind = "exact" if objective == "ar" else "upper bound (ELBO)"
    print(f"| {objective} | {bpb:.4f} | {kind} | {flops:.3e} | {flops * tokens:.3e} | {rate:,.0f} "
          f"| {loads[objective]} |")
for objective, (*_, samples) in results.items():
    print(f"\n{objective} greedy samples:")
    for sample in samples:
        print(f"  {sample}")
