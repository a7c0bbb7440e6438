"""
Tests for nanochat/tokenizer.py: the tiktoken export encodes exactly like the pure-Python reference
BPE (tests/bpe_reference.py) given the same merges; round trips on hard text; special tokens;
raw-byte token lengths; every rule of conversation rendering; saving and loading.

The trained tokenizer is the session's tiny one (conftest: 512 tokens on Tiny Shakespeare).
bpe_reference is imported inside the tests that compare against it (it lives in tests/).
"""

import os
import pickle

import pytest
import regex
import torch

from nanochat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, compute_token_bytes, get_token_bytes,
                                get_tokenizer)

MULTILINGUAL = ("The café's naïve coöperation — 1234567 ½ ²³. Über straße.\n"
                "你好，世界！這是一個測試。こんにちは世界。안녕하세요 세계. Привет, мир! مرحبا بالعالم. नमस्ते दुनिया\n"
                "Emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵 ❤️\n")
CODE = "def f(x):\n\tif x  >= 10:\n        return {'a': [1, 2]}  \n\r\n    # done\n\n\n"

EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\n", "\t \r\n \t", "   leading", "trailing   ", "a", "A" * 1000, "0" * 257,
    "<|bos|>", "<|user_start|>hi<|user_end|>", "e\u0301 n\u0303 (combining)", "\x00\x01\x7f control",
    "\ufffd replacement char", "\U0001F600\U0001F601", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∀x∈ℝ", "中文字符串没有空格也能切分",
    "I'm you're he'll we've they'd IT'S", MULTILINGUAL, CODE,
]


def byte_ranks(*merged: bytes) -> dict[bytes, int]:
    """The 256 single bytes, then the given tokens as ids 256, 257, ..."""
    ranks = {bytes([i]): i for i in range(256)}
    for token in merged:
        ranks[token] = len(ranks)
    return ranks


# -----------------------------------------------------------------------------
# tiktoken export == reference BPE


def test_split_pattern_matches_the_reference_copy_and_caps_digit_runs_at_two():
    import bpe_reference
    assert SPLIT_PATTERN == bpe_reference.SPLIT_PATTERN
    assert regex.findall(SPLIT_PATTERN, "x 12345 ab") == ["x", " ", "12", "34", "5", " ab"]


def test_tiktoken_export_encodes_like_the_reference(shakespeare):
    import bpe_reference
    texts = [shakespeare[:20_000], MULTILINGUAL * 3, CODE * 5]
    merges = bpe_reference.train_bpe(texts, 256 + 120, SPLIT_PATTERN)
    tokenizer = RustBPETokenizer.from_mergeable_ranks(bpe_reference.mergeable_ranks(merges))
    assert tokenizer.get_vocab_size() == 256 + 120 + len(SPECIAL_TOKENS)
    for text in [shakespeare[50_000:55_000], *EDGE_CASES]:
        assert tokenizer.encode(text) == bpe_reference.encode(text, merges, SPLIT_PATTERN), text[:40]


def test_rustbpe_trained_tokenizer_encodes_like_the_reference(shakespeare):
    """train_from_iterator (rustbpe -> tiktoken) against the reference trained on the same text."""
    import bpe_reference
    texts = shakespeare[:30_000].split("\n\n") + [MULTILINGUAL]
    vocab_size = 256 + 100 + len(SPECIAL_TOKENS)
    ours = RustBPETokenizer.train_from_iterator(texts, vocab_size)
    merges = bpe_reference.train_bpe(texts, 256 + 100, SPLIT_PATTERN)
    assert ours.enc._mergeable_ranks == bpe_reference.mergeable_ranks(merges)
    assert ours.get_vocab_size() == vocab_size
    for text in [shakespeare[60_000:64_000], MULTILINGUAL, CODE]:
        assert ours.encode(text) == bpe_reference.encode(text, merges, SPLIT_PATTERN)


# -----------------------------------------------------------------------------
# Round trips and special tokens


@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert all(0 <= i < tiny_tokenizer.get_vocab_size() - len(SPECIAL_TOKENS) for i in ids)
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_learned_merges(tiny_tokenizer, shakespeare):
    text = shakespeare[205_000:215_000]  # beyond the 200 KB it was trained on
    assert tiny_tokenizer.get_vocab_size() == 512
    assert len(text.encode()) / len(tiny_tokenizer.encode(text)) > 1.7  # bytes/token (~1.9); 1.0 without merges


