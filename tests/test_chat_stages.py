"""
Tests of the chat stages: nanochat/chat_evaluation.py and scripts mid_train, chat_sft, chat_rl,
chat_eval.

- Library pieces, in-process: ChatCORE; categorical evaluation with stand-in models that put the
  highest letter logit on the gold letter (accuracy 1.0) or on a wrong one (0.0), with distractors
  at other positions and on non-letter tokens, over the real ARC and MMLU test sets; generative
  evaluation and pass@k with a scripted model whose second sample is right; the masked batches and
  the RL objective (prompt and calculator-output tokens get exactly zero gradient; the objective
  equals a hand computation on the real GPT).
- The scripts, as real subprocesses on the CPU, in a temporary base dir holding the session's tiny
  tokenizer and a tiny random GPT (depth 2) saved as the base checkpoint, with NANOCHAT_DATA_DIR
  pointing at a few rows of each data set of the CPU sample (so that one midtraining epoch is ~15 steps):
  mid_train -> chat_sft -> chat_rl -> chat_eval, each checkpoint and the report sections checked;
  the LR multiplier mid_train logs decays monotonically over the last 20% of the epoch; a resumed
  mid_train ends with the same weights as a straight run; chat_eval on 2 gloo ranks gives the same
  numbers as on 1; missing checkpoints name the stage that produces them.
"""

import gzip
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, copy_checkpoint
from nanochat.chat_evaluation import (BASELINES, chatcore, collate_masked, generative_outcomes, pass_at_k,
                                      policy_gradient_objective, run_categorical_eval)
from nanochat.engine import Engine

SEQ_LEN = 128


