"""
Tests for nanochat/dataloader.py: batches are consecutive windows of the BOS-separated token stream,
a loader resumed from any yielded state continues with exactly the next token (across chunk,
row-group, shard and epoch boundaries), and ranks see disjoint data that covers everything.

The data are real documents from the CPU sample's pretraining shard, re-packed into small shards (short
documents, 8 per row group) so that a whole epoch takes a fraction of a second.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.dataset import iter_row_groups


def split_docs(tokenizer, tokens):
    """Token stream -> list of documents (text), split at BOS."""
    bos = tokenizer.get_bos_token_id()
    docs, cur = [], None
    for t in tokens + [bos]:
        if t == bos:
            if cur is not None:
                docs.append(tokenizer.decode(cur))
            cur = []
        elif cur is not None:
            cur.append(t)
    return docs


@pytest.fixture
def small_shards(sample_data, base_dir_with_tokenizer):
    """3 shards (2 train + val) of short real documents, 8 docs per row group, uneven sizes."""
    texts = pq.read_table(sample_data / "pretrain" / "shard_00000.parquet").column("text").to_pylist()
    docs = [t[:150 + 37 * (i % 11)] for i, t in enumerate(texts[:120])]
    data_dir = base_dir_with_tokenizer / "base_data"
    data_dir.mkdir()
    for i, (lo, hi) in enumerate([(0, 44), (44, 90), (90, 120)]):
        pq.write_table(pa.table({"text": docs[lo:hi]}), data_dir / f"shard_{i:05d}.parquet", row_group_size=8)
    return docs


def reference_stream(tokenizer, split, rank=0, world=1):
    """One epoch of this rank's tokens, built straight from the row groups, one document at a time."""
    out = []
    for _, _, texts in iter_row_groups(split, rank, world):
        for text in texts:
            out.extend(tokenizer.encode(text, prepend=tokenizer.get_bos_token_id()))
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def window(batch):
    inputs, targets, _ = batch
    return inputs.reshape(-1).tolist() + targets.reshape(-1)[-1:].tolist()


def test_batches_are_consecutive_windows_of_the_stream(tiny_tokenizer, small_shards):
    B, T = 2, 16
    loader = tokenizing_distributed_data_loader(B, T, "val", tokenizer_batch_size=3)
    batches = list(loader)  # val: one pass, then the generator ends
    ref = reference_stream(tiny_tokenizer, "val")
    need = B * T + 1
    assert len(batches) == len(ref) // need
    for k, (inputs, targets, state) in enumerate(batches):
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.long
        assert window((inputs, targets, state)) == ref[k * need:(k + 1) * need]
        assert torch.equal(inputs.reshape(-1)[1:], targets.reshape(-1)[:-1])  # targets = inputs shifted
    assert batches[0][0][0, 0].item() == tiny_tokenizer.get_bos_token_id()  # a document starts with BOS
    assert split_docs(tiny_tokenizer, ref) == small_shards[90:]


def test_train_is_infinite_over_epochs(tiny_tokenizer, small_shards):
    B, T = 4, 32
    need = B * T + 1
    ref = reference_stream(tiny_tokenizer, "train")
    n = 2 * len(ref) // need + 3  # more than two epochs
    batches = take(tokenizing_distributed_data_loader(B, T, "train"), n)
    stream = ref * 3
    for k, b in enumerate(batches):
        assert window(b) == stream[k * need:(k + 1) * need]
    assert [b[2]["epoch"] for b in batches][-1] == 2


@pytest.mark.parametrize("split,B,T,tbs", [("train", 2, 64, 3), ("train", 3, 50, 128), ("train", 8, 200, 2),
                                          ("val", 1, 40, 1)])
