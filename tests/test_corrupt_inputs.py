"""
Damaged files stop a stage with one line that names the file, says what is wrong and what to do:
exit status 1, no traceback, nothing on disk changed.

- Checkpoints (nanochat/checkpoint_manager.py, the loader every stage uses): a truncated or empty
  model_*.pt, a truncated optim_*_rank*.pt, a meta_*.json that is garbage, empty, a JSON list or
  lacks its keys. In-process for every case; then every stage that loads a checkpoint, as a real
  subprocess, on a truncated model file.
- Tokenizer files (nanochat/tokenizer.py): tokenizer.pkl empty, truncated, random, another object,
  a hostile pickle (os.system, eval: refused before anything runs, with a control showing that
  plain pickle.load would run them), no <|bos|>; token_bytes.pt truncated, random, of the wrong
  kind. In-process, then stages of each kind as real subprocesses on the hostile pickle.
- Pretraining shards (nanochat/dataset.py): truncated, random bytes, empty, no `text` column, in
  the train or the val split, caught by base_train before step 0 and by base_loss; a shard whose
  footer is intact but whose data pages are garbage is caught when its row group is read.
"""

import hashlib
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import REPO_ROOT, copy_pretrain_shards
from test_chat_stages import mini_data, tiny_gpt  # noqa: F401 (a fixture)


def snapshot(root):
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


CHECKPOINT_CASES = {  # name -> (file of step 2, how to damage it, what the message says)
    "model truncated": ("model_000002.pt", truncate, "truncated or damaged"),
    "model empty": ("model_000002.pt", lambda p: p.write_bytes(b""), "is empty"),
    "optim truncated": ("optim_000002_rank0.pt", truncate, "truncated or damaged"),
    "model hostile": ("model_000002.pt", lambda p: p.write_bytes(__import__("pickle").dumps(_Hostile(f"touch {p.parent}/pwned"))),
                      "holds objects other than tensors"),
    "meta garbage": ("meta_000002.json", lambda p: p.write_bytes(os.urandom(200)), "not valid JSON"),
    "meta empty": ("meta_000002.json", lambda p: p.write_text(""), "is empty"),
    "meta a list": ("meta_000002.json", lambda p: p.write_text("[1, 2]"), "JSON list"),
    "meta keyless": ("meta_000002.json", lambda p: p.write_text('{"step": 2}'), "lacks the key(s) model_config"),
}


def save_tiny(checkpoint_dir, vocab_size, steps=(1, 2)):
    """A tiny GPT saved at `steps` with a small optimiser state: step 2 is the latest."""
    from nanochat.checkpoint_manager import save_checkpoint
    model = tiny_gpt(vocab_size)
    for step in steps:
        save_checkpoint(str(checkpoint_dir), step, model.state_dict(), [{"state": {0: torch.ones(3)}}],
                        dict(model_config=asdict(model.config), user_config={"depth": 2}, start_source={
                            "source": "base", "model_tag": "d2", "step": 0}, dataloader_state=[None], loop_state={}))


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoint_file_is_one_clear_error(case, base_dir_with_tokenizer, tiny_tokenizer):
    from nanochat.checkpoint_manager import CheckpointError, load_checkpoint, load_model
    ckpt = base_dir_with_tokenizer / "base_checkpoints" / "d2"
    save_tiny(ckpt, tiny_tokenizer.get_vocab_size())
    name, damage, what = CHECKPOINT_CASES[case]
    damage(ckpt / name)
    before = snapshot(base_dir_with_tokenizer)
    with pytest.raises(CheckpointError) as info:
        if name.startswith("optim"):
            load_checkpoint(str(ckpt), 2, "cpu", load_optimizer=True)
        else:
            load_model("base", "cpu", phase="eval")  # the latest step: 2
    message = str(info.value.code)
    assert "\n" not in message and str(ckpt / name) in message and what in message, message
    assert "previous complete checkpoint, step 1" in message, message
    assert snapshot(base_dir_with_tokenizer) == before  # nothing written, nothing deleted
    load_checkpoint(str(ckpt), 1, "cpu", load_optimizer=True)  # the step it names does load