# -----------------------------------------------------------------------------
# Fixtures: a few rows of each data set, a tiny base checkpoint


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory, sample_data):
    """A data dir in the layout of dev/cpu_sample with the first few rows of each of its files."""
    root = tmp_path_factory.mktemp("mini_data")

    def head(src, dst, n):
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        with open(sample_data / src) as f:
            lines = [line for line in f if line.strip()][:n]
        (root / dst).write_text("".join(lines))

    head("chat/self_instruct_seed_tasks.messages.jsonl", "chat/seed.messages.jsonl", 21)  # 19 train, 2 test
    for split in ("dev", "validation", "test"):
        head(f"mmlu/{split}.jsonl", f"mmlu/{split}.jsonl", 6)
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "test"):
            head(f"arc/{subset}/{split}.jsonl", f"arc/{subset}/{split}.jsonl", 6)
    head("gsm8k/train.jsonl", "gsm8k/train.jsonl", 8)
    head("gsm8k/test.jsonl", "gsm8k/test.jsonl", 4)
    (root / "humaneval").mkdir()
    with gzip.open(sample_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        rows = f.readlines()[:3]
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write("".join(rows))
    (root / "words").mkdir()  # the spelling tasks' word list
    (root / "words" / "words.txt").write_text((REPO_ROOT / "dev" / "cpu_sample" / "words" / "words.txt").read_text())
    return root


def tiny_gpt(vocab_size, sequence_len=SEQ_LEN, seed=0):
    """A random GPT of depth 2, 64 wide."""
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=1, n_kv_head=1, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():  # the output projections start at zero: give the blocks something to do
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


@pytest.fixture
def chat_base(base_dir_with_tokenizer, tiny_tokenizer, mini_data, monkeypatch):
    """The base dir with the tiny tokenizer and a random depth-2 GPT saved as base checkpoint d2/0."""
    from nanochat.checkpoint_manager import save_checkpoint
    model = tiny_gpt(tiny_tokenizer.get_vocab_size())
    save_checkpoint(str(base_dir_with_tokenizer / "base_checkpoints" / "d2"), 0, model.state_dict(), None,
                    dict(model_config=asdict(model.config), user_config={"depth": 2}))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(mini_data))
    identity = [[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm nanochat."}]] * 2
    (base_dir_with_tokenizer / "identity_conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in identity))
    return base_dir_with_tokenizer


def run(module, *args, torchrun=False, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
                else [sys.executable])
    out = subprocess.run([*launcher, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out


def report_metrics(base, section_slug):
    text = (base / "report" / f"{section_slug}.md").read_text()
    return {k: float(v) for k, v in re.findall(r"^- (.+?): (-?\d+(?:\.\d+)?)$", text, flags=re.M)}


# -----------------------------------------------------------------------------
# ChatCORE


def test_chatcore_formula():
    assert chatcore({"ARC-Easy": 0.25, "MMLU": 0.25}) == 0.0  # chance
    assert chatcore({name: 1.0 for name in BASELINES}) == 1.0
    assert chatcore({"ARC-Challenge": 0.5, "GSM8K": 0.1}) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.1) / 2)
    assert chatcore({"HumanEval": 0.0854}) == pytest.approx(0.0854)  # baseline 0: centred = accuracy
    assert chatcore({"MMLU": 0.0}) == pytest.approx(-1 / 3)  # below chance is negative
    with pytest.raises(ValueError, match="no baseline"):
        chatcore({"TriviaQA": 0.5})
    with pytest.raises(ValueError):
        chatcore({})


# -----------------------------------------------------------------------------
# Categorical evaluation with oracle stand-ins


class LetterOracle(torch.nn.Module):
    """Logits for (B, T) prompts right-padded with BOS: at each row's last prompt position the gold
    letter of that prompt gets `gold` and the other letters 1.0; a non-letter token gets 30 there
    (the eval must look at letters only), and at every other position a wrong letter gets 50 (the
    eval must look at the last prompt position, not at the padding)."""

    def __init__(self, tokenizer, task, n, gold):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(sequence_len=100_000)
        self.vocab_size, self.bos, self.gold = tokenizer.get_vocab_size(), tokenizer.get_bos_token_id(), gold
        self.non_letter = tokenizer.encode("The")[0]
        self.answers = {}  # prompt -> (gold id, other letter ids)
        for i in range(n):
            example = task.get_example(i)
            ids = {letter: tokenizer.encode(letter)[0] for letter in example["letters"]}
            gold_letter = example["messages"][-1]["content"]
            self.answers[tuple(tokenizer.render_for_completion(example))] = (
                ids[gold_letter], [v for k, v in ids.items() if k != gold_letter])

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for row in range(B):
            tokens = idx[row].tolist()
            while tokens[-1] == self.bos:
                tokens.pop()
            gold_id, others = self.answers[tuple(tokens)]
            logits[row, :, others[0]] = 50.0
            last = len(tokens) - 1
            logits[row, last] = 0.0
            logits[row, last, others] = 1.0
            logits[row, last, gold_id] = self.gold
            logits[row, last, self.non_letter] = 30.0
        return logits


@pytest.mark.parametrize("task_name", ["ARC-Easy", "ARC-Challenge", "MMLU"])
def test_categorical_eval_picks_the_letter_with_the_highest_logit(task_name, tiny_tokenizer, sample_data, monkeypatch):
    from nanochat.chat_evaluation import load_task
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(sample_data))
    task = load_task(task_name)
    n = 40
    oracle = LetterOracle(tiny_tokenizer, task, n, gold=10.0)
    assert run_categorical_eval(task, oracle, tiny_tokenizer, batch_size=7, max_problems=n) == 1.0
    wrong = LetterOracle(tiny_tokenizer, task, n, gold=-10.0)
    assert run_categorical_eval(task, wrong, tiny_tokenizer, batch_size=7, max_problems=n) == 0.0


@pytest.mark.slow
def test_categorical_eval_of_a_tiny_gpt_on_all_of_arc_easy(tiny_tokenizer, sample_data, monkeypatch):
    """A tiny model on all of the sample's 400 ARC-Easy test questions (of 2,376), quickly."""
    import time
    from nanochat.chat_evaluation import load_task
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(sample_data))
    task = load_task("ARC-Easy")
    assert task.num_examples() == 400
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=512)
    t0 = time.time()
    acc = run_categorical_eval(task, model, tiny_tokenizer, batch_size=32)
    elapsed = time.time() - t0
    print(f"ARC-Easy test, tiny random GPT: accuracy {acc:.4f} in {elapsed:.1f}s")
    assert 0.1 < acc < 0.45 and elapsed < 60  # near chance (0.25), in time


