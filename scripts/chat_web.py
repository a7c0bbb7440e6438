"""
Chat with a trained model in the browser, or through an OpenAI-compatible API.

Run:
    python -m scripts.chat_web                          # the SFT model on one GPU (or the CPU), port 8000
    python -m scripts.chat_web -n 8                     # 8 GPUs: one model replica per GPU
    python -m scripts.chat_web -i rl -t 0.6 -k 40 -p 8080
    python -m scripts.chat_web --device_type cpu --host 127.0.0.1 -p 0   # 0: any free port (printed)
and open http://localhost:8000. Endpoints:
    GET  /                     the chat UI (nanochat/ui.html)
    POST /chat/completions     {messages, temperature?, top_k?, max_tokens?, seed?} -> Server-Sent Events
                               data: {"token": "..."} ... data: {"done": true}
    POST /v1/chat/completions  the OpenAI Chat Completions API, streaming or not, so OpenAI clients work:
                               OpenAI(base_url="http://localhost:8000/v1", api_key="none")
    GET  /v1/models            the model being served
    GET  /health, GET /stats   liveness; workers, requests, tokens

Design choices:
- A worker pool: one model replica + Engine per GPU (one worker on CPU/MPS). A request waits for a
  free worker (an asyncio.Queue) and the worker goes back into the queue when its generation thread
  ends -- after success, error or client disconnect alike -- so a worker can never leak.
- Generation runs in a thread per request, off the event loop, so streams interleave and the server
  answers /health while generating. The thread checks a stop flag at every token: a client that goes
  away frees its worker at the next token.
- Only complete UTF-8 is sent: a token can be part of a multi-byte character (an emoji is 4 bytes,
  often several tokens), so token bytes go through an incremental UTF-8 decoder (StreamDecoder).
- Bodies are validated by hand in nanochat/chat_api.py, not by pydantic, so every bad request --
  invalid JSON, wrong types, unknown roles, empty or oversized messages, out-of-range parameters --
  is a 400 whose JSON says what is wrong and how to fix it; never a 422 or a 500.
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

from nanochat.chat_api import (MAX_BODY_BYTES, MAX_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_K_RANGE, ChatRequest,
                               RequestError, StreamDecoder, parse_chat_request, parse_json_body)

logger = logging.getLogger("nanochat.chat_web")

# -----------------------------------------------------------------------------
# Workers: one model replica + Engine per device


@dataclass
class Worker:
    index: int
    device: object  # torch.device
    engine: object  # nanochat.engine.Engine
    autocast: object  # () -> context manager (bf16 on CUDA); thread-local, so entered in the thread


class WorkerPool:
    """Requests borrow a worker with `await acquire()`; the generation thread gives it back."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.queue: asyncio.Queue = asyncio.Queue()
        for worker in workers:
            self.queue.put_nowait(worker)
        self.waiting = 0

    async def acquire(self) -> Worker:
        self.waiting += 1
        try:
            return await self.queue.get()
        finally:
            self.waiting -= 1

    def release(self, worker: Worker) -> None:  # on the event loop's thread
        self.queue.put_nowait(worker)

    @property
    def available(self) -> int:
        return self.queue.qsize()


@dataclass
class Stats:
    started: float
    requests_served: int = 0  # replies that ran to the end (stop token or max_tokens)
    requests_cancelled: int = 0  # the client went away mid-reply
    requests_failed: int = 0  # generation raised
    requests_rejected: int = 0  # 4xx answers
    in_flight: int = 0
    tokens_generated: int = 0


