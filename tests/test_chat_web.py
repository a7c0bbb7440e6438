"""
Tests for scripts/chat_web.py against a real server: `python -m scripts.chat_web` in a subprocess on
127.0.0.1 (a free port), serving a tiny GPT (2 layers, 64 wide, the 512-token tiny tokenizer) that
is trained for a few seconds to answer "hi" with HI_REPLY and to repeat SING_CHUNK forever after
"sing". The tiny tokenizer has no merges for emoji or CJK, so 😀 is 4 byte tokens and 你 is 3:
streams must hold those bytes back and send each character whole.

The helpers at the top (the trained checkpoint, starting a server, reading SSE) are shared with
tests/test_chat_cli.py and tests/test_browser.py.
"""

import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch

from conftest import REPO_ROOT

HI_REPLY = "Hello 😀 你好!"  # the trained answer to "hi", ended by <|assistant_end|>
SING_CHUNK = "la 🎵 "  # the trained answer to "sing", repeated without end
# the trained answer to "calc": it calls the calculator (the engine writes the output), then goes on
CALC_PARTS = [{"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "6*7"},
              {"type": "python_output", "text": "42"}, {"type": "text", "text": "The answer is 42."}]
CALC_TEXT = "Let me compute. The answer is 42."
MODEL_TAG = "d2"
TRAIN_STEPS = 80  # AdamW at 1e-2: the loss is below 0.01 after ~50 steps

# -----------------------------------------------------------------------------
# Shared helpers: a trained tiny chat checkpoint, a server subprocess, SSE parsing


def build_chat_base_dir(path: Path, tokenizer_dir: Path) -> Path:
    """`path` as a base dir with the tiny tokenizer and a tiny SFT checkpoint (chatsft_checkpoints/d2)
    trained on the two conversations above. Built once per test session: reused if complete."""
    ckpt_dir = path / "chatsft_checkpoints" / MODEL_TAG
    if (ckpt_dir / f"meta_{TRAIN_STEPS:06d}.json").exists():
        return path
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer
    shutil.copytree(tokenizer_dir, path / "tokenizer", dirs_exist_ok=True)
    tokenizer = RustBPETokenizer.from_directory(str(path / "tokenizer"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and on a busy machine they cost 10x
    torch.manual_seed(0)
    config = dict(sequence_len=2048, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    model.to_empty(device="cpu")
    model.init_weights()
    rows = []
    for prompt, reply, ends in [("hi", HI_REPLY, True), ("sing", SING_CHUNK * 24, False), ("calc", CALC_PARTS, True)]:
        ids, mask = tokenizer.render_conversation({"messages": [{"role": "user", "content": prompt},
                                                                {"role": "assistant", "content": reply}]})
        if not ends:  # never trained to stop: the reply goes on until max_tokens
            ids, mask = ids[:-1], mask[:-1]
        rows.append((ids, mask))
    T = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: ignored by the loss
    for i, (ids, mask) in enumerate(rows):
        x, y, m = torch.tensor(ids[:-1]), torch.tensor(ids[1:]), torch.tensor(mask[1:])
        inputs[i, :len(x)] = x
        targets[i, :len(y)] = torch.where(m == 1, y, -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(TRAIN_STEPS):
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.05, f"the tiny chat model did not learn its replies (loss {loss.item():.3f})"
    save_checkpoint(str(ckpt_dir), TRAIN_STEPS, model.state_dict(), None, {"model_config": config, "user_config": {}})
    return path


@pytest.fixture(scope="session")
def chat_base_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A read-only base dir with the tiny tokenizer and the trained tiny chat model."""
    return build_chat_base_dir(tmp_path_factory.getbasetemp() / "chat_base", tiny_tokenizer_dir)


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc, self.url, self.log_path = proc, url, log_path
        self.host, self.port = url.removeprefix("http://").split(":")
        self.port = int(self.port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def run_server(base_dir: Path, log_dir: Path, *args: str):
    """python -m scripts.chat_web on 127.0.0.1 and a free port; yields a Server once /health answers."""
    log_path = log_dir / f"chat_web_{time.time_ns()}.log"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # see build_chat_base_dir
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the server's access log
        proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device_type", "cpu",
                                 "--host", "127.0.0.1", "-p", "0", *args], cwd=REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    server = None
    try:
        deadline = time.time() + 120
        while server is None:  # the server prints "nanochat: serving ... on http://127.0.0.1:PORT"
            if match := re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace")):
                server = Server(proc, match.group(1), log_path)
            elif proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chat_web did not start (exit {proc.poll()}):\n{log_path.read_text()}")
            else:
                time.sleep(0.1)
        while True:
            try:
                requests.get(server.url + "/health", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"chat_web never answered /health:\n{log_path.read_text()}")
                time.sleep(0.1)
        yield server
    finally:
        if server is not None:
            server.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait()


def parse_sse(raw: bytes) -> list[dict]:
    """The JSON payloads of a complete SSE body, checking the framing: every event is one
    `data: <json>` line followed by a blank line."""
    text = raw.decode("utf-8")  # strict: the stream itself must be valid UTF-8
    assert text.endswith("\n\n"), f"the stream does not end with a blank line: {text[-50:]!r}"
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, f"bad SSE event {block!r}"
        events.append(json.loads(block[len("data: "):]))
    return events


def chat(server: Server, body: dict, timeout: float = 60) -> tuple[list[str], list[dict]]:
    """POST /chat/completions; (token texts, all events). Asserts a 200 SSE stream ending with done."""
    r = requests.post(server.url + "/chat/completions", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length"), events[-3:]
    assert all("error" not in e and "done" not in e for e in events[:-1]), events
    return [e["token"] for e in events if "token" in e], events


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -----------------------------------------------------------------------------
# The streaming decoder (no server)


def test_stream_decoder_equals_decoding_everything_at_once(tiny_tokenizer):
    """Property test: for random texts full of multi-byte characters and for random id sequences
    (which include invalid UTF-8), the pieces join to tokenizer.decode(ids), less the U+FFFD of an
    unfinished character at the very end; for valid text no piece contains U+FFFD (no character was
    ever split) and the pieces join to the text exactly."""
    from nanochat.chat_api import StreamDecoder
    rng = random.Random(0)
    alphabet = list("abc xyz,.!\n") + ["😀", "🎵", "你", "好", "日本", "é", "ß", "€", "𝔘", "👩‍💻", "🇫🇷"]
    specials = [tiny_tokenizer.encode_special("<|assistant_end|>"), tiny_tokenizer.encode_special("<|python_start|>")]
    for case in range(300):
        if case % 3 == 2:  # arbitrary ids: broken byte sequences and specials
            ids = [rng.choice([rng.randrange(256), rng.randrange(512), *specials])
                   for _ in range(rng.randrange(1, 40))]
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
            ids = tiny_tokenizer.encode(text)
            assert tiny_tokenizer.decode(ids) == text
        decoder = StreamDecoder(tiny_tokenizer)
        pieces = [decoder.push(i) for i in ids]
        full = tiny_tokenizer.decode(ids)
        if case % 3 != 2:
            assert "".join(pieces) == full and not any("\ufffd" in p for p in pieces)
        else:
            assert "".join(pieces) in (full, full.removesuffix("\ufffd"))
            complete = tiny_tokenizer.decode(ids + tiny_tokenizer.encode(" "))  # a space ends any character
            assert "".join(pieces) + decoder.push(tiny_tokenizer.encode(" ")[0]) == complete
    # a reply cut inside a character: its bytes are never sent
    decoder = StreamDecoder(tiny_tokenizer)
    assert "".join(decoder.push(i) for i in tiny_tokenizer.encode("ab😀")[:-1]) == "ab"
    # 😀 is four byte tokens here: three are held back, then the character comes out whole
    ids = tiny_tokenizer.encode("😀")
    assert len(ids) == 4
    decoder = StreamDecoder(tiny_tokenizer)
    assert [decoder.push(i) for i in ids] == ["", "", "", "😀"]


def test_reply_stream_turns_tool_calls_into_events_and_drops_specials(tiny_tokenizer):
    """ReplyStream against the tokenizer's own rendering: the text between tool parts comes out
    whole, each part as its event, and no special token ever becomes text -- also for a call cut
    off by the end of the reply and for specials the model should not write mid-reply."""
    from nanochat.chat_api import ReplyStream
    tok = tiny_tokenizer
    ids, _ = tok.render_conversation({"messages": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": CALC_PARTS}]})
    reply = ids[ids.index(tok.encode_special("<|assistant_start|>")) + 1:]  # ends with <|assistant_end|>
    stream = ReplyStream(tok)
    events = [e for t in reply for e in stream.push(t)] + stream.finish()
    merged = []  # consecutive text pieces joined
    for kind, text in events:
        if merged and kind == "text" == merged[-1][0]:
            merged[-1] = ("text", merged[-1][1] + text)
        else:
            merged.append((kind, text))
    assert merged == [("text", "Let me compute. "), ("tool_call", "6*7"), ("tool_output", "42"),
                      ("text", "The answer is 42.")]
    # cut off inside a call; stray specials (bos, user_start, a lone python_end) are dropped
    special = tok.encode_special
    stream = ReplyStream(tok)
    ids = tok.encode("a") + [special("<|bos|>"), special("<|python_end|>"), special("<|user_start|>")] + \
        tok.encode("b") + [special("<|python_start|>")] + tok.encode("1+")
    events = [e for t in ids for e in stream.push(t)] + stream.finish()
    assert events == [("text", "a"), ("text", "b"), ("tool_call", "1+")]
    assert not any("<|" in text for _, text in events)


# -----------------------------------------------------------------------------
# One server for the API tests


@pytest.fixture(scope="module")
def server(chat_base_dir, tmp_path_factory):
    with run_server(chat_base_dir, tmp_path_factory.mktemp("web_logs"), "-m", "64") as server:
        yield server


def test_stream_framing_and_whole_multibyte_characters(server):
    tokens, events = chat(server, {"messages": user("hi"), "temperature": 0})
    assert "".join(tokens) == HI_REPLY
    assert all(t and "\ufffd" not in t for t in tokens)  # no empty events, no broken characters
    assert "😀" in tokens and "你" in tokens  # each arrived as one event, though it is 4 / 3 tokens


def test_greedy_reply_is_deterministic_and_seed_is_honoured(server):
    body = {"messages": user("sing"), "temperature": 0, "max_tokens": 20}
    assert chat(server, body)[0] == chat(server, body)[0]
    sung = "".join(chat(server, body)[0])
    assert len(sung) > len(SING_CHUNK) and (SING_CHUNK * 5).startswith(sung)
    sampled = {"messages": user("sing"), "temperature": 2.0, "top_k": 0, "max_tokens": 24, "seed": 123}
    assert chat(server, sampled)[0] == chat(server, sampled)[0]
    # without a seed, every request draws its own (the server logs it)
    for _ in range(3):
        chat(server, {"messages": user("random seed please"), "max_tokens": 2})
    seeds = re.findall(r"seed=(\d+); user: 'random seed please'", server.log())
    assert len(seeds) == 3 and len(set(seeds)) == 3, seeds


def test_max_tokens_caps_the_reply(server):
    tokens, _ = chat(server, {"messages": user("sing"), "temperature": 0, "max_tokens": 9})
    assert "".join(tokens) == (SING_CHUNK * 3)[:len("".join(tokens))]
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": user("sing"), "temperature": 0,
                                                                 "max_tokens": 9}, timeout=30)
    assert r.json()["usage"]["completion_tokens"] == 9 and r.json()["choices"][0]["finish_reason"] == "length"


def test_multi_turn_conversation(server):
    messages = user("hi") + [{"role": "assistant", "content": HI_REPLY}] + user("sing")
    tokens, _ = chat(server, {"messages": messages, "temperature": 0, "max_tokens": 6})
    assert tokens


def test_a_tool_call_is_its_own_event_on_both_endpoints_and_no_special_reaches_text(server):
    tokens, events = chat(server, {"messages": user("calc"), "temperature": 0})
    kinds = [next(iter(e)) for e in events]
    assert kinds.count("tool_call") == 1 and kinds.count("tool_output") == 1
    call, output = (events[kinds.index(k)] for k in ("tool_call", "tool_output"))
    assert call == {"tool_call": {"tool": "calculator", "input": "6*7"}}
    assert output == {"tool_output": {"tool": "calculator", "output": "42"}}
    assert kinds.index("tool_call") < kinds.index("tool_output") < len(kinds) - 2  # text follows the output
    assert "".join(tokens) == CALC_TEXT
    assert not any("<|" in t for t in tokens)
    done = events[-1]
    assert done["finish_reason"] == "stop" and done["stats"]["tokens"] > len(tokens)  # the tool's tokens count
    # the OpenAI endpoint: the same text in `content`, streamed or not, and no special anywhere
    body = {"messages": user("calc"), "temperature": 0}
    whole = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert whole["choices"][0]["message"]["content"] == CALC_TEXT
    r = requests.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == CALC_TEXT
    assert "<|" not in r.text and "<|" not in json.dumps(whole)


def test_the_final_event_carries_the_reply_stats(server):
    tokens, events = chat(server, {"messages": user("sing"), "temperature": 0, "max_tokens": 12})
    done = events[-1]
    assert done["finish_reason"] == "length"
    stats = done["stats"]
    assert stats["tokens"] == 12 and stats["prompt_tokens"] > 3
    assert 0 < stats["ttft_s"] < 30 and stats["tokens_per_s"] > 0


def test_health_stats_models_and_ui(server):
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["workers_total"] == 1
    assert health["depth"] == 2 and health["context_len"] == 2048
    assert health["model"] == f"nanochat-sft-d2-step{TRAIN_STEPS}"
    assert health["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 64}
    before = requests.get(server.url + "/stats", timeout=5).json()
    chat(server, {"messages": user("hi"), "temperature": 0})
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert stats["requests_served"] == before["requests_served"] + 1
    assert stats["tokens_generated"] > before["tokens_generated"]
    assert stats["workers_available"] == stats["workers_total"] == 1
    assert stats["workers"] == [{"index": 0, "device": "cpu"}]
    models = requests.get(server.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list" and models["data"][0]["id"] == health["model"]
    page = requests.get(server.url + "/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<textarea" in page.text and 'id="messages"' in page.text


def test_the_page_runs_only_its_own_files(server):
    """The page's CSP allows scripts, styles, images and connections from this server only, and
    no inline script; every file the page names is served; none names another host."""
    page = requests.get(server.url + "/", timeout=5)
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "img-src", "connect-src"):
        assert csp[directive] == "'self'", (directive, csp[directive])
    assert "<script>" not in page.text and "<style" not in page.text and " style=" not in page.text
    assert not re.search(r" on[a-z]+=", page.text)  # no inline event handlers
    names = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/static/chat.js" in names and "/static/vendor/purify.min.js" in names and "/static/vendor/katex.min.js" in names
    for name in names:
        assert name.startswith("/static/"), name
        r = requests.get(server.url + name, timeout=5)
        assert r.status_code == 200 and len(r.content) > 100, name
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", r.text), name
    assert requests.get(server.url + "/static/../chat_api.py", timeout=5).status_code == 404


def test_vendored_libraries_are_pinned_licensed_and_small():
    vendor = REPO_ROOT / "nanochat" / "static" / "vendor"
    versions = (vendor / "VERSIONS").read_text().splitlines()
    assert [line.split()[0] for line in versions] == ["marked", "dompurify", "@highlightjs/cdn-assets", "katex"]
    for name in ("marked", "dompurify", "highlightjs", "katex"):
        assert (vendor / f"LICENSE.{name}").stat().st_size > 500
    size = sum(p.stat().st_size for p in vendor.iterdir() if p.suffix in (".js", ".css"))
    assert size < 700_000, f"the vendored libraries are {size:,} bytes; the budget is 700 KB (with KaTeX)"
    assert size - (vendor / "katex.min.js").stat().st_size < 400_000, "the budget without KaTeX is 400 KB"
    script = (REPO_ROOT / "dev" / "vendor_web.sh").read_text()
    for line in versions:  # the refresh script pins exactly what is here
        assert f"={line.split()[1]} " in script, line


# -----------------------------------------------------------------------------
# Every limit and malformed body: a 400 with a message, never a 422 or 500

LONG = "x" * 7_000
BAD_BODIES = {
    "not json": b"hello",
    "empty body": b"",
    "truncated json": b'{"messages": [',
    "json array": b"[]",
    "json string": b'"hi"',
    "json null": b"null",
    "NaN temperature": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "deep nesting": b"[" * 100_000,
    "huge integer": b'{"messages": [{"role": "user", "content": "hi"}], "top_k": ' + b"9" * 5000 + b"}",
    "invalid utf-8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "no messages": {},
    "messages not a list": {"messages": "hi"},
    "messages empty": {"messages": []},
    "message not an object": {"messages": ["hi"]},
    "role missing": {"messages": [{"content": "hi"}]},
    "role system": {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
    "role tool": {"messages": [{"role": "tool", "content": "hi"}]},
    "role not a string": {"messages": [{"role": 1, "content": "hi"}]},
    "content missing": {"messages": [{"role": "user"}]},
    "content a number": {"messages": [{"role": "user", "content": 5}]},
    "content null": {"messages": [{"role": "user", "content": None}]},
    "content a list": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    "content empty": {"messages": [{"role": "user", "content": ""}]},
    "content blank": {"messages": [{"role": "user", "content": " \n\t "}]},
    "message too long": {"messages": [{"role": "user", "content": "x" * 8_001}]},
    "too many messages": {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"}
                                       for i in range(501)]},
    "too many characters": {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": LONG}
                                         for i in range(5)]},
    "roles do not alternate": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    "starts with assistant": {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
    "ends with assistant": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    "temperature too low": {"messages": user("hi"), "temperature": -0.1},
    "temperature too high": {"messages": user("hi"), "temperature": 2.01},
    "temperature a string": {"messages": user("hi"), "temperature": "0.5"},
    "temperature a bool": {"messages": user("hi"), "temperature": True},
    "top_k too high": {"messages": user("hi"), "top_k": 201},
    "top_k negative": {"messages": user("hi"), "top_k": -1},
    "top_k a float": {"messages": user("hi"), "top_k": 1.5},
    "top_k a string": {"messages": user("hi"), "top_k": "5"},
    "max_tokens zero": {"messages": user("hi"), "max_tokens": 0},
    "max_tokens too high": {"messages": user("hi"), "max_tokens": 4097},
    "max_tokens a list": {"messages": user("hi"), "max_tokens": [5]},
    "seed negative": {"messages": user("hi"), "seed": -5},
    "unknown field": {"messages": user("hi"), "temprature": 0.5},
    "longer than the model's context": {"messages": user("😀" * 7_000)},  # 28,000 byte tokens > 2,048
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_request_is_a_400_with_a_message(server, name):
    body = BAD_BODIES[name]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(server.url + "/chat/completions", data=data, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 400, (name, r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error, str) and len(error) > 10, error


@pytest.mark.parametrize("name", ["not json", "role tool", "temperature too high", "top_k a float",
                                  "content empty", "too many characters"])
def test_openai_endpoint_rejects_with_openai_error_shape(server, name):
    body = BAD_BODIES[name]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(server.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10


def test_oversized_body_unknown_route_and_wrong_method(server):
    r = requests.post(server.url + "/chat/completions", data=b"x" * 1_100_000, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    r = requests.get(server.url + "/nope", timeout=5)
    assert r.status_code == 404 and r.json()["error"]
    r = requests.get(server.url + "/chat/completions", timeout=5)
    assert r.status_code == 405 and r.json()["error"]
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert stats["requests_failed"] == 0 and stats["workers_available"] == 1


def test_limits_at_the_boundary_are_accepted(server):
    body = {"messages": user("hi"), "temperature": 2, "top_k": 200, "max_tokens": 1}
    assert len(chat(server, body)[0]) <= 1
    body = {"messages": user("hi"), "temperature": 0.0, "top_k": 0, "max_tokens": 4096}
    assert "".join(chat(server, body)[0]) == HI_REPLY


# -----------------------------------------------------------------------------
# The OpenAI-compatible API, through the official client


def test_openai_client_non_streaming_and_streaming(server, tiny_tokenizer):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    model = client.models.list().data[0].id
    completion = client.chat.completions.create(model=model, messages=user("hi"), temperature=0)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == HI_REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == len(tiny_tokenizer.encode(HI_REPLY))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model, messages=user("hi"), temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HI_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

    # the .stream() helper (it raises on finish_reason "length", so the reply must end by itself)
    with client.chat.completions.stream(model=model, messages=user("hi"), temperature=0) as s:
        deltas = [event.delta for event in s if event.type == "content.delta"]
        final = s.get_final_completion()
    assert "".join(deltas) == final.choices[0].message.content == HI_REPLY

    # a system message is merged into the first user message
    completion = client.chat.completions.create(model=model, temperature=0, max_tokens=5,
                                                messages=[{"role": "system", "content": "You sing."}] + user("sing"))
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens > len(tiny_tokenizer.encode("You sing.\n\nsing"))

    import openai
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=user("hi"), temperature=3)


# -----------------------------------------------------------------------------
# Concurrency: one worker, many clients; disconnects free the worker


def test_sixteen_simultaneous_requests_on_one_worker_all_complete(server):
    results, errors = [None] * 16, []

    def client(i):
        try:
            prompt = "hi" if i % 2 else "sing"
            results[i] = "".join(chat(server, {"messages": user(prompt), "temperature": 0, "max_tokens": 20})[0])
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.time()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200  # the event loop is not blocked
    assert time.time() - t0 < 2
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, text in enumerate(results):
        assert text == (HI_REPLY if i % 2 else (SING_CHUNK * 20)[:len(text)]), (i, text)
    stats = requests.get(server.url + "/stats", timeout=5).json()
    assert stats["workers_available"] == 1 and stats["requests_in_flight"] == 0 and stats["requests_waiting"] == 0


def test_client_disconnect_mid_stream_frees_the_worker(server):
    before = requests.get(server.url + "/stats", timeout=5).json()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/chat/completions", body=json.dumps({"messages": user("sing"), "temperature": 0,
                                                               "max_tokens": 4096}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    received = b""
    while received.count(b"data: ") < 3:  # a few tokens have arrived
        received += response.read1(1024)
    assert received.startswith(b'data: {"token"')
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 10
    while True:
        stats = requests.get(server.url + "/stats", timeout=5).json()
        if stats["requests_cancelled"] == before["requests_cancelled"] + 1 and stats["workers_available"] == 1:
            break
        assert time.time() < deadline, f"the worker was not returned after the disconnect: {stats}"
        time.sleep(0.05)
    # the reply was cut short (the model would have written ~2,000 tokens), and the worker serves again
    assert stats["tokens_generated"] - before["tokens_generated"] < 1_500
    assert "".join(chat(server, {"messages": user("hi"), "temperature": 0})[0]) == HI_REPLY


# -----------------------------------------------------------------------------
# Start-up errors


def test_missing_checkpoint_is_a_clear_error(base_dir_with_tokenizer, tmp_path):
    with pytest.raises(RuntimeError, match="chat_sft"):
        with run_server(base_dir_with_tokenizer, tmp_path):
            pass


def test_bad_flags_and_a_taken_port_are_rejected(chat_base_dir):
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "scripts.chat_web", "--device_type", "cpu", "--host", "127.0.0.1",
                               *flags], cwd=REPO_ROOT, env={**os.environ, "NANOCHAT_BASE_DIR": str(chat_base_dir)},
                              capture_output=True, text=True, timeout=60)

    for flags, message in [(["-t", "3"], "must be"), (["-k", "500"], "must be"), (["-m", "0"], "must be"),
                           (["-n", "2", "-p", "0"], "needs CUDA")]:
        r = run(*flags)
        assert r.returncode != 0 and message in r.stderr, (flags, r.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run("-p", str(taken.getsockname()[1]))
    assert r.returncode != 0 and "cannot listen on 127.0.0.1" in r.stderr and "worker 0" not in r.stderr, r.stderr


def test_listens_on_this_machine_only_unless_asked(chat_base_dir, tmp_path):
    """The default host is 127.0.0.1; --host 0.0.0.0 listens everywhere, prints the URLs that reach
    it (loopback first, then this machine's addresses) and one warning line."""
    from scripts.chat_web import parse_args
    assert parse_args([]).host == "127.0.0.1"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(chat_base_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "wide.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device_type", "cpu", "--host", "0.0.0.0",
                                 "-p", "0"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (match := re.search(r"serving sft model on (http://127\.0\.0\.1:(\d+))(.*)\n(.*)\n", log_path.read_text())):
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.1)
        url, port, others, warning = match.groups()
        assert warning.startswith("chat_web: warning: listening on every interface") and "no authentication" in warning
        addresses = re.findall(r"and http://([0-9.]+):(\d+)", others)
        assert all(p == port for _, p in addresses)
        assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"
        for address, _ in addresses[:3]:  # reachable as printed
            assert requests.get(f"http://{address}:{port}/health", timeout=30).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_page_and_its_files_ship_in_the_package():
    """pyproject's package-data globs cover every file the page serves, so an installed (not only
    an editable) package serves the page."""
    import tomllib
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["nanochat"]
    package = REPO_ROOT / "nanochat"
    shipped = {p for g in globs for p in package.glob(g) if p.is_file()}
    needed = {package / "ui.html"} | {p for p in (package / "static").rglob("*") if p.is_file()}
    assert needed - shipped == set(), sorted(str(p) for p in needed - shipped)
