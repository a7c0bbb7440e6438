"""
wandb as a new user meets it: `--run=<name>` with no account and no terminal logs a real run offline
(one line says where and how to upload it), never a prompt or a traceback. The run directory is read
back with a small reader of wandb's own file format (a LevelDB-style log of protobuf records), so the
test checks what wandb actually stored, not what we meant to send.
"""

import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, copy_pretrain_shards

wandb = pytest.importorskip("wandb", reason="wandb is installed by dev/setup.sh")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32 * 1024  # LevelDB log blocks; a record header is crc32 (4) + length (2) + type (1)


def read_wandb_records(path):
    """Every protobuf Record in a run-<id>.wandb file, in order."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    records, fragments, pos = [], b"", 7  # 7-byte file header: ':W&B', magic (2), version (1)
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left_in_block
            continue
        fragments += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragments)
            records.append(record)
            fragments = b""
    return records


def history_rows(path):
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def clean_env(home):
    """No API key, no chosen mode, a home with no netrc: a stranger's machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    env.pop("NETRC", None)
    return env


@pytest.mark.slow
def test_base_train_logs_a_real_offline_run_without_an_account(base_dir_with_tokenizer, pretrain_shards, tmp_path):
    copy_pretrain_shards(pretrain_shards, base_dir_with_tokenizer)
    cmd = [sys.executable, "-m", "scripts.base_train", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
           "--device_batch_size=4", "--total_batch_size=256", "--eval_tokens=512", "--eval_every=2",
           "--core_metric_every=-1", "--sample_every=-1", "--num_iterations=3", "--run=stranger"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(tmp_path / "home"), capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("wandb:")]
    assert len(lines) == 1 and "logged offline" in lines[0] and "wandb sync" in lines[0], out.stdout[-2000:]

    run_root = base_dir_with_tokenizer / "wandb"  # under the base dir, not the working directory
    runs = sorted(run_root.glob("offline-run-*"))
    assert len(runs) == 1 and str(runs[0]) in lines[0]
    assert not (REPO_ROOT / "wandb").exists() or (REPO_ROOT / "wandb").stat().st_mtime < runs[0].stat().st_mtime
    rows = history_rows(next(runs[0].glob("run-*.wandb")))
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert {"train/loss", "train/lrm", "train/dt", "train/tok_per_sec"} <= set(train[0])
    assert [r["step"] for r in rows if "val/bpb" in r] == [0, 2, 3]
    run_records = [r.run for r in read_wandb_records(next(runs[0].glob("run-*.wandb")))
                   if r.WhichOneof("record_type") == "run"]
    assert run_records and {"depth", "num_iterations"} <= {item.key for item in run_records[0].config.update}


def test_wandb_mode_and_dir_are_respected(tmp_path):
    """$WANDB_MODE=offline (chosen by the user) prints no fallback line; $WANDB_DIR moves the run."""
    code = ("from nanochat.common import get_wandb\n"
            "run = get_wandb('mine', 'nanochat', {'depth': 2}, master_process=True)\n"
            "run.log({'step': 0, 'train/loss': 1.5}); run.finish()\n")
    env = dict(clean_env(tmp_path / "home"), WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wd"),
               NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no API key" not in out.stdout
    runs = list((tmp_path / "wd" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = history_rows(next(runs[0].glob("run-*.wandb")))
    assert len(rows) == 1 and rows[0]["step"] == 0 and rows[0]["train/loss"] == 1.5
