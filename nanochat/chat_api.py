"""
The chat server's request format: its limits, their validation, and the streaming text decoder.
Used by scripts/chat_web.py (both its native endpoint and the OpenAI-compatible /v1 one) and,
for the decoders, by scripts/chat_cli.py.

Design choices:
- Bodies are validated by hand, not by pydantic, so every bad request -- invalid JSON, wrong types,
  unknown roles, empty or oversized messages, out-of-range parameters -- raises RequestError with a
  message that says what is wrong and how to fix it; the server answers it as a 400, never a 422
  or a 500.
- A request's `seed` is optional: without one it gets a fresh random seed, so "regenerate" differs.
- A temperature below GREEDY_BELOW (but above 0) is treated as 0, greedy decoding: sampling at such a
  temperature already picks the top token except for near-ties, and a temperature of 1e-38 or less
  would divide fp32 logits to inf (a NaN softmax). The engine itself is left as it is.
- An optional API key (RequireApiKey) guards every route but /health and the page with its files.
- A POST body must say it is JSON (Content-Type: application/json): anything else is a 415, so a
  browser form or a stray `curl -d` on another site cannot drive the API.
"""

import asyncio
import codecs
import hmac
import json
import secrets
from dataclasses import dataclass

from nanochat.tokenizer import role_order_error

# -----------------------------------------------------------------------------
# Limits (as in the reference nanochat's chat_web): each violation is a 400 with a message

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)  # 0 = no top-k: sample from the whole vocabulary
MAX_TOKENS_RANGE = (1, 4096)
MAX_BODY_BYTES = 1_000_000  # 32,000 chars, each up to 12 bytes as JSON escapes (surrogate pairs), fit easily
GREEDY_BELOW = 1e-4  # a temperature in (0, GREEDY_BELOW) decodes greedily, as 0 does


