"""
Tests for nanochat/progress.py: the one training progress line (format, EMA, clock, ETA, resume,
a data-fraction horizon), that every training stage prints it through TrainProgress, and the
evaluation progress: a bar redrawn in place on a real terminal (a pty), plain lines in a pipe.
"""

import os
import pty
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT
from nanochat.common import Compute
from nanochat.progress import EvalProgress, TrainProgress

CPU = Compute(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), device_type="cpu")
LINE = re.compile(r"^step (\d{5})/(~?\d{5}) \(([\d.]+)%\) \| loss ([\d.]+) \| lrm ([\d.]+) \| dt ([\d.]+)ms \| "
                  r"tok/s ([\d,]+) \| mfu (n/a|[\d.]+%) \| time ([\d.]+)m \| eta ([\d.]+)m(.*)$")


def lines(text):
    return [LINE.match(line) for line in text.splitlines()]


def test_train_line_format_ema_clock_and_eta(capsys):
    progress = TrainProgress(CPU, num_iterations=10, flops_per_token=1e6, first_step=0)
    losses = [4.0, 3.0, 2.0, 1.0]
    for step, loss in enumerate(losses, start=1):
        metrics = progress.update(step, loss, lrm=0.5, dt=2.0, tokens=1000, extra={"reward": 0.25, "n": 12345})
    found = lines(capsys.readouterr().out)
    assert all(found) and len(found) == 4
    last = found[-1]
    assert last[1] == "00004" and last[2] == "00010" and last[3] == "40.00" and last[5] == "0.5000"
    assert last[6] == "2000.00" and last[7] == "500" and last[8] == "n/a"  # no peak known on the CPU
    ema = 0.0
    for loss in losses:
        ema = 0.9 * ema + 0.1 * loss
    assert float(last[4]) == pytest.approx(ema / (1 - 0.9 ** 4), abs=1e-6) == metrics["loss"]
    assert progress.total_time == 6.0 and progress.timed_steps == 3  # the first step (warm-up) is not timed
    assert last[9] == "0.10" and last[10] == "0.2"  # 6 s; 6 steps left x 2 s
    assert last[11] == " | reward 0.2500 | n 12,345"
    assert metrics["tok_per_sec"] == 500 and "mfu" not in metrics


def test_train_line_resumes_from_its_state(capsys):
    straight = TrainProgress(CPU, 6, 1e6, first_step=0)
    for step in range(1, 7):
        straight.update(step, 5.0 / step, 1.0, 100, dt=1.0)
    expected = capsys.readouterr().out.splitlines()[3:]
    first = TrainProgress(CPU, 6, 1e6, first_step=0)
    for step in range(1, 4):
        first.update(step, 5.0 / step, 1.0, 100, dt=1.0)
    resumed = TrainProgress(CPU, 6, 1e6, first_step=3, state=first.state())
    capsys.readouterr()
    for step in range(4, 7):
        resumed.update(step, 5.0 / step, 1.0, 100, dt=1.0)
    got = capsys.readouterr().out.splitlines()
    # the same loss (EMA continued); the resumed process does not time its own first step
    assert [lines(g)[0][4] for g in got] == [lines(e)[0][4] for e in expected]


def test_train_line_with_a_data_fraction_horizon(capsys):
    progress = TrainProgress(CPU, None, 1e6, first_step=0, ema_beta=0.0)
    progress.update(5, 2.5, 1.0, 100, fraction=0.25, dt=1.0)
    line = lines(capsys.readouterr().out)[0]
    assert line[2] == "~00020" and line[3] == "25.00" and line[4] == "2.500000"


def test_mfu_with_a_known_peak(capsys):
    progress = TrainProgress(CPU, 10, flops_per_token=1e9, first_step=0)
    progress.peak_flops = 1e12  # what a known GPU would give
    metrics = progress.update(1, 1.0, 1.0, dt=1.0, tokens=100)
    assert metrics["mfu"] == pytest.approx(10.0) and "mfu 10.00%" in capsys.readouterr().out


def test_the_step_clock_runs_from_start_step(capsys):
    progress = TrainProgress(CPU, 10, flops_per_token=1e6, first_step=0)
    progress.start_step()
    time.sleep(0.05)
    metrics = progress.update(1, 1.0, 1.0, tokens=100)  # no dt: measured
    assert 0.05 <= metrics["dt"] < 5.0


@pytest.mark.parametrize("stage", ["base_train", "mid_train", "chat_sft", "chat_rl"])
def test_every_training_stage_prints_the_one_line(stage):
    source = (REPO_ROOT / "scripts" / f"{stage}.py").read_text()
    assert "progress_line = TrainProgress(" in source and "progress_line.update(step," in source
    assert not re.search(r"print0\(f\"step \{step:05d\}/", source)  # no line of its own
    assert "progress_line.state()" in source  # the checkpoint keeps the EMA and the clock
    assert "progress_line.start_step()" in source and "time.time()" not in source  # one clock for all


# -----------------------------------------------------------------------------
# Evaluation progress

SCRIPT = """
import time
from nanochat.progress import EvalProgress
bar = EvalProgress("ARC-Easy", 5, interval=0.0)
for done in range(1, 6):
    bar.update(done, f"({done * 20}% correct)")
bar.close()
print("done")
"""


def run_eval_script(on_terminal: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if not on_terminal:
        proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    return out.decode().replace("\r\n", "\n")  # the pty turns \n into \r\n


def test_eval_progress_in_a_pipe_is_plain_lines():
    out = run_eval_script(on_terminal=False)
    assert "\r" not in out and "\x1b" not in out
    assert out.splitlines() == [f"ARC-Easy: {d}/5 ({d * 20}% correct)" for d in range(1, 6)] + \
        ["ARC-Easy: 5/5 (100% correct)", "done"]


def test_eval_progress_on_a_terminal_is_a_bar_redrawn_in_place():
    out = run_eval_script(on_terminal=True)
    assert out.count("\r\x1b[K") == 5 and out.endswith("\ndone\n")
    assert "\r\x1b[KARC-Easy [####################] 5/5 (100% correct)\n" in out
    assert "\r\x1b[KARC-Easy [########............] 2/5 (40% correct)" in out


def test_quick_eval_in_a_pipe_prints_nothing(capsys):
    bar = EvalProgress("MMLU", 3, interval=60.0)
    for done in range(1, 4):
        bar.update(done)
    bar.close()
    assert capsys.readouterr().out == ""  # the caller prints the result
