"""The pipelines: speedrun.sh / run1000.sh print exactly the expected GPU commands in --dry-run,
every shell script parses, and (slow) the CPU preset runs every stage end to end with tiny knobs
in a temporary base dir and fills the report card."""

import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TORCHRUN = "torchrun --standalone --nproc_per_node=8"
SPEEDRUN = [
    "bash dev/setup.sh",
    "python -m nanochat.report reset",
    "python -m nanochat.dataset -n 8",
    "python -m nanochat.dataset -n 240 &",
    "python -m scripts.tok_train --max_chars=2000000000",
    "python -m scripts.tok_eval",
    "wait  # download 240 shards",
    f"{TORCHRUN} -m scripts.base_train -- --depth=20 --run=dummy",
    f"{TORCHRUN} -m scripts.base_loss",
    f"{TORCHRUN} -m scripts.base_eval",
    f"{TORCHRUN} -m scripts.mid_train -- --run=dummy",
    f"{TORCHRUN} -m scripts.chat_eval -i mid",
    f"{TORCHRUN} -m scripts.chat_sft -- --run=dummy",
    f"{TORCHRUN} -m scripts.chat_eval -i sft",
    "python -m nanochat.report generate",
]


def dry_run(script, **env):
    proc = subprocess.run(["bash", script, "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_speedrun_dry_run_prints_the_gpu_recipe():
    env = {"NPROC_PER_NODE": "8", "WANDB_RUN": "dummy", "RUN_RL": "0"}
    assert dry_run("speedrun.sh", **env) == SPEEDRUN


def test_speedrun_dry_run_with_rl_and_wandb():
    commands = dry_run("speedrun.sh", NPROC_PER_NODE="4", WANDB_RUN="d20", RUN_RL="1")
    assert "torchrun --standalone --nproc_per_node=4 -m scripts.base_train -- --depth=20 --run=d20" in commands
    rl = commands.index("torchrun --standalone --nproc_per_node=4 -m scripts.chat_rl -- --run=d20")
    assert commands[rl + 1] == "torchrun --standalone --nproc_per_node=4 -m scripts.chat_eval -i rl -a GSM8K"
    assert commands[-1] == "python -m nanochat.report generate"


def test_run1000_dry_run_prints_the_d32_recipe():
    commands = dry_run("run1000.sh", NPROC_PER_NODE="8", WANDB_RUN="dummy", RUN_RL="0")
    assert "python -m nanochat.dataset -n 800 &" in commands
    assert "python -m scripts.tok_train --max_chars=4000000000" in commands
    assert f"{TORCHRUN} -m scripts.base_train -- --depth=32 --device_batch_size=8 --run=dummy" in commands
    assert f"{TORCHRUN} -m scripts.mid_train -- --device_batch_size=8 --run=dummy" in commands
    assert commands.index("python -m nanochat.report reset") < commands.index(f"{TORCHRUN} -m scripts.chat_eval -i sft")


def test_unknown_argument_is_an_error():
    proc = subprocess.run(["bash", "speedrun.sh", "--fast"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


@pytest.mark.parametrize("script", ["speedrun.sh", "run1000.sh", "dev/runcpu.sh", "dev/pipeline.sh",
                                    "dev/setup.sh", "dev/test.sh", "dev/offline_crates.sh",
                                    "dev/install_browser.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO_ROOT).returncode == 0


def test_a_failing_stage_stops_the_pipeline_and_names_it(tmp_path):
    script = tmp_path / "p.sh"
    script.write_text(f'source "{REPO_ROOT}/dev/pipeline.sh"\nstage "first" true\nstage "second" false\n'
                      'stage "third" touch never\n')
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "stage 'second' failed" in proc.stderr and not (tmp_path / "never").exists()


def test_cpu_preset_leaves_another_runs_tokenizer_alone(base_dir):
    """A base dir with a tokenizer the preset did not train (a GPU run's, say): the preset stops
    before touching anything and says where to run instead."""
    (base_dir / "tokenizer").mkdir(parents=True)
    (base_dir / "tokenizer" / "tokenizer.pkl").write_bytes(b"a 65,536-token tokenizer")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    proc = subprocess.run(["bash", "dev/runcpu.sh"], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 1 and "already holds a tokenizer" in proc.stderr
    assert "NANOCHAT_BASE_DIR=$HOME/.cache/nanochat-cpu" in proc.stderr
    assert (base_dir / "tokenizer" / "tokenizer.pkl").read_bytes() == b"a 65,536-token tokenizer"
    assert sorted(p.name for p in base_dir.iterdir()) == ["tokenizer"]


def run_ensure_cargo(tmp_path, home):
    """dev/setup.sh's ensure_cargo, alone, with a PATH that has no cargo and no curl (so no network)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    setup = (REPO_ROOT / "dev" / "setup.sh").read_text()
    start = setup.index("ensure_cargo() {")
    function = setup[start:setup.index("\n}\n", start) + 3]
    script = 'say() { echo "[setup] $*"; }\n' + function + "ensure_cargo && command -v cargo\n"
    return subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/nonexistent", "HOME": str(home)})


def test_setup_finds_cargo_in_the_rustup_folder(tmp_path):
    cargo = tmp_path / "home" / ".cargo" / "bin" / "cargo"
    cargo.parent.mkdir(parents=True)
    cargo.write_text("#!/bin/sh\n")
    cargo.chmod(0o755)
    proc = run_ensure_cargo(tmp_path, tmp_path / "home")
    assert proc.returncode == 0 and proc.stdout.strip() == str(cargo), proc.stderr


def test_setup_without_cargo_or_rustup_says_how_to_fix_it(tmp_path):
    proc = run_ensure_cargo(tmp_path, tmp_path / "empty_home")
    assert proc.returncode == 1
    assert "installing Rust with rustup" in proc.stdout
    assert "cargo not found and rustup could not install it" in proc.stderr and "rustup.rs" in proc.stderr


def section_metrics(report_text: str, section: str) -> dict[str, str]:
    body = report_text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^- ([^:]+): (.+)$", body, re.M))


@pytest.fixture
def keep_users_report():
    """The preset writes report.md into the repo root (where a user looks for it): put back the one
    that was there (the user's own run), or none."""
    path = REPO_ROOT / "report.md"
    before = path.read_bytes() if path.exists() else None
    yield
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(before)


@pytest.mark.slow
def test_cpu_preset_runs_every_stage(base_dir, keep_users_report):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "CPU_DEPTH": "2", "CPU_SEQ_LEN": "128",
           "CPU_VOCAB": "1024", "CPU_BATCH": "4", "CPU_BASE_STEPS": "12", "CPU_MID_STEPS": "4",
           "CPU_SFT_STEPS": "4", "CPU_RL_STEPS": "1", "CPU_EVAL_PROBLEMS": "4", "CPU_CORE_PER_TASK": "8"}
    proc = subprocess.run(["bash", "dev/runcpu.sh"], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "CPU PRESET" in proc.stdout and "CPU preset done" in proc.stdout

    for path in ["tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt", "base_checkpoints/d2/model_000012.pt",
                 "mid_checkpoints/d2/model_000004.pt", "chatsft_checkpoints/d2/model_000004.pt",
                 "chatrl_checkpoints/d2/model_000001.pt", "report/report.md", "report/training_curve.png"]:
        assert (base_dir / path).exists(), path
    report = (base_dir / "report" / "report.md").read_text()
    val_bpb = float(section_metrics(report, "Base model training")["min val bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < 10
    table = dict(re.findall(r"^\| (\S+) \| (.+) \|$", report, re.M))
    assert re.fullmatch(r"-?\d\.\d{4}", table["CORE"].split(" | ")[0])  # BASE column (centered: may be < 0)
    for task in ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]:
        mid, sft = table[task].split(" | ")[1:3]
        assert re.fullmatch(r"-?\d\.\d{4}", mid) and re.fullmatch(r"-?\d\.\d{4}", sft), (task, table[task])
    # it ends with a chat answer
    assert proc.stdout.split("stage: chat\n", 1)[1].strip()

    # Afterwards the user's own runs with the same base dir find the same data, no variable set.
    user_env = {k: v for k, v in env.items() if k not in ("NANOCHAT_PRETRAIN_DIR", "NANOCHAT_DATA_DIR",
                                                          "NANOCHAT_EVAL_BUNDLE")}
    own = subprocess.run([sys.executable, "-m", "scripts.base_train", "--device_type=cpu", "--depth=2",
                          "--max_seq_len=128", "--device_batch_size=2", "--total_batch_size=256",
                          "--num_iterations=1", "--eval_tokens=256", "--core_metric_every=-1",
                          "--sample_every=-1", "--model_tag=mine"],
                         cwd=REPO_ROOT, capture_output=True, text=True, env=user_env, timeout=300)
    assert own.returncode == 0, own.stdout[-2000:] + own.stderr[-2000:]
    evaluation = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "--device_type=cpu",
                                 "-g", "d2", "-a", "ARC-Easy", "-x", "2", "-m", "8"],
                                cwd=REPO_ROOT, capture_output=True, text=True, env=user_env, timeout=300)
    assert evaluation.returncode == 0, evaluation.stdout[-2000:] + evaluation.stderr[-2000:]
