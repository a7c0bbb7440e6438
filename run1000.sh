#!/usr/bin/env bash
# The ~$1000 tier: a d32 (1.9B-parameter) model on one 8×H100 node, about 41 hours (≈ $1000 at
# ~$24/h). Same stages as speedrun.sh, larger model and more data; the per-GPU batch is smaller
# (8 sequences) so d32 fits in 80 GB, and gradient accumulation keeps the global batch.
#
#   bash run1000.sh                         # NPROC_PER_NODE, WANDB_RUN, RUN_RL as in speedrun.sh
#   bash run1000.sh --dry-run               # print the commands without running anything
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "run1000.sh: unknown argument '$arg' (valid: --dry-run)" >&2; exit 2 ;;
  esac
done
if [[ $DRY_RUN == 0 ]] && ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  echo "run1000.sh needs NVIDIA GPUs (8×H100 recommended). On a CPU, run 'bash speedrun.sh' for the tiny preset." >&2
  exit 1
fi

# shellcheck source=dev/pipeline.sh
source dev/pipeline.sh
if [[ $DRY_RUN == 0 ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-8}
fi
WANDB_RUN=${WANDB_RUN:-dummy}
TORCHRUN=(torchrun --standalone "--nproc_per_node=$NPROC_PER_NODE")
export OMP_NUM_THREADS=1
banner "nanochat run1000: d32 on $NPROC_PER_NODE GPU(s), wandb run '$WANDB_RUN'"

stage "set-up" bash dev/setup.sh
activate_venv
stage "report reset" python -m nanochat.report reset

# d32: 1.88B params × 20 tokens/param ≈ 37.6B tokens ≈ 180B chars ≈ 720 shards; 800 for margin.
stage "download 16 shards" python -m nanochat.dataset -n 16
run_bg shards python -m nanochat.dataset -n 800
stage "tokenizer training" python -m scripts.tok_train --max_chars=4000000000
stage "tokenizer evaluation" python -m scripts.tok_eval
wait_bg shards "download 800 shards"

stage "base training" "${TORCHRUN[@]}" -m scripts.base_train -- --depth=32 --device_batch_size=8 "--run=$WANDB_RUN"
stage "base loss" "${TORCHRUN[@]}" -m scripts.base_loss -- --device_batch_size=8
stage "base evaluation (CORE)" "${TORCHRUN[@]}" -m scripts.base_eval -- --device_batch_size=8

stage "midtraining" "${TORCHRUN[@]}" -m scripts.mid_train -- --device_batch_size=8 "--run=$WANDB_RUN"
stage "chat evaluation (mid)" "${TORCHRUN[@]}" -m scripts.chat_eval -i mid
stage "SFT" "${TORCHRUN[@]}" -m scripts.chat_sft -- "--run=$WANDB_RUN"
stage "chat evaluation (sft)" "${TORCHRUN[@]}" -m scripts.chat_eval -i sft
if [[ "${RUN_RL:-0}" == 1 ]]; then
  stage "RL" "${TORCHRUN[@]}" -m scripts.chat_rl -- "--run=$WANDB_RUN"
  stage "chat evaluation (rl)" "${TORCHRUN[@]}" -m scripts.chat_eval -i rl -a GSM8K
fi

stage "report" python -m nanochat.report generate
banner "done: report.md is the report card; chat with 'python -m scripts.chat_web'"