def load_workers(args) -> tuple[list[Worker], object, dict]:
    """One replica per GPU (or one on CPU/MPS); returns (workers, tokenizer, meta)."""
    import torch
    from nanochat.checkpoint_manager import SOURCES, find_largest_model, load_model
    from nanochat.common import compute_init, get_base_dir
    from nanochat.engine import Engine
    compute = compute_init(args.device_type)
    if compute.device_type == "cuda":
        if args.num_gpus > torch.cuda.device_count():
            raise SystemExit(f"-n/--num_gpus {args.num_gpus}: only {torch.cuda.device_count()} GPU(s) visible")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        if args.num_gpus != 1:
            raise SystemExit(f"-n/--num_gpus {args.num_gpus} needs CUDA; on {compute.device_type} there is one worker")
        devices = [compute.device]
    if args.model_tag is None:  # resolve it once: every replica loads the same model, /v1/models names it
        try:
            args.model_tag = find_largest_model(os.path.join(get_base_dir(), SOURCES[args.source][0]))
        except FileNotFoundError as e:
            producer = SOURCES[args.source][1]
            raise FileNotFoundError(f"no {args.source} checkpoint ({e}); `{producer}` writes them") from e
    workers, tokenizer, meta = [], None, None
    for i, device in enumerate(devices):
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        args.step = meta["step"]  # the same step on every replica, even if a newer one lands meanwhile
        model.to(compute.compute_dtype)  # bf16 weights on CUDA, cast once
        engine = Engine(model, tokenizer, compile_decode=None if args.compile_decode is None else bool(args.compile_decode))
        logger.info(f"worker {i}: decode step warm-up (compile_decode={engine.compile_decode}) took {engine.warmup((1,)):.1f}s")
        workers.append(Worker(i, device, engine, compute.autocast))
        logger.info(f"worker {i}: {args.source} model (step {meta['step']}) on {device}")
    return workers, tokenizer, meta


# -----------------------------------------------------------------------------
# The app


