"""
The data loaders of the two next-token stages, over one packer (`pack_batches`): pretraining
streams documents from the parquet shards and tokenizes them on the fly
(`tokenizing_distributed_data_loader`); midtraining renders conversations
(`conversation_batches`). Both token streams are cut into (B, T) batches of inputs and targets.

Design choices:
- Each rank streams its own row groups (`start=rank, step=world_size`, see dataset.py), so ranks
  see disjoint data with no coordination.
- Documents are tokenized `tokenizer_batch_size` at a time with several threads, each with BOS
  prepended, and concatenated into one stream: a batch may span document boundaries, and BOS tells
  the model where a new document starts. Each batch takes B·T+1 contiguous tokens:
  inputs = tokens[:-1], targets = tokens[1:].
- Exact resume. The packer's buffer is a queue of tokenized chunks, each remembering where it came
  from: (epoch, shard, row group, first document) for pretraining, (epoch, conversation index) for
  midtraining. The state yielded with every batch
  is the position of the oldest chunk still buffered plus how many of its tokens are consumed.
  Tokenization is deterministic, so a loader given that state re-reads and re-tokenizes the chunk,
  drops the consumed tokens and continues with exactly the next token: nothing is repeated or
  skipped, and the state stays a few integers (it goes into the checkpoint's JSON).
- On CUDA each batch is copied into pinned host memory and sent with non_blocking=True. A fresh
  pinned tensor per batch (served by torch's caching host allocator) means the host never
  overwrites memory an in-flight copy is still reading.
- train is infinite (the epoch counter goes up at each pass); val is a single pass.
- Rank r takes row groups (or conversations) r, r + world_size, ...
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


def pack_batches(chunks: Iterator[tuple[tuple, list[int]]], B: int, T: int, device: str | torch.device = "cpu",
                 skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple, int]]:
    """The packer: cut a stream of token chunks into (B, T) batches of inputs and next-token targets.

    `chunks` yields (position, token ids) in stream order; a position is whatever restarts the
    source at that chunk. Yields (inputs (B, T) int64, targets (B, T) int64, position, offset) where
    (position, offset) = the oldest chunk still buffered and how many of its tokens are consumed:
    restart the source at `position` and pass skip=offset to continue with the very next token.
    Each batch takes B·T+1 contiguous tokens. Ends (dropping a last partial batch) with the source."""
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    needed = B * T + 1
    queue = deque()  # [(position, 1-D int64 tensor of tokens)], oldest first
    offset = 0  # tokens of queue[0] already consumed
    buffered = 0  # tokens in the queue not yet consumed

    def take(n: int) -> torch.Tensor | None:
        """The next n tokens of the stream (None when the source runs out first)."""
        nonlocal offset, buffered
        while buffered < n:
            try:
                position, ids = next(chunks)
            except StopIteration:
                return None
            queue.append((position, torch.tensor(ids, dtype=torch.long)))
            buffered += len(ids)
        pieces = []
        while n > 0:
            tokens = queue[0][1]
            if offset == len(tokens):  # fully consumed: only kept until more tokens were needed
                queue.popleft()
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
            return
        scratch = window.pin_memory() if use_cuda else window  # (B·T+1,)
        inputs = scratch[:-1].view(B, T).to(device, non_blocking=use_cuda)  # (B, T)
        targets = scratch[1:].view(B, T).to(device, non_blocking=use_cuda)  # (B, T)
        yield inputs, targets, queue[0][0], offset


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

    position, skip = (0, 0, 0, 0), 0
    if resume_state_dict is not None:
        s = resume_state_dict
        if (s["rank"], s["world_size"], s["split"]) != (rank, world_size, split):
            raise ValueError(f"dataloader state is for rank {s['rank']} of {s['world_size']} ({s['split']}), "
                             f"but this is rank {rank} of {world_size} ({split}): resume with the same "
                             f"number of processes")
        position, skip = (s["epoch"], s["pq_idx"], s["rg_idx"], s["doc_idx"]), s["token_offset"]

    def chunks():  # one chunk = tokenizer_batch_size documents, tokenized together, BOS before each
        for pos, texts in _document_batches(split, rank, world_size, tokenizer_batch_size, position):
            ids = tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)
            yield pos, [t for doc in ids for t in doc]

    for inputs, targets, (epoch, pq_idx, rg_idx, doc_idx), offset in pack_batches(chunks(), B, T, device, skip):
        state = dict(split=split, rank=rank, world_size=world_size, epoch=epoch, pq_idx=pq_idx,
                     rg_idx=rg_idx, doc_idx=doc_idx, token_offset=offset)
        yield inputs, targets, state


def conversation_batches(dataset, tokenizer, B: int, T: int, loop: bool, device: str | torch.device = "cpu",
                         state: dict | None = None):
    """mid_train's data: yield (inputs (B, T), targets (B, T), state, progress) from this rank's
    conversations (rank, rank + world_size, ...) rendered and packed by `pack_batches`, every token
    a target. `state` = (epoch, index) of the oldest conversation still buffered and how many of its
    tokens are consumed: it restarts the stream exactly. progress = epoch + index / len(dataset).
    loop=False: one pass, the last partial batch dropped."""
    _, rank, _, world_size = get_dist_info()
    epoch, index, skip = (state["epoch"], state["index"], state["token_offset"]) if state else (0, rank, 0)

    def chunks():  # one chunk = one rendered conversation
        e, i = epoch, index
        while True:
            if i >= len(dataset):
                if not loop:
                    return
                e, i = e + 1, rank
            ids, _ = tokenizer.render_conversation(dataset[i], max_tokens=None)
            yield (e, i), ids
            i += world_size

    for inputs, targets, (e, i), offset in pack_batches(chunks(), B, T, device, skip):
        yield inputs, targets, dict(epoch=e, index=i, token_offset=offset), e + i / len(dataset)
