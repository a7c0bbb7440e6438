"""
Chat with a trained model in the browser, or through an OpenAI-compatible API.

Run:
    python -m scripts.chat_web                          # the SFT model on one GPU (or the CPU), port 8000
    python -m scripts.chat_web -n 8                     # 8 GPUs: one model replica per GPU
    python -m scripts.chat_web -i rl -t 0.6 -k 40 -p 8080
    python -m scripts.chat_web --host 0.0.0.0 --api_key "$(openssl rand -hex 16)"  # other machines too
and open http://127.0.0.1:8000 (it listens on this machine only unless --host says otherwise). Endpoints:
    GET  /                     the chat page (nanochat/ui.html; its script, styles, libraries: nanochat/static/)
    POST /chat/completions     {messages, temperature?, top_k?, max_tokens?, seed?} -> Server-Sent Events
                               {"token": "..."} ... {"tool_call"|"tool_output": {...}} ... {"done": true, "stats": ...}
    POST /v1/chat/completions  the OpenAI Chat Completions API, streaming or not, so OpenAI clients work:
                               OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    GET  /v1/models            the model being served
    GET  /health, GET /stats   liveness, the model's name, depth and context; workers, requests, tokens

Design choices:
- Flat: the routes are module-level functions; what they share (workers, tokenizer, model, counters)
  is one small `Served` object that main() sets before the server starts.
- A worker pool: one model replica + Engine per GPU (one worker on CPU/MPS). A request waits for a
  free worker (an asyncio.Queue) and the worker goes back into the queue when its generation thread
  ends -- after success, error or client disconnect alike -- so a worker can never leak.
- Generation runs in a thread per request, off the event loop, so streams interleave and /health
  answers while generating. Each request watches its connection while queued and generating,
  streaming or not: a client that goes away leaves the queue, or stops at the next token.
- No special token is ever sent as text: tokens go through nanochat.chat_api.ReplyStream, which
  sends whole UTF-8 characters and turns the calculator's <|python_start|>...<|output_end|> into
  tool events (the native stream sends them; the OpenAI endpoint leaves them out of `content`).
- Bodies are validated by hand in nanochat/chat_api.py, not by pydantic: a bad request is a 400
  whose JSON says what is wrong and how to fix it, never a 422 or 500; a non-JSON body a 415.
- Every accepted request is answered: the response starts at its first event, so a full queue is a
  503 with Retry-After and a failure before the first token a 500 with a JSON error; a failure
  later in a stream is an {"error": ...} event.
- Slow clients cannot starve the server: header and body timeouts, a queue limit, and a connection
  cap that closes idle connections first (guarded_protocol in nanochat/chat_workers.py).
- Nothing comes from another host: no /docs, /redoc (Swagger from a CDN) or OpenAPI schema.
- --api_key (or NANOCHAT_API_KEY): all but /health and the page need `Authorization: Bearer <key>`.
- Each request gets a fresh random seed unless it asks for one (`seed`), so "regenerate" differs.
"""

import argparse
import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.chat_api import (MAX_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_K_RANGE, ChatRequest, RequestError,
                               RequireApiKey, parse_chat_request, parse_json_body, read_body)
from nanochat.chat_workers import (Stats, Worker, WorkerPool, guarded_protocol, load_workers, raise_fd_limit,
                                   reachable_urls, run_generation, unless_disconnected, until_disconnected)

logger = logging.getLogger("nanochat.chat_web")
PACKAGE_DIR = os.path.dirname(nanochat.__file__)
UI_PATH = os.path.join(PACKAGE_DIR, "ui.html")  # the page; its script, styles and vendored libraries:
STATIC_DIR = os.path.join(PACKAGE_DIR, "static")  # shipped as package data (pyproject.toml)

# -----------------------------------------------------------------------------
# What the routes share: set once by main() (or a test) before the server starts


@dataclass
class Served:
    pool: WorkerPool
    tokenizer: object  # nanochat.tokenizer.RustBPETokenizer
    model_name: str  # nanochat-<source>-<tag>-step<N>, as /v1/models and /health name it
    depth: int
    context_len: int  # the longest prompt + reply the model reads, in tokens
    stop_ids: set  # <|assistant_end|> and <|bos|> end a reply
    defaults: dict  # temperature, top_k, max_tokens when a request leaves them out
    stats: Stats
    api_key: str | None = None  # when set, required as `Authorization: Bearer <key>` (see RequireApiKey)
    body_timeout: float = 30.0  # seconds a client has to send its body, once its headers are in


