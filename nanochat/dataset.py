"""
The pretraining data: FineWeb-Edu 100BT, shuffled and repackaged as 1,823 parquet shards
(`shard_00000.parquet` ... `shard_01822.parquet`, ~100 MB each, a single `text` column, row groups
of 1,024 documents). This file downloads them and iterates over their row groups.

Design choices:
- Downloads go through `nanochat.download.download_file`: 1 MB chunks into a temp file, up to 5
  attempts with exponential backoff, atomic rename. A shard is kept only when every row group
  decodes and it has a `text` column (and it matches the sha256 the Hub publishes), so an error
  page, a short body or garbage in the middle of a file is never kept. Each file has a size cap
  (1 GB; shards are ~100 MB) and a deadline, and Ctrl-C stops all workers at once and removes
  their temp files.
- $NANOCHAT_PRETRAIN_DIR points the loaders at another folder of shards (the CPU preset uses
  its bundled sample this way).
- The base URL can be overridden with $NANOCHAT_DATASET_URL (tests serve shards from a local
  http.server; a mirror works the same way). $NANOCHAT_DOWNLOAD_BACKOFF (first retry wait),
  $NANOCHAT_DOWNLOAD_MAX_MB and $NANOCHAT_DOWNLOAD_DEADLINE tune the retries and limits.
- Splits: train = every shard but the last one present, val = the last one.
- A damaged shard (truncated, random bytes, empty, no `text` column) is a ShardError: a SystemExit
  with one line naming the file and saying to delete and re-download it. `check_shards` reads
  every shard's footer before training starts (cheap: no data pages); a row group that fails to
  decode later is reported the same way.
- Ranks share the work by striding over row groups: with `start=rank, step=world_size` rank r
  reads row groups r, r+W, r+2W, ... counted across all shards of the split (not per shard), so
  ranks get equal shares even when a shard has fewer row groups than there are ranks.

Run:
    python -m nanochat.dataset -n 8        # first 8 shards (~800 MB), 4 workers
    python -m nanochat.dataset -n -1 -w 8  # all 1,823 shards
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

from nanochat.common import base_dir_path, data_dir_setting, get_base_dir
from nanochat.download import check_parquet, download_file
from nanochat.flags import StopRun

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # the last shard is shard_01822.parquet
MAX_SHARD_BYTES = 1_000_000_000  # a shard is ~100 MB; anything past 1 GB is not a shard


def shard_filename(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_data_dir() -> str:
    """Where the shards live, read at call time: $NANOCHAT_PRETRAIN_DIR if set; else
    <base dir>/base_data once it holds shards (downloads always go there); else the folder the CPU
    preset recorded in the base dir (its bundled sample, kept apart so sample shards never mix with
    downloaded FineWeb-Edu shards of the same names); else <base dir>/base_data."""
    if os.environ.get("NANOCHAT_PRETRAIN_DIR"):
        return os.environ["NANOCHAT_PRETRAIN_DIR"]
    default = os.path.join(base_dir_path(), "base_data")
    if list_parquet_files(default):
        return default
    return data_dir_setting("NANOCHAT_PRETRAIN_DIR") or default


def download_dir() -> str:
    """Where downloads go: $NANOCHAT_PRETRAIN_DIR if set, else <base dir>/base_data (never a
    folder the preset recorded: that is the repo's bundled sample)."""
    return os.environ.get("NANOCHAT_PRETRAIN_DIR") or os.path.join(get_base_dir(), "base_data")


def get_base_url() -> str:
    return os.environ.get("NANOCHAT_DATASET_URL", BASE_URL).rstrip("/")


# -----------------------------------------------------------------------------
# Download


def download_shard(index: int, data_dir: str | None = None, base_url: str | None = None,
                   attempts: int = 5, backoff: float | None = None, cancel=None) -> str:
    """Download one shard unless it is already there. Returns its path; raises DownloadError (a
    RuntimeError) with a one-line message. `cancel` (a threading.Event) stops it from another thread."""
    data_dir = data_dir or download_dir()
    path = os.path.join(data_dir, shard_filename(index))
    if os.path.exists(path):
        return path
    url = f"{base_url or get_base_url()}/{shard_filename(index)}"
    return download_file(url, path, attempts=attempts, backoff=backoff, max_bytes=MAX_SHARD_BYTES, cancel=cancel,
                         validate=lambda tmp: check_parquet(tmp, "text", cancel))


def download_shards(num_shards: int, workers: int = 4, data_dir: str | None = None,
                    base_url: str | None = None, attempts: int = 5,
                    backoff: float | None = None) -> list[int]:
    """Download shards 0..num_shards-1 (-1: all) with `workers` threads and a progress bar.
    Returns the indices that failed (empty when everything is in place)."""
    from tqdm import tqdm
    num_shards = MAX_SHARD + 1 if num_shards == -1 else num_shards
    if not 1 <= num_shards <= MAX_SHARD + 1:
        raise ValueError(f"-n must be between 1 and {MAX_SHARD + 1}, or -1 for all (got {num_shards})")
    data_dir = data_dir or download_dir()
    os.makedirs(data_dir, exist_ok=True)
    todo = [i for i in range(num_shards) if not os.path.exists(os.path.join(data_dir, shard_filename(i)))]
    print(f"{num_shards - len(todo)} of {num_shards} shards already in {data_dir}; downloading {len(todo)}")
    failed = []
    cancel = threading.Event()  # set on Ctrl-C: every worker stops and removes its temp file
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        with tqdm(total=len(todo), unit="shard") as bar:
            futures = {pool.submit(download_shard, i, data_dir, base_url, attempts, backoff, cancel): i for i in todo}
            for future in as_completed(futures):
                try:
                    future.result()
                except Exception as e:  # download_file already retried; report and go on
                    failed.append(futures[future])
                    tqdm.write(f"FAILED {shard_filename(futures[future])}: {e}")
                bar.update(1)
    except BaseException:  # KeyboardInterrupt above all
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(failed)


# -----------------------------------------------------------------------------
# Reading


class ShardError(StopRun):
    """A damaged pretraining shard: the script ends printing the one-line message, exit status 1."""


def _bad_shard(path: str, what: str) -> ShardError:
    index = os.path.basename(path).removeprefix("shard_").removesuffix(".parquet")
    how = (f"`python -m nanochat.dataset -n {int(index) + 1}` fetches it again" if index.isdigit()
           else "replace it")
    return ShardError(f"pretraining shard {path} {what}: delete it ({how})")


def open_shard(path: str):
    """pq.ParquetFile of a shard (reads its footer), checked to have a `text` column."""
    import pyarrow.parquet as pq
    if os.path.getsize(path) == 0:
        raise _bad_shard(path, "is empty")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a bad footer or magic bytes
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise _bad_shard(path, f"is not a readable parquet file, truncated or damaged ({why})") from None
    if "text" not in pf.schema_arrow.names:
        raise _bad_shard(path, f"has no 'text' column (columns: {', '.join(pf.schema_arrow.names) or 'none'})")
    return pf


def check_shards(data_dir: str | None = None) -> int:
    """Read the footer of every shard (train and val) and check its `text` column, so a damaged
    one stops the run before step 0 rather than at the first evaluation. Returns the count."""
    files = split_files("train", data_dir) + split_files("val", data_dir)
    for path in files:
        open_shard(path)
    return len(files)


def list_parquet_files(data_dir: str | None = None) -> list[str]:
    """Full paths of the complete shards in data_dir, sorted (temp files are ignored)."""
    data_dir = data_dir or get_data_dir()
    if not os.path.isdir(data_dir):
        return []
    return sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))


