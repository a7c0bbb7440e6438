"""
The sandbox's supervisor: one short-lived process per program, started by nanochat/execution.py as
`python -I -S nanochat/sandbox.py` (isolated interpreter, no site-packages, empty environment).
Only the standard library is imported, so it starts in a few tens of milliseconds.

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
import errno
import fcntl
import io
import os
import resource
import select
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2
CAPABILITY_VERSION_3 = 0x20080522
STATUS_FD, CALL_FD, REPLY_FD = 3, 4, 5  # the candidate's pipes, at fixed numbers
MEMORY_ERROR_EXIT = 3
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")  # writable by anyone: each gets an empty tmpfs
MAX_REPLY_BYTES = 16 * 1024 * 1024  # a candidate's return value, as text

libc = ctypes.CDLL(None, use_errno=True)


def _call(name, *args):
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _make_readonly(path):
    """Every mount under `path` read-only and nosuid (mount_setattr, Linux 5.12+; else remount each)."""
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr), 32) == 0:
        return
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted(points, key=len):
        _mount(None, point.replace("\\040", " "), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _set_limits(job, processes=None):
    limits = [(resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_DATA, job["memory"]),
              (resource.RLIMIT_CPU, job["cpu"]), (resource.RLIMIT_FSIZE, job["fsize"]),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64)]
    for limit, value in limits + ([(resource.RLIMIT_NPROC, processes)] if processes is not None else []):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # a user cannot raise a hard limit
        resource.setrlimit(limit, (value, value))


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
    _set_limits(job)
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
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            features.append("proc")
        except OSError:
            pass
    fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (os.open(os.devnull, os.O_RDONLY),) + fds]
    for target, fd in enumerate(fds):  # stdin, stdout, stderr, STATUS_FD, CALL_FD, REPLY_FD
        os.dup2(fd, target)
    os.closerange(REPLY_FD + 1, 1 << 16)  # everything else the supervisor had open
    for name, fd, errors in (("stdout", 1, "strict"), ("stderr", 2, "backslashreplace")):  # unbuffered, as `-u`
        setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), "utf-8", errors, write_through=True))
    _set_limits(job, job["nproc"] if "uid" in features else 0)  # root ignores RLIMIT_NPROC; a shared uid gets 0
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
    _call("capset", ctypes.byref((ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)), ctypes.byref((ctypes.c_uint32 * 6)()))
    _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _call("prctl", PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)  # set after setresuid, which clears it
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

def isolate(job):
    """Enter new namespaces (the candidate, forked next, is pid 1 of the new pid namespace) and
    build its file system view. Returns the features the kernel granted, and where each library
    folder of sys.path was bind-mounted ({} if it was not)."""
    features, moved = [], {}
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root else CLONE_NEWUSER)
    try:
        uid, gid = os.getuid(), os.getgid()
        _call("unshare", flags)
        if not root:  # map our own uid into the new user namespace
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        features += ["netns", "pidns"] if root else ["userns", "netns", "pidns"]
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        # The library is bind-mounted into a fresh directory: the uid we drop to may not reach it
        # where it is (e.g. under /root), and it may be under one of the directories covered next.
        originals = [path for path in sys.path if os.path.exists(path)]
        libs = [os.open(path, os.O_PATH) for path in originals]
        for path in SCRATCH_DIRS:  # hide what others left there, e.g. Unix sockets anyone may connect to
            if os.path.isdir(path) and not os.path.islink(path):
                _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
        os.makedirs(job["workdir"], exist_ok=True)
        os.makedirs(job["stage"], exist_ok=True)
        staged = []
        for i, fd in enumerate(libs):
            stage = os.path.join(job["stage"], str(i))
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(stage)
            else:
                open(stage, "w").close()
            _mount(f"/proc/self/fd/{fd}", stage, None, MS_BIND | MS_REC)
            os.close(fd)
            staged.append(stage)
        moved = dict(zip(originals, staged))
        _make_readonly("/")
        owner = f",uid={job['uid']},gid={job['gid']}" if job["uid"] is not None else ""
        _mount("tmpfs", job["workdir"], "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={job['workdir_bytes']},nr_inodes=4096,mode=0700{owner}")
        features.append("rofs")
    except OSError as e:
        if not features:  # no namespaces at all: the plain process fallback
            features.append(f"no-namespaces:{errno.errorcode.get(e.errno, e.errno)}")
    if job["uid"] is not None and (moved or all(_reachable(p) for p in sys.path if os.path.exists(p))):
        features.insert(0, "uid")
        os.chown(job["workdir"], job["uid"], job["gid"])
    return features, moved


def _pick_id(map_path, base, rand):
    """A fresh id: base + rand when this user namespace maps [base, base + 2^24) (the initial one
    maps every id), else one of the mapped non-zero ids (e.g. in a rootless container), else None."""
    with open(map_path) as f:
        ranges = [(int(inside), int(inside) + int(count)) for inside, _, count in map(str.split, f)]
    if any(a <= base and base + (1 << 24) <= b for a, b in ranges):
        return base + rand
    ranges = [(max(a, 1), b) for a, b in ranges if b > max(a, 1) and not a <= 65534 < b] or \
        [(max(a, 1), b) for a, b in ranges if b > max(a, 1)]
    if not ranges:
        return None
    a, b = max(ranges, key=lambda r: r[1] - r[0])
    return a + rand % (b - a)


def _reachable(path):
    """Whether any user may read `path` (every directory above it searchable by others)."""
    parts = os.path.abspath(path).split(os.sep)
    dirs = [os.sep + os.path.join(*parts[1:i]) if i > 1 else os.sep for i in range(1, len(parts))]
    try:
        return all(os.stat(d).st_mode & 0o001 for d in dirs) and bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


def children():
    """This process's living children (orphans reparented to us included)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: read every process's parent
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        found.append(int(pid))
            except (OSError, IndexError, ValueError):
                pass
        return found


