"""
The bundled sample (dev/cpu_sample) works for multi-process training too: its shards hold enough
row groups for every rank of up to 8 (each rank reads every world_size-th row group), and a real
`torchrun --standalone --nproc_per_node=2 -m scripts.base_train` trains on it.
"""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT

SAMPLE_SHARDS = sorted((REPO_ROOT / "dev" / "cpu_sample" / "pretrain").glob("*.parquet"))


def test_every_sample_shard_has_a_row_group_for_each_of_8_ranks():
    assert len(SAMPLE_SHARDS) == 2  # train, val (the last)
    for shard in SAMPLE_SHARDS:
        assert pq.ParquetFile(shard).num_row_groups >= 8, f"{shard.name}: re-run dev/make_cpu_sample.py"


@pytest.mark.slow
def test_torchrun_two_processes_train_on_the_bundled_sample(base_dir_with_tokenizer):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "NANOCHAT_PRETRAIN_DIR": str(SAMPLE_SHARDS[0].parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.base_train", "--", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
           "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=2", "--eval_tokens=1024",
           "--core_metric_every=-1", "--sample_every=-1"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "min val bpb" in proc.stdout
    assert proc.stdout.count("min val bpb") == 1  # printed by rank 0 only
    assert (base_dir_with_tokenizer / "base_checkpoints" / "d2" / "optim_000002_rank1.pt").exists()


# -----------------------------------------------------------------------------
# An error that stops a 2-process run is printed once, and torchrun's summary ends with it


def run_two_ranks(base_dir, pretrain_dir, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "NANOCHAT_BASE_DIR": str(base_dir),
           "NANOCHAT_PRETRAIN_DIR": str(pretrain_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.base_train", "--", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
           "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=2", *flags]
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def damage_val_shard(base_dir, tmp_path):
    import shutil
    data = tmp_path / "damaged_sample"
    shutil.copytree(SAMPLE_SHARDS[0].parent, data)
    val = sorted(data.glob("*.parquet"))[-1]
    val.write_bytes(val.read_bytes()[:1000])
    return data, val.name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown flag", "no tokenizer", "damaged val shard"])
def test_an_error_under_torchrun_is_printed_once_and_named_in_the_summary(case, base_dir, tiny_tokenizer_dir,
                                                                            tmp_path):
    import re
    import shutil
    pretrain_dir, flags, expected = SAMPLE_SHARDS[0].parent, [], None
    if case != "no tokenizer":
        shutil.copytree(tiny_tokenizer_dir, base_dir / "tokenizer")
    if case == "unknown flag":
        flags, expected = ["--bogus=1"], "unknown flag --bogus"
    elif case == "no tokenizer":
        expected = "no tokenizer at"
    else:
        pretrain_dir, name = damage_val_shard(base_dir, tmp_path)
        expected = name
    proc = run_two_ranks(base_dir, pretrain_dir, *flags)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if expected in line]
    printed = [line for line in said if "traceback :" not in line]  # not torchrun's summary
    assert len(printed) == 1, proc.stderr[-4000:]
    root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
    assert re.search(r"traceback : .*" + re.escape(expected), root_cause), root_cause
    assert "To enable traceback" not in proc.stderr
    assert "Connection closed by peer" not in proc.stderr  # found before the process group is used
