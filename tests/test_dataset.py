"""
Tests for nanochat/dataset.py against a real HTTP server on 127.0.0.1 that serves copies of the
test pretraining shards, and can misbehave on purpose (tests/misbehaving_server.py): HTTP 500, a
body cut short of its Content-Length, garbage bytes that are not parquet, garbage in the middle of
a shard whose footer is intact, an endless body, a trickle; and Ctrl-C sent to the real CLI in the
middle of its downloads.
"""

import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, copy_pretrain_shards
from misbehaving_server import MisbehavingServer, interrupt_mid_download
from nanochat import dataset


@pytest.fixture
def server(tmp_path, pretrain_shards, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    for src in sorted(pretrain_shards.glob("shard_*.parquet")):
        shutil.copy(src, root / src.name)
    with MisbehavingServer(root) as s:
        monkeypatch.setenv("NANOCHAT_DATASET_URL", s.url)
        monkeypatch.setenv("NANOCHAT_DOWNLOAD_BACKOFF", "0.01")
        yield s


def _leftovers(data_dir):
    """Anything in data_dir that is not a complete shard (temp files, partial downloads)."""
    return [f for f in os.listdir(data_dir) if not f.endswith(".parquet")]


def test_download_is_byte_identical(server, base_dir):
    assert dataset.download_shards(3, workers=2) == []
    data_dir = base_dir / "base_data"
    for i in range(3):
        name = dataset.shard_filename(i)
        assert (data_dir / name).read_bytes() == open(os.path.join(server.root, name), "rb").read()
    assert _leftovers(data_dir) == []
    assert dataset.get_data_dir() == str(data_dir)  # follows $NANOCHAT_BASE_DIR


def test_existing_files_are_skipped(server, base_dir):
    data_dir = base_dir / "base_data"
    data_dir.mkdir()
    # A different (valid) file in place of shard 0: it must be neither requested nor replaced.
    shutil.copy(os.path.join(server.root, "shard_00002.parquet"), data_dir / "shard_00000.parquet")
    assert dataset.download_shards(2, workers=2) == []
    assert "shard_00000.parquet" not in server.requests
    assert server.requests == ["shard_00001.parquet"]
    assert (data_dir / "shard_00000.parquet").read_bytes() == open(os.path.join(server.root, "shard_00002.parquet"), "rb").read()


def test_flaky_server_retries_and_keeps_nothing_bad(server, base_dir):
    server.plan = {"shard_00000.parquet": ["500", "500"],
                   "shard_00001.parquet": ["truncate"],
                   "shard_00002.parquet": ["garbage", "corrupt_middle", "truncate"]}
    assert dataset.download_shards(3, workers=3) == []
    data_dir = base_dir / "base_data"
    assert _leftovers(data_dir) == []
    assert server.requests.count("shard_00000.parquet") == 3
    assert server.requests.count("shard_00001.parquet") == 2
    assert server.requests.count("shard_00002.parquet") == 4
    for i in range(3):
        name = dataset.shard_filename(i)
        assert (data_dir / name).read_bytes() == open(os.path.join(server.root, name), "rb").read()


@pytest.mark.parametrize("behaviour", ["500", "garbage", "truncate", "corrupt_middle"])
def test_permanent_failure_leaves_no_file(server, base_dir, behaviour):
    server.plan = {"shard_00001.parquet": [behaviour] * 6}
    assert dataset.download_shards(3, workers=2, attempts=5) == [1]
    data_dir = base_dir / "base_data"
    assert sorted(os.listdir(data_dir)) == ["shard_00000.parquet", "shard_00002.parquet"]
    assert server.requests.count("shard_00001.parquet") == 5
    with pytest.raises(RuntimeError, match="shard_00001.parquet"):
        dataset.download_shard(1, attempts=1)  # nothing left over: it is fetched again and fails
    assert not (data_dir / "shard_00001.parquet").exists()


def test_cli_downloads_and_reports_failures(server, base_dir):
    env = dict(os.environ)
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], cwd=REPO_ROOT,
                                       env=env, capture_output=True, text=True, timeout=60)
    server.plan = {"shard_00001.parquet": ["500"] * 5}
    bad = run("-n", "2", "-w", "2")
    assert bad.returncode == 1
    assert "shard_00001.parquet" in bad.stderr and "could not be downloaded" in bad.stderr
    good = run("-n", "2")
    assert good.returncode == 0, good.stderr
    assert sorted(os.listdir(base_dir / "base_data")) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert "1 of 2 shards already" in good.stdout
    with pytest.raises(ValueError, match="-n must be between 1 and 1823"):
        dataset.download_shards(5000)  # more shards than exist (the CLI turns it into a usage error)