def test_special_tokens_take_the_last_ids_in_order(tiny_tokenizer):
    n = tiny_tokenizer.get_vocab_size()
    ids = [tiny_tokenizer.encode_special(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(n - len(SPECIAL_TOKENS), n))
    assert tiny_tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tiny_tokenizer.get_bos_token_id() == ids[0]
    assert [tiny_tokenizer.id_to_token(i) for i in ids] == SPECIAL_TOKENS
    with pytest.raises(ValueError, match="not a special token"):
        tiny_tokenizer.encode_special("<|endoftext|>")


def test_special_token_text_inside_ordinary_text_stays_plain_text(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    for text in ["<|bos|>", "a <|bos|> b <|assistant_end|>"]:
        ids = tiny_tokenizer.encode(text)
        assert not set(ids) & {tiny_tokenizer.encode_special(t) for t in SPECIAL_TOKENS}
        assert tiny_tokenizer.decode(ids) == text
    assert bos not in tiny_tokenizer.encode(["<|bos|>"])[0]


def test_prepend_append_and_batches(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    plain = tok.encode("Hello there")
    assert tok.encode("Hello there", prepend="<|bos|>") == [bos] + plain
    assert tok.encode("Hello there", prepend=bos, append="<|assistant_end|>") == [bos] + plain + [end]
    texts = ["first document", "", "third one, a bit longer: 12345", MULTILINGUAL]
    batch = tok.encode(texts, prepend=bos, num_threads=2)
    assert batch == [[bos] + tok.encode(t) for t in texts]
    assert tok.encode(texts, append=end, num_threads=1) == [tok.encode(t) + [end] for t in texts]
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(("a tuple",))


# -----------------------------------------------------------------------------
# token_bytes


def test_token_bytes_are_raw_byte_lengths_even_for_partial_utf8():
    ni = "你".encode()  # 3 bytes: e4 bd a0
    tok = RustBPETokenizer.from_mergeable_ranks(byte_ranks(ni[:2], ni, b" the"))
    assert tok.encode("你") == [257]
    tb = compute_token_bytes(tok)
    assert tb.dtype == torch.int32 and tb.shape == (256 + 3 + len(SPECIAL_TOKENS),)
    assert tb[:256].tolist() == [1] * 256
    assert tb[256:259].tolist() == [2, 3, 4]  # the half character is 2 bytes ...
    assert len(tok.id_to_token(256).encode()) == 3  # ... while its decoded string is U+FFFD, 3 bytes
    assert tb[259:].tolist() == [0] * len(SPECIAL_TOKENS)


def test_token_bytes_sum_to_the_text_bytes(tiny_tokenizer, shakespeare):
    tb = compute_token_bytes(tiny_tokenizer)
    for text in [shakespeare[:5000], MULTILINGUAL, CODE]:
        ids = tiny_tokenizer.encode(text, prepend="<|bos|>", append="<|assistant_end|>")
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


# -----------------------------------------------------------------------------
# Saving and loading


def test_save_and_load_round_trip(tmp_path, tiny_tokenizer):
    out = tmp_path / "tok"
    tiny_tokenizer.save(str(out))
    assert sorted(os.listdir(out)) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left
    loaded = RustBPETokenizer.from_directory(str(out))
    assert loaded.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert loaded.encode(MULTILINGUAL, prepend="<|bos|>") == tiny_tokenizer.encode(MULTILINGUAL, prepend="<|bos|>")
    assert torch.equal(torch.load(out / "token_bytes.pt"), compute_token_bytes(tiny_tokenizer))


def test_get_tokenizer_and_token_bytes_from_the_base_dir(base_dir_with_tokenizer, tiny_tokenizer):
    tok = get_tokenizer()
    assert tok.encode(CODE) == tiny_tokenizer.encode(CODE)
    tb = get_token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (tok.get_vocab_size(),)


def test_missing_tokenizer_is_a_clear_error(base_dir):
    with pytest.raises(FileNotFoundError, match=r"python -m scripts\.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match=r"python -m scripts\.tok_train"):
        get_token_bytes()
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        RustBPETokenizer.from_directory(str(base_dir / "nowhere"))


def test_failed_save_leaves_no_partial_file(tmp_path, tiny_tokenizer, monkeypatch):
    def broken_dump(obj, f):
        f.write(b"half a pickle")
        raise OSError("disk full")

    out = tmp_path / "tok"
    monkeypatch.setattr(pickle, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        tiny_tokenizer.save(str(out))
    assert sorted(os.listdir(out)) == ["token_bytes.pt"]  # written first, complete; no tokenizer.pkl


def test_bad_inputs_to_construction():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(["some text"], 260)
    with pytest.raises(ValueError, match="exactly once"):
        RustBPETokenizer.from_mergeable_ranks({**byte_ranks(), b"ab": 300})
    with pytest.raises(ValueError, match="single-byte"):
        RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(255)})


# -----------------------------------------------------------------------------
# Conversations


def test_render_conversation_ids_and_masks_exactly(tiny_tokenizer):
    tok = tiny_tokenizer
    s = tok.encode_special
    conversation = {"messages": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Farewell"},
    ]}
    ids, mask = tok.render_conversation(conversation)
    expected = [(s("<|bos|>"), 0), (s("<|user_start|>"), 0), *[(i, 0) for i in tok.encode("Hello")], (s("<|user_end|>"), 0),
                (s("<|assistant_start|>"), 0), *[(i, 1) for i in tok.encode("Hi there")], (s("<|assistant_end|>"), 1),
                (s("<|user_start|>"), 0), *[(i, 0) for i in tok.encode("Bye")], (s("<|user_end|>"), 0),
                (s("<|assistant_start|>"), 0), *[(i, 1) for i in tok.encode("Farewell")], (s("<|assistant_end|>"), 1)]
    assert ids == [i for i, _ in expected]
    assert mask == [m for _, m in expected]


def test_render_conversation_tool_parts(tiny_tokenizer):
    tok = tiny_tokenizer
    s = tok.encode_special
    conversation = {"messages": [
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": "It is 84."},
        ]},
    ]}
    ids, mask = tok.render_conversation(conversation)
    prefix = [s("<|bos|>"), s("<|user_start|>"), *tok.encode("What is 12*7?"), s("<|user_end|>"), s("<|assistant_start|>")]
    expected = [*[(i, 1) for i in tok.encode("Let me compute. ")],
                (s("<|python_start|>"), 1), *[(i, 1) for i in tok.encode("12*7")], (s("<|python_end|>"), 1),
                (s("<|output_start|>"), 0), *[(i, 0) for i in tok.encode("84")], (s("<|output_end|>"), 0),
                *[(i, 1) for i in tok.encode("It is 84.")], (s("<|assistant_end|>"), 1)]
    assert ids == prefix + [i for i, _ in expected]
    assert mask == [0] * len(prefix) + [m for _, m in expected]


