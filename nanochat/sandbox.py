"""
The sandbox's supervisor: one short-lived process per program, started by nanochat/execution.py as
`python -I -S nanochat/sandbox.py` (isolated interpreter, no site-packages, empty environment).
Only the standard library is imported, so it starts in a few tens of milliseconds. This file is the
protocol and the three processes; the system calls that confine and reap them (namespaces, mounts,
limits, ids, kill and wait) are in nanochat/sandbox_kernel.py, next to it.

Protocol: stdin carries `<n>\\n` + n bytes of the job (a dict literal), then, in "check" mode,
the checker's private dict literal (`setup` and `test`) up to EOF. The supervisor never reads the
private part: the checker process reads it after the fork, so the candidate (forked later from the
supervisor) has no copy of the tests in its memory. The result is one dict literal on stdout.

Processes (all children of the supervisor, which is a subreaper: PR_SET_CHILD_SUBREAPER makes any
orphaned descendant, a `setsid()` escapee included, its child, so none is left behind):
- the checker (check mode only, forked first, keeps the supervisor's uid): runs the trusted `setup`
  and `test` code and calls `check(candidate)`, where `candidate` is a proxy that sends
  `repr((args, kwargs))` down a pipe and reads back `repr(("ok", value))` or `repr(("raise", ...))`,
  parsed as literals (`_literal`, never pickle), so only plain data comes back. The verdict is "the
  checker returned normally", which the candidate cannot fake by lying, crashing or exiting.
- the candidate: after `unshare` (new mount, network, pid, IPC and UTS namespaces; a user namespace
  too when not root) it is pid 1 of its own pid namespace, so every process it starts dies with it.
  It sees a read-only file system except for a private tmpfs working directory, its own /proc, no
  network (a fresh network namespace has only a down loopback), runs as a fresh unprivileged uid
  when the supervisor is root (so RLIMIT_NPROC holds and it can signal nothing else), with limits
  on memory, CPU time, file size, open files and processes. What the kernel refused is left out of
  the `features` it reports, and execution.py passes that on.
"""

import _ast
import _signal  # not `signal`: it imports enum, a few ms of start-up
import ctypes
import fcntl
import io
import os
import select
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `-I` leaves this script's folder out
import sandbox_kernel as kernel  # noqa: E402 (a sibling file: this script is not run as part of the package)

del sys.path[0]  # the candidate's sys.path is the library's, nothing more

STATUS_FD, CALL_FD, REPLY_FD = 3, 4, 5  # the candidate's pipes, at fixed numbers
MEMORY_ERROR_EXIT = 3
MAX_REPLY_BYTES = 16 * 1024 * 1024  # a candidate's return value, as text


# -----------------------------------------------------------------------------
# Literals: the only form in which data crosses a pipe

def _literal(text):
    """`ast.literal_eval(text)`, plus the reprs of inf, nan and set(). Written over the C `_ast`
    nodes because importing `ast` (and `json`) would be most of this process's start-up time."""
    return _value(compile(text, "<literal>", "eval", _ast.PyCF_ONLY_AST).body)


def _value(node):
    if isinstance(node, _ast.Constant):
        return node.value
    if isinstance(node, (_ast.Tuple, _ast.List, _ast.Set)):
        return {_ast.Tuple: tuple, _ast.List: list, _ast.Set: set}[type(node)](_value(e) for e in node.elts)
    if isinstance(node, _ast.Dict) and None not in node.keys:
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, _ast.UnaryOp) and isinstance(node.op, (_ast.USub, _ast.UAdd)):
        value = _value(node.operand)
        if type(value) in (int, float, complex):
            return -value if isinstance(node.op, _ast.USub) else value
    if isinstance(node, _ast.BinOp) and isinstance(node.op, (_ast.Add, _ast.Sub)):  # complex: 1+2j
        left, right = _value(node.left), _value(node.right)
        if type(left) in (int, float) and type(right) is complex:
            return left + right if isinstance(node.op, _ast.Add) else left - right
    if isinstance(node, _ast.Name) and node.id in ("inf", "nan"):
        return float(node.id)
    if isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id == "set" \
            and not node.args and not node.keywords:
        return set()
    raise ValueError(f"not a literal: {type(node).__name__}")


