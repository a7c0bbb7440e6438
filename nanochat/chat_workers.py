"""
The chat server's capacity: its workers (one model replica + Engine per GPU, one on CPU/MPS), the
pool that lends them to requests, the server's counters, and the guard on its connections. Used by
scripts/chat_web.py.

A request borrows a worker with `await pool.acquire()` (an asyncio.Queue, so waiting requests queue
fairly) and the generation thread gives it back with `release` when it ends -- after success, error
or client disconnect alike -- so a worker can never leak. A request that finds `max_queue` others
already waiting is turned away (503) instead of queueing without bound.

Connections (uvicorn has no header timeout and no connection cap, so slow clients can hold every
file descriptor -- "slowloris"): `guarded_protocol` wraps uvicorn's HTTP protocol so that
- a connection that has not sent a request's headers within `header_timeout` seconds of opening
  (or of its previous response, on a kept-alive connection) is closed;
- at most `max_connections` are open: a new one beyond that closes the oldest connection that has
  no request in progress (a slow or idle one), so a slow flood cannot lock out a real client; only
  when every connection is busy with a request is the new one closed.
"""

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass

logger = logging.getLogger("nanochat.chat_web")

@dataclass
class Worker:
    index: int
    device: object  # torch.device
    engine: object  # nanochat.engine.Engine
    autocast: object  # () -> context manager (bf16 on CUDA); thread-local, so entered in the thread


class WorkerPool:
    """Requests borrow a worker with `await acquire()`; the generation thread gives it back."""

    def __init__(self, workers: list[Worker], max_queue: int = 256):
        self.workers, self.max_queue = workers, max_queue
        self.queue: asyncio.Queue = asyncio.Queue()
        for worker in workers:
            self.queue.put_nowait(worker)
        self.waiting = 0

    @property
    def full(self) -> bool:
        """No free worker and max_queue requests already waiting for one: answer 503."""
        return self.queue.empty() and self.waiting >= self.max_queue

    async def acquire(self) -> Worker:  # cancellable: a cancelled wait takes no worker
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
    requests_busy: int = 0  # 503: the queue was full
    in_flight: int = 0
    tokens_generated: int = 0


# -----------------------------------------------------------------------------
# One request's generation, and watching its client


def run_generation(worker: Worker, tokenizer, stop_ids: set, chat, tokens: list[int], stop, put,
                   t_request: float, request_id: str) -> tuple[tuple, str, int]:
    """In a request's own thread: decode the reply to `tokens` on `worker`, handing each ReplyStream
    event to put(event) as it comes, and stopping at the next token once `stop` (a threading.Event)
    is set. Returns (the last event, finish reason, tokens generated); the last event is ("end",
    finish, stats) or ("error", message) -- the exception's first line; the traceback is logged."""
    import torch
    from nanochat.chat_api import ReplyStream
    reply, n, finish, t_first, text = ReplyStream(tokenizer), 0, "length", None, []
    try:
        with torch.inference_mode(), worker.autocast():
            for token_column, _ in worker.engine.generate(tokens, num_samples=1, max_tokens=chat.max_tokens,
                                                          temperature=chat.temperature,
                                                          top_k=chat.top_k or None, seed=chat.seed):
                if stop.is_set():
                    finish = "cancelled"
                    break
                t_first = t_first or time.time()
                token = token_column[0]
                if token in stop_ids:
                    finish = "stop"
                    break
                n += 1
                for event in reply.push(token):
                    text.append(event[1] if event[0] == "text" else f"[{event[0]}: {event[1]}]")
                    put(event)
        for event in reply.finish():
            put(event)
    except Exception as e:
        logger.exception(f"[{request_id}] generation failed")
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        return ("error", f"generation failed ({type(e).__name__}: {detail}); the server log has the details"), "error", n
    t_end = time.time()
    speed = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else None
    numbers = {"tokens": n, "prompt_tokens": len(tokens), "ttft_s": round(t_first - t_request, 4) if t_first else None,
               "tokens_per_s": round(speed, 2) if speed else None}
    logger.info(f"[{request_id}] worker {worker.index}: {finish}, {n} tokens in {t_end - t_request:.2f}s "
                f"({numbers['tokens_per_s']} tok/s); assistant: {''.join(text)[:500]!r}")
    return ("end", finish, numbers), finish, n