def test_a_leading_system_message_is_merged_into_the_first_user_message(tiny_tokenizer):
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]}
    assert tiny_tokenizer.render_conversation(with_system) == tiny_tokenizer.render_conversation(merged)
    assert with_system["messages"][1]["content"] == "Hi"  # the caller's conversation is not modified


@pytest.mark.parametrize("roles, match", [
    (["assistant", "user"], "message 0 has role 'assistant' but 'user'"),
    (["user", "user"], "message 1 has role 'user' but 'assistant'"),
    (["user", "assistant", "assistant"], "message 2 has role 'assistant' but 'user'"),
    (["system", "user", "user"], "message 2 has role 'user' but 'assistant'"),
    (["user", "system"], "message 1 has role 'system' but 'assistant'"),
    (["user", "tool"], "message 1 has role 'tool'"),
    (["system", "assistant"], "system message must be followed by a user message"),
    ([], "no messages"),
])
def test_roles_must_alternate(tiny_tokenizer, roles, match):
    conversation = {"messages": [{"role": r, "content": "x"} for r in roles]}
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.render_conversation(conversation)


def test_bad_content_is_a_clear_error(tiny_tokenizer):
    def render(assistant_content):
        return tiny_tokenizer.render_conversation({"messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": assistant_content}]})
    with pytest.raises(ValueError, match="unknown assistant part type 'image'"):
        render([{"type": "image", "text": "x"}])
    with pytest.raises(ValueError, match="needs a string 'text'"):
        render([{"type": "text"}])
    with pytest.raises(ValueError, match="string or a list of parts"):
        render(42)
    with pytest.raises(ValueError, match="a conversation is a dict"):
        tiny_tokenizer.render_conversation([{"role": "user", "content": "q"}])


def test_render_conversation_truncates_ids_and_mask(tiny_tokenizer):
    conversation = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok " * 100}]}
    full_ids, full_mask = tiny_tokenizer.render_conversation(conversation, max_tokens=10_000)
    assert len(full_ids) > 150
    ids, mask = tiny_tokenizer.render_conversation(conversation, max_tokens=150)
    assert ids == full_ids[:150] and mask == full_mask[:150]
    assert len(tiny_tokenizer.render_conversation(conversation)[0]) == len(full_ids)  # default 2048


def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    conversation = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                 {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}
    prompt = tok.render_for_completion(conversation)
    prefix, _ = tok.render_conversation({"messages": conversation["messages"][:3]})
    assert prompt == prefix + [tok.encode_special("<|assistant_start|>")]
    assert len(conversation["messages"]) == 4  # not modified
    with pytest.raises(ValueError, match="ends with an assistant message"):
        tok.render_for_completion({"messages": conversation["messages"][:3]})


def test_visualize_tokenization_colors_by_mask(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation({"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Yo"}]})
    shown = tiny_tokenizer.visualize_tokenization(ids, mask)
    assert shown.count("\033[92m") == sum(mask) and shown.count("\033[91m") == len(mask) - sum(mask)
    assert "\033[91m<|bos|>\033[0m" in shown and "\033[92m<|assistant_end|>\033[0m" in shown
