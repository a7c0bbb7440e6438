"""
End-to-end tests of scripts/tok_train.py and scripts/tok_eval.py, run as real subprocesses on a
temporary base dir holding copies of the test pretraining shards (2 train + 1 val). tok_eval runs
offline: GPT-2/GPT-4 cannot be downloaded, so it must say so and still print the table, also when
the network hangs instead of failing (a local proxy that accepts connections and never answers).
"""

import os
import re
import runpy
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO_ROOT, copy_pretrain_shards
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer


@pytest.fixture
def data_dir(base_dir, pretrain_shards):
    return copy_pretrain_shards(pretrain_shards, base_dir)


def run(module, *args, env_extra=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_tok_train_writes_a_working_tokenizer(base_dir, data_dir):
    proc = run("scripts.tok_train", "--max_chars=300000", "--vocab_size=1024", "--doc_cap=2000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"trained on ([\d,]+) documents, ([\d,]+) characters in ([\d.]+)s", proc.stdout)
    assert m, proc.stdout
    docs, chars = (int(g.replace(",", "")) for g in m.groups()[:2])
    assert 300_000 <= chars < 300_000 + 2000 and docs >= 150  # capped docs, stopped at max_chars
    assert "round trip ok" in proc.stdout

    tok_dir = base_dir / "tokenizer"
    assert sorted(os.listdir(tok_dir)) == ["token_bytes.pt", "tokenizer.pkl", "training.json"]
    tokenizer = RustBPETokenizer.from_directory(str(tok_dir))
    assert tokenizer.get_vocab_size() == 1024
    assert tokenizer.encode_special("<|output_end|>") == 1023
    token_bytes = torch.load(tok_dir / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (1024,)
    assert (token_bytes == 0).sum() == len(SPECIAL_TOKENS) and token_bytes[-len(SPECIAL_TOKENS):].eq(0).all()
    text = "The cell membrane regulates transport; ATP powers 2 pumps. 细胞膜 🧬"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(text.encode()) == int(token_bytes[tokenizer.encode(text)].sum())

    report = (base_dir / "report").glob("*.md")
    assert any("Tokenizer training" in p.read_text() for p in report)

    # Same settings again: reused, not retrained (pipelines re-run cheaply); --force retrains.
    mtime = os.path.getmtime(tok_dir / "tokenizer.pkl")
    again = run("scripts.tok_train", "--max_chars=300000", "--vocab_size=1024", "--doc_cap=2000")
    assert again.returncode == 0 and "reusing it" in again.stdout, again.stdout + again.stderr
    assert os.path.getmtime(tok_dir / "tokenizer.pkl") == mtime


def run_in_process(module, *args, monkeypatch):
    """Run a script in this process (errors before any real work need no new interpreter)."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    runpy.run_module(module, run_name="__main__")


def test_tok_train_bad_flags_and_missing_data(base_dir, monkeypatch):
    with pytest.raises(SystemExit, match="--vocab_size must be at least 265"):
        run_in_process("scripts.tok_train", "--vocab_size=100", monkeypatch=monkeypatch)
    with pytest.raises(SystemExit, match="unknown flag --max_char"):
        run_in_process("scripts.tok_train", "--max_char=5", monkeypatch=monkeypatch)
    with pytest.raises(SystemExit, match="python -m nanochat.dataset"):  # no shards in the base dir
        run_in_process("scripts.tok_train", "--max_chars=1000", monkeypatch=monkeypatch)
    assert not (base_dir / "tokenizer").exists()


@pytest.fixture
def hanging_proxy():
    """An HTTP(S) proxy on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("network", ["unreachable", pytest.param("hanging", marks=pytest.mark.slow)])
def test_tok_eval_offline_prints_our_table_and_a_note(base_dir_with_tokenizer, data_dir, tmp_path, network,
                                                      request):
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken_cache")}  # an empty cache: tiktoken must download
    if network == "hanging":
        proxy = request.getfixturevalue("hanging_proxy")
        env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy, NO_PROXY="")
    t0 = time.time()
    proc = run("scripts.tok_eval", "--reference_timeout=1", env_extra=env)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ["news", "korean", "code", "math", "science", "fwe-train", "fwe-val"]:
        row = re.search(rf"^\| {name} \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|$", out, re.M)
        assert row, f"no row for {name} in:\n{out}"
        num_bytes, num_tokens, ratio = (float(g.replace(",", "")) for g in row.groups())
        assert ratio == pytest.approx(num_bytes / num_tokens, abs=0.006)
        assert 1.0 <= ratio < 8.0
    notes = [line for line in out.splitlines() if "left out" in line]
    assert len(notes) == 1 and "gpt2 and gpt4" in notes[0] and "network" in notes[0]
    assert "Error" not in out.replace(notes[0], "") and len(notes[0]) < 200
    assert "gpt2 tokens" not in out
    if network == "hanging":
        assert "no answer within 1s" in out
        assert elapsed < 60  # two 1 s waits plus start-up (slow on busy shared cores), not a hang
    report = [p.read_text() for p in (base_dir_with_tokenizer / "report").glob("*.md")]
    assert any("Tokenizer evaluation" in text for text in report)
    assert not any("left out" in text or "Error" in text or "network" in text for text in report)
