"""
Fast inference: a KV cache, batched sampling of several completions of one prompt, and the
calculator tool the model may call in the middle of a reply.

    engine = Engine(model, tokenizer)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64):
        ...  # one token per row per step; mask 0 = forced by the tool, 1 = sampled from the model
    sequences, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

Design choices:
- `KVCache` keeps every layer's keys and values for a batch and grows them by concatenation along
  the time axis, so no resize can ever scramble data. The model calls `insert_kv(layer, k, v)` in
  each attention layer and reads back all keys/values so far; the position advances after the
  last layer. `prefill(other)` copies a batch-1 cache into every row of a batch-N cache.
- `generate` runs the prompt once with batch 1, replicates the cache to `num_samples` rows, and
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
import math
import time
from collections import deque
from collections.abc import Iterator

import torch
import torch.nn.functional as F

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
    """Per-layer keys and values for `batch_size` sequences, grown by concatenation.

    Protocol with the model (nanochat/gpt.py): each attention layer calls
    `insert_kv(layer_idx, k, v)` with the new positions' k, v of shape (B, H, T_new, D) and gets
    back all keys and values so far, (B, H, T_cache + T_new, D); after the last layer the position
    advances by T_new. `get_pos()` is the number of positions cached (the rotary offset)."""

    def __init__(self, batch_size: int, num_layers: int):
        self.batch_size, self.num_layers = batch_size, num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert k.shape == v.shape and k.size(0) == self.batch_size, \
            f"k/v of shape {tuple(k.shape)}/{tuple(v.shape)} for a cache of batch size {self.batch_size}"
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)  # (B, H, T_cache + T_new, D)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        if layer_idx == self.num_layers - 1:
            self.pos += k.size(2)
        return self.keys[layer_idx], self.values[layer_idx]

    def prefill(self, other: KVCache) -> None:
        """Copy a batch-1 cache into every row of this (empty) cache."""
        assert other.batch_size == 1 and other.num_layers == self.num_layers and self.pos == 0, \
            "prefill copies a batch-1 cache with as many layers into an empty cache"
        for i in range(self.num_layers):
            self.keys[i] = other.keys[i].expand(self.batch_size, -1, -1, -1).clone()  # (B, H, T, D)
            self.values[i] = other.values[i].expand(self.batch_size, -1, -1, -1).clone()
        self.pos = other.pos


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


class Engine:
    """Streams completions of a prompt from `model` (a GPT accepting `kv_cache=`), with tool use."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

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

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column), lists of num_samples ints, one step at a time."""
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens), \
            "tokens must be a non-empty list of token ids"
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        num_layers = self.model.config.n_layer

        # prefill the prompt once, with batch 1
        prefill_cache = KVCache(batch_size=1, num_layers=num_layers)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :]  # (1, V)
        cache = KVCache(batch_size=num_samples, num_layers=num_layers)
        cache.prefill(prefill_cache)
        del prefill_cache
        # every row samples its own first token from the same last logits
        logits = logits.expand(num_samples, -1)  # (N, V)

        rows = [_RowState() for _ in range(num_samples)]
        num_generated = 0
        while max_tokens is None or num_generated < max_tokens:
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
            if all(state.done for state in rows):
                return
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)  # (N, 1)
            logits = self.model(ids, kv_cache=cache)[:, -1, :]  # (N, V)

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