# -----------------------------------------------------------------------------
# Scripted stand-in: history kept in the KV cache, next token chosen by a script


class ScriptedModel(torch.nn.Module):
    """Logits that make `script(row, generated)` the next token; `generated` = the tokens the row
    was fed after its prompt, read back from the KV cache (token ids stored as keys)."""

    def __init__(self, vocab_size, script, prompt_len=None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(n_layer=1, sequence_len=100_000, n_head=1, n_kv_head=1, n_embd=1)
        self.vocab_size, self.script, self.prompt_len = vocab_size, script, prompt_len

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        history, _, mask = kv_cache.insert_kv(0, idx.float().view(B, 1, T, 1), idx.float().view(B, 1, T, 1))
        length = int(mask[-1].sum())  # positions cached so far (the cache is preallocated)
        logits = torch.full((B, T, self.vocab_size), -30.0)
        for row in range(B):
            logits[row, -1, self.script(row, history[row, 0, :length, 0].long().tolist())] = 30.0
        return logits


def test_generative_eval_passes_if_any_sample_passes(tiny_tokenizer, sample_data, monkeypatch):
    from tasks.gsm8k import GSM8K, extract_answer
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(sample_data))
    task = GSM8K("test")
    n = 6
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    replies = {}  # prompt -> (wrong reply tokens, right reply tokens)
    for i in range(n):
        example = task.get_example(i)
        gold = extract_answer("".join(p["text"] for p in example["messages"][-1]["content"] if p["type"] == "text"))
        replies[tuple(tiny_tokenizer.render_for_completion(example))] = (
            tiny_tokenizer.encode(f"So #### {int(gold) + 1}") + [end], tiny_tokenizer.encode(f"So #### {gold}") + [end])
    # problems 0, 2, 4: only sample 1 is right; problems 1, 3, 5: no sample is right
    def script(row, history):
        for prompt, (wrong, right) in replies.items():
            if tuple(history[:len(prompt)]) == prompt:
                generated = history[len(prompt):]
                problem = list(replies).index(prompt)
                reply = right if (row == 1 and problem % 2 == 0) else wrong
                return reply[len(generated)]
        raise AssertionError("unknown prompt")

    engine = Engine(ScriptedModel(tiny_tokenizer.get_vocab_size(), script), tiny_tokenizer)
    outcomes = generative_outcomes(task, engine, tiny_tokenizer, num_samples=3, max_new_tokens=30, temperature=1.0,
                                   max_problems=n)
    assert outcomes == [[0, 1, 0], [0, 0, 0]] * 3
    assert pass_at_k(outcomes, 1, "cpu") == 0.0 and pass_at_k(outcomes, 2, "cpu") == 0.5
    assert pass_at_k(outcomes, 3, "cpu") == 0.5


# -----------------------------------------------------------------------------
# Masked batches and the RL objective


def test_collate_masked_targets_and_padding():
    rows = [([1, 2, 3, 4, 5], [0, 0, 1, 0, 1]), ([6, 7, 8], [0, 1, 1])]
    inputs, targets = collate_masked(rows, pad_id=0, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert targets.tolist() == [[-1, 3, -1, 5], [7, 8, -1, -1]]
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        collate_masked([([1], [0])], pad_id=0, device="cpu")


class TableModel(torch.nn.Module):
    """A free logit for every (row, position, token): the gradient of each position is visible on
    its own. Same loss interface as GPT: cross-entropy with ignore_index=-1."""

    def __init__(self, B, T, V):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(B, T, V))

    def forward(self, idx, targets, loss_reduction="mean"):
        B, T = idx.shape
        logits = self.table[:B, :T]
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss


