"""
Load test of the chat server (scripts/chat_web.py): many concurrent streaming clients, then a flood
of malformed requests, with the server's memory watched throughout. Loopback traffic only.

Run:
    python bench/serve.py                                  # builds a tiny model on CPU and starts chat_web itself
    python bench/serve.py --clients 64 --malformed 1000 --max_tokens 64
    python bench/serve.py --url http://127.0.0.1:8000      # a server you started (then no memory figures)
    python bench/serve.py --base_dir ~/.cache/nanochat --source sft   # start chat_web on your own model

What it measures:
0. One client alone: its time to first token and decode rate (the latency floor).
1. `--clients` simultaneous streaming requests (POST /chat/completions): all must complete with
   {"done": true}; time to first token (p50/p95, including the wait for a free worker: one worker
   serves everyone in turn on CPU), the aggregate tokens/s (the server's tokens_generated counter over
   the wall time) and the per-stream decode rate.
2. `--malformed` randomly malformed requests (broken JSON, wrong types, bad roles, out-of-range
   parameters, oversized fields, invalid Unicode, wrong methods and routes), 16 at a time: the count of
   each status code; there must be no 5xx, and the server must still answer correctly afterwards.
3. The server's resident memory (RSS) after a warm-up, after each phase and after a second round of
   clients: it should stay flat.
4. `--abandoned` non-streaming /v1 requests for long replies, sent on raw sockets that are closed
   once all are in (one generating, the rest queued): how long until the worker is free again, and
   the latency of the next request against the same request on an idle server (ratio ~1: nothing
   of the abandoned work is left).
5. `--slow` connections that send half a request's headers and stop (slowloris), all open at once:
   /health's latency and a normal request's latency while they are open, against the idle figures,
   and how many file descriptors the server holds meanwhile (its connection cap, not the flood).
The tiny model is the one the tests use (tests/test_chat_web.py: 2 layers, 64 wide, a 512-token
tokenizer trained here on the CPU sample text); it answers "sing" with a song that never ends, so every
stream runs to max_tokens.
"""

import argparse
import json
import random
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

# -----------------------------------------------------------------------------
# Flags

parser = argparse.ArgumentParser(description="Load test of scripts/chat_web.py (loopback only).")
parser.add_argument("--url", default=None, help="a running chat_web (default: start one on 127.0.0.1)")
parser.add_argument("--base_dir", default=None, help="serve the model in this base dir (default: build a tiny one)")
parser.add_argument("--source", default="sft", help="with --base_dir: the stage to serve")
parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
parser.add_argument("--malformed", type=int, default=1000, help="malformed requests to send")
parser.add_argument("--max_tokens", type=int, default=64, help="tokens per streamed reply")
parser.add_argument("--prompt", default="sing", help="what the clients ask")
parser.add_argument("--seed", type=int, default=0, help="seed of the malformed-request generator")
parser.add_argument("--abandoned", type=int, default=50, help="non-streaming requests abandoned by their clients")
parser.add_argument("--slow", type=int, default=2000, help="slow (slowloris) connections held open at once")
parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
args = parser.parse_args()
if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
    parser.error(f"--url must be a loopback address (this benchmark floods the server), got {args.url}")

# -----------------------------------------------------------------------------
# The server: given, or started here on a tiny model


def tiny_base_dir() -> Path:
    """A temp base dir with a 512-token tokenizer (trained on the CPU sample) and the tests' tiny chat model."""
    import pyarrow.parquet as pq
    from nanochat.tokenizer import RustBPETokenizer
    from test_chat_web import build_chat_base_dir
    path = Path(tempfile.mkdtemp(prefix="nanochat_bench_serve_"))
    texts = pq.read_table(REPO_ROOT / "dev/cpu_sample/pretrain/shard_00000.parquet").column("text").to_pylist()
    text = "\n\n".join(texts)[:200_000]
    tokenizer_dir = path / "tokenizer_src"
    RustBPETokenizer.train_from_iterator(text.split("\n\n"), 512).save(str(tokenizer_dir))
    return build_chat_base_dir(path / "base", tokenizer_dir)


