"""
Train the BPE tokenizer on the FineWeb-Edu train shards and save it to <base dir>/tokenizer/
(tokenizer.pkl and token_bytes.pt).

Run (after `python -m nanochat.dataset -n 8`; the last shard present is held out as val):
    python -m scripts.tok_train --max_chars=2e9                       # the speedrun: ~2B characters
    python -m scripts.tok_train                                       # defaults: up to 10B characters
    python -m scripts.tok_train --max_chars=2e7 --vocab_size=8192     # a quick CPU try (seconds)

Re-running with the same settings and data folder reuses the saved tokenizer (pipelines can be
re-run cheaply); --force retrains.

How: documents stream from the train shards, each capped at --doc_cap characters (so a few huge
documents cannot dominate the pair counts), until --max_chars characters have been read; rustbpe
learns vocab_size - 9 tokens (256 bytes + merges) and the 9 special tokens take the last ids. A round
trip on multilingual/emoji/code text is checked before anything is written, and again on the
reloaded files. Reference: 65,536 tokens on 2B characters give ~4.8 bytes/token on FineWeb-Edu
(see scripts.tok_eval).
"""

import json
import os
import time

from nanochat.common import atomic_write
from nanochat.dataset import get_data_dir, parquets_iter_batched, split_files
from nanochat.flags import FlagError, StopRun, parse_flags, print_flags
from nanochat.report import get_report
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_token_bytes, get_tokenizer_dir

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    max_chars=10_000_000_000,  # stop reading after this many characters
    doc_cap=10_000,  # characters kept from the start of each document
    vocab_size=65536,  # 2^16, specials included
    force=False,  # retrain even if a tokenizer with these settings exists
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
if cfg.max_chars <= 0 or cfg.doc_cap <= 0:
    raise FlagError(f"--max_chars and --doc_cap must be positive (got {cfg.max_chars}, {cfg.doc_cap})")
if cfg.vocab_size < 256 + len(SPECIAL_TOKENS):
    raise FlagError(f"--vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                    f"(256 bytes + {len(SPECIAL_TOKENS)} specials), got {cfg.vocab_size}")
print_flags(cfg, DEFAULTS)

# -----------------------------------------------------------------------------
# Already trained with these settings? (training.json is written last, after both files)

tokenizer_dir = get_tokenizer_dir()
settings = dict(max_chars=cfg.max_chars, doc_cap=cfg.doc_cap, vocab_size=cfg.vocab_size,
                data_dir=os.path.abspath(get_data_dir()))
settings_path = os.path.join(tokenizer_dir, "training.json")
if not cfg.force and os.path.exists(settings_path):
    with open(settings_path) as f:
        previous = json.load(f)
    if previous.get("settings") == settings and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.pkl")):
        print(f"a tokenizer trained with these settings is already in {tokenizer_dir}: reusing it "
              f"(--force to retrain)")
        get_report().log(section="Tokenizer training", data=[vars(cfg), dict(reused=tokenizer_dir), *previous["results"]])
        raise SystemExit(0)

# -----------------------------------------------------------------------------
# Text: capped documents from the train split, up to max_chars

try:
    split_files("train")  # no shards: say so (and how to get them) now, not from inside the trainer
except FileNotFoundError as e:
    raise StopRun(f"tok_train: {e}") from None

seen = dict(docs=0, chars=0)


def text_iterator():
    for texts in parquets_iter_batched(split="train"):
        for doc in texts:
            doc = doc[:cfg.doc_cap]
            seen["docs"] += 1
            seen["chars"] += len(doc)
            yield doc
            if seen["chars"] >= cfg.max_chars:
                return


# -----------------------------------------------------------------------------
# Train

t0 = time.time()
tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), cfg.vocab_size)
train_time = time.time() - t0
print(f"trained on {seen['docs']:,} documents, {seen['chars']:,} characters in {train_time:.2f}s")
if seen["chars"] < cfg.max_chars:
    print(f"note: the train shards ran out before --max_chars={cfg.max_chars:,}")
if tokenizer.get_vocab_size() != cfg.vocab_size:
    print(f"note: vocab size is {tokenizer.get_vocab_size():,}, not {cfg.vocab_size:,}: "
          f"the text has fewer distinct pairs to merge")

# -----------------------------------------------------------------------------
# Round trip, save, reload

ROUND_TRIP_TEXT = (
    "Hello world! This is a test of the tokenizer.\n"
    "Numbers: 0 7 42 123 4567 3.14159 1,000,000\n"
    "Contractions: I'm, you're, it's, we'll, they've, DON'T\n"
    "Symbols: @#$%^&*()[]{}<>~`|\\ and <|bos|> as plain text\n"
    "Unicode: 你好世界 こんにちは 안녕하세요 Привет мир ¿Qué tal? Ελληνικά العربية हिन्दी\n"
    "Emoji: 🌍🚀👩‍💻🏳️‍🌈 👍🏽\n"
    "Code:\n    def square(x: int) -> int:\n\treturn x ** 2  # a tab, trailing spaces   \r\n\n\n"
)


def check_round_trip(tok: RustBPETokenizer) -> list[int]:
    ids = tok.encode(ROUND_TRIP_TEXT)
    decoded = tok.decode(ids)
    if decoded != ROUND_TRIP_TEXT:
        raise RuntimeError(f"tokenizer round trip failed:\n{ROUND_TRIP_TEXT!r}\n!=\n{decoded!r}")
    return ids


ids = check_round_trip(tokenizer)
if os.path.exists(settings_path):
    os.remove(settings_path)  # the old settings no longer describe what is on disk
tokenizer.save(tokenizer_dir)
reloaded = RustBPETokenizer.from_directory(tokenizer_dir)
assert check_round_trip(reloaded) == ids, "the saved tokenizer encodes differently from the trained one"
print(f"round trip ok ({len(ROUND_TRIP_TEXT.encode('utf-8'))} bytes -> {len(ids)} tokens); "
      f"saved {os.path.join(tokenizer_dir, 'tokenizer.pkl')} and token_bytes.pt")

# token_bytes statistics over the ordinary tokens (specials have 0 bytes)
token_bytes = get_token_bytes()  # as save() wrote it
ordinary = token_bytes[token_bytes > 0].float()
stats = dict(num_special_tokens=int((token_bytes == 0).sum()), token_bytes_min=int(ordinary.min()),
             token_bytes_max=int(ordinary.max()), token_bytes_mean=round(ordinary.mean().item(), 3),
             token_bytes_std=round(ordinary.std().item(), 3))
print("token bytes: " + ", ".join(f"{k}={v}" for k, v in stats.items()))

results = [dict(train_time_s=round(train_time, 2), docs=seen["docs"], chars=seen["chars"],
                trained_vocab_size=tokenizer.get_vocab_size()), stats]
atomic_write(settings_path, lambda f: json.dump(dict(settings=settings, results=results), f, indent=2), text=True)
get_report().log(section="Tokenizer training", data=[vars(cfg), *results])
