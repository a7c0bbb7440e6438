"""
Tests for nanochat/report.py: reset -> sections -> generate gives the summary table with the logged
values and "-" for stages that never ran, the wall-clock time, the training-curve PNG, the copy in
the working directory; non-zero ranks write nothing; the CLI.
"""

import datetime
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from nanochat.report import DummyReport, Report, get_report, slugify


def _set_timestamp(path, when):
    text = path.read_text()
    lines = [f"timestamp: {when}" if line.startswith("timestamp:") else line for line in text.splitlines()]
    path.write_text("\n".join(lines) + "\n")


def _table_row(report_text, metric):
    row = next(line for line in report_text.splitlines() if line.startswith(f"| {metric} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_slugify():
    assert slugify("Base model training") == "base-model-training"
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert slugify("Chat RL") == "chat-rl"


def test_reset_sections_generate(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = get_report()
    assert isinstance(report, Report)
    report_dir = base_dir / "report"
    assert not report_dir.exists()  # made on the first write, not by get_report()
    report_dir.mkdir()
    (report_dir / "stale-section.md").write_text("## Stale\n- CORE: 0.9\n")  # from a previous run
    report.reset()
    assert sorted(os.listdir(report_dir)) == ["header.md"]
    header = (report_dir / "header.md").read_text()
    for field in ("Run started:", "Git commit:", "Git dirty:", "CPUs:", "RAM:", "GPUs:", "CUDA:", "Python:",
                  "PyTorch:", "Code size:", "Hourly cost estimate:"):
        assert field in header

    report.log("Tokenizer training", [{"vocab_size": 65536, "train time (s)": 12.3456789}])
    report.log("Base model evaluation", [{"CORE": 0.2219, "model step": 21400}, "| task | acc |\n|---|---|"])
    report.log("Chat evaluation mid", [{"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875, "MMLU": 0.3111,
                                        "GSM8K": 0.025, "HumanEval": 0.0671, "ChatCORE": 0.073}])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.3876, "GSM8K": None}])  # None: not measured
    report.log("My experiment", ["free text"])
    for step in range(5):
        report.log_history({"step": step, "train_loss": 5.0 - step})
    report.log_history({"step": 4, "val_bpb": 1.5})

    # pretend the run took 3h51m: start at 10:00, last section at 13:51
    start = datetime.datetime(2025, 10, 13, 10, 0, 0)
    (report_dir / "header.md").write_text(header.replace(header.split("Run started: ")[1].split("\n")[0],
                                                         start.strftime("%Y-%m-%d %H:%M:%S")))
    for name in os.listdir(report_dir):
        if name.endswith(".md") and name != "header.md":
            _set_timestamp(report_dir / name, "2025-10-13 11:00:00")
    _set_timestamp(report_dir / "chat-evaluation-sft.md", "2025-10-13 13:51:00")

    path = report.generate()
    text = (report_dir / "report.md").read_text()
    assert path == str(report_dir / "report.md")
    assert _table_row(text, "CORE") == ["0.2219", "-", "-", "-"]
    assert _table_row(text, "ARC-Easy") == ["-", "0.3561", "0.3876", "-"]
    assert _table_row(text, "GSM8K") == ["-", "0.0250", "-", "-"]
    assert _table_row(text, "ChatCORE") == ["-", "0.0730", "-", "-"]
    assert text.splitlines()[0] == "# nanochat training report"
    assert "| Metric | BASE | MID | SFT | RL |" in text
    assert "Total wall clock time: 3h51m" in text
    # sections in pipeline order, unknown ones last; the stale one is gone
    order = [text.index(f"## {s}") for s in ("Tokenizer training", "Base model evaluation", "Chat evaluation mid",
                                              "Chat evaluation sft", "My experiment")]
    assert order == sorted(order) and "Stale" not in text
    assert "- vocab_size: 65,536" in text and "- train time (s): 12.3457" in text and "- GSM8K: -" in text
    # the training curve, embedded with a path relative to each copy of the report
    png = report_dir / "training_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "![training curve](training_curve.png)" in text
    cwd_text = (tmp_path / "report.md").read_text()
    assert f"![training curve]({os.path.relpath(png, tmp_path)})" in cwd_text
    assert cwd_text.replace(os.path.relpath(png, tmp_path), "training_curve.png") == text


def test_generate_without_anything(base_dir, tmp_path, monkeypatch):
    """No reset, no sections, no history: still a report, all "-"."""
    monkeypatch.chdir(tmp_path)
    get_report().generate()
    text = (tmp_path / "report.md").read_text()
    for metric in ("CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE"):
        assert _table_row(text, metric) == ["-"] * 4
    assert "Total wall clock time: unknown" in text and "training curve" not in text


def test_history_rows_later_wins_and_bad_lines_skipped(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = get_report()
    report.log_history({"step": 0, "train_loss": 9.0})
    report.log_history({"step": 0, "train_loss": 7.0})  # a resumed run rewrote step 0
    with open(base_dir / "report" / "base_train_history.jsonl", "a") as f:
        f.write('{"step": 1, "train_lo')  # cut short by a kill
    from nanochat.report import plot_training_curve
    assert plot_training_curve(str(base_dir / "report" / "base_train_history.jsonl"), str(tmp_path / "c.png"))
    rows = [json.loads(line) for line in (base_dir / "report" / "base_train_history.jsonl").read_text().splitlines()[:2]]
    assert rows == [{"step": 0, "train_loss": 9.0}, {"step": 0, "train_loss": 7.0}]


def test_other_ranks_write_nothing(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.reset()
    report.log("Base model evaluation", [{"CORE": 0.1}])
    report.log_history({"step": 0, "train_loss": 1.0})
    report.generate()
    assert not (base_dir / "report").exists()


@pytest.mark.slow
def test_cli(base_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanochat.report", *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=120)
    assert run("reset").returncode == 0 and (base_dir / "report" / "header.md").exists()
    empty = run("generate")  # nothing to report yet: says so, fails, writes nothing
    assert empty.returncode == 1 and "nothing to report" in empty.stderr and "Traceback" not in empty.stderr
    assert not (tmp_path / "report.md").exists()
    Report(str(base_dir / "report")).log("Base model loss", [{"train bpb": 1.0}])
    out = run("generate")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report.md").exists() and (base_dir / "report" / "report.md").exists()
    bad = run("publish")
    assert bad.returncode != 0 and "usage: python -m nanochat.report reset|generate" in bad.stderr


def test_multiline_samples_are_fenced_and_cannot_break_out(tmp_path):
    report = Report(str(tmp_path / "report"))
    sample = "def f():\n    return 1\n``` # a fence inside\n- not a list item"
    path = report.log("Base model loss", [{"train bpb": 1.25, "sample 0": sample, "sample 1": "one line"}])
    lines = open(path).read().splitlines()
    start = lines.index("- sample 0:")
    assert lines[start + 1] == "" and lines[start + 2] == "  ````text"  # longer than the ``` inside
    assert lines[start + 3:start + 7] == ["  def f():", "      return 1", "  ``` # a fence inside",
                                          "  - not a list item"]
    assert lines[start + 7] == "  ````"
    assert "- train bpb: 1.2500" in lines and "  one line" in lines  # short samples are fenced too
