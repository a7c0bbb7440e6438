"""
HumanEval: 164 hand-written Python programming problems with unit tests (Hugging Face
`openai/openai_humaneval`). Generative: the model is shown the function signature and docstring
and writes the code; `evaluate` runs it against the tests in the sandbox (nanochat/execution.py).

Which program is run (`assembly`):
- "reference" (default, the reference nanochat's, so numbers compare with its published 0.0854):
  the prompt's leading imports, a blank line, the code extracted from the completion
  (`extract_program`: the first ```/```python fenced block, else the whole text, stripped), the
  tests and `check(entry_point)`. The model must write the whole function: a completion that is
  only the body does not define it, and fails.
- "official" (the OpenAI human-eval harness's program): `prompt + completion + "\n" + test +
  "\n" + check(entry_point)`, with the completion taken out of a ``` fence if it has one
  (`extract_fenced`). A body-only completion continues the prompt and passes; a whole function
  replaces the prompt's docstring-only one and passes too.
chat_eval's `--humaneval-assembly` picks one and its report section records which.
Either way the tests run apart from the candidate (`check_function`): a checker process runs the
trusted prompt + the tests and calls
`check(candidate)`, the candidate answering through a pipe, so the code under test cannot touch
the verdict.

    from tasks.humaneval import HumanEval
    task = HumanEval()
    ex = task.get_example(0)                    # rows in the reference's shuffle(seed=42) order
    task.evaluate(ex, ex["messages"][1]["content"])   # 1: the canonical whole function
"""

from __future__ import annotations

import re

from nanochat.execution import check_function
from tasks.common import ShuffledRows, Task, load_rows

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
ASSEMBLIES = ("reference", "official")
REFERENCE_FENCE_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)
FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (comments and blank lines skipped), stopping at the
    first other line: what the reference prepends to the extracted code."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith("import ") or stripped.startswith("from "):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The reference's extraction: the first closed ``` or ```python block, else the whole
    completion; stripped."""
    matches = REFERENCE_FENCE_RE.findall(completion)
    return matches[0].strip() if matches else completion.strip()


def extract_fenced(response: str) -> str:
    """The official assembly's extraction: the first ``` fenced block (python/py/python3 or none;
    an unclosed fence runs to the end) if there is one, else the whole text, unchanged."""
    match = FENCE_RE.search(response)
    return match.group(1) if match else response


def assemble(conversation: dict, completion: str, assembly: str = "reference") -> tuple[str, str]:
    """(the candidate module, the setup the checker runs before the tests) for `completion`."""
    if assembly == "reference":
        imports = extract_imports(conversation["messages"][0]["content"])
        # The checker gets the whole (trusted) prompt: a few tests call a helper the prompt defines
        # (HumanEval/32 `poly`, /38 and /50 the encoders), which the reference's single program
        # took from the model's code.
        return imports + "\n\n" + extract_program(completion), conversation["prompt"]
    if assembly == "official":
        return conversation["prompt"] + extract_fenced(completion), conversation["prompt"]
    raise ValueError(f"HumanEval assembly must be one of {ASSEMBLIES}, got {assembly!r}")


def build_program(conversation: dict, completion: str, assembly: str = "reference") -> str:
    """The whole program as the reference (or the official harness) runs it in one process (see the
    module docstring); here the candidate part and the tests run apart, see `assemble`."""
    code, _ = assemble(conversation, completion, assembly)
    test, check = conversation["test"], f"check({conversation['entry_point']})"
    return code + "\n\n" + test + "\n" + check if assembly == "reference" else code + "\n" + test + "\n" + check + "\n"


def _check_row(row: dict) -> None:
    for field in FIELDS:
        if not isinstance(row[field], str):
            raise ValueError(f"field {field!r} must be a string")


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, data_dir: str | None = None, timeout: float = 5.0, assembly: str = "reference", **view):
        super().__init__(**view)
        if assembly not in ASSEMBLIES:
            raise ValueError(f"HumanEval assembly must be one of {ASSEMBLIES}, got {assembly!r}")
        self.timeout, self.assembly = timeout, assembly
        rows = load_rows("humaneval/HumanEval.jsonl.gz", ("openai/openai_humaneval", "openai_humaneval", "test"),
                         data_dir, _check_row)
        self.rows = ShuffledRows(rows)  # the reference's shuffle(seed=42) order

    def row_example(self, row_index: int) -> dict:
        row = self.rows[row_index]
        # the reference's training target: the prompt, a newline, the canonical body
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}]
        return {"messages": messages, **{field: row[field] for field in FIELDS}}

    def evaluate(self, conversation: dict, response: str) -> int:
        """1 if the program assembled from `response` passes the problem's tests in the sandbox."""
        code, setup = assemble(conversation, response, self.assembly)
        return int(check_function(code, conversation["entry_point"], conversation["test"], setup=setup,
                                  timeout=self.timeout).success)
