"""
The tokenizer: byte-level BPE trained in Rust (`rustbpe`), run through `tiktoken`.

Design choices:
- Training and inference are split between two fast engines. `rustbpe` learns the merges (it is
  small and we own it); `tiktoken` encodes and decodes with them (it is fast, multi-threaded and
  battle-tested). The handover is the "mergeable ranks" table {token bytes: id}: ids 0..255 are
  the raw bytes, id 256 + i is the i-th merge.
- Pre-tokenisation uses the GPT-4 (cl100k) split regex, except that digit runs are split into
  chunks of at most two (`\\p{N}{1,2}` instead of `{1,3}`): a small vocabulary should not spend
  tokens on every 3-digit number.
- Nine special tokens take the last ids, in the order of SPECIAL_TOKENS. Ordinary text is always
  encoded with `encode_ordinary`, so a document that contains the string "<|bos|>" never turns
  into the special token: specials only come from `encode_special` / `prepend` / `append`.
- Conversations are rendered to (ids, mask): mask 1 marks the tokens the assistant is trained to
  produce, 0 the tokens it is given (user turns, tool outputs, the BOS and `<|assistant_start|>`).
- `token_bytes.pt` holds the length in raw UTF-8 bytes of every token (0 for specials), the
  denominator of bits-per-byte. It is computed from the token bytes, never from decoded strings:
  a token that is half of a multi-byte character decodes to U+FFFD (3 bytes) but is 1 or 2 bytes.
- On disk (`<base dir>/tokenizer/`): `tokenizer.pkl` (the pickled tiktoken.Encoding) and
  `token_bytes.pt`, each written atomically (temp file + rename). tokenizer.pkl is read with an
  unpickler that builds a tiktoken.Encoding and nothing else (a pickle can run any code), and a
  damaged file of either kind stops the script with one line (TokenizerError).

Train one with `python -m scripts.tok_train`, evaluate it with `python -m scripts.tok_eval`.
Use it:
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    ids = tokenizer.encode("Hello world", prepend="<|bos|>")
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable

import tiktoken
import torch

from nanochat.common import atomic_write, base_dir_path
from nanochat.flags import StopRun

# GPT-4's pre-tokenisation regex with digit runs capped at two (\p{N}{1,2}).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Taking the last ids, in this order.
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document (and every conversation)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool (calculator)
    "<|output_start|>", "<|output_end|>",  # the tool's output, written by the engine, not the model
]

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"


class TokenizerError(StopRun):
    """A damaged tokenizer file: the script ends with this one line (exit status 1), no traceback."""


class _EncodingState:
    """What unpickling tokenizer.pkl may build in place of tiktoken.Encoding: a holder of its state.
    The real Encoding is then made from that state once it is checked to be plain data."""

    def __setstate__(self, state):
        self.state = state


class _Refused(pickle.UnpicklingError):
    """tokenizer.pkl asks for something other than tiktoken.Encoding."""


class _TokenizerUnpickler(pickle.Unpickler):
    """pickle.load runs whatever a file asks for; this one allows tiktoken.Encoding and nothing else,
    so a hostile tokenizer.pkl (os.system, eval, ...) is refused before anything of it runs."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise _Refused(f"it asks for {module}.{name}, and only a tiktoken Encoding may be in it")


def _load_encoding(path: str) -> tiktoken.Encoding:
    """tokenizer.pkl as written by save() (or the reference), read without running code from it."""
    def damaged(why: str) -> TokenizerError:
        return TokenizerError(f"tokenizer: {path} {why}: retrain it with `python -m scripts.tok_train` "
                              f"(or copy tokenizer.pkl and token_bytes.pt again from where it was trained)")
    if os.path.getsize(path) == 0:
        raise damaged("is empty")
    try:
        with open(path, "rb") as f:
            loaded = _TokenizerUnpickler(f).load()
    except _Refused as e:
        raise damaged(f"is not a tokenizer ({e})") from None
    except Exception as e:  # EOFError, ValueError, ...: a truncated or garbled pickle
        raise damaged(f"is truncated or damaged ({type(e).__name__})") from None
    state = getattr(loaded, "state", None) if isinstance(loaded, _EncodingState) else None
    keys = {"name": str, "pat_str": str, "mergeable_ranks": dict, "special_tokens": dict}
    if not (isinstance(state, dict) and set(state) == set(keys)
            and all(isinstance(state[k], t) for k, t in keys.items())):
        raise damaged("does not hold a tiktoken Encoding's name, pattern, ranks and special tokens")
    plain = all(isinstance(k, bytes) and type(v) is int for k, v in state["mergeable_ranks"].items()) and \
        all(isinstance(k, str) and type(v) is int for k, v in state["special_tokens"].items())
    if not plain or "<|bos|>" not in state["special_tokens"]:
        raise damaged("holds ranks or special tokens that are not bytes/str -> int, or no <|bos|>")
    try:
        return tiktoken.Encoding(**state)
    except BaseException as e:  # tiktoken's Rust core panics (a BaseException) on inconsistent ranks
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise damaged(f"holds a vocabulary tiktoken cannot use ({type(e).__name__})") from None


