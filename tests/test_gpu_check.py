"""
dev/gpu_check.sh, the GPU acceptance check, without a GPU: the dry run lists every step, and a
plain run on a machine without CUDA says so and exits 0. (The steps themselves are rehearsed at
toy sizes by `bash dev/gpu_check.sh --device=cpu --quick`, a few minutes: not run here.)
"""

import os
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
        for step in ("train_bf16", "train_fp32emb", "decode", "engine"):
            assert f"  {step} (limit" in result.stdout
        assert "--fp32_embedding=1" in result.stdout and "-m bench.decode" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_and_exits_0():
    result = run("--quick")
    assert result.returncode == 0 and "no CUDA GPU" in result.stdout


def test_unknown_argument_is_one_clear_line():
    result = run("--qiuck")
    assert result.returncode == 2 and "unknown argument '--qiuck'" in result.stdout
