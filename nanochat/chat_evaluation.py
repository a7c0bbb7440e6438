"""
Running chat tasks on a model: categorical and generative evaluation, ChatCORE, and the two pieces
of chat training that share their code with evaluation (masked batches, the RL objective).

Used by scripts/chat_eval.py (every task), scripts/chat_sft.py (periodic MMLU/ARC accuracy and its
training batches) and scripts/chat_rl.py (rollouts, the policy-gradient objective, pass@k).

Design choices:
- Categorical tasks (ARC, MMLU) need no sampling: the prompt (the conversation up to
  `<|assistant_start|>`) goes through the model once, and the answer is the argmax, at the last
  prompt position, over the logits of the allowed letters only (`conversation["letters"]`). A small
  model that would rather say "The" still gets graded on which letter it prefers. Prompts are
  sorted by length and batched, right-padded (causal attention: padding after a row's last token
  cannot change it). As in the reference, prompts are never cropped to the training context
  (`sequence_len`): the rotary tables cover 10x it. Only a prompt longer than those tables, which
  the model cannot run at all, keeps its last tokens, and the output says how many did.
- Generative tasks (GSM8K, HumanEval, SpellingBee) sample `num_samples` completions with the Engine (KV cache,
  calculator tool use); a problem passes if any sample passes (`task.evaluate`). Every problem
  is sampled with seed 42, the reference's (its engine's default), so results do not depend on
  how problems are split over ranks.
- Under torchrun every rank takes problems rank, rank + world_size, ... and the counts are summed
  with all_reduce: every rank returns the same accuracy.
- ChatCORE (like CORE for base models) centres each accuracy on its chance level,
  (acc − baseline) / (1 − baseline), and averages: 0 = chance, 1 = perfect. Baselines: 0.25 for
  the 4-way multiple choice tasks, 0 for the open-ended ones.
- Chat training rows: `collate_masked` turns rendered (ids, mask) rows into (inputs, targets) with
  target −1 wherever the next token has mask 0 (user turns, tool outputs, the prompt) and in the
  padding. chat_sft uses it on rendered conversations, chat_rl on the Engine's samples (whose mask
  is 0 for the prompt and for the calculator's forced output): one rule, written once.

    from nanochat.chat_evaluation import load_task, run_task, chatcore
    acc = run_task("ARC-Easy", load_task("ARC-Easy"), model, tokenizer, engine, batch_size=8)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info, print0
from nanochat.core_eval import max_positions
from nanochat.progress import EvalProgress

# chance accuracy of each evaluation task: 4-way multiple choice, or open-ended generation
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
TASK_NAMES = list(BASELINES)


GENERATION_SEED = 42  # the seed of every problem's samples, as in the reference


def load_task(name: str, humaneval_assembly: str = "reference"):
    """The evaluation split of a chat task, by its report name (see TASK_NAMES). HumanEval
    assembles its programs as `humaneval_assembly` says (tasks/humaneval.py)."""
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    from tasks.spellingbee import SpellingBee
    constructors = {"ARC-Easy": lambda: ARC("ARC-Easy", "test"), "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
                    "MMLU": lambda: MMLU("all", "test"), "GSM8K": lambda: GSM8K("test"),
                    "HumanEval": lambda: HumanEval(assembly=humaneval_assembly),
                    "SpellingBee": lambda: SpellingBee(size=256, split="test")}  # the reference's 256
    if name not in constructors:
        raise ValueError(f"unknown chat eval task {name!r}; choose from {TASK_NAMES}")
    return constructors[name]()


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean over the given tasks of (acc − baseline) / (1 − baseline)."""
    if not accuracies:
        raise ValueError("ChatCORE needs at least one task's accuracy")
    unknown = set(accuracies) - set(BASELINES)
    if unknown:
        raise ValueError(f"no baseline for {sorted(unknown)}; known tasks: {TASK_NAMES}")
    centered = [(acc - BASELINES[name]) / (1.0 - BASELINES[name]) for name, acc in accuracies.items()]
    return sum(centered) / len(centered)


def all_reduce_sum(values: list[float], device: torch.device | str) -> list[float]:
    """Sum a few numbers over all ranks (returned as is without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _problem_indices(task, max_problems: int | None) -> tuple[range, int]:
    """This rank's problem indices and the number of problems over all ranks."""
    num_problems = task.num_examples() if max_problems is None else min(max_problems, task.num_examples())
    _, rank, _, world_size = get_dist_info()
    return range(rank, num_problems, world_size), num_problems


# -----------------------------------------------------------------------------
# Categorical evaluation: one forward pass, argmax over the allowed letters