def test_resuming_a_fine_tuning_stage_needs_its_dataloader_state(base_dir_with_tokenizer, tiny_tokenizer):
    """A mid/SFT checkpoint whose meta lacks the stage's own keys is a clear error, not a KeyError."""
    import json
    from nanochat.checkpoint_manager import CheckpointError, load_start_model
    from nanochat.common import compute_init
    ckpt = base_dir_with_tokenizer / "mid_checkpoints" / "d2"
    save_tiny(ckpt, tiny_tokenizer.get_vocab_size())
    meta = json.loads((ckpt / "meta_000002.json").read_text())
    del meta["dataloader_state"]
    (ckpt / "meta_000002.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_start_model("mid", "base", compute_init("cpu"), model_tag="d2", resume_from_step=2)
    message = str(info.value.code)
    assert "\n" not in message and "dataloader_state" in message and "step 1" in message, message


STAGES = [  # every stage that loads a checkpoint, on the damaged latest one
    ["scripts.base_train", "--device_type=cpu", "--depth=2", "--model_tag=d2", "--resume_from_step=latest"],
    ["scripts.base_loss", "--device_type=cpu"],
    ["scripts.base_eval", "--device_type=cpu", f"--eval_bundle={REPO_ROOT / 'dev' / 'cpu_sample' / 'core_sample'}"],
    ["scripts.mid_train", "--device_type=cpu"],
    ["scripts.mid_train", "--device_type=cpu", "--resume_from_step=2"],
    ["scripts.chat_sft", "--device_type=cpu", "--source=mid"],
    ["scripts.chat_rl", "--device_type=cpu", "--source=mid"],
    ["scripts.chat_eval", "-i", "mid", "--device_type=cpu"],
    ["scripts.chat_cli", "-i", "mid", "-p", "hi", "--device_type=cpu"],
    ["scripts.chat_web", "-i", "mid", "--device_type=cpu", "--port=0"],
]


@pytest.mark.slow
@pytest.mark.parametrize("argv", STAGES, ids=[" ".join(a[:1] + a[-1:]) for a in STAGES])
def test_every_stage_stops_on_a_truncated_model_with_one_line(argv, base_dir_with_tokenizer, tiny_tokenizer,
                                                                mini_data):  # noqa: F811
    base = base_dir_with_tokenizer
    for stage in ("base_checkpoints", "mid_checkpoints"):
        save_tiny(base / stage / "d2", tiny_tokenizer.get_vocab_size())
        truncate(base / stage / "d2" / "model_000002.pt")
    before = snapshot(base)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_DIR=str(mini_data), OMP_NUM_THREADS="1",
               WANDB_MODE="disabled")
    env.pop("NANOCHAT_EVAL_BUNDLE", None)
    out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "model_000002.pt" in line]
    assert len(lines) == 1 and "truncated or damaged" in lines[0] and "step 1" in lines[0], out.stderr[-2000:]
    assert snapshot(base) == before


SHARD_CASES = {  # name -> how to damage a shard
    "truncated": truncate,
    "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "no text column": None,  # written below: a valid parquet file with another column
}


def damage_shard(path, case):
    if case == "no text column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"content": ["a document"] * 10}), path)
    else:
        SHARD_CASES[case](path)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_damaged_shard_is_found_before_training(case, split, base_dir, pretrain_shards):
    from nanochat.dataset import ShardError, check_shards
    data = copy_pretrain_shards(pretrain_shards, base_dir)
    path = data / ("shard_00000.parquet" if split == "train" else "shard_00002.parquet")
    damage_shard(path, case)
    with pytest.raises(ShardError) as info:
        check_shards()
    message = str(info.value.code)
    assert "\n" not in message and str(path) in message and "delete it" in message, message
    assert f"python -m nanochat.dataset -n {1 if split == 'train' else 3}" in message
    assert path.exists()  # reported, not deleted


def test_garbage_inside_a_row_group_is_named_when_read(base_dir, pretrain_shards):
    from nanochat.dataset import ShardError, iter_row_groups, open_shard
    data = copy_pretrain_shards(pretrain_shards, base_dir)
    path = data / "shard_00000.parquet"
    raw = bytearray(path.read_bytes())
    raw[100:4100] = os.urandom(4000)  # the first row group's pages; the footer is intact
    path.write_bytes(bytes(raw))
    open_shard(str(path))  # the footer check passes: only decoding finds it
    with pytest.raises(ShardError, match=r"shard_00000\.parquet has a row group \(0\) that does not decode"):
        for _ in iter_row_groups("train"):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("module", ["scripts.base_train", "scripts.base_loss"])
def test_stage_stops_on_a_damaged_val_shard_before_step_0(module, base_dir_with_tokenizer, pretrain_shards,
                                                           tiny_tokenizer):
    base = base_dir_with_tokenizer
    data = copy_pretrain_shards(pretrain_shards, base)
    truncate(data / "shard_00002.parquet")  # the val shard: before, only the first evaluation found it
    if module == "scripts.base_loss":
        save_tiny(base / "base_checkpoints" / "d2", tiny_tokenizer.get_vocab_size(), steps=(1,))
    before = snapshot(base)
    argv = (["--device_type=cpu", "--depth=2", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=256",
             "--num_iterations=2", "--eval_every=-1", "--core_metric_every=-1", "--sample_every=-1"]
            if module == "scripts.base_train" else ["--device_type=cpu", "--device_batch_size=2",
                                                    "--split_tokens=256"])
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("NANOCHAT_PRETRAIN_DIR", None)
    out = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "shard_00002.parquet is not a readable parquet file" in out.stderr, out.stderr[-2000:]
    assert "step 00001" not in out.stdout  # stopped before the first step
    assert snapshot(base) == before


# -----------------------------------------------------------------------------
# Tokenizer files: tokenizer.pkl is a pickle, and a pickle can run any code when loaded


