"""
Tests for nanochat/checkpoint_manager.py: round trips, finding tags and steps, and crash safety:
a real child process is SIGKILLed in the middle of a save (by the parent while a large tensor is
being written, or by itself at a chosen point), and the previous checkpoint must stay the latest
one and load intact, while the partial one is ignored and cleaned up by the next save.
Also when a stage saves (checkpoint_due), and every_rank on one process (2 ranks: the resume tests).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO_ROOT
from nanochat import checkpoint_manager as cm

CHILD = textwrap.dedent("""
    import json, os, signal, sys, torch
    import nanochat.checkpoint_manager as cm
    d, mode = sys.argv[1], sys.argv[2]
    cm.save_checkpoint(d, 1, {"w": torch.arange(4.0)}, {"m": torch.ones(4)}, {"tag": "first"})
    print("saved 1", flush=True)
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    real_save = torch.save
    def save_half_then_die(obj, f):  # a write cut short: some bytes reach the temp file
        f.write(b"PK\\x03\\x04 partial checkpoint bytes"); f.flush(); die()
    step = 1 if mode == "resave_model" else 2
    if mode in ("model", "resave_model"):
        torch.save = lambda obj, f: save_half_then_die(obj, f) if "w" in obj else real_save(obj, f)
    elif mode == "optim":
        torch.save = save_half_then_die
    elif mode == "meta":
        json.dumps = die  # everything but the meta file is written
    big = {"w": torch.randn(25_000_000)} if mode == "parent_kills" else {"w": torch.arange(4.0) + 1}
    cm.save_checkpoint(d, step, big, {"m": torch.zeros(4)}, {"tag": "second"})
    print("saved 2", flush=True)
