#!/usr/bin/env bash
# The CPU preset: every stage of the speedrun at toy size, on the small real data sample shipped in
# dev/cpu_sample (OpenStax textbook text, ARC/MMLU/GSM8K/HumanEval slices, chat samples, 5 CORE
# tasks), fully offline. `bash speedrun.sh` runs this when there is no NVIDIA GPU; you can also run
# it directly:
#
#   bash dev/runcpu.sh
#   CPU_BASE_STEPS=600 CPU_DEPTH=6 bash dev/runcpu.sh    # bigger/longer (see the knobs below)
#
# It is a smoke run of the real pipeline, not a way to get a useful model: the model is tiny and
# sees a few hundred thousand tokens, so its answers are word salad and its eval scores sit at
# chance. It finishes in about 8 minutes on 2 idle CPU cores (a fresh clone took 10 min 3 s,
# set-up included), writes report.md with a training-curve plot, and ends with a chat answer.
# Afterwards `python -m scripts.chat_web` (in .venv) serves the model it trained.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

# ----------------------------------------------------------------------------- size knobs
DEPTH=${CPU_DEPTH:-4}                 # model depth: width 64·depth (d4: 256 wide, 2 heads)
SEQ_LEN=${CPU_SEQ_LEN:-256}           # context length during every stage
VOCAB=${CPU_VOCAB:-4096}              # tokenizer vocabulary (256 bytes + merges + 9 specials)
BATCH=${CPU_BATCH:-8}                 # sequences per step (no gradient accumulation)
BASE_STEPS=${CPU_BASE_STEPS:-120}     # pretraining steps (BATCH·SEQ_LEN tokens each)
MID_STEPS=${CPU_MID_STEPS:-40}       # midtraining steps
SFT_STEPS=${CPU_SFT_STEPS:-30}        # SFT steps (BATCH conversations each)
RL_STEPS=${CPU_RL_STEPS:-4}           # RL steps (0 = skip RL)
EVAL_PROBLEMS=${CPU_EVAL_PROBLEMS:-16}  # problems per task in each chat evaluation
CORE_PER_TASK=${CPU_CORE_PER_TASK:-40}  # items per CORE task

# ----------------------------------------------------------------------------- where things are
# The bundled sample's folders are recorded in the base dir (below), not exported: every stage, and
# any script you run yourself afterwards with the same base dir, finds them there.
SAMPLE="$ROOT/dev/cpu_sample"
export WANDB_MODE=${WANDB_MODE:-disabled}
export MPLCONFIGDIR=${MPLCONFIGDIR:-$(mktemp -d)}

# shellcheck source=dev/pipeline.sh
source dev/pipeline.sh

# ----------------------------------------------------------------------------- never overwrite other work
# The preset trains its own small tokenizer into the base dir. If the dir already holds a tokenizer
# the preset did not make (say with a d20 model copied from a GPU machine to chat with), replacing
# it would make those models unusable: they only work with their own tokenizer. So stop and say so.
BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
if [[ ! -f "$BASE_DIR/cpu_preset.txt" ]] && compgen -G "$BASE_DIR/tokenizer/*.pkl" > /dev/null; then
  echo "dev/runcpu.sh: $BASE_DIR already holds a tokenizer (and maybe models) from another run;" >&2
  echo "  the CPU preset would replace it. Run the preset in its own directory, e.g." >&2
  echo "  NANOCHAT_BASE_DIR=\$HOME/.cache/nanochat-cpu bash speedrun.sh" >&2
  exit 1
fi
mkdir -p "$BASE_DIR"
echo "this base dir holds the CPU preset's run (dev/runcpu.sh); the preset may overwrite it" > "$BASE_DIR/cpu_preset.txt"
# Where the data is (read by nanochat.common.data_dir_setting when the variable is not set):
# pretraining shards (last = val); ARC, MMLU, GSM8K, HumanEval and chat; 5 of the 22 CORE tasks.
python3 -c 'import json, sys; json.dump(dict(NANOCHAT_PRETRAIN_DIR=sys.argv[2] + "/pretrain",
  NANOCHAT_DATA_DIR=sys.argv[2], NANOCHAT_EVAL_BUNDLE=sys.argv[2] + "/core_sample"), open(sys.argv[1], "w"))' \
  "$BASE_DIR/data_dirs.json" "$SAMPLE"

