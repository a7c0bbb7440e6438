"""
Preemption (nanochat/preempt.py): a real training run gets SIGTERM while it trains, finishes the
step in flight, saves a complete checkpoint, prints the resume command and exits 0; resumed with
`--resume_from_step=latest`, it ends bit-identical to a run that was never interrupted. On one
process (base_train, chat_sft) and under a real torchrun with 2 gloo ranks, where the signal
reaches one rank only and both must stop after the same step. Also: `latest` and a missing step.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT
from test_base_train import TINY, assert_identical, pretrain_dir, run  # noqa: F401 (a fixture)
from test_chat_stages import SEQ_LEN, chat_base, mini_data  # noqa: F401 (fixtures)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PROGRESS = re.compile(r"^step (\d+)/")


def start(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(torchrun_pid):
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    pids = {}
    for task in os.listdir(f"/proc/{torchrun_pid}/task"):
        for child in open(f"/proc/{torchrun_pid}/task/{task}/children").read().split():
            env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
            ranks = [int(v.split(b"=")[1]) for v in env if v.startswith(b"RANK=")]
            if ranks:
                pids[ranks[0]] = int(child)
    return pids


def interrupt_after_progress(cmd, send, min_step=2, timeout=300):
    """Start cmd, wait for its progress line of step >= min_step, call send(proc), then collect
    (returncode, stdout, stderr)."""
    proc = start(cmd)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        m = PROGRESS.match(line)
        if m and int(m.group(1)) >= min_step:
            send(proc)
            break
        assert time.time() < deadline, "no progress line in time"
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + out, err


def resume_line(stdout):
    m = re.search(r"^resume with: (.*)$", stdout, re.M)
    assert m, stdout[-3000:]
    return m.group(1)


def last_progress_step(stdout):
    return max(int(m) for m in re.findall(r"^step (\d+)/", stdout, re.M))


@pytest.mark.slow
def test_sigterm_saves_and_latest_resumes_exactly(pretrain_dir):  # noqa: F811
    flags = [*TINY, "--num_iterations=60", "--eval_every=-1"]
    root = pretrain_dir / "base_checkpoints"
    rc, out, err = interrupt_after_progress([sys.executable, "-m", "scripts.base_train", *flags, "--model_tag=cut"],
                                            lambda p: p.send_signal(signal.SIGTERM))
    assert rc == 0, err[-3000:]
    stopped = last_progress_step(out)
    assert 2 <= stopped < 60, out[-2000:]  # it stopped early, after the step it was in
    assert "SIGTERM: saving a checkpoint after this optimiser step" in err and "Traceback" not in err
    command = resume_line(out)
    assert command.startswith("python -m scripts.base_train ") and command.endswith(
        f"--model_tag=cut --resume_from_step={stopped}")
    for name in (f"model_{stopped:06d}.pt", f"optim_{stopped:06d}_rank0.pt", f"meta_{stopped:06d}.json"):
        assert (root / "cut" / name).exists(), name
    assert not list((root / "cut").glob("*.tmp*"))

    resumed = run("scripts.base_train", *flags, "--model_tag=cut", "--resume_from_step=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {stopped}" in resumed.stdout
    straight = run("scripts.base_train", *flags, "--model_tag=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in ("model_000060.pt", "optim_000060_rank0.pt"):
        assert_identical(torch.load(root / "straight" / name), torch.load(root / "cut" / name))

    # a step that does not exist names the ones that do; `latest` with nothing saved says so
    missing = run("scripts.base_train", *flags, "--model_tag=cut", "--resume_from_step=7")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"complete steps there: {stopped}, 60" in missing.stderr, missing.stderr
    nothing = run("scripts.base_train", *flags, "--model_tag=none", "--resume_from_step=latest")
    assert nothing.returncode == 1 and "no complete checkpoint in" in nothing.stderr
    assert "Traceback" not in nothing.stderr


def test_first_signal_asks_to_stop_and_a_second_ctrl_c_aborts():
    # the handler, with real signals sent to this process; one process: no collective involved
    from nanochat.common import compute_init
    from nanochat.preempt import Preemption
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        preemption = Preemption("scripts.base_train", compute_init("cpu"))
        assert not preemption.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.should_stop() and preemption.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERMs: still saving, no abort
        assert preemption.should_stop()
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C on top: abort at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_resume_command_keeps_the_flags_and_names_tag_and_step(monkeypatch):
    from nanochat.common import compute_init
    from nanochat.preempt import Preemption
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        preemption = Preemption("scripts.base_train", compute_init("cpu"))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    monkeypatch.setattr(sys, "argv", ["base_train.py", "--", "--depth=4", "--model_tag", "old", "--run=a b",
                                      "--resume_from_step=latest"])
    assert preemption.resume_command(12, "d4") == ("python -m scripts.base_train --depth=4 '--run=a b' "
                                                   "--model_tag=d4 --resume_from_step=12")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers in /proc (Linux)")
def test_two_ranks_stop_at_the_same_step_when_one_gets_sigterm(pretrain_dir):  # noqa: F811
    flags = [*TINY, "--total_batch_size=1024", "--num_iterations=40", "--eval_every=-1"]
    root = pretrain_dir / "base_checkpoints"
    rc, out, err = interrupt_after_progress(
        [*TORCHRUN, "-m", "scripts.base_train", "--", *flags, "--model_tag=cut"],
        lambda p: os.kill(rank_pids(p.pid)[1], signal.SIGTERM))  # rank 1 only: rank 0 must follow
    assert rc == 0, err[-3000:]
    stopped = last_progress_step(out)
    assert 2 <= stopped < 40
    assert resume_line(out).startswith("torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- ")
    meta = json.loads((root / "cut" / f"meta_{stopped:06d}.json").read_text())
    assert meta["world_size"] == 2 and (root / "cut" / f"optim_{stopped:06d}_rank1.pt").exists()

    resumed = run_torchrun(*flags, "--model_tag=cut", "--resume_from_step=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_torchrun(*flags, "--model_tag=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in ("model_000040.pt", "optim_000040_rank0.pt", "optim_000040_rank1.pt"):
        assert_identical(torch.load(root / "straight" / name), torch.load(root / "cut" / name))


@pytest.mark.slow
def test_sigterm_to_torchrun_reaches_every_rank_and_they_save(pretrain_dir):  # noqa: F811
    # what a preempted container does: SIGTERM to torchrun, which passes it to its ranks
    flags = [*TINY, "--total_batch_size=1024", "--num_iterations=40", "--eval_every=-1"]
    rc, out, err = interrupt_after_progress([*TORCHRUN, "-m", "scripts.base_train", "--", *flags, "--model_tag=cut"],
                                            lambda p: p.send_signal(signal.SIGTERM))
    assert rc == 1  # torchrun reports the signal it got (its SignalException); the ranks exit 0
    stopped = last_progress_step(out)
    assert resume_line(out).endswith(f"--model_tag=cut --resume_from_step={stopped}")
    assert err.count("SIGTERM: saving a checkpoint after this optimiser step") == 2  # both ranks
    names = sorted(os.listdir(pretrain_dir / "base_checkpoints" / "cut"))
    assert names == [f"meta_{stopped:06d}.json", f"model_{stopped:06d}.pt", f"optim_{stopped:06d}_rank0.pt",
                     f"optim_{stopped:06d}_rank1.pt"]


def run_torchrun(*flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([*TORCHRUN, "-m", "scripts.base_train", "--", *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sft_sigterm_then_latest_equals_a_straight_run(chat_base):  # noqa: F811
    flags = ["--device_type=cpu", "--source=base", f"--max_seq_len={SEQ_LEN}", "--device_batch_size=2",
             "--target_examples_per_step=4", "--num_iterations=30", "--eval_every=-1", "--eval_steps=1",
             "--eval_metrics_every=-1", "--spelling_scale=0.01"]
    cmd = [sys.executable, "-m", "scripts.chat_sft", *flags]
    rc, out, err = interrupt_after_progress([*cmd, "--model_tag=d2"], lambda p: p.send_signal(signal.SIGTERM))
    assert rc == 0, err[-3000:]
    stopped = last_progress_step(out)
    assert 2 <= stopped < 30
    assert resume_line(out).endswith(f"--model_tag=d2 --resume_from_step={stopped}")
    root = chat_base / "chatsft_checkpoints"
    (root / "d2").rename(root / "cut")  # the straight run below writes d2 again
    resumed = subprocess.run([*cmd, "--model_tag=cut", "--resume_from_step=latest"], cwd=REPO_ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {stopped}" in resumed.stdout
    straight = subprocess.run([*cmd, "--model_tag=d2"], cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in ("model_000030.pt", "optim_000030_rank0.pt"):
        assert_identical(torch.load(root / "d2" / name), torch.load(root / "cut" / name))
