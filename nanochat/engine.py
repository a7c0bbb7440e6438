"""
Fast inference: a KV cache, batched sampling of several completions of one prompt, and the
calculator tool the model may call in the middle of a reply.

    engine = Engine(model, tokenizer)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64):
        ...  # one token per row per step; mask 0 = forced by the tool, 1 = sampled from the model
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

Design choices:
- `KVCache` is preallocated, in the reference's shape: per layer (batch, kv_heads, max_len,
  head_dim) in the model's dtype, with the write position in a device tensor. Attention reads the
  whole cache through a length mask, so no shape changes while decoding and a captured step
  replays at any position. The Engine sizes it for the whole request (prompt + max_tokens) and
  refuses, with a clear error, a request past the model's rotary tables: never a wrap.
- On CUDA (`compile_decode`, default on there) the one-token step is captured once as a CUDA
  graph (`CudaGraphStep`) per static batch bucket 1, 2, 4, ..., 64, each with one cache of
  `sequence_len` positions; a step is then one launch instead of ~1,000 kernel launches from
  Python. `warmup(batch_sizes)` captures them ahead of time. The graph holds the eager step, not a
  `torch.compile(mode="reduce-overhead")` one: measured at d20 on an H200, inductor copied the
  whole KV cache on every step (55 ms/step at batch 32, vs 3.9 ms for the captured eager step;
  2.4 vs 2.1 ms at batch 1). Elsewhere `compile_decode=True` means plain `torch.compile` (no
  graphs; the tests compare it with the eager step). CPU and MPS decode eagerly by default. Weights already in bf16 (inference on CUDA) run without
  autocast; fp32 weights (training, RL) under the caller's autocast.
- Per step, the tokens are sampled on the device and one column of token ids comes to the host
  (the tool-use state machine and streaming need it): no other host sync.
- `generate` runs the prompt once with batch 1 (into row 0), copies it to `num_samples` rows, and
  samples the **first token of every row independently** from the prompt's last logits (sampling
  it once and broadcasting would make every sample start alike). Temperature 0 is argmax; top-k
  keeps the k largest logits, then softmax; a seeded torch.Generator makes runs repeatable.
- Tool use, per row: the tokens between `<|python_start|>` and `<|python_end|>` are decoded and
  given to `use_calculator`; if it returns a value, `<|output_start|>`, the value's tokens and
  `<|output_end|>` are forced into that row (mask 0: the tool wrote them, not the model), and
  the model continues after them, as it saw in training (tasks/gsm8k.py).
- A row is finished once it produced `<|assistant_end|>` or `<|bos|>`. The stream stays
  rectangular: finished rows keep receiving (meaningless) tokens until every row is done or
  `max_tokens` is reached; `generate_batch` drops everything from a row's stop token on.
- The calculator never calls eval(): it parses the expression with `ast` and walks a whitelist of
  node types itself (numbers, + - * / //, unary minus, parentheses; or `"literal".count("literal")`),
  with a length cap and a wall-clock deadline checked at every node (no signals, so it works in
  any thread, e.g. a web server's worker). Anything else returns None: there is no path from the
  input to a name lookup, an attribute other than `count`, a call other than `str.count`, or `**`.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterator

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# The calculator

MAX_EXPRESSION_CHARS = 256
ARITHMETIC_CHARS = set("0123456789+-*/(). ")
_BINARY_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}
_UNARY_OPS = {ast.USub: lambda a: -a, ast.UAdd: lambda a: +a}


class _Rejected(Exception):
    """The expression is not one the calculator accepts."""


def _arithmetic(node: ast.AST, deadline: float) -> int | float:
    if time.monotonic() > deadline:
        raise _Rejected("timeout")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _arithmetic(node.left, deadline), _arithmetic(node.right, deadline)
        return _BINARY_OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_arithmetic(node.operand, deadline))
    raise _Rejected(type(node).__name__)


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is str


def _format(value: int | float) -> str | None:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer() and abs(value) < 1e15:
            value = int(value)  # 48/2 -> "24", as in the GSM8K annotations
    return str(value)


def use_calculator(expr: str, timeout: float = 0.5) -> str | None:
    """The value of an arithmetic expression (digits, + - * / ( ) . and spaces, commas in numbers
    ignored; no `**`) or of `"some text".count("t")`, as a string; None for anything else."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPRESSION_CHARS:
        return None
    expr = expr.strip()
    quoted = '"' in expr or "'" in expr
    if not quoted:
        expr = expr.replace(",", "")  # 1,000 + 2 -> 1000 + 2
        if not expr or not set(expr) <= ARITHMETIC_CHARS or "**" in expr:
            return None
    deadline = time.monotonic() + timeout
    try:
        tree = ast.parse(expr, mode="eval").body  # parsing runs nothing
        if not quoted:
            return _format(_arithmetic(tree, deadline))
        # the only other form: "literal".count("literal")
        if (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Attribute) and tree.func.attr == "count"
                and _is_str(tree.func.value) and len(tree.args) == 1 and _is_str(tree.args[0]) and not tree.keywords):
            return str(tree.func.value.value.count(tree.args[0].value))
        return None
    except (_Rejected, SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values: per layer (batch_size, num_kv_heads, max_len, head_dim) in the
    model's dtype, and the write position as a device tensor.

    Protocol with the model (nanochat/gpt.py): `positions(T)` gives the new tokens' positions;
    each attention layer calls `insert_kv(layer_idx, k, v)` with k, v (B, H, T, D), B <= batch_size
    (a batch-1 prompt goes into row 0), and gets back the layer's whole cache for those rows with
    a mask (T, max_len) of the positions each new token may attend to. After the last layer the
    position advances by T. Nothing here reads the device to the host, and no shape depends on the
    position, so a compiled step replays at every position.
    Positions past `max_len` are an error (index out of range), never a wrap: the Engine sizes the
    cache for the whole request, and refuses a request it cannot fit."""

    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.batch_size, self.num_layers, self.max_len = batch_size, num_layers, max_len
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # positions cached so far
        self.arange = torch.arange(max_len, device=device)  # (max_len,)
        for t in (self.k, self.v, self.pos, self.arange):  # fixed addresses: a CUDA graph may keep them
            torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        self.pos.zero_()

    def positions(self, T: int) -> torch.Tensor:
        return self.pos + self.arange[:T]  # (T,)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T = k.size(0), k.size(2)
        positions = self.positions(T)  # (T,)
        keys, values = self.k[layer_idx, :B], self.v[layer_idx, :B]  # (B, H, max_len, D) views
        keys[:, :, positions] = k.to(keys.dtype)  # in place (an index_put_ that compilers keep in place)
        values[:, :, positions] = v.to(values.dtype)
        mask = self.arange[None, :] <= positions[:, None]  # (T, max_len): itself and everything before
        if layer_idx == self.num_layers - 1:
            self.pos.add_(T)
        return keys, values, mask

    def replicate_first_row(self, length: int) -> None:
        """Copy row 0's first `length` positions into every other row (after a batch-1 prefill)."""
        self.k[:, 1:, :, :length] = self.k[:, :1, :, :length]
        self.v[:, 1:, :, :length] = self.v[:, :1, :, :length]


# -----------------------------------------------------------------------------
# Sampling and the engine


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1). Temperature 0: argmax. top_k None or 0: no cut.
    Drawn over the full vocabulary (top-k by masking), so with batch 1 and the same seed it draws
    exactly what the naive GPT.generate draws."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = F.softmax(logits / temperature, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class _RowState:
    """Where one row of the batch is in its reply: tool-use state and forced tokens."""

    def __init__(self):
        self.forced: deque[int] = deque()  # tokens to emit instead of sampling (the tool's output)
        self.in_python = False
        self.python_tokens: list[int] = []
        self.done = False


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # static batch sizes of the captured decode step


