"""
Spelling and letter counting, after the reference nanochat's tasks/spellingbee.py: "how many r
are in strawberry?" is hard for a small model because it sees tokens, not letters. Two tasks:

- `SpellingBee`: count a letter in a word. The assistant spells the word out, counts by hand,
  then checks with the calculator tool (`'strawberry'.count('r')`) and ends with `#### <count>`,
  graded like GSM8K (the number after ####). Generative; chat_eval evaluates it.
- `SimpleSpelling`: "Spell the word: apple" -> "apple:a,p,p,l,e", the skill SpellingBee needs,
  in its most condensed form (training only).

Examples are generated, not stored: example i draws from `random.Random(i)` (train) or
`random.Random(-(i + 1))` (test, so the splits never share a seed), so `size` is free. The mixtures
use the reference's sizes: mid_train 200K SimpleSpelling + 80K SpellingBee, chat_sft 300 + 300,
chat_eval 256 SpellingBee test problems.

Words: with a local data dir (`data_dir=` or $NANOCHAT_DATA_DIR), `<data dir>/words/words.txt`,
one word per line (dev/cpu_sample ships ~4K lowercase words of Debian's wamerican, with its
licence); otherwise the reference's list, dwyl/english-words `words_alpha.txt` (370K words),
downloaded once into `<base dir>/words_alpha.txt`. `word_list=` names any other file.

    from tasks.spellingbee import SpellingBee
    SpellingBee(size=256, split="test")[0]["messages"]
"""

from __future__ import annotations

import os
import random

from nanochat.common import file_lock, get_base_dir
from nanochat.download import download_file
from tasks.common import Task, check_split, get_data_dir
from tasks.gsm8k import extract_answer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"

# The question, in many phrasings and a few languages (data augmentation, as in the reference)
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]


def _check_word_list(path: str) -> None:
    """Raise unless `path` is a plain-text list of (mostly) ASCII letters, one word per line: never
    keep an error page or a truncated list."""
    with open(path, encoding="utf-8") as f:
        words = [line.strip() for line in f if line.strip()]
    if len(words) < 10_000 or sum(w.isascii() and w.isalpha() for w in words) < 0.99 * len(words):
        raise ValueError(f"{len(words)} lines, not a word list of one word per line")


def load_words(word_list: str | None = None, data_dir: str | None = None) -> list[str]:
    """The word list (see the module docstring for where it comes from), one word per line."""
    if word_list is None:
        local = get_data_dir(data_dir)
        if local is not None:
            word_list = os.path.join(local, "words", "words.txt")
            if not os.path.exists(word_list):
                raise FileNotFoundError(f"{word_list} not found: the spelling tasks need a word list, one word per "
                                        f"line, in the data dir {local} (or unset NANOCHAT_DATA_DIR to download one)")
        else:
            word_list = os.path.join(get_base_dir(), "words_alpha.txt")
            with file_lock(word_list + ".lock"):
                if not os.path.exists(word_list):
                    download_file(WORD_LIST_URL, word_list, max_bytes=16 << 20, validate=_check_word_list)
    with open(word_list, encoding="utf-8") as f:
        words = [line.strip() for line in f if line.strip()]
    if not words:
        raise ValueError(f"{word_list}: the word list is empty")
    return words


def _seed(index: int, split: str) -> int:
    return index if split == "train" else -(index + 1)  # test seeds never collide with train's


class _WordTask(Task):
    """`size` examples generated from the word list, example i from the seed _seed(i, split)."""
    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", word_list: str | None = None,
                 data_dir: str | None = None, **view):
        super().__init__(**view)
        check_split(type(self).__name__, split)
        self.size, self.split = size, split
        self.words = load_words(word_list, data_dir)

    def num_rows(self) -> int:
        return self.size


class SpellingBee(_WordTask):

    def row_example(self, row_index: int) -> dict:
        rng = random.Random(_seed(row_index, self.split))
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # mostly a letter of the word
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        quotes = ["", "'", '"']
        letter_quote, word_quote = rng.choice(quotes), rng.choice(quotes)
        user_msg = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            user_msg += "?"
        # The answer: spell, count by hand ("3:r hit! count=1": no space, so "r" is the same token
        # as in the spelling), then check with the calculator, then the final "#### n".
        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
                  f"first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\n"
                  f"Then count the occurrences of '{letter}':\n")
        running = 0
        for i, char in enumerate(word, 1):
            if char == letter:
                running += 1
                manual += f"{i}:{char} hit! count={running}\n"
            else:
                manual += f"{i}:{char}\n"
        manual += f"\nThis gives us {running}."
        parts = [{"type": "text", "text": manual},
                 {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": user_msg}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, response: str) -> int:
        """1 if the number after '####' in `response` is the count (graded as GSM8K)."""
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = extract_answer(response)
        return int(predicted is not None and predicted == reference)


class SimpleSpelling(_WordTask):

    def __init__(self, size: int = 1000, split: str = "train", word_list: str | None = None,
                 data_dir: str | None = None, **view):
        super().__init__(size, split, word_list, data_dir, **view)
        random.Random(42).shuffle(self.words)  # a different word order from SpellingBee's

    def row_example(self, row_index: int) -> dict:
        word = random.Random(_seed(row_index, self.split)).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}
