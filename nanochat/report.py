"""
The report card: every stage writes a short markdown section, and `generate` stitches them into
one `report.md` with a summary table of the headline metrics.

    python -m nanochat.report reset      # start of a run: header (git, hardware, software, cost)
    ...stages run, each calling get_report().log(section=..., data=[...])...
    python -m nanochat.report generate   # end of a run: <base>/report/report.md, copied to ./report.md

Files under `<base>/report/`:
- `header.md`: written by `reset` (which also deletes the previous run's sections and history).
- `<slug>.md`: one per stage, slug = section title lower-cased with spaces as dashes, e.g.
  "Base model training" -> `base-model-training.md`. Logging a section again overwrites it, so a
  stage logs all of its results in one call.
- `<name>_history.jsonl`: per-step rows for the training-curve plot (see `log_history`).
- `report.md` and `training_curve.png`: written by `generate`.

How a stage writes its section (rank 0 writes; on other ranks `get_report()` is a no-op):

    from nanochat.report import get_report
    get_report().log(section="Base model evaluation", data=[
        {"CORE": 0.2219, "model step": 21400},   # a dict renders as "- key: value" lines
        "any markdown text or table",             # a string is written as is
    ])

The summary table reads these keys (the exact spelling matters) from these sections:

    column  sections (first one holding the key wins)             keys
    BASE    "Base model evaluation", then "Base model training"  CORE
    MID     "Chat evaluation mid"                                 ARC-Easy ARC-Challenge MMLU GSM8K HumanEval ChatCORE
    SFT     "Chat evaluation sft"                                 (same)
    RL      "Chat evaluation rl"                                  (same)

A metric that was never logged shows "-"; a missing or unreadable section never breaks `generate`.

Training curve: base_train appends one row per step (train loss) and per evaluation (val bpb):

    get_report().log_history({"step": step, "train_loss": loss})   # -> report/base_train_history.jsonl
    get_report().log_history({"step": step, "val_bpb": val_bpb})

`generate` plots train_loss and val_bpb against step into `report/training_curve.png` (a later row
for the same step wins, so a resumed run plots cleanly) and embeds it in report.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys

from nanochat.common import atomic_write, base_dir_path, get_dist_info

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# Known sections in pipeline order; any other section file follows them, sorted by name.
SECTION_ORDER = [
    "Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
    "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
    "Chat RL", "Chat evaluation rl",
]
SUMMARY_ROWS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE"]
SUMMARY_COLUMNS = {  # column -> sections to read, first holding the key wins
    "BASE": ["Base model evaluation", "Base model training"],
    "MID": ["Chat evaluation mid"],
    "SFT": ["Chat evaluation sft"],
    "RL": ["Chat evaluation rl"],
}

# Approximate on-demand price per GPU-hour (USD), from Lambda Cloud's public price list (2025):
# 8xH100 SXM at $23.92/h, 8xA100 80GB SXM at $14.32/h, 1xA10 at $0.75/h. The speedrun's "~$24/h
# for 8xH100, ~$100 for 4 h" comes from the first. Matched by substring of the GPU name.
GPU_HOURLY_USD = [("H100", 2.99), ("A100", 1.79), ("A10", 0.75)]

SOURCE_SUFFIXES = (".py", ".rs", ".sh", ".html", ".toml")  # what "code size" counts


def slugify(section: str) -> str:
    """'Base model training' -> 'base-model-training'."""
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _now() -> str:
    return datetime.datetime.now().strftime(TIME_FORMAT)


def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4f}"
        return f"{value:.4e}"
    return str(value)


def _fenced(text: str) -> list[str]:
    """`text` as a fenced block indented under a list item, the fence longer than any run of
    backticks inside it, so no model output can close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return ["", f"  {fence}text", *[f"  {line}" for line in text.split("\n")], f"  {fence}"]


def _write_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), text=True)


# -----------------------------------------------------------------------------
# The header: git, hardware, software, code size, cost


def _run(cmd: list[str], cwd: str) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_git_info() -> dict:
    root = _repo_root()
    commit = _run(["git", "rev-parse", "--short", "HEAD"], root)
    if not commit:
        return {"branch": "unknown", "commit": "unknown", "dirty": "unknown", "message": ""}
    return {"branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root),
            "commit": commit,
            "dirty": bool(_run(["git", "status", "--porcelain"], root)),
            "message": _run(["git", "log", "-1", "--format=%s"], root)}


def get_gpu_info() -> list[dict]:
    """[{name, vram_gib}] for each visible CUDA device (empty without CUDA)."""
    import torch
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "vram_gib": props.total_memory / 1024 ** 3})
    return gpus


