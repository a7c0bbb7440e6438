# Helpers shared by speedrun.sh, run1000.sh and dev/runcpu.sh (sourced, not run), and the GPU
# recipe itself (gpu_recipe: the stage list speedrun.sh and run1000.sh share).
# Each stage prints a banner, runs, and on failure stops the pipeline naming the stage. With
# DRY_RUN=1 the commands are printed ("+ cmd") and nothing runs.

DRY_RUN=${DRY_RUN:-0}
declare -A _BG_PIDS=()

banner() {
  echo
  echo "=============================================================================="
  echo "  $*"
  echo "=============================================================================="
}

# stage NAME CMD...: run one stage; stop the whole pipeline if it fails.
stage() {
  local name=$1; shift
  echo "+ $*"
  [[ $DRY_RUN == 1 ]] && return 0
  banner "stage: $name"
  local start=$SECONDS status=0
  "$@" || status=$?
  if [[ $status != 0 ]]; then
    echo >&2
    echo "pipeline stopped: stage '$name' failed (exit status $status)." >&2
    echo "  command: $*" >&2
    echo "  Fix the cause shown above and re-run; finished downloads and the tokenizer are kept." >&2
    exit "$status"
  fi
  echo "[stage '$name' finished in $((SECONDS - start)) s]"
}

# run_bg KEY CMD...: start a command in the background (e.g. a long download).
run_bg() {
  local key=$1; shift
  echo "+ $* &"
  [[ $DRY_RUN == 1 ]] && return 0
  "$@" &
  _BG_PIDS[$key]=$!
}

# wait_bg KEY NAME: wait for a background command; a failure stops the pipeline like a stage.
wait_bg() {
  local key=$1 name=$2
  echo "+ wait  # $name"
  [[ $DRY_RUN == 1 ]] && return 0
  local status=0
  wait "${_BG_PIDS[$key]}" || status=$?
  if [[ $status != 0 ]]; then
    echo "pipeline stopped: background stage '$name' failed (exit status $status)." >&2
    exit "$status"
  fi
}

# Use the project's virtualenv for every later command.
activate_venv() {
  [[ $DRY_RUN == 1 ]] && return 0
  # shellcheck disable=SC1091
  source .venv/bin/activate
}

# parse_args SCRIPT ARGS...: --dry-run sets DRY_RUN=1; anything else stops with exit status 2.
parse_args() {
  local script=$1; shift
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      *) echo "$script: unknown argument '$arg' (valid: --dry-run)" >&2; exit 2 ;;
    esac
  done
}

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# gpu_recipe NAME DEPTH FIRST_SHARDS SHARDS MAX_CHARS [DEVICE_BATCH_SIZE]: every stage of a GPU run,
# in order: set-up, report reset, FIRST_SHARDS shards for the tokenizer (trained on MAX_CHARS
# characters) while SHARDS download in the background, base_train --depth=DEPTH, base_loss,
# base_eval, mid_train, chat_eval, chat_sft, chat_eval, the optional RL (RUN_RL=1), the report.
# DEVICE_BATCH_SIZE (default: the scripts' own) goes to the base stages and midtraining.
# Environment: NPROC_PER_NODE (default: every visible GPU), WANDB_RUN (default dummy: no wandb).
gpu_recipe() {
  local name=$1 depth=$2 first_shards=$3 shards=$4 max_chars=$5 dbs=${6:-}
  local batch=() after=()  # the batch flag inside an existing "--", and with its own "--"
  if [[ -n $dbs ]]; then batch=("--device_batch_size=$dbs"); after=(-- "--device_batch_size=$dbs"); fi
  if [[ $DRY_RUN == 0 ]]; then
    NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
  else
    NPROC_PER_NODE=${NPROC_PER_NODE:-8}
  fi
  WANDB_RUN=${WANDB_RUN:-dummy}
  local torchrun=(torchrun --standalone "--nproc_per_node=$NPROC_PER_NODE")
  export OMP_NUM_THREADS=1
  banner "nanochat $name: d$depth on $NPROC_PER_NODE GPU(s), wandb run '$WANDB_RUN'"

  stage "set-up" bash dev/setup.sh
  activate_venv
  stage "report reset" python -m nanochat.report reset

  stage "download $first_shards shards" python -m nanochat.dataset -n "$first_shards"
  run_bg shards python -m nanochat.dataset -n "$shards"
  stage "tokenizer training" python -m scripts.tok_train "--max_chars=$max_chars"
  stage "tokenizer evaluation" python -m scripts.tok_eval
  wait_bg shards "download $shards shards"

  stage "base training" "${torchrun[@]}" -m scripts.base_train -- "--depth=$depth" ${batch[@]+"${batch[@]}"} \
    "--run=$WANDB_RUN"
  stage "base loss" "${torchrun[@]}" -m scripts.base_loss ${after[@]+"${after[@]}"}
  stage "base evaluation (CORE)" "${torchrun[@]}" -m scripts.base_eval ${after[@]+"${after[@]}"}

  stage "midtraining" "${torchrun[@]}" -m scripts.mid_train -- ${batch[@]+"${batch[@]}"} "--run=$WANDB_RUN"
  stage "chat evaluation (mid)" "${torchrun[@]}" -m scripts.chat_eval -i mid
  stage "SFT" "${torchrun[@]}" -m scripts.chat_sft -- "--run=$WANDB_RUN"
  stage "chat evaluation (sft)" "${torchrun[@]}" -m scripts.chat_eval -i sft
  if [[ "${RUN_RL:-0}" == 1 ]]; then
    stage "RL" "${torchrun[@]}" -m scripts.chat_rl -- "--run=$WANDB_RUN"
    stage "chat evaluation (rl)" "${torchrun[@]}" -m scripts.chat_eval -i rl -a GSM8K
  fi

  stage "report" python -m nanochat.report generate
  banner "done: report.md is the report card; chat with 'python -m scripts.chat_web' (browser) or 'python -m scripts.chat_cli'"
}
