"""
The memory planner (nanochat/memory_plan.py): its optimiser-state count against the state a real
step creates, its stop-before-OOM line and --force, and (slow) its estimate against the peak RSS
of real base_train runs on the CPU: 3 configs, each a fresh subprocess (bench/memory.py's child),
within 20 %: plan.peak() against RSS with glibc's mmap threshold pinned (RSS = live bytes), and
plan.rss() against RSS with glibc's default malloc.
"""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT, copy_pretrain_shards
from nanochat import memory_plan, optim
from nanochat.gpt import GPT, GPTConfig

from bench.memory import COMMON, CONFIGS, measure


@pytest.fixture
def pretrain_dir(base_dir_with_tokenizer, pretrain_shards):
    """The base dir with the tiny tokenizer (vocab 512) and the test shards (2 train + 1 val)."""
    copy_pretrain_shards(pretrain_shards, base_dir_with_tokenizer)
    return base_dir_with_tokenizer


def tiny_model(depth=2, vocab=512, seq=64):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def cpu_compute():
    import contextlib
    return SimpleNamespace(world_size=1, device=torch.device("cpu"), device_type="cpu", master_process=True,
                           autocast=contextlib.nullcontext)


def test_optimizer_state_matches_a_real_step():
    model = tiny_model()
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model(idx, idx.roll(-1, 1)).backward()
    optim.step(optimizers, 1.0)
    real = sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))
    assert memory_plan.optimizer_state_bytes(optimizers, 1) == real
    # 3 ranks: AdamW keeps ceil(rows/3) rows, Muon the matrices i % 3 == rank (ceil(n/3) of n)
    assert memory_plan.optimizer_state_bytes(optimizers, 3) < real / 2


def test_activations_scale_with_tokens_and_no_gradient_is_touched():
    model = tiny_model()
    optimizers = model.setup_optimizers()
    plan = memory_plan.estimate(model, optimizers, 1, 4, 64, contextlib_null(), probe_len=16)
    assert all(p.grad is None for p in model.parameters())
    # the fitted per-token bytes predict a batch it did not probe
    measured = memory_plan.saved_bytes(model, 3, 48, contextlib_null())
    predicted = plan.act_const + 3 * 48 * (plan.act_per_token + plan.act_per_token_t * 48)
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)


def contextlib_null():
    import contextlib
    return contextlib.nullcontext


def test_too_big_stops_with_one_line_and_force_overrides(capsys):
    model = tiny_model()
    optimizers = model.setup_optimizers()
    with pytest.raises(SystemExit) as e:  # 2^22 sequences of 64 tokens: terabytes
        memory_plan.check(model, optimizers, cpu_compute(), 2 ** 22, 64, batch_divides=2 ** 22)
    message = str(e.value)
    assert "memory plan: the estimated peak" in message and "--force=1" in message and "\n" not in message
    fits = int(message.split("largest --device_batch_size that fits is ")[1].split(" ")[0])
    assert 0 < fits < 2 ** 22 and 2 ** 22 % fits == 0
    plan = memory_plan.check(model, optimizers, cpu_compute(), 2 ** 22, 64, force=True)
    assert plan.peak() > 1e12 and "running anyway" in capsys.readouterr().out


def test_a_run_prints_the_plan_and_stops_before_step_0(pretrain_dir):
    out = subprocess.run([sys.executable, "-m", "scripts.base_train", *COMMON, "--depth=2", "--max_seq_len=64",
                          "--device_batch_size=8388608", "--total_batch_size=536870912"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "memory plan (per rank, eager): parameters" in out.stdout
    last = out.stderr.strip().splitlines()[-1]  # the one line the run ends with
    assert last.startswith("memory plan: the estimated peak") and "Traceback" not in out.stderr
    assert "the largest --device_batch_size that fits is" in last
    assert "step 00000" not in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags", CONFIGS, ids=["d4x12x512", "d6x16x256", "d8x2x1024"])
def test_estimate_within_20_percent_of_peak_rss(pretrain_dir, flags):
    default, pinned = measure(flags)  # glibc's malloc as is, and with its mmap threshold pinned
    print(f"{flags}: estimate {pinned['estimate'] / 1e6:.0f} MB vs RSS {pinned['measured'] / 1e6:.0f} MB (pinned); "
          f"RSS estimate {default['rss_estimate'] / 1e6:.0f} MB vs RSS {default['measured'] / 1e6:.0f} MB")
    assert abs(pinned["estimate"] - pinned["measured"]) / pinned["measured"] < 0.20, pinned
    assert abs(default["rss_estimate"] - default["measured"]) / default["measured"] < 0.20, default