def estimate_hourly_cost(gpus: list[dict]) -> float | None:
    """USD per hour for these GPUs, or None for an unknown GPU or none at all."""
    if not gpus:
        return None
    for key, price in GPU_HOURLY_USD:
        if key in gpus[0]["name"]:
            return price * len(gpus)
    return None


def get_code_size() -> dict:
    """Files, lines and characters of the repo's tracked source (git ls-files)."""
    root = _repo_root()
    listed = _run(["git", "ls-files"], root).splitlines()
    files = lines = chars = 0
    for name in listed:
        path = os.path.join(root, name)
        if not name.endswith(SOURCE_SUFFIXES) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        files += 1
        lines += text.count("\n")
        chars += len(text)
    return {"files": files, "lines": lines, "chars": chars}


def generate_header() -> str:
    import psutil
    import torch
    git = get_git_info()
    gpus = get_gpu_info()
    code = get_code_size()
    hourly = estimate_hourly_cost(gpus)
    out = ["# nanochat training report", "", f"Run started: {_now()}", "",
           "## Environment", "",
           f"- Git branch: {git['branch']}", f"- Git commit: {git['commit']}",
           f"- Git dirty: {git['dirty']}", f"- Git message: {git['message']}",
           f"- Host: {socket.gethostname()}", f"- Platform: {platform.platform()}",
           f"- CPUs: {psutil.cpu_count(logical=False)} cores, {psutil.cpu_count(logical=True)} threads",
           f"- RAM: {psutil.virtual_memory().total / 1024 ** 3:.1f} GiB"]
    if gpus:
        out += [f"- GPUs: {len(gpus)} x {gpus[0]['name']}",
                f"- VRAM per GPU: {gpus[0]['vram_gib']:.1f} GiB",
                f"- CUDA: {torch.version.cuda}"]
    else:
        out += ["- GPUs: none", "- CUDA: not available"]
    out += [f"- Python: {platform.python_version()}", f"- PyTorch: {torch.__version__}",
            f"- Code size: {code['files']:,} files, {code['lines']:,} lines, {code['chars']:,} chars",
            "- Hourly cost estimate: " + (f"${hourly:.2f}/h" if hourly is not None else "unknown"), ""]
    return "\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# Reading sections back


def _parse_metrics(text: str) -> dict[str, float]:
    """'- key: value' lines whose value is a number (commas allowed) -> {key: float}."""
    metrics = {}
    for line in text.splitlines():
        m = re.match(r"^- (.+?): (.+)$", line.strip())
        if m:
            try:
                metrics[m.group(1)] = float(m.group(2).replace(",", ""))
            except ValueError:
                pass
    return metrics


def _parse_time(text: str, prefix: str) -> datetime.datetime | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return datetime.datetime.strptime(line[len(prefix):].strip(), TIME_FORMAT)
            except ValueError:
                return None
    return None