server_proc, built_dir = None, None
if args.url is None:
    from test_chat_web import run_server
    base_dir = Path(args.base_dir).expanduser() if args.base_dir else tiny_base_dir()
    built_dir = None if args.base_dir else base_dir.parent
    log_dir = Path(tempfile.mkdtemp(prefix="nanochat_bench_logs_"))
    server_context = run_server(base_dir, log_dir, "-i", args.source, "-m", str(args.max_tokens))
    server = server_context.__enter__()
    url, server_proc = server.url, server.proc
    print(f"started chat_web on {url} (log: {log_dir})")
else:
    url = args.url.rstrip("/")


def rss_mb() -> float | None:
    if server_proc is None:
        return None
    import psutil
    return psutil.Process(server_proc.pid).memory_info().rss / 2**20


def stats() -> dict:
    return requests.get(url + "/stats", timeout=30).json()


# -----------------------------------------------------------------------------
# 1. Concurrent streaming clients


def stream_once(body: dict) -> dict:
    t0 = time.perf_counter()
    first, events, done = None, 0, False
    with requests.post(url + "/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "token" in event:
                first = first or time.perf_counter()
                events += 1
            if event.get("error"):
                raise RuntimeError(event["error"])
            done = done or event.get("done", False)
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "total": end - t0, "decode": end - (first or end), "events": events,
            "done": done}


