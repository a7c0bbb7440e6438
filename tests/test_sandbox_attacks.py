"""
Attacks on the sandbox (nanochat/execution.py + nanochat/sandbox.py), grouped by class, each a real
program run as a HumanEval-style candidate (`check_function`, whose test needs an answer the
program cannot know) and, except where noted, as a plain program (`execute_code`, ending in a
failing assert). After each run the test checks what the attack went for:
- the verdict is FAIL;
- no sentinel file exists (in a world-writable folder outside /tmp, in /tmp, /var/tmp, /dev/shm);
- the victim file (mode 0666, in a folder with mode 0777) still holds its text and mode;
- the TCP, UDP, Unix-socket and abstract-socket listeners the test started got nothing;
- this process and a bystander process are alive, the bystander's secret never showed up;
- no process of the sandbox survives (its uid, the supervisor's command line, `sleep 987.654`).
Attack programs get these names: ARENA, VICTIM, SENTINEL, SENTINELS, PORT, UDP_PORT, UNIX_SOCKET,
ABSTRACT, HOST_IP, PARENT, PARENT_PGID, BYSTANDER, and `attempt(f, *args)`, which calls f and
prints what stopped it, so one blocked step does not end the attack.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from nanochat.execution import SANDBOX_UID_BASE, SUPERVISOR, check_function, execute_code, isolation_level

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 1.5
SECRET = "nanochat-secret-" + os.urandom(6).hex()  # in the bystander's environment
ANSWER = "nanochat-answer-" + os.urandom(6).hex()  # what the test wants; only the checker knows it
TEST = f"def check(candidate):\n    assert candidate() == {ANSWER!r}\n"

PREAMBLE = '''
def attempt(f, *args, **kwargs):
    try:
        return f(*args, **kwargs)
    except BaseException as e:
        print("blocked:", getattr(f, "__name__", f), type(e).__name__, e)
'''

FILES = {
    "open": "attempt(lambda: open(SENTINEL, 'w').write('x'))\nattempt(lambda: open(VICTIM, 'w').write('pwned'))",
    "scratch_dirs": "for p in SENTINELS:\n    attempt(lambda: open(p, 'w').write('x'))",
    "posix": "import posix\nattempt(lambda: posix.write(posix.open(SENTINEL, posix.O_WRONLY | posix.O_CREAT), b'x'))\n"
             "attempt(lambda: posix.open(VICTIM, posix.O_WRONLY | posix.O_TRUNC))",
    "fileio": "import _io\nattempt(lambda: _io.FileIO(SENTINEL, 'w').write(b'x'))\nattempt(lambda: _io.FileIO(VICTIM, 'w'))",
    "frame_walk": "import sys\nf = sys._getframe()\nwhile f.f_back:\n    f = f.f_back\n"
                  "op = f.f_globals['__builtins__'].open if hasattr(f.f_globals['__builtins__'], 'open') "
                  "else f.f_globals['__builtins__']['open']\nattempt(lambda: op(VICTIM, 'w').write('pwned'))\n"
                  "attempt(lambda: f.f_globals['os'].remove(VICTIM))",
    "generator_and_traceback_frames": "def g():\n    yield\nit = g()\nnext(it)\n"
                                      "b = it.gi_frame.f_builtins\nattempt(lambda: b['open'](SENTINEL, 'w'))\n"
                                      "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
                                      "    tb_builtins = e.__traceback__.tb_frame.f_builtins\n"
                                      "attempt(lambda: tb_builtins['open'](VICTIM, 'a'))",
    "pathlib": "from pathlib import Path\nattempt(Path(VICTIM).write_text, 'pwned')\nattempt(Path(VICTIM).unlink)\n"
               "attempt(Path(SENTINEL).touch)",
    "delete_rename_chmod": "import os, shutil\nfor f, a in ((os.remove, (VICTIM,)), (os.rename, (VICTIM, VICTIM + '.x')), "
                           "(os.truncate, (VICTIM, 0)), (os.chmod, (VICTIM, 0)), (os.chown, (VICTIM, 1, 1)), "
                           "(shutil.rmtree, (ARENA,)), (os.utime, (VICTIM, (0, 0)))):\n    attempt(f, *a)",
    "reimported_posix": "import sys\nfor m in ('os', 'posix'):\n    del sys.modules[m]\nimport posix\n"
                        "attempt(posix.unlink, VICTIM)\nattempt(posix.mkdir, SENTINEL)",
    "symlink_and_hardlink": "import os\nattempt(os.symlink, VICTIM, 'link')\nattempt(lambda: open('link', 'w').write('pwned'))\n"
                            "attempt(os.link, VICTIM, 'hard')\nattempt(lambda: open('hard', 'w').write('pwned'))",
    "proc_root": "attempt(lambda: open('/proc/self/root' + SENTINEL, 'w'))\n"
                 "attempt(lambda: open('/proc/1/root' + VICTIM, 'w'))",
    "remount_with_ctypes": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                           "print(libc.umount2(b'/tmp', 2), libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n"
                           "attempt(lambda: open(SENTINELS[0], 'w'))\nattempt(lambda: open(VICTIM, 'w'))",
    "own_user_namespace": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                          "print(libc.unshare(0x10000000 | 0x00020000), ctypes.get_errno())\n"
                          "print(libc.umount2(b'/tmp', 2), ctypes.get_errno())\n"
                          "attr = (ctypes.c_uint64 * 4)(0, 1, 0, 0)\n"
                          "print(libc.syscall(442, -100, b'/', 0x8000, ctypes.byref(attr), 32), ctypes.get_errno())\n"
                          "attempt(lambda: open(SENTINELS[0], 'w'))\nattempt(lambda: open(VICTIM, 'w'))",
    "unshare_command": "import subprocess\nattempt(subprocess.run, ['unshare', '-rm', 'sh', '-c', "
                       "f'umount -l /tmp; mount -o remount,rw /; touch {SENTINELS[0]} {SENTINEL}; echo pwned > {VICTIM}'])",
}

PROCESSES = {
    "os_system": "import os\nattempt(os.system, f'touch {SENTINEL} {SENTINELS[0]}; echo pwned > {VICTIM}')",
    "subprocess": "import subprocess\nattempt(subprocess.run, ['sh', '-c', f'rm -f {VICTIM}; touch {SENTINEL}'])",
    "reimported_subprocess": "import sys\nfor m in ('subprocess', '_posixsubprocess'):\n    sys.modules.pop(m, None)\n"
                             "import subprocess\nattempt(subprocess.check_call, ['rm', '-f', VICTIM])",
    "ctypes_system": "import ctypes\nattempt(ctypes.CDLL(None).system, f'rm -f {VICTIM}; touch {SENTINEL}'.encode())",
    "posix_spawn_and_exec": "import os\nattempt(os.posix_spawn, '/bin/rm', ['rm', '-f', VICTIM], {})\n"
                            "attempt(os.execv, '/bin/sh', ['sh', '-c', f'touch {SENTINEL}'])",
    "multiprocessing": "import multiprocessing\n"
                       "p = attempt(multiprocessing.Process, target=lambda: open(VICTIM, 'w').write('pwned'))\n"
                       "attempt(p.start)\nattempt(p.join)",
    "setuid_binaries": "import subprocess\nfor cmd in (['su', '-c', f'touch {SENTINEL}'], ['sudo', 'touch', SENTINEL], "
                       "['mount', '-t', 'tmpfs', 'none', '/tmp'], ['newgrp']):\n"
                       "    attempt(subprocess.run, cmd, timeout=0.5, stdin=subprocess.DEVNULL)",
}

SECRETS = {
    "proc_environ": "import os\nfor pid in (PARENT, BYSTANDER, 1, 'self', os.getppid()):\n"
                    "    print(attempt(lambda: open(f'/proc/{pid}/environ', 'rb').read()))\n"
                    "print(dict(os.environ))",
    "proc_scan": "import os\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
                 "        print(pid, attempt(lambda: open(f'/proc/{pid}/environ', 'rb').read()), "
                 "attempt(lambda: open(f'/proc/{pid}/cmdline', 'rb').read()))",
    "parent_memory": "attempt(lambda: open(f'/proc/{PARENT}/mem', 'rb'))\nimport ctypes\n"
                     "print(ctypes.CDLL(None, use_errno=True).ptrace(16, PARENT, 0, 0), ctypes.get_errno())",
    "search_memory_for_the_answer": "import gc, sys\nfound = []\n"
                                    "for o in gc.get_objects():\n    if isinstance(o, dict):\n"
                                    "        found += [v for v in o.values() if isinstance(v, str) and 'nanochat-answer-' in v]\n"
                                    "f = sys._getframe()\nwhile f:\n    found += [v for v in f.f_locals.values() if isinstance(v, (str, bytes))"
                                    " and b'nanochat-answer-' in (v if isinstance(v, bytes) else v.encode())]\n    f = f.f_back\n"
                                    "def solve():\n    return found[0] if found else 'wrong'",
    "search_processes_for_the_answer": "import os, re\nfound = []\nfor pid in os.listdir('/proc'):\n"
                                       "    data = attempt(lambda: open(f'/proc/{pid}/cmdline', 'rb').read()) or b''\n"
                                       "    found += re.findall(rb'nanochat-answer-[0-9a-f]+', data)\n"
                                       "def solve():\n    return found[0].decode() if found else 'wrong'",
    "root_only_file": "print(attempt(lambda: open(ARENA + '/secret.txt').read()))\n"
                      "print(attempt(lambda: open('/etc/shadow').read()))",
}

NETWORK = {
    "tcp_loopback": "import socket\nattempt(socket.create_connection, ('127.0.0.1', PORT), timeout=0.5)",
    "tcp_host_ip": "import socket\nattempt(socket.create_connection, (HOST_IP, PORT), timeout=0.5)",
    "udp": "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           "for host in ('127.0.0.1', HOST_IP):\n    attempt(s.sendto, b'pwned', (host, UDP_PORT))",
    "http": "import urllib.request\nattempt(urllib.request.urlopen, f'http://127.0.0.1:{PORT}/', timeout=0.5)",
    "reimported_socket": "import sys\nsys.modules.pop('_socket', None)\nimport _socket\n"
                         "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\nattempt(s.connect, ('127.0.0.1', PORT))",
    "unix_socket_in_tmp": "import socket\ns = socket.socket(socket.AF_UNIX)\nattempt(s.connect, UNIX_SOCKET)",
    "abstract_unix_socket": "import socket\ns = socket.socket(socket.AF_UNIX)\nattempt(s.connect, ABSTRACT)",
    "bring_loopback_up": "import subprocess, socket\nattempt(subprocess.run, ['ip', 'link', 'set', 'lo', 'up'])\n"
                         "attempt(socket.create_connection, ('127.0.0.1', PORT), timeout=0.5)",
}

KILL = {
    "kill_parent_and_bystander": "import os, signal\nfor pid in (PARENT, BYSTANDER):\n"
                                 "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):\n        attempt(os.kill, pid, sig)",
    "kill_everything": "import os\nattempt(os.kill, -1, 9)",
    "killpg": "import os\nattempt(os.killpg, PARENT_PGID, 9)\nattempt(os.killpg, os.getpgid(0), 9)",
    "kill_ppid": "import os\nattempt(os.kill, os.getppid(), 9)",
    "kill_commands": "import subprocess\nfor cmd in (['kill', '-9', str(PARENT)], ['kill', '-9', '-1'], ['pkill', '-9', 'python']):\n"
                     "    attempt(subprocess.run, cmd)",
    "ctypes_kill_and_pidfd": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                             "print(libc.kill(PARENT, 9), libc.kill(BYSTANDER, 9), ctypes.get_errno())\n"
                             "attempt(os.pidfd_open, PARENT)",
}

ESCAPE = {
    "fork_setsid": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1)\n"
                   "    attempt(os.kill, BYSTANDER, 9)\n    attempt(lambda: open(SENTINEL, 'w'))\n    os._exit(0)",
    "double_fork_daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                          "        time.sleep(1)\n        attempt(os.kill, BYSTANDER, 9)\n        os._exit(0)\n    os._exit(0)",
    "new_session_sleep": "import subprocess\nattempt(subprocess.Popen, ['sleep', '987.654'], start_new_session=True)",
    "nohup_shell": "import os\nattempt(os.system, f'nohup sh -c \"sleep 1; kill -9 {BYSTANDER}; touch {SENTINEL}\" >/dev/null 2>&1 &')",
    "orphan_outlives_exit": "import os, time\nif os.fork() == 0:\n    time.sleep(1)\n    attempt(os.kill, BYSTANDER, 9)\n"
                            "    os._exit(0)\nos._exit(1)",
}

FORK_BOMBS = {
    "python_fork_bomb": "import os\nfor _ in range(10000):\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "shell_fork_bomb": "import os\nattempt(os.system, 'bomb() { bomb | bomb & }; bomb')",
    "thread_bomb": "import threading, time\nfor _ in range(10000):\n"
                   "    if attempt(threading.Thread(target=time.sleep, args=(100,), daemon=True).start) is not None:\n        break",
    "fork_and_allocate": "import os\nfor _ in range(64):\n    if attempt(os.fork) == 0:\n        x = bytearray(200 * 2 ** 20)\n"
                         "        import time; time.sleep(100)",
}

MEMORY = {
    "bytearray": "x = bytearray(8 * 2 ** 30)",
    "list_growth": "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)",
    "mmap": "import mmap\nm = mmap.mmap(-1, 8 * 2 ** 30)\nm[:] = b'x' * len(m)",
    "deep_recursion": "import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1)\nf(0)",
}

FORGERY = {  # each tries to turn the failing test into a PASS
    "main_status": "import sys\nsys.modules['__main__'].status = 0\nsys.modules[__name__].status = 0\n"
                   "def solve():\n    sys.modules['__main__'].status = 0\n    return 'wrong'",
    "os_exit_0_at_import": "import os\nos._exit(0)",
    "sys_exit_0_at_import": "import sys\nsys.exit(0)",
    "exit_0_in_the_call": "import os\ndef solve():\n    os._exit(0)",
    "reimported_posix_exit": "import sys\ndel sys.modules['posix']\nimport posix\nposix._exit(0)",
    "fake_verdict_on_stdout": "import sys\nfor f in (sys.stdout, sys.stderr):\n"
                              "    print(\"{'timed_out': False, 'features': ['uid'], 'returncode': 0, 'ok': True}\", file=f)\n"
                              "    print('PASS', file=f)",
    "always_equal": "class Equal:\n    def __eq__(self, other):\n        return True\n    def __repr__(self):\n        return 'True'\n"
                    "def solve():\n    return Equal()",
    "str_subclass_equal": "class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
                          "def solve():\n    return S('wrong')",
    "replies_written_ahead": "import os\nos.write(5, repr(('ok', True)).encode() + b'\\n')\nos.write(3, b'ok\\n')",
    "kill_the_checker": "import os\ndef solve():\n    attempt(os.kill, -1, 9)\n    attempt(os.kill, os.getppid(), 9)\n    return 'wrong'",
    "patched_assertion": "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
                         "def solve():\n    return 'wrong'",
    "huge_reply": "def solve():\n    return 'x' * (20 * 2 ** 20)",
    "deep_reply": "def solve():\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x",
}
EXEC_FORGEABLE = {"replies_written_ahead"}  # writes the "ran to the end" line itself: see execute_code's docstring

FLOODS = {
    "stdout_flood": "print('x' * 10 ** 8)",
    "stderr_flood": "import sys\nwhile True:\n    sys.stderr.write('y' * 10 ** 5)",
    "big_file": "f = open('big', 'wb')\nfor _ in range(1024):\n    if attempt(f.write, b'z' * 2 ** 20) is None:\n        break",
    "many_files": "for i in range(100000):\n    if attempt(lambda: open(f'f{i}', 'wb').write(b'z' * 2 ** 20)) is None:\n        break",
}

LOOPS = {
    "busy_loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(1000)",
    "ignore_signals": "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n    signal.signal(s, signal.SIG_IGN)\n"
                      "while True:\n    pass",
    "pause": "import signal\nsignal.pause()",
    "busy_child": "import os\nif os.fork() == 0:\n    while True:\n        pass\nos.wait()",
    "slow_call": "import time\ndef solve():\n    time.sleep(1000)",
}

CLASSES = {"files": FILES, "processes": PROCESSES, "secrets": SECRETS, "network": NETWORK, "kill": KILL,
           "escape": ESCAPE, "fork_bomb": FORK_BOMBS, "memory": MEMORY, "forgery": FORGERY, "flood": FLOODS,
           "loop": LOOPS}
ATTACKS = [(cls, name, code) for cls, attacks in CLASSES.items() for name, code in attacks.items()]


def test_at_least_40_attacks():
    assert len(ATTACKS) >= 40 and len({name for _, name, _ in ATTACKS}) == len(ATTACKS)


# -----------------------------------------------------------------------------
# The world the attacks aim at

class Listener:
    """A TCP, a UDP, a Unix-socket (in /tmp, mode 0777) and an abstract-socket listener; each
    records what reaches it."""

    def __init__(self, folder: str):
        self.received, self.closed = [], False
        self.tcp = socket.create_server(("0.0.0.0", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", 0))
        self.unix_path = os.path.join(folder, "sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.unix.listen()
        self.abstract_name = "\0nanochat-attack-" + os.urandom(4).hex()
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.settimeout(0.2)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        while not self.closed:
            try:
                got = s.recvfrom(100) if s.type == socket.SOCK_DGRAM else s.accept()
                self.received.append((s.getsockname(), got))
            except OSError:  # timeout, or closed
                pass

    def close(self):
        self.closed = True
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()


def host_ip() -> str:
    """This machine's address on its default route (not loopback), or 127.0.0.1 without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: no packet is sent
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def survivors() -> list[str]:
    """Processes of the sandbox still alive: its uid, the supervisor, or the attacks' `sleep 987.654`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration):
            continue
        if SUPERVISOR in cmdline or "987.654" in cmdline or SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + 2 ** 24:
            found.append(f"{pid} uid={uid} {cmdline}")
    return found


@pytest.fixture(scope="module")
def world():
    """Everything the attacks aim at, shared by the module (each attack checks it is untouched)."""
    # A world-writable folder the sandbox could reach if its file system were not read-only: under
    # the repo's .pytest_cache (git-ignored) rather than /tmp, which the sandbox does not even see.
    parent = REPO / ".pytest_cache"
    parent.mkdir(exist_ok=True)
    arena = Path(tempfile.mkdtemp(prefix="sandbox_arena_", dir=parent))
    scratch = Path(tempfile.mkdtemp(prefix="nanochat_attack_"))  # in /tmp
    bystander = subprocess.Popen(["sleep", "300"], env={"NANOCHAT_SECRET": SECRET})
    listener = Listener(str(scratch))
    try:
        os.chmod(arena, 0o777)
        os.chmod(scratch, 0o777)
        (arena / "secret.txt").write_text(SECRET)
        os.chmod(arena / "secret.txt", 0o600)
        names = {
            "ARENA": str(arena), "VICTIM": str(arena / "victim.txt"), "SENTINEL": str(arena / "sentinel"),
            "SENTINELS": [str(Path(d) / f"nanochat_sentinel_{os.urandom(4).hex()}") for d in
                          (scratch, "/tmp", "/var/tmp", "/dev/shm")],
            "PORT": listener.tcp.getsockname()[1], "UDP_PORT": listener.udp.getsockname()[1],
            "UNIX_SOCKET": listener.unix_path, "ABSTRACT": listener.abstract_name, "HOST_IP": host_ip(),
            "PARENT": os.getpid(), "PARENT_PGID": os.getpgid(0), "BYSTANDER": bystander.pid,
        }
        yield {"names": names, "arena": arena, "listener": listener, "bystander": bystander}
    finally:
        listener.close()
        bystander.kill()
        bystander.wait()
        shutil.rmtree(arena, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def run_attack(world, code: str, mode: str):
    names = world["names"]
    victim = Path(names["VICTIM"])
    victim.write_text("precious")
    os.chmod(victim, 0o666)
    program = "".join(f"{k} = {v!r}\n" for k, v in names.items()) + PREAMBLE + code + "\n"
    t0 = time.time()
    if mode == "check":
        program += "" if "def solve" in code else "\ndef solve():\n    return 'wrong'\n"
        result = check_function(program, "solve", TEST, timeout=TIMEOUT)
    else:
        result = execute_code(program + f"\nassert False, 'the program fails'\n", timeout=TIMEOUT)
    elapsed = time.time() - t0
    return result, elapsed


def assert_contained(world, result, elapsed, wait=0.0):
    names, bystander = world["names"], world["bystander"]
    assert not result.success, (result.stdout[-500:], result.stderr[-500:])
    assert elapsed < TIMEOUT + 5, f"took {elapsed:.1f} s"
    time.sleep(wait)  # for attacks that act later, if anything of theirs survived
    assert survivors() == []
    assert bystander.poll() is None, "the bystander was killed"
    assert not os.path.exists(names["SENTINEL"])
    assert [p for p in names["SENTINELS"] if os.path.exists(p)] == []
    victim = Path(names["VICTIM"])
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o666
    assert sorted(os.listdir(world["arena"])) == ["secret.txt", "victim.txt"]
    assert world["listener"].received == []
    assert SECRET not in result.stdout + result.stderr + (result.error or "")
    assert ANSWER not in result.stdout + result.stderr


def skip_known_gaps(name):
    if name == "root_only_file" and "uid" not in isolation_level().split(" (")[0].split():
        pytest.skip("no fresh uid (not root): the sandbox runs as our uid and can read our files (see README)")


@pytest.mark.parametrize("cls,name,code", ATTACKS, ids=[f"{cls}-{name}" for cls, name, _ in ATTACKS])
def test_attack_contained_as_a_candidate(world, cls, name, code):
    skip_known_gaps(name)
    result, elapsed = run_attack(world, code, "check")
    assert_contained(world, result, elapsed, wait=1.5 if cls == "escape" else 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("cls,name,code", [a for a in ATTACKS if a[1] not in EXEC_FORGEABLE],
                         ids=[f"{cls}-{name}" for cls, name, _ in ATTACKS if name not in EXEC_FORGEABLE])
def test_attack_contained_as_a_program(world, cls, name, code):
    skip_known_gaps(name)
    result, elapsed = run_attack(world, code, "exec")
    assert_contained(world, result, elapsed, wait=1.5 if cls == "escape" else 0.0)


def test_the_attack_world_is_observable(world):
    """The checks above can fail: the same actions, run here without a sandbox, trip them."""
    names = world["names"]
    with socket.create_connection(("127.0.0.1", names["PORT"])):
        pass
    deadline = time.time() + 2
    while not world["listener"].received and time.time() < deadline:
        time.sleep(0.01)
    assert world["listener"].received
    world["listener"].received.clear()
    Path(names["SENTINEL"]).write_text("x")
    assert os.path.exists(names["SENTINEL"])
    os.remove(names["SENTINEL"])
    sleeper = subprocess.Popen(["sleep", "987.654"])
    try:
        # Poll: on a loaded machine /proc can show the child a moment after Popen returns.
        deadline = time.time() + 5
        while not any("987.654" in s for s in survivors()) and time.time() < deadline:
            time.sleep(0.05)
        assert any("987.654" in s for s in survivors()), f"sleep {sleeper.pid} not seen in /proc"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert survivors() == []


def test_the_answer_passes():
    """The harness' own control: a candidate that returns the answer passes, so FAIL above means
    the attack failed, not that nothing can pass."""
    assert check_function(f"def solve():\n    return {ANSWER!r}\n", "solve", TEST).success


# -----------------------------------------------------------------------------
# Without namespaces (e.g. a container without CAP_SYS_ADMIN), processes are still contained

LAUNCHER = '''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:  # root of a new user namespace that maps 0 and 1..65536 -> 100000.. (a rootless container)
    assert libc.unshare(0x10000000) == 0, ctypes.get_errno()
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    for kind in ("user", "mnt", "net", "pid", "ipc", "uts", "cgroup"):  # and no namespaces from here on
        with open(f"/proc/sys/user/max_{kind}_namespaces", "w") as f:
            f.write("0")
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 1\\n1 100000 65536\\n")
os.write(go_w, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
'''

FALLBACK_PROGRAM = '''
import sys
sys.path.insert(0, {repo!r})
from nanochat.execution import check_function, execute_code
escapee = "import os\\nif os.fork() == 0:\\n    os.setsid()\\n    os.execv('/bin/sleep', ['sleep', '987.654'])\\n"
results = [execute_code(escapee + "assert False"),
           execute_code("import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass", timeout=1.0),
           check_function(escapee + "import os\\nos._exit(0)", "f", "def check(candidate):\\n    assert candidate() == 1")]
print(repr([(r.isolation, r.success, r.error) for r in results]))
'''


def test_without_namespaces_escapees_still_die():
    """Namespaces refused (user.max_*_namespaces = 0 in a user namespace that maps a range of ids,
    like a rootless container): the fresh uid, RLIMIT_NPROC and the supervisor, a subreaper that
    kills whatever is left, still contain a `setsid()` escapee and a fork bomb."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to write a user namespace's id map with a range of ids")
    # An interpreter any uid can run (ours may live under /root), so that the fresh uid is used
    python = next(p for p in ("/usr/bin/python3", sys.executable) if subprocess.run(
        [p, "-c", "import sys; assert sys.version_info >= (3, 9)"], capture_output=True).returncode == 0)
    program = FALLBACK_PROGRAM.format(repo=str(REPO))
    proc = subprocess.run([python, "-c", LAUNCHER, program], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"user namespaces are not available here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    results = eval(proc.stdout.strip().splitlines()[-1])  # our own repr of plain data
    for isolation, success, error in results:
        assert [f for f in isolation if f != "uid"][0].startswith("no-namespaces"), isolation
        assert not success, error
    time.sleep(1.0)
    assert survivors() == []