def test_resume_from_every_state_is_exact(tiny_tokenizer, small_shards, split, B, T, tbs):
    straight = tokenizing_distributed_data_loader(B, T, split, tokenizer_batch_size=tbs)
    batches = take(straight, 60) if split == "train" else list(straight)
    seen_positions = set()
    for k in range(len(batches) - 1):
        state = json.loads(json.dumps(batches[k][2]))  # it must survive the checkpoint's JSON
        seen_positions.add((state["epoch"], state["pq_idx"], state["rg_idx"]))
        resumed = tokenizing_distributed_data_loader(B, T, split, tokenizer_batch_size=tbs,
                                                     resume_state_dict=state)
        for j, b in enumerate(take(resumed, min(3, len(batches) - 1 - k))):
            assert window(b) == window(batches[k + 1 + j]), f"resume after batch {k} diverges at +{j}"
            assert b[2] == batches[k + 1 + j][2]
    assert len(seen_positions) >= 3  # the states crossed row groups (and shards, and epochs for B=8)
    if split == "val":  # a resumed val loader ends where the straight one ended
        resumed = tokenizing_distributed_data_loader(B, T, split, tokenizer_batch_size=tbs,
                                                     resume_state_dict=batches[-3][2])
        assert [window(b) for b in resumed] == [window(b) for b in batches[-2:]]
    else:
        assert batches[-1][2]["epoch"] >= (1 if B == 8 else 0)


def test_resume_with_another_tokenizer_batch_size_is_exact(tiny_tokenizer, small_shards):
    B, T = 2, 24
    batches = take(tokenizing_distributed_data_loader(B, T, "train", tokenizer_batch_size=5), 30)
    for k in (0, 7, 19):
        resumed = tokenizing_distributed_data_loader(B, T, "train", tokenizer_batch_size=2,
                                                     resume_state_dict=batches[k][2])
        assert [window(b) for b in take(resumed, 5)] == [window(b) for b in batches[k + 1:k + 6]]


def test_ranks_see_disjoint_data_covering_everything(tiny_tokenizer, small_shards, monkeypatch):
    world = 3
    per_rank_docs = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        B, T = 1, 8
        batches = list(tokenizing_distributed_data_loader(B, T, "val"))
        assert batches and all(b[2]["rank"] == rank for b in batches)
        stream = [t for b in batches for t in window(b)]
        assert stream == reference_stream(tiny_tokenizer, "val", rank, world)[:len(stream)]
        per_rank_docs.append(split_docs(tiny_tokenizer, reference_stream(tiny_tokenizer, "val", rank, world)))
        # a state saved by this rank cannot be resumed by a different world size
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(ValueError, match="same number of processes"):
            next(tokenizing_distributed_data_loader(B, T, "val", resume_state_dict=batches[0][2]))
    all_docs = [d for docs in per_rank_docs for d in docs]
    assert sorted(all_docs) == sorted(small_shards[90:])  # disjoint (no doc twice) and complete
    assert all(per_rank_docs)


def test_too_many_ranks_is_a_clear_error(tiny_tokenizer, small_shards, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "6")  # the val shard has only 4 row groups
    with pytest.raises(RuntimeError, match="no row groups"):
        next(tokenizing_distributed_data_loader(1, 8, "val"))


# -----------------------------------------------------------------------------
# The packer, as mid_train uses it: rendered conversations


def conversations(n: int) -> list[dict]:
    """n short, distinct conversations of uneven length."""
    return [{"messages": [{"role": "user", "content": f"question {i}: " + "why? " * (i % 7)},
                          {"role": "assistant", "content": f"answer {i} " * (1 + i % 5)}]} for i in range(n)]


@pytest.mark.parametrize("B,T", [(1, 16), (2, 40), (3, 100)])
def test_conversation_batches_pack_the_rendered_stream_and_resume_exactly(tiny_tokenizer, B, T):
    from nanochat.dataloader import conversation_batches
    dataset = conversations(23)
    stream = [t for c in dataset for t in tiny_tokenizer.render_conversation(c, max_tokens=None)[0]]
    need = B * T + 1
    one_pass = list(conversation_batches(dataset, tiny_tokenizer, B, T, loop=False))
    assert len(one_pass) == len(stream) // need  # the last partial batch is dropped
    for k, b in enumerate(one_pass):
        assert window(b[:3]) == stream[k * need:(k + 1) * need]
    looped = take(conversation_batches(dataset, tiny_tokenizer, B, T, loop=True), 2 * len(one_pass) + 3)
    assert looped[-1][2]["epoch"] >= 1 and looped[-1][3] > 1  # progress counts epochs
    for k in range(len(looped) - 1):
        state = json.loads(json.dumps(looped[k][2]))
        resumed = conversation_batches(dataset, tiny_tokenizer, B, T, loop=True, state=state)
        for j, b in enumerate(take(resumed, min(2, len(looped) - 1 - k))):
            assert window(b[:3]) == window(looped[k + 1 + j][:3]), f"resume after batch {k} diverges at +{j}"
            assert b[2] == looped[k + 1 + j][2]