class RequestError(ValueError):
    """A bad request (or a busy or failed server): answered with this status, message and headers."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers


def check_json_content_type(content_type: str | None) -> None:
    """A POST body must be declared JSON: application/json (any parameters) or application/*+json."""
    media = (content_type or "").split(";")[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        raise RequestError(f"the body must be JSON, sent with 'Content-Type: application/json' "
                           f"(got {json.dumps(content_type or 'no Content-Type')[:80]})", status=415)


async def read_body(request, timeout: float) -> bytes:
    """A starlette Request's body: declared JSON (else 415), at most MAX_BODY_BYTES (else 413), and
    all in within `timeout` seconds (else 408: a body trickled in byte by byte holds no worker)."""
    check_json_content_type(request.headers.get("content-type"))
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY_BYTES:
        raise RequestError(f"the body is larger than {MAX_BODY_BYTES:,} bytes", status=413)
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise RequestError(f"the body is larger than {MAX_BODY_BYTES:,} bytes", status=413)
    except TimeoutError:
        raise RequestError(f"the body did not arrive within {timeout:g}s", status=408) from None
    return bytes(raw)


class RequireApiKey:
    """ASGI middleware: while get_key() returns a key, every route but /health, the page (/) and its
    files (/static/...) needs `Authorization: Bearer <key>`, else reject(path, message, headers)
    answers (a 401). hmac.compare_digest takes the same time wherever a guess differs from the key."""

    def __init__(self, app, get_key, reject):
        self.app, self.get_key, self.reject = app, get_key, reject

    async def __call__(self, scope, receive, send):
        key, path = self.get_key(), scope.get("path", "")
        if scope["type"] == "http" and key and not (path in ("/", "/health") or path.startswith("/static/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + key.encode()):
                message = "a valid API key is required: send the header 'Authorization: Bearer <key>'"
                response = self.reject(path, message, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# -----------------------------------------------------------------------------
# Streaming decoders: token ids in, complete UTF-8 text (and tool calls) out


class StreamDecoder:
    """Token ids in, text out, never half a character. A token can be part of a multi-byte character
    (an emoji is 4 bytes, often split over several tokens of a small vocabulary): each token's raw
    bytes go through Python's incremental UTF-8 decoder, which holds back an incomplete sequence until
    the rest arrives (invalid bytes become U+FFFD as soon as they are known to be invalid). The bytes
    of a character left unfinished at the end of a reply (cut by max_tokens) are never sent.
    Concatenated, the pieces equal tokenizer.decode(ids) less that unfinished tail (tested)."""

    def __init__(self, tokenizer):
        self.token_bytes = tokenizer.enc.decode_single_token_bytes  # raw bytes, specials included
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.utf8.decode(self.token_bytes(token))


class ReplyStream:
    """A reply's token ids in, events out -- and never a special token as text:
        ("text", str)          whole characters of the reply (through StreamDecoder)
        ("tool_call", str)     the expression between <|python_start|> and <|python_end|>
        ("tool_output", str)   the tool's answer between <|output_start|> and <|output_end|>
    Any other special token (one the model should not write mid-reply) is dropped. Text split by a
    tool call is flushed first, so the events are in reply order. `finish()` flushes a call or
    output cut short by max_tokens. Used by chat_web (both endpoints) and chat_cli."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoder = tokenizer, StreamDecoder(tokenizer)
        special = tokenizer.encode_special
        self.opening = {special("<|python_start|>"): "tool_call", special("<|output_start|>"): "tool_output"}
        self.closing = {special("<|python_end|>"): "tool_call", special("<|output_end|>"): "tool_output"}
        self.specials = {special(name) for name in tokenizer.get_special_tokens()}
        self.inside, self.ids = None, []  # the tool part being read ("tool_call"/"tool_output") and its ids

    def push(self, token: int) -> list[tuple[str, str]]:
        if token in self.opening:
            events = self.finish()  # text before the call; an unclosed part (the model misbehaving)
            self.inside, self.ids = self.opening[token], []
            return events
        if self.inside is not None and self.closing.get(token) == self.inside:
            return self.finish()
        if token in self.specials:
            return []
        if self.inside is not None:
            self.ids.append(token)
            return []
        text = self.decoder.push(token)
        return [("text", text)] if text else []

    def finish(self) -> list[tuple[str, str]]:
        """Flush: the pending tool part (if any) as its event; text held back stays held back."""
        if self.inside is None:
            return []
        event = (self.inside, self.tokenizer.decode(self.ids))
        self.inside, self.ids = None, []
        return [event]


# -----------------------------------------------------------------------------
# Request validation


@dataclass
class ChatRequest:
    messages: list  # [{"role": "user"|"assistant", "content": str}, ...], alternating, ending with user
    temperature: float
    top_k: int
    max_tokens: int
    seed: int
    stream: bool = True
    include_usage: bool = False  # OpenAI stream_options.include_usage


def parse_json_body(raw: bytes) -> dict:
    def reject_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, NaN/Infinity, integers with >4300 digits
        raise RequestError(f"the body is not valid JSON ({e}); send e.g. "
                           '{"messages": [{"role": "user", "content": "Hello"}]}') from None
    if not isinstance(body, dict):
        raise RequestError(f"the JSON body must be an object with a 'messages' list, got {type(body).__name__}")
    return body


def _number(body: dict, key: str, bounds: tuple, default, integer: bool):
    value = body.get(key)
    if value is None:
        return default
    lo, hi = bounds
    what = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise RequestError(f"'{key}' must be {what} in [{lo}, {hi}], got {json.dumps(value)[:50]}", param=key)
    if not lo <= value <= hi:
        raise RequestError(f"'{key}' must be in [{lo}, {hi}], got {value}", param=key)
    return value


def _content_text(content, i: int, openai: bool) -> str:
    """A message's content as a string. OpenAI clients may send a list of parts; only text parts."""
    if openai and isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts {{'type': 'text', 'text': ...}} "
                                   f"are supported", param="messages")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string, got {type(content).__name__}", param="messages")
    return content


def parse_chat_request(body: dict, defaults: dict, openai: bool = False) -> ChatRequest:
    """Check a chat request against every limit; ChatRequest or RequestError naming what is wrong.
    openai=True is the /v1 dialect: a leading system message, text parts, `stream`, unknown keys ignored."""
    known = {"messages", "temperature", "top_k", "max_tokens", "seed"}
    if not openai and (unknown := sorted(set(body) - known)):
        raise RequestError(f"unknown field(s) {unknown}; accepted: {sorted(known)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {'role': 'user'|'assistant', 'content': str}",
                           param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} > {MAX_MESSAGES}; start a new conversation",
                           param="messages")
    clean, total = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = message.get("role")
        allowed = ("user", "assistant", "system") if openai and i == 0 else ("user", "assistant")
        if role not in allowed:
            raise RequestError(f"messages[{i}].role must be one of {list(allowed)}, got {json.dumps(role)[:50]}",
                               param="messages")
        content = _content_text(message.get("content"), i, openai)
        if not content.strip():
            raise RequestError(f"messages[{i}] is empty", param="messages")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"messages[{i}] is too long: {len(content):,} > {MAX_MESSAGE_CHARS:,} characters",
                               param="messages")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"messages[{i}] is not valid Unicode (a lone surrogate escape)",
                               param="messages") from None
        total += len(content)
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"the conversation is too long: {total:,} > {MAX_TOTAL_CHARS:,} characters in all; "
                           f"start a new conversation", param="messages")
    if error := role_order_error([m["role"] for m in clean], last="user"):  # the model writes the next reply
        raise RequestError(error, param="messages")
    if clean[0]["role"] == "system":  # merged into the first user message, as in training
        clean = [{"role": "user", "content": clean[0]["content"] + "\n\n" + clean[1]["content"]}] + clean[2:]
    temperature = _number(body, "temperature", TEMPERATURE_RANGE, defaults["temperature"], integer=False)
    temperature = 0.0 if temperature < GREEDY_BELOW else temperature
    top_k = _number(body, "top_k", TOP_K_RANGE, defaults["top_k"], integer=True)
    max_tokens = _number(body, "max_tokens", MAX_TOKENS_RANGE, defaults["max_tokens"], integer=True)
    seed = _number(body, "seed", (0, 2**63 - 1), None, integer=True)
    seed = secrets.randbelow(2**31) if seed is None else seed
    stream, include_usage = True, False
    if openai:
        max_tokens = _number(body, "max_completion_tokens", MAX_TOKENS_RANGE, max_tokens, integer=True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", param="stream_options")
        include_usage = options.get("include_usage") is True
        if _number(body, "n", (1, 1), 1, integer=True) != 1:
            raise RequestError("only n=1 is supported", param="n")
        if not isinstance(body.get("model", ""), str):
            raise RequestError("'model' must be a string", param="model")
    return ChatRequest(clean, float(temperature), int(top_k), int(max_tokens), int(seed), stream, include_usage)