served: Served | None = None


def serve(workers: list[Worker], tokenizer, meta: dict, args) -> None:
    global served
    config = meta["model_config"]
    served = Served(pool=WorkerPool(workers, args.max_queue), tokenizer=tokenizer,  # the queue binds on first use
                    model_name=f"nanochat-{args.source}-{args.model_tag}-step{meta['step']}",
                    depth=config["n_layer"], context_len=config["sequence_len"],
                    stop_ids={tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()},
                    defaults={"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens},
                    stats=Stats(started=time.time()), api_key=args.api_key or None, body_timeout=args.body_timeout)


app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)  # no page from a CDN
app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

# The page runs only its own files: no inline script or style, nothing from another host. (Markdown
# images in replies become plain links in static/markdown.js; img-src 'self' is the backstop.)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_AFTER_S = 2  # a 503's Retry-After: about how long a short reply takes to free a place in the queue

# -----------------------------------------------------------------------------
# Errors -> JSON, never a 422


def error_response(request, status: int, message: str, param=None, headers=None, path=None):
    served.stats.requests_rejected += status < 500
    if (path or request.url.path).startswith("/v1/"):  # OpenAI's shape, so its client shows the message
        kind = {401: "authentication_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        content = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    else:
        content = {"error": message}
    return JSONResponse(content, status_code=status, headers=headers)


app.add_middleware(RequireApiKey, get_key=lambda: served.api_key if served else None,
                   reject=lambda path, message, headers: error_response(None, 401, message, headers=headers, path=path))


@app.exception_handler(RequestError)
async def on_request_error(request, exc: RequestError):
    return error_response(request, exc.status, str(exc), exc.param, exc.headers)


@app.exception_handler(RequestValidationError)
async def on_validation_error(request, exc):
    return error_response(request, 400, f"invalid request: {exc.errors()}")


@app.exception_handler(StarletteHTTPException)
async def on_http_error(request, exc):  # 404, 405, ...
    return error_response(request, exc.status_code, str(exc.detail))


@app.exception_handler(Exception)
async def on_server_error(request, exc):  # a bug, not a bad request: still JSON, and logged
    logger.exception(f"{request.method} {request.url.path} failed")
    return error_response(request, 500, f"internal error: {type(exc).__name__}")


async def read_request(request: Request, openai: bool) -> tuple[ChatRequest, list[int]]:
    raw = await read_body(request, served.body_timeout)
    chat = parse_chat_request(parse_json_body(raw), served.defaults, openai=openai)
    messages = chat.messages + [{"role": "assistant", "content": ""}]
    tokens = served.tokenizer.render_for_completion({"messages": messages})
    if len(tokens) >= served.context_len:
        raise RequestError(f"the conversation is {len(tokens):,} tokens; this model reads at most "
                           f"{served.context_len:,}: start a new conversation", param="messages")
    chat.max_tokens = min(chat.max_tokens, served.context_len - len(tokens))
    return chat, tokens


# -----------------------------------------------------------------------------
# Generation: a thread per request, its events handed to the event loop


async def generate(chat: ChatRequest, tokens: list[int], request: Request):
    """Async iterator of ("text", str), ("tool_call", str), ("tool_output", str) events, then
    ("end", finish_reason, stats) or ("error", message); it just stops if the client goes away
    (while queued or generating). Raises RequestError(503) before the first event if the queue is
    full. The worker is returned by the generation thread when it ends, however the request ends.
    stats: tokens (generated, tool output included), ttft_s (request in to first token out,
    queueing and prefill included), tokens_per_s (after the first token: the decode speed) and
    prompt_tokens."""
    request_id, t_request = secrets.token_hex(4), time.time()
    stats = served.stats
    if served.pool.full:
        stats.requests_busy += 1
        raise RequestError(f"the server is busy: {served.pool.waiting} requests are waiting for "
                           f"{len(served.pool.workers)} worker(s); retry shortly", status=503,
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    logger.info(f"[{request_id}] {len(chat.messages)} message(s), {len(tokens)} prompt tokens, "
                f"T={chat.temperature} k={chat.top_k} max={chat.max_tokens} seed={chat.seed}; "
                f"user: {chat.messages[-1]['content'][:500]!r}")
    disconnected = asyncio.ensure_future(until_disconnected(request))
    try:
        worker = await unless_disconnected(served.pool.acquire(), disconnected)
    except BaseException:
        disconnected.cancel()
        raise
    if worker is None:  # the client went away while queued
        disconnected.cancel()
        stats.requests_cancelled += 1
        return
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    stats.in_flight += 1

    def put(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def run():  # in its own thread
        last, finish, n = ("error", "generation was interrupted"), "error", 0  # the stream's final event
        try:
            last, finish, n = run_generation(worker, served.tokenizer, served.stop_ids, chat, tokens, stop, put,
                                             t_request, request_id)
        finally:
            def finish_request():  # on the event loop: the worker is free before the client hears "done"
                stats.in_flight -= 1
                stats.tokens_generated += n
                stats.requests_served += finish in ("stop", "length")
                stats.requests_cancelled += finish == "cancelled"
                stats.requests_failed += finish not in ("stop", "length", "cancelled")
                served.pool.release(worker)
                events.put_nowait(last)
            try:
                loop.call_soon_threadsafe(finish_request)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

    threading.Thread(target=run, name=f"generate-{request_id}", daemon=True).start()
    try:
        while True:
            event = await unless_disconnected(events.get(), disconnected)
            if event is None:
                logger.info(f"[{request_id}] the client went away: stopping")
                return
            yield event
            if event[0] in ("end", "error"):
                return
    finally:  # no await here: this also runs when the client's disconnect cancels us
        stop.set()
        disconnected.cancel()


async def start(chat: ChatRequest, tokens: list[int], request: Request):
    """(first event, the rest): the response's status waits for the first event, so a full queue is
    a 503 and a failure before the first token a 500, not a 200 with an error inside. None if the
    client went away first."""
    events = generate(chat, tokens, request)
    try:
        first = await anext(events, None)
        if first is not None and first[0] == "error":
            raise RequestError(first[1], status=500)
    except BaseException:
        await events.aclose()
        raise
    return None if first is None else (first, events)


async def chain(first, events):
    async with aclosing(events):
        yield first
        async for event in events:
            yield event


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# -----------------------------------------------------------------------------
# Endpoints


@app.get("/")
async def root():
    return FileResponse(UI_PATH, media_type="text/html", headers=PAGE_HEADERS)


@app.get("/health")
async def health():
    return {"status": "ok", "model": served.model_name, "depth": served.depth, "context_len": served.context_len,
            "defaults": served.defaults, "workers_total": len(served.pool.workers),
            "workers_available": served.pool.available}


@app.get("/stats")
async def get_stats():
    stats, pool = served.stats, served.pool
    return {"model": served.model_name, "workers_total": len(pool.workers), "workers_available": pool.available,
            "requests_waiting": pool.waiting, "requests_in_flight": stats.in_flight,
            "requests_served": stats.requests_served, "requests_cancelled": stats.requests_cancelled,
            "requests_failed": stats.requests_failed, "requests_rejected": stats.requests_rejected,
            "requests_busy": stats.requests_busy, "tokens_generated": stats.tokens_generated,
            "uptime_s": round(time.time() - stats.started, 1),
            "workers": [{"index": w.index, "device": str(w.device)} for w in pool.workers]}


@app.post("/chat/completions")
async def chat_completions(request: Request):
    """The page's stream: {"token": text} ..., {"tool_call": {...}} / {"tool_output": {...}} where the
    model used its calculator, then {"done": true, "finish_reason": ..., "stats": {...}}."""
    chat, tokens = await read_request(request, openai=False)
    if (started := await start(chat, tokens, request)) is None:
        return Response(status_code=499)  # nobody is listening

    async def stream():
        async with aclosing(chain(*started)) as events:
            async for event in events:
                kind = event[0]
                if kind == "text":
                    yield sse({"token": event[1]})
                elif kind == "tool_call":
                    yield sse({"tool_call": {"tool": "calculator", "input": event[1]}})
                elif kind == "tool_output":
                    yield sse({"tool_output": {"tool": "calculator", "output": event[1]}})
                elif kind == "error":
                    yield sse({"error": event[1]})
                    yield sse({"done": True})
                else:
                    yield sse({"done": True, "finish_reason": event[1], "stats": event[2]})

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": served.model_name, "object": "model",
                                        "created": int(served.stats.started), "owned_by": "nanochat"}]}


