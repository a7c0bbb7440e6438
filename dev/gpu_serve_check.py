"""
The serving check for dev/gpu_check.sh: scripts.chat_web with one model replica per GPU, under
concurrent requests.

    python -m dev.gpu_serve_check --device=cuda --gpus=8 --requests=16

It writes a throw-away base dir (a byte-level tokenizer and a small random-weight model saved as an
SFT checkpoint: no dataset, no trained tokenizer), starts `python -m scripts.chat_web -i sft -n GPUS
-p 0` on it, sends REQUESTS streaming POST /chat/completions at once, and checks that every stream
ends with its {"done": true} event and that /stats saw every request. Prints one JSON line (requests,
seconds, tokens/s over all streams, the slowest request); exit status 1 on a failure.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.flags import StopRun, parse_flags
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

cfg = parse_flags(dict(device="cuda", gpus=1, requests=16, depth=4, max_tokens=64, start_timeout=300),
                  doc=__doc__)


def write_base_dir(base: str) -> None:
    """A tokenizer and an SFT checkpoint under `base`, as chat_web expects to find them."""
    tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
    tokenizer.save(os.path.join(base, "tokenizer"))
    config = dict(sequence_len=2048, vocab_size=tokenizer.get_vocab_size(), n_layer=cfg.depth,
                  n_head=cfg.depth, n_kv_head=cfg.depth, n_embd=64 * cfg.depth)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    model.to_empty(device="cpu")
    model.init_weights()
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", f"d{cfg.depth}"), 1, model.state_dict(), None,
                    {"model_config": config, "user_config": {}})


def start_server(base: str, log_path: str) -> tuple[subprocess.Popen, str]:
    """chat_web on a free port; (process, its URL) once it prints where it serves."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "-n", str(cfg.gpus),
                                 "--device_type", cfg.device, "-p", "0", "--max_tokens", str(cfg.max_tokens)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + cfg.start_timeout
    while time.time() < deadline and proc.poll() is None:
        with open(log_path, errors="replace") as f:
            if match := re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", f.read()):
                return proc, match.group(1)
        time.sleep(0.5)
    proc.kill()
    with open(log_path, errors="replace") as f:
        raise StopRun(f"gpu_serve_check: chat_web did not start (exit {proc.poll()}); its log:\n{f.read()[-3000:]}")


def one_request(url: str, i: int, results: list) -> None:
    """A streaming chat request; records (tokens streamed, seconds, ended with done, error)."""
    body = json.dumps({"messages": [{"role": "user", "content": f"request {i}: count to ten"}],
                       "temperature": 0.8, "max_tokens": cfg.max_tokens}).encode()
    request = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    start, tokens, done, error = time.time(), 0, False, None
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                tokens += "token" in event
                done = done or event.get("done") is True
                error = error or event.get("error")
    except Exception as e:  # recorded and reported below: one failed request must not hide the others
        error = f"{type(e).__name__}: {e}"
    results[i] = (tokens, time.time() - start, done, error)


def main() -> int:
    base = tempfile.mkdtemp(prefix="gpu_serve_check_")
    proc = None
    try:
        write_base_dir(base)
        proc, url = start_server(base, os.path.join(base, "chat_web.log"))
        results: list = [None] * cfg.requests
        threads = [threading.Thread(target=one_request, args=(url, i, results)) for i in range(cfg.requests)]
        start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - start
        with urllib.request.urlopen(url + "/stats", timeout=30) as response:
            stats = json.load(response)
        failed = [(i, r[3] or "no done event") for i, r in enumerate(results) if not r[2] or r[3]]
        if stats.get("requests_served", 0) < cfg.requests:
            failed.append(("stats", f"/stats counted {stats.get('requests_served')} served, not {cfg.requests}"))
        tokens = sum(r[0] for r in results)
        report = dict(gpus=cfg.gpus, requests=cfg.requests, failed=len(failed), seconds=round(seconds, 2),
                      tokens=tokens, tokens_per_s=round(tokens / seconds, 1),
                      slowest_s=round(max(r[1] for r in results), 2), stats=stats)
        print(json.dumps(report))
        for i, why in failed[:5]:
            print(f"gpu_serve_check: request {i} failed: {why}")
        return 1 if failed else 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
