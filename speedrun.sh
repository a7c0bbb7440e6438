#!/usr/bin/env bash
# The nanochat speedrun: train a d20 (561M-parameter) ChatGPT-like model end to end on one 8×H100
# node in about 4 hours (about $100 at ~$24/h), then evaluate it and write report.md.
#
#   bash speedrun.sh                       # 8×H100 (or however many GPUs are visible)
#   WANDB_RUN=speedrun bash speedrun.sh    # also log to wandb (after `wandb login`)
#   RUN_RL=1 bash speedrun.sh              # add the optional RL stage on GSM8K
#   NPROC_PER_NODE=4 bash speedrun.sh      # use 4 GPUs (same result, ~2× longer)
#   bash speedrun.sh --dry-run             # print the GPU commands without running anything
#
# With no NVIDIA GPU it runs the tiny CPU preset instead (dev/runcpu.sh): every stage, offline, on
# the data sample shipped in dev/cpu_sample, in about 10 minutes on 2 idle cores.
#
# Stops at the first failing stage and says which. Safe to re-run: finished shard downloads and a
# tokenizer trained with the same settings are kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "speedrun.sh: unknown argument '$arg' (valid: --dry-run)" >&2; exit 2 ;;
  esac
done

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if [[ $DRY_RUN == 0 ]] && ! have_gpu; then
  exec bash dev/runcpu.sh
fi

# shellcheck source=dev/pipeline.sh
source dev/pipeline.sh  # stage / run_bg / wait_bg helpers (they honour DRY_RUN)
if [[ $DRY_RUN == 0 ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-8}
fi
WANDB_RUN=${WANDB_RUN:-dummy}
TORCHRUN=(torchrun --standalone "--nproc_per_node=$NPROC_PER_NODE")
export OMP_NUM_THREADS=1
banner "nanochat speedrun: d20 on $NPROC_PER_NODE GPU(s), wandb run '$WANDB_RUN'"

# ----------------------------------------------------------------------------- set-up and report
stage "set-up" bash dev/setup.sh
activate_venv
stage "report reset" python -m nanochat.report reset

# ----------------------------------------------------------------------------- tokenizer
# 8 shards (~2B chars) are enough for the tokenizer; the 240 that pretraining needs
# (d20: 20 tokens/param × 561M params ≈ 11.2B tokens ≈ 54B chars at ~4.8 chars/token, ~250M chars
# per shard) download in the background meanwhile.
stage "download 8 shards" python -m nanochat.dataset -n 8
run_bg shards python -m nanochat.dataset -n 240
stage "tokenizer training" python -m scripts.tok_train --max_chars=2000000000
stage "tokenizer evaluation" python -m scripts.tok_eval
wait_bg shards "download 240 shards"

# ----------------------------------------------------------------------------- base model
stage "base training" "${TORCHRUN[@]}" -m scripts.base_train -- --depth=20 "--run=$WANDB_RUN"
stage "base loss" "${TORCHRUN[@]}" -m scripts.base_loss
stage "base evaluation (CORE)" "${TORCHRUN[@]}" -m scripts.base_eval

# ----------------------------------------------------------------------------- midtraining
stage "midtraining" "${TORCHRUN[@]}" -m scripts.mid_train -- "--run=$WANDB_RUN"
stage "chat evaluation (mid)" "${TORCHRUN[@]}" -m scripts.chat_eval -i mid

# ----------------------------------------------------------------------------- supervised fine-tuning
stage "SFT" "${TORCHRUN[@]}" -m scripts.chat_sft -- "--run=$WANDB_RUN"
stage "chat evaluation (sft)" "${TORCHRUN[@]}" -m scripts.chat_eval -i sft

# ----------------------------------------------------------------------------- reinforcement learning (optional)
if [[ "${RUN_RL:-0}" == 1 ]]; then
  stage "RL" "${TORCHRUN[@]}" -m scripts.chat_rl -- "--run=$WANDB_RUN"
  stage "chat evaluation (rl)" "${TORCHRUN[@]}" -m scripts.chat_eval -i rl -a GSM8K
fi

# ----------------------------------------------------------------------------- report card
stage "report" python -m nanochat.report generate
banner "done: report.md is the report card; chat with 'python -m scripts.chat_web' (browser) or 'python -m scripts.chat_cli'"
