"""
CORE: the in-context-learning benchmark of the DCLM paper (Li et al. 2024, "DataComp-LM"), as a
single number for a base model. GPT-2 XL scores 0.2565; the d20 speedrun model about 0.22.

The tasks come from the eval bundle (nanochat/core_bundle.py: where it is, its files, how it is
checked); this module renders, tokenizes and scores their items.

How one item is scored (the conventions of the original nanochat / DCLM evaluation):
- few-shot examples: `random.Random(1234 + idx).sample` of the other items of the task, each
  rendered with its gold answer and followed by a blank line ("\n\n");
- multiple choice: one sequence per choice, `query + delimiter + choice`; schema: one per context
  option, `option + delimiter + continuation`; language modeling: `context + delimiter +
  continuation` (context stripped of surrounding whitespace, as the data carries stray spaces);
- every sequence starts with BOS. The scored span is what follows the tokens all choices share
  (multiple choice), what precedes the tokens all options share (schema), or what follows the
  prompt without the continuation (language modeling);
- no cropping to the training context, as in the reference (the rotary tables cover 10x it).
  Only a sequence longer than the model can run at all (`max_positions`) loses tokens on the
  left, and the task's output line counts those items (the reference would fail on them);
- multiple choice / schema: correct if the gold sequence has the lowest mean cross-entropy over its
  span (ties go to the lowest index); language modeling: correct if the greedy argmax predicts
  every continuation token.
Items are shuffled with `random.Random(1337)`, capped to `max_per_task`; rank r scores items
r, r + world_size, ...; per-item results are all-reduced. Centered accuracy = (acc - b) / (1 - b)
with b the random baseline; CORE = mean centered accuracy over the 22 tasks of core.yaml. Tasks
whose data file is missing, or left out by `tasks=`, are not scored (the missing ones are listed
in one line), and the mean of the others is labelled "CORE partial (k/22 tasks)" (`core_label`).
Several items are packed into one forward pass (`batch_size` sequences, right-padded); the model
is causal, so padding never changes a score.

    from nanochat.core_eval import evaluate_core
    out = evaluate_core(model, tokenizer, device, max_per_task=500)  # out["core_metric"]
"""

from __future__ import annotations

import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import get_dist_info, print0
from nanochat.core_bundle import BundleError, get_eval_bundle_dir, load_bundle, load_task_data, select_tasks
from nanochat.progress import EvalProgress

# -----------------------------------------------------------------------------
# Prompts: one string per sequence to score


def render_prompts_mc(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice: few-shot examples with their gold answers, then query + choice."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, all ending in the shared continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation, prompt with it]. The first is stripped so that its
    tokens are a prefix of the second's (a trailing space would merge into the next token)."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{prefix}{item['context'].strip()}{delimiter}"
    return [prompt.strip(), prompt + item["continuation"]]


# -----------------------------------------------------------------------------
# Tokens and the span to score in each sequence


def _common_length(seqs: list[list[int]], from_end: bool) -> int:
    """How many leading (or trailing) tokens all sequences share."""
    columns = zip(*(reversed(s) for s in seqs)) if from_end else zip(*seqs)  # stops at the shortest
    n = 0
    for column in columns:
        if len(set(column)) > 1:
            break
        n += 1
    return n


def tokenize_example(tokenizer, prompts: list[str], task_type: str) -> tuple[list[list[int]], list[int], list[int]]:
    """(token rows, span starts, span ends): row r is scored on tokens [start_r, end_r)."""
    tokens = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in prompts]  # a few short texts
    if task_type == "multiple_choice":
        start = _common_length(tokens, from_end=False)
        rows, starts, ends = tokens, [start] * len(tokens), [len(t) for t in tokens]
    elif task_type == "schema":
        suffix = _common_length(tokens, from_end=True)
        rows, starts, ends = tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    else:  # language_modeling: [without, with]; the continuation is what `with` adds
        without, with_ = tokens
        rows, starts, ends = [with_], [_common_length([without, with_], from_end=False)], [len(with_)]
    # A choice identical to (or a prefix of) another leaves an empty span: score its last token.
    starts = [max(1, min(s, e - 1)) for s, e in zip(starts, ends)]
    return rows, starts, ends


