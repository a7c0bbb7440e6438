"""
The CORE eval bundle: find it (a local copy named by $NANOCHAT_EVAL_BUNDLE, or <base>/eval_bundle/,
downloaded once), then read and validate it. nanochat/core_eval.py scores what this module loads.

The bundle holds:
- `core.yaml`: `icl_tasks`, each with `label`, `dataset_uri` (under eval_data/), `num_fewshot`
  (a list like [10] in the real bundle, or an int), `icl_task_type` (multiple_choice | schema |
  language_modeling) and optional `continuation_delimiter` (default " ");
- `eval_data/**.jsonl`: one item per line. multiple_choice: {query, choices, gold};
  schema: {context_options, continuation, gold}; language_modeling: {context, continuation};
- `eval_meta_data.csv`: `Eval Task`, `Random baseline` (percent).

The download happens under a file lock (one process fetches, the others wait), the zip is checked
member by member before it is unpacked, and the folder is renamed into place only when complete.
Every defect is a BundleError naming the file (and line) and what is wrong. `select_tasks` picks
the tasks to score by label and says which of them have no data file.

    from nanochat.core_bundle import get_eval_bundle_dir, load_bundle, load_task_data
    tasks = load_bundle(get_eval_bundle_dir())  # [{label, task_type, dataset_path, ...}]
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
import zipfile

from nanochat.common import data_dir_setting, file_lock, get_base_dir, print0
from nanochat.download import download_file

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
REQUIRED_FIELDS = {  # field -> expected type, per task type
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}


class BundleError(ValueError):
    """A malformed eval bundle; the message names the file (and line) and what is wrong."""


# -----------------------------------------------------------------------------
# The bundle: find or download it, then read and validate it


def _validate_zip(path: str) -> None:
    with zipfile.ZipFile(path) as zf:  # raises BadZipFile on a truncated or foreign file
        bad = zf.testzip()
        if bad is not None:
            raise BundleError(f"{path}: member {bad} is corrupt (CRC mismatch)")
        if not any(name.endswith("core.yaml") for name in zf.namelist()):
            raise BundleError(f"{path}: the archive has no core.yaml, it is not a CORE eval bundle")
        unpacked = sum(info.file_size for info in zf.infolist())
        if unpacked > 4 << 30:  # the real bundle unpacks to ~100 MB
            raise BundleError(f"{path}: the archive would unpack to {unpacked:,} bytes, not a CORE eval bundle")


def download_eval_bundle(url: str, bundle_dir: str, attempts: int = 5) -> str:
    """Download and unzip the bundle into `bundle_dir` unless it is already there. One process
    downloads under a file lock; the others wait, then find it. The zip (size cap 1 GB, the real
    one is ~25 MB; deadline and Ctrl-C as for every download, see nanochat/download.py) is checked
    member by member (CRCs) before it is unpacked, and the unpacked folder is renamed into place
    only when complete; on any failure, Ctrl-C included, nothing is left behind."""
    with file_lock(bundle_dir.rstrip("/") + ".lock"):
        if os.path.exists(os.path.join(bundle_dir, "core.yaml")):
            return bundle_dir
        parent = os.path.dirname(os.path.abspath(bundle_dir))
        zip_path = os.path.join(parent, "eval_bundle.zip")
        print0(f"downloading the CORE eval bundle from {url}")
        tmp = None
        try:
            download_file(url, zip_path, attempts=attempts, validate=_validate_zip, max_bytes=1_000_000_000)
            tmp = tempfile.mkdtemp(prefix=".eval_bundle_", dir=parent)
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
            root = tmp  # the real zip wraps everything in one folder (eval_bundle/)
            if not os.path.exists(os.path.join(root, "core.yaml")):
                subdirs = [d for d in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, d, "core.yaml"))]
                if len(subdirs) != 1:
                    raise BundleError(f"{url}: expected core.yaml at the top or in one top folder of the zip")
                root = os.path.join(tmp, subdirs[0])
            if os.path.exists(bundle_dir):  # a folder without core.yaml: not a bundle, replace it
                shutil.rmtree(bundle_dir)
            os.replace(root, bundle_dir)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(zip_path)
    return bundle_dir


def get_eval_bundle_dir(url: str = EVAL_BUNDLE_URL) -> str:
    """$NANOCHAT_EVAL_BUNDLE (a local bundle folder) if set, or the one the CPU preset recorded in
    the base dir; else <base>/eval_bundle (downloaded on first use)."""
    local = data_dir_setting("NANOCHAT_EVAL_BUNDLE")
    if local:
        if not os.path.isfile(os.path.join(local, "core.yaml")):
            raise BundleError(f"NANOCHAT_EVAL_BUNDLE={local}: no core.yaml there; point it at an unzipped eval bundle")
        return local
    return download_eval_bundle(url, os.path.join(get_base_dir(), "eval_bundle"))


def _read_baselines(csv_path: str) -> dict[str, float]:
    if not os.path.isfile(csv_path):
        raise BundleError(f"{csv_path}: missing (it holds each task's random baseline)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or [])
        if missing:
            raise BundleError(f"{csv_path}: missing column(s) {sorted(missing)}")
        baselines = {}
        for row in reader:
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise BundleError(f"{csv_path}:{reader.line_num}: Random baseline {row['Random baseline']!r} "
                                  f"is not a number") from None
    return baselines


def load_bundle(bundle_dir: str) -> list[dict]:
    """The tasks of core.yaml, validated: [{label, task_type, dataset_path, available (the data
    file exists), num_fewshot, continuation_delimiter, random_baseline (percent)}]."""
    import yaml
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    if not os.path.isfile(yaml_path):
        raise BundleError(f"{yaml_path}: missing; is {bundle_dir} an eval bundle?")
    with open(yaml_path, encoding="utf-8") as f:
        text = f.read()
    try:
        config = yaml.safe_load(text)
        root = yaml.compose(text)  # the same document as nodes, for line numbers
    except yaml.YAMLError as e:
        raise BundleError(f"{yaml_path}: not valid YAML: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list) or not config["icl_tasks"]:
        raise BundleError(f"{yaml_path}: expected a top-level 'icl_tasks' list with at least one task")
    task_nodes = next(v for k, v in root.value if k.value == "icl_tasks").value
    baselines = _read_baselines(os.path.join(bundle_dir, "eval_meta_data.csv"))

    tasks = []
    for task, node in zip(config["icl_tasks"], task_nodes):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node.value, list) else {}
        where = f"{yaml_path}:{node.start_mark.line + 1}"
        at = lambda key: f"{yaml_path}:{lines.get(key, node.start_mark.line + 1)}"  # noqa: E731
        if not isinstance(task, dict):
            raise BundleError(f"{where}: a task must be a mapping")
        for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
            if key not in task:
                raise BundleError(f"{where}: task {task.get('label', '?')!r} has no '{key}'")
        label, task_type = task["label"], task["icl_task_type"]
        if any(t["label"] == label for t in tasks):
            raise BundleError(f"{at('label')}: task label {label!r} appears twice")
        if task_type not in TASK_TYPES:
            raise BundleError(f"{at('icl_task_type')}: task {label!r} has unknown icl_task_type {task_type!r} "
                              f"(expected one of {', '.join(TASK_TYPES)})")
        num_fewshot = task["num_fewshot"]
        num_fewshot = num_fewshot[0] if isinstance(num_fewshot, list) and len(num_fewshot) == 1 else num_fewshot
        if not isinstance(num_fewshot, int) or num_fewshot < 0:
            raise BundleError(f"{at('num_fewshot')}: task {label!r}: num_fewshot must be an int >= 0 or a one-element "
                              f"list of one (got {task['num_fewshot']!r})")
        dataset_path = os.path.join(bundle_dir, "eval_data", task["dataset_uri"])
        if label not in baselines:
            raise BundleError(f"{at('label')}: task {label!r} has no 'Random baseline' row in "
                              f"{os.path.join(bundle_dir, 'eval_meta_data.csv')}")
        if not 0 <= baselines[label] < 100:
            raise BundleError(f"eval_meta_data.csv: task {label!r}: random baseline {baselines[label]} "
                              f"must be a percentage in [0, 100)")
        tasks.append({"label": label, "task_type": task_type, "dataset_path": dataset_path,
                      "available": os.path.isfile(dataset_path), "num_fewshot": num_fewshot,
                      "continuation_delimiter": task.get("continuation_delimiter", " "),
                      "random_baseline": baselines[label]})
    return tasks


def load_task_data(path: str, task_type: str) -> list[dict]:
    """The items of one task's JSONL file, each checked for the fields its task type needs."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise BundleError(f"{path}:{line_num}: bad JSON ({e})") from None
            if not isinstance(item, dict):
                raise BundleError(f"{path}:{line_num}: expected a JSON object")
            for key, kind in REQUIRED_FIELDS[task_type].items():
                if not isinstance(item.get(key), kind) or isinstance(item.get(key), bool):
                    raise BundleError(f"{path}:{line_num}: a {task_type} item needs '{key}' "
                                      f"({kind.__name__}), got {item.get(key)!r}")
            options = item.get("choices", item.get("context_options"))
            if options is not None:
                if len(options) < 2 or not all(isinstance(o, str) for o in options):
                    raise BundleError(f"{path}:{line_num}: needs a list of at least 2 strings to choose from")
                if not 0 <= item["gold"] < len(options):
                    raise BundleError(f"{path}:{line_num}: gold {item['gold']} is out of range for "
                                      f"{len(options)} options")
            items.append(item)
    if not items:
        raise BundleError(f"{path}: no items")
    return items




def select_tasks(tasks: list[dict], labels: list[str] | None) -> tuple[list[dict], list[str]]:
    """(the tasks to score, the labels of the selected tasks whose data file is missing). `labels`
    picks a subset by label (None: all); an unknown label is a BundleError naming the known ones."""
    if labels is not None:
        known = [t["label"] for t in tasks]
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise BundleError(f"unknown CORE task(s) {', '.join(unknown)}; the bundle has: {', '.join(known)}")
        tasks = [t for t in tasks if t["label"] in labels]
    missing = [t["label"] for t in tasks if not t["available"]]
    return [t for t in tasks if t["available"]], missing
