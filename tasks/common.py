"""
Chat tasks: the base class every data set and eval in `tasks/` derives from, mixtures of tasks,
the multiple-choice prompt, and the loader that finds a task's rows (local files or Hugging Face).

Design choices:
- A `Task` is a *logical view* of its rows: `start/stop/step` slice the underlying data the way a
  Python slice would, so `GSM8K(split="test", stop=100)` is the first 100 problems and
  `ARC(..., start=rank, step=world_size)` is one rank's share. `num_examples()` counts the view;
  `get_example(i)` maps view index i to row `start + i * step`. Subclasses only say how many rows
  there are (`num_rows`; by default `len(self.rows)`) and how to turn one into a conversation
  (`row_example`). Shared checks: `check_split` (train | test), `check_messages` (role order).
- A conversation is `{"messages": [{"role": ..., "content": ...}, ...], ...extra fields}`, the
  format `tokenizer.render_conversation` takes. Categorical tasks add `"letters"`: the answers a
  model may give, so chat_eval can take the argmax over just those letters' logits.
- `evaluate(conversation, response) -> 0 or 1`; `reward` defaults to `float(evaluate(...))`.
- Item order: every data set's rows are shuffled once, as the reference does with Hugging Face
  datasets' `ds.shuffle(seed=42)`. That call is `numpy.random.default_rng(42).permutation(n)`
  over the row indices (`hf_shuffle_order`, checked against the datasets library), so example i
  here is example i there: `chat_eval -x 100` scores the same 100 items, and a `stop=` view keeps
  the same rows. The view (start/stop/step) applies to the shuffled rows.
- `TaskMixture` shuffles every (task, index) pair with a fixed seed: listing a task twice makes
  it seen twice per epoch (oversampling by repetition).
- Rows come from local files when a data directory is given (the `data_dir` argument or
  $NANOCHAT_DATA_DIR, laid out like dev/cpu_sample: `arc/ARC-Easy/test.jsonl`, `mmlu/test.jsonl`,
  `gsm8k/train.jsonl`, `humaneval/HumanEval.jsonl.gz`, `chat/*.messages.jsonl`). Otherwise the
  Hugging Face parquet export of the data set is downloaded once into `<base dir>/task_data/`:
  the Hub's listing `GET {HF}/api/datasets/{repo}/parquet/{config}/{split}` names the files, each
  is fetched with `nanochat.download.download_file` (retries, atomic rename, every row group
  decoded before the file is kept, a size cap, a deadline, Ctrl-C-safe) under a file lock, and a
  `files.json` written last marks the split complete. $NANOCHAT_HF_URL replaces
  https://huggingface.co (a mirror; the tests serve a local http.server); the
  $NANOCHAT_DOWNLOAD_* variables apply as for the pretraining shards.
- A malformed row is a ValueError naming the file and the line (or parquet row).
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
import random
from collections.abc import Callable, Sequence

from nanochat.common import data_dir_setting, file_lock, get_base_dir
from nanochat.tokenizer import role_order_error
from nanochat.download import check_parquet, download_file, fetch_bytes

HF_URL = "https://huggingface.co"


# -----------------------------------------------------------------------------
# Tasks


class Task:
    """A logical view (start/stop/step) over rows; subclasses define row_example, and num_rows
    unless they keep their rows as the sequence `self.rows`."""

    eval_type = "generative"  # 'categorical' (answer = one of example["letters"]) or 'generative'

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}: "
                             f"need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    # what subclasses implement
    def num_rows(self) -> int:
        """Number of rows in the underlying data, ignoring the view."""
        return len(self.rows)

    def row_example(self, row_index: int) -> dict:
        """The conversation for underlying row `row_index`."""
        raise NotImplementedError

    def evaluate(self, conversation: dict, response: str) -> int:
        """1 if `response` (the assistant's text) answers `conversation` correctly, else 0."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluate()")

    def reward(self, conversation: dict, response: str) -> float:
        """The RL reward of a response; by default the evaluation as a float."""
        return float(self.evaluate(conversation, response))

    # the view
    def _range(self) -> range:
        n = self.num_rows()
        stop = n if self.stop is None else min(self.stop, n)
        return range(self.start, stop, self.step)

    def num_examples(self) -> int:
        return len(self._range())

    def get_example(self, index: int) -> dict:
        rows = self._range()
        if not 0 <= index < len(rows):
            raise IndexError(f"{type(self).__name__} example {index} is out of range (the view has {len(rows)})")
        return self.row_example(rows[index])

    def __len__(self) -> int:
        return self.num_examples()

    def __getitem__(self, index: int) -> dict:
        return self.get_example(index)


class TaskMixture(Task):
    """All examples of `tasks`, shuffled together with a fixed seed. A task that appears twice in
    the list is seen twice (oversampling by repetition)."""

    def __init__(self, tasks: list[Task], seed: int = 42, **view):
        super().__init__(**view)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(task.num_examples())]
        random.Random(seed).shuffle(self.index_map)

    def num_rows(self) -> int:
        return len(self.index_map)

    def row_example(self, row_index: int) -> dict:
        t, i = self.index_map[row_index]
        return self.tasks[t].get_example(i)


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice prompt, the reference's text exactly: "Multiple Choice question: " and
    the question, one line `- {choice}={letter}` per option (the letter after the choice, so a small
    model reads the choice before the letter it must emit; no space before the letter, so it is the
    same token as the answer "A"), then the instruction. Training (mid/SFT) and evaluation share it."""
    assert len(letters) == len(choices), f"{len(letters)} letters for {len(choices)} choices"
    lines = [f"Multiple Choice question: {question}"] + [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def hf_shuffle_order(n: int, seed: int = 42) -> list[int]:
    """The row order of Hugging Face datasets' `Dataset.shuffle(seed=seed)` on n rows: it draws
    `np.random.default_rng(seed).permutation(n)` (PCG64) and selects those indices."""
    import numpy as np
    return np.random.default_rng(seed).permutation(n).tolist()


class ShuffledRows(Sequence):
    """rows[order[i]] for i in range(len(rows)), order = hf_shuffle_order(len(rows), seed): the
    reference's `load_dataset(...).shuffle(seed=42)`, over rows already loaded."""

    def __init__(self, rows: Sequence, seed: int = 42):
        self.rows, self.order = rows, hf_shuffle_order(len(rows), seed)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.rows[self.order[i]]