def max_positions(model) -> int | None:
    """The longest sequence `model` can run: its rotary table length (`rotary_seq_len`, 10x the
    training context in nanochat's GPT), else its `config.sequence_len`, else None (no limit)."""
    limit = getattr(model, "rotary_seq_len", None)
    return limit if limit is not None else getattr(getattr(model, "config", None), "sequence_len", None)


def crop_left(rows: list[list[int]], starts: list[int], ends: list[int], max_len: int | None):
    """Drop tokens on the left of rows longer than max_len, shifting their spans. A span that
    itself overflows keeps its last max_len - 1 tokens (position 0 has no prediction)."""
    if max_len is None:
        return rows, starts, ends
    out = ([], [], [])
    for row, s, e in zip(rows, starts, ends):
        crop = max(0, len(row) - max_len)
        out[0].append(row[crop:])
        out[1].append(max(1, s - crop))
        out[2].append(e - crop)
    return out


# -----------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def forward_spans(model, rows: list[list[int]], starts: list[int], ends: list[int], pad_id: int,
                  device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-pad the rows into one (B, T) batch and run the model once. For each row, over its span
    [start, end): (the cross-entropy of each span token given the tokens before it, the argmax
    prediction at the position before each span token). Only span positions get a softmax."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    idx = idx.to(device)
    logits = model(idx)  # (B, T, V)
    b_idx = [b for b, (s, e) in enumerate(zip(starts, ends)) for _ in range(s, e)]
    t_idx = [t for s, e in zip(starts, ends) for t in range(s - 1, e - 1)]  # position t predicts t + 1
    span_logits = logits[b_idx, t_idx].float()  # (N, V), N = total span length
    targets = idx[b_idx, [t + 1 for t in t_idx]]  # (N,)
    losses = F.cross_entropy(span_logits, targets, reduction="none").cpu()
    predictions = span_logits.argmax(dim=-1).cpu()
    sizes = [e - s for s, e in zip(starts, ends)]
    return list(zip(losses.split(sizes), predictions.split(sizes)))


def _judge(task_type: str, gold: int | None, rows, starts, ends, spans) -> bool:
    """Is this one item right, given (losses, predictions) over each row's span?"""
    if task_type == "language_modeling":
        (_, predictions), s, e = spans[0], starts[0], ends[0]
        return predictions.tolist() == rows[0][s:e]
    # float64 means: equal per-token losses give exactly equal means whatever the span length,
    # so a tie is a true tie and goes to the lowest index.
    mean_losses = [losses.double().mean().item() for losses, _ in spans]
    return mean_losses.index(min(mean_losses)) == gold


def prepare_item(idx: int, data: list[dict], tokenizer, task_meta: dict, max_len: int | None):
    """Render and tokenize item `idx` with its few-shot examples; (rows, starts, ends)."""
    item, task_type = data[idx], task_meta["task_type"]
    fewshot = []
    num_fewshot = min(task_meta["num_fewshot"], len(data) - 1)
    if num_fewshot > 0:
        # Same draw as rng.sample([i for i in range(len(data)) if i != idx], k), without building
        # that list for every item: sample positions among the others, then skip over idx.
        rng = random.Random(1234 + idx)
        fewshot = [data[j + (j >= idx)] for j in rng.sample(range(len(data) - 1), num_fewshot)]
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}[task_type]
    prompts = render(item, task_meta["continuation_delimiter"], fewshot)
    return crop_left(*tokenize_example(tokenizer, prompts, task_type), max_len)


def score_items(model, tokenizer, data: list[dict], indices: list[int], device, task_meta: dict,
                batch_size: int = 8, cropped: list[int] | None = None,
                progress: EvalProgress | None = None) -> list[bool]:
    """Correctness of data[i] for i in indices. Items are packed into forward passes of at most
    batch_size rows (an item with more choices than that gets a pass of its own). Items with a
    sequence longer than `max_positions(model)` are cropped on the left; their indices are
    appended to `cropped` if given. `progress` is told the number of items scored after every pass."""
    max_len = max_positions(model)
    pad_id = tokenizer.get_bos_token_id()
    results, pending = [], []  # pending: (idx, rows, starts, ends)

    def flush():
        spans = forward_spans(model, [r for p in pending for r in p[1]], [s for p in pending for s in p[2]],
                              [e for p in pending for e in p[3]], pad_id, device)
        offset = 0
        for idx, rows, starts, ends in pending:
            results.append(_judge(task_meta["task_type"], data[idx].get("gold"), rows, starts, ends,
                                  spans[offset:offset + len(rows)]))
            offset += len(rows)
        pending.clear()
        if progress is not None:
            progress.update(len(results))

    for idx in indices:
        rows, starts, ends = prepare_item(idx, data, tokenizer, task_meta, None)
        if max_len is not None and max(len(r) for r in rows) > max_len:
            rows, starts, ends = crop_left(rows, starts, ends, max_len)
            if cropped is not None:
                cropped.append(idx)
        if pending and sum(len(p[1]) for p in pending) + len(rows) > batch_size:
            flush()
        pending.append((idx, rows, starts, ends))
    if pending:
        flush()
    return results


