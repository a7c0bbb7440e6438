"""
Run untrusted Python (e.g. HumanEval completions written by the model) in a separate process,
and report what happened.

    from nanochat.execution import execute_code
    result = execute_code("print(1 + 1)")
    result.success, result.stdout   # True, "2\\n"

How the child is confined:
- A fresh interpreter (`sys.executable -I -u`: isolated from PYTHON* variables and the user's
  site-packages, unbuffered) in its own session/process group, with stdin from /dev/null and a
  scrubbed environment (PATH, LANG, HOME and TMPDIR only: no secrets inherited).
- Its working directory is a new temporary directory, removed afterwards with whatever it wrote.
- Resource limits set inside the child before the program runs: address space and data segment
  (`maximum_memory_bytes`, so a memory bomb raises MemoryError), CPU seconds (a backstop to the
  wall-clock timeout), the largest file it may write (`max_output_bytes`, which also caps the
  captured stdout/stderr, written to files the kernel caps), no core dumps, no new processes.
- Destructive functions are disabled before the program runs (the idea of HumanEval's
  `reliability_guard`, written here from scratch): process creation and signalling (os.system,
  os.fork, os.kill, subprocess.Popen, ...), deleting, renaming, truncating and re-permissioning
  files (os.remove/unlink/rmdir, shutil.rmtree/move, ...), changing directory, and `ctypes`.
  Files may be opened for writing only inside the temporary directory.
- The parent waits `timeout` seconds of wall-clock time, then kills the whole process group.

Success means the program ran to the end without an exception (a SystemExit counts as failure,
so `exit()` cannot fake a pass). This is a guard against accidents, not a security boundary:
a determined adversary can escape any in-process Python guard. Run adversarial code in a
container or VM. Linux (resource limits as used here); other platforms get weaker limits.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_ERROR_EXIT = 3  # the child's exit status when the program ran out of memory


@dataclass
class ExecutionResult:
    success: bool  # ran to completion without an exception
    stdout: str
    stderr: str
    error: str | None = None  # a short description of what went wrong, None on success
    timeout: bool = False  # killed after `timeout` seconds
    memory_exceeded: bool = False  # stopped by the memory limit


# The child's bootstrap: argv = [program path, memory bytes, cpu seconds, max file bytes].
# Limits first, then the guard, then the program. Runs as `python -I -u -c BOOTSTRAP ...`.
BOOTSTRAP = r'''
import sys, os, resource, traceback
path, memory, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
del sys.argv[1:]
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                     (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
        pass
with open(path, encoding="utf-8") as f:
    source = f.read()
os.remove(path)  # the program's text leaves the working directory before it runs
workdir = os.path.realpath(os.getcwd())

import builtins, io, _io, posix, shutil, subprocess
_exit = os._exit
real_open, real_os_open = io.open, os.open

def _inside(file):
    if isinstance(file, int):  # an already open descriptor
        return True
    target = os.path.realpath(os.path.join(workdir, os.fsdecode(file)))
    return target == workdir or target.startswith(workdir + os.sep)

def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"the sandbox only writes inside its working directory, not {file!r}")
    return real_open(file, mode, *args, **kwargs)

def guarded_os_open(file, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not _inside(file):
        raise PermissionError(f"the sandbox only writes inside its working directory, not {file!r}")
    return real_os_open(file, flags, *args, **kwargs)

def disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse

builtins.open = io.open = _io.open = guarded_open
os.open = guarded_os_open
for name in ("exit", "quit", "help", "copyright", "credits", "license"):
    setattr(builtins, name, disabled(name))
for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "abort", "_exit",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
             "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
             "chroot", "chdir", "fchdir", "link", "symlink", "mkfifo", "mknod", "putenv", "unsetenv",
             "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
             "setsid", "setpgid", "plock", "nice", "sched_setaffinity", "pidfd_open"):
    for module in (os, posix):  # os re-exports posix: disable both names
        if hasattr(module, name):
            setattr(module, name, disabled(f"os.{name}"))
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, disabled(f"shutil.{name}"))
for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, name, disabled(f"subprocess.{name}"))
for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty", "psutil"):
    sys.modules[name] = None  # `import ctypes` now raises ImportError

status = 1
try:
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    status = 0
except MemoryError:
    traceback.print_exc()
    status = 3
except BaseException:
    traceback.print_exc()
sys.stdout.flush()
sys.stderr.flush()
_exit(status)
'''


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit)
    return data.decode("utf-8", errors="replace")


def _last_line(text: str) -> str | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int = 256 * 1024 * 1024,
                 max_output_bytes: int = 1024 * 1024) -> ExecutionResult:
    """Run `code` in a confined child Python process; never raises for anything the code does."""
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        cpu_seconds = math.ceil(timeout) + 1  # CPU-time backstop; the wall clock below is the real limit
        argv = [sys.executable, "-I", "-u", "-c", BOOTSTRAP, program_path, str(maximum_memory_bytes),
                str(cpu_seconds), str(max_output_bytes)]
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own process group
                except ProcessLookupError:
                    pass
                returncode = proc.wait()
        stdout = _read_capped(out_path, max_output_bytes)
        stderr = _read_capped(err_path, max_output_bytes)
        output_full = max(os.path.getsize(out_path), os.path.getsize(err_path)) >= max_output_bytes

        if timed_out:
            return ExecutionResult(False, stdout, stderr, f"timed out after {timeout} s", timeout=True)
        if returncode == 0:
            return ExecutionResult(True, stdout, stderr)
        if returncode == MEMORY_ERROR_EXIT:
            return ExecutionResult(False, stdout, stderr, f"memory limit of {maximum_memory_bytes} bytes exceeded",
                                   memory_exceeded=True)
        if returncode < 0:  # killed by a signal
            name = signal.Signals(-returncode).name
            if -returncode == signal.SIGXCPU:
                return ExecutionResult(False, stdout, stderr, f"CPU time limit reached ({name})", timeout=True)
            if -returncode in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT) and "MemoryError" in stderr:
                return ExecutionResult(False, stdout, stderr, f"killed by {name} out of memory", memory_exceeded=True)
            return ExecutionResult(False, stdout, stderr, f"killed by signal {name}")
        if output_full:
            return ExecutionResult(False, stdout, stderr, f"output exceeded {max_output_bytes} bytes")
        return ExecutionResult(False, stdout, stderr, _last_line(stderr) or f"exit status {returncode}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
