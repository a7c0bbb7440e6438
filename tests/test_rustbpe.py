"""rustbpe (the Rust trainer) against the pure-Python reference in tests/bpe_reference.py: the same
merges, merge for merge, on real text; the same encodings; and clear errors for bad arguments."""

import pytest
import rustbpe

import bpe_reference as ref

MULTILINGUAL = (
    "Hello world! It's 2024 and prices rose 12.5% to $1,234,567.\n"
    "Привет, мир! Как дела? 東京は日本の首都です。안녕하세요 세계. مرحبا بالعالم\n"
    "Emoji 😀😃😄 and flags 🇯🇵🇫🇷, combining é vs é, zero-width\u200bjoin.\n"
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\nwindows line\n"
) * 3


def train_rust(texts, vocab_size, **kwargs) -> rustbpe.Tokenizer:
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def check_same_merges(texts, vocab_size, **kwargs):
    tok = train_rust(texts, vocab_size, **kwargs)
    merges = ref.train_bpe(texts, vocab_size)
    assert dict(tok.get_mergeable_ranks()) == ref.mergeable_ranks(merges)
    return tok, merges


def test_merges_equal_reference_on_shakespeare(shakespeare):
    texts = [shakespeare[:25_000]]
    tok, merges = check_same_merges(texts, 420)
    assert len(tok.get_mergeable_ranks()) == 420
    sample = shakespeare[100_000:103_000]
    assert tok.encode(sample) == ref.encode(sample, merges)


def test_merges_equal_reference_on_multilingual_text():
    tok, merges = check_same_merges([MULTILINGUAL], 360)
    assert tok.encode(MULTILINGUAL) == ref.encode(MULTILINGUAL, merges)


def test_many_small_texts_and_small_buffers_give_the_same_merges(shakespeare):
    lines = shakespeare[:20_000].splitlines(keepends=True)
    # The buffer size decides only how texts are batched for counting, never the merges.
    unbuffered = train_rust(lines, 400).get_mergeable_ranks()
    assert train_rust(lines, 400, buffer_size=7).get_mergeable_ranks() == unbuffered
    check_same_merges(lines, 400, buffer_size=1)


def test_ties_everywhere():
    # Every pair occurs exactly once: the order is decided by tie-breaking alone.
    texts = ["abcdefghij", "klmnopqrst", "zyxwvutsrq", "0a1b2c3d"]
    check_same_merges(texts, 300)


def test_repetitive_text_with_overlapping_pairs():
    check_same_merges(["aaaaaaaaaaaa bbbb aaaa abababab " * 5, "aaa", "a"], 280)


def test_stops_early_on_tiny_text():
    tok = train_rust(["abc"], 1000)
    assert len(tok.get_mergeable_ranks()) == 258


def test_default_pattern_is_the_reference_pattern():
    assert rustbpe.Tokenizer().get_pattern() == ref.SPLIT_PATTERN
    assert rustbpe.GPT4_PATTERN == ref.SPLIT_PATTERN


def test_custom_pattern():
    pattern = r"\S+|\s+"
    tok = train_rust(["hello hello world"], 270, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert dict(tok.get_mergeable_ranks()) == ref.mergeable_ranks(ref.train_bpe(["hello hello world"], 270, pattern))


def test_batch_encode_equals_encode(shakespeare):
    tok = train_rust([shakespeare[:30_000]], 400)
    texts = [shakespeare[i:i + 500] for i in range(0, 20_000, 500)] + ["", MULTILINGUAL]
    assert tok.batch_encode(texts) == [tok.encode(t) for t in texts]


def test_mergeable_ranks_are_bytes_in_id_order():
    ranks = train_rust([MULTILINGUAL], 300).get_mergeable_ranks()
    assert all(isinstance(token, bytes) for token, _ in ranks)
    assert [i for _, i in ranks] == list(range(len(ranks)))
    assert ranks[:256] == [(bytes([i]), i) for i in range(256)]


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(texts=["x"], vocab_size=100), ValueError, "at least 256"),
    (dict(texts=["x"], vocab_size=300, buffer_size=0), ValueError, "buffer_size"),
    (dict(texts=["x", 3], vocab_size=300), TypeError, "item 1 is not a str"),
    (dict(texts=["x"], vocab_size=300, pattern="("), ValueError, "invalid split pattern"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, fragment):
    texts = kwargs.pop("texts")
    with pytest.raises(error, match=fragment):
        train_rust(texts, **kwargs)


def test_not_an_iterable():
    with pytest.raises(TypeError, match="iterable of str"):
        rustbpe.Tokenizer().train_from_iterator(42, 300)


@pytest.mark.slow
def test_merges_equal_reference_on_a_larger_slice(shakespeare):
    check_same_merges([shakespeare[:100_000]], 768)