def create_app(workers: list[Worker], tokenizer, meta: dict, args) -> "FastAPI":  # noqa: F821
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="nanochat")
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    model_name = f"nanochat-{args.source}-{args.model_tag}-step{meta['step']}"
    context_len = meta["model_config"]["sequence_len"]
    stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    import nanochat
    ui_path = os.path.join(os.path.dirname(nanochat.__file__), "ui.html")  # shipped as package data
    pool = WorkerPool(workers)  # its queue binds to the server's event loop on first use
    stats = Stats(started=time.time())

    # ------------------------------------------------------------------ errors -> JSON, never 422
    def error_response(request, status: int, message: str, param=None):
        stats.requests_rejected += status < 500
        if request.url.path.startswith("/v1/"):  # OpenAI's shape, so its client shows the message
            kind = "invalid_request_error" if status < 500 else "server_error"
            content = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        else:
            content = {"error": message}
        return JSONResponse(content, status_code=status)

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc: RequestError):
        return error_response(request, exc.status, str(exc), exc.param)

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
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the body is larger than {MAX_BODY_BYTES:,} bytes", status=413)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise RequestError(f"the body is larger than {MAX_BODY_BYTES:,} bytes", status=413)
        chat = parse_chat_request(parse_json_body(bytes(raw)), defaults, openai=openai)
        tokens = tokenizer.render_for_completion({"messages": chat.messages + [{"role": "assistant", "content": ""}]})
        if len(tokens) >= context_len:
            raise RequestError(f"the conversation is {len(tokens):,} tokens; this model reads at most {context_len:,}: "
                               f"start a new conversation", param="messages")
        chat.max_tokens = min(chat.max_tokens, context_len - len(tokens))
        return chat, tokens

    # ------------------------------------------------------------------ generation
    async def generate(chat: ChatRequest, tokens: list[int]):
        """Async iterator of ("text", str) events, then ("end", finish_reason, n_tokens) or ("error", msg).
        The worker is returned by the generation thread when it ends, however the request ends."""
        request_id = secrets.token_hex(4)
        logger.info(f"[{request_id}] {len(chat.messages)} message(s), {len(tokens)} prompt tokens, "
                    f"T={chat.temperature} k={chat.top_k} max={chat.max_tokens} seed={chat.seed}; "
                    f"user: {chat.messages[-1]['content'][:500]!r}")
        worker = await pool.acquire()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        stats.in_flight += 1

        def put(*event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        def run():  # in its own thread
            import torch
            decoder, reply, n, finish, t0 = StreamDecoder(tokenizer), [], 0, "length", time.time()
            last = ("error", "generation was interrupted")  # the stream's final event
            try:
                with torch.inference_mode(), worker.autocast():
                    for token_column, _ in worker.engine.generate(tokens, num_samples=1, max_tokens=chat.max_tokens,
                                                                  temperature=chat.temperature,
                                                                  top_k=chat.top_k or None, seed=chat.seed):
                        if stop.is_set():
                            finish = "cancelled"
                            break
                        token = token_column[0]
                        if token in stop_ids:
                            finish = "stop"
                            break
                        n += 1
                        if text := decoder.push(token):
                            reply.append(text)
                            put("text", text)
                dt = time.time() - t0
                logger.info(f"[{request_id}] worker {worker.index}: {finish}, {n} tokens in {dt:.2f}s "
                            f"({n / max(dt, 1e-9):.1f} tok/s); assistant: {''.join(reply)[:500]!r}")
                last = ("end", finish, n)
            except Exception as e:
                finish = "error"
                logger.exception(f"[{request_id}] generation failed")
                last = ("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                def finish_request():  # on the event loop: the worker is free before the client hears "done"
                    stats.in_flight -= 1
                    stats.tokens_generated += n
                    stats.requests_served += finish in ("stop", "length")
                    stats.requests_cancelled += finish == "cancelled"
                    stats.requests_failed += finish not in ("stop", "length", "cancelled")
                    pool.release(worker)
                    events.put_nowait(last)
                try:
                    loop.call_soon_threadsafe(finish_request)
                except RuntimeError:  # the event loop is gone (server shutting down)
                    pass

        threading.Thread(target=run, name=f"generate-{request_id}", daemon=True).start()
        try:
            while True:
                event = await events.get()
                yield event
                if event[0] != "text":
                    return
        finally:
            stop.set()  # no await here: this also runs when the client's disconnect cancels us

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    # ------------------------------------------------------------------ endpoints
    @app.get("/")
    async def root():
        with open(ui_path, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "defaults": defaults,
                "workers_total": len(workers), "workers_available": pool.available}

    @app.get("/stats")
    async def get_stats():
        return {"model": model_name, "workers_total": len(workers), "workers_available": pool.available,
                "requests_waiting": pool.waiting, "requests_in_flight": stats.in_flight,
                "requests_served": stats.requests_served, "requests_cancelled": stats.requests_cancelled,
                "requests_failed": stats.requests_failed, "requests_rejected": stats.requests_rejected,
                "tokens_generated": stats.tokens_generated, "uptime_s": round(time.time() - stats.started, 1),
                "workers": [{"index": w.index, "device": str(w.device)} for w in workers]}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        chat, tokens = await read_request(request, openai=False)

        async def stream():
            async with aclosing(generate(chat, tokens)) as events:
                async for event in events:
                    if event[0] == "text":
                        yield sse({"token": event[1]})
                    elif event[0] == "error":
                        yield sse({"error": event[1]})
            yield sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream", headers=sse_headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(stats.started),
                                            "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        chat, tokens = await read_request(request, openai=True)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_name}

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}

        if not chat.stream:
            texts = []
            async with aclosing(generate(chat, tokens)) as events:
                async for event in events:
                    if event[0] == "text":
                        texts.append(event[1])
                    elif event[0] == "error":
                        return error_response(request, 500, event[1])
                    else:
                        finish, n = event[1], event[2]
            message = {"role": "assistant", "content": "".join(texts)}
            return {**head, "object": "chat.completion", "usage": usage(n),
                    "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}

        def chunk(delta: dict, finish=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            async with aclosing(generate(chat, tokens)) as events:
                async for event in events:
                    if event[0] == "text":
                        yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        error = {"message": event[1], "type": "server_error", "param": None, "code": None}
                        yield sse({"error": error})
                        return
                    else:
                        yield chunk({}, finish=event[1])
                        if chat.include_usage:
                            yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(event[2])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers=sse_headers)

    return app


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
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--model_tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--device_type", default="", choices=["cuda", "mps", "cpu"], help="default: autodetect")
    parser.add_argument("--compile_decode", type=int, default=None, choices=[0, 1], help="1: compile the decode step (CUDA graphs), 0: eager; default: on for CUDA")
    args = parser.parse_args(argv)
    for name, value, (lo, hi) in [("temperature", args.temperature, TEMPERATURE_RANGE),
                                  ("top_k", args.top_k, TOP_K_RANGE),
                                  ("max_tokens", args.max_tokens, MAX_TOKENS_RANGE)]:
        if not lo <= value <= hi:
            parser.error(f"--{name} must be in [{lo}, {hi}], got {value}")
    if args.num_gpus < 1:
        parser.error(f"--num_gpus must be at least 1, got {args.num_gpus}")
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
    except OSError as e:
        raise SystemExit(f"chat_web: cannot listen on {args.host}:{args.port} ({e}); use another -p") from None
    try:
        workers, tokenizer, meta = load_workers(args)
    except FileNotFoundError as e:
        raise SystemExit(f"chat_web: {e}") from None
    app = create_app(workers, tokenizer, meta, args)
    port = sock.getsockname()[1]
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print(f"nanochat: serving {args.source} model on http://{shown}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