@app.post("/v1/chat/completions")
async def openai_chat_completions(request: Request):
    """OpenAI's Chat Completions. `content` is the reply's text only: the calculator's call and its
    output are left out (the model restates the result in its text; /chat/completions streams them
    as their own events)."""
    chat, tokens = await read_request(request, openai=True)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": served.model_name}

    def usage(n: int) -> dict:
        return {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}

    if (started := await start(chat, tokens, request)) is None:
        return Response(status_code=499)  # nobody is listening
    if not chat.stream:
        texts, finish = [], None
        async with aclosing(chain(*started)) as events:
            async for event in events:
                if event[0] == "text":
                    texts.append(event[1])
                elif event[0] == "error":
                    return error_response(request, 500, event[1])
                elif event[0] == "end":
                    finish, n = event[1], event[2]["tokens"]
        if finish is None:  # the client went away mid-reply
            return Response(status_code=499)
        message = {"role": "assistant", "content": "".join(texts)}
        return {**head, "object": "chat.completion", "usage": usage(n),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}

    def chunk(delta: dict, finish=None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    async def stream():
        yield chunk({"role": "assistant", "content": ""})
        async with aclosing(chain(*started)) as events:
            async for event in events:
                if event[0] == "text":
                    yield chunk({"content": event[1]})
                elif event[0] == "error":
                    error = {"message": event[1], "type": "server_error", "param": None, "code": None}
                    yield sse({"error": error})
                    return
                elif event[0] == "end":
                    yield chunk({}, finish=event[1])
                    if chat.include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage(event[2]["tokens"])})
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


