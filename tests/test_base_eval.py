"""
End-to-end tests of scripts/base_eval.py, run as real subprocesses on the CPU: a tiny GPT checkpoint
(depth 2, 64 wide, context 128, a small real BPE tokenizer) evaluated on the 5-task CORE sample
(dev/cpu_sample/core_sample). The script's numbers must match evaluate_core run in-process on the
same checkpoint, its CSV and report section must hold them, and 2 gloo ranks must give the same
per-task accuracies.
"""

import csv
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from test_core_eval import one_thread, small_bpe  # noqa: F401 (one_thread: an autouse fixture)

MAX_PER_TASK = 12
TAG, STEP = "d2", 7


@pytest.fixture
def checkpoint(base_dir):
    """The base dir with a small BPE tokenizer and a random-init tiny GPT saved as
    base_checkpoints/d2 step 7 (its vocab = the tokenizer's)."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    tokenizer = small_bpe()
    tokenizer.save(str(base_dir / "tokenizer"))
    torch.manual_seed(0)
    config = dict(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                  n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    model.to_empty(device="cpu")
    model.init_weights()
    save_checkpoint(str(base_dir / "base_checkpoints" / TAG), STEP, model.state_dict(), None,
                    {"model_config": config, "user_config": {}})
    return base_dir


def run_base_eval(*args, nproc=0, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("NANOCHAT_EVAL_BUNDLE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    return subprocess.run([*launcher, "-m", "scripts.base_eval", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def parse_table(stdout):
    """{task: (accuracy, centered)} and CORE from the printed table."""
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"^(\w+)\s+([\d.]+)\s+(-?[\d.]+)$", stdout, re.M)}
    core = float(re.search(r"^CORE\s+(-?[\d.]+)$", stdout, re.M).group(1))
    return rows, core


@pytest.mark.slow
def test_base_eval_end_to_end(checkpoint, sample_data):
    bundle = str(sample_data / "core_sample")
    out = run_base_eval("--device_type=cpu", f"--max_per_task={MAX_PER_TASK}", f"--eval_bundle={bundle}",
                        "--device_batch_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    rows, core = parse_table(out.stdout)
    assert sorted(rows) == sorted(["arc_easy", "copa", "lambada_openai", "winograd", "bigbench_operators"])
    assert core == pytest.approx(sum(c for _, c in rows.values()) / 5, abs=1e-4)
    assert re.search(rf"{5 * MAX_PER_TASK} examples in [\d.]+s: [\d.]+ ms per example", out.stdout)

    # the same numbers in-process, straight from the library
    from nanochat.checkpoint_manager import load_model
    from nanochat.core_eval import evaluate_core
    model, tokenizer, _ = load_model("base", "cpu", phase="eval")
    ref = evaluate_core(model, tokenizer, "cpu", max_per_task=MAX_PER_TASK, bundle_dir=bundle, batch_size=16)
    for label, (acc, centered) in rows.items():
        assert acc == pytest.approx(ref["results"][label], abs=1e-4)
        assert centered == pytest.approx(ref["centered_results"][label], abs=1e-4)

    # the CSV and the report section
    with open(checkpoint / "base_eval" / f"{TAG}_{STEP:06d}.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["task"] for r in table][-1] == "CORE" and float(table[-1]["centered"]) == pytest.approx(core, abs=1e-4)
    for r in table[:-1]:
        assert float(r["accuracy"]) == pytest.approx(ref["results"][r["task"]], abs=1e-6)
    section = (checkpoint / "report" / "base-model-evaluation.md").read_text()
    assert f"- CORE: {ref['core_metric']:.4f}" in section and "- step: 7" in section


@pytest.mark.slow
def test_base_eval_errors(tmp_path):
    """Bad flags and a folder that is no bundle fail before any model is loaded."""
    out = run_base_eval("--device_type=cpu", f"--eval_bundle={tmp_path}")
    assert out.returncode != 0 and "core.yaml: missing" in out.stderr
    out = run_base_eval("--device_type=cpu", "--device_batch_size=0")
    assert out.returncode != 0 and "--device_batch_size must be at least 1" in out.stderr


@pytest.mark.slow
def test_two_ranks_same_accuracies(checkpoint, sample_data):
    bundle = str(sample_data / "core_sample")
    args = ["--device_type=cpu", "--max_per_task=12", f"--eval_bundle={bundle}"]
    one, two = run_base_eval(*args), run_base_eval(*args, nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert parse_table(one.stdout) == parse_table(two.stdout)
