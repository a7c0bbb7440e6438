"""
Multi-node training, tested on one machine: two separate `torchrun --nnodes=2 --nproc_per_node=1`
launchers (node ranks 0 and 1, gloo, static rendezvous on 127.0.0.1) run tests/dist_train_worker.py,
as two machines would. The result must be bit-identical to the same two ranks started by one
launcher (`--standalone --nproc_per_node=2`): the nodes change how processes find each other, not
the arithmetic. One process with the same global batch agrees within float tolerance (its gradient
is summed in a different order), which tests/test_distributed.py checks in detail.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from test_distributed import torchrun_two_ranks

WORKER = REPO_ROOT / "tests" / "dist_train_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_exactly_like_two_local_ranks(tmp_path):
    nodes_dir, local_dir = tmp_path / "nodes", tmp_path / "local"
    nodes_dir.mkdir()
    local_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    port = free_port()
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                   f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                                   str(WORKER), str(nodes_dir)],
                                  env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for node in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in launchers]
    finally:
        for p in launchers:
            p.kill()
    for node, p in enumerate(launchers):
        assert p.returncode == 0, f"node {node} failed:\n{outputs[node][-3000:]}"

    torchrun_two_ranks(WORKER, local_dir)
    for rank in range(2):
        on_nodes, local = torch.load(nodes_dir / f"rank{rank}.pt"), torch.load(local_dir / f"rank{rank}.pt")
        assert on_nodes["norms"] == local["norms"]
        for name, value in local["params"].items():
            assert torch.equal(on_nodes["params"][name], value), f"rank {rank}: {name} differs"
    first = torch.load(nodes_dir / "rank0.pt")["params"]
    assert all(torch.equal(first[n], v) for n, v in torch.load(nodes_dir / "rank1.pt")["params"].items())
