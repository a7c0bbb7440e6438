"""
Bits per byte (bpb): the validation loss that does not depend on the tokenizer.

Mean cross-entropy per token changes with the vocabulary (a bigger vocab has fewer, harder tokens),
so models with different tokenizers cannot be compared on it. bpb spreads the loss over the raw
UTF-8 bytes the tokens stand for:

    bpb = sum of per-token loss in nats / (ln 2 · sum of the byte lengths of those target tokens)

Targets of -1 (ignored positions) and special tokens (byte length 0 in `token_bytes.pt`) count
neither in the numerator nor in the denominator. Under torchrun each rank evaluates its own batches
and the two sums are all-reduced, so every rank returns the same number.

`greedy_samples` is the other quick look at a base model (base_train and base_loss): greedy
continuations of SAMPLE_PROMPTS.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice

import torch
import torch.distributed as dist

from nanochat.progress import EvalProgress


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable, steps: int, token_bytes: torch.Tensor,
                 name: str = "bpb") -> float:
    """bpb of `model` on the first `steps` batches of `batches` (each (inputs, targets, ...), both
    (B, T)); stops early if the batches run out. `token_bytes` is the int tensor [vocab] of byte
    lengths. The model is called as model(inputs, targets, loss_reduction='none'). Progress (in
    batches) is shown as `name` by nanochat.progress.EvalProgress."""
    device = next(model.parameters()).device
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    bar = EvalProgress(name, steps)
    for done, batch in enumerate(islice(batches, steps), start=1):
        x, y = batch[0], batch[1]
        loss = model(x, y, loss_reduction="none").reshape(-1).float()  # (B*T,) nats per position
        y = y.reshape(-1)  # (B*T,)
        num_bytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)  # (B*T,) 0 for ignored/special
        total_nats += torch.where(num_bytes > 0, loss, 0.0).sum()
        total_bytes += num_bytes.sum()
        bar.update(done)
    bar.close()
    return bits_per_byte(total_nats, total_bytes)


def bits_per_byte(total_nats: torch.Tensor, total_bytes: torch.Tensor) -> float:
    """This rank's sums of nats and of bytes (scalar tensors), added over ranks, as bits per byte."""
    if dist.is_available() and dist.is_initialized():
        # every rank takes part, even one whose batches ran out, so the collectives always match
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("bits per byte over no target token with a byte length > 0 "
                         "(no batches: empty val split or steps=0?)")
    return total_nats.item() / (math.log(2) * total_bytes.item())


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def greedy_samples(model: torch.nn.Module, tokenizer, autocast, max_tokens: int = 16) -> list[str]:
    """Greedy (temperature 0) continuations of SAMPLE_PROMPTS with the KV-cache engine (a masked
    diffusion model: iterative unmasking), run under the `autocast()` context factory (compute.autocast)."""
    from nanochat.diffusion import DiffusionEngine  # imported here: the engines are only needed for samples
    from nanochat.engine import Engine
    if getattr(model, "causal", True):
        engine = Engine(model, tokenizer, compile_decode=False)  # 16 tokens do not repay a graph capture
    else:  # masked diffusion: max_tokens masks after the prompt, one unmasked per step, most confident first
        engine = DiffusionEngine(model, tokenizer)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast():
            sequences, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=0)
        samples.append(tokenizer.decode(sequences[0][1:]))
    return samples