def test_endless_and_trickling_shards_fail_with_one_clear_line(server, base_dir, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_MAX_MB", "5")  # shards here are < 1 MB
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_DEADLINE", "1.5")
    server.plan = {"shard_00000.parquet": ["endless"], "shard_00001.parquet": ["trickle"]}
    t0 = time.monotonic()
    assert dataset.download_shards(3, workers=3) == [0, 1]
    assert time.monotonic() - t0 < 10
    assert sorted(os.listdir(base_dir / "base_data")) == ["shard_00002.parquet"]
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("FAILED shard_00000.parquet: shard_00000.parquet: ") and "more than the 5 MB cap" in line
               for line in lines)
    assert any(line.startswith("FAILED shard_00001.parquet: ") and "deadline of 1.5 s" in line for line in lines)
    assert server.requests.count("shard_00000.parquet") == 1  # neither is retried
    assert server.requests.count("shard_00001.parquet") == 1


def test_ctrl_c_stops_the_cli_within_a_second_and_keeps_no_partial_file(server, base_dir):
    server.trickle_s = 30  # every worker blocks in a read until its socket is shut down
    server.plan = {dataset.shard_filename(i): ["trickle"] for i in range(3)}
    data_dir = base_dir / "base_data"
    elapsed, status, stderr = interrupt_mid_download(
        ["-m", "nanochat.dataset", "-n", "3", "-w", "3"], REPO_ROOT,
        started=lambda: data_dir.is_dir() and len(_leftovers(data_dir)) == 3)
    assert status == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert elapsed < 1, elapsed
    assert os.listdir(data_dir) == []


def test_splits_and_rank_striding(pretrain_shards, base_dir):
    data_dir = copy_pretrain_shards(pretrain_shards, base_dir)
    (data_dir / "shard_00003.parquet.tmp123").write_bytes(b"partial")  # ignored
    files = dataset.list_parquet_files()
    assert [os.path.basename(f) for f in files] == [f"shard_0000{i}.parquet" for i in range(3)]

    # val = the last shard, whole; train = the others, in order
    val = list(dataset.parquets_iter_batched("val"))
    pf = pq.ParquetFile(files[-1])
    assert val == [pf.read_row_group(i).column("text").to_pylist() for i in range(pf.num_row_groups)]
    assert [len(t) for t in val] == [384, 128]
    train = list(dataset.iter_row_groups("train"))
    assert [(s, r) for s, r, _ in train] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]

    # every row group read by exactly one rank, and shares differ by at most one row group
    for world in (1, 2, 4, 5, 7):
        seen = [[(s, r) for s, r, _ in dataset.iter_row_groups("train", rank, world)] for rank in range(world)]
        flat = [x for per_rank in seen for x in per_rank]
        assert sorted(flat) == [(s, r) for s, r, _ in train]
        assert max(map(len, seen)) - min(map(len, seen)) <= 1
    # resuming skips exactly the row groups before the given position
    assert [(s, r) for s, r, _ in dataset.iter_row_groups("train", 1, 2, resume_from=(1, 0))] == [(1, 0), (1, 2)]


def test_missing_shards_error_names_the_command(pretrain_shards, base_dir):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        next(dataset.parquets_iter_batched("train"))
    (base_dir / "base_data").mkdir()
    shutil.copy(pretrain_shards / "shard_00000.parquet", base_dir / "base_data")
    with pytest.raises(FileNotFoundError, match="-n 2"):
        next(dataset.parquets_iter_batched("val"))


def test_pretrain_dir_override_points_the_loaders_elsewhere(monkeypatch, sample_data):
    sample = sample_data / "pretrain"  # the CPU preset's 2 shards, read in place
    monkeypatch.setenv("NANOCHAT_PRETRAIN_DIR", str(sample))
    assert dataset.get_data_dir() == str(sample)
    assert [os.path.basename(f) for f in dataset.split_files("train")] == ["shard_00000.parquet"]
    assert [os.path.basename(f) for f in dataset.split_files("val")] == ["shard_00001.parquet"]
    assert sum(len(texts) for texts in dataset.parquets_iter_batched("val")) == 512
