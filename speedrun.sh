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
# The stages are dev/pipeline.sh's gpu_recipe (shared with run1000.sh). Stops at the first failing
# stage and says which. Safe to re-run: finished shard downloads and a tokenizer trained with the
# same settings are kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# shellcheck source=dev/pipeline.sh
source dev/pipeline.sh  # stage / run_bg / wait_bg helpers and gpu_recipe (they honour DRY_RUN)
parse_args speedrun.sh "$@"
if [[ $DRY_RUN == 0 ]] && ! have_gpu; then
  exec bash dev/runcpu.sh
fi

# 8 shards (~2B chars) are enough for the tokenizer; the 240 that pretraining needs
# (d20: 20 tokens/param × 561M params ≈ 11.2B tokens ≈ 54B chars at ~4.8 chars/token, ~250M chars
# per shard) download in the background meanwhile.
gpu_recipe speedrun 20 8 240 2000000000
