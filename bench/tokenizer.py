"""
Tokenizer training benchmark: our Rust trainer (rustbpe, built from this repo) against Hugging Face
`tokenizers` (BpeTrainer with the same split regex) and the `rustbpe` wheel from the package index,
on the same real text, side by side; then encode throughput of our tiktoken export vs HF.

Run:
    python bench/tokenizer.py                           # 50 MB, vocab 65,536 and 8,192, 2 repeats (~3 min idle)
    python bench/tokenizer.py --mb=5 --vocab=8192 --repeats=1 --encode_mb=2   # a quick look
    python bench/tokenizer.py --trainers=ours,hf        # leave a trainer out
    python bench/tokenizer.py --json=out.json           # also write every measurement

What it does:
- The corpus is the `text` column of the parquet shards in --data_dir (default: the downloaded
  shards in <base dir>/base_data when there are any, otherwise the CPU sample's 2 shards in
  dev/cpu_sample/pretrain, 2,560 OpenStax documents, 7.5 M chars), documents cycled in order until
  --mb MB (10^6 bytes of UTF-8).
  It is written once to a cache file (a pickled list of str) that every worker loads the same way.
- Every (trainer, vocab) run is its own subprocess: it loads the corpus, times the training call
  (wall clock, and the process's CPU seconds over all its threads) and reports its own peak RSS
  (VmHWM of /proc/self/status: the interpreter and the loaded corpus included, see the
  "RSS loaded" column). All cores are in use: RAYON_NUM_THREADS is left unset.
- Runs are interleaved (repeat 1 of every trainer, then repeat 2 in rotated order, ...) and the
  median is reported, so that load from other processes on shared cores hits all trainers alike.
  The load average before and after is printed: read wall times with it in mind (CPU seconds
  suffer less from load).
- The PyPI wheel has the same module name as ours, so it is installed into its own folder
  (`pip install --target`, never into the environment) and its worker puts that folder first on
  sys.path; each worker checks `rustbpe.__file__` to prove which one it imported. When it cannot be
  installed (offline), the table says "not available".
- HF gets the same split regex (Split(Regex, "isolated")) then ByteLevel(use_regex=False) and the
  whole byte alphabet, so every trainer learns vocab - 256 merges (no special tokens).
- Encode throughput: a tiktoken.Encoding built from our mergeable ranks (as nanochat.tokenizer does;
  `encode_ordinary_batch` with --encode_threads threads) vs the HF tokenizer's `encode_batch`, both
  trained at the largest vocab, on the first --encode_mb MB of the corpus.

Targets (issue 2), at vocab 65,536: time ours <= 1.0x the PyPI wheel and <= 0.5x HF; peak RSS
ours <= HF.
"""

import glob
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from nanochat.flags import FlagError, parse_flags  # noqa: E402

DEFAULTS = dict(
    mb=50.0,                # corpus size in MB (10^6 bytes of UTF-8), documents cycled
    vocab="65536,8192",     # comma-separated vocab sizes (bytes + merges, no special tokens)
    repeats=2,              # interleaved runs per (trainer, vocab); the median is reported
    trainers="ours,pypi,hf",
    encode_mb=10.0,         # MB of the corpus to encode (0: skip the encode part)
    encode_threads=2,       # tiktoken encode_ordinary_batch threads
    data_dir="",            # parquet shards with a `text` column ("": the dataset's, else dev/cpu_sample/pretrain)
    cache_dir=os.path.join(tempfile.gettempdir(), "nanochat_bench_tokenizer"),  # corpus, PyPI wheel, tokenizers
    json="",                # also write every measurement to this JSON file
    worker="",              # internal: a JSON job for one subprocess
)
TRAINERS = ("ours", "pypi", "hf")
NAMES = {"ours": "rustbpe (ours)", "pypi": "rustbpe 0.1.0 (PyPI)", "hf": "HF tokenizers"}
PYPI_SPEC = "rustbpe==0.1.0"

# -----------------------------------------------------------------------------
# Corpus


def default_data_dir() -> str:
    from nanochat.dataset import get_data_dir
    downloaded = get_data_dir()
    if glob.glob(os.path.join(downloaded, "*.parquet")):
        return downloaded
    return str(REPO_ROOT / "dev" / "cpu_sample" / "pretrain")