async def until_disconnected(request) -> None:  # a starlette Request
    """Returns when the client has gone away. (Reading also lets uvicorn notice a closed socket.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(awaitable, disconnected: asyncio.Task):
    """The awaitable's result, or None (the awaitable cancelled) if the client goes away first."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when we are cancelled: an orphaned acquire() would take a worker for ever
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None



def load_workers(args) -> tuple[list[Worker], object, dict]:
    """One replica per GPU (or one on CPU/MPS); returns (workers, tokenizer, meta)."""
    import torch
    from nanochat.checkpoint_manager import SOURCES, find_largest_model, load_model
    from nanochat.common import base_dir_path, compute_init
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
            args.model_tag = find_largest_model(os.path.join(base_dir_path(), SOURCES[args.source][0]))
        except FileNotFoundError as e:
            producer = SOURCES[args.source][1]
            raise FileNotFoundError(f"no {args.source} checkpoint ({e}); `{producer}` writes them") from e
    workers, tokenizer, meta = [], None, None
    for i, device in enumerate(devices):
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        args.step = meta["step"]  # the same step on every replica, even if a newer one lands meanwhile
        model.to(compute.compute_dtype)  # bf16 weights on CUDA, cast once: no autocast while decoding
        compile_decode = None if args.compile_decode is None else bool(args.compile_decode)
        engine = Engine(model, tokenizer, compile_decode=compile_decode)
        seconds = engine.warmup((1,))  # capture the batch-1 step now, so no user waits for it
        logger.info(f"worker {i}: decode step warm-up (compile_decode={engine.compile_decode}) took {seconds:.1f}s")
        workers.append(Worker(i, device, engine, compute.autocast))
        logger.info(f"worker {i}: {args.source} model (step {meta['step']}) on {device}")
    return workers, tokenizer, meta


# -----------------------------------------------------------------------------
# Connections: a header timeout and a cap that sheds the idle first


def guarded_protocol(max_connections: int, header_timeout: float) -> type:
    """uvicorn's HTTP protocol class (h11 or httptools, whichever uvicorn picks) with the two rules
    in the module docstring. Pass it as uvicorn.Config(http=...)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    idle: dict = {}  # connections with no request in progress, oldest first (a dict as an ordered set)

    class GuardedProtocol(AutoHTTPProtocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.update()
            if len(self.connections) > max_connections:  # shed the oldest idle one (maybe this one)
                oldest = next(iter(idle))  # this connection is idle, so there is one
                oldest.transport.close()
                oldest.forget()

        def data_received(self, data: bytes):
            super().data_received(data)
            self.update()

        def on_response_complete(self):
            super().on_response_complete()
            self.update()

        def connection_lost(self, exc):
            self.forget()
            super().connection_lost(exc)

        def update(self):  # busy from a request's headers to the end of its response; else idle
            busy = self.cycle is not None and not self.cycle.response_complete
            if busy or self.transport.is_closing():
                self.forget()
            elif self not in idle:
                idle[self] = None
                self.header_timer = self.loop.call_later(header_timeout, self.too_slow)

        def forget(self):
            idle.pop(self, None)
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def too_slow(self):
            self.header_timer = None
            if self in idle:
                logger.info(f"closing a connection that sent no request within {header_timeout:g}s")
                self.transport.close()
                self.forget()

    return GuardedProtocol


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted` (up to the hard limit); returns it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def reachable_urls(host: str, port: int) -> list[str]:
    """The URLs a browser can use: the host itself, or for a wildcard (0.0.0.0, ::) loopback first
    and then every address of this machine's interfaces."""
    if host not in ("0.0.0.0", "::", ""):
        return [f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"]
    import psutil
    urls = [f"http://127.0.0.1:{port}"]
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                urls.append(f"http://{address.address}:{port}")
            elif host == "::" and address.family == socket.AF_INET6 and not address.address.startswith(("fe80", "::1")):
                urls.append(f"http://[{address.address}]:{port}")
    return urls
