"""
Reinforcement learning on GSM8K: sample answers from the SFT model, reward the correct ones, and
push up the log-probability of tokens in better-than-average answers (REINFORCE with a mean
baseline, fully on-policy, no KL penalty, no trust region: a simplified GRPO).

Run:
    python -m scripts.chat_rl                                      # one GPU, from the sft checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl
    python -m scripts.chat_rl --device_type=cpu --num_iterations=4 --examples_per_step=2 \\
        --num_samples=4 --device_batch_size=4 --max_new_tokens=32 --eval_every=2 --eval_examples=8   # CPU
    python -m scripts.chat_rl --resume_from_step=latest             # after SIGTERM / Ctrl-C (saves, exits 0)

Each step takes examples_per_step GSM8K train problems (spread over the ranks; step s uses problems
s·examples_per_step ... in order, so a resumed run sees the same problems). For each problem:
- sample num_samples answers with the Engine (max_new_tokens, temperature, top_k), device_batch_size
  at a time, calculator tool use included;
- reward = task.reward: 1 if the number after '####' matches the reference, else 0;
- advantage = reward − mean reward of that problem's samples;
- objective = Σ log p(token) · advantage over the tokens the model sampled (the prompt and the
  calculator's forced output have mask 0 and contribute nothing), divided by the number of such
  tokens; the loss is −objective, averaged over the problems (and ranks).
The LR is base LR · --init_lr_frac (0.05), linear to zero; Muon's momentum stays 0.95 and there is
no gradient clipping unless --grad_clip > 0 (as the reference); the update is nanochat.optim.step. Every --eval_every steps and at the end:
pass@k for k = 1..device_batch_size on the first --eval_examples GSM8K test problems.
Checkpoints (every --save_every steps and at the end) go to <base>/chatrl_checkpoints/<model_tag>/.
"""


import torch

from nanochat import optim
from nanochat.chat_evaluation import (all_reduce_sum, collate_masked, generative_outcomes, pass_at_k,
                                      policy_gradient_objective, sample_completions)
from nanochat.checkpoint_manager import StageSaver, load_start_model
from nanochat.common import compute_cleanup, compute_init, get_wandb, print0
from nanochat.engine import Engine
from nanochat.flags import FlagError, parse_flags, print_flags
from nanochat.progress import TrainProgress
from nanochat.report import get_report
from tasks.gsm8k import GSM8K

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    run="dummy",  # wandb run name; "dummy" = no wandb
    device_type="",  # cuda | mps | cpu; empty = autodetect
    source="sft",  # sft | mid: the checkpoint to start from; its tag is also the output tag
    model_tag="",  # default: the largest model of the source stage
    step=-1,  # source checkpoint step; -1 = the latest
    # sampling
    device_batch_size=8,  # samples per generation pass and per fwd/bwd
    examples_per_step=16,  # problems per optimiser step, over all ranks
    num_samples=16,  # answers sampled per problem
    max_new_tokens=256,
    temperature=1.0,
    top_k=50,
    compile_decode=-1,  # -1: compile the sampler's decode step on CUDA (CUDA graphs), 0: eager, 1: on
    # optimisation
    num_epochs=1,
    num_iterations=-1,  # -1 = num_epochs passes over GSM8K train
    **optim.FLAGS,  # embedding_lr, unembedding_lr, matrix_lr, weight_decay
    grad_clip=0.0,  # 0 = no clipping (the reference clips only in base_train)
    init_lr_frac=0.05,
    # evaluation and checkpoints
    eval_every=60,
    eval_examples=400,
    save_every=60,
    resume_from_step=-1,
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
user_config = vars(cfg).copy()
if cfg.source not in ("sft", "mid"):
    raise FlagError(f"--source must be sft or mid (got {cfg.source!r})")
if cfg.num_samples % cfg.device_batch_size != 0:
    raise FlagError(f"--num_samples={cfg.num_samples} must be a multiple of --device_batch_size={cfg.device_batch_size}")

# -----------------------------------------------------------------------------
# Compute, logging

compute = compute_init(cfg.device_type)
device, master = compute.device, compute.master_process
print_flags(cfg, DEFAULTS)
if cfg.examples_per_step % compute.world_size != 0:
    raise FlagError(f"--examples_per_step={cfg.examples_per_step} must be a multiple of the world size "
                    f"{compute.world_size}")
examples_per_rank = cfg.examples_per_step // compute.world_size
wandb_run = get_wandb(cfg.run, project="nanochat-rl", config=user_config, master_process=master)
report = get_report()

# -----------------------------------------------------------------------------
# Model: the sft checkpoint, or our own when resuming

start = load_start_model("rl", cfg.source, compute, cfg.model_tag, cfg.step, cfg.resume_from_step)  # stops if none
model, tokenizer, model_config = start.model, start.tokenizer, start.meta["model_config"]
engine = Engine(model, tokenizer, compile_decode=None if cfg.compile_decode < 0 else bool(cfg.compile_decode))
print0(f"model: {start.source['source']} {start.source['model_tag']} step {start.source['step']}, {model_config}")

# -----------------------------------------------------------------------------
# Optimisers: every LR scaled by init_lr_frac

optimizers = optim.build(model, cfg, lr_scale=cfg.init_lr_frac, states=start.optimizer_data)
start.optimizer_data = None  # loaded into the optimisers: free it

# -----------------------------------------------------------------------------
# Data and horizon

