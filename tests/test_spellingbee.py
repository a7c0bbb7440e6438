"""
Tests for tasks/spellingbee.py and the identity conversations (tasks/customjson.py): the spelling
examples are deterministic, their counts right, their calculator call gives the engine's answer,
their grading is GSM8K's; the word list's lookup fails clearly; the shipped identity conversations
load, and a file in the base dir replaces them. Data: dev/cpu_sample/words (a slice of wamerican).
"""

import json

import pytest

from conftest import REPO_ROOT
from nanochat.engine import use_calculator
from nanochat.tokenizer import RustBPETokenizer
from tasks.customjson import SHIPPED_IDENTITY, CustomJSON, identity_conversations_path
from tasks.spellingbee import SimpleSpelling, SpellingBee, load_words

CPU_SAMPLE = REPO_ROOT / "dev" / "cpu_sample"


@pytest.fixture(autouse=True)
def cpu_sample_data(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(CPU_SAMPLE))


def test_spellingbee_examples_count_right_and_use_the_calculator():
    words = set(load_words())
    task = SpellingBee(size=200, split="train")
    assert len(task) == 200 and task.eval_type == "generative"
    assert task[7] == SpellingBee(size=10, split="train")[7]  # example i depends on i only
    assert task[0] != SpellingBee(size=1, split="test")[0]  # the splits use different seeds
    for i in range(len(task)):
        ex = task[i]
        user, assistant = ex["messages"]
        parts = assistant["content"]
        call, output = parts[2], parts[3]
        assert call["type"] == "python" and output["type"] == "python_output"
        word, letter = call["text"].split("'")[1], call["text"].split("'")[3]
        assert word in words and word in user["content"] and str(word.count(letter)) == output["text"]
        assert use_calculator(call["text"]) == output["text"]  # the engine computes what we trained on
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert parts[-1]["text"].endswith(f"#### {word.count(letter)}")
        assert task.evaluate(ex, f"So #### {word.count(letter)}") == 1
        assert task.evaluate(ex, f"#### {word.count(letter) + 1}") == 0 and task.evaluate(ex, "no idea") == 0


def test_spellingbee_renders_with_the_tool_output_masked():
    tok = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
    ids, mask = tok.render_conversation(SpellingBee(size=1)[0], max_tokens=None)
    out_start, out_end = ids.index(tok.encode_special("<|output_start|>")), ids.index(tok.encode_special("<|output_end|>"))
    assert set(mask[out_start:out_end + 1]) == {0} and mask[out_start - 1] == 1 and mask[-1] == 1


def test_simple_spelling():
    task = SimpleSpelling(size=50, split="train")
    for ex in task:
        user, assistant = ex["messages"]
        word = user["content"].removeprefix("Spell the word: ")
        assert assistant["content"] == word + ":" + ",".join(word)
    assert SimpleSpelling(size=5, split="test")[0] != task[0]
    with pytest.raises(ValueError, match="split"):
        SimpleSpelling(split="validation")


def test_word_list_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"words/words.txt not found: the spelling tasks need a word list"):
        SpellingBee(size=3)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: the word list is empty"):
        load_words(str(tmp_path / "empty.txt"))
    (tmp_path / "mine.txt").write_text("zebra\n")
    assert SimpleSpelling(size=1, word_list=str(tmp_path / "mine.txt"))[0]["messages"][1]["content"] == "zebra:z,e,b,r,a"


def test_identity_conversations_shipped_and_replaceable(base_dir):
    assert identity_conversations_path() == SHIPPED_IDENTITY
    shipped = CustomJSON(identity_conversations_path())  # every line validated on load
    assert len(shipped) >= 90
    assert sum("nanochat" in json.dumps(shipped[i]) for i in range(len(shipped))) > len(shipped) // 2
    mine = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Bob."}]
    (base_dir / "identity_conversations.jsonl").write_text(json.dumps(mine) + "\n")
    assert CustomJSON(identity_conversations_path())[0]["messages"] == mine


def test_chat_eval_loads_the_references_256_spelling_problems():
    from nanochat.chat_evaluation import BASELINES, load_task
    task = load_task("SpellingBee")
    assert len(task) == 256 and task.split == "test" and BASELINES["SpellingBee"] == 0.0
