"""
MMLU: 4-way multiple-choice questions over 57 subjects (Hugging Face `cais/mmlu`). Categorical.

- `MMLU("all", "test")`: the 14,042 test questions (also "validation", "dev").
- `MMLU("auxiliary_train", "train")`: ~100K multiple-choice training questions that midtraining
  mixes in to teach the format. Its Hugging Face config stores each row inside a `train` struct
  column; that is unwrapped here. It is not part of dev/cpu_sample: with a local data dir it
  must be provided as mmlu/auxiliary_train.jsonl, otherwise a FileNotFoundError says so (the
  mixture code then uses what is there, e.g. ARC train as a stand-in).

    from tasks.mmlu import MMLU
    MMLU("all", "test").get_example(0)   # {"messages": [...], "letters": [A..D], "subject": ...}
"""

from __future__ import annotations

from tasks.common import ShuffledRows, Task, load_rows, render_mc

LETTERS = ("A", "B", "C", "D")


def _unwrap(row: dict) -> dict:
    """auxiliary_train rows arrive as {"train": {question, choices, answer, subject}}."""
    return row["train"] if "train" in row and isinstance(row["train"], dict) else row


def _check_row(row: dict) -> None:
    row = _unwrap(row)
    if not isinstance(row["question"], str) or len(row["choices"]) != 4:
        raise ValueError(f"needs a question and 4 choices, got {len(row['choices'])} choices")
    if row["answer"] not in range(4):
        raise ValueError(f"answer must be an integer 0-3, got {row['answer']!r}")


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, data_dir: str | None = None, **view):
        super().__init__(**view)
        if subset == "all" and split in ("test", "validation", "dev"):
            local, hf = f"mmlu/{split}.jsonl", ("cais/mmlu", "all", split)
        elif subset == "auxiliary_train" and split == "train":
            local, hf = "mmlu/auxiliary_train.jsonl", ("cais/mmlu", "auxiliary_train", "train")
        else:
            raise ValueError(f"MMLU takes subset 'all' with split test/validation/dev, or subset 'auxiliary_train' "
                             f"with split 'train'; got {subset!r}, {split!r}")
        self.subset = subset
        self.rows = ShuffledRows(load_rows(local, hf, data_dir, _check_row))  # the reference's shuffle(seed=42) order

    def row_example(self, row_index: int) -> dict:
        row = _unwrap(self.rows[row_index])
        user = render_mc(row["question"], LETTERS, row["choices"])
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": LETTERS[row["answer"]]}]
        return {"messages": messages, "letters": list(LETTERS), "subject": row.get("subject", "")}

    def evaluate(self, conversation: dict, response: str) -> int:
        return int(response.strip() == conversation["messages"][-1]["content"])
