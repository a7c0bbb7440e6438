"""
The chat server's workers: one model replica + Engine per GPU (one on CPU/MPS), the pool that lends
them to requests, and the server's counters. Used by scripts/chat_web.py.

A request borrows a worker with `await pool.acquire()` (an asyncio.Queue, so waiting requests queue
fairly) and the generation thread gives it back with `release` when it ends -- after success, error
or client disconnect alike -- so a worker can never leak.
"""

import asyncio
import logging
import os
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
