"""
Shared test fixtures. Tests are hermetic: every test gets its own temporary base dir (never
~/.cache/nanochat), no network, wandb disabled. Real data comes from ../shared/data (override the
location with NANOCHAT_SHARED_DATA; a fresh clone of a checkout that has it finds it there too).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_shared_data() -> Path:
    """$NANOCHAT_SHARED_DATA; else shared/data beside this checkout; else beside the local checkout
    this one was cloned from (`git clone /work/main /tmp/fresh` still finds /work/shared/data)."""
    if "NANOCHAT_SHARED_DATA" in os.environ:
        return Path(os.environ["NANOCHAT_SHARED_DATA"])
    candidates = [REPO_ROOT.parent / "shared" / "data"]
    origin = subprocess.run(["git", "config", "--get", "remote.origin.url"], cwd=REPO_ROOT,
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():  # a local path, not a URL
        candidates.append(Path(origin).resolve().parent / "shared" / "data")
    return next((c for c in candidates if (c / "README.md").exists()), candidates[0])


SHARED_DATA = find_shared_data()

os.environ.setdefault("WANDB_MODE", "disabled")
# Tests run tiny models: on a couple of shared cores, OpenMP threads waiting on each other make them
# ~3x slower than one thread. (Subprocesses the tests start choose their own thread count.)
import torch  # noqa: E402
torch.set_num_threads(1)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR for each test."""
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the real small data sets the tests use."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set NANOCHAT_SHARED_DATA to its path")
    return SHARED_DATA


# -----------------------------------------------------------------------------
# A tiny tokenizer shared by the whole session (owned by the tokenizer's engineer)

TINY_TOKENIZER_VOCAB_SIZE = 512  # 256 bytes + 247 merges + 9 specials


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, shared_data) -> Path:
    """A directory with tokenizer.pkl + token_bytes.pt: a 512-token RustBPETokenizer trained with
    rustbpe on the first 200 KB of Tiny Shakespeare (one document per blank-line paragraph).
    Treat it as read-only; copy it to write into it."""
    from nanochat.tokenizer import RustBPETokenizer
    text = (shared_data / "pretrain" / "raw" / "tinyshakespeare_input.txt").read_text(encoding="utf-8")[:200_000]
    tokenizer = RustBPETokenizer.train_from_iterator(text.split("\n\n"), TINY_TOKENIZER_VOCAB_SIZE)
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer.save(str(path))
    assert sorted(p.name for p in path.iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer, loaded (a RustBPETokenizer with vocab size 512)."""
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.from_directory(str(tiny_tokenizer_dir))


@pytest.fixture
def base_dir_with_tokenizer(base_dir, tiny_tokenizer_dir) -> Path:
    """This test's base dir with the tiny tokenizer copied into <base_dir>/tokenizer/."""
    import shutil
    shutil.copytree(tiny_tokenizer_dir, base_dir / "tokenizer")
    return base_dir


# -----------------------------------------------------------------------------
# Files the tests set up the way a user's run would leave them


def copy_pretrain_shards(shared_data: Path, base_dir: Path) -> Path:
    """The shared pretraining shards (2 train + 1 val) copied into <base_dir>/base_data."""
    import shutil
    data_dir = base_dir / "base_data"
    data_dir.mkdir(exist_ok=True)
    for src in sorted((shared_data / "pretrain").glob("shard_*.parquet")):
        shutil.copy(src, data_dir / src.name)
    return data_dir


def copy_checkpoint(src_dir: Path, dst_dir: Path, step: int) -> None:
    """Step `step`'s files (model, every rank's optimiser shard, meta) from one checkpoint
    directory into another: a run that stopped right after saving that step."""
    import shutil
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.glob(f"*_{step:06d}*"):
        shutil.copy(f, dst_dir / f.name)
