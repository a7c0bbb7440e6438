"""
Tests for nanochat/download.py against a real HTTP server on 127.0.0.1 that misbehaves
(tests/misbehaving_server.py): a file is kept only when it is complete, decodes and matches the
published sha256; an endless body stops at the size cap, a trickle at the deadline, each with one
clear line; a dropped connection is retried; a cancel event (another thread) and Ctrl-C (a real
subprocess that gets SIGINT) stop a download within a second and leave no temp file. The task
data downloads (tasks/common.py) follow the same rules. Shards: test_dataset.py; the CORE
bundle: test_core_eval.py.
"""

import hashlib
import json
import os
import shutil
import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT
from misbehaving_server import MisbehavingServer, interrupt_mid_download, wait_for
from nanochat.download import DownloadCancelled, DownloadError, check_parquet, download_file, fetch_bytes

NAME = "shard_00002.parquet"  # the smallest test shard (~0.5 MB, 2 row groups)


@pytest.fixture
def server(tmp_path, pretrain_shards, monkeypatch):
    root = tmp_path / "served"
    root.mkdir()
    shutil.copy(pretrain_shards / NAME, root / NAME)
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_BACKOFF", "0.01")
    with MisbehavingServer(root, trickle_s=0.5) as s:
        s.body = (root / NAME).read_bytes()
        yield s


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


def get(server, out, **kwargs):
    return download_file(f"{server.url}/{NAME}", str(out / NAME), validate=check_parquet, **kwargs)


def test_good_file_and_retried_failures(server, out):
    server.plan = {NAME: ["500", "truncate", "garbage", "corrupt_middle"]}  # then served whole
    assert get(server, out) == str(out / NAME)
    assert (out / NAME).read_bytes() == server.body and os.listdir(out) == [NAME]
    assert server.requests == [NAME] * 5


def test_garbage_in_the_middle_with_an_intact_footer_is_never_kept(server, out, tmp_path):
    # The damaged file still opens as parquet (its footer is fine): only decoding finds it.
    middle = len(server.body) // 2
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(server.body[:middle] + os.urandom(4096) + server.body[middle + 4096:])
    assert pq.ParquetFile(damaged).metadata.num_rows == 512
    with pytest.raises(Exception):
        check_parquet(str(damaged))
    server.plan = {NAME: ["corrupt_middle"] * 3}
    with pytest.raises(DownloadError, match=rf"^{NAME}: could not download .* after 3 attempts"):
        get(server, out, attempts=3)
    assert os.listdir(out) == []


def test_published_sha256_is_checked(server, out):
    server.sha256[NAME] = hashlib.sha256(server.body).hexdigest()
    server.plan = {NAME: ["redirect"]}
    get(server, out)  # followed the redirect; the checksum matched
    assert (out / NAME).read_bytes() == server.body and server.requests == [NAME, NAME]
    os.remove(out / NAME)
    server.sha256[NAME] = "0" * 64  # a file that does not match what the source publishes
    server.plan = {NAME: ["redirect"] * 2}
    with pytest.raises(DownloadError, match="differs from the published 0000"):
        get(server, out, attempts=2)
    assert os.listdir(out) == []


def test_endless_body_stops_at_the_size_cap(server, out, monkeypatch):
    server.plan = {NAME: ["endless"]}
    t0 = time.monotonic()
    cap = rf"^{NAME}: .* sends more than the 2 MB cap for one file.*NANOCHAT_DOWNLOAD_MAX_MB=<MB>$"
    with pytest.raises(DownloadError, match=cap):
        get(server, out, max_bytes=2_000_000)
    assert time.monotonic() - t0 < 10 and server.requests == [NAME]  # not retried
    assert os.listdir(out) == []
    # the environment overrides the caller's cap; a Content-Length over the cap stops before the body
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_MAX_MB", "0.1")
    with pytest.raises(DownloadError, match=r"announces [\d,]+ bytes, more than the 0.1 MB cap"):
        get(server, out, max_bytes=10**9)
    assert os.listdir(out) == []


def test_trickle_stops_at_the_deadline(server, out, monkeypatch):
    server.plan = {NAME: ["trickle"]}
    t0 = time.monotonic()
    late = rf"^{NAME}: .* did not finish within its deadline of 1.5 s .*NANOCHAT_DOWNLOAD_DEADLINE=<seconds>$"
    with pytest.raises(DownloadError, match=late):
        get(server, out, deadline=1.5)
    assert 1.4 < time.monotonic() - t0 < 3 and os.listdir(out) == []
    # one deadline for all attempts together: failures that are retried cannot extend it
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_DEADLINE", "1")
    server.plan = {NAME: ["truncate", "trickle", "trickle"]}
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="deadline of 1 s"):
        get(server, out, deadline=100)
    assert time.monotonic() - t0 < 2.5 and os.listdir(out) == []


