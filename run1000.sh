#!/usr/bin/env bash
# The ~$1000 tier: a d32 (1.9B-parameter) model on one 8×H100 node, about 41 hours (≈ $1000 at
# ~$24/h). Same stages as speedrun.sh (dev/pipeline.sh's gpu_recipe), larger model and more data;
# the per-GPU batch is smaller (8 sequences) so d32 fits in 80 GB, and gradient accumulation keeps
# the global batch.
#
#   bash run1000.sh                         # NPROC_PER_NODE, WANDB_RUN, RUN_RL as in speedrun.sh
#   bash run1000.sh --dry-run               # print the commands without running anything
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# shellcheck source=dev/pipeline.sh
source dev/pipeline.sh
parse_args run1000.sh "$@"
if [[ $DRY_RUN == 0 ]] && ! have_gpu; then
  echo "run1000.sh needs NVIDIA GPUs (8×H100 recommended). On a CPU, run 'bash speedrun.sh' for the tiny preset." >&2
  exit 1
fi

# d32: 1.88B params × 20 tokens/param ≈ 37.6B tokens ≈ 180B chars ≈ 720 shards; 800 for margin.
gpu_recipe run1000 32 16 800 4000000000 8