def build_corpus(cache_dir: Path, mb: float, data_dir: str) -> tuple[Path, dict]:
    """Write (once) the shards' documents, cycled until `mb` MB of UTF-8; return its path and facts."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(data_dir, "*.parquet")))
    if not files:
        raise SystemExit(f"no parquet shards in {data_dir!r}: pass --data_dir=<folder of shards with a text column> "
                         "or download some with `python -m nanochat.dataset -n 2`")
    docs = [d for f in files for d in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    source_bytes = sum(len(d.encode("utf-8")) for d in docs)
    facts = {"data_dir": data_dir, "files": len(files), "source_docs": len(docs), "source_bytes": source_bytes}
    path = cache_dir / f"corpus_{len(files)}shards_{source_bytes}B_{mb:g}MB.pkl"
    if not path.exists():
        out, total, i = [], 0, 0
        while total < mb * 1e6:
            out.append(docs[i % len(docs)])
            total += len(out[-1].encode("utf-8"))
            i += 1
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(out, f, protocol=5)
            os.replace(tmp, path)
        except BaseException:
            os.remove(tmp)
            raise
    docs = load_corpus(path)
    facts.update(docs=len(docs), chars=sum(map(len, docs)), bytes=sum(len(d.encode("utf-8")) for d in docs))
    return path, facts


def load_corpus(path: str | Path, max_bytes: float | None = None) -> list[str]:
    """The cached documents; with max_bytes, the first ones until that many bytes of UTF-8."""
    with open(path, "rb") as f:
        docs = pickle.load(f)  # str by str: no whole-file copy inflates the peak RSS
    if max_bytes is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_bytes:
            break
        out.append(d)
        total += len(d.encode("utf-8"))
    return out


# -----------------------------------------------------------------------------
# Workers (each one a subprocess running `bench/tokenizer.py --worker=<json job>`)


def proc_status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MB (2^20 bytes). Not
    getrusage's ru_maxrss: on Linux it carries the parent's peak through fork+exec, so every worker
    would report at least the driver's (torch-sized) peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def import_rustbpe(trainer: str, pypi_dir: str):
    """Import ours (from the environment) or the PyPI wheel (from its folder) and prove which it is."""
    if trainer == "pypi":
        sys.path.insert(0, pypi_dir)
    import rustbpe

    where = os.path.realpath(rustbpe.__file__)
    if (trainer == "pypi") != where.startswith(os.path.realpath(pypi_dir) + os.sep) or not hasattr(rustbpe, "Tokenizer"):
        raise SystemExit(f"worker {trainer}: imported the wrong rustbpe ({where})")
    return rustbpe, where


def worker_train(job: dict) -> dict:
    # The pattern comes from the driver: importing nanochat.tokenizer here would load torch and
    # inflate every trainer's RSS.
    docs = load_corpus(job["corpus"])
    rss_loaded = proc_status_mb("VmRSS")
    if job["trainer"] == "hf":
        import tokenizers
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        module = f"tokenizers {tokenizers.__version__} ({os.path.dirname(tokenizers.__file__)})"
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(job["pattern"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=job["vocab"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False, special_tokens=[])
        cpu0, t0 = time.process_time(), time.perf_counter()
        tok.train_from_iterator(docs, trainer=trainer)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        vocab = tok.get_vocab_size()
        if job.get("save"):
            tok.save(job["save"])
    else:
        rustbpe, module = import_rustbpe(job["trainer"], job["pypi_dir"])
        tok = rustbpe.Tokenizer()
        cpu0, t0 = time.process_time(), time.perf_counter()
        tok.train_from_iterator(iter(docs), job["vocab"], pattern=job["pattern"])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        ranks = {bytes(token): rank for token, rank in tok.get_mergeable_ranks()}
        vocab = len(ranks)
        if job.get("save"):
            with open(job["save"], "wb") as f:
                pickle.dump(ranks, f)
    return {"seconds": seconds, "cpu_seconds": cpu, "rss_loaded_mb": rss_loaded, "peak_rss_mb": proc_status_mb("VmHWM"),
            "vocab": vocab, "module": module}


def worker_encode(job: dict) -> dict:
    docs = load_corpus(job["corpus"], job["encode_mb"] * 1e6)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    if job["trainer"] == "hf":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(job["load"])
        tok.encode_batch(docs[:8])  # warm-up
        t0 = time.perf_counter()
        ntokens = sum(len(e.ids) for e in tok.encode_batch(docs))
    else:
        from nanochat.tokenizer import RustBPETokenizer

        with open(job["load"], "rb") as f:
            enc = RustBPETokenizer.from_mergeable_ranks(pickle.load(f)).enc
        enc.encode_ordinary_batch(docs[:8], num_threads=job["threads"])  # warm-up
        t0 = time.perf_counter()
        ntokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=job["threads"])))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "mb_per_s": nbytes / 1e6 / seconds, "bytes": nbytes, "tokens": ntokens}


def run_worker(job: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}  # all cores for everyone
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--worker={json.dumps(job)}"],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"{job['kind']} worker for {job['trainer']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def install_pypi_wheel(pypi_dir: str) -> str:
    """Install the PyPI wheel into its own folder (once), never into the environment; "" when done,
    else why not."""
    if (Path(pypi_dir) / "rustbpe").is_dir():
        return ""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--target", pypi_dir, "--no-deps", PYPI_SPEC], capture_output=True, text=True)
    return "" if proc.returncode == 0 else f"pip could not install {PYPI_SPEC}: {proc.stderr.strip()[-300:]}"


# -----------------------------------------------------------------------------
# Driver


def learned_tokens(trainer: str, path: str) -> set[bytes]:
    """The token byte strings a trained tokenizer holds (ranks pickle, or HF's tokenizer.json whose
    tokens are written with GPT-2's byte-to-unicode map)."""
    if trainer != "hf":
        with open(path, "rb") as f:
            return set(pickle.load(f))
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    return {bytes(char_to_byte[c] for c in token) for token in vocab}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def main():
    cfg = parse_flags(DEFAULTS, doc=__doc__)
    if cfg.worker:
        job = json.loads(cfg.worker)
        print(json.dumps((worker_train if job["kind"] == "train" else worker_encode)(job)))
        return

    try:
        vocabs = [int(v) for v in cfg.vocab.split(",") if v.strip()]
    except ValueError:
        raise FlagError(f"--vocab expects comma-separated integers, got {cfg.vocab!r}") from None
    trainers = [t.strip() for t in cfg.trainers.split(",") if t.strip()]
    if not vocabs or [v for v in vocabs if v < 257]:
        raise FlagError(f"--vocab: each size must exceed 256 (the byte tokens), got {cfg.vocab!r}")
    if not trainers or [t for t in trainers if t not in TRAINERS]:
        raise FlagError(f"--trainers: choose from {','.join(TRAINERS)}, got {cfg.trainers!r}")
    if cfg.mb <= 0 or cfg.repeats < 1 or cfg.encode_mb < 0 or cfg.encode_threads < 1:
        raise FlagError("--mb must be > 0, --repeats >= 1, --encode_mb >= 0, --encode_threads >= 1")
    from nanochat.tokenizer import SPLIT_PATTERN

    cache_dir = Path(cfg.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    pypi_dir = str(cache_dir / "rustbpe_pypi")
    notes = {}
    if "pypi" in trainers and (why := install_pypi_wheel(pypi_dir)):
        trainers.remove("pypi")
        notes["pypi"] = why
        if not trainers:
            raise SystemExit(f"nothing to run: {why}")
    corpus, facts = build_corpus(cache_dir, cfg.mb, cfg.data_dir or default_data_dir())
    load_before = os.getloadavg()
    print(f"corpus: {facts['docs']:,} documents, {facts['chars'] / 1e6:.1f} M chars, {facts['bytes'] / 1e6:.1f} MB of UTF-8: "
          f"the text column of {facts['files']} shards in {facts['data_dir']} ({facts['source_docs']:,} docs, "
          f"{facts['source_bytes'] / 1e6:.1f} MB) cycled {facts['bytes'] / facts['source_bytes']:.2f} times; cached at {corpus}")
    print(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} "
          f"(1/5/15 min); {cfg.repeats} interleaved repeat(s), median reported")

    # ---- training: interleaved, each run in its own subprocess
    runs = {(t, v): [] for v in vocabs for t in trainers}
    saved = {}
    for v in vocabs:
        for r in range(cfg.repeats):
            order = trainers[r % len(trainers):] + trainers[:r % len(trainers)]  # rotate who goes first
            for t in order:
                job = dict(kind="train", trainer=t, vocab=v, corpus=str(corpus), pattern=SPLIT_PATTERN, pypi_dir=pypi_dir)
                if v == max(vocabs) and r == 0:
                    saved[t] = job["save"] = str(cache_dir / f"{t}_{v}.{'json' if t == 'hf' else 'pkl'}")
                result = run_worker(job)
                runs[(t, v)].append(result)
                print(f"  vocab {v:>6,} repeat {r + 1}: {NAMES[t]:<21} {result['seconds']:6.1f} s "
                      f"(CPU {result['cpu_seconds']:6.1f} s), peak RSS {result['peak_rss_mb']:5.0f} MB", flush=True)
    load_after = os.getloadavg()

    def med(t, v, key):
        return statistics.median(x[key] for x in runs[(t, v)]) if (t, v) in runs else None

    print(f"\nTraining on {facts['bytes'] / 1e6:.1f} MB, median of {cfg.repeats}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after, on {os.cpu_count()} cores")
    print("| vocab | trainer | time (s) | CPU (s) | peak RSS (MB) | RSS loaded (MB) |")
    print("|---:|---|---:|---:|---:|---:|")
    for v in vocabs:
        for t in TRAINERS:
            if (t, v) in runs:
                print(f"| {v:,} | {NAMES[t]} | {med(t, v, 'seconds'):.1f} | {med(t, v, 'cpu_seconds'):.1f} "
                      f"| {med(t, v, 'peak_rss_mb'):.0f} | {med(t, v, 'rss_loaded_mb'):.0f} |")
            elif t in notes:
                print(f"| {v:,} | {NAMES[t]} | not available | | | |")
    print()
    for v in vocabs:
        for other in ("pypi", "hf"):
            if ("ours", v) in runs and (other, v) in runs:
                print(f"vocab {v:,}: ours / {NAMES[other]}: time {ratio(med('ours', v, 'seconds'), med(other, v, 'seconds'))}, "
                      f"CPU {ratio(med('ours', v, 'cpu_seconds'), med(other, v, 'cpu_seconds'))}, "
                      f"peak RSS {ratio(med('ours', v, 'peak_rss_mb'), med(other, v, 'peak_rss_mb'))}")
    for t, why in notes.items():
        print(f"{NAMES[t]}: not available ({why})")
    for t in trainers:
        first = runs[(t, vocabs[0])][0]
        print(f"{t}: {first['vocab']:,} tokens at vocab {vocabs[0]:,}; imported {first['module']}")
    if "ours" in saved:
        ours_tokens = learned_tokens("ours", saved["ours"])
        for t in ("pypi", "hf"):
            if t in saved:
                shared = len(ours_tokens & learned_tokens(t, saved[t])) / len(ours_tokens)
                print(f"{NAMES[t]} learned {shared:.1%} of the tokens ours learned at vocab {max(vocabs):,}")

    # ---- encode throughput: tiktoken from our ranks vs HF tokenizers, at the largest vocab
    encode = {}
    if cfg.encode_mb > 0 and "ours" in saved and "hf" in saved:
        for t in ("ours", "hf"):
            job = dict(kind="encode", trainer=t, corpus=str(corpus), load=saved[t], encode_mb=cfg.encode_mb,
                       threads=cfg.encode_threads)
            results = [run_worker(job) for _ in range(cfg.repeats)]
            encode[t] = {**results[0], "mb_per_s": statistics.median(x["mb_per_s"] for x in results)}
        print(f"\nEncoding {encode['ours']['bytes'] / 1e6:.1f} MB with the vocab-{max(vocabs):,} tokenizers, median of {cfg.repeats}:")
        print("| encoder | MB/s | bytes/token |")
        print("|---|---:|---:|")
        print(f"| tiktoken from our ranks, encode_ordinary_batch ({cfg.encode_threads} threads) "
              f"| {encode['ours']['mb_per_s']:.1f} | {encode['ours']['bytes'] / encode['ours']['tokens']:.2f} |")
        print(f"| HF tokenizers, encode_batch | {encode['hf']['mb_per_s']:.1f} | {encode['hf']['bytes'] / encode['hf']['tokens']:.2f} |")
        print(f"ours / HF: {ratio(encode['ours']['mb_per_s'], encode['hf']['mb_per_s'])} the throughput")
    elif cfg.encode_mb > 0:
        print("\n(encode throughput needs both ours and hf in --trainers: skipped)")

    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"corpus": facts, "load_before": load_before, "load_after": load_after, "notes": notes,
                       "train": [{"trainer": t, "vocab": v, **x} for (t, v), xs in runs.items() for x in xs],
                       "encode": encode}, f, indent=1)


if __name__ == "__main__":
    main()