banner "nanochat CPU PRESET (no GPU found): a tiny d$DEPTH model on the bundled sample, offline.
  This checks that every stage runs; it does not produce a useful model. For the real d20
  speedrun use a machine with NVIDIA GPUs."

COMMON=(--device_type=cpu "--model_tag=d$DEPTH")  # the tag: not a larger dN left by an earlier run
TOKENS=$((BATCH * SEQ_LEN))

stage "set-up" bash dev/setup.sh
activate_venv
stage "report reset" python -m nanochat.report reset

# ----------------------------------------------------------------------------- tokenizer
stage "tokenizer training" python -m scripts.tok_train --max_chars=10000000 "--vocab_size=$VOCAB"
stage "tokenizer evaluation" python -m scripts.tok_eval --reference_timeout=2

# ----------------------------------------------------------------------------- base model
stage "base training" python -m scripts.base_train "${COMMON[@]}" "--depth=$DEPTH" \
  "--max_seq_len=$SEQ_LEN" "--device_batch_size=$BATCH" "--total_batch_size=$TOKENS" \
  "--num_iterations=$BASE_STEPS" --eval_every=40 "--eval_tokens=$((TOKENS * 8))" \
  --core_metric_every=-1 "--sample_every=$BASE_STEPS"
stage "base loss" python -m scripts.base_loss "${COMMON[@]}" "--device_batch_size=$BATCH" \
  "--split_tokens=$((TOKENS * 4))"
stage "base evaluation (CORE)" python -m scripts.base_eval "${COMMON[@]}" "--max_per_task=$CORE_PER_TASK"

# ----------------------------------------------------------------------------- midtraining
stage "midtraining" python -m scripts.mid_train "${COMMON[@]}" "--max_seq_len=$SEQ_LEN" \
  "--device_batch_size=$BATCH" "--total_batch_size=$TOKENS" "--num_iterations=$MID_STEPS" \
  --eval_every=30 "--eval_tokens=$((TOKENS * 4))"
stage "chat evaluation (mid)" python -m scripts.chat_eval -i mid --device_type=cpu -g "d$DEPTH" \
  -x "$EVAL_PROBLEMS" -m 48

# ----------------------------------------------------------------------------- supervised fine-tuning
stage "SFT" python -m scripts.chat_sft "${COMMON[@]}" "--max_seq_len=$SEQ_LEN" \
  "--device_batch_size=$BATCH" "--target_examples_per_step=$BATCH" "--num_iterations=$SFT_STEPS" \
  --eval_every=20 --eval_steps=4 "--eval_metrics_every=$SFT_STEPS" --eval_metrics_max_problems=32
stage "chat evaluation (sft)" python -m scripts.chat_eval -i sft --device_type=cpu -g "d$DEPTH" \
  -x "$EVAL_PROBLEMS" -m 48

# ----------------------------------------------------------------------------- reinforcement learning
if [[ "$RL_STEPS" -gt 0 ]]; then
  stage "RL" python -m scripts.chat_rl "${COMMON[@]}" --device_batch_size=4 --examples_per_step=2 \
    --num_samples=4 --max_new_tokens=48 "--num_iterations=$RL_STEPS" "--eval_every=$RL_STEPS" \
    --eval_examples=8 "--save_every=$RL_STEPS"
  stage "chat evaluation (rl)" python -m scripts.chat_eval -i rl --device_type=cpu -g "d$DEPTH" -a GSM8K \
    -x "$EVAL_PROBLEMS" -m 48
fi

# ----------------------------------------------------------------------------- report card and a chat
stage "report" python -m nanochat.report generate
cat report.md
stage "chat" python -m scripts.chat_cli -i sft --device_type=cpu --model_tag "d$DEPTH" -m 48 -p "Why is the sky blue?"
banner "CPU preset done in $((SECONDS / 60)) min $((SECONDS % 60)) s. report.md is the report card.
  Chat in a browser:  source .venv/bin/activate && python -m scripts.chat_web   (then open http://localhost:8000)"
