"""
CustomJSON: your own conversations from a local JSONL file, e.g. identity conversations that
teach the model its name. Each line is one conversation, a JSON list of messages:

    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am nanochat..."}]

(an object {"messages": [...]} per line is accepted too, the layout of dev/cpu_sample/chat). An
optional system message may come first; then roles alternate user/assistant and the last message
is the assistant's. Every line is validated on load; a bad one is a ValueError naming file and line.

    from tasks.customjson import CustomJSON, identity_conversations_path
    CustomJSON(identity_conversations_path())

Identity conversations (who the model is, who made it, what it can do) are in the mid and SFT
mixtures, as in the reference. Ours ship in tasks/identity_conversations.jsonl (94 conversations,
written for this repository); put your own at `<base dir>/identity_conversations.jsonl` (the
reference's location) and they replace ours.
"""

from __future__ import annotations

import os

from nanochat.common import get_base_dir
from tasks.common import Task, check_messages, read_jsonl

SHIPPED_IDENTITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_conversations.jsonl")


def identity_conversations_path() -> str:
    """<base dir>/identity_conversations.jsonl if there is one (yours), else the shipped file."""
    yours = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    return yours if os.path.exists(yours) else SHIPPED_IDENTITY


def _messages(row) -> list:
    return row["messages"] if isinstance(row, dict) else row


def _check_row(row) -> None:
    check_messages(_messages(row), "conversation")


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, filepath: str, **view):
        super().__init__(**view)
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"CustomJSON: {filepath} does not exist (expected a JSONL file, one conversation "
                                    f"per line: a list of {{\"role\", \"content\"}} messages)")
        self.filepath = filepath
        self.rows = read_jsonl(filepath, _check_row)

    def row_example(self, row_index: int) -> dict:
        return {"messages": _messages(self.rows[row_index])}
