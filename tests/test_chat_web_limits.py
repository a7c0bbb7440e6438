"""
scripts/chat_web.py under hostile or unlucky traffic, against a real server (a `python -m
scripts.chat_web` subprocess on 127.0.0.1, the tiny trained model of tests/test_chat_web.py) and
real sockets: tiny temperatures, a model that fails mid-reply, clients that give up, a full queue,
slow clients (slowloris), wrong content types, the API docs, and the optional API key.
"""

import json
import resource
import shutil
import socket
import time
from contextlib import contextmanager

import psutil
import pytest
import requests
import torch

from test_chat_web import (HI_REPLY, MODEL_TAG, TRAIN_STEPS, chat, chat_base_dir,  # noqa: F401
                           parse_sse, run_server, user)

QUEUE = 60  # the limits server's --max_queue
CONNECTIONS = 300  # its --max_connections
TIMEOUT = 2  # its --header_timeout and --body_timeout, in seconds
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(chat_base_dir, tmp_path_factory):  # noqa: F811
    with run_server(chat_base_dir, tmp_path_factory.mktemp("limits_logs"), "-m", "64", "--max_queue", str(QUEUE),
                    "--max_connections", str(CONNECTIONS), "--header_timeout", str(TIMEOUT),
                    "--body_timeout", str(TIMEOUT)) as server:
        yield server


def stats(server) -> dict:
    return requests.get(server.url + "/stats", timeout=10).json()


def wait_for(server, condition, seconds: float, what: str) -> tuple[dict, float]:
    """Poll /stats until condition(stats) holds; (the stats, seconds it took)."""
    t0 = time.time()
    while not condition(s := stats(server)):
        assert time.time() - t0 < seconds, f"{what}: not after {seconds}s: {s}"
        time.sleep(0.05)
    return s, time.time() - t0