def _decode_step(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row: ids (B, 1) -> next-token logits (B, V)."""
    return model(ids, kv_cache=cache)[:, -1, :]


class CudaGraphStep:
    """The eager one-token step for a fixed batch and cache, captured once as a CUDA graph.
    Calling it copies the new ids into the graph's input, replays every kernel with one launch,
    and returns the graph's logits buffer (B, V), overwritten by the next call. The cache's
    position tensor advances inside the graph, so one capture serves every position."""

    def __init__(self, model, cache: KVCache, batch: int):
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=cache.k.device)  # static input
        side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lets cuBLAS/cuDNN pick kernels and allocate workspaces first
                _decode_step(model, self.ids, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = _decode_step(model, self.ids, cache)  # (B, V), static output
        cache.reset()

    def __call__(self, model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


class Engine:
    """Streams completions of a prompt from `model` (a GPT accepting `kv_cache=`), with tool use.

    compile_decode: None = on for CUDA, off elsewhere. When on, each batch bucket gets one cache of
    `sequence_len` positions, kept for the engine's life (d20: ~210 MB per row in bf16), and the
    one-token step is captured as a CUDA graph on CUDA (plain torch.compile elsewhere).
    A request that does not fit a bucket (more than 64 rows, or longer than sequence_len) runs
    eagerly with a cache sized for it. One generation at a time per Engine."""

    def __init__(self, model, tokenizer, compile_decode: bool | None = None, batch_buckets=BATCH_BUCKETS):
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.device = next(model.parameters()).device
        self.compile_decode = self.device.type == "cuda" if compile_decode is None else compile_decode
        self.batch_buckets = tuple(sorted(batch_buckets))
        self._static = {}  # (bucket, dtype) -> (KVCache of sequence_len positions, its step)
        self._compiled = None  # torch.compile'd step, off CUDA

    def _step_row(self, state: _RowState, token: int) -> None:
        """Advance one row's tool-use state machine after it emitted `token`."""
        if token in self.stop_tokens:
            state.done = True
        if token == self.python_start:
            state.in_python, state.python_tokens = True, []
        elif token == self.python_end and state.in_python:
            state.in_python = False
            result = use_calculator(self.tokenizer.decode(state.python_tokens)) if state.python_tokens else None
            if result is not None:
                state.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif state.in_python:
            state.python_tokens.append(token)

    def _cache_dtype(self) -> torch.dtype:
        """What k and v are: the autocast dtype under autocast, else the weights' dtype."""
        if torch.is_autocast_enabled(self.device.type):
            return torch.get_autocast_dtype(self.device.type)
        return next(self.model.parameters()).dtype

    def _precision(self):
        """Weights already in a 16-bit dtype (inference on CUDA): no autocast, nothing to cast.
        fp32 weights (training, RL's sampler) keep the caller's autocast."""
        low = next(self.model.parameters()).dtype != torch.float32
        return torch.autocast(self.device.type, enabled=False) if low else contextlib.nullcontext()

    def _new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype) -> KVCache:
        cfg = self.model.config
        head_dim = cfg.n_embd // cfg.n_head
        return KVCache(batch_size, cfg.n_layer, cfg.n_kv_head, head_dim, max_len, self.device, dtype)

    def _static_cache(self, bucket: int, dtype: torch.dtype):
        """(the bucket's cache, its step), captured or compiled and warmed up on first use; None if
        that failed (then the engine decodes eagerly)."""
        key = (bucket, dtype)
        if key not in self._static:
            cache = self._new_cache(bucket, self.model.config.sequence_len, dtype)
            try:
                with self._precision():
                    if self.device.type == "cuda":
                        step = CudaGraphStep(self.model, cache, bucket)
                    else:
                        if self._compiled is None:
                            self._compiled = torch.compile(_decode_step, dynamic=False)
                        step = self._compiled
                        for _ in range(2):  # trace and compile now, not in the first request
                            step(self.model, torch.zeros((bucket, 1), dtype=torch.long, device=self.device), cache)
                cache.reset()
            except Exception as e:  # a broken compiler or driver must not take serving down
                logger.warning(f"compiled decode failed ({type(e).__name__}: {e}); decoding eagerly")
                self.compile_decode = False
                return None
            self._static[key] = (cache, step)
        return self._static[key]

    @torch.inference_mode()
    def warmup(self, batch_sizes=(1,)) -> float:
        """Compile and capture the decode step for the buckets of these batch sizes, so that no
        request waits for it. Returns the seconds it took (0 when compile_decode is off)."""
        t0 = time.perf_counter()
        if self.compile_decode:
            for n in batch_sizes:
                bucket = next((b for b in self.batch_buckets if b >= n), None)
                if bucket is not None:
                    self._static_cache(bucket, self._cache_dtype())
        return time.perf_counter() - t0

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column), lists of num_samples ints, one step at a time.
        max_tokens None: until every row stops or the context (sequence_len) is full."""
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens), \
            "tokens must be a non-empty list of token ids"
        cfg = self.model.config
        if max_tokens is None:
            max_tokens = max(1, cfg.sequence_len - len(tokens))
        needed = len(tokens) + max_tokens  # positions the cache must hold (the last token is never fed)
        limit = getattr(self.model, "rotary_seq_len", needed)
        if needed > limit:
            raise ValueError(f"a prompt of {len(tokens)} tokens plus max_tokens={max_tokens} needs {needed} "
                             f"positions; the model has {limit} (10x its sequence_len): shorten one of them")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        dtype = self._cache_dtype()
        bucket = next((b for b in self.batch_buckets if b >= num_samples), None)
        static = None
        if self.compile_decode and bucket is not None and needed <= cfg.sequence_len:
            static = self._static_cache(bucket, dtype)
        if static is not None:
            (cache, step), rows_fed = static, bucket  # rows past num_samples are padding
        else:
            cache = self._new_cache(num_samples, needed, dtype)
            step, rows_fed = _decode_step, num_samples
        cache.reset()

        # prefill the prompt once, into row 0, then copy it to every row
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # (1, T)
        with self._precision():
            logits = self.model(ids, kv_cache=cache)[:, -1, :]  # (1, V)
        cache.replicate_first_row(len(tokens))
        # every row samples its own first token from the same last logits
        logits = logits.expand(num_samples, -1)  # (N, V)

        rows = [_RowState() for _ in range(num_samples)]
        padding = [0] * (rows_fed - num_samples)
        num_generated = 0
        while num_generated < max_tokens:
            # sampled on the device; this column is the one transfer to the host per step
            sampled = sample_next_token(logits, generator, temperature, top_k)[:, 0].tolist()  # (N,)
            token_column, mask_column = [], []
            for state, token in zip(rows, sampled):
                forced = bool(state.forced)
                if forced:
                    token = state.forced.popleft()
                token_column.append(token)
                mask_column.append(0 if forced else 1)
                self._step_row(state, token)
            yield token_column, mask_column
            num_generated += 1
            if all(state.done for state in rows) or num_generated == max_tokens:
                return
            ids = torch.tensor(token_column + padding, dtype=torch.long, device=self.device).unsqueeze(1)  # (B, 1)
            with self._precision():
                try:
                    logits = step(self.model, ids, cache)[:num_samples]  # (N, V)
                except Exception as e:  # e.g. CUDA graphs refused in this thread: the same step, eagerly
                    if step is _decode_step:
                        raise
                    logger.warning(f"compiled decode step failed ({type(e).__name__}: {e}); decoding eagerly")
                    self.compile_decode, step = False, _decode_step
                    logits = step(self.model, ids, cache)[:num_samples]

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Full sequences (prompt included, stop token excluded) and masks (0 for the prompt and for
        tool output, 1 for sampled tokens), one per sample."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return sequences, masks