# -----------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve a nanochat model: web UI + streaming API.")
    parser.add_argument("-n", "--num_gpus", type=int, default=1, help="model replicas, one per GPU (CUDA only)")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="model stage")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top_k", type=int, default=50, help="default top-k (0: whole vocabulary)")
    parser.add_argument("-m", "--max_tokens", type=int, default=512, help="default reply length cap in tokens")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--model_tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--device_type", default="", choices=["cuda", "mps", "cpu"], help="default: autodetect")
    parser.add_argument("--compile_decode", type=int, default=None, choices=[0, 1], help="1: capture the decode step as a CUDA graph (compile it off CUDA), 0: eager; default: on for CUDA")
    parser.add_argument("--api_key", default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on the API (default: $NANOCHAT_API_KEY, else none)")
    parser.add_argument("--max_queue", type=int, default=256, help="requests waiting for a worker before a 503")
    parser.add_argument("--max_connections", type=int, default=1000,
                        help="open connections at most (idle ones are closed first to make room)")
    parser.add_argument("--header_timeout", type=float, default=10, help="seconds to send a request's headers")
    parser.add_argument("--body_timeout", type=float, default=30, help="seconds to send a request's body")
    args = parser.parse_args(argv)
    for name, (lo, hi) in [("temperature", TEMPERATURE_RANGE), ("top_k", TOP_K_RANGE), ("max_tokens", MAX_TOKENS_RANGE),
                           ("num_gpus", (1, 1024)), ("max_queue", (1, 10**6)), ("max_connections", (1, 10**6)),
                           ("header_timeout", (0.1, 3600)), ("body_timeout", (0.1, 3600))]:
        if not lo <= getattr(args, name) <= hi:
            parser.error(f"--{name} must be in [{lo}, {hi}], got {getattr(args, name)}")
    return args


def main(argv=None):
    import uvicorn
    args = parse_args(argv)
    # Bind the socket first (a taken port fails before minutes of model loading), ourselves so that
    # -p 0 works and the real address is printed.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections made while the model loads wait for it, not refused
    except OSError as e:
        raise SystemExit(f"chat_web: cannot listen on {args.host}:{args.port} ({e}); use another -p") from None
    try:
        workers, tokenizer, meta = load_workers(args)
    except FileNotFoundError as e:
        raise SystemExit(f"chat_web: {e}") from None
    serve(workers, tokenizer, meta, args)
    urls = reachable_urls(args.host, sock.getsockname()[1])
    print(f"nanochat: serving {args.source} model on {' and '.join(urls)}", flush=True)
    if args.host in ("0.0.0.0", "::", "") and not args.api_key:
        print("chat_web: warning: listening on every interface, with no authentication: anyone who can reach "
              "this machine can use the model (--api_key requires a key)", flush=True)
    # the cap stays below the open-file limit: a flood never takes the last descriptors
    max_connections = min(args.max_connections, raise_fd_limit(args.max_connections + 256) - 128)
    logger.info(f"at most {max_connections} connections, {args.max_queue} queued requests; "
                f"header timeout {args.header_timeout:g}s, body timeout {args.body_timeout:g}s")
    protocol = guarded_protocol(max_connections, args.header_timeout)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2, http=protocol, backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