train_task = GSM8K("train")
val_task = GSM8K("test")
if cfg.num_iterations > 0:
    num_iterations = cfg.num_iterations
else:
    num_iterations = len(train_task) // cfg.examples_per_step * cfg.num_epochs
    if num_iterations < 1:
        raise FlagError(f"GSM8K train has {len(train_task)} problems: fewer than --examples_per_step")
pad_id = tokenizer.get_bos_token_id()  # any id: padded positions have target -1
passes = cfg.num_samples // cfg.device_batch_size
print0(f"{num_iterations} steps of {cfg.examples_per_step} problems x {cfg.num_samples} samples "
       f"({examples_per_rank} problems per rank, {passes} pass(es) of {cfg.device_batch_size} samples each)")


def rollout(step: int, index: int):
    """Sample num_samples answers to train problem `index` (in eval mode, no gradients): returns
    (list of (ids, mask) rows, rewards (num_samples,), number of sampled tokens)."""
    conversation = train_task[index]
    rows, rewards = [], []
    model.eval()
    for p in range(passes):
        seed = (step * len(train_task) + index) * passes + p  # distinct for every pass of every step
        with compute.autocast():
            _, sequences, masks, texts = sample_completions(engine, tokenizer, conversation, cfg.device_batch_size,
                                                            cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                                                            seed)
        rows += list(zip(sequences, masks))
        rewards += [train_task.reward(conversation, text) for text in texts]
    model.train()
    num_sampled = sum(sum(mask[1:]) for _, mask in rows)
    return rows, torch.tensor(rewards, dtype=torch.float32, device=device), num_sampled


def evaluate_pass_at_k() -> dict:
    model.eval()
    with compute.autocast():
        outcomes = generative_outcomes(val_task, engine, tokenizer, num_samples=cfg.device_batch_size,
                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_k=cfg.top_k or None, max_problems=cfg.eval_examples, name="GSM8K test")
    model.train()
    return {f"pass@{k}": pass_at_k(outcomes, k, device) for k in range(1, cfg.device_batch_size + 1)}


# -----------------------------------------------------------------------------
# Training loop: step counts optimiser updates done so far

step, loop_state = start.step, start.loop_state
passk = loop_state.get("passk", {})
progress_line = TrainProgress(compute, num_iterations, model.estimate_flops(), first_step=step, state=loop_state,
                              ema_beta=0.0)  # the step's own numbers, as the reference prints them
saver = StageSaver("scripts.chat_rl", compute, start.checkpoint_dir, cfg.save_every, start.resumed_step, wandb_run)
while True:
    last_step = step == num_iterations
    stop = saver.should_stop(last_step)  # SIGTERM / Ctrl-C on any rank: no evaluations, save, exit 0

    if not stop and (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
        passk = evaluate_pass_at_k()
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in passk.items()))
        wandb_run.log({"step": step, **{f"val/{k}": v for k, v in passk.items()}})

    saver.save_if_due(step, last_step, stop, model, optimizers, lambda: dict(  # the meta, built to save
        model_config=model_config, user_config=user_config, start_source=start.source, passk=passk,
        loop_state=dict(passk=passk, **progress_line.state())))
    if last_step:
        break

    # one optimiser step: examples_per_rank problems on this rank, num_samples answers each
    progress_line.start_step()
    reward_sum, sample_count, token_count, train_loss = 0.0, 0, 0, 0.0
    for k in range(examples_per_rank):
        index = (step * cfg.examples_per_step + compute.rank + k * compute.world_size) % len(train_task)
        rows, rewards, num_sampled = rollout(step, index)
        advantages = rewards - rewards.mean()  # (num_samples,)
        normaliser = max(num_sampled, 1) * examples_per_rank  # per-token mean, then mean over problems
        for b0 in range(0, cfg.num_samples, cfg.device_batch_size):
            b1 = b0 + cfg.device_batch_size
            inputs, targets = collate_masked(rows[b0:b1], pad_id, device)  # (B, T), -1 off the sampled tokens
            with compute.autocast():
                objective, _ = policy_gradient_objective(model, inputs, targets, advantages[b0:b1])
            loss = -objective / normaliser
            loss.backward()
            train_loss += loss.detach()
        reward_sum += rewards.sum().item()
        sample_count += len(rows)
        token_count += sum(len(ids) for ids, _ in rows)
    lrm = optim.lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)
    optim.step(optimizers, lrm, grad_clip=cfg.grad_clip)  # Muon's momentum stays 0.95, as in the reference
    reward_sum, sample_count, token_count, train_loss = all_reduce_sum(  # the loss: the mean over ranks
        [reward_sum, sample_count, token_count, float(train_loss) / compute.world_size], device)
    step += 1
    mean_reward, mean_length = reward_sum / sample_count, token_count / sample_count
    step_metrics = progress_line.update(step, train_loss, lrm, int(token_count),
                                        extra={"reward": mean_reward, "sequence_length": mean_length})
    wandb_run.log({"step": step, **{f"train/{k}": v for k, v in step_metrics.items()}})

# -----------------------------------------------------------------------------
# Report, cleanup

report.log(section="Chat RL", data=[
    user_config,
    {"start model": f"{start.source['source']} {start.source['model_tag']} step {start.source['step']}",
     "iterations": num_iterations, "DDP world size": compute.world_size},
    {f"GSM8K test {k}": v for k, v in passk.items()},
])
wandb_run.finish()
compute_cleanup()
