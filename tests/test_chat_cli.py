"""
Tests for scripts/chat_cli.py, run as a real subprocess against the tiny trained chat model of
tests/test_chat_web.py (it answers "hi" with HI_REPLY and repeats SING_CHUNK after "sing"): one-shot
-p mode, the interactive loop driven through a pipe, Ctrl-C, and the missing-checkpoint message.
"""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO_ROOT, default_sigint
from test_chat_web import HI_REPLY, SING_CHUNK, chat_base_dir  # noqa: F401  (chat_base_dir: a fixture)

CALC_SHOWN = "Let me compute. [calculator: 6*7 → 42]The answer is 42."


def cli(base_dir, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", "--device_type", "cpu", *args], cwd=REPO_ROOT,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1",
                                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                            **{"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                               "text": True, **kwargs})


def run_cli(base_dir, *args, stdin=""):
    proc = cli(base_dir, *args)
    out, err = proc.communicate(stdin, timeout=120)
    return proc.returncode, out, err


def test_prompt_mode_prints_only_the_reply_and_exits_0(chat_base_dir):
    code, out, err = run_cli(chat_base_dir, "-p", "hi", "-t", "0")
    assert code == 0, err
    assert out == HI_REPLY + "\n"  # nothing else on stdout: scriptable
    code, out, err = run_cli(chat_base_dir, "-p", "sing", "-t", "0", "-m", "6")
    assert code == 0, err
    assert out.endswith("\n") and len(out) > 1 and (SING_CHUNK * 3).startswith(out[:-1])


def test_tool_calls_are_shown_readably_never_as_special_tokens(chat_base_dir):
    code, out, err = run_cli(chat_base_dir, "-p", "calc", "-t", "0")  # piped: plain text
    assert code == 0, err
    assert out == CALC_SHOWN + "\n" and "<|" not in out and "\033" not in out


def test_tool_calls_are_dim_on_a_terminal(chat_base_dir):
    import pty
    leader, follower = pty.openpty()
    proc = cli(chat_base_dir, "-p", "calc", "-t", "0", stdout=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(leader)
    text = out.decode()
    assert "\033[2m[calculator: 6*7 → 42]\033[0m" in text and "<|" not in text


def test_interactive_session_through_a_pipe(chat_base_dir):
    code, out, err = run_cli(chat_base_dir, "-t", "0", "-m", "40", stdin="hi\n\nclear\nsing\nquit\nhi\n")
    assert code == 0, err
    assert f"Assistant: {HI_REPLY}\n" in out
    assert "(new conversation)" in out
    sung = out.split("Assistant: ")[2].split("\n")[0]
    assert len(sung) > len(SING_CHUNK) and (SING_CHUNK * 10).startswith(sung)
    assert out.count("Assistant: ") == 2  # nothing after quit
    assert out.rstrip().endswith("Bye.")


def test_ctrl_c_stops_a_reply_then_the_chat_goes_on(chat_base_dir):
    # the model would sing 1,500 tokens (~210 "la"); SIGINT as it starts
    proc = cli(chat_base_dir, "-t", "0", "-m", "1500", preexec_fn=default_sigint)
    proc.stdin.write("sing\n")
    proc.stdin.flush()
    seen = ""
    deadline = time.time() + 60
    while "Assistant: la" not in seen:  # the reply has started streaming
        char = proc.stdout.read(1)
        assert char and time.time() < deadline, seen
        seen += char
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("clear\nhi\n", timeout=120)  # then end of input, like Ctrl-D
    seen += out
    assert proc.returncode == 0, err
    assert "[stopped]" in seen, seen
    assert seen.count("la ") < 150  # stopped early
    assert f"Assistant: {HI_REPLY}\n" in seen and seen.rstrip().endswith("Bye.") and "Traceback" not in err


def test_missing_checkpoint_names_the_stage_that_writes_it(base_dir_with_tokenizer):
    code, out, err = run_cli(base_dir_with_tokenizer, "-p", "hi")
    assert code == 1
    assert "sft checkpoint" in err and "python -m scripts.chat_sft" in err and "Traceback" not in err


def test_bad_flags(chat_base_dir):
    for flags in (["-t", "-1"], ["-k", "-3"], ["-m", "0"], ["-i", "nope"]):
        code, out, err = run_cli(chat_base_dir, *flags, "-p", "hi")
        assert code == 2 and "error" in err, (flags, err)