# -----------------------------------------------------------------------------
# The checker: trusted test code, calling the candidate through a pipe

class CandidateError(Exception):
    pass


def run_checker(job, call_w, reply_r, out_path, others):
    for fd in others:  # the candidate's ends of the pipes
        os.close(fd)
    secret = _literal(b"".join(iter(lambda: os.read(0, 1 << 16), b"")).decode())  # the rest of stdin
    log = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0), os.dup2(log, 1), os.dup2(log, 2)
    kernel.set_limits(job)
    calls, replies = os.fdopen(call_w, "wb"), os.fdopen(reply_r, "rb")

    def candidate(*args, **kwargs):
        calls.write((repr((args, kwargs)) + "\n").encode())
        calls.flush()
        line = replies.readline(MAX_REPLY_BYTES + 1)
        if not line.endswith(b"\n"):
            raise CandidateError("the candidate's process ended or sent a reply over the size limit")
        try:
            reply = _literal(line.decode("utf-8", errors="replace"))
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            raise CandidateError(f"the candidate's reply is not a literal: {line[:200]!r}") from None
        if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if isinstance(reply, tuple) and len(reply) == 3 and reply[0] == "raise":
            raise CandidateError(f"the candidate raised {reply[1]}: {reply[2]}")
        raise CandidateError("the candidate's reply is malformed")

    namespace = {"__name__": "__check__"}
    try:
        exec(compile(secret["setup"] + "\n" + secret["test"], "<test>", "exec"), namespace)
        namespace[job["entry_point"]] = candidate
        namespace["check"](candidate)
    except BaseException:
        _print_exception()
        os._exit(1)
    os._exit(0)


# -----------------------------------------------------------------------------
# The candidate: untrusted code, confined by the kernel