@torch.no_grad()
def run_categorical_eval(task, model, tokenizer, batch_size: int = 8, max_problems: int | None = None,
                         name: str = "") -> float:
    """Accuracy of `model` on a categorical task (examples carry "letters"), all ranks together.
    Prompts are whole, as in the reference; only one longer than the model can take at all (its
    rotary tables, `model.rotary_seq_len`) keeps its last tokens, and the count is printed."""
    device = next(model.parameters()).device
    bos = tokenizer.get_bos_token_id()
    max_len = max_positions(model)
    letter_ids = {}  # letter -> its single token id

    def letter_id(letter: str) -> int:
        if letter not in letter_ids:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens with this tokenizer; categorical "
                                 f"evaluation needs one token per letter")
            letter_ids[letter] = ids[0]
        return letter_ids[letter]

    indices, num_problems = _problem_indices(task, max_problems)
    conversations = [task.get_example(i) for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    cropped = 0 if max_len is None else sum(len(p) > max_len for p in prompts)
    if cropped:
        prompts = [p[-max_len:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))  # similar lengths together: less padding
    correct, total = 0, 0
    bar = EvalProgress(name, len(order))
    for b0 in range(0, len(order), batch_size):
        batch = order[b0:b0 + batch_size]
        width = max(len(prompts[j]) for j in batch)
        ids = torch.tensor([prompts[j] + [bos] * (width - len(prompts[j])) for j in batch], dtype=torch.long,
                           device=device)  # (B, T)
        logits = model(ids)  # (B, T, V)
        for row, j in enumerate(batch):
            letters = conversations[j]["letters"]
            candidates = torch.tensor([letter_id(letter) for letter in letters], device=device)  # (L,)
            scores = logits[row, len(prompts[j]) - 1, candidates].float()  # (L,) at the last prompt position
            correct += task.evaluate(conversations[j], letters[int(scores.argmax())])
            total += 1
        bar.update(total, f"({100 * correct / total:.2f}% correct on rank 0)")
    bar.close()
    correct, total, cropped = all_reduce_sum([correct, total, cropped], device)
    assert total == num_problems, f"evaluated {total} of {num_problems} problems"
    if cropped:
        print0(f"{name}: {int(cropped)} prompt(s) longer than the {max_len} positions the model can take (its rotary "
               f"tables) kept their last {max_len} tokens; the reference would fail on them")
    return correct / total


# -----------------------------------------------------------------------------
# Generative evaluation: sample completions with the engine, pass if any sample passes


def sample_completions(engine, tokenizer, conversation: dict, num_samples: int, max_new_tokens: int,
                       temperature: float, top_k: int | None, seed: int
                       ) -> tuple[list[int], list[list[int]], list[list[int]], list[str]]:
    """(prompt ids, sequences, masks, completion texts) of `num_samples` samples of the
    conversation's last assistant reply. sequences/masks include the prompt (mask 0) and exclude
    the stop token; mask 0 also marks the calculator's forced output."""
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k, seed=seed)
    texts = [tokenizer.decode(seq[len(prompt):]) for seq in sequences]
    return prompt, sequences, masks, texts


def generative_outcomes(task, engine, tokenizer, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, max_problems: int | None = None,
                        name: str = "") -> list[list[int]]:
    """For this rank's problems, the 0/1 outcome of each sample (a list per problem)."""
    indices, _ = _problem_indices(task, max_problems)
    outcomes, passed = [], 0
    bar = EvalProgress(name, len(indices))
    for n, i in enumerate(indices, start=1):
        conversation = task.get_example(i)
        _, _, _, texts = sample_completions(engine, tokenizer, conversation, num_samples, max_new_tokens,
                                            temperature, top_k, seed=GENERATION_SEED)
        outcomes.append([task.evaluate(conversation, text) for text in texts])
        passed += any(outcomes[-1])
        bar.update(n, f"({100 * passed / n:.2f}% passed on rank 0)")
    bar.close()
    return outcomes


def pass_at_k(outcomes: list[list[int]], k: int, device: torch.device | str) -> float:
    """Fraction of problems (all ranks) where one of the first k samples passed."""
    passed, total = all_reduce_sum([sum(any(o[:k]) for o in outcomes), len(outcomes)], device)
    if total == 0:
        raise ValueError("pass@k over zero problems")
    return passed / total


def run_generative_eval(task, engine, tokenizer, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int | None = 50, max_problems: int | None = None,
                        name: str = "") -> float:
    """Fraction of problems (all ranks) where any of `num_samples` samples passes."""
    outcomes = generative_outcomes(task, engine, tokenizer, num_samples, max_new_tokens, temperature, top_k,
                                   max_problems, name)
    device = next(engine.model.parameters()).device
    return pass_at_k(outcomes, num_samples, device)


def run_task(name: str, task, model, tokenizer, engine, batch_size: int = 8, num_samples: int = 1,
             max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
             max_problems: int | None = None) -> float:
    """Accuracy on a task, categorical or generative according to `task.eval_type`."""
    if task.eval_type == "categorical":
        return run_categorical_eval(task, model, tokenizer, batch_size, max_problems, name)
    if task.eval_type == "generative":
        return run_generative_eval(task, engine, tokenizer, num_samples, max_new_tokens, temperature, top_k,
                                   max_problems, name)
    raise ValueError(f"task {name!r} has eval_type {task.eval_type!r}; expected 'categorical' or 'generative'")


# -----------------------------------------------------------------------------
# Chat training batches and the policy-gradient objective


def collate_masked(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (ids, mask) -> inputs (B, T) and targets (B, T), T = longest row − 1. Target t is
    ids[t + 1] where mask[t + 1] is 1, else −1 (not trained on); padding is pad_id / −1."""
    width = max(len(ids) for ids, _ in rows) - 1
    if width < 1:
        raise ValueError("every row has fewer than 2 tokens: nothing to predict")
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)  # (B, T)
    for row, (ids, mask) in enumerate(rows):
        assert len(ids) == len(mask), f"row {row}: {len(ids)} ids but {len(mask)} mask values"
        n = len(ids) - 1
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        inputs[row, :n] = ids_t[:-1]
        targets[row, :n] = torch.where(mask_t[1:] == 1, ids_t[1:], -1)
    return inputs.to(device), targets.to(device)


def policy_gradient_objective(model, inputs: torch.Tensor, targets: torch.Tensor,
                              advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p(target) · advantage over the targets that are not −1, number of such targets).
    inputs/targets (B, T) from collate_masked, advantages (B,). The log-probabilities come from the
    model's own cross-entropy: log p = −loss per position."""
    valid = targets >= 0  # (B, T) the sampled tokens
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)  # (B, T)
    logp = torch.where(valid, logp, 0.0)  # prompt, tool output and padding contribute nothing
    return (logp * advantages.unsqueeze(-1)).sum(), valid.sum()