def _format_duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def summary_table(metrics_by_section: dict[str, dict[str, float]]) -> str:
    """The markdown table rows x columns, "-" where nothing was logged."""
    out = ["| Metric | " + " | ".join(SUMMARY_COLUMNS) + " |", "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for row in SUMMARY_ROWS:
        cells = []
        for sections in SUMMARY_COLUMNS.values():
            value = next((metrics_by_section[s][row] for s in sections
                          if row in metrics_by_section.get(s, {})), None)
            cells.append("-" if value is None else f"{value:.4f}")
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_training_curve(history_path: str, png_path: str) -> bool:
    """train_loss and val_bpb (or, masked diffusion, val_bpb_bound) vs step from a history JSONL
    into a PNG; False if nothing to plot."""
    rows = {}
    with open(history_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            if isinstance(row, dict) and "step" in row:
                rows.setdefault(row["step"], {}).update(row)  # a later row for the same step wins
    series = {key: sorted((s, r[key]) for s, r in rows.items() if r.get(key) is not None)
              for key in ("train_loss", "val_bpb", "val_bpb_bound")}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title({"train_loss": "train loss (nats)", "val_bpb": "val bits per byte",
                      "val_bpb_bound": "val bits per byte, upper bound (ELBO)"}[key])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# The report


class Report:
    """Section files under `report_dir`. Used on rank 0 only (see get_report). The folder is made on
    the first write, so a stage that stops early leaves nothing behind."""

    def __init__(self, report_dir: str):
        self.report_dir = report_dir

    def _dir(self) -> str:
        os.makedirs(self.report_dir, exist_ok=True)
        return self.report_dir

    def log(self, section: str, data: list) -> str:
        """Write (overwrite) this stage's section; returns its path."""
        out = [f"## {section}", f"timestamp: {_now()}", ""]
        for item in data:
            if isinstance(item, dict):
                for k, v in item.items():
                    if isinstance(v, str) and ("\n" in v or k.startswith("sample")):
                        out += [f"- {k}:", *_fenced(v)]  # model text keeps its layout
                    else:
                        out.append(f"- {k}: {_format_value(v)}")
            else:
                out.append(str(item))
            out.append("")
        path = os.path.join(self._dir(), f"{slugify(section)}.md")
        _write_atomic(path, "\n".join(out))
        return path

    def log_history(self, row: dict, name: str = "base_train") -> None:
        """Append one row (must include "step") to report/<name>_history.jsonl."""
        assert "step" in row, "a history row needs a 'step'"
        with open(os.path.join(self._dir(), f"{name}_history.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def reset(self) -> str:
        """Delete the previous run's sections, history and report; write a fresh header."""
        for name in os.listdir(self._dir()):
            if name.endswith((".md", ".jsonl", ".png")):
                os.remove(os.path.join(self.report_dir, name))
        path = os.path.join(self.report_dir, "header.md")
        _write_atomic(path, generate_header())
        return path

    def _section_files(self) -> list[str]:
        names = os.listdir(self.report_dir) if os.path.isdir(self.report_dir) else []
        present = {n[:-3] for n in names if n.endswith(".md")} - {"header", "report"}
        known = [slugify(s) for s in SECTION_ORDER]
        return [s for s in known if s in present] + sorted(present - set(known))

    def generate(self, cwd_copy: bool = True) -> str:
        """Write report/report.md (and ./report.md); returns the path of the former."""
        header_path = os.path.join(self.report_dir, "header.md")
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        else:
            header = "# nanochat training report\n\n(no header: run `python -m nanochat.report reset` first)\n"
        start = _parse_time(header, "Run started:")
        hourly = re.search(r"Hourly cost estimate: \$([0-9.]+)/h", header)

        sections, metrics, last_time = [], {}, None
        titles = {slugify(s): s for s in SECTION_ORDER}
        for slug in self._section_files():
            try:
                with open(os.path.join(self.report_dir, f"{slug}.md"), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                text = f"## {slug}\n(could not read this section: {e})\n"
            sections.append(text.rstrip() + "\n")
            metrics[titles.get(slug, slug)] = _parse_metrics(text)
            t = _parse_time(text, "timestamp:")
            if t is not None and (last_time is None or t > last_time):
                last_time = t

        summary = ["## Summary", "", summary_table(metrics), ""]
        if start is not None and last_time is not None:
            seconds = (last_time - start).total_seconds()
            summary.append(f"Total wall clock time: {_format_duration(seconds)}")
            if hourly:
                summary.append(f"Estimated cost: ${float(hourly.group(1)) * seconds / 3600:.2f}")
        else:
            summary.append("Total wall clock time: unknown")
        summary.append("")

        png_path = os.path.join(self.report_dir, "training_curve.png")
        history = os.path.join(self.report_dir, "base_train_history.jsonl")
        has_plot = os.path.exists(history) and plot_training_curve(history, png_path)

        def assemble(png_ref: str) -> str:  # the image link is relative to where report.md lands
            plot = [f"![training curve]({png_ref})", ""] if has_plot else []
            return header.rstrip() + "\n\n" + "\n".join(summary + plot) + "\n" + "\n".join(sections)

        report_path = os.path.join(self._dir(), "report.md")
        _write_atomic(report_path, assemble("training_curve.png"))
        if cwd_copy:
            cwd_path = os.path.abspath("report.md")
            if cwd_path != report_path:
                _write_atomic(cwd_path, assemble(os.path.relpath(png_path)))
        return report_path


class DummyReport:
    """What non-zero ranks get: every call is a no-op."""

    def log(self, *args, **kwargs):
        pass

    def log_history(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report() -> Report | DummyReport:
    """The report under <base>/report on rank 0, a no-op elsewhere."""
    if get_dist_info()[1] == 0:
        return Report(os.path.join(base_dir_path(), "report"))
    return DummyReport()


if __name__ == "__main__":
    commands = {"reset", "generate"}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m nanochat.report reset|generate")
    report = get_report()
    if sys.argv[1] == "reset":
        print(f"report reset: header written to {report.reset()}")
    elif not report._section_files():
        sys.exit(f"report generate: nothing to report: no stage has written a section to {report.report_dir} "
                 f"yet (run the pipeline, e.g. `bash speedrun.sh`, or a stage such as scripts.base_train)")
    else:
        path = report.generate()
        print(f"report written to {path} and copied to {os.path.abspath('report.md')}")