def concurrent_round(n: int) -> dict:
    body = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens,
            "temperature": 0.8}
    before = stats()
    barrier = threading.Barrier(n)

    def client(_):
        barrier.wait()  # all at once
        return stream_once(body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(client, range(n)))
    wall = time.perf_counter() - t0
    tokens = stats()["tokens_generated"] - before["tokens_generated"]
    ttfts = sorted(r["ttft"] for r in results)
    rates = [args.max_tokens / r["decode"] for r in results if r["decode"] > 0]
    return {"clients": n, "completed": sum(r["done"] for r in results), "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(n - 1, int(0.95 * n))], "stream_tokens_per_s_median": statistics.median(rates)}


# -----------------------------------------------------------------------------
# 2. Malformed requests


def malformed_request(rng: random.Random) -> tuple[str, str, bytes]:
    """(method, path, body) of a random bad request."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "sing"}], "temperature": 0.5, "top_k": 10, "max_tokens": 8}
    junk = [None, True, -1, 1e309 if rng.random() < 0.1 else 3.5, "x", "", [], {}, [1, 2], {"a": 1}, 10**30,
            "\ud800", "😀" * 9000, "a" * 40_000]
    body = json.loads(json.dumps(good))
    kind = rng.randrange(12)
    if kind == 0:  # broken JSON
        raw = json.dumps(good).encode()
        return "POST", "/chat/completions", raw[:rng.randrange(len(raw))]
    if kind == 1:  # random bytes
        return "POST", "/chat/completions", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 2:  # a parameter of a wrong type or out of range
        key = rng.choice(["temperature", "top_k", "max_tokens", "seed"])
        body[key] = rng.choice(junk + [-0.5, 2.5, 201, 0, 5000, -3])
    elif kind == 3:  # a bad role
        body["messages"][rng.randrange(3)]["role"] = rng.choice(["system", "tool", "", None, 3, "USER"])
    elif kind == 4:  # bad content
        body["messages"][rng.randrange(3)]["content"] = rng.choice(junk)
    elif kind == 5:  # messages of the wrong shape
        body["messages"] = rng.choice([None, "hi", [], [[]], ["hi"], [{"role": "user"}], {"role": "user"}])
    elif kind == 6:  # too many messages / too many characters
        n = rng.choice([501, 600])
        body["messages"] = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello " * rng.choice([1, 200])}
                            for i in range(n)]
    elif kind == 7:  # an unknown field or a top-level non-object
        body = rng.choice([[good], "hi", 3, None, {**good, "tempratur": 1}])
        return "POST", "/chat/completions", json.dumps(body).encode()
    elif kind == 8:  # deep nesting, NaN, giant numbers
        return "POST", "/chat/completions", rng.choice([b"[" * 50_000, b'{"messages": NaN}',
                                                        b'{"max_tokens": ' + b"9" * 6000 + b"}"])
    elif kind == 9:  # the OpenAI endpoint, same treatment
        body = {**body, "stream": rng.choice(["yes", 1, None, {}]), "n": rng.choice([2, 0, "1"])}
        return "POST", "/v1/chat/completions", json.dumps(body).encode()
    elif kind == 10:  # wrong method or route
        return rng.choice([("GET", "/chat/completions", b""), ("PUT", "/v1/chat/completions", b"{}"),
                           ("POST", "/nope", b"{}"), ("DELETE", "/stats", b"")])
    else:  # the last message from the assistant, or roles out of order
        body["messages"] = rng.choice([body["messages"][:2], body["messages"][::-1]])
    return "POST", rng.choice(["/chat/completions", "/v1/chat/completions"]), json.dumps(body).encode()


def malformed_round(n: int) -> Counter:
    rng = random.Random(args.seed)
    requests_to_send = [malformed_request(rng) for _ in range(n)]
    session_local = threading.local()

    def send(req):
        method, path, data = req
        session = getattr(session_local, "s", None) or requests.Session()
        session_local.s = session
        r = session.request(method, url + path, data=data, timeout=120,
                            headers={"Content-Type": "application/json"})
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        return Counter(pool.map(send, requests_to_send))


# -----------------------------------------------------------------------------
# 4. Abandoned requests and 5. slow connections


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_reply() -> None:
    body = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens, "temperature": 0}
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text


def health() -> None:
    assert requests.get(url + "/health", timeout=60).status_code == 200


def abandoned_round(n: int) -> dict:
    idle = statistics.median(timed(one_reply) for _ in range(3))
    before = stats()
    data = json.dumps({"messages": [{"role": "user", "content": args.prompt}], "max_tokens": 4096}).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    socks = []
    for _ in range(n):
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        socks.append(sock)
    deadline = time.time() + 60
    while (s := stats())["requests_waiting"] + s["requests_in_flight"] < n and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.perf_counter()
    for sock in socks:
        sock.close()
    deadline = time.time() + 60
    while ((s := stats())["workers_available"] < s["workers_total"] or s["requests_waiting"]) and time.time() < deadline:
        time.sleep(0.02)
    freed = time.perf_counter() - t0
    after = timed(one_reply)
    return {"requests": n, "cancelled": s["requests_cancelled"] - before["requests_cancelled"], "freed_s": freed,
            "idle_reply_s": idle, "reply_after_s": after, "ratio": after / idle}


def slow_round(n: int) -> dict:
    idle_health = statistics.median(timed(health) for _ in range(10))
    idle_reply = statistics.median(timed(one_reply) for _ in range(3))
    from test_chat_web_limits import slow_clients
    host, port = url.removeprefix("http://").rsplit(":", 1)
    t0 = time.perf_counter()
    with slow_clients(host.strip("[]"), int(port), n):
        opened = time.perf_counter() - t0
        slow_health = statistics.median(timed(health) for _ in range(10))
        slow_reply = statistics.median(timed(one_reply) for _ in range(3))
        fds = psutil_fds()
    return {"connections": n, "open_s": opened, "server_fds": fds, "idle_health_s": idle_health,
            "health_s": slow_health, "health_ratio": slow_health / idle_health, "idle_reply_s": idle_reply,
            "reply_s": slow_reply, "reply_ratio": slow_reply / idle_reply}


def psutil_fds() -> int | None:
    if server_proc is None:
        return None
    import psutil
    return psutil.Process(server_proc.pid).num_fds()


# -----------------------------------------------------------------------------
# Run

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the slow connections need descriptors here too
if soft < args.slow + 500 and (hard == resource.RLIM_INFINITY or hard >= args.slow + 500):
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.slow + 500, hard))
args.slow = min(args.slow, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 300)

try:
    results = {}
    stream_once({"messages": [{"role": "user", "content": args.prompt}], "max_tokens": 4})  # warm-up
    results["single"] = stream_once({"messages": [{"role": "user", "content": args.prompt}],
                                     "max_tokens": args.max_tokens, "temperature": 0.8})
    results["rss_mb_start"] = rss_mb()
    results["round1"] = concurrent_round(args.clients)
    results["rss_mb_after_round1"] = rss_mb()
    codes = malformed_round(args.malformed)
    results["malformed_status_codes"] = dict(sorted(codes.items()))
    results["rss_mb_after_malformed"] = rss_mb()
    after = stream_once({"messages": [{"role": "user", "content": args.prompt}], "max_tokens": 8})
    results["answers_after_malformed"] = after["done"] and requests.get(url + "/health", timeout=30).ok
    results["round2"] = concurrent_round(args.clients)
    results["rss_mb_end"] = rss_mb()
    results["abandoned"] = abandoned_round(args.abandoned)
    results["slow"] = slow_round(args.slow)
    results["stats"] = stats()
finally:
    if server_proc is not None:
        server_context.__exit__(None, None, None)
    if built_dir is not None:
        shutil.rmtree(built_dir, ignore_errors=True)

single = results["single"]
print(f"one client alone: TTFT {single['ttft'] * 1000:.0f} ms, {args.max_tokens / single['decode']:.0f} tokens/s")
for name in ("round1", "round2"):
    r = results[name]
    print(f"{name}: {r['completed']}/{r['clients']} streams complete in {r['wall_s']:.2f}s | "
          f"TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms, p95 {r['ttft_p95_s'] * 1000:.0f} ms | "
          f"{r['tokens_per_s']:.0f} tokens/s aggregate, {r['stream_tokens_per_s_median']:.0f} tokens/s per stream")
print(f"malformed: {args.malformed} requests -> status codes {results['malformed_status_codes']}; "
      f"server answers afterwards: {results['answers_after_malformed']}")
if results["rss_mb_start"] is not None:
    print(f"server RSS (MB): start {results['rss_mb_start']:.0f}, after round 1 {results['rss_mb_after_round1']:.0f}, "
          f"after malformed {results['rss_mb_after_malformed']:.0f}, end {results['rss_mb_end']:.0f}")
a = results["abandoned"]
print(f"abandoned: {a['requests']} non-streaming requests dropped -> {a['cancelled']} cancelled, the worker free "
      f"after {a['freed_s'] * 1000:.0f} ms; the next reply took {a['reply_after_s'] * 1000:.0f} ms vs "
      f"{a['idle_reply_s'] * 1000:.0f} ms idle ({a['ratio']:.2f}x)")
w = results["slow"]
print(f"slowloris: {w['connections']} connections opened, each half a request ({w['open_s']:.1f}s) -> /health "
      f"{w['health_s'] * 1000:.1f} ms vs {w['idle_health_s'] * 1000:.1f} ms idle ({w['health_ratio']:.2f}x), a reply "
      f"{w['reply_s'] * 1000:.0f} ms vs {w['idle_reply_s'] * 1000:.0f} ms ({w['reply_ratio']:.2f}x)"
      + (f"; server file descriptors {w['server_fds']}" if w["server_fds"] is not None else ""))
if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2))
five_xx = sum(v for k, v in results["malformed_status_codes"].items() if k >= 500)
ok = (results["round1"]["completed"] == results["round2"]["completed"] == args.clients and five_xx == 0
      and results["answers_after_malformed"] and a["cancelled"] == a["requests"] and a["freed_s"] < 2)
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