""")


def run_child(ckpt_dir, mode):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(ckpt_dir), mode], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_first_checkpoint_intact(ckpt_dir):
    assert cm.find_last_step(str(ckpt_dir)) == 1
    model, optim, meta = cm.load_checkpoint(str(ckpt_dir), 1, "cpu", load_optimizer=True)
    assert torch.equal(model["w"], torch.arange(4.0)) and torch.equal(optim["m"], torch.ones(4))
    assert meta["tag"] == "first" and meta["step"] == 1


@pytest.mark.parametrize("mode", ["model", "optim", "meta"])
def test_killed_during_save_keeps_previous_checkpoint(tmp_path, mode):
    ckpt_dir = tmp_path / "d2"
    child = run_child(ckpt_dir, mode)
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    assert out.strip() == "saved 1"
    assert_first_checkpoint_intact(ckpt_dir)
    assert not (ckpt_dir / "meta_000002.json").exists()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of step 2"):
        cm.load_checkpoint(str(ckpt_dir), 2, "cpu")
    if mode != "meta":
        assert any(".tmp" in name for name in os.listdir(ckpt_dir))  # the partial file is there...
    # ...and the next save cleans it up and completes normally
    cm.save_checkpoint(str(ckpt_dir), 2, {"w": torch.arange(4.0) + 1}, {"m": torch.zeros(4)}, {"tag": "second"})
    assert cm.find_last_step(str(ckpt_dir)) == 2
    assert not any(".tmp" in name for name in os.listdir(ckpt_dir))
    assert torch.equal(cm.load_checkpoint(str(ckpt_dir), 2, "cpu")[0]["w"], torch.arange(4.0) + 1)


def test_parent_kills_child_while_it_writes_a_large_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "d2"
    child = run_child(ckpt_dir, "parent_kills")
    assert child.stdout.readline().strip() == "saved 1"
    deadline = time.time() + 60
    while not any(n.startswith("model_000002.pt.tmp") for n in os.listdir(ckpt_dir)):  # writing now
        assert time.time() < deadline and child.poll() is None, "the child never started writing step 2"
        time.sleep(0.002)
    child.kill()
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert_first_checkpoint_intact(ckpt_dir)
    assert not (ckpt_dir / "meta_000002.json").exists()


def test_resaving_a_step_that_dies_does_not_load_mismatched_files(tmp_path):
    ckpt_dir = tmp_path / "d2"
    child = run_child(ckpt_dir, "resave_model")  # optimiser of the re-save written, model cut short
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # step 1 now has an old model and a new optimiser file: it must not count as a checkpoint
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        cm.find_last_step(str(ckpt_dir))


def test_round_trip_and_discovery(tmp_path, base_dir):
    root = base_dir / "base_checkpoints"
    for tag, steps in [("d4", [5, 20]), ("d12", [3]), ("d2", [7])]:
        for step in steps:
            meta = {"model_config": {"n_layer": int(tag[1:])}, "loop_state": {"min_val_bpb": 1.5}}
            cm.save_checkpoint(str(root / tag), step, {"w": torch.full((2,), float(step))}, None, meta)
    assert cm.find_largest_model(str(root)) == "d12"  # by depth, not alphabetically
    assert cm.find_last_step(str(root / "d4")) == 20
    model, optim, meta = cm.load_checkpoint(str(root / "d4"), 5, "cpu")
    assert torch.equal(model["w"], torch.full((2,), 5.0)) and optim is None
    assert meta == json.loads((root / "d4" / "meta_000005.json").read_text())
    assert meta["loop_state"] == {"min_val_bpb": 1.5} and meta["world_size"] == 1
    assert sorted(os.listdir(root / "d2")) == ["meta_000007.json", "model_000007.pt"]
    with pytest.raises(FileNotFoundError, match="saved by 1 rank"):
        cm.load_checkpoint(str(root / "d4"), 5, "cpu", load_optimizer=True)


def test_missing_checkpoints_name_the_stage_that_makes_them(base_dir):
    for source, script in [("base", "scripts.base_train"), ("mid", "scripts.mid_train"),
                           ("sft", "scripts.chat_sft"), ("rl", "scripts.chat_rl")]:
        with pytest.raises(FileNotFoundError, match=script):
            cm.load_model(source, "cpu", "eval")
    (base_dir / "mid_checkpoints" / "d2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*scripts.mid_train"):
        cm.load_model("mid", "cpu", "eval")
    with pytest.raises(ValueError, match="source must be one of"):
        cm.load_model("pre", "cpu", "eval")


def _tiny_model(vocab_size=512):
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    for p in model.parameters():  # non-trivial weights everywhere (c_proj starts at zero)
        p.data.add_(0.01 * torch.randn_like(p))
    return model, config


def test_build_and_load_model(base_dir_with_tokenizer):
    from dataclasses import asdict
    model, config = _tiny_model()
    root = base_dir_with_tokenizer / "base_checkpoints"
    # as a torch.compile'd model would name them, and stored in bf16 as on CUDA
    compiled_names = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    cm.save_checkpoint(str(root / "d2"), 10, compiled_names, None, {"model_config": asdict(config)})
    cm.save_checkpoint(str(root / "d2"), 20, model.state_dict(), None, {"model_config": asdict(config)})
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    cm.save_checkpoint(str(root / "d1"), 30, bf16, None, {"model_config": asdict(config)})

    idx = torch.randint(0, 512, (2, 16))
    expected = model(idx)
    loaded, tokenizer, meta = cm.load_model("base", "cpu", "eval", step=10)  # d2: the largest tag
    assert meta["step"] == 10 and not loaded.training and tokenizer.get_vocab_size() == 512
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(loaded(idx), expected)  # weights and rotary buffers all in place
    latest, _, meta = cm.load_model("base", "cpu", "train")
    assert meta["step"] == 20 and latest.training
    from_bf16, _, _ = cm.load_model("base", "cpu", "eval", model_tag="d1")
    assert all(p.dtype == torch.float32 for p in from_bf16.parameters())
    assert torch.allclose(from_bf16(idx), expected, atol=0.05)

    other, other_config = _tiny_model(vocab_size=600)
    cm.save_checkpoint(str(root / "d9"), 1, other.state_dict(), None, {"model_config": asdict(other_config)})
    with pytest.raises(ValueError, match="600"):
        cm.load_model("base", "cpu", "eval")


def test_checkpoint_due_at_the_end_on_stop_and_every_n_but_never_the_resumed_step():
    def due(step, **kw):
        return cm.checkpoint_due(step, **{"save_every": 3, "last_step": False, "stop": False, "resumed_step": -1, **kw})
    assert [s for s in range(8) if due(s)] == [3, 6]  # not step 0
    assert [s for s in range(8) if due(s, save_every=-1)] == []
    assert due(5, last_step=True) and due(5, stop=True) and due(0, last_step=True)
    assert not due(6, resumed_step=6) and not due(4, resumed_step=4, last_step=True)  # already on disk
    assert not due(2, resumed_step=2, stop=True)


def test_every_rank_on_one_process_is_a_list_of_its_state():
    state = {"epoch": 1, "index": 7}
    assert cm.every_rank(state) == [state]


def test_this_rank_hands_back_each_ranks_state_and_needs_as_many_ranks():
    from nanochat.common import Compute
    from nanochat.flags import FlagError
    def compute(rank, world_size):
        return Compute(ddp=world_size > 1, rank=rank, local_rank=rank, world_size=world_size,
                       device=torch.device("cpu"), device_type="cpu")
    states = [{"index": 0}, {"index": 1}]
    assert cm.this_rank(states, compute(1, 2)) == {"index": 1}
    with pytest.raises(FlagError, match="saved by 2 rank\\(s\\).*this run has 1"):
        cm.this_rank(states, compute(0, 1))


def test_stage_saver_saves_when_due_builds_the_meta_only_then_and_never_stops_on_its_own(tmp_path):
    from nanochat.common import Compute
    compute = Compute(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), device_type="cpu")
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        saver = cm.StageSaver("scripts.base_train", compute, str(tmp_path), save_every=2, resumed_step=2)
    finally:  # StageSaver watches for SIGTERM / Ctrl-C: give pytest its handlers back
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    model, built = torch.nn.Linear(2, 2), []
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1)]
    def meta():
        built.append(1)
        return {"tag": "x"}
    for step in range(6):
        last_step = step == 5
        assert not saver.should_stop(last_step)  # no signal came
        saver.save_if_due(step, last_step, False, model, optimizers, meta)
    assert cm.find_last_step(str(tmp_path)) == 5 and len(built) == 2  # step 4 and the last; 2 was resumed from
    assert sorted(p.name for p in tmp_path.glob("meta_*.json")) == ["meta_000004.json", "meta_000005.json"]
    saver.preemption.requested = True  # as the signal handler would
    assert saver.should_stop(last_step=False) and not saver.should_stop(last_step=True)
