"""
dev/gpu_check.sh, the GPU acceptance check, without a GPU: the dry run lists every step, and a
plain run on a machine without CUDA says so and exits 0. The training and serving checks are
rehearsed for real at toy sizes on the CPU (slow); the whole rehearsal is
`bash dev/gpu_check.sh --device=cpu --quick`, a few minutes.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", "dev/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_lists_every_step():
    for args in ((), ("--quick",), ("--device=cpu", "--quick")):
        result = run("--dry-run", *args)
        assert result.returncode == 0, result.stderr
        for step in ("train_bf16", "train_fp32emb", "decode", "engine", "compile", "ranks", "serve"):
            assert f"  {step} (limit" in result.stdout
        assert "--fp32_embedding=1" in result.stdout and "-m bench.decode" in result.stdout
        assert "-m dev.gpu_serve_check" in result.stdout and "--check=compile" in result.stdout
        if "--device=cpu" in args:  # the rehearsal splits over two CPU processes
            assert "torch.distributed.run --standalone --nproc_per_node=2" in result.stdout
        elif not torch.cuda.is_available():  # nothing to split: the step says so and is counted SKIP
            assert "nothing to split'; exit 77" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_and_exits_0():
    result = run("--quick")
    assert result.returncode == 0 and "no CUDA GPU" in result.stdout


def test_unknown_argument_is_one_clear_line():
    result = run("--qiuck")
    assert result.returncode == 2 and "unknown argument '--qiuck'" in result.stdout


@pytest.mark.slow
def test_cpu_rehearsal_of_the_training_and_serving_checks(tmp_path):
    """ranks (torchrun 2 ranks = 1 process) and serve (chat_web under 16 concurrent streams) really
    run at toy sizes on the CPU and pass (~30 s). (compile, ~40 s of torch.compile on the CPU, is
    left to the full rehearsal.)"""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_LOGS=str(tmp_path))
    result = subprocess.run(["bash", "dev/gpu_check.sh", "--device=cpu", "--quick", "--only=ranks,serve"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = result.stdout[result.stdout.index("=== gpu_check summary"):]
    for step in ("ranks", "serve"):
        assert re.search(rf"^{step}\s+PASS\b", summary, re.M), result.stdout[-4000:]
    ranks = json.loads(next(line for line in (tmp_path / "ranks.log").read_text().splitlines()
                            if line.startswith('{"check": "ranks", "device": "cpu", "world_size": 1')))
    assert ranks["ok"] and ranks["ranks"] == 2 and ranks["worst_relative_diff"] < ranks["tolerance"]
