"""
ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 options, in two subsets,
ARC-Easy and ARC-Challenge (Hugging Face `allenai/ai2_arc`). Categorical: the model answers with
one letter, rendered by `render_mc`.

The labels are used exactly as the data gives them: mostly A-D, but some NY Regents items use
1-4 and a few items have 3 or 5 options. The conversation's "letters" are that item's labels.

    from tasks.arc import ARC
    task = ARC("ARC-Easy", "test")      # 2,376 questions (ARC-Challenge test: 1,172)
    task.get_example(0)["messages"]
Locally: NANOCHAT_DATA_DIR=dev/cpu_sample (or a folder laid out like it) reads
arc/<subset>/<split>.jsonl.
"""

from __future__ import annotations

from tasks.common import ShuffledRows, Task, load_rows, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


def _check_row(row: dict) -> None:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if not isinstance(row["question"], str) or not labels or len(labels) != len(texts):
        raise ValueError("needs a question and choices with as many labels as texts")
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, data_dir: str | None = None, **view):
        super().__init__(**view)
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC subset must be one of {SUBSETS} and split one of {SPLITS}, got {subset!r}, {split!r}")
        rows = load_rows(f"arc/{subset}/{split}.jsonl", ("allenai/ai2_arc", subset, split), data_dir, _check_row)
        self.rows = ShuffledRows(rows)  # the reference's shuffle(seed=42) order

    def row_example(self, row_index: int) -> dict:
        row = self.rows[row_index]
        letters = list(row["choices"]["label"])
        user = render_mc(row["question"], letters, row["choices"]["text"])
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["answerKey"]}]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation: dict, response: str) -> int:
        return int(response.strip() == conversation["messages"][-1]["content"])
