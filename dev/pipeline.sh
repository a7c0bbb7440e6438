# Helpers shared by speedrun.sh, run1000.sh and dev/runcpu.sh (sourced, not run).
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
