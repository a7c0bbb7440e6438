"""
Masked diffusion: the second pretraining objective (`base_train --objective=mdlm`), its validation
bound and its sampler.

The same GPT, with two changes: attention is bidirectional (`model.causal = False`) and the
vocabulary has one more token, `<|mask|>`, appended after the tokenizer's specials (`add_mask_token`)
so that no existing id moves.

Training (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025): a row x of T tokens draws a masking
rate t ~ U(eps, 1); every token except BOS is replaced by <|mask|> independently with probability t,
giving z_t; the model reads z_t and predicts the masked tokens. With the linear schedule the
continuous-time ELBO is

    -log p(x) <= E_{t ~ U(0,1)} E_{z_t} [ (1/t) · Σ_{i masked in z_t} -log p_θ(x_i | z_t) ]

and the training loss is one sample of the right-hand side per row, divided by the number of
positions (B·T, the scale of the next-token loss). eps = 1e-3 (MDLM's) keeps 1/t bounded.
The model never predicts <|mask|>: its logit is -inf in the loss and in the sampler (MDLM's
"zero masking probabilities"), so the probabilities are over the real tokens, as the AR model's.

Randomness is a function of the data's place, not of the process: the noise for a training step
is drawn for the whole global batch from a generator seeded with the step (`draw_noise`), and each
micro-batch takes its rows by global row index. So a resumed run masks exactly as the straight
one, and 2 ranks mask exactly as 1 rank with twice the accumulation.

Validation (`evaluate_bpb_bound`): the expectation above with `t_samples` stratified draws of t
per row (t_j uniform in ((j)/K, (j+1)/K], unbiased, lower variance than K independent draws) and
their masks, from a seeded generator: the same checkpoint, batches and ranks give the same figure.
Summed over tokens with a byte length, divided by ln 2 · bytes, it is an upper bound (in
expectation) on the model's bits per byte, comparable with the AR model's exact val bpb.

Sampling (`unmask_generate`, `DiffusionEngine`): the reply starts as max_tokens <|mask|> after
the prompt; each of `steps` full forward passes proposes a token for every masked position
(argmax at temperature 0, else sampled, top-k optional) and commits the most confident ones
(`order="confidence"`, LLaDA's low-confidence remasking) or random ones (`order="random"`, MDLM's
ancestral order), as many as keep the schedule linear. With `block_len` the reply is filled block
by block, left to right (LLaDA's semi-autoregressive mode), the steps split evenly between blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from itertools import islice

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.engine import Engine, sample_next_token
from nanochat.flags import StopRun
from nanochat.loss_eval import bits_per_byte
from nanochat.progress import EvalProgress

OBJECTIVES = ("ar", "mdlm")
MASK_TOKEN = "<|mask|>"
EPS = 1e-3  # smallest training masking rate (MDLM's sampling_eps): 1/t <= 1000
T_SAMPLES = 4  # t draws per validation row


def add_mask_token(tokenizer):
    """The tokenizer with <|mask|> as one more special token, id = the old vocab size (every other
    id unchanged). Idempotent."""
    enc = tokenizer.enc
    if MASK_TOKEN in enc.special_tokens_set:
        return tokenizer
    specials = {**enc._special_tokens, MASK_TOKEN: enc.n_vocab}
    masked = tiktoken.Encoding(name=f"{enc.name}+mask", pat_str=enc._pat_str,
                               mergeable_ranks=enc._mergeable_ranks, special_tokens=specials)
    return type(tokenizer)(masked, "<|bos|>")


def check_objective(found: str, wanted: tuple[str, ...] | str, where: str) -> None:
    """One line (StopRun) when a checkpoint trained with objective `found` is not one of `wanted`."""
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    if found not in wanted:
        names = {"ar": "autoregressive", "mdlm": "masked-diffusion"}
        raise StopRun(f"{where} was trained with --objective={found} ({names.get(found, found)}); this needs "
                      f"--objective={' or '.join(wanted)}: choose another checkpoint (--model_tag/--step) "
                      f"or train one with `python -m scripts.base_train --objective={wanted[0]}`")


# -----------------------------------------------------------------------------
# The forward process and the loss


def draw_noise(rows: int, T: int, seed: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (rows,) in [EPS, 1), u (rows, T) in [0, 1)): masking rates and the uniforms that mask,
    from a generator seeded with `seed` (base_train: the step) on `device`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    t = EPS + (1 - EPS) * torch.rand(rows, generator=generator, device=device)
    u = torch.rand(rows, T, generator=generator, device=device)
    return t, u


def mask_tokens(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int,
                bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t (B, T) and the boolean (B, T) of masked positions: position i of row b is masked when
    u[b, i] < t[b], except BOS, which stays (it marks document starts, as in AR training)."""
    masked = (u < t[:, None]) & (x != bos_id)
    return torch.where(masked, mask_id, x), masked


def masked_nats(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int,
                bos_id: int) -> torch.Tensor:
    """(B, T): (1/t) · -log p_θ(x_i | z_t) at masked positions, 0 elsewhere."""
    z, masked = mask_tokens(x, t, u, mask_id, bos_id)
    logits = model(z)  # (B, T, V) fp32
    logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -float("inf"))
    targets = torch.where(masked, x, -1)
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return nats.view_as(x) / t[:, None]


def diffusion_loss(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int,
                   bos_id: int) -> torch.Tensor:
    """The training loss: the ELBO sample of every row, summed, over B·T positions."""
    return masked_nats(model, x, t, u, mask_id, bos_id).sum() / x.numel()


