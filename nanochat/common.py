"""
Common utilities: the one door for devices, distributed init, seeding, the base directory,
rank-0 printing, logging, wandb (or a no-op stand-in), an inter-process lock and atomic file writes
(downloads are in nanochat/download.py).

Design choices:
- `compute_init()` decides device, process group and seeds once and returns a small named
  structure (`Compute`). Scripts never branch on the device themselves: `compute.synchronize()`,
  `compute.max_memory_allocated()` and `compute.autocast()` are no-ops where they do not apply.
- Every rank seeds with the same value, so a model initialised on each rank is identical
  without a broadcast (the distributed optimisers rely on that).
- One of each: `get_dist_info()` is how any module learns its rank; `atomic_write()` is how
  any file is written (temp + rename); `use_fused_loss()` decides whether GPT takes its fused
  head + loss (gpt.py itself never looks at the device).
- Importing this module does no heavy work: no device query, no network, no file writes.

Run under torchrun, e.g. `torchrun --standalone --nproc_per_node=8 -m scripts.base_train`;
torchrun sets RANK / LOCAL_RANK / WORLD_SIZE, which `compute_init` reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.flags import StopRun

logger = logging.getLogger("nanochat")

# -----------------------------------------------------------------------------
# Logging and printing


class _ColoredFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m",
              "CRITICAL": "\033[35m"}

    def format(self, record):
        msg = super().format(record)
        color = self.COLORS.get(record.levelname)
        if color and os.isatty(2):
            msg = f"{color}{msg}\033[0m"
        return msg


def setup_default_logging(level: int = logging.INFO) -> None:
    """Log 'time level name: message' to stderr, once per process."""
    root = logging.getLogger()
    if any(getattr(h, "_nanochat", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._nanochat = True
    handler.setFormatter(_ColoredFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_distributed, rank, local_rank, world_size): the one way any module learns its rank. From
    the process group once one is up (however it was started), else from torchrun's environment
    (compute_init reads it to join the group), else (False, 0, 0, 1)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return True, rank, int(os.environ.get("LOCAL_RANK", rank)), dist.get_world_size()
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_master_process() -> bool:
    return get_dist_info()[1] == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_master_process():
        print(*args, **kwargs)


def base_dir_path() -> str:
    """$NANOCHAT_BASE_DIR, default ~/.cache/nanochat; not created (see get_base_dir)."""
    return os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")


def get_base_dir() -> str:
    """All state lives here: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat (created on first use)."""
    base_dir = base_dir_path()
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


RECORDED_DATA_DIRS = "data_dirs.json"  # in the base dir: {"NANOCHAT_DATA_DIR": "/path", ...}


def data_dir_setting(name: str) -> str | None:
    """A data folder setting: $name if set, else the folder recorded for it in
    <base dir>/data_dirs.json, else None. The CPU preset records the bundled sample's folders
    there, so a user's own runs in the same base dir find the same data with no variable set."""
    if os.environ.get(name):
        return os.environ[name]
    try:
        with open(os.path.join(base_dir_path(), RECORDED_DATA_DIRS), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    value = recorded.get(name) if isinstance(recorded, dict) else None
    return value if isinstance(value, str) and os.path.isdir(value) else None


# -----------------------------------------------------------------------------
# Devices and distributed init


def autodetect_device_type() -> str:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass(frozen=True)
class Compute:
    """What a script needs to know about where it runs. Returned by compute_init()."""
    ddp: bool  # launched by torchrun (even with one process)
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    device_type: str  # "cuda" | "mps" | "cpu"

    @property
    def master_process(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 on CUDA, fp32 elsewhere: the dtype of the embedding in training (the reference's
        layout: the residual stream is then bf16 under autocast) and of the weights for inference."""
        return torch.bfloat16 if self.device_type == "cuda" else torch.float32

    def autocast(self):
        """bf16 autocast on CUDA; full precision (a no-op context) elsewhere."""
        if self.device_type == "cuda":
            return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings); a no-op off CUDA/MPS."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()

    def max_memory_allocated(self) -> int:
        """Peak memory in bytes: tensors on the GPU for CUDA; the whole process's peak resident
        set on the CPU (weights, activations, Python and all); 0 on MPS, which has no peak."""
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.device_type == "cpu":
            import resource
            import sys
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB
        return 0


# Peak dense bf16 tensor-core FLOP/s (no sparsity) from the vendors' data sheets, matched by a
# substring of the device name. Unknown devices get None: MFU shows as n/a, never a wrong number.
_PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 125e12), ("L40S", 362e12),
    ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def get_peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of one device, looked up by name (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    for key, flops in _PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def use_fused_loss(device_type: str, compiled: bool = False) -> bool:
    """Whether a model on this device takes GPT's fused head + loss (model.fused_loss): it pays off
    in eager fp32 (CPU, MPS; see nanochat/fused_loss.py). torch.compile fuses the plain path
    itself, and under CUDA's bf16 autocast the plain path's bf16 matmul is what we want. The one
    place this is decided; the training scripts and checkpoint_manager.build_model apply it."""
    return device_type != "cuda" and not compiled


def get_device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return device_type


def compute_init(device_type: str = "", seed: int = 42) -> Compute:
    """Pick the device, join the process group if under torchrun, seed everything."""
    device_type = device_type or autodetect_device_type()
    assert device_type in ("cuda", "mps", "cpu"), f"--device_type must be cuda, mps or cpu (got {device_type!r})"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device_type=cuda was asked for, but torch sees no CUDA device")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device_type=mps was asked for, but torch sees no MPS device")

    # Same seed on every rank: identical init without a broadcast.
    random.seed(seed)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls

    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        # Import torch._dynamo before the group exists: it imports torch.distributed modules whose
        # default arguments (`group=group.WORLD`) would otherwise capture the live process group
        # and keep it, with its worker threads, alive until interpreter exit, where a worker still
        # releasing a tensor can abort the process ("terminate called without an active exception").
        # Building a model on the meta device imports it anyway, so this costs nothing extra.
        import torch._dynamo as _  # noqa: F401  (binds only `_`; `torch` stays the module global)
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        dist.barrier()
    setup_default_logging()
    if rank == 0:
        logger.info(f"device {device} ({device_type}), world size {world_size}")
    return Compute(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size,
                   device=device, device_type=device_type)


def compute_cleanup() -> None:
    """Leave the process group, if we joined one. The barrier first, so that no rank tears the
    group down while another is still on its way to its last collective."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Experiment logging: wandb only when asked for


class DummyWandb:
    """Stands in for a wandb run when logging is off: every call is a no-op."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def wandb_api_key_configured() -> bool:
    """True when wandb could log online without asking: $WANDB_API_KEY, or the netrc entry that
    `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc, encoding="utf-8", errors="replace") as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def get_wandb(run: str, project: str, config: dict, master_process: bool):
    """A real wandb run only for `--run=<name>` (not 'dummy') on rank 0; else a no-op.

    wandb never prompts and never dies for want of an account: with no API key configured (and no
    $WANDB_MODE chosen) the run is logged offline, with one line saying where and how to upload it
    (`wandb sync`). $WANDB_MODE and $WANDB_DIR are respected; the default run directory is
    <base dir>/wandb, not the working directory."""
    if run == "dummy" or not master_process:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise StopRun(f"--run={run} asks for wandb logging, but wandb is not installed: "
                      "run `bash dev/setup.sh` (or `pip install wandb`), or drop --run")
    mode = os.environ.get("WANDB_MODE")
    fallback = mode is None and not wandb_api_key_configured()
    if fallback:
        mode = "offline"
    wandb_dir = os.environ.get("WANDB_DIR") or get_base_dir()
    os.makedirs(wandb_dir, exist_ok=True)
    settings = wandb.Settings(silent=True) if fallback else None
    wandb_run = wandb.init(project=project, name=run, config=config, mode=mode, dir=wandb_dir,
                           settings=settings)
    if fallback:
        run_folder = os.path.dirname(wandb_run.dir)  # .../wandb/offline-run-<time>-<id>
        print0(f"wandb: no API key configured, so run '{run}' is logged offline to {run_folder}; "
               f"upload it later with: wandb sync {run_folder}")
    return wandb_run


# -----------------------------------------------------------------------------
# Files: atomic writes and an inter-process lock


def atomic_write(path: str, write_fn, text: bool = False) -> None:
    """Call write_fn(file) on `path.tmp<pid>` (binary; text=True: UTF-8 text, no newline
    translation), flush it to disk, then rename it over `path`: a crash at any point leaves either
    the old file or the new one, never a partial one. The one way nanochat writes a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") if text else open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive lock on `path` (created if needed) across processes, e.g. torchrun ranks."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