def test_http_404_is_not_retried(server, out):
    server.plan = {NAME: ["404"]}
    with pytest.raises(DownloadError, match=rf"^{NAME}: HTTP 404 Not Found for .*; check the URL"):
        get(server, out)
    assert server.requests == [NAME] and os.listdir(out) == []


def test_cancel_from_another_thread_stops_a_blocked_read(server, out):
    server.trickle_s = 30  # the read blocks for 30 s unless its socket is shut down
    server.plan = {NAME: ["trickle"]}
    cancel, raised = threading.Event(), []

    def worker():
        try:
            get(server, out, cancel=cancel)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    wait_for(lambda: os.listdir(out), what="the temp file")
    time.sleep(0.3)
    t0 = time.monotonic()
    cancel.set()
    thread.join(5)
    assert time.monotonic() - t0 < 1 and not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], DownloadCancelled)
    assert os.listdir(out) == []


def test_ctrl_c_stops_within_a_second_and_removes_the_temp_file(server, out):
    server.trickle_s = 30
    server.plan = {NAME: ["trickle"]}
    code = ("import sys; from nanochat.download import download_file\n"
            f"download_file({server.url + '/' + NAME!r}, {str(out / NAME)!r})")
    elapsed, status, stderr = interrupt_mid_download(["-c", code], REPO_ROOT, started=lambda: os.listdir(out))
    assert status != 0 and "KeyboardInterrupt" in stderr
    assert elapsed < 1, elapsed
    assert os.listdir(out) == []


def test_http_proxy_from_the_environment(server, out, monkeypatch):
    """$http_proxy routes the request (the server acts as the proxy for a host that does not
    exist); $no_proxy exempts a host."""
    monkeypatch.setenv("http_proxy", server.url)
    monkeypatch.setenv("no_proxy", "")
    download_file(f"http://no-such-host.invalid/{NAME}", str(out / NAME), validate=check_parquet)
    assert (out / NAME).read_bytes() == server.body
    monkeypatch.setenv("no_proxy", "no-such-host.invalid")
    with pytest.raises(DownloadError, match="could not download http://no-such-host.invalid"):
        download_file(f"http://no-such-host.invalid/{NAME}", str(out / "other.parquet"), attempts=1)


def test_fetch_bytes_small_body_and_cap(server):
    assert fetch_bytes(f"{server.url}/{NAME}", max_bytes=10**6) == server.body
    with pytest.raises(DownloadError, match="more than the 0.001 MB cap"):
        fetch_bytes(f"{server.url}/{NAME}", max_bytes=1000)


def test_task_downloads_follow_the_same_rules(tmp_path, pretrain_shards, base_dir, monkeypatch):
    """tasks/common.py: the Hub listing and its parquet files, served by the misbehaving server
    (the listing is a file at the API's path)."""
    from tasks.common import download_hf_split
    root = tmp_path / "hub"
    listing = root / "api" / "datasets" / "org" / "data" / "parquet" / "main" / "test"
    listing.parent.mkdir(parents=True)
    shutil.copy(pretrain_shards / NAME, root / "a.parquet")
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_BACKOFF", "0.01")
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    with MisbehavingServer(root, trickle_s=0.5) as server:
        listing.write_text(json.dumps([f"{server.url}/a.parquet"]))
        monkeypatch.setenv("NANOCHAT_HF_URL", server.url)
        directory = base_dir / "task_data" / "org__data" / "main" / "test"

        server.plan = {"a.parquet": ["corrupt_middle"] * 5}  # every attempt damaged: nothing kept
        with pytest.raises(DownloadError, match=r"0000.parquet: could not download .*/a.parquet after 5 attempts"):
            download_hf_split("org/data", "main", "test")
        assert sorted(os.listdir(directory)) == [".lock"]

        monkeypatch.setenv("NANOCHAT_DOWNLOAD_DEADLINE", "1")
        server.plan = {"a.parquet": ["trickle"]}
        with pytest.raises(DownloadError, match="deadline of 1 s"):
            download_hf_split("org/data", "main", "test")
        assert sorted(os.listdir(directory)) == [".lock"]
        monkeypatch.delenv("NANOCHAT_DOWNLOAD_DEADLINE")

        server.plan = {"a.parquet": ["corrupt_middle", "truncate"]}  # then whole
        paths = download_hf_split("org/data", "main", "test")
        assert [open(p, "rb").read() for p in paths] == [(root / "a.parquet").read_bytes()]
        assert sorted(os.listdir(directory)) == [".lock", "0000.parquet", "files.json"]

        (listing.parent / "big").write_bytes(b"[" + b" " * 2_000_000 + b"]")  # a listing is small: 1 MB cap
        with pytest.raises(RuntimeError, match="could not list the parquet files .*more than the 1 MB cap"):
            download_hf_split("org/data", "main", "big")