def _kill(pid, group=False):
    try:
        (os.killpg if group else os.kill)(pid, _signal.SIGKILL)
    except OSError:
        pass


def kill_all(pids, statuses):
    """SIGKILL and reap every descendant. As a subreaper, every orphan is our child, so when
    waitpid says there are no children left, no descendant is left. A process group outlives its
    leader, so `pids`' groups are killed too (a group id is not reused while the group lives)."""
    for pid in pids:
        _kill(pid, group=True)
        if pid not in statuses:  # a reaped pid may already belong to someone else
            _kill(pid)
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            statuses[pid] = status
            continue
        for pid in children():
            _kill(pid)
        time.sleep(0.001)


def wait_for(pid, deadline, statuses, candidate=None):
    """The wait status of `pid`, or None if the deadline passed first. With `candidate` (when
    waiting for the checker): once the candidate has ended, what it left behind is killed as it
    appears (pid namespaces do that, where granted), so nothing holds its pipes open."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if candidate is not None and candidate not in statuses:
            done, status = os.waitpid(candidate, os.WNOHANG)
            if done:
                statuses[candidate] = status
        if candidate in statuses:
            for child in children():
                if child != pid:
                    _kill(child)
                    done, status = os.waitpid(child, os.WNOHANG)
                    if done:
                        statuses[done] = status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(left, 0.002))


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
    _call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    job["uid"] = job["gid"] = None
    if os.geteuid() == 0:  # a fresh uid and gid for this run
        rand = int.from_bytes(os.urandom(3), "little")
        job["uid"], job["gid"] = (_pick_id(f"/proc/self/{name}", job["uid_base"], rand) for name in ("uid_map", "gid_map"))
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
        features, moved = isolate(job)
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
        status = wait_for(checker or candidate, deadline, statuses, candidate if checker else None)
        result["timed_out"] = status is None
        if status is not None:
            result["returncode"] = os.waitstatus_to_exitcode(status)
    finally:
        kill_all([p for p in (candidate, checker) if p], statuses)
    if candidate in statuses and "returncode" not in result:
        result["returncode"] = os.waitstatus_to_exitcode(statuses[candidate])
    if candidate in statuses and checker:
        result["candidate_returncode"] = os.waitstatus_to_exitcode(statuses[candidate])
    done = _read_line(status_r, time.monotonic()) if checker is None else ""
    result["ok"] = result.get("returncode") == 0 and not result["timed_out"] and (checker is not None or done == "ok")
    sys.stdout.write(repr(result))


if __name__ == "__main__":
    main()
