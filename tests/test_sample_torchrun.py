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
