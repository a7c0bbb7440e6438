"""
A pure-Python BPE trainer and encoder: small, slow, and obviously correct. The reference that the
Rust trainer (rustbpe) and the tiktoken export are tested against.

The rules (rustbpe implements exactly these, incrementally):
- Split each text into chunks with the regex; identical chunks are counted once with a weight.
  A chunk starts as its UTF-8 bytes (ids 0..255) and never merges across chunk boundaries.
- The count of a pair = sum over chunks of weight × number of adjacent positions holding the pair
  (overlaps count: "aaa" holds (a, a) twice).
- Each step merges the pair with the highest count; ties go to the smallest pair (left, right).
  The new token's id is 256 + step. Inside a chunk the merge is applied left to right without
  overlap ("aaa" → [aa, a]).
- Training stops early when no pair is left.
"""

from collections import Counter

import regex

# The GPT-4 split pattern with digit runs capped at two. Kept here on its own (not imported from
# nanochat.tokenizer) so the reference stays independent of what it checks.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, left to right, without overlap."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, vocab_size: int, pattern: str = SPLIT_PATTERN) -> list[tuple[tuple[int, int], int]]:
    """Learn vocab_size - 256 merges from an iterable of strings: [((left, right), new_id), ...]."""
    assert vocab_size >= 256
    split = regex.compile(pattern)
    chunk_counts = Counter(chunk for text in texts for chunk in split.findall(text))
    words = [(list(chunk.encode("utf-8")), count) for chunk, count in chunk_counts.items()]
    merges = []
    for new_id in range(256, vocab_size):
        pair_counts = Counter()
        for ids, count in words:
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        merges.append((best, new_id))
        words = [(merge(ids, best, new_id), count) for ids, count in words]
    return merges


def mergeable_ranks(merges) -> dict[bytes, int]:
    """{token bytes: id}: the 256 single bytes, then each merged token."""
    vocab = {i: bytes([i]) for i in range(256)}
    for (left, right), new_id in merges:
        vocab[new_id] = vocab[left] + vocab[right]
    return {token: i for i, token in vocab.items()}


def encode(text: str, merges, pattern: str = SPLIT_PATTERN) -> list[int]:
    """Encode with the learned merges: in each chunk, merge the lowest-id pair present until none is."""
    rank = {pair: new_id for pair, new_id in merges}
    out = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            ids = merge(ids, pair, rank[pair])
        out.extend(ids)
    return out
