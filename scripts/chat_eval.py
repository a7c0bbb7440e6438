"""
Evaluate a chat model (mid, sft or rl checkpoint) on the chat tasks and compute ChatCORE.

Run:
    python -m scripts.chat_eval -i sft                               # every task, one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i mid
    python -m scripts.chat_eval -i rl -a GSM8K -n 8 -t 1.0           # pass@8 on GSM8K
    python -m scripts.chat_eval -i sft -a "ARC-Easy|MMLU" -x 200 --device_type=cpu   # a laptop CPU

Tasks (-a, separated by '|'; default all): ARC-Easy, ARC-Challenge, MMLU (categorical: one forward
pass, argmax over the answer letters' logits, batched by -b), GSM8K, HumanEval, SpellingBee (256
letter-counting questions, tasks/spellingbee.py) (generative: -n samples of up to -m tokens at
temperature -t with top-k -k; a problem passes if any sample does).
-x caps the problems per task, taken in the reference's item order (every data set shuffled with
seed 42, as Hugging Face datasets' shuffle(seed=42) does), so `-x 100` scores the reference's
first 100. Every problem is sampled with seed 42. Under torchrun each rank takes every
world_size-th problem.

HumanEval runs, by default, the reference's program: the prompt's imports plus the code extracted
from the completion (the model must write the whole function), so its numbers compare with the
published ones. --humaneval-assembly=official runs the OpenAI harness's prompt + completion
instead (a body-only completion then passes). The report section records which one was used.

ChatCORE = mean over tasks of (acc − baseline)/(1 − baseline), baseline 0.25 for the multiple
choice tasks and 0 for the generative ones. It goes into the report as "ChatCORE" only when all
six tasks ran (a -x cap is recorded in the same section); with -a it is printed (and logged) under
a name that says which tasks it covers, so the summary never mixes a subset with the full set.
Six is the reference's set since it added SpellingBee; the published d20 ChatCORE (0.0884)
predates that and averages the other five: -a "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval".
The report section is "Chat evaluation <source>" with one line per task (e.g. "- GSM8K: 0.0455").
"""

import argparse
import time

from nanochat.chat_evaluation import TASK_NAMES, chatcore, load_task, run_task
from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_cleanup, compute_init, print0
from nanochat.execution import isolation_level
from nanochat.engine import Engine
from nanochat.flags import StopRun
from nanochat.report import get_report

# -----------------------------------------------------------------------------
# Flags

parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval and SpellingBee")
parser.add_argument("-i", "--source", required=True, choices=["mid", "sft", "rl"], help="which checkpoint stage")
parser.add_argument("-a", "--task-name", default="|".join(TASK_NAMES), help="tasks separated by '|' (default: all)")
parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="generative tasks: tokens per sample")
parser.add_argument("-n", "--num-samples", type=int, default=1, help="generative tasks: samples per problem")
parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0 = off)")
parser.add_argument("-b", "--batch-size", type=int, default=8, help="categorical tasks: prompts per forward pass")
parser.add_argument("-x", "--max-problems", type=int, default=None, help="at most this many problems per task")
parser.add_argument("--humaneval-assembly", default="reference", choices=["reference", "official"],
                    help="HumanEval program: the reference's (prompt imports + extracted code, default) or the "
                         "official harness's (prompt + completion)")
parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--compile_decode", type=int, default=None, choices=[0, 1], help="1: compile the decode step (CUDA graphs), 0: eager; default: on for CUDA")
parser.add_argument("--device_type", "--device-type", default="", choices=["", "cuda", "mps", "cpu"],
                    help="empty = autodetect")
args = parser.parse_args()
task_names = [name.strip() for name in args.task_name.split("|") if name.strip()]
unknown = [name for name in task_names if name not in TASK_NAMES]
if unknown or not task_names:
    parser.error(f"-a: unknown task(s) {unknown or args.task_name!r}; choose from {'|'.join(TASK_NAMES)}")
if len(set(task_names)) != len(task_names):
    parser.error(f"-a: a task is listed twice in {args.task_name!r}")
for flag, value in (("-n", args.num_samples), ("-m", args.max_new_tokens), ("-b", args.batch_size)):
    if value < 1:
        parser.error(f"{flag} must be at least 1 (got {value})")
if args.max_problems is not None and args.max_problems < 1:
    parser.error(f"-x must be at least 1 (got {args.max_problems})")
if args.temperature < 0 or args.top_k < 0:
    parser.error("-t and -k must be >= 0")

# -----------------------------------------------------------------------------
# Compute and model

compute = compute_init(args.device_type)
try:
    model, tokenizer, meta = load_model(args.source, compute.device, phase="eval", model_tag=args.model_tag,
                                        step=args.step)
except FileNotFoundError as e:  # the message says which command writes the checkpoint
    raise StopRun(f"chat_eval: {e}") from None
model.to(compute.compute_dtype)  # bf16 weights on CUDA, cast once
engine = Engine(model, tokenizer, compile_decode=None if args.compile_decode is None else bool(args.compile_decode))
print0(f"evaluating the {args.source} model, step {meta['step']}, on {', '.join(task_names)}")

# -----------------------------------------------------------------------------
# Evaluate each task

results, seconds = {}, {}
for name in task_names:
    task = load_task(name, humaneval_assembly=args.humaneval_assembly)
    t0 = time.time()
    with compute.autocast():
        results[name] = run_task(name, task, model, tokenizer, engine, batch_size=args.batch_size,
                                 num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k or None,
                                 max_problems=args.max_problems)
    seconds[name] = time.time() - t0
    how = f", {args.humaneval_assembly} program assembly" if name == "HumanEval" else ""
    print0(f"{name} accuracy: {100 * results[name]:.2f}% ({seconds[name]:.1f}s{how})")
# What the code sandbox could use on this machine (kernel namespaces, a fresh uid, ...): a HumanEval
# number from a weaker sandbox is still a number, but the report card says so.
sandbox = isolation_level() if "HumanEval" in task_names else None
if sandbox is not None:
    print0(f"HumanEval sandbox isolation: {sandbox}")

# -----------------------------------------------------------------------------
# Table, ChatCORE, report

complete = set(task_names) == set(TASK_NAMES)
score = chatcore(results)
chatcore_key = "ChatCORE" if complete else f"ChatCORE over {'+'.join(task_names)}"
print0(f"\n{'task':<15} {'accuracy':>9} {'centered':>9} {'time (s)':>9}")
for name in task_names:
    print0(f"{name:<15} {results[name]:>9.4f} {chatcore({name: results[name]}):>9.4f} {seconds[name]:>9.1f}")
print0(f"{chatcore_key}: {score:.4f}")
get_report().log(section=f"Chat evaluation {args.source}", data=[
    vars(args),
    {"model step": meta["step"], **{name: round(acc, 4) for name, acc in results.items()}},
    {chatcore_key: round(score, 4)},
    *([{"HumanEval sandbox isolation": sandbox}] if sandbox is not None else []),
])
compute_cleanup()