def check_messages(messages, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `messages` is a list of {role, content} with an
    optional leading system message, then user/assistant alternating, ending with the assistant."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{where}: expected a list of at least 2 messages, got {str(messages)[:100]!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} must be an object with a string 'content'")
    if error := role_order_error([message.get("role") for message in messages], last="assistant"):
        raise ValueError(f"{where}: {error}")


def check_split(task: str, split: str) -> None:
    """Raise ValueError unless `split` is one of the two splits, "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"{task} split must be 'train' or 'test', got {split!r}")


# -----------------------------------------------------------------------------
# Finding rows: local files or the Hugging Face parquet export


def get_data_dir(data_dir: str | None = None) -> str | None:
    """The local data folder (argument, else $NANOCHAT_DATA_DIR, else the one the CPU preset recorded
    in the base dir), or None: download from HF."""
    return data_dir or data_dir_setting("NANOCHAT_DATA_DIR")


def read_jsonl(path: str, check: Callable[[dict], None] | None = None) -> list:
    """Rows of a .jsonl or .jsonl.gz file; a bad line is a ValueError naming file and line."""
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if check is not None:
                    check(row)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}, line {line_number}: malformed row: {e}") from None
            rows.append(row)
    return rows


class ParquetRows(Sequence):
    """Rows of a list of parquet files as dicts, converted one at a time (SmolTalk has ~460K
    conversations: a pyarrow table holds them compactly, a list of dicts would not)."""

    def __init__(self, paths: list[str], check: Callable[[dict], None] | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq
        tables = [pq.read_table(p) for p in paths]
        self.paths, self.check = paths, check
        self.starts = [0]  # first row of each file, to name the file of a bad row
        for table in tables:
            self.starts.append(self.starts[-1] + table.num_rows)
        self.table = pa.concat_tables(tables)  # zero-copy

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        row = self.table.slice(i, 1).to_pylist()[0]
        if self.check is not None:
            try:
                self.check(row)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                f = bisect.bisect_right(self.starts, i) - 1
                raise ValueError(f"{self.paths[f]}, row {i - self.starts[f]}: malformed row: {e}") from None
        return row


def hf_base_url() -> str:
    return os.environ.get("NANOCHAT_HF_URL", HF_URL).rstrip("/")


def download_hf_split(repo: str, config: str, split: str) -> list[str]:
    """Download the parquet files of one split of a Hugging Face data set (once) into
    <base dir>/task_data/<repo>/<config>/<split>/; return their paths."""
    directory = os.path.join(get_base_dir(), "task_data", repo.replace("/", "__"), config, split)
    manifest = os.path.join(directory, "files.json")
    with file_lock(os.path.join(directory, ".lock")):
        if not os.path.exists(manifest):
            listing_url = f"{hf_base_url()}/api/datasets/{repo}/parquet/{config}/{split}"
            try:
                urls = json.loads(fetch_bytes(listing_url, attempts=2))
            except Exception as e:
                raise RuntimeError(f"could not list the parquet files of {repo} ({config}/{split}) at {listing_url}: {e}. "
                                   f"Without internet, point NANOCHAT_DATA_DIR at local copies of the data") from e
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise RuntimeError(f"{listing_url} returned {str(urls)[:200]!r}, not a list of parquet URLs")
            names = [f"{i:04d}.parquet" for i in range(len(urls))]
            for url, name in zip(urls, names):
                download_file(url, os.path.join(directory, name), validate=check_parquet)
            tmp = manifest + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"repo": repo, "config": config, "split": split, "files": names, "urls": urls}, f)
            os.replace(tmp, manifest)  # written last: the split is complete
    with open(manifest) as f:
        return [os.path.join(directory, name) for name in json.load(f)["files"]]


def load_rows(local_path: str | None, hf: tuple[str, str, str], data_dir: str | None = None,
              check: Callable[[dict], None] | None = None) -> Sequence[dict]:
    """The rows of one split: `<data dir>/<local_path>` if a data dir is set, else the Hugging Face
    parquet export `hf` = (repo, config, split), downloaded once."""
    data_dir = get_data_dir(data_dir)
    if data_dir is not None:
        if local_path is None:
            raise FileNotFoundError(f"{hf[0]} ({hf[1]}/{hf[2]}) has no local copy in {data_dir}; "
                                    f"unset NANOCHAT_DATA_DIR to download it from Hugging Face")
        path = os.path.join(data_dir, local_path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: the data dir {data_dir} (NANOCHAT_DATA_DIR or data_dir=) "
                                    f"has no {local_path}; unset it to download {hf[0]} from Hugging Face")
        return read_jsonl(path, check)
    return ParquetRows(download_hf_split(*hf), check)
