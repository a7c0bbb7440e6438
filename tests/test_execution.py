"""
Tests for nanochat/execution.py (and its supervisor, nanochat/sandbox.py): what a program sees and
how its result is reported. Every program really runs in the sandbox; each test checks an
observable effect (captured output, a wall-clock bound, a directory that is gone), not just the
reported flags. Attacks on the sandbox are in tests/test_sandbox_attacks.py.
"""

import ast
import math
import os
import sys
import time

import pytest

from nanochat.execution import ALL_FEATURES, check_function, execute_code, isolation_level

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat"))
from sandbox import _literal  # noqa: E402 (the supervisor is a script, not a package module)


def test_stdout_and_stderr_captured():
    result = execute_code("import sys\nprint('hello', 6 * 7)\nprint('oops', file=sys.stderr)")
    assert result.success and result.error is None
    assert result.stdout == "hello 42\n"
    assert result.stderr == "oops\n"


def test_exception_is_a_failure_with_its_message():
    result = execute_code("assert 1 + 1 == 3, 'bad math'")
    assert not result.success and not result.timeout and not result.memory_exceeded
    assert result.error == "AssertionError: bad math"
    assert "Traceback" in result.stderr


def test_exit_cannot_fake_a_pass():
    for code in ("import sys\nsys.exit(0)", "exit()", "import os\nos._exit(0)", "import posix\nposix._exit(0)"):
        assert not execute_code(code).success, code


def test_infinite_loop_killed_within_timeout():
    t0 = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    elapsed = time.time() - t0
    assert result.timeout and not result.success
    assert elapsed < 4.0, f"took {elapsed:.1f}s to kill a 1 s program"


def test_sleeping_program_killed_within_timeout():
    t0 = time.time()
    result = execute_code("import time\nprint('started')\ntime.sleep(60)", timeout=1.0)
    assert result.timeout and time.time() - t0 < 4.0
    assert result.stdout == "started\n"  # unbuffered: output before the kill is kept


def test_memory_bomb_stopped():
    result = execute_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", maximum_memory_bytes=256 * 1024 ** 2)
    assert result.memory_exceeded and not result.success
    assert "allocated" not in result.stdout
    result = execute_code("x = []\nwhile True:\n    x.append('y' * 10 ** 6)", maximum_memory_bytes=128 * 1024 ** 2)
    assert result.memory_exceeded and not result.timeout


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))")
    assert result.success
    assert "hunter2" not in result.stdout and "NANOCHAT_TEST_SECRET" not in result.stdout
    assert result.stdout.splitlines()[-1] == "None"


def test_workdir_is_private_and_writable():
    code = ("import os\nopen('a.txt', 'w').write('x' * 1000)\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
            "print(os.listdir('.'), os.path.getsize('d/b.txt'))\nimport tempfile\nprint(tempfile.gettempdir())")
    result = execute_code(code)
    assert result.success, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['d'] 1000" and lines[1].endswith("/work")