def split_files(split: str, data_dir: str | None = None) -> list[str]:
    """The shards of a split: train = all but the last, val = the last."""
    assert split in ("train", "val"), f"split must be 'train' or 'val' (got {split!r})"
    files = list_parquet_files(data_dir)
    where = data_dir or get_data_dir()
    if not files:
        raise FileNotFoundError(f"no parquet shards in {where}: download some first, e.g. "
                                f"`python -m nanochat.dataset -n 8`, or, offline, run the CPU preset "
                                f"(`bash dev/runcpu.sh`) or point NANOCHAT_PRETRAIN_DIR at the bundled "
                                f"sample, dev/cpu_sample/pretrain")
    if len(files) < 2:
        raise FileNotFoundError(f"only 1 shard in {where}, but training needs 2 (the last one is the "
                                f"val split): `python -m nanochat.dataset -n 2`")
    return files[:-1] if split == "train" else files[-1:]


def iter_row_groups(split: str, start: int = 0, step: int = 1, data_dir: str | None = None,
                    resume_from: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (shard index within the split, row group index, texts) for this rank's row groups.

    Row groups are numbered globally across the split's shards; this rank takes those whose number
    n has n % step == start. `resume_from=(shard, row_group)` skips every row group before it
    (only footers are read to do so)."""
    assert 0 <= start < step, f"need 0 <= start < step (got start={start}, step={step})"
    n = 0  # global row-group number within the split
    for pq_idx, path in enumerate(split_files(split, data_dir)):
        pf = open_shard(path)
        for rg_idx in range(pf.num_row_groups):
            if n % step == start and (pq_idx, rg_idx) >= tuple(resume_from):
                try:
                    texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                except Exception as e:  # garbage inside a row group: the footer was fine
                    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                    raise _bad_shard(path, f"has a row group ({rg_idx}) that does not decode ({why})") from None
                yield pq_idx, rg_idx, texts
            n += 1


def parquets_iter_batched(split: str, start: int = 0, step: int = 1,
                          data_dir: str | None = None) -> Iterator[list[str]]:
    """Yield the `text` column (list[str]) of each of this rank's row groups, one pass."""
    for _, _, texts in iter_row_groups(split, start, step, data_dir):
        yield texts


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu shards into <base>/base_data")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help=f"number of shards to download (-1: all {MAX_SHARD + 1})")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads (default 4)")
    args = parser.parse_args(argv)
    try:
        failed = download_shards(args.num_files, workers=args.num_workers)
    except ValueError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print("interrupted: the shards in progress were discarded; run the same command again to resume",
              file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} shard(s) could not be downloaded: {[shard_filename(i) for i in failed]}; "
              f"run the same command again to retry them", file=sys.stderr)
        return 1
    print(f"done: shards are in {download_dir()}")
    return 0


if __name__ == "__main__":
    status = main()
    if status == 130:  # Ctrl-C: the temp files are gone already, so skip the slow teardown of torch & co.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
