"""
Evaluation comparable with the reference nanochat: the same prompts, the same items in the same
order, the same protocol (issue: "Evaluation numbers comparable with the reference"). Data: only
dev/cpu_sample and the recorded fixture tests/data/evals/hf_shuffle_seed42.json.

1. The multiple-choice prompt is the reference's text, in evaluation and in the training mixtures.
2. Every task's rows are in Hugging Face datasets' shuffle(seed=42) order (checked against what
   the datasets library returned, recorded in the fixture); views apply to the shuffled rows.
3. HumanEval assembles the reference's program by default (prompt imports + extracted code: a
   body-only completion fails), the official one (prompt + completion) behind `assembly=`.
4. CORE and the categorical chat eval never crop a prompt to the training context; only past the
   model's rotary tables, and then they say so.
5. A bundle with missing task files scores the others, lists the missing in one line, and labels
   the result "CORE partial (k/N tasks)"; `tasks=` picks a subset.
6. Generative chat eval samples every problem with seed 42; the tokenizer is callable.
"""

import json
import shutil

import pytest
import torch

from conftest import REPO_ROOT
from nanochat.core_eval import (BundleError, core_label, evaluate_core, evaluate_task, load_task_data,
                                max_positions, prepare_item)
from nanochat.tokenizer import RustBPETokenizer
from tasks.arc import ARC
from tasks.common import TaskMixture, hf_shuffle_order, read_jsonl
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval, build_program, extract_imports
from tasks.mmlu import MMLU
from test_chat_stages import tiny_gpt
from test_core_eval import ByteTokenizer, one_thread, task_meta  # noqa: F401 (one_thread: an autouse fixture)

CPU_SAMPLE = REPO_ROOT / "dev" / "cpu_sample"
FIXTURE = json.loads((REPO_ROOT / "tests" / "data" / "evals" / "hf_shuffle_seed42.json").read_text())


@pytest.fixture(autouse=True)
def cpu_sample_data(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(CPU_SAMPLE))


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real (tiktoken) tokenizer with the 256 bytes and no merges: each answer letter is one token."""
    return RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})


def reference_render_mc(question, letters, choices):
    """The reference's tasks/common.py render_mc, restated as it is written there."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join([f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)])
    query += "\nRespond only with the letter of the correct answer."
    return query


# -----------------------------------------------------------------------------
# 1. The multiple-choice prompt


def test_mc_prompts_are_the_reference_text_in_eval_and_training():
    arc_rows = read_jsonl(str(CPU_SAMPLE / "arc" / "ARC-Easy" / "test.jsonl"))
    arc = ARC("ARC-Easy", "test")
    for i in range(len(arc)):
        row = arc_rows[arc.rows.order[i]]
        assert arc[i]["messages"][0]["content"] == reference_render_mc(row["question"], row["choices"]["label"],
                                                                       row["choices"]["text"])
    mmlu_rows = read_jsonl(str(CPU_SAMPLE / "mmlu" / "test.jsonl"))
    mmlu = MMLU("all", "test")
    for i in range(len(mmlu)):
        row = mmlu_rows[mmlu.rows.order[i]]
        assert mmlu[i]["messages"][0]["content"] == reference_render_mc(row["question"], "ABCD", row["choices"])
    # the training mixtures (mid_train's stand-in, chat_sft) hold the same conversations
    mixture = TaskMixture([ARC("ARC-Challenge", "train"), MMLU("all", "dev"), GSM8K("train", stop=50)])
    mc = [ex for ex in mixture if "letters" in ex]
    assert len(mc) == 300 + 285 and all(ex["messages"][0]["content"].startswith("Multiple Choice question: ")
                                        for ex in mc)


# -----------------------------------------------------------------------------
# 2. Item order: Hugging Face datasets' shuffle(seed=42)


def test_shuffle_order_is_the_datasets_librarys():
    for n, first in FIXTURE["first_indices"].items():
        order = hf_shuffle_order(int(n))
        assert order[:len(first)] == first, n
        assert sorted(order) == list(range(int(n)))


@pytest.mark.parametrize("path", sorted(FIXTURE["first_rows"]))
def test_tasks_list_rows_in_the_reference_order(path):
    field, expected = FIXTURE["first_rows"][path]["field"], FIXTURE["first_rows"][path]["values"]
    prompt = lambda ex: ex["messages"][0]["content"]  # noqa: E731
    if path.startswith("arc/"):
        subset, split = path.split("/")[1], path.split("/")[2].split(".")[0]
        make, get = (lambda **view: ARC(subset, split, **view)), prompt
    elif path.startswith("mmlu/"):
        make, get = (lambda **view: MMLU("all", "test", **view)), prompt
    elif path.startswith("gsm8k/"):
        make, get = (lambda **view: GSM8K("test", **view)), prompt
    else:
        make, get = (lambda **view: HumanEval(**view)), (lambda ex: ex["task_id"])
    got = [get(make()[i]) for i in range(3)]
    if path.startswith(("arc/", "mmlu/")):  # the question inside the multiple-choice prompt
        assert all(g.startswith(f"Multiple Choice question: {e}\n") for g, e in zip(got, expected)), got
    else:
        assert field in ("question", "task_id") and got == expected
    # a view slices the shuffled rows: stop=2 is the reference's first 2, step strides over them
    assert [get(ex) for ex in make(stop=2)] == got[:2]
    assert get(make(start=1, step=2)[0]) == got[1]
