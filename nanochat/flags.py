"""
Command-line flags for the stage scripts: `--key=value` overrides of keyword defaults.

Each script declares its defaults once, at the top, as a dict, and calls `parse_flags`:

    cfg = parse_flags(dict(depth=20, device_batch_size=32, run="dummy"), doc=__doc__)
    cfg.depth  # int, from --depth=12 or the default

- The type of each flag is the type of its default (bool, int, float or str). Ints accept
  scientific notation when it is integral (`--max_chars=2e9`); bools accept true/false/1/0/yes/no,
  and a bare `--flag` means true.
- An unknown flag or a value of the wrong type is an error that names the flag and lists the valid
  ones. `--help` prints every flag with its default and exits.
- `--resume_from_step=latest` (the training stages) means the newest complete checkpoint; it is
  stored as LATEST (-2), and nanochat.checkpoint_manager.resolve_resume_step turns it into a step.
- Under torchrun the flags follow the module: `torchrun ... -m scripts.base_train -- --depth=20`
  (a bare `--` is skipped).

Bad input of any kind (a flag, a checkpoint, a shard, a missing bundle) stops a script with a
StopRun: one line on stderr, exit status 1, no traceback. Under torchrun every rank usually meets
the same error; the line is printed once, by the first rank to raise it, and every rank also
writes it to torchrun's error file, so torchrun's failure summary ends with the cause ("Root
Cause ... traceback: <the line>") rather than a link to its documentation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from types import SimpleNamespace

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
LATEST = -2  # --resume_from_step=latest


class StopRun(SystemExit):
    """Ends the script with `message` on stderr and exit status 1 (SystemExit prints a string code
    and exits 1). Under torchrun only the first rank to raise a given message prints it; the others
    exit 1 silently. str(e) is always the message, so a stage can prefix it: StopRun(f"x: {e}")."""

    def __init__(self, message):
        self.message = str(message)
        super().__init__(self.message if _first_to_say(self.message) else 1)

    def __str__(self) -> str:
        return self.message


def _first_to_say(message: str) -> bool:
    """True unless another rank of this torchrun job has already said `message`. Also hands the
    message to torchrun (its per-rank TORCHELASTIC_ERROR_FILE), which prints it in its summary."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:  # not under torchrun (or a launcher without error files): always print
        return True
    try:
        os.makedirs(os.path.dirname(error_file), exist_ok=True)
        with open(error_file, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": message,  # the layout torchrun's own error handler writes
                                   "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}, f)
        # The ranks of one node share torchrun's attempt folder: the first to create the marker says it.
        attempt_dir = os.path.dirname(os.path.dirname(error_file))
        marker = os.path.join(attempt_dir, "said-" + hashlib.sha1(message.encode()).hexdigest()[:16])
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:  # torchrun's folder is not writable: better twice than never
        return True


class FlagError(StopRun):
    """A bad command line. A SystemExit carrying the message: the script ends printing it to stderr
    with exit status 1, not a traceback."""


def _convert(key: str, value: str, default):
    """Turn the string `value` into the type of `default`, or raise FlagError."""
    kind = type(default)
    try:
        if kind is bool:
            low = value.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind is int:
            if key == "resume_from_step" and value == "latest":
                return LATEST
            try:
                return int(value)
            except ValueError:
                as_float = float(value)  # allow 2e9, 1_000 is handled by int()
                if not as_float.is_integer():
                    raise
                return int(as_float)
        if kind is float:
            return float(value)
        return value
    except ValueError:
        raise FlagError(f"flag --{key} expects type {kind.__name__} (default {default!r}), got {value!r}") from None


def format_flags(defaults: dict) -> str:
    width = max((len(k) for k in defaults), default=0)
    return "\n".join(f"  --{k:<{width}} = {v!r}  ({type(v).__name__})" for k, v in defaults.items())


def parse_flags(defaults: dict, argv: list[str] | None = None, doc: str | None = None) -> SimpleNamespace:
    """Return a namespace of `defaults` overridden by `--key=value` arguments in argv."""
    for key, value in defaults.items():
        assert isinstance(value, (bool, int, float, str)), f"default of {key} must be bool/int/float/str"
    argv = sys.argv[1:] if argv is None else list(argv)
    values = dict(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            continue
        if arg in ("-h", "--help"):
            print((doc.strip() + "\n\n") if doc else "", end="")
            print("flags (default):\n" + format_flags(defaults))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise FlagError(f"unexpected argument {arg!r}: flags look like --key=value\n"
                            f"valid flags:\n{format_flags(defaults)}")
        key, eq, value = arg[2:].partition("=")
        if key not in defaults:
            raise FlagError(f"unknown flag --{key}\nvalid flags:\n{format_flags(defaults)}")
        if not eq:
            if isinstance(defaults[key], bool):
                value = "true"  # a bare --flag switches a boolean on
            elif i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]  # --key value
                i += 1
            else:
                raise FlagError(f"flag --{key} needs a value: --{key}=...")
        values[key] = _convert(key, value, defaults[key])
    return SimpleNamespace(**values)


def print_flags(cfg: SimpleNamespace, defaults: dict | None = None) -> None:
    """Print the flags once (rank 0), marking the ones changed from their defaults."""
    from nanochat.common import print0
    print0("flags:")
    for key, value in vars(cfg).items():
        mark = "  (changed)" if defaults is not None and defaults.get(key) != value else ""
        print0(f"  {key} = {value!r}{mark}")


def accumulation_steps(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int) -> int:
    """Forward/backward passes per optimiser step: total_batch_size tokens = this many passes of
    device_batch_size x max_seq_len tokens on every rank. A total that does not divide evenly is a
    FlagError suggesting the nearest total that does."""
    world_tokens_per_fwdbwd = device_batch_size * max_seq_len * world_size
    if total_batch_size % world_tokens_per_fwdbwd != 0:
        nearest = max(1, round(total_batch_size / world_tokens_per_fwdbwd)) * world_tokens_per_fwdbwd
        raise FlagError(f"--total_batch_size={total_batch_size} must be a multiple of device_batch_size · "
                        f"max_seq_len · world_size = {device_batch_size} · {max_seq_len} · {world_size} = "
                        f"{world_tokens_per_fwdbwd} (e.g. --total_batch_size={nearest}), "
                        f"or change --device_batch_size / --max_seq_len")
    return total_batch_size // world_tokens_per_fwdbwd


def token_batch_plan(cfg, world_size: int) -> tuple[int, int, str]:
    """For the stages that train on a packed token stream (base_train, mid_train), from the flags
    total_batch_size, device_batch_size, max_seq_len and eval_tokens: (grad_accum_steps,
    eval_steps, a line describing the batch). One fwd/bwd takes device_batch_size x max_seq_len
    tokens on every rank; the val evaluation takes eval_tokens of them (at least one pass)."""
    grad_accum_steps = accumulation_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world_size)
    tokens_per_fwdbwd = cfg.device_batch_size * cfg.max_seq_len
    eval_steps = max(1, cfg.eval_tokens // (tokens_per_fwdbwd * world_size))
    line = (f"batch: {cfg.total_batch_size:,} tokens/step = {tokens_per_fwdbwd:,} per fwd/bwd x {world_size} "
            f"rank(s) x {grad_accum_steps} accumulation step(s)")
    return grad_accum_steps, eval_steps, line