def send_raw(server, path: str, body: dict) -> socket.socket:
    """A POST written on a raw socket, whose answer is never read."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def abandon(socks) -> None:
    for sock in socks:
        sock.close()


# -----------------------------------------------------------------------------
# Every accepted request is answered


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 5e-324, 1e-300, 9.9e-5])
def test_a_tiny_temperature_decodes_greedily(server, temperature):
    body = {"messages": user("hi"), "temperature": temperature}
    assert "".join(chat(server, body)[0]) == HI_REPLY
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == HI_REPLY, r.text


def test_the_greedy_threshold():
    from nanochat.chat_api import GREEDY_BELOW, parse_chat_request
    defaults = {"temperature": 0.8, "top_k": 50, "max_tokens": 10}
    for t, expected in [(0, 0.0), (1e-38, 0.0), (GREEDY_BELOW / 2, 0.0), (GREEDY_BELOW, GREEDY_BELOW), (0.7, 0.7)]:
        assert parse_chat_request({"messages": user("x"), "temperature": t}, defaults).temperature == expected


# -----------------------------------------------------------------------------
# A failure during generation: an error event mid-stream, a 500 with JSON before the first token


@pytest.fixture(scope="module")
def broken_server(chat_base_dir, tmp_path_factory, tiny_tokenizer):  # noqa: F811
    """The tiny model with the embedding of one byte token -- the last byte of 🎵 -- set to NaN: the
    sung reply fails mid-stream once it has written 🎵, a prompt with 🎵 fails before the first token,
    and "hi" (no such byte) still works."""
    nan_token = tiny_tokenizer.encode("🎵")[-1]
    assert nan_token not in tiny_tokenizer.encode(HI_REPLY + "hi sing la ")
    base = tmp_path_factory.mktemp("broken_base")
    shutil.copytree(chat_base_dir, base, dirs_exist_ok=True)
    path = base / "chatsft_checkpoints" / MODEL_TAG / f"model_{TRAIN_STEPS:06d}.pt"
    state = torch.load(path, map_location="cpu")
    key = next(k for k in state if k.endswith("wte.weight"))
    state[key][nan_token] = float("nan")
    torch.save(state, path)
    with run_server(base, tmp_path_factory.mktemp("broken_logs"), "-m", "64") as server:
        yield server


def test_a_failure_mid_stream_is_an_error_event(broken_server):
    body = {"messages": user("sing"), "temperature": 0.5, "top_k": 1, "max_tokens": 60}
    r = requests.post(broken_server.url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    events = parse_sse(r.content)
    tokens = "".join(e.get("token", "") for e in events)
    assert tokens.startswith("la ") and events[-1] == {"done": True}, events
    error = events[-2]["error"]
    assert error.startswith("generation failed (RuntimeError: ") and "server log" in error, error
    assert "Traceback" not in r.text and "File \"" not in r.text
    # /v1, not streamed: the failure is the status
    r = requests.post(broken_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["message"].startswith("generation failed (RuntimeError")
    # /v1 streamed: an error event after the text
    r = requests.post(broken_server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    assert r.status_code == 200 and '"error": {"message": "generation failed' in r.text


def test_a_failure_before_the_first_token_is_a_500_on_every_endpoint(broken_server):
    before = stats(broken_server)
    body = {"messages": user("🎵"), "temperature": 0.5}
    for path, extra in [("/chat/completions", {}), ("/v1/chat/completions", {}),
                        ("/v1/chat/completions", {"stream": True})]:
        r = requests.post(broken_server.url + path, json={**body, **extra}, timeout=60)
        assert r.status_code == 500 and r.headers["content-type"] == "application/json", (path, r.text)
        error = r.json()["error"]
        message = error["message"] if path.startswith("/v1") else error
        assert message.startswith("generation failed (RuntimeError") and "Traceback" not in r.text
    after = stats(broken_server)
    assert after["requests_failed"] == before["requests_failed"] + 3 and after["workers_available"] == 1
    assert "".join(chat(broken_server, {"messages": user("hi"), "temperature": 0})[0]) == HI_REPLY  # still serves


# -----------------------------------------------------------------------------
# Clients that go away, and a full queue


def test_fifty_abandoned_non_streaming_requests_are_cancelled_within_a_second(server):
    before = stats(server)
    long = {"messages": user("sing"), "temperature": 0, "max_tokens": 4096}  # ~2,000 tokens: the context's end
    socks = [send_raw(server, "/v1/chat/completions", long) for _ in range(50)]
    wait_for(server, lambda s: s["requests_in_flight"] == 1 and s["requests_waiting"] == 49, 30, "50 requests in")
    abandon(socks)
    after, seconds = wait_for(server, lambda s: s["requests_waiting"] == 0 and s["requests_in_flight"] == 0 and
                              s["workers_available"] == 1, 10, "the 50 cancelled")
    assert seconds < 1.5, f"cancelling took {seconds:.2f}s"
    assert after["requests_cancelled"] == before["requests_cancelled"] + 50
    assert after["tokens_generated"] - before["tokens_generated"] < 1_500  # the running one was cut short
    t0 = time.time()
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": user("hi"), "temperature": 0}, timeout=30)
    assert r.json()["choices"][0]["message"]["content"] == HI_REPLY and time.time() - t0 < 5


def test_a_full_queue_is_a_503_with_retry_after(server):
    long = {"messages": user("sing"), "temperature": 0, "max_tokens": 4096}
    socks = [send_raw(server, "/chat/completions", long) for _ in range(QUEUE + 1)]
    try:
        wait_for(server, lambda s: s["requests_waiting"] == QUEUE, 30, "the queue full")
        for path in ("/chat/completions", "/v1/chat/completions"):
            r = requests.post(server.url + path, json={"messages": user("hi")}, timeout=10)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            error = r.json()["error"]
            assert "busy" in (error["message"] if path.startswith("/v1") else error)
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        abandon(socks)
    wait_for(server, lambda s: s["requests_waiting"] == 0 and s["workers_available"] == 1, 10, "the queue emptied")
    assert stats(server)["requests_busy"] >= 2
    assert "".join(chat(server, {"messages": user("hi"), "temperature": 0})[0]) == HI_REPLY


# -----------------------------------------------------------------------------
# Slow clients


def test_slow_headers_and_slow_bodies_are_cut_off(server):
    idle = socket.create_connection((server.host, server.port))
    slow = socket.create_connection((server.host, server.port))
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    trickle = socket.create_connection((server.host, server.port))
    trickle.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"messages\"")
    t0 = time.time()
    for sock in (idle, slow):
        sock.settimeout(TIMEOUT + 5)
        assert sock.recv(100) == b""  # closed by the server, without an answer
        assert time.time() - t0 < TIMEOUT + 2
    trickle.settimeout(TIMEOUT + 5)
    answer = b""
    while b"did not arrive within" not in answer and (chunk := trickle.recv(10_000)):
        answer += chunk  # headers and body can come in separate segments
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within" in answer, answer
    for sock in (idle, slow, trickle):
        sock.close()


@contextmanager
def slow_clients(host: str, port: int, n: int):
    """n connections that send half a request's headers (slowloris), all open at once. Also used by
    bench/serve.py."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setblocking(False)
            sock.connect_ex((host, port))
            socks.append(sock)
        time.sleep(0.5)
        for sock in socks:
            try:
                sock.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            except OSError:  # already shed by the server
                pass
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_two_thousand_slow_connections_do_not_stop_health_or_a_reply(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2_000 + 500
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    n = min(2_000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 300)
    assert n >= 1_000, "this test needs an open-file limit of at least 1,300"
    process = psutil.Process(server.proc.pid)
    with slow_clients(server.host, server.port, n):
        for _ in range(3):  # the flood is on: the server holds at most its cap, and answers
            t0 = time.time()
            assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"
            assert time.time() - t0 < 2
            assert process.num_fds() < CONNECTIONS + 100
        tokens, _ = chat(server, {"messages": user("hi"), "temperature": 0}, timeout=10)
        assert "".join(tokens) == HI_REPLY
        time.sleep(TIMEOUT + 1)  # those still open time out
        assert process.num_fds() < 100
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


# -----------------------------------------------------------------------------
# Content types and the API docs


def test_a_body_not_sent_as_json_is_a_415(server):
    data = json.dumps({"messages": user("hi")}).encode()
    for path in ("/chat/completions", "/v1/chat/completions"):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             None):
            headers = {"Content-Type": content_type} if content_type else {}
            r = requests.post(server.url + path, data=data, headers=headers, timeout=10)
            assert r.status_code == 415, (path, content_type, r.text)
            assert "Content-Type: application/json" in json.dumps(r.json())
    r = requests.post(server.url + "/chat/completions", data=data, timeout=30,
                      headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_no_api_docs_page_pulls_from_a_cdn(server):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert requests.get(server.url + path, timeout=5).status_code == 404, path


# -----------------------------------------------------------------------------
# The optional API key


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    from scripts.chat_web import parse_args
    monkeypatch.delenv("NANOCHAT_API_KEY", raising=False)
    assert parse_args([]).api_key is None and parse_args(["--api_key", "k1"]).api_key == "k1"
    monkeypatch.setenv("NANOCHAT_API_KEY", "k2")
    assert parse_args([]).api_key == "k2" and parse_args(["--api_key", "k1"]).api_key == "k1"


def test_an_api_key_guards_everything_but_health_and_the_page(chat_base_dir, tmp_path, monkeypatch):  # noqa: F811
    key = "s3cret-key"
    monkeypatch.setenv("NANOCHAT_API_KEY", key)
    with run_server(chat_base_dir, tmp_path, "-m", "16") as server:
        for path in ("/", "/health", "/static/chat.js"):
            assert requests.get(server.url + path, timeout=5).status_code == 200, path
        good = {"Authorization": f"Bearer {key}"}
        for headers in ({}, {"Authorization": key}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Bearer {key}x"}, {"Authorization": f"bearer  {key}"}):
            for method, path in [("GET", "/stats"), ("GET", "/v1/models"), ("POST", "/chat/completions"),
                                 ("POST", "/v1/chat/completions")]:
                r = requests.request(method, server.url + path, headers={**JSON, **headers}, timeout=5,
                                     json={"messages": user("hi")} if method == "POST" else None)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
                error = r.json()["error"]
                if path.startswith("/v1"):
                    assert error["type"] == "authentication_error" and "Authorization: Bearer" in error["message"]
                else:
                    assert "Authorization: Bearer" in error
        assert requests.get(server.url + "/stats", headers=good, timeout=5).status_code == 200
        r = requests.post(server.url + "/chat/completions", json={"messages": user("hi"), "temperature": 0},
                          headers=good, timeout=30)
        assert "".join(e.get("token", "") for e in parse_sse(r.content)) == HI_REPLY
        from openai import AuthenticationError, OpenAI
        client = OpenAI(base_url=server.url + "/v1", api_key=key, timeout=30, max_retries=0)
        reply = client.chat.completions.create(model="x", messages=user("hi"), temperature=0)
        assert reply.choices[0].message.content == HI_REPLY
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
        assert "s3cret" not in server.log()