def test_no_stdin_and_temp_workdir_removed():
    result = execute_code("import os, sys\nprint(repr(sys.stdin.read()))\nprint(os.getcwd())\n"
                          "open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert result.success, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "''" and lines[2] == "ok"
    assert "nanochat_exec_" in lines[1] and not os.path.exists(lines[1])  # cleaned up afterwards


def test_output_is_capped():
    result = execute_code("print('x' * 10 ** 7)", max_output_bytes=100_000)
    assert not result.success and "output exceeded" in result.error
    assert len(result.stdout) <= 100_000


def test_check_function_passes_and_fails():
    code = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n    return a + b\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(b=1, a=-1) == 0\n"
    assert check_function(code, "add", test).success
    result = check_function(code.replace("a + b", "a - b"), "add", test)
    assert not result.success and result.error == "AssertionError"


def test_check_function_setup_runs_in_the_checker():
    """HumanEval/32's test calls `poly`, a helper of the prompt: the checker runs the prompt first,
    so the candidate cannot redefine the helper the test relies on."""
    setup = "def double(x):\n    return 2 * x\n\ndef f(x):\n    pass\n"
    test = "def check(candidate):\n    assert candidate(3) == double(3)\n"
    assert check_function(setup + "def f(x):\n    return 6\n", "f", test, setup=setup).success
    cheat = "def double(x):\n    return 0\n\ndef f(x):\n    return 0\n"
    assert not check_function(cheat, "f", test, setup=setup).success


@pytest.mark.parametrize("value", ["1", "-2.5", "float('inf')", "-float('inf')", "[1, (2, 3), {4: 'x'}]", "set()",
                                   "{1, 2}", "1 + 2j", "None", "True", "b'x\\x00'", "'a\\nb\\'\"'", "((),)", "{}"])
def test_results_cross_the_pipe_as_literals(value):
    test = f"def check(candidate):\n    assert repr(candidate({value})) == repr({value})\n"
    result = check_function("def f(x):\n    return x\n", "f", test)
    assert result.success, result.error


def test_nan_crosses_the_pipe():
    test = "import math\ndef check(candidate):\n    assert math.isnan(candidate()[0])\n"
    assert check_function("def f():\n    return [float('nan')]\n", "f", test).success


@pytest.mark.parametrize("code,error", [
    ("def f(x):\n    return object()\n", "the candidate's reply is not a literal"),
    ("def f(x):\n    return lambda: 1\n", "the candidate's reply is not a literal"),
    ("def f(x):\n    raise ValueError('no')\n", "the candidate raised ValueError: no"),
    ("def f(x):\n    import sys\n    sys.exit(0)\n", "the candidate raised SystemExit: 0"),
    ("def f(x) return\n", "the candidate's process ended"),  # a syntax error: nothing answers
    ("def g(x):\n    return 1\n", "the candidate raised TypeError"),  # no entry point
    ("import os\nos._exit(0)\n", "the candidate's process ended"),
])
def test_check_function_failures(code, error):
    result = check_function(code, "f", "def check(candidate):\n    assert candidate(1) == 1\n")
    assert not result.success and error in result.error, result.error


def test_check_function_memory_and_timeout():
    result = check_function("def f():\n    return bytearray(2 * 1024 ** 3)\n", "f",
                            "def check(candidate):\n    candidate()\n")
    assert not result.success and "MemoryError" in result.error
    t0 = time.time()
    result = check_function("def f():\n    while True:\n        pass\n", "f", "def check(candidate):\n    candidate()\n",
                            timeout=1.0)
    assert result.timeout and not result.success and time.time() - t0 < 4.0


def test_literal_agrees_with_ast_literal_eval():
    """The supervisor's own literal parser (it avoids importing ast) against the reference."""
    values = [0, -1, 2 ** 100, 1.5, -0.0, 1e300, 3j, -1 - 2j, "x", "é\n", b"\xff", None, False,
              [1, [2, [3]]], (1,), {"a": (1, 2), 3: [None]}, {1, 2}, [], {}, ()]
    for value in values:
        assert _literal(repr(value)) == ast.literal_eval(repr(value)), value
    assert math.isinf(_literal("inf")) and math.isnan(_literal("nan")) and _literal("set()") == set()
    for text in ["f()", "x", "1 * 2", "__import__('os')", "{**a}", "-'a'", "[i for i in ()]", "2 ** 10000"]:
        with pytest.raises((ValueError, SyntaxError)):
            _literal(text)
        with pytest.raises((ValueError, SyntaxError)):
            ast.literal_eval(text)


def test_isolation_level_reported():
    level = isolation_level()
    features = execute_code("pass").isolation
    assert level.split(" (")[0] == " ".join(features)
    if os.geteuid() == 0:  # this machine as root: everything is granted
        assert features == ["uid", "netns", "pidns", "rofs", "proc"] and "missing" not in level
    assert set(features) <= set(ALL_FEATURES) or any(f.startswith("no-namespaces") for f in features)


def test_humaneval_style_program_passes_and_fails():
    prompt = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good = prompt + "    return a + b\n" + test + "check(add)\n"
    bad = prompt + "    return a - b\n" + test + "check(add)\n"
    assert execute_code(good).success
    result = execute_code(bad)
    assert not result.success and result.error.startswith("AssertionError")


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass_and_corrupted_ones_fail(sample_data):
    """All 164 problems through HumanEval.evaluate. The reference assembly (the default): the whole
    canonical function in a ``` fence passes, the bare canonical body fails (it defines nothing).
    The official assembly: the bare body passes. Both: the body replaced by `return None` fails.
    Two at a time (2 cores)."""
    from concurrent.futures import ThreadPoolExecutor
    from tasks.humaneval import HumanEval
    task, official = HumanEval(data_dir=str(sample_data)), HumanEval(data_dir=str(sample_data), assembly="official")
    examples = [task[i] for i in range(len(task))]
    assert len(examples) == 164
    with ThreadPoolExecutor(max_workers=2) as pool:
        fenced = list(pool.map(lambda ex: task.evaluate(ex, f"```python\n{ex['messages'][1]['content']}```"), examples))
        body = list(pool.map(lambda ex: task.evaluate(ex, ex["canonical_solution"]), examples))
        body_official = list(pool.map(lambda ex: official.evaluate(ex, ex["canonical_solution"]), examples))
        corrupted = list(pool.map(lambda ex: official.evaluate(ex, "    return None\n"), examples))
    ids = [ex["task_id"] for ex in examples]
    assert [i for i, ok in zip(ids, fenced) if not ok] == []
    assert [i for i, ok in zip(ids, body) if ok] == []
    assert [i for i, ok in zip(ids, body_official) if not ok] == []
    assert [i for i, ok in zip(ids, corrupted) if ok] == []