class _Hostile:
    """Pickles to a call of os.system: loading it with plain pickle.load runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def tokenizer_pickle_cases(sentinel):
    import pickle

    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    return {  # name -> (bytes of tokenizer.pkl, what the message says)
        "empty": (b"", "is empty"),
        "truncated": (None, "truncated or damaged"),
        "random bytes": (os.urandom(512), "truncated or damaged"),
        "a dict": (pickle.dumps({"name": "x"}), "does not hold a tiktoken Encoding"),
        "os.system": (pickle.dumps(_Hostile(f"touch {sentinel}")), "asks for posix.system"),
        "eval": (b"cbuiltins\neval\n(V__import__('os').system('touch " + str(sentinel).encode() + b"')\ntR.",
                 "asks for builtins.eval"),
        "no <|bos|>": (pickle.dumps(tiktoken.Encoding(name="x", pat_str=r"\w+|\s+", mergeable_ranks=ranks,
                                                      special_tokens={"<|endoftext|>": 256})), "no <|bos|>"),
        "well formed": (pickle.dumps(tiktoken.Encoding(name="x", pat_str=r"\w+|\s+", mergeable_ranks=ranks,
                                                       special_tokens={"<|bos|>": 256})), None),  # the control
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "random bytes", "a dict", "os.system", "eval", "no <|bos|>"])
def test_damaged_or_hostile_tokenizer_pkl_is_one_line_and_runs_nothing(case, tmp_path, tiny_tokenizer_dir):
    import shutil

    from nanochat.tokenizer import RustBPETokenizer, TokenizerError
    sentinel = tmp_path / "pwned"
    directory = tmp_path / "tokenizer"
    shutil.copytree(tiny_tokenizer_dir, directory)
    path = directory / "tokenizer.pkl"
    data, says = tokenizer_pickle_cases(sentinel)[case]
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2] if data is None else data)
    with pytest.raises(TokenizerError) as info:
        RustBPETokenizer.from_directory(str(directory))
    message = str(info.value.code)
    assert "\n" not in message and str(path) in message and says in message and "tok_train" in message, message
    assert not sentinel.exists()


def test_the_hostile_pickles_do_run_code_when_loaded_plainly(tmp_path):
    """The control for the cases above: plain pickle.load of the same bytes creates the sentinel,
    and a well-formed Encoding with <|bos|> passes the checks."""
    import pickle

    from nanochat.tokenizer import RustBPETokenizer
    sentinel = tmp_path / "pwned"
    cases = tokenizer_pickle_cases(sentinel)
    for case in ("os.system", "eval"):
        pickle.loads(cases[case][0])
        assert sentinel.exists(), case
        sentinel.unlink()
    (tmp_path / "tokenizer.pkl").write_bytes(cases["well formed"][0])
    assert RustBPETokenizer.from_directory(str(tmp_path)).encode("ab") == [97, 98]


@pytest.mark.parametrize("case", ["truncated", "random bytes", "a float tensor", "a dict"])
def test_damaged_token_bytes_is_one_line(case, base_dir_with_tokenizer):
    from nanochat.tokenizer import TokenizerError, get_token_bytes
    path = base_dir_with_tokenizer / "tokenizer" / "token_bytes.pt"
    if case == "truncated":
        truncate(path)
    elif case == "random bytes":
        path.write_bytes(os.urandom(1000))
    else:
        torch.save(torch.zeros(512) if case == "a float tensor" else {"a": torch.ones(2)}, path)
    with pytest.raises(TokenizerError) as info:
        get_token_bytes()
    message = str(info.value.code)
    assert "\n" not in message and str(path) in message and "tok_train" in message, message


TOKENIZER_STAGES = [  # a stage of each kind that reads the tokenizer, on a hostile tokenizer.pkl
    ["scripts.base_train", "--device_type=cpu", "--depth=2", "--num_iterations=1"],
    ["scripts.base_loss", "--device_type=cpu"],
    ["scripts.chat_cli", "-i", "base", "-p", "hi", "--device_type=cpu"],
    ["scripts.chat_web", "-i", "base", "--device_type=cpu", "--port=0"],
    ["scripts.tok_eval"],
]


@pytest.mark.slow
@pytest.mark.parametrize("argv", TOKENIZER_STAGES, ids=[a[0] for a in TOKENIZER_STAGES])
def test_every_stage_refuses_a_hostile_tokenizer_with_one_line(argv, base_dir_with_tokenizer, tiny_tokenizer,
                                                               pretrain_shards, tmp_path):
    base = base_dir_with_tokenizer
    copy_pretrain_shards(pretrain_shards, base)
    save_tiny(base / "base_checkpoints" / "d2", tiny_tokenizer.get_vocab_size(), steps=(1,))
    sentinel = tmp_path / "pwned"
    pkl = base / "tokenizer" / "tokenizer.pkl"
    pkl.write_bytes(tokenizer_pickle_cases(sentinel)["os.system"][0])
    before = snapshot(base)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("NANOCHAT_PRETRAIN_DIR", None)
    out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "tokenizer.pkl" in line]
    assert len(lines) == 1 and "asks for posix.system" in lines[0], out.stderr[-2000:]
    assert not sentinel.exists() and snapshot(base) == before
