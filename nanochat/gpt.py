"""
The GPT model: a decoder-only, pre-norm Transformer, written as pure math.

    config = GPTConfig.from_depth(20, vocab_size=65536)     # d20: 560,988,160 parameters
    with torch.device("meta"):
        model = GPT(config)                                 # shapes only, no memory
    model.to_empty(device=device)                           # allocate (garbage)
    model.init_weights()                                    # set every parameter and buffer
    loss = model(idx, targets)                              # idx, targets: (B, T) int64
    logits = model(idx)                                     # (B, T, vocab_size), fp32

Architecture (the reference nanochat's): token embedding `wte` (untied from `lm_head`) -> RMSNorm -> n_layer
blocks [x + attn(norm(x)); x + mlp(norm(x))] -> RMSNorm -> `lm_head` -> 15·tanh(logits/15).
- RMSNorm has no learnable weight, and no layer has a bias.
- Rotary position embeddings (base 10,000) on q and k, then RMSNorm of q and k ("QK norm": keeps
  attention logits bounded without a learned scale). Grouped-query attention when
  n_kv_head < n_head (n_kv_head = 1 is multi-query).
- MLP 4x wide with ReLU² (relu(x)**2: cheap, and it trains better than GELU in small-model
  speedruns such as modded-nanogpt).
- Logits soft-capped at 15 (in the matmul's dtype, as the reference; then fp32 for the loss), so
  logits can neither overflow bf16 nor grow without bound.

Parameters are fp32, except the embedding when `init_weights(embedding_dtype=torch.bfloat16)`: the
reference's CUDA layout (the caller decides: `Compute.compute_dtype` in nanochat/common.py). With a
bf16 embedding the residual stream is bf16 under autocast, which is what saves activation memory
(1.10x the reference's peak at d20 with fp32); an fp32 embedding keeps AdamW's small updates to it
from being rounded away. Under bf16 autocast the matmuls run in bf16 either way.

This file never looks at ranks or devices: gradient synchronisation lives in the optimisers
(nanochat/optim.py), device choice in nanochat/common.py. Parameter names follow the original
nanochat (`transformer.wte`, `transformer.h.{i}.attn.c_q`, ..., `lm_head`).

KV-cache protocol (the cache class is nanochat.engine.KVCache): an object with
- `positions(T) -> (T,)` int64 tensor on the device: the positions of the T new tokens (their
  rotary angles). A device tensor, not an int, so one captured decode step replays at any position;
- `insert_kv(layer_idx, k, v) -> (k_all, v_all, mask)`: writes k, v of the new positions, (B,
  n_kv_head, T, head_dim), and returns the layer's whole cache (B, n_kv_head, max_len, head_dim) with
  a boolean mask (T, max_len), True where a new token may attend (every cached position up to its
  own). The cache advances its position when the last layer has inserted.
Attention is then causal without a cache, and the masked SDPA with one: the same code for a
prompt, a chunk after a prefix and a single decoded token, and no shape changes while decoding.
`model.causal = False` makes attention bidirectional (masked diffusion, nanochat/diffusion.py; no cache).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.fused_loss import softcap_cross_entropy
from nanochat.optim import AdamW, Muon


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 1280

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048) -> GPTConfig:
        """Every size from one dial: model_dim = 64·depth (aspect ratio 64), head dim 128."""
        model_dim = 64 * depth
        num_heads = max(1, math.ceil(model_dim / 128))
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                   n_kv_head=num_heads, n_embd=model_dim)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, without a learnable weight."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) of x (B, T, H, D) by the angles in cos/sin (1, T, 1, D/2)."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # tables are fp32; under bf16 autocast x is bf16
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=3)


def precompute_rotary(seq_len: int, head_dim: int, base: float = 10000.0,
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (1, seq_len, 1, head_dim/2) in fp32: angle = position · base^(-2i/head_dim)."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)  # (D/2,)
    inv_freq = 1.0 / (base ** (channel / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)  # (seq_len,)
    freqs = torch.outer(t, inv_freq)  # (seq_len, D/2)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd {config.n_embd} must divide into n_head {config.n_head} heads"
        assert config.n_head % config.n_kv_head == 0, f"n_head {config.n_head} must be a multiple of n_kv_head {config.n_kv_head}"
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache=None,
                causal: bool = True) -> torch.Tensor:
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm, after rotary
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        enable_gqa = self.n_head != self.n_kv_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)
        else:
            k, v, mask = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, Hkv, max_len, D), (T, max_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)  # (B, T, 4C)
        x = F.relu(x).square()  # ReLU²
        return self.c_proj(x)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache=None,
                causal: bool = True) -> torch.Tensor:
        x = x + self.attn(norm(x), cos_sin, kv_cache, causal)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables for 10x the training length, so generation can run past it. Not saved in
        # checkpoints (persistent=False): init_weights() recomputes them.
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = precompute_rotary(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)  # (1, 10·T, 1, D/2)
        self.register_buffer("sin", sin, persistent=False)
        # The fused head + loss (nanochat/fused_loss.py: the same math, less memory traffic) or the
        # plain ops. Whoever places the model decides: nanochat.common.use_fused_loss.
        self.fused_loss = False
        # False: every position attends to every other (the masked-diffusion objective,
        # nanochat/diffusion.py). Whoever builds the model sets it from the checkpoint's objective.
        self.causal = True

    @torch.no_grad()
    def init_weights(self, embedding_dtype: torch.dtype = torch.float32) -> None:
        """Set every parameter and buffer (after `to_empty`, all of them hold garbage), and store the
        embedding in `embedding_dtype` (bf16: the reference's CUDA layout)."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # Uniform in ±√3/√n_embd has std 1/√n_embd, like a normal init, without its outliers.
        bound = math.sqrt(3) / math.sqrt(self.config.n_embd)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(linear.weight, -bound, bound)
            # Output projections start at zero: every block begins as the identity on the residual.
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        head_dim = self.config.n_embd // self.config.n_head
        self.cos, self.sin = precompute_rotary(self.rotary_seq_len, head_dim, device=self.lm_head.weight.device)
        self.transformer.wte.to(dtype=embedding_dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V) in fp32; with targets (B, T) (-1 = ignore) -> the
        cross-entropy loss (a scalar for 'mean'/'sum', (B, T) for 'none')."""
        B, T = idx.size()
        assert self.causal or kv_cache is None, "a KV cache needs causal attention"
        if kv_cache is None:
            assert T <= self.rotary_seq_len, f"{T} positions exceed the rotary tables ({self.rotary_seq_len} = 10x sequence_len)"
            cos_sin = self.cos[:, :T], self.sin[:, :T]  # (1, T, 1, D/2)
        else:
            positions = kv_cache.positions(T)  # (T,) on the device: no host sync
            cos_sin = self.cos[:, positions], self.sin[:, positions]  # (1, T, 1, D/2)
        x = norm(self.transformer.wte(idx))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, self.causal)
        x = norm(x)
        softcap = 15.0
        if targets is not None and self.fused_loss:  # the same math, see nanochat/fused_loss.py
            losses = softcap_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.view(-1), softcap)
            if loss_reduction == "none":
                return losses.view(B, T)
            assert loss_reduction in ("mean", "sum"), f"loss_reduction must be mean, sum or none ({loss_reduction!r})"
            return losses.sum() if loss_reduction == "sum" else losses.sum() / (targets != -1).sum()
        logits = self.lm_head(x)  # (B, T, V), bf16 under autocast or with bf16 weights
        # soft-cap in that dtype, then fp32 for the loss (the reference's order: the tanh keeps a
        # bf16 copy for backward, not an fp32 one; |logits| <= 15 cannot overflow bf16)
        logits = (softcap * torch.tanh(logits / softcap)).float()
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """FLOPs per token of forward + backward: 6 per matmul weight (2 forward, 4 backward; the
        embedding is a lookup, not a matmul) plus attention's 12·layers·heads·head_dim·T."""
        num_matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        cfg = self.config
        attention = 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.sequence_len
        return 6 * num_matmul_params + attention

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
        """[AdamW for lm_head and wte, Muon for every matrix in the blocks]. The AdamW rates are
        given for n_embd 768 and scaled by (n_embd/768)^-0.5 (1/√width, as μP suggests for
        Adam-trained layers). Every rate is then multiplied by lr_scale (the fine-tuning stages'
        --init_lr_frac). Each group keeps its `initial_lr`, which the schedules multiply.
        Both optimisers synchronise gradients across ranks themselves when torch.distributed is up."""
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(matrix_params) + len(embedding_params) + len(lm_head_params) == len(list(self.parameters()))
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = AdamW([dict(params=lm_head_params, lr=unembedding_lr * scale * lr_scale),
                       dict(params=embedding_params, lr=embedding_lr * scale * lr_scale)],
                      betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        muon = Muon(matrix_params, lr=matrix_lr * lr_scale, momentum=0.95)  # base/mid ramp it via optim.step
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Yield `max_tokens` tokens continuing `tokens`, one at a time, with a full forward pass per
        token (no KV cache): slow, obviously correct, the reference nanochat.engine is tested against.
        Temperature 0 is argmax; top_k keeps the k largest logits before sampling."""
        assert isinstance(tokens, list) and tokens, "tokens must be a non-empty list of token ids"
        device = self.lm_head.weight.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            if temperature == 0.0:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)  # (1, 1)
            else:
                if top_k is not None and 0 < top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (1, 1)
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (1, 1)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