def run_candidate(job, features, fds, moved):
    os.setsid()  # its own session and process group
    if "pidns" in features:  # a /proc that shows only this namespace's processes
        try:
            kernel.mount("proc", "/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC)
            features.append("proc")
        except OSError:
            pass
    fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (os.open(os.devnull, os.O_RDONLY),) + fds]
    for target, fd in enumerate(fds):  # stdin, stdout, stderr, STATUS_FD, CALL_FD, REPLY_FD
        os.dup2(fd, target)
    os.closerange(REPLY_FD + 1, 1 << 16)  # everything else the supervisor had open
    for name, fd, errors in (("stdout", 1, "strict"), ("stderr", 2, "backslashreplace")):  # unbuffered, as `-u`
        setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), "utf-8", errors, write_through=True))
    kernel.set_limits(job, job["nproc"] if "uid" in features else 0)  # root ignores RLIMIT_NPROC; a shared uid gets 0
    if "uid" in features:
        uid, gid = job["uid"], job["gid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if moved:  # the standard library, where the program can read it; packages already imported too
        for module in list(sys.modules.values()):
            path = getattr(module, "__path__", None)
            if isinstance(path, list):
                path[:] = [next((moved[p] + d[len(p):] for p in moved if d.startswith(p + "/")), d) for d in path]
        sys.path[:] = moved.values()
        sys.path_importer_cache.clear()
    # No capabilities left (in a user namespace we hold them all, enough to unmount what hides the
    # rest), and none to gain from setuid files.
    kernel.call("capset", ctypes.byref((ctypes.c_uint32 * 2)(kernel.CAPABILITY_VERSION_3, 0)),
                ctypes.byref((ctypes.c_uint32 * 6)()))
    kernel.call("prctl", kernel.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    kernel.call("prctl", kernel.PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)  # set after setresuid, which clears it
    os.chdir(job["workdir"])
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", LANG="C.UTF-8", HOME=job["workdir"], TMPDIR=job["workdir"])
    os.write(STATUS_FD, f"ready {' '.join(features)}\n".encode())  # before any untrusted code runs

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<program>", "exec"), namespace)
    except BaseException as e:  # a SystemExit too: the program did not run to its end
        status = MEMORY_ERROR_EXIT if isinstance(e, MemoryError) else 1
        try:
            _print_exception()
        except BaseException:  # e.g. no memory left to import traceback
            pass
        os._exit(status)
    return namespace


def serve(namespace, entry_point):
    """Answer the checker's calls: one repr'd (args, kwargs) per line in, one repr'd reply out."""
    function = namespace.get(entry_point)
    calls, replies = os.fdopen(CALL_FD, "rb"), os.fdopen(REPLY_FD, "wb")
    for line in calls:
        try:
            args, kwargs = _literal(line.decode())
            reply = ("ok", function(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 (a SystemExit too: it is the checker's to judge)
            reply = ("raise", type(e).__name__, str(e)[:1000])
        replies.write((repr(reply) + "\n").encode())
        replies.flush()
    os._exit(0)


# -----------------------------------------------------------------------------
# The supervisor

def _print_exception():
    import traceback  # only when needed: it is slow to import
    traceback.print_exc()
    sys.stderr.flush()


def _read_line(fd, deadline):
    """One line from the pipe `fd` (without its newline), or what came before EOF or the deadline."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 4096:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def main():
    _signal.signal(_signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` kills the children
    header = b""
    while not header.endswith(b"\n"):
        header += os.read(0, 1)
    size, data = int(header), b""
    while len(data) < size:
        data += os.read(0, size - len(data))
    job = _literal(data.decode())
    deadline = time.monotonic() + job["timeout"]
    kernel.call("prctl", kernel.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    job["uid"] = job["gid"] = None
    if os.geteuid() == 0:  # a fresh uid and gid for this run
        rand = int.from_bytes(os.urandom(3), "little")
        job["uid"], job["gid"] = (kernel.pick_id(f"/proc/self/{name}", job["uid_base"], rand)
                                  for name in ("uid_map", "gid_map"))
        if job["uid"] is None or job["gid"] is None:
            job["uid"] = job["gid"] = None
    out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    status_r, status_w = os.pipe()
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    checker = candidate = None
    result, statuses = {"timed_out": False}, {}
    try:
        if job["mode"] == "check":
            checker = os.fork()
            if checker == 0:
                try:
                    run_checker(job, call_w, reply_r, job["check_log"], (status_r, status_w, call_r, reply_w, out, err))
                finally:
                    os._exit(1)
        features, moved = kernel.isolate(job)
        candidate = os.fork()
        if candidate == 0:
            try:
                namespace = run_candidate(job, features, (out, err, status_w, call_r, reply_w), moved)
                if job["mode"] == "check":
                    serve(namespace, job["entry_point"])
                sys.stdout.flush(), sys.stderr.flush()
                os.write(STATUS_FD, b"ok\n")
                code = 0
            except BaseException:  # the sandbox's own set-up failed (no "ready" line was written)
                _print_exception()
                code = 1
            os._exit(code)
        for fd in (status_w, call_r, call_w, reply_r, reply_w, out, err):
            os.close(fd)
        ready = _read_line(status_r, deadline)  # "ready <features>", written before the program starts
        result["features"] = ready.split()[1:] if ready.startswith("ready ") else []
        status = kernel.wait_for(checker or candidate, deadline, statuses, candidate if checker else None)
        result["timed_out"] = status is None
        if status is not None:
            result["returncode"] = os.waitstatus_to_exitcode(status)
    finally:
        kernel.kill_all([p for p in (candidate, checker) if p], statuses)
    if candidate in statuses and "returncode" not in result:
        result["returncode"] = os.waitstatus_to_exitcode(statuses[candidate])
    if candidate in statuses and checker:
        result["candidate_returncode"] = os.waitstatus_to_exitcode(statuses[candidate])
    done = _read_line(status_r, time.monotonic()) if checker is None else ""
    result["ok"] = result.get("returncode") == 0 and not result["timed_out"] and (checker is not None or done == "ok")
    sys.stdout.write(repr(result))


if __name__ == "__main__":
    main()