def test_rl_objective_ignores_prompt_and_tool_output(tiny_tokenizer):
    tok = tiny_tokenizer
    special = tok.encode_special
    forced = [special("<|output_start|>")] + tok.encode("36") + [special("<|output_end|>")]
    Z = tok.encode("Z")[0]  # what the model "would" write where the calculator's output is forced
    intended = ([special("<|python_start|>")] + tok.encode("12*3") + [special("<|python_end|>")] + [Z] * len(forced)
                + tok.encode(" so #### 36") + [special("<|assistant_end|>")])
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 12*3?"},
                                                     {"role": "assistant", "content": ""}]})
    engine = Engine(ScriptedModel(tok.get_vocab_size(), lambda row, history: intended[len(history) - len(prompt)]), tok)
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=1.0)
    call = len(prompt) + intended.index(special("<|python_end|>")) + 1  # where the forced tokens start
    assert sequences[0][call:call + len(forced)] == forced and masks[0][call:call + len(forced)] == [0] * len(forced)

    inputs, targets = collate_masked(list(zip(sequences, masks)), pad_id=tok.get_bos_token_id(), device="cpu")
    T = inputs.size(1)
    sampled = [t for t in range(T) if t + 1 < len(masks[0]) and masks[0][t + 1] == 1]  # positions trained on
    assert sampled == [t for t in range(len(prompt) - 1, T) if not call - 1 <= t < call - 1 + len(forced)]
    assert (targets[0] >= 0).nonzero().view(-1).tolist() == sampled

    model = TableModel(2, T, tok.get_vocab_size())
    advantages = torch.tensor([1.0, -0.5])
    objective, num_valid = policy_gradient_objective(model, inputs, targets, advantages)
    assert num_valid == 2 * len(sampled)
    (-objective / num_valid).backward()
    grad_norm = model.table.grad.abs().sum(-1)  # (B, T)
    for t in range(T):
        assert (grad_norm[:, t] > 0).all() if t in sampled else (grad_norm[:, t] == 0).all(), t
    # zero advantage: no gradient at all
    model.table.grad = None
    objective, _ = policy_gradient_objective(model, inputs, targets, torch.zeros(2))
    objective.backward()
    assert model.table.grad.abs().sum() == 0


