"""
SmolTalk: general chat conversations for midtraining and SFT (Hugging Face
`HuggingFaceTB/smol-smoltalk`: train ~460K, test ~24K). Each row's `messages` is a conversation,
sometimes with a leading system message (the tokenizer merges it into the first user turn).

Locally (a data dir given by `data_dir=` or $NANOCHAT_DATA_DIR) SmolTalk itself is not available:
the chat samples `<data dir>/chat/*.messages.jsonl` (same `messages` layout) stand in for it. All
files are read in name order and split deterministically: every 20th conversation (index % 20 ==
0) is "test", the rest "train", about SmolTalk's 5% test share; each split is then shuffled like
the Hugging Face one (tasks/common.py, `ShuffledRows`). With dev/cpu_sample that is 1,027
conversations: 975 train / 52 test, single-turn (Dolly/HH and self-instruct rows: fine for plumbing
and CPU runs, not a quality SFT mix).

    from tasks.smoltalk import SmolTalk
    SmolTalk("train", stop=10_000)
"""

from __future__ import annotations

import glob
import os

from tasks.common import ShuffledRows, Task, check_messages, check_split, get_data_dir, load_rows, read_jsonl

TEST_EVERY = 20  # local stand-in: conversation i is in the test split when i % 20 == 0


def _check_row(row: dict) -> None:
    check_messages(row["messages"], "conversation")


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split: str, data_dir: str | None = None, **view):
        super().__init__(**view)
        check_split("SmolTalk", split)
        local_dir = get_data_dir(data_dir)
        if local_dir is None:
            self.rows = ShuffledRows(load_rows(None, ("HuggingFaceTB/smol-smoltalk", "default", split), None, _check_row))
            return
        paths = sorted(glob.glob(os.path.join(local_dir, "chat", "*.messages.jsonl")))
        if not paths:
            raise FileNotFoundError(f"no chat/*.messages.jsonl in the data dir {local_dir} to stand in for SmolTalk; "
                                    f"unset NANOCHAT_DATA_DIR to download it from Hugging Face")
        rows = [row for path in paths for row in read_jsonl(path, _check_row)]
        keep_test = split == "test"
        self.rows = ShuffledRows([row for i, row in enumerate(rows) if (i % TEST_EVERY == 0) == keep_test])

    def row_example(self, row_index: int) -> dict:
        return {"messages": self.rows[row_index]["messages"]}
