"""
HumanEval: 164 hand-written Python programming problems with unit tests (Hugging Face
`openai/openai_humaneval`). Generative: the model is shown the function signature and docstring
and writes the code; `evaluate` runs it against the tests in the sandbox (nanochat/execution.py).

The candidate module is `prompt + completion`. This works whether the model wrote only the body
(it continues the prompt) or the whole function again (the new definition replaces the prompt's,
which is a valid docstring-only function), and keeps any helper functions and imports of the
prompt. The test runs apart from it (`check_function`): a checker process runs `prompt + test`
and calls `check(candidate)`, the candidate answering through a pipe, so the code under test
cannot touch the verdict. `extract_program` takes the code out of a
response with or without ``` fences.

    from tasks.humaneval import HumanEval
    task = HumanEval()
    ex = task.get_example(0)
    task.evaluate(ex, ex["canonical_solution"])   # 1
"""

from __future__ import annotations

import re

from nanochat.execution import check_function
from tasks.common import Task, load_rows

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    """The code in a response: the first ``` fenced block if there is one, else the whole text."""
    match = FENCE_RE.search(response)
    return match.group(1) if match else response


def _check_row(row: dict) -> None:
    for field in FIELDS:
        if not isinstance(row[field], str):
            raise ValueError(f"field {field!r} must be a string")


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, data_dir: str | None = None, timeout: float = 5.0, **view):
        super().__init__(**view)
        self.timeout = timeout
        self.rows = load_rows("humaneval/HumanEval.jsonl.gz", ("openai/openai_humaneval", "openai_humaneval", "test"),
                              data_dir, _check_row)

    def num_rows(self) -> int:
        return len(self.rows)

    def row_example(self, row_index: int) -> dict:
        row = self.rows[row_index]
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}]
        return {"messages": messages, **{field: row[field] for field in FIELDS}}

    def evaluate(self, conversation: dict, response: str) -> int:
        """1 if the code in `response` passes the problem's tests in the sandbox."""
        program = conversation["prompt"] + extract_program(response)
        return int(check_function(program, conversation["entry_point"], conversation["test"],
                                  setup=conversation["prompt"], timeout=self.timeout).success)