def test_rl_objective_equals_hand_computation_on_gpt():
    torch.manual_seed(1)
    model = tiny_gpt(vocab_size=64, sequence_len=32)
    rows = [(torch.randint(0, 64, (n,)).tolist(), [0] * 4 + torch.randint(0, 2, (n - 4,)).tolist()) for n in (12, 9, 15)]
    inputs, targets = collate_masked(rows, pad_id=0, device="cpu")
    advantages = torch.tensor([0.5, -1.0, 0.25])
    objective, num_valid = policy_gradient_objective(model, inputs, targets, advantages)
    logp = F.log_softmax(model(inputs), dim=-1)  # (B, T, V)
    expected = sum(advantages[b] * logp[b, t, targets[b, t]] for b in range(3) for t in range(inputs.size(1))
                   if targets[b, t] >= 0)
    assert num_valid == sum(sum(mask[1:]) for _, mask in rows)
    assert objective.item() == pytest.approx(expected.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# The scripts: errors


@pytest.mark.parametrize("module, args, producer", [
    pytest.param("scripts.mid_train", ["--device_type=cpu"], "scripts.base_train", marks=pytest.mark.slow),
    pytest.param("scripts.chat_sft", ["--device_type=cpu"], "scripts.mid_train", marks=pytest.mark.slow),
    pytest.param("scripts.chat_rl", ["--device_type=cpu"], "scripts.chat_sft", marks=pytest.mark.slow),
    ("scripts.chat_eval", ["-i", "rl", "--device_type=cpu"], "scripts.chat_rl"),
])
def test_missing_checkpoint_names_the_stage_that_writes_it(module, args, producer, base_dir_with_tokenizer):
    out = run(module, *args)
    assert out.returncode != 0
    assert f"python -m {producer}" in out.stderr, out.stderr[-2000:]


def test_bad_flags_are_clear_errors(base_dir_with_tokenizer):
    out = run("scripts.chat_eval", "-i", "sft", "-a", "ARC-Easy|Trivia")
    assert out.returncode == 2 and "unknown task(s) ['Trivia']" in out.stderr
    out = run("scripts.mid_train", "--mcq_data=everything")
    assert out.returncode == 1 and "--mcq_data must be" in out.stderr


# -----------------------------------------------------------------------------
# The scripts: the whole chat pipeline on tiny settings


def lrm_by_step(stdout):
    return [(int(s), float(p), float(lrm)) for s, p, lrm in
            re.findall(r"^step (\d+)/~?\d+ \(([\d.]+)%\) \| loss [\d.]+ \| lrm ([\d.]+)", stdout, flags=re.M)]


@pytest.mark.slow
def test_pipeline_mid_sft_rl_eval(chat_base):
    base = chat_base
    mid = run("scripts.mid_train", "--device_type=cpu", f"--max_seq_len={SEQ_LEN}", "--device_batch_size=4",
              f"--total_batch_size={4 * SEQ_LEN * 2}", "--eval_every=5", f"--eval_tokens={4 * SEQ_LEN * 4}",
              "--spelling_scale=0.0001")  # 20 SimpleSpelling + 8 SpellingBee rows
    assert mid.returncode == 0, mid.stderr[-3000:]
    notes = [line for line in mid.stdout.splitlines() if "MMLU auxiliary_train is not available" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "!!!" not in mid.stdout  # one plain line
    steps = lrm_by_step(mid.stdout)
    last = steps[-1][0]
    assert 5 <= last <= 60 and steps[-1][1] == 100.0  # one epoch, then stop
    lrms = [lrm for _, _, lrm in steps]
    assert all(a >= b for a, b in zip(lrms, lrms[1:]))  # never rises
    assert lrms[0] == 1.0 and lrms[-1] < 0.5 and any(lrm < 1.0 for lrm in lrms)
    # the logged progress is after the step; its LR came from the progress before it: constant up
    # to 80% of the epoch, then (1 - progress) / 0.2
    progress_before = [0.0] + [p for _, p, _ in steps[:-1]]
    for p, lrm in zip(progress_before, lrms):
        if p < 79.99:
            assert lrm == 1.0, (p, lrm)
        elif p > 80.01:
            assert lrm == pytest.approx((100 - p) / 20, abs=2e-3), (p, lrm)
    meta = json.loads((base / "mid_checkpoints" / "d2" / f"meta_{last:06d}.json").read_text())
    assert meta["start_source"] == {"source": "base", "model_tag": "d2", "step": 0} and 0 < meta["val_bpb"] < 20
    assert meta["model_config"]["sequence_len"] == SEQ_LEN
    assert (base / "mid_checkpoints" / "d2" / f"optim_{last:06d}_rank0.pt").exists()
    assert report_metrics(base, "midtraining")["iterations"] == last

    sft = run("scripts.chat_sft", "--device_type=cpu", f"--max_seq_len={SEQ_LEN}", "--device_batch_size=2",
              "--target_examples_per_step=4", "--eval_every=3", "--eval_steps=2", "--eval_metrics_every=4",
              "--eval_metrics_max_problems=4", "--spelling_scale=0.01")
    assert sft.returncode == 0, sft.stderr[-3000:]
    # ARC-Easy/Challenge train, GSM8K train, SmolTalk train (stand-in), the 2 identity conversations
    # of the base dir, 3 SimpleSpelling + 3 SpellingBee
    num_steps = (12 + 8 + 19 + 2 + 3 + 3) // 4
    sft_meta = json.loads((base / "chatsft_checkpoints" / "d2" / f"meta_{num_steps:06d}.json").read_text())
    assert sft_meta["start_source"] == {"source": "mid", "model_tag": "d2", "step": last}
    assert set(sft_meta["metrics"]) == {"MMLU", "ARC-Easy"} and 0 < sft_meta["val_loss"] < 20
    # the progress line every stage prints (nanochat/progress.py), with SFT's trained-token count
    assert re.search(rf"step {num_steps:05d}/{num_steps:05d} \(100\.00%\) \| loss [\d.]+ \| lrm 0\.\d+ \| "
                     rf"dt .* \| eta [\d.]+m \| num_tokens [\d,]+", sft.stdout)

    rl = run("scripts.chat_rl", "--device_type=cpu", "--num_iterations=2", "--examples_per_step=2",
             "--num_samples=4", "--device_batch_size=2", "--max_new_tokens=16", "--eval_every=2", "--eval_examples=3")
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert len(re.findall(r"^step 0000[12]/00002 \(\d+\.00%\) \| loss -?[\d.]+ \| lrm .* \| reward [\d.]+ \| "
                          r"sequence_length [\d.]+$", rl.stdout, re.M)) == 2
    rl_meta = json.loads((base / "chatrl_checkpoints" / "d2" / "meta_000002.json").read_text())
    assert set(rl_meta["passk"]) == {"pass@1", "pass@2"} and rl_meta["start_source"]["source"] == "sft"

    for source in ("mid", "sft", "rl"):
        out = run("scripts.chat_eval", "-i", source, "-m", "16", "--device_type=cpu")
        assert out.returncode == 0, out.stderr[-3000:]
        metrics = report_metrics(base, f"chat-evaluation-{source}")
        accuracies = {name: metrics[name] for name in BASELINES}
        assert all(0.0 <= acc <= 1.0 for acc in accuracies.values())
        assert metrics["ChatCORE"] == pytest.approx(chatcore(accuracies), abs=1e-3)
        assert re.search(rf"^ChatCORE: {metrics['ChatCORE']:.4f}$", out.stdout, re.M)
        from nanochat.execution import isolation_level  # what the sandbox could use, said in both places
        assert f"HumanEval sandbox isolation: {isolation_level()}" in out.stdout
        section = (base / "report" / f"chat-evaluation-{source}.md").read_text()
        assert f"- HumanEval sandbox isolation: {isolation_level()}" in section
    # a partial run reports its ChatCORE under a name that says so
    out = run("scripts.chat_eval", "-i", "sft", "-a", "ARC-Easy|GSM8K", "-x", "2", "-m", "8", "--device_type=cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = report_metrics(base, "chat-evaluation-sft")
    assert "ChatCORE" not in metrics and "ChatCORE over ARC-Easy+GSM8K" in metrics


@pytest.mark.slow
def test_mid_train_resume_continues_the_same_trajectory(chat_base):
    flags = ["--device_type=cpu", f"--max_seq_len={SEQ_LEN}", "--device_batch_size=2",
             f"--total_batch_size={2 * SEQ_LEN * 2}", "--num_iterations=6", "--eval_every=-1",
             f"--eval_tokens={2 * SEQ_LEN * 2}"]
    straight = run("scripts.mid_train", *flags, "--save_every=3")
    assert straight.returncode == 0, straight.stderr[-3000:]
    root = chat_base / "mid_checkpoints"
    copy_checkpoint(root / "d2", root / "resumed", 3)
    resumed = run("scripts.mid_train", *flags, "--model_tag=resumed", "--resume_from_step=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 3" in resumed.stdout
    a = torch.load(root / "d2" / "model_000006.pt")
    b = torch.load(root / "resumed" / "model_000006.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    loss_lines = lambda out: re.findall(r"^step 0000[456] .*\| loss ([\d.]+)", out, re.M)  # noqa: E731
    assert loss_lines(straight.stdout) == loss_lines(resumed.stdout)


@pytest.mark.slow
def test_chat_eval_on_two_ranks_equals_one_rank(chat_base, tiny_tokenizer):
    from nanochat.checkpoint_manager import save_checkpoint
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=3)
    save_checkpoint(str(chat_base / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None,
                    dict(model_config=asdict(model.config), user_config={}))
    args = ["-i", "sft", "-m", "12", "-n", "2", "-t", "1.0", "-b", "4", "--device_type=cpu"]
    one = run("scripts.chat_eval", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    one_metrics = report_metrics(chat_base, "chat-evaluation-sft")
    two = run("scripts.chat_eval", *args, torchrun=True)
    assert two.returncode == 0, two.stderr[-3000:]
    two_metrics = report_metrics(chat_base, "chat-evaluation-sft")
    assert one_metrics == two_metrics and "ChatCORE" in two_metrics
