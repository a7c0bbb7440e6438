"""
End-to-end tests of scripts/base_train.py and scripts/base_loss.py, run as real subprocesses
(`python -m scripts.base_train ...`) on the CPU with a tiny model (depth 2, sequences of 64), the
session's tiny tokenizer, and copies of the test pretraining shards in the temporary base dir.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, copy_checkpoint, copy_pretrain_shards

TINY = ["--device_type=cpu", "--depth=2", "--max_seq_len=64", "--device_batch_size=4",
        "--total_batch_size=512",  # 2 accumulation steps
        "--eval_tokens=1024", "--core_metric_every=-1", "--sample_every=-1"]


@pytest.fixture
def pretrain_dir(base_dir_with_tokenizer, pretrain_shards):
    """The base dir with the tiny tokenizer and the test shards (2 train + 1 val)."""
    copy_pretrain_shards(pretrain_shards, base_dir_with_tokenizer)
    return base_dir_with_tokenizer


def run_cmd(cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run(module, *args):
    return run_cmd([sys.executable, "-m", module, *args])


def assert_identical(a, b):
    """Bitwise equality of nested dicts/lists of tensors and plain values (state dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b


def step_lines(stdout):
    """{step: (loss, lrm)} from the per-step log lines."""
    found = re.findall(r"step (\d+)/\d+ .*?\| loss ([\d.]+) \| lrm ([\d.]+)", stdout)
    return {int(s): (loss, lrm) for s, loss, lrm in found}


@pytest.mark.slow
def test_smoke_then_base_loss(pretrain_dir):
    out = run("scripts.base_train", *TINY, "--num_iterations=4", "--eval_every=2", "--sample_every=4",
              "--model_tag=smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = pretrain_dir / "base_checkpoints" / "smoke"
    meta = json.loads((ckpt / "meta_000004.json").read_text())
    assert meta["step"] == 4 and 0 < meta["val_bpb"] < 20
    assert meta["user_config"]["depth"] == 2 and meta["model_config"]["n_layer"] == 2
    assert (ckpt / "model_000004.pt").exists() and (ckpt / "optim_000004_rank0.pt").exists()
    assert sorted(step_lines(out.stdout)) == [1, 2, 3, 4]
    assert "mfu n/a" in out.stdout and "tok/s" in out.stdout and "eta" in out.stdout
    assert "The capital of France is" in out.stdout  # greedy samples at the last step
    assert "min val bpb" in out.stdout and "peak memory" in out.stdout

    loss = run("scripts.base_loss", "--device_type=cpu", "--device_batch_size=2", "--split_tokens=256")
    assert loss.returncode == 0, loss.stderr[-3000:]
    bpbs = dict(re.findall(r"(train|val) bpb: ([\d.]+)", loss.stdout))
    assert set(bpbs) == {"train", "val"} and all(0 < float(v) < 20 for v in bpbs.values())
    assert "The capital of France is" in loss.stdout


@pytest.mark.slow
def test_resume_continues_the_same_trajectory(pretrain_dir):
    flags = [*TINY, "--num_iterations=6", "--eval_every=3", "--warmdown_ratio=0.5"]
    straight = run("scripts.base_train", *flags, "--save_every=3", "--model_tag=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # a run that stopped right after saving step 3: its checkpoint, continued by a new process
    root = pretrain_dir / "base_checkpoints"
    copy_checkpoint(root / "straight", root / "resumed", 3)
    resumed = run("scripts.base_train", *flags, "--model_tag=resumed", "--resume_from_step=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 3" in resumed.stdout

    for name in ("model_000006.pt", "optim_000006_rank0.pt"):  # weights and optimiser state, bitwise
        assert_identical(torch.load(root / "straight" / name), torch.load(root / "resumed" / name))
    ma, mb = (json.loads((root / t / "meta_000006.json").read_text()) for t in ("straight", "resumed"))
    assert ma["val_bpb"] == mb["val_bpb"] and ma["dataloader_state"] == mb["dataloader_state"]
    for key in ("smooth_train_loss", "min_val_bpb", "val_bpb"):
        assert ma["loop_state"][key] == mb["loop_state"][key]
    la, lb = step_lines(straight.stdout), step_lines(resumed.stdout)
    assert sorted(lb) == [4, 5, 6] and all(la[s] == lb[s] for s in (4, 5, 6))

    other_model = run("scripts.base_train", *flags, "--depth=3", "--model_tag=resumed", "--resume_from_step=3")
    assert other_model.returncode == 1 and "resume with the flags it was trained with" in other_model.stderr


@pytest.mark.slow
def test_loss_decreases_on_real_text(pretrain_dir):
    out = run("scripts.base_train", "--device_type=cpu", "--depth=2", "--max_seq_len=64", "--device_batch_size=4",
              "--total_batch_size=256", "--num_iterations=100", "--eval_every=50", "--eval_tokens=4096",
              "--core_metric_every=-1", "--sample_every=-1", "--model_tag=learn")
    assert out.returncode == 0, out.stderr[-3000:]
    bpbs = [float(v) for v in re.findall(r"val bpb ([\d.]+)", out.stdout)]
    assert len(bpbs) == 3  # steps 0, 50, 100
    assert bpbs[2] < bpbs[1] < bpbs[0]
    assert bpbs[2] < 0.75 * bpbs[0], bpbs
    losses = step_lines(out.stdout)
    assert float(losses[100][0]) < float(losses[10][0]) - 0.5


def test_batch_sizes_that_do_not_divide_are_a_clear_error():
    out = run("scripts.base_train", *TINY, "--total_batch_size=500")
    assert out.returncode == 1
    assert "--total_batch_size=500 must be a multiple of" in out.stderr and "= 256" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_flag_is_an_error():
    out = run("scripts.base_train", "--dpeth=2")
    assert out.returncode == 1
    assert "unknown flag --dpeth" in out.stderr and "--depth" in out.stderr


@pytest.mark.slow
def test_two_ranks_save_their_shards_and_resume_exactly(pretrain_dir):
    """Under torchrun (2 CPU ranks, gloo): every rank saves its optimiser shard and its loader
    position, and a 2-rank resume continues the 2-rank run exactly."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = [*TINY, "--total_batch_size=1024", "--num_iterations=4", "--eval_every=2"]
    straight = run_cmd([*torchrun, "-m", "scripts.base_train", "--", *flags, "--save_every=2", "--model_tag=ddp"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    root = pretrain_dir / "base_checkpoints"
    meta = json.loads((root / "ddp" / "meta_000004.json").read_text())
    assert meta["world_size"] == 2 and [s["rank"] for s in meta["dataloader_state"]] == [0, 1]
    assert (root / "ddp" / "optim_000004_rank1.pt").exists()
    copy_checkpoint(root / "ddp", root / "ddp_resumed", 2)
    resumed = run_cmd([*torchrun, "-m", "scripts.base_train", "--", *flags, "--model_tag=ddp_resumed",
                       "--resume_from_step=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model_000004.pt", "optim_000004_rank0.pt", "optim_000004_rank1.pt"):
        assert_identical(torch.load(root / "ddp" / name), torch.load(root / "ddp_resumed" / name))
    one_rank = run("scripts.base_train", *flags, "--model_tag=ddp", "--resume_from_step=2")
    assert one_rank.returncode == 1 and "saved by 2 rank(s)" in one_rank.stderr
