"""
Shared test fixtures. Tests are hermetic: every test gets its own temporary base dir (never
~/.cache/nanochat), no network, wandb disabled. Real data comes only from inside the repo: the CPU
preset's sample (dev/cpu_sample/, which the tasks read through NANOCHAT_DATA_DIR) and the few files
in tests/data/ that the sample lacks. Sources and licences are in the README.md of each folder.
"""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "dev" / "cpu_sample"
TEST_DATA = REPO_ROOT / "tests" / "data"
PRETRAIN_ROW_GROUP = 384  # rows per row group in the `pretrain_shards` fixture

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
def sample_data() -> Path:
    """dev/cpu_sample: small slices of the real data sets, in the layout the tasks read."""
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The first 220 KB of Tiny Shakespeare (tests/data/tinyshakespeare_head.txt)."""
    return (TEST_DATA / "tinyshakespeare_head.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> Path:
    """A folder of 3 pretraining shards (2 train + 1 val), re-packed from the sample's real documents
    so that the loaders see several shards, several row groups each and a partial last row group:
    shard_00000/1 hold 1,024 train documents each (row groups of 384: 384 + 384 + 256), shard_00002
    holds the 512 val documents (row groups of 384: 384 + 128). Treat it as read-only."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    read = lambda name: pq.read_table(SAMPLE_DATA / "pretrain" / name, columns=["text"]).column("text").to_pylist()
    train, val = read("shard_00000.parquet"), read("shard_00001.parquet")
    path = tmp_path_factory.mktemp("pretrain")
    for i, docs in enumerate([train[:1024], train[1024:2048], val]):
        pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), path / f"shard_{i:05d}.parquet",
                       row_group_size=PRETRAIN_ROW_GROUP, compression="zstd", compression_level=3,
                       use_dictionary=False, write_statistics=False)
    return path


# -----------------------------------------------------------------------------
# A tiny tokenizer shared by the whole session (owned by the tokenizer's engineer)

TINY_TOKENIZER_VOCAB_SIZE = 512  # 256 bytes + 247 merges + 9 specials


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, shakespeare) -> Path:
    """A directory with tokenizer.pkl + token_bytes.pt: a 512-token RustBPETokenizer trained with
    rustbpe on the first 200 KB of Tiny Shakespeare (one document per blank-line paragraph).
    Treat it as read-only; copy it to write into it."""
    from nanochat.tokenizer import RustBPETokenizer
    text = shakespeare[:200_000]
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


def copy_pretrain_shards(pretrain_shards: Path, base_dir: Path) -> Path:
    """The test pretraining shards (2 train + 1 val, the `pretrain_shards` fixture) copied into
    <base_dir>/base_data."""
    import shutil
    data_dir = base_dir / "base_data"
    data_dir.mkdir(exist_ok=True)
    for src in sorted(pretrain_shards.glob("shard_*.parquet")):
        shutil.copy(src, data_dir / src.name)
    return data_dir


def copy_checkpoint(src_dir: Path, dst_dir: Path, step: int) -> None:
    """Step `step`'s files (model, every rank's optimiser shard, meta) from one checkpoint
    directory into another: a run that stopped right after saving that step."""
    import shutil
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.glob(f"*_{step:06d}*"):
        shutil.copy(f, dst_dir / f.name)


def default_sigint() -> None:
    """A `preexec_fn` for a subprocess a test will send SIGINT (Ctrl-C): it gives the child SIGINT's
    default action back. A test runner started as a background job (`cmd &`) ignores SIGINT, its
    children inherit that, and Python then never raises KeyboardInterrupt."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
