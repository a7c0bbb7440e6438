"""
Every stage script run before the stage it needs (an empty base dir) must stop with one line that
names what is missing and the command that makes it: exit status 1, no Python traceback, and no
side effect: a base dir that did not exist still does not.
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CASES = [  # (arguments, what the error must name, the command it must suggest)
    (["scripts.tok_train"], "no parquet shards", "nanochat.dataset"),
    (["scripts.tok_eval"], "no tokenizer", "scripts.tok_train"),
    (["scripts.base_train", "--device_type=cpu", "--depth=2"], "no tokenizer", "scripts.tok_train"),
    (["scripts.base_loss", "--device_type=cpu"], "base checkpoint", "scripts.base_train"),
    (["scripts.base_eval", "--device_type=cpu", "--eval_bundle=/nonexistent/bundle"], "core.yaml: missing", None),
    (["scripts.base_eval", "--device_type=cpu"], "base checkpoint", "scripts.base_train"),  # before any download
    (["scripts.mid_train", "--device_type=cpu"], "base checkpoint", "scripts.base_train"),
    (["scripts.mid_train", "--device_type=cpu", "--resume_from_step=5", "--model_tag=d2"], "step 5", None),
    (["scripts.chat_sft", "--device_type=cpu"], "mid checkpoint", "scripts.mid_train"),
    (["scripts.chat_rl", "--device_type=cpu"], "sft checkpoint", "scripts.chat_sft"),
    (["scripts.chat_eval", "-i", "mid", "--device_type=cpu"], "mid checkpoint", "scripts.mid_train"),
    (["scripts.chat_cli", "-p", "hi", "--device_type=cpu"], "sft checkpoint", "scripts.chat_sft"),
    (["scripts.chat_web", "--device_type=cpu"], "sft checkpoint", "scripts.chat_sft"),
    (["nanochat.report", "generate"], "nothing to report", None),
]


@pytest.mark.parametrize("argv,names,suggests", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_missing_input_is_one_clear_line(base_dir, argv, names, suggests):
    if "--resume_from_step=5" in argv:
        os.makedirs(base_dir / "mid_checkpoints" / "d2")  # the tag exists, its step 5 does not
    else:
        base_dir = base_dir / "not_yet"  # a base dir that does not exist: the failed run must not make it
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for var in ("NANOCHAT_EVAL_BUNDLE", "NANOCHAT_PRETRAIN_DIR", "NANOCHAT_DATA_DIR"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert names in out.stderr
    assert "--resume_from_step=5" in argv or not base_dir.exists()
    if suggests:
        assert f"python -m {suggests}" in out.stderr
