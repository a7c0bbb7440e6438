"""
1 rank = 2 ranks: tests/dist_train_worker.py trains a tiny GPT for a few steps (both optimisers,
gradient accumulation, clipping active, changing LR and momentum) under a real
`torchrun --standalone --nproc_per_node=2` (gloo, CPU), and the same global batch in this process.
The two ranks must end bit-identical to each other and equal to the single process within float
tolerance; the clipping norm must be the synchronised one; optimiser state must be sharded.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from dist_train_worker import CONFIG, MAX_NORM, train


def torchrun_two_ranks(script, out_dir, *args):
    """Run `script out_dir *args` under a real `torchrun --standalone --nproc_per_node=2` (gloo, CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "mdlm"])
def test_two_ranks_train_like_one(tmp_path, objective):
    torchrun_two_ranks(REPO_ROOT / "tests" / "dist_train_worker.py", tmp_path, objective)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(rank=0, world_size=1, objective=objective)
    finally:
        torch.set_num_threads(threads)

    # both ranks hold the same weights, equal to one process's (masked diffusion weights its losses
    # by 1/t, up to 1,000: its rounding differences are larger; other masks move them by ~1)
    atol = 1e-5 if objective == "ar" else 2e-4
    for name, expected in single["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        assert torch.allclose(ranks[0]["params"][name], expected, rtol=1e-4, atol=atol), \
            f"{name}: max diff {(ranks[0]['params'][name] - expected).abs().max()}"
    assert single["unchanged"] == [] and ranks[0]["unchanged"] == []  # every parameter trained

    # clipping saw the averaged gradient: the same norm on both ranks and in one process, which is
    # not the norm of a rank's local gradient
    assert ranks[0]["norms"] == ranks[1]["norms"]
    assert ranks[0]["norms"] == pytest.approx(single["norms"], rel=1e-5)
    assert min(single["norms"]) > MAX_NORM  # clipping was active at every step
    assert single["local_norms"] == pytest.approx(single["norms"], rel=1e-6)
    for r in range(2):
        assert all(abs(a - b) > 1e-3 * b for a, b in zip(ranks[r]["local_norms"], single["norms"]))

    # state is sharded: AdamW keeps rows [34, 33] of the 67-row head/embedding (padded to 68)
    assert [ranks[r]["adamw_rows"][(CONFIG.vocab_size, CONFIG.n_embd)] for r in range(2)] == [34, 33]
    assert single["adamw_rows"][(CONFIG.vocab_size, CONFIG.n_embd)] == CONFIG.vocab_size
    # Muon: each matrix has exactly one owner; 3 layers x 6 matrices in groups of 3 -> 10 and 8
    owned = [set(ranks[r]["muon_owned"]) for r in range(2)]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(single["muon_owned"])
    assert sorted(len(o) for o in owned) == [8, 10]


WORKER_THREADS = """
import os, sys
import torch
from nanochat.common import compute_cleanup, compute_init
from nanochat.chat_evaluation import all_reduce_sum
from nanochat.gpt import GPT, GPTConfig

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
compute = compute_init("cpu")
with torch.device("meta"):  # imports torch._dynamo, as loading a checkpoint does
    GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
assert all_reduce_sum([compute.rank + 1.0], compute.device) == [3.0]
during = threads()
compute_cleanup()
with open(os.path.join(sys.argv[1], f"rank{compute.rank}.txt"), "w") as f:
    f.write(f"{before} {during} {threads()}")
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_cleanup_stops_the_process_groups_threads(tmp_path):
    # gloo's worker threads must be gone once compute_cleanup returns. When something kept the group
    # alive (torch modules imported after init capture it in default arguments), they lived on into
    # interpreter exit, where one still releasing a tensor aborted the rank now and then
    # ("terminate called without an active exception").
    script = tmp_path / "worker.py"
    script.write_text(WORKER_THREADS)
    torchrun_two_ranks(script, tmp_path)
    for rank in range(2):
        before, during, after = map(int, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert during > before, f"rank {rank}: {before} {during} {after}"  # the group's threads did run
        assert after == before, f"rank {rank}: {before} threads before init, {after} after cleanup"
