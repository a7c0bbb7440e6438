"""
Run untrusted Python (HumanEval completions, any code the model writes) in a sandbox, and report
what happened. Two entry points:

    from nanochat.execution import execute_code, check_function
    execute_code("print(1 + 1)").stdout                                # "2\\n"
    check_function("def f(x):\\n    return 2 * x", "f",
                   "def check(candidate):\\n    assert candidate(3) == 6").success   # True

`check_function` is the one to trust with a verdict (evals, RL rewards): the test's assertions run
in a separate checker process, which calls the candidate through a pipe with arguments and results
passed as literals (`repr` / `ast.literal_eval`, never pickle). Success means "the checker returned
normally", so the candidate can crash, lie, print or exit and the result is still a failure.
`execute_code` judges a single program by how its own process ended: a program that wants to
look successful can (it runs in the process that reports), so never grade with it.

Confinement comes from the kernel, not from patching Python (anything patched inside the
interpreter can be undone from inside it). Each run starts a supervisor, `python -I -S
nanochat/sandbox.py`, with an empty environment; it forks the program into new mount, network, pid,
IPC and UTS namespaces (as root; as another user through a user namespace), where it:
- runs as a fresh uid when we are root (random, in [SANDBOX_UID_BASE, + 2^24), or among the ids
  a rootless container maps), so it can neither signal nor read anything of ours, and
  RLIMIT_NPROC (MAX_PROCESSES) holds; otherwise it keeps our uid, drops every capability, and may
  not start processes;
- is pid 1 of its own pid namespace and sees only its own /proc: when it ends, the kernel kills
  every process it started (`setsid()` or not); the supervisor is also a subreaper, which catches
  orphans where pid namespaces are refused;
- sees a read-only file system with empty /tmp, /var/tmp, /dev/shm and /run, and a private tmpfs
  working directory (WORKDIR_BYTES);
- has no network: a fresh network namespace has only a loopback that is down;
- has limits on address space and data (`maximum_memory_bytes`; a memory bomb raises
  MemoryError), CPU seconds (a backstop to the wall clock), file size (`max_output_bytes`, which
  also caps the captured stdout/stderr), open files (64), and no core dumps.
What the kernel refused is left out of `ExecutionResult.isolation` (see `isolation_level()`);
README.md ("The sandbox") says what is and is not guaranteed in each case. Linux only.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox.py")
MEMORY_ERROR_EXIT = 3  # the program's exit status when it ran out of memory (as in sandbox.py)
SANDBOX_UID_BASE = 1_879_048_192  # 0x70000000: far above real users, subuid ranges and systemd's dynamic uids
MAX_PROCESSES = 8  # RLIMIT_NPROC for the sandbox's own uid (only when we are root)
WORKDIR_BYTES = 64 * 1024 * 1024  # the private tmpfs working directory
ALL_FEATURES = ("uid", "userns", "netns", "pidns", "rofs", "proc")


@dataclass
class ExecutionResult:
    success: bool  # ran to completion without an exception (check_function: the checker passed)
    stdout: str
    stderr: str
    error: str | None = None  # a short description of what went wrong, None on success
    timeout: bool = False  # killed after `timeout` seconds
    memory_exceeded: bool = False  # stopped by the memory limit
    isolation: list[str] = field(default_factory=list)  # what the kernel granted, e.g. ["uid", "netns", ...]


def _read_capped(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _last_line(text: str) -> str | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _run(mode: str, code: str, secret: dict | None, entry_point: str, timeout: float,
         maximum_memory_bytes: int, max_output_bytes: int) -> ExecutionResult:
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        os.chmod(root, 0o711)  # the sandbox's uid must reach work/ and lib/ inside
        paths = {name: os.path.join(root, name) for name in ("work", "lib", "stdout", "stderr", "check_log")}
        os.mkdir(paths["work"], 0o700)
        os.mkdir(paths["lib"], 0o755)
        job = {"mode": mode, "code": code, "entry_point": entry_point, "timeout": timeout,
               "memory": maximum_memory_bytes, "cpu": math.ceil(timeout) + 1, "fsize": max_output_bytes,
               "nproc": MAX_PROCESSES, "uid_base": SANDBOX_UID_BASE, "workdir": paths["work"], "workdir_bytes": WORKDIR_BYTES,
               "stage": paths["lib"], "stdout": paths["stdout"], "stderr": paths["stderr"],
               "check_log": paths["check_log"]}
        public = repr(job).encode()
        stdin = f"{len(public)}\n".encode() + public + (repr(secret).encode() if secret else b"")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # none of our secrets
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", SUPERVISOR], input=stdin, capture_output=True,
                                  env=env, timeout=timeout + 30)
        except subprocess.TimeoutExpired:  # killed; its program dies with it (PR_SET_PDEATHSIG)
            return ExecutionResult(False, "", "", f"the sandbox's supervisor did not finish in {timeout + 30} s")
        stdout = _read_capped(paths["stdout"], max_output_bytes)
        stderr = _read_capped(paths["stderr"], max_output_bytes)
        try:
            report = ast.literal_eval(proc.stdout.decode())
        except (ValueError, SyntaxError):
            why = _last_line(proc.stderr.decode(errors="replace")) or f"exit status {proc.returncode}"
            return ExecutionResult(False, stdout, stderr, f"the sandbox failed: {why}")
        isolation = report["features"]
        if not isolation:
            why = _last_line(proc.stderr.decode(errors="replace")) or _last_line(stderr) or "no report"
            return ExecutionResult(False, stdout, stderr, f"the sandbox could not start: {why}")
        output_full = max(os.path.getsize(p) if os.path.exists(p) else 0
                          for p in (paths["stdout"], paths["stderr"])) >= max_output_bytes
        returncode = report.get("returncode")
        memory = MEMORY_ERROR_EXIT in (returncode, report.get("candidate_returncode")) if mode == "check" \
            else returncode == MEMORY_ERROR_EXIT

        def failed(error, **flags):
            return ExecutionResult(False, stdout, stderr, error, isolation=isolation, **flags)
        if report["timed_out"]:
            return failed(f"timed out after {timeout} s", timeout=True)
        if report["ok"]:
            return ExecutionResult(True, stdout, stderr, isolation=isolation)
        if memory:
            return failed(f"memory limit of {maximum_memory_bytes} bytes exceeded", memory_exceeded=True)
        if mode == "check":
            log = _read_capped(paths["check_log"], max_output_bytes)
            return failed(_last_line(log) or f"the checker's exit status is {returncode}")
        if returncode is not None and returncode < 0:  # killed by a signal
            name = signal.Signals(-returncode).name
            if -returncode == signal.SIGXCPU:
                return failed(f"CPU time limit reached ({name})", timeout=True)
            return failed(f"killed by signal {name}")
        if output_full:
            return failed(f"output exceeded {max_output_bytes} bytes")
        return failed(_last_line(stderr) or f"the program exited before its end (exit status {returncode})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int = 256 * 1024 * 1024,
                 max_output_bytes: int = 1024 * 1024) -> ExecutionResult:
    """Run the program `code` in the sandbox; success means it ran to the end without an exception
    (a SystemExit or os._exit counts as failure). The program can fake that: see the docstring."""
    return _run("exec", code, None, "", timeout, maximum_memory_bytes, max_output_bytes)


def check_function(code: str, entry_point: str, test: str, setup: str = "", timeout: float = 5.0,
                   maximum_memory_bytes: int = 256 * 1024 * 1024, max_output_bytes: int = 1024 * 1024) -> ExecutionResult:
    """Load the module `code` in the sandbox, and run the trusted `setup + test` in a separate
    checker process, calling `check(candidate)` with the sandboxed `entry_point` as `candidate`
    (every argument and result must be a literal). Success means `check` returned normally."""
    return _run("check", code, {"setup": setup, "test": test}, entry_point, timeout, maximum_memory_bytes,
                max_output_bytes)


@functools.cache
def isolation_level() -> str:
    """What the sandbox gets on this machine, e.g. "uid netns pidns rofs proc" (printed by evals)."""
    features = execute_code("pass").isolation
    missing = [f for f in ALL_FEATURES if f not in features and not (f in ("uid", "userns") and
                                                                      ("uid" in features or "userns" in features))]
    return " ".join(features) + (f" (missing: {' '.join(missing)})" if missing else "")
