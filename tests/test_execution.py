"""
Tests for nanochat/execution.py: every program really runs in a child Python process; each test
checks an observable effect (a file that still exists, a variable that is not visible, a wall-clock
bound), not just the reported flags.
"""

import os
import subprocess
import time

import pytest

from nanochat.execution import execute_code


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


def test_deleting_files_outside_is_blocked(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside.txt").write_text("also precious")
    attempts = [
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.unlink({str(victim)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
        f"import shutil\nshutil.rmtree({str(folder)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"open({str(victim)!r}, 'w').write('overwritten')",
        f"import os\nos.truncate({str(victim)!r}, 0)",
        f"import os\nfd = os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('overwritten')",
        f"import os\nos.chmod({str(victim)!r}, 0)",
    ]
    for code in attempts:
        result = execute_code(code)
        assert not result.success, code
        assert "PermissionError" in result.error, (code, result.error)
    assert victim.read_text() == "precious" and (victim.stat().st_mode & 0o400)
    assert (folder / "inside.txt").read_text() == "also precious"


def test_processes_cannot_be_started(tmp_path):
    canary = tmp_path / "canary"
    attempts = [
        f"import os\nos.system('touch {canary}')",
        f"import subprocess\nsubprocess.run(['touch', {str(canary)!r}])",
        f"import subprocess\nsubprocess.Popen(['touch', {str(canary)!r}])",
        f"import subprocess\nsubprocess.check_output('touch {canary}', shell=True)",
        f"import os\nos.popen('touch {canary}')",
        "import os\nos.fork()",
        f"import os\nos.execv('/usr/bin/touch', ['touch', {str(canary)!r}])",
        f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', {str(canary)!r}], {{}})",
        "import ctypes",
        "import multiprocessing",
        f"import posix\nposix.system('touch {canary}')",
    ]
    for code in attempts:
        result = execute_code(code)
        assert not result.success, code
    assert not canary.exists()


def test_signals_cannot_be_sent():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for code in (f"import os\nos.kill({bystander.pid}, 9)", f"import os\nos.killpg({bystander.pid}, 9)"):
            result = execute_code(code)
            assert not result.success and "PermissionError" in result.error
        time.sleep(0.1)
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        bystander.wait()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))")
    assert result.success
    assert "hunter2" not in result.stdout and "NANOCHAT_TEST_SECRET" not in result.stdout
    assert result.stdout.splitlines()[-1] == "None"


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


def test_humaneval_style_program_passes_and_fails():
    prompt = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    good = prompt + "    return a + b\n" + test + "check(add)\n"
    bad = prompt + "    return a - b\n" + test + "check(add)\n"
    assert execute_code(good).success
    result = execute_code(bad)
    assert not result.success and result.error.startswith("AssertionError")


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass_and_corrupted_ones_fail(shared_data):
    """All 164 problems through HumanEval.evaluate. The reference assembly (the default): the whole
    canonical function in a ``` fence passes, the bare canonical body fails (it defines nothing).
    The official assembly: the bare body passes. Both: the body replaced by `return None` fails.
    Two at a time (2 cores)."""
    from concurrent.futures import ThreadPoolExecutor
    from tasks.humaneval import HumanEval
    task, official = HumanEval(data_dir=str(shared_data)), HumanEval(data_dir=str(shared_data), assembly="official")
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
