"""
Tests for nanochat/loss_eval.py: evaluate_bpb against a hand computation (pure Python math) with a
stand-in model whose logits are a fixed table, and 2 gloo ranks against 1 process.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb

V = 11  # vocab: tokens 0..9 are "bytes-ish" tokens of 1-3 bytes, 10 is a special token (0 bytes)
TOKEN_BYTES = torch.tensor([1, 2, 3, 1, 1, 2, 3, 1, 2, 1, 0], dtype=torch.int32)


class TableModel(torch.nn.Module):
    """logits(next | current) = table[current]: a bigram model, enough to exercise the loss path."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g))

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.table[idx]  # (B, T, V)
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


def make_batches(n=6, B=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        y[torch.rand(B, T, generator=g) < 0.2] = -1  # ignored positions
        batches.append((x, y))
    return batches


def hand_bpb(model, batches):
    table = model.table.detach().tolist()
    nats, nbytes = 0.0, 0
    for x, y in batches:
        for cur, nxt in zip(x.view(-1).tolist(), y.view(-1).tolist()):
            if nxt == -1 or TOKEN_BYTES[nxt] == 0:
                continue
            row = table[cur]
            log_z = math.log(sum(math.exp(v) for v in row))
            nats += log_z - row[nxt]
            nbytes += int(TOKEN_BYTES[nxt])
    return nats / (math.log(2) * nbytes)


def test_matches_hand_computation():
    model = TableModel()
    batches = make_batches()
    assert any((y == 10).any() for _, y in batches) and any((y == -1).any() for _, y in batches)
    got = evaluate_bpb(model, iter(batches), steps=len(batches), token_bytes=TOKEN_BYTES)
    assert got == pytest.approx(hand_bpb(model, batches), rel=1e-5)
    # steps caps the number of batches; extra items in a batch tuple (the loader's state) are ignored
    with_state = [(x, y, {"epoch": 0}) for x, y in batches]
    assert evaluate_bpb(model, iter(with_state), steps=2, token_bytes=TOKEN_BYTES) == pytest.approx(
        hand_bpb(model, batches[:2]), rel=1e-5)
    # running out of batches before `steps` evaluates what there is
    assert evaluate_bpb(model, iter(batches), steps=100, token_bytes=TOKEN_BYTES) == pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="no target token"):
        evaluate_bpb(model, iter([]), steps=5, token_bytes=TOKEN_BYTES)


def _rank_main(rank, world, init_file, out_file, n):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    batches = make_batches(n)[rank::world]
    bpb = evaluate_bpb(TableModel(), iter(batches), steps=len(batches), token_bytes=TOKEN_BYTES)
    torch.save(bpb, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("n", [6, 1])  # n=1: rank 1 has no batch, but still joins the all-reduce
def test_two_ranks_equal_one(tmp_path, n):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "bpb"), n), nprocs=2, join=True)
    expected = hand_bpb(TableModel(), make_batches(n))
    for rank in range(2):
        assert torch.load(tmp_path / f"bpb.{rank}") == pytest.approx(expected, rel=1e-5)