# -----------------------------------------------------------------------------
# The validation bound


@torch.no_grad()
def evaluate_bpb_bound(model: torch.nn.Module, batches: Iterable, steps: int, token_bytes: torch.Tensor,
                       mask_id: int, bos_id: int, t_samples: int = T_SAMPLES, seed: int = 0,
                       t: float | None = None, name: str = "bpb bound") -> float:
    """Upper bound on bits per byte from the ELBO, over the first `steps` batches (rows x = batch[0],
    (B, T)): `t_samples` stratified t per row, masks from a generator seeded with seed + rank. A
    fixed `t` replaces the draws (t = 1: every token but BOS masked). Tokens of byte length 0
    (BOS, specials) count in neither sum, as in nanochat.loss_eval.evaluate_bpb."""
    device = next(model.parameters()).device
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + rank)
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    bar = EvalProgress(name, steps)
    for done, batch in enumerate(islice(batches, steps), start=1):
        x = batch[0]
        B, T = x.shape
        num_bytes = token_bytes[x]  # (B, T)
        for j in range(t_samples):
            if t is None:  # in (j/K, (j+1)/K]: 1 - rand is in (0, 1], never 0
                tj = (j + 1 - torch.rand(B, generator=generator, device=device)) / t_samples
            else:
                tj = torch.full((B,), float(t), device=device)
            u = torch.rand(B, T, generator=generator, device=device)
            nats = masked_nats(model, x, tj, u, mask_id, bos_id)  # (B, T)
            total_nats += torch.where(num_bytes > 0, nats, 0.0).sum() / t_samples
        total_bytes += num_bytes.sum()
        bar.update(done)
    bar.close()
    return bits_per_byte(total_nats, total_bytes)


# -----------------------------------------------------------------------------
# Sampling by iterative unmasking


@torch.inference_mode()
def unmask_generate(model: torch.nn.Module, tokens: list[int], max_tokens: int, mask_id: int,
                    steps: int | None = None, block_len: int | None = None, temperature: float = 0.0,
                    top_k: int | None = None, order: str = "confidence", num_samples: int = 1,
                    seed: int = 42) -> list[list[int]]:
    """`num_samples` rows of prompt + max_tokens tokens, none of them <|mask|>. steps: forward
    passes (default max_tokens, one token each); block_len: fill blocks of that many tokens left to
    right (default: one block); order 'confidence' commits the positions whose proposed token has
    the highest probability, 'random' random ones. Temperature 0 is argmax (then with 'confidence'
    the output depends on nothing random)."""
    assert isinstance(tokens, list) and tokens, "tokens must be a non-empty list of token ids"
    assert order in ("confidence", "random"), f"order must be 'confidence' or 'random' (got {order!r})"
    assert max_tokens >= 1, f"max_tokens must be >= 1 (got {max_tokens})"
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    P, L = len(tokens), max_tokens
    block_len = min(block_len or L, L)
    num_blocks = math.ceil(L / block_len)
    steps_per_block = max(1, math.ceil((steps or L) / num_blocks))
    x = torch.full((num_samples, P + L), mask_id, dtype=torch.long, device=device)  # (N, P+L)
    x[:, :P] = torch.tensor(tokens, dtype=torch.long, device=device)
    for block in range(num_blocks):
        lo, hi = P + block * block_len, min(P + (block + 1) * block_len, P + L)
        for step in range(steps_per_block):
            left = hi - lo - int((x[0, lo:hi] != mask_id).sum())  # still masked (the same in every row)
            if left == 0:
                break
            n = math.ceil(left / (steps_per_block - step))  # an even share of what is left
            logits = model(x)[:, lo:hi].float()  # (N, W, V)
            logits[..., mask_id] = -float("inf")
            N, W, V = logits.shape
            proposal = sample_next_token(logits.reshape(N * W, V), generator, temperature, top_k).view(N, W)
            if order == "confidence":
                score = F.softmax(logits, dim=-1).gather(-1, proposal[..., None])[..., 0]  # (N, W)
            else:
                score = torch.rand(N, W, generator=generator, device=device)
            score = score.masked_fill(x[:, lo:hi] != mask_id, -1.0)  # only masked positions are chosen
            chosen = score.topk(n, dim=-1).indices  # (N, n)
            x[:, lo:hi] = x[:, lo:hi].scatter(1, chosen, proposal.gather(1, chosen))
    return x.tolist()


class DiffusionEngine(Engine):
    """The Engine's interface (generate, generate_batch) over `unmask_generate`, for the scripts
    that sample a base model (base_loss, base_train, chat_cli -i base). The whole reply is made
    first, then handed out one column at a time, left to right; no tool use."""

    def __init__(self, model, tokenizer, steps: int | None = None, block_len: int | None = None,
                 order: str = "confidence"):
        super().__init__(model, tokenizer, compile_decode=False)
        self.mask_id = tokenizer.encode_special(MASK_TOKEN)
        self.steps, self.block_len, self.order = steps, block_len, order

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        if max_tokens is None:
            max_tokens = max(1, self.model.config.sequence_len - len(tokens))
        rows = unmask_generate(self.model, tokens, max_tokens, self.mask_id, self.steps, self.block_len,
                               temperature, top_k, self.order, num_samples, seed)
        for i in range(len(tokens), len(tokens) + max_tokens):
            yield [row[i] for row in rows], [1] * num_samples
