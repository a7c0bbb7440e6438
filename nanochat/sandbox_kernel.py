"""
The Linux side of the sandbox: the system calls its supervisor (nanochat/sandbox.py) makes to
confine the candidate, and to find and reap every process it leaves. Standard library only, and
only modules that are cheap to import: the supervisor starts once per program.

- `isolate(job)`: unshare new mount, network, pid, IPC and UTS namespaces (and a user namespace
  when not root), cover the world-writable scratch folders with empty tmpfs, bind-mount each
  sys.path folder where the sandbox's uid can read it, make every mount read-only and nosuid, and
  give the program a private tmpfs working directory. It returns what the kernel granted
  (`features`); what it refused is left out, never faked.
- `set_limits(job)`: memory, CPU time, file size, open files, processes (rlimits).
- `pick_id(map_path, ...)`: a fresh uid/gid for the run, inside what this user namespace maps.
- `kill_all(pids, statuses)` and `wait_for(pid, deadline, ...)`: the supervisor is a subreaper, so
  every orphan becomes its child; `kill_all` kills and reaps until waitpid finds no child left.

The supervisor runs as a script (`python -I -S nanochat/sandbox.py`) and imports this file as
the top-level module `sandbox_kernel`.
"""

import _signal  # not `signal`: it imports enum, a few ms of start-up
import ctypes
import errno
import os
import resource
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2
CAPABILITY_VERSION_3 = 0x20080522
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")  # writable by anyone: each gets an empty tmpfs

libc = ctypes.CDLL(None, use_errno=True)


# -----------------------------------------------------------------------------
# System calls through libc


def call(name, *args):
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _make_readonly(path):
    """Every mount under `path` read-only and nosuid (mount_setattr, Linux 5.12+; else remount each)."""
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr), 32) == 0:
        return
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted(points, key=len):
        mount(None, point.replace("\\040", " "), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def set_limits(job, processes=None):
    limits = [(resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_DATA, job["memory"]),
              (resource.RLIMIT_CPU, job["cpu"]), (resource.RLIMIT_FSIZE, job["fsize"]),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64)]
    for limit, value in limits + ([(resource.RLIMIT_NPROC, processes)] if processes is not None else []):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # a user cannot raise a hard limit
        resource.setrlimit(limit, (value, value))


# -----------------------------------------------------------------------------
# The candidate's world: namespaces, file system, ids


def isolate(job):
    """Enter new namespaces (the candidate, forked next, is pid 1 of the new pid namespace) and
    build its file system view. Returns the features the kernel granted, and where each library
    folder of sys.path was bind-mounted ({} if it was not)."""
    features, moved = [], {}
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root else CLONE_NEWUSER)
    try:
        uid, gid = os.getuid(), os.getgid()
        call("unshare", flags)
        if not root:  # map our own uid into the new user namespace
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        features += ["netns", "pidns"] if root else ["userns", "netns", "pidns"]
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        # The library is bind-mounted into a fresh directory: the uid we drop to may not reach it
        # where it is (e.g. under /root), and it may be under one of the directories covered next.
        originals = [path for path in sys.path if os.path.exists(path)]
        libs = [os.open(path, os.O_PATH) for path in originals]
        for path in SCRATCH_DIRS:  # hide what others left there, e.g. Unix sockets anyone may connect to
            if os.path.isdir(path) and not os.path.islink(path):
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
        os.makedirs(job["workdir"], exist_ok=True)
        os.makedirs(job["stage"], exist_ok=True)
        staged = []
        for i, fd in enumerate(libs):
            stage = os.path.join(job["stage"], str(i))
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(stage)
            else:
                open(stage, "w").close()
            mount(f"/proc/self/fd/{fd}", stage, None, MS_BIND | MS_REC)
            os.close(fd)
            staged.append(stage)
        moved = dict(zip(originals, staged))
        _make_readonly("/")
        owner = f",uid={job['uid']},gid={job['gid']}" if job["uid"] is not None else ""
        mount("tmpfs", job["workdir"], "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={job['workdir_bytes']},nr_inodes=4096,mode=0700{owner}")
        features.append("rofs")
    except OSError as e:
        if not features:  # no namespaces at all: the plain process fallback
            features.append(f"no-namespaces:{errno.errorcode.get(e.errno, e.errno)}")
    if job["uid"] is not None and (moved or all(_reachable(p) for p in sys.path if os.path.exists(p))):
        features.insert(0, "uid")
        os.chown(job["workdir"], job["uid"], job["gid"])
    return features, moved


def pick_id(map_path, base, rand):
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


# -----------------------------------------------------------------------------
# Processes: find, kill and reap every descendant


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