def _import_rustbpe():
    try:
        import rustbpe
    except ImportError:
        rustbpe = None
    # An unbuilt crate directory in the working tree imports as an empty namespace package.
    if rustbpe is None or not hasattr(rustbpe, "Tokenizer"):
        raise ImportError("the Rust BPE trainer `rustbpe` is not built/installed in this environment: "
                          "run `bash dev/setup.sh` (it builds rustbpe/ with maturin)")
    return rustbpe


class RustBPETokenizer:
    """A tiktoken.Encoding plus the conventions of nanochat (BOS, specials, chat rendering)."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_mergeable_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                             name: str = "rustbpe") -> RustBPETokenizer:
        """Build the tiktoken Encoding from {token bytes: id} (ids exactly 0..n-1, the 256 single
        bytes among them); the special tokens get ids n, n+1, ..."""
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError(f"mergeable ranks must use each id 0..{n - 1} exactly once")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable ranks lack {len(missing)} of the 256 single-byte tokens (e.g. byte {missing[0]})")
        special_tokens = {token: n + i for i, token in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> RustBPETokenizer:
        """Train with rustbpe so that the vocabulary, specials included, has vocab_size tokens."""
        vocab_size_no_special = vocab_size - len(SPECIAL_TOKENS)
        if vocab_size_no_special < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        rustbpe = _import_rustbpe()
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(text_iterator), vocab_size_no_special, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls.from_mergeable_ranks(mergeable_ranks, trainer.get_pattern())

    @classmethod
    def from_directory(cls, tokenizer_dir: str) -> RustBPETokenizer:
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python -m scripts.tok_train` "
                                    f"(it writes into $NANOCHAT_BASE_DIR/tokenizer)")
        return cls(_load_encoding(path), "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name: str) -> RustBPETokenizer:
        """A tiktoken encoding such as "gpt2" or "cl100k_base" (downloaded by tiktoken on first use),
        with <|endoftext|> as BOS. For comparisons in tok_eval; it has none of our chat specials."""
        enc = tiktoken.get_encoding(tiktoken_name)
        return cls(enc, "<|endoftext|>")

    def save(self, tokenizer_dir: str) -> None:
        """Write tokenizer.pkl and token_bytes.pt into tokenizer_dir, each atomically."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        token_bytes = compute_token_bytes(self)
        atomic_write(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), lambda f: torch.save(token_bytes, f))
        atomic_write(os.path.join(tokenizer_dir, TOKENIZER_FILE), lambda f: pickle.dump(self.enc, f))

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return self.enc.special_tokens_set

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def id_to_token(self, token_id: int) -> str:
        """The token as text (invalid UTF-8, e.g. half a character, shows as U+FFFD)."""
        return self.enc.decode([token_id])

    def encode_special(self, text: str) -> int:
        """The id of a special token, e.g. encode_special("<|bos|>")."""
        if text not in self.enc.special_tokens_set:
            raise ValueError(f"{text!r} is not a special token of this tokenizer; "
                             f"known: {sorted(self.enc.special_tokens_set)}")
        return self.enc.encode_single_token(text)

    # ------------------------------------------------------------------ encode / decode

    def _token_id(self, token: str | int) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text: str | list[str], prepend: str | int | None = None, append: str | int | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of ordinary text (specials inside the text stay plain text). A list of texts is
        encoded in parallel with num_threads and gives a list of id lists. prepend/append: a
        special token (its string or its id) added to the front/back of each sequence."""
        head = [] if prepend is None else [self._token_id(prepend)]
        tail = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            return [head + ids + tail for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs) -> list[int] | list[list[int]]:
        """`tokenizer(text, prepend=...)` is `encode`, as the reference's tokenizer is callable."""
        return self.encode(*args, **kwargs)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    # ------------------------------------------------------------------ conversations

    def render_conversation(self, conversation: dict, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """Token ids and a same-length mask (1 = the assistant is trained on it) for a conversation
        {"messages": [{"role": ..., "content": ...}, ...]}, truncated to max_tokens (None: never).

        Roles alternate user/assistant starting with user; an optional leading system message is
        merged into the first user message. Assistant content is a string or a list of parts
        {"type": "text" | "python" | "python_output", "text": ...}."""
        messages = _check_messages(conversation)
        ids, mask = [], []

        def add(token_ids: int | list[int], mask_value: int) -> None:
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([mask_value] * len(token_ids))

        special = {name: self.encode_special(name) for name in SPECIAL_TOKENS}
        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user message content must be a string, got {type(content).__name__}")
                add(special["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"assistant content must be a string or a list of parts, got {type(content).__name__}")
            for part in parts:
                kind, text = part.get("type"), part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"assistant part {part!r} needs a string 'text'")
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":  # the model writes the tool call: trained on
                    add(special["<|python_start|>"], 1)
                    add(self.encode(text), 1)
                    add(special["<|python_end|>"], 1)
                elif kind == "python_output":  # the tool writes its output at inference: not trained on
                    add(special["<|output_start|>"], 0)
                    add(self.encode(text), 0)
                    add(special["<|output_end|>"], 0)
                else:
                    raise ValueError(f"unknown assistant part type {kind!r}: expected 'text', 'python' or 'python_output'")
            add(special["<|assistant_end|>"], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt that asks the model for the last assistant reply: the conversation without its
        final assistant message, then <|assistant_start|>. Not truncated."""
        messages = _messages_of(conversation)
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion expects a conversation that ends with an assistant "
                             "message (it is dropped and the model is asked to write it)")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids: list[int], mask: list[int]) -> str:
        """Tokens joined by '|', green where mask is 1 (trained on), red where 0. For debugging."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        return "|".join(f"{green if m == 1 else red}{self.decode([i])}{reset}" for i, m in zip(ids, mask))


def _messages_of(conversation: dict) -> list[dict]:
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list):
        raise ValueError("a conversation is a dict {'messages': [{'role': ..., 'content': ...}, ...]}")
    return messages


def role_order_error(roles: list, last: str | None = None) -> str | None:
    """The one rule for the order of chat roles: an optional leading "system" message followed by a
    user message, then user and assistant alternating, starting with user; with `last`, the final
    message must have that role. None when `roles` follow it, else one line naming the first
    message (its index in `roles`) that does not."""
    first = 1 if roles and roles[0] == "system" else 0
    if first and (len(roles) < 2 or roles[1] != "user"):
        return "a system message must be followed by a user message (it is merged into it)"
    for i in range(first, len(roles)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if roles[i] != expected:
            return (f"message {i} has role {roles[i]!r} but {expected!r} was expected: roles must alternate "
                    f"user/assistant starting with user (a system message may come first)")
    if last is not None and roles and roles[-1] != last:
        return f"the last message must be the {last}'s (it is the {roles[-1]}'s)"
    return None


def _check_messages(conversation: dict) -> list[dict]:
    """Validate roles and merge a leading system message into the first user message."""
    messages = _messages_of(conversation)
    if not messages:
        raise ValueError("the conversation has no messages")
    error = role_order_error([message.get("role") for message in messages])
    if error:
        raise ValueError(error)
    if messages[0].get("role") == "system":
        merged = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + messages[2:]
    return messages


# -----------------------------------------------------------------------------
# token_bytes and the tokenizer in the base dir


def compute_token_bytes(tokenizer: RustBPETokenizer) -> torch.Tensor:
    """int32 [vocab]: length in raw bytes of each token, 0 for special tokens."""
    enc = tokenizer.enc
    special_ids = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    lengths = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int32)


def get_tokenizer_dir() -> str:
    return os.path.join(base_dir_path(), "tokenizer")  # not created here: save() makes it


def get_tokenizer() -> RustBPETokenizer:
    """The tokenizer trained by scripts.tok_train, from <base dir>/tokenizer."""
    return RustBPETokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """<base dir>/tokenizer/token_bytes.pt on `device`: int32 [vocab] byte length of each token."""
    path = os.path.join(get_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token_bytes at {path}: train the tokenizer with `python -m scripts.tok_train` "
                                f"(it writes tokenizer.pkl and token_bytes.pt)")
    try:
        with open(path, "rb") as f:
            token_bytes = torch.load(f, map_location=device, weights_only=True)
    except Exception as e:  # truncated, garbage, or not a tensor file at all
        raise TokenizerError(f"tokenizer: {path} is damaged ({type(e).__name__}): retrain the tokenizer "
                             f"with `python -m scripts.tok_train`, or copy both tokenizer files again") from None
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.ndim == 1 and not token_bytes.is_floating_point()):
        raise TokenizerError(f"tokenizer: {path} does not hold a 1-D integer tensor of token lengths: retrain the "
                             f"tokenizer with `python -m scripts.tok_train`")
    return token_bytes
