"""Tests for nanochat.common and nanochat.flags: device init, base dir, flags, locked downloads."""

import json

import pytest
import torch

from nanochat.common import compute_init, get_base_dir, DummyWandb, get_wandb
from nanochat.flags import parse_flags, FlagError


def test_base_dir_comes_from_environment(base_dir):
    assert get_base_dir() == str(base_dir)


def test_compute_init_cpu_single_process():
    compute = compute_init("cpu")
    assert compute.device_type == "cpu" and compute.world_size == 1 and compute.master_process
    assert not compute.ddp
    compute.synchronize()  # no-op off CUDA
    # on the CPU the peak is the process's resident set: more than the 64 MiB buffer just touched
    buffer = torch.ones(16 * 1024 * 1024)
    assert compute.max_memory_allocated() > buffer.numel() * 4
    with compute.autocast():
        assert torch.ones(2).dtype == torch.float32


def test_compute_init_seeds_identically():
    compute_init("cpu")
    a = torch.rand(4)
    compute_init("cpu")
    assert torch.equal(a, torch.rand(4))


def test_wandb_is_a_noop_unless_a_run_is_named():
    assert isinstance(get_wandb("dummy", "nanochat", {}, master_process=True), DummyWandb)
    assert isinstance(get_wandb("myrun", "nanochat", {}, master_process=False), DummyWandb)


def test_flags_types_and_overrides():
    defaults = dict(depth=20, lr=0.02, run="dummy", compile=False, max_chars=10_000_000_000)
    cfg = parse_flags(defaults, ["--", "--depth=4", "--lr", "0.5", "--compile", "--max_chars=2e9"])
    assert (cfg.depth, cfg.lr, cfg.run, cfg.compile, cfg.max_chars) == (4, 0.5, "dummy", True, 2_000_000_000)
    assert type(cfg.max_chars) is int
    assert parse_flags(defaults, ["--compile=false"]).compile is False


@pytest.mark.parametrize("argv, fragment", [
    (["--dpeth=4"], "unknown flag --dpeth"),
    (["--depth=four"], "--depth expects type int"),
    (["--depth=2.5"], "--depth expects type int"),
    (["--compile=maybe"], "--compile expects type bool"),
    (["depth=4"], "unexpected argument"),
    (["--lr"], "needs a value"),
])
def test_flags_errors_name_the_flag(argv, fragment):
    with pytest.raises(FlagError) as info:
        parse_flags(dict(depth=20, lr=0.02, compile=False), argv)
    assert fragment in str(info.value)
    assert "--depth" in str(info.value) or "valid flags" not in str(info.value)


def test_flags_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        parse_flags(dict(depth=20), ["--help"], doc="Train a thing.")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Train a thing." in out and "--depth" in out and "20" in out


def test_accumulation_steps_divide_the_batch_or_name_the_nearest_total():
    from nanochat.flags import accumulation_steps
    assert accumulation_steps(524_288, 32, 2048, 8) == 1  # the speedrun on 8 GPUs
    assert accumulation_steps(524_288, 32, 2048, 1) == 8  # the same batch on one GPU
    with pytest.raises(FlagError, match=r"--total_batch_size=500 must be a multiple of .* = 256 "
                                        r"\(e\.g\. --total_batch_size=512\)"):
        accumulation_steps(500, 4, 64, 1)


def test_data_dir_setting_prefers_the_variable_then_the_recorded_folder(base_dir, tmp_path, monkeypatch):
    from nanochat.common import data_dir_setting
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    assert data_dir_setting("NANOCHAT_DATA_DIR") is None  # nothing recorded
    recorded, chosen = tmp_path / "recorded", tmp_path / "chosen"
    recorded.mkdir()
    (base_dir / "data_dirs.json").write_text(json.dumps({"NANOCHAT_DATA_DIR": str(recorded)}))
    assert data_dir_setting("NANOCHAT_DATA_DIR") == str(recorded)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(chosen))
    assert data_dir_setting("NANOCHAT_DATA_DIR") == str(chosen)
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    (base_dir / "data_dirs.json").write_text("{not json")  # a damaged record is ignored, not a crash
    assert data_dir_setting("NANOCHAT_DATA_DIR") is None
    (base_dir / "data_dirs.json").write_text(json.dumps({"NANOCHAT_DATA_DIR": str(tmp_path / "gone")}))
    assert data_dir_setting("NANOCHAT_DATA_DIR") is None  # a folder that no longer exists