def evaluate_task(model, tokenizer, data: list[dict], device, task_meta: dict, batch_size: int = 8,
                  stats: dict | None = None, name: str = "") -> float:
    """Accuracy on `data` (task_meta: task_type, num_fewshot, continuation_delimiter). Rank r
    scores items r, r + world_size, ...; the per-item results are summed over ranks. `stats`, if
    given, receives "cropped": the number of items (all ranks) cropped to fit the model."""
    _, rank, _, world_size = get_dist_info()
    indices = list(range(rank, len(data), world_size))
    per_item = torch.zeros(2, len(data), dtype=torch.float32, device=device)  # rows: correct, cropped
    cropped = []
    bar = EvalProgress(f"{name} (rank 0)" if world_size > 1 else name, len(indices))
    scored = score_items(model, tokenizer, data, indices, device, task_meta, batch_size, cropped, progress=bar)
    bar.close()
    for idx, ok in zip(indices, scored):
        per_item[0, idx] = float(ok)
    per_item[1, cropped] = 1.0
    if world_size > 1:
        dist.all_reduce(per_item, op=dist.ReduceOp.SUM)
    if stats is not None:
        stats["cropped"] = int(per_item[1].sum().item())
    return per_item[0].mean().item()


def core_label(out: dict) -> str:
    """"CORE" when every task of core.yaml was scored, else "CORE partial (k/N tasks)"."""
    k, n = len(out["results"]), out["num_tasks"]
    return "CORE" if k == n else f"CORE partial ({k}/{n} tasks)"


def evaluate_core(model, tokenizer, device, max_per_task: int = -1, bundle_dir: str | None = None,
                  batch_size: int = 8, tasks: list[str] | None = None) -> dict:
    """Score the bundle's tasks (`tasks`: some labels; None = all; max_per_task <= 0: all items) ->
    {"results", "centered_results", "num_examples", "seconds", "cropped": {label: ...}, "core_metric":
    mean centered over the scored tasks, "missing": [labels without data], "num_tasks": in core.yaml}."""
    all_tasks = load_bundle(bundle_dir or get_eval_bundle_dir())
    selected, missing = select_tasks(all_tasks, tasks)
    if missing:
        print0(f"CORE: {len(missing)} task(s) missing from the bundle, not scored: {', '.join(missing)}")
    if not selected:
        raise BundleError("no CORE task left to score: every selected task's data file is missing")
    out = {"results": {}, "centered_results": {}, "core_metric": 0.0, "num_examples": {}, "seconds": {},
           "cropped": {}, "missing": missing, "num_tasks": len(all_tasks)}
    limit = max_positions(model)
    for task in selected:
        t0 = time.time()
        data = load_task_data(task["dataset_path"], task["task_type"])
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        stats = {}
        accuracy = evaluate_task(model, tokenizer, data, device, task, batch_size, stats, name=task["label"])
        baseline = task["random_baseline"] / 100
        centered = (accuracy - baseline) / (1 - baseline)
        label = task["label"]
        out["results"][label], out["centered_results"][label] = accuracy, centered
        out["num_examples"][label], out["seconds"][label] = len(data), time.time() - t0
        out["cropped"][label] = stats["cropped"]
        crop_note = f" | {stats['cropped']} cropped to the model's {limit} positions (the reference would fail)"
        print0(f"{label:<36} {task['num_fewshot']:>2}-shot {task['task_type']:<17} accuracy {accuracy:.4f} | "
               f"centered {centered:+.4f} | {len(data)} items in {out['seconds'][label]:.1f}s"
               f"{crop_note if stats['cropped'] else ''}")
    out["core_metric"] = sum(out["centered_results"].values()) / len(selected)
    return out
