"""
Sandbox overhead per program: nanochat/execution.py as it is now against the same file at a
baseline git revision (default: the last in-process-guard version, before the kernel sandbox),
and against the floor of starting a bare `python -I -S -c` subprocess, side by side.

Run:
    python bench/sandbox.py                    # 3 rounds of 20 programs per variant (~1 min on 2 idle cores)
    python bench/sandbox.py --rounds=5 --n=40 --baseline_rev=HEAD~3

Each round runs --n HumanEval-style problems (a small function and a `check(candidate)` with a
few asserts) through every variant, interleaved, one at a time; the table shows the median
milliseconds per problem over the rounds and the ratio to the baseline revision:
- "bare python": `subprocess.run([python, -I, -S, -c, program])`, no limits, no isolation;
- "baseline execute_code": the baseline revision's `execute_code(prompt + solution + test + check)`;
- "execute_code": today's, the same one-process program;
- "check_function": today's, as HumanEval uses it (candidate and checker in separate processes).
The baseline file is read with `git show REV:nanochat/execution.py` and loaded as a module.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nanochat.execution import check_function, execute_code, isolation_level  # noqa: E402

PROBLEMS = [  # (prompt, solution, test, entry point)
    ("def add(a, b):\n    '''a + b'''\n", "    return a + b\n",
     "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n", "add"),
    ("def sort_words(text):\n    '''The words in order.'''\n", "    return ' '.join(sorted(text.split()))\n",
     "def check(candidate):\n    assert candidate('b a c') == 'a b c'\n    assert candidate('') == ''\n", "sort_words"),
    ("import math\n\ndef primes(n):\n    '''The primes below n.'''\n",
     "    return [p for p in range(2, n) if all(p % d for d in range(2, math.isqrt(p) + 1))]\n",
     "def check(candidate):\n    for n in range(50):\n        assert len(candidate(n)) == sum(1 for p in range(2, n) "
     "if all(p % d for d in range(2, p)))\n", "primes"),
]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--n", type=int, default=20, help="problems per variant per round")
parser.add_argument("--baseline_rev", default="e2df8dc", help="git revision of the baseline execution.py")
args = parser.parse_args()

source = subprocess.run(["git", "show", f"{args.baseline_rev}:nanochat/execution.py"], cwd=REPO,
                        capture_output=True, text=True)
if source.returncode != 0:
    sys.exit(f"--baseline_rev={args.baseline_rev}: git show failed ({source.stderr.strip()}); "
             "pass a revision of this repository")
with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(source.stdout)
spec = importlib.util.spec_from_file_location("baseline_execution", f.name)
baseline = sys.modules["baseline_execution"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baseline)
os.unlink(f.name)


def program(i):
    prompt, solution, test, entry = PROBLEMS[i % len(PROBLEMS)]
    return prompt + solution + "\n" + test + f"\ncheck({entry})\n"


def bare(i):
    return subprocess.run([sys.executable, "-I", "-S", "-c", program(i)], capture_output=True).returncode == 0


def check(i):
    prompt, solution, test, entry = PROBLEMS[i % len(PROBLEMS)]
    return check_function(prompt + solution, entry, test, setup=prompt).success


VARIANTS = {"bare python": bare, "baseline execute_code": lambda i: baseline.execute_code(program(i)).success,
            "execute_code": lambda i: execute_code(program(i)).success, "check_function": check}
print(f"isolation: {isolation_level()}; load average before: {os.getloadavg()[0]:.2f}")
times = {name: [] for name in VARIANTS}
for r in range(args.rounds):
    for name, run in VARIANTS.items():
        t0 = time.perf_counter()
        for i in range(args.n):
            assert run(i), (name, i)
        times[name].append((time.perf_counter() - t0) / args.n * 1000)
print(f"load average after: {os.getloadavg()[0]:.2f}")
base = statistics.median(times["baseline execute_code"])
print(f"{'variant':<24}{'ms/problem':>12}{'vs baseline':>13}")
for name, values in times.items():
    print(f"{name:<24}{statistics.median(values):>12.1f}{statistics.median(values) / base:>12.2f}x")
