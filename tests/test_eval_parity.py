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
import re
import shutil

import pytest
import torch

from conftest import REPO_ROOT
from nanochat.core_bundle import BundleError, load_task_data
from nanochat.core_eval import core_label, evaluate_core, evaluate_task, max_positions, prepare_item
from nanochat.tokenizer import RustBPETokenizer
from tasks.arc import ARC
from tasks.common import TaskMixture, hf_shuffle_order, read_jsonl
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval, build_program, extract_imports
from tasks.mmlu import MMLU
from test_base_eval import checkpoint  # noqa: F401 (a fixture)
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


# -----------------------------------------------------------------------------
# 3. HumanEval program assembly


def test_humaneval_reference_assembly_and_the_official_one():
    task, official = HumanEval(stop=12), HumanEval(stop=12, assembly="official")
    examples = list(task)
    with_imports = next(ex for ex in HumanEval() if extract_imports(ex["prompt"]))
    imports = extract_imports(with_imports["prompt"])
    program = build_program(with_imports, "```python\ndef f():\n    pass\n```")
    assert program == (imports + "\n\ndef f():\n    pass\n\n" + with_imports["test"] + "\n"
                       + f"check({with_imports['entry_point']})")
    assert build_program(with_imports, "x", "official").startswith(with_imports["prompt"] + "x\n")
    # the measurement: body-only completions pass 12/12 the official way, 0/12 the reference's
    bodies = [ex["canonical_solution"] for ex in examples]
    assert sum(task.evaluate(ex, body) for ex, body in zip(examples, bodies)) == 0
    assert sum(official.evaluate(ex, body) for ex, body in zip(examples, bodies)) == 12
    whole = [ex["messages"][1]["content"] for ex in examples[:4]]  # whole functions pass both ways
    assert all(task.evaluate(ex, w) and official.evaluate(ex, w) for ex, w in zip(examples, whole))
    with pytest.raises(ValueError, match="assembly"):
        HumanEval(assembly="prompt")


# -----------------------------------------------------------------------------
# 4. No cropping within the rotary tables


class Recorder:
    """Remembers the length T of every batch a real model is given (a forward pre-hook)."""

    def __init__(self, model):
        self.lengths = []
        model.register_forward_pre_hook(lambda module, args: self.lengths.append(args[0].shape[1]))


def test_core_scores_long_items_whole_and_crops_only_past_the_rotary_tables(tmp_path, capsys):
    tok = ByteTokenizer()
    data = load_task_data(str(CPU_SAMPLE / "core_sample" / "eval_data" / "commonsense_reasoning" / "copa.jsonl"),
                          "multiple_choice")[:6]
    meta = task_meta("multiple_choice", num_fewshot=2)
    longest = max(len(row) for i in range(len(data)) for row in prepare_item(i, data, tok, meta, None)[0])
    model = tiny_gpt(257, sequence_len=32)
    assert 32 < longest <= max_positions(model) == model.rotary_seq_len == 320
    recorder, stats = Recorder(model), {}
    whole = evaluate_task(model, tok, data, "cpu", meta, batch_size=64, stats=stats)
    assert max(recorder.lengths) == longest and stats["cropped"] == 0  # the reference: never cropped
    # a model with the same weights and a longer context scores exactly the same
    longer = tiny_gpt(257, sequence_len=512)
    longer.load_state_dict(model.state_dict())
    assert evaluate_task(longer, tok, data, "cpu", meta) == whole
    # past the rotary tables (sequence_len 4 -> 40 positions) items are cropped, and the output says so
    short = tiny_gpt(257, sequence_len=4)
    bundle = tmp_path / "bundle"
    shutil.copytree(CPU_SAMPLE / "core_sample", bundle)
    out = evaluate_core(short, tok, "cpu", max_per_task=5, bundle_dir=str(bundle), tasks=["copa"])
    assert out["cropped"] == {"copa": 5}
    assert "5 cropped to the model's 40 positions (the reference would fail)" in capsys.readouterr().out


def test_categorical_chat_eval_feeds_whole_prompts(byte_tokenizer, capsys):
    from nanochat.chat_evaluation import run_categorical_eval
    task = ARC("ARC-Easy", "test", stop=24)
    lengths = sorted(len(byte_tokenizer.render_for_completion(ex)) for ex in task)
    model = tiny_gpt(byte_tokenizer.get_vocab_size(), sequence_len=16)  # rotary tables: 160 positions
    assert lengths[0] > 16 and lengths[-1] > 160
    recorder = Recorder(model)
    run_categorical_eval(task, model, byte_tokenizer, batch_size=1)
    assert sorted(recorder.lengths) == sorted(min(n, 160) for n in lengths)
    cropped = sum(n > 160 for n in lengths)
    assert f"{cropped} prompt(s) longer than the 160 positions the model can take" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# 5. A bundle with missing tasks; a subset of tasks


