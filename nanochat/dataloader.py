"""
The pretraining data loader: streams documents from the parquet shards, tokenizes them on the fly
and cuts the token stream into (B, T) batches of inputs and next-token targets.

Design choices:
- Each rank streams its own row groups (`start=rank, step=world_size`, see dataset.py), so ranks
  see disjoint data with no coordination.
- Documents are tokenized `tokenizer_batch_size` at a time with several threads, each with BOS
  prepended, and concatenated into one stream: a batch may span document boundaries, and BOS tells
  the model where a new document starts. Each batch takes B·T+1 contiguous tokens:
  inputs = tokens[:-1], targets = tokens[1:].
- Exact resume. The token buffer is a queue of tokenized chunks, each remembering where its
  documents came from: (epoch, shard, row group, first document). The state yielded with every batch
  is the position of the oldest chunk still buffered plus how many of its tokens are consumed.
  Tokenization is deterministic, so a loader given that state re-reads and re-tokenizes the chunk,
  drops the consumed tokens and continues with exactly the next token: nothing is repeated or
  skipped, and the state stays a few integers (it goes into the checkpoint's JSON).
- On CUDA each batch is copied into pinned host memory and sent with non_blocking=True. A fresh
  pinned tensor per batch (served by torch's caching host allocator) means the host never
  overwrites memory an in-flight copy is still reading.
- train is infinite (the epoch counter goes up at each pass); val is a single pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from nanochat.common import get_dist_info
from nanochat.dataset import iter_row_groups
from nanochat.tokenizer import get_tokenizer


def _document_batches(split: str, rank: int, world_size: int, batch_size: int,
                      position: tuple[int, int, int, int]) -> Iterator[tuple[tuple[int, int, int, int], list[str]]]:
    """Yield ((epoch, shard, row_group, first_doc), texts) for this rank, from `position` on."""
    epoch, pq_idx, rg_idx, doc_idx = position
    while True:
        empty_pass = True
        for s, r, texts in iter_row_groups(split, rank, world_size, resume_from=(pq_idx, rg_idx)):
            empty_pass = False
            first = doc_idx if (s, r) == (pq_idx, rg_idx) else 0
            for i in range(first, len(texts), batch_size):
                yield (epoch, s, r, i), texts[i:i + batch_size]
        if empty_pass and (pq_idx, rg_idx) == (0, 0):
            raise RuntimeError(f"rank {rank} of {world_size} gets no row groups of the {split} split: "
                               f"download more shards (python -m nanochat.dataset -n N) or use fewer ranks")
        if split == "val":
            return
        epoch, pq_idx, rg_idx, doc_idx = epoch + 1, 0, 0, 0


def tokenizing_distributed_data_loader(B: int, T: int, split: str, tokenizer_threads: int = 4,
                                       tokenizer_batch_size: int = 128, device: str | torch.device = "cpu",
                                       resume_state_dict: dict | None = None):
    """Yield (inputs (B, T) int64, targets (B, T) int64, state_dict) forever (train) or for one
    pass (val). `state_dict` describes the position right after this batch: pass it as
    `resume_state_dict` to continue with the very next token. The tokenizer is the base dir's
    (nanochat.tokenizer.get_tokenizer())."""
    assert split in ("train", "val"), f"split must be 'train' or 'val' (got {split!r})"
    _, rank, _, world_size = get_dist_info()
    tokenizer = get_tokenizer()
    bos = tokenizer.get_bos_token_id()
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    needed = B * T + 1

    position, skip = (0, 0, 0, 0), 0
    if resume_state_dict is not None:
        s = resume_state_dict
        if (s["rank"], s["world_size"], s["split"]) != (rank, world_size, split):
            raise ValueError(f"dataloader state is for rank {s['rank']} of {s['world_size']} ({s['split']}), "
                             f"but this is rank {rank} of {world_size} ({split}): resume with the same "
                             f"number of processes")
        position, skip = (s["epoch"], s["pq_idx"], s["rg_idx"], s["doc_idx"]), s["token_offset"]
    batches = _document_batches(split, rank, world_size, tokenizer_batch_size, position)

    chunks = deque()  # [(position, 1-D int64 tensor of tokens)], oldest first
    offset = 0  # tokens of chunks[0] already consumed
    buffered = 0  # tokens in the queue not yet consumed

    def take(n: int) -> torch.Tensor | None:
        """The next n tokens of the stream (None when a val pass runs out)."""
        nonlocal offset, buffered
        while buffered < n:
            try:
                pos, texts = next(batches)
            except StopIteration:
                return None
            ids = tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)
            tokens = torch.tensor([t for doc in ids for t in doc], dtype=torch.long)
            chunks.append((pos, tokens))
            buffered += len(tokens)
        pieces = []
        while n > 0:
            tokens = chunks[0][1]
            if offset == len(tokens):  # fully consumed: only kept until more tokens were needed
                chunks.popleft()
                offset = 0
                continue
            piece = tokens[offset:offset + n]
            pieces.append(piece)
            offset += len(piece)
            buffered -= len(piece)
            n -= len(piece)
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)

    if skip and take(skip) is None:
        return
    while True:
        window = take(needed)
        if window is None:
            return  # end of the val pass; a last partial batch is dropped
        scratch = window.pin_memory() if use_cuda else window  # (B·T+1,)
        inputs = scratch[:-1].view(B, T).to(device, non_blocking=use_cuda)  # (B, T)
        targets = scratch[1:].view(B, T).to(device, non_blocking=use_cuda)  # (B, T)
        (epoch, pq_idx, rg_idx, doc_idx), _ = chunks[0]
        state = dict(split=split, rank=rank, world_size=world_size, epoch=epoch, pq_idx=pq_idx,
                     rg_idx=rg_idx, doc_idx=doc_idx, token_offset=offset)
        yield inputs, targets, state
