"""
CORE of a base model checkpoint: accuracy and centered accuracy on every task of the eval bundle,
and their mean (the CORE metric of the DCLM paper; GPT-2 XL 0.2565, the d20 speedrun ~0.22).
Prints a per-task table, writes <base>/base_eval/<tag>_<step>.csv and the "Base model evaluation"
section of the report (key `CORE`).

Run:
    python -m scripts.base_eval                                   # largest base model, latest step
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval  # items strided over 8 GPUs
    python -m scripts.base_eval --device_type=cpu --max_per_task=100 --eval_bundle=path/to/bundle

The bundle is downloaded to <base>/eval_bundle on first use; --eval_bundle (or the environment
variable NANOCHAT_EVAL_BUNDLE) names a local unzipped bundle instead. --tasks=copa,hellaswag scores
only those tasks. A task whose data file is missing is skipped and listed in one line; when not
every task of core.yaml was scored, the table, the CSV and the report say "CORE partial (k/N
tasks)" instead of "CORE". Prompts are never cropped to the training context (as in the
reference); an item longer than the model's rotary tables is cropped and its task's line says so.
"""

import csv
import os
import time

from nanochat.checkpoint_manager import SOURCES, find_largest_model, load_model
from nanochat.common import (atomic_write, base_dir_path, compute_cleanup, compute_init, data_dir_setting,
                             get_base_dir, print0)
from nanochat.core_bundle import BundleError, get_eval_bundle_dir, load_bundle, select_tasks
from nanochat.core_eval import core_label, evaluate_core
from nanochat.download import DownloadError
from nanochat.flags import FlagError, StopRun, parse_flags, print_flags
from nanochat.report import get_report

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    device_type="",  # cuda | mps | cpu; empty = autodetect
    model_tag="",  # default: the largest d<depth> in base_checkpoints
    step=-1,  # default: the latest complete checkpoint
    max_per_task=-1,  # items per task after the seeded shuffle; -1 = all
    device_batch_size=8,  # sequences (choices) per forward pass; logits are B x T x vocab floats
    eval_bundle="",  # a local unzipped bundle; default $NANOCHAT_EVAL_BUNDLE or <base>/eval_bundle
    tasks="",  # comma-separated task labels to score (default: every task of core.yaml)
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
if cfg.device_batch_size < 1:
    raise FlagError(f"--device_batch_size must be at least 1 (got {cfg.device_batch_size})")

# -----------------------------------------------------------------------------
# Compute, model, bundle

compute = compute_init(cfg.device_type)
print_flags(cfg, DEFAULTS)
labels = [label.strip() for label in cfg.tasks.split(",") if label.strip()] or None  # None: every task


def bundle_tasks(bundle_dir: str) -> list[dict]:
    tasks, _ = select_tasks(load_bundle(bundle_dir), labels)
    if not tasks:
        raise BundleError(f"{bundle_dir}: no task to score, the data file of every selected task is missing")
    return tasks


try:  # no checkpoint, or a missing, malformed or undownloadable bundle: one line saying what to do
    bundle_dir = cfg.eval_bundle or data_dir_setting("NANOCHAT_EVAL_BUNDLE")  # a local bundle, if any
    tasks = bundle_tasks(bundle_dir) if bundle_dir else None  # checked before the model is loaded
    model, tokenizer, meta = load_model("base", compute.device, phase="eval", model_tag=cfg.model_tag or None,
                                        step=cfg.step if cfg.step >= 0 else None)
    if not bundle_dir:  # downloaded only once the model is known to be there
        bundle_dir = get_eval_bundle_dir()
        tasks = bundle_tasks(bundle_dir)
except (BundleError, FileNotFoundError, DownloadError) as e:
    raise StopRun(f"base_eval: {e}") from None
model_tag = cfg.model_tag or find_largest_model(os.path.join(base_dir_path(), SOURCES["base"][0]))  # the one loaded
step = meta["step"]
print0(f"base model {model_tag} at step {step}; eval bundle {bundle_dir} ({len(tasks)} tasks to score)")

# -----------------------------------------------------------------------------
# Evaluate

compute.synchronize()
t0 = time.time()
with compute.autocast():
    out = evaluate_core(model, tokenizer, compute.device, max_per_task=cfg.max_per_task, bundle_dir=bundle_dir,
                        batch_size=cfg.device_batch_size, tasks=labels)
compute.synchronize()
seconds = time.time() - t0
num_examples = sum(out["num_examples"].values())
ms_per_example = 1000 * seconds / num_examples

# -----------------------------------------------------------------------------
# Table, CSV, report (rank 0)

core = core_label(out)  # "CORE", or "CORE partial (k/N tasks)"
width = max(len(label) for label in [*out["results"], core]) + 2
lines = [f"{'Task':<{width}} {'Accuracy':>9} {'Centered':>9}"]
lines += [f"{label:<{width}} {acc:>9.4f} {out['centered_results'][label]:>9.4f}" for label, acc in out["results"].items()]
lines.append(f"{core:<{width}} {'':>9} {out['core_metric']:>9.4f}")
if out["missing"]:
    lines.append(f"not scored (data file missing): {', '.join(out['missing'])}")
table = "\n".join(lines)
print0(table)
print0(f"{num_examples} examples in {seconds:.1f}s: {ms_per_example:.1f} ms per example "
       f"(over {compute.world_size} rank(s))")

if compute.master_process:
    csv_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(csv_dir, exist_ok=True)
    csv_path = os.path.join(csv_dir, f"{model_tag}_{step:06d}.csv")
    rows = [["task", "accuracy", "centered"],
            *([label, f"{acc:.6f}", f"{out['centered_results'][label]:.6f}"] for label, acc in out["results"].items()),
            [core, "", f"{out['core_metric']:.6f}"]]
    atomic_write(csv_path, lambda f: csv.writer(f).writerows(rows), text=True)
    print0(f"wrote {csv_path}")
    get_report().log(section="Base model evaluation", data=[
        {"model": model_tag, "step": step, "max_per_task": cfg.max_per_task, core: out["core_metric"],
         "examples": num_examples, "time per example (ms)": round(ms_per_example, 2)},
        "```\n" + table + "\n```",
    ])
compute_cleanup()