def test_missing_tasks_are_listed_and_the_rest_scored(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(CPU_SAMPLE / "core_sample", bundle)
    (bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl").unlink()
    (bundle / "eval_data" / "language_understanding" / "winograd_wsc.jsonl").unlink()
    tok = ByteTokenizer()
    model = tiny_gpt(257, sequence_len=64)
    out = evaluate_core(model, tok, "cpu", max_per_task=4, bundle_dir=str(bundle))
    assert sorted(out["results"]) == ["arc_easy", "bigbench_operators", "lambada_openai"]
    assert out["missing"] == ["copa", "winograd"] and out["num_tasks"] == 5
    assert core_label(out) == "CORE partial (3/5 tasks)"
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
    lines = [line for line in capsys.readouterr().out.splitlines() if "missing" in line]
    assert lines == ["CORE: 2 task(s) missing from the bundle, not scored: copa, winograd"]
    # a subset by label, and every task of core.yaml scored is plain "CORE"
    sub = evaluate_core(model, tok, "cpu", max_per_task=4, bundle_dir=str(bundle), tasks=["lambada_openai"])
    assert list(sub["results"]) == ["lambada_openai"] and core_label(sub) == "CORE partial (1/5 tasks)"
    assert sub["results"]["lambada_openai"] == out["results"]["lambada_openai"]
    full = evaluate_core(model, tok, "cpu", max_per_task=2, bundle_dir=str(CPU_SAMPLE / "core_sample"))
    assert core_label(full) == "CORE" and full["missing"] == []
    with pytest.raises(BundleError, match="unknown CORE task.*hellaswag.*the bundle has: arc_easy, copa"):
        evaluate_core(model, tok, "cpu", bundle_dir=str(bundle), tasks=["hellaswag"])
    with pytest.raises(BundleError, match="no CORE task left to score"):
        evaluate_core(model, tok, "cpu", bundle_dir=str(bundle), tasks=["copa"])


@pytest.mark.slow
def test_base_eval_reports_a_partial_core(checkpoint, tmp_path):
    """The script: the table, the CSV and the report say "CORE partial (k/N tasks)"; --tasks picks."""
    import csv
    from test_base_eval import STEP, TAG, run_base_eval
    bundle = tmp_path / "bundle"
    shutil.copytree(CPU_SAMPLE / "core_sample", bundle)
    (bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl").unlink()
    out = run_base_eval("--device_type=cpu", "--max_per_task=4", f"--eval_bundle={bundle}",
                        "--tasks=copa,winograd,lambada_openai")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CORE: 1 task(s) missing from the bundle, not scored: copa" in out.stdout
    assert "not scored (data file missing): copa" in out.stdout
    core = re.search(r"^CORE partial \(2/5 tasks\)\s+(-?[\d.]+)$", out.stdout, re.M)
    assert core and not re.search(r"^CORE\s+-?[\d.]+$", out.stdout, re.M)  # never a plain CORE row
    with open(checkpoint / "base_eval" / f"{TAG}_{STEP:06d}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["lambada_openai", "winograd", "CORE partial (2/5 tasks)"]  # core.yaml order
    section = (checkpoint / "report" / "base-model-evaluation.md").read_text()
    assert f"- CORE partial (2/5 tasks): {float(core.group(1)):.4f}" in section and "- CORE:" not in section
    out = run_base_eval("--device_type=cpu", f"--eval_bundle={bundle}", "--tasks=hellaswag")
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("base_eval: unknown CORE task")
    assert "Traceback" not in out.stderr


# -----------------------------------------------------------------------------
# 6. Sampling seed, callable tokenizer


def test_generative_eval_samples_every_problem_with_seed_42(byte_tokenizer):
    from nanochat.chat_evaluation import generative_outcomes
    from nanochat.engine import Engine

    class SeedRecordingEngine(Engine):
        seeds = []

        def generate_batch(self, tokens, num_samples=1, **kwargs):
            self.seeds.append(kwargs["seed"])
            return super().generate_batch(tokens, num_samples=num_samples, **kwargs)

    engine = SeedRecordingEngine(tiny_gpt(byte_tokenizer.get_vocab_size(), sequence_len=512), byte_tokenizer)
    generative_outcomes(GSM8K("test"), engine, byte_tokenizer, num_samples=2, max_new_tokens=2, temperature=1.0,
                        max_problems=3)
    assert engine.seeds == [42, 42, 42]


def test_tokenizer_is_callable_like_the_reference(byte_tokenizer):
    bos = byte_tokenizer.get_bos_token_id()
    assert byte_tokenizer("hi", prepend=bos) == byte_tokenizer.encode("hi", prepend=bos) == [bos, 104, 105]
    assert byte_tokenizer(["a", "bc"]) == [[97], [98, 99]]
