"""
GSM8K: 8.5K grade-school math word problems with worked solutions (Hugging Face `openai/gsm8k`,
config `main`: train 7,473, test 1,319). Generative: the final answer follows `####`.

The solutions carry calculator annotations, `48/2 = <<48/2=24>>24`: the annotation becomes a
tool call in the assistant's content, so the model learns to use the calculator the engine runs:

    [{"type": "text", "text": "Natalia sold 48/2 = "},
     {"type": "python", "text": "48/2"},             # written by the model (trained on)
     {"type": "python_output", "text": "24"},        # written by the engine's calculator (masked)
     {"type": "text", "text": "24 clips in May.\n... #### 72"}]

`extract_answer` reads the number after `####` with commas removed; `evaluate` compares it with the
reference (0/1) and `reward` is that as a float (chat_rl's reward).

    from tasks.gsm8k import GSM8K
    task = GSM8K("test")
"""

from __future__ import annotations

import re

from tasks.common import ShuffledRows, Task, check_split, load_rows

ANSWER_RE = re.compile(r"####\s*(-?[0-9.,]+)")
TOOL_RE = re.compile(r"(<<[^<>]*>>)")


def extract_answer(text: str) -> str | None:
    """The number after '####' (the first such marker), commas removed, or None."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).replace(",", "").rstrip(".")


def parse_solution(answer: str) -> list[dict]:
    """A worked solution with <<expr=result>> annotations as assistant content parts."""
    parts = []
    for piece in TOOL_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not expr:  # an annotation without '=': the whole thing is the expression
                expr, result = result, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _check_row(row: dict) -> None:
    if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
        raise ValueError("needs string 'question' and 'answer'")
    if extract_answer(row["answer"]) is None:
        raise ValueError("the answer has no '#### <number>' line")


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str, data_dir: str | None = None, **view):
        super().__init__(**view)
        check_split("GSM8K", split)
        rows = load_rows(f"gsm8k/{split}.jsonl", ("openai/gsm8k", "main", split), data_dir, _check_row)
        self.rows = ShuffledRows(rows)  # the reference's shuffle(seed=42) order

    def row_example(self, row_index: int) -> dict:
        row = self.rows[row_index]
        messages = [{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": parse_solution(row["answer"])}]
        return {"messages": messages}

    def evaluate(self, conversation: dict, response: str) -> int:
        """1 if the number after '####' in `response` equals the reference answer."""
        content = conversation["messages"][-1]["content"]
        reference = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        predicted = extract_answer(response)
        return int(predicted is not None and predicted == extract_answer(reference))
