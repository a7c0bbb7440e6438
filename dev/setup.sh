#!/usr/bin/env bash
# Set up everything nanochat needs, idempotently: a .venv, PyTorch (a CPU build where there is no
# NVIDIA GPU), the project's Python dependencies, and the rustbpe tokenizer trainer (Rust, built by
# maturin). A second run skips every step whose inputs did not change, so it takes a second or two.
#
#   bash dev/setup.sh          # what speedrun.sh needs
#   bash dev/setup.sh --dev    # plus test/bench tools (pytest, HF tokenizers, playwright, openai)
#
# Offline fallbacks (used only when the normal path fails): PyTorch from a local wheel folder that
# pip is configured with; Rust crates from Debian's packaged crate sources (dev/offline_crates.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DEV=0; [[ "${1:-}" == "--dev" ]] && DEV=1
PYTHON=${PYTHON:-python3}
STAMPS="$ROOT/.stamps"; mkdir -p "$STAMPS"
say() { echo "[setup] $*"; }
# stamp NAME INPUT...: true if NAME was stamped with the current hash of the inputs
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
fresh() { local name=$1; shift; [[ -f "$STAMPS/$name" && "$(cat "$STAMPS/$name")" == "$(hash_of "$@")" ]]; }
stamp() { local name=$1; shift; hash_of "$@" > "$STAMPS/$name"; }
# Ctrl-C at any point is safe: each step is redone until it is stamped or checked as complete.
trap 'echo; echo "[setup] interrupted: nothing is half-used; run bash dev/setup.sh again to finish" >&2; exit 130' INT TERM

# ---------------------------------------------------------------- venv
# A venv whose creation was interrupted has bin/python but no pip: it is made again.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  [[ -e .venv ]] && say "removing an incomplete .venv (its creation was interrupted?)"
  rm -rf .venv
  say "creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

# ---------------------------------------------------------------- torch
if ! "$PY" -c "import torch" 2>/dev/null; then
  # An install cut short can leave torch's metadata without all its files: pip would call it done.
  if "$PY" -m pip show -q torch >/dev/null 2>&1; then
    say "torch is installed but does not import: installing it again"
    "$PY" -m pip uninstall -q -y torch >/dev/null 2>&1 || true
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing the default (CUDA) PyTorch build"
    "${PIP[@]}" "torch>=2.5,<2.15"
  else
    say "no NVIDIA GPU: installing a CPU build of PyTorch"
    # 1) a CPU wheel pip can already see (a local wheel folder, how offline machines carry torch),
    # 2) PyTorch's CPU index, 3) whatever the default index has.
    "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "${PIP[@]}" "torch>=2.5,<2.15"
  fi
fi

# ---------------------------------------------------------------- nanochat (editable) + deps
extras=""; [[ $DEV == 1 ]] && extras="[dev]"
if ! fresh "pip$DEV" pyproject.toml; then
  say "installing nanochat (editable) and its dependencies ${extras}"
  "${PIP[@]}" -e ".${extras}"
  stamp "pip$DEV" pyproject.toml
  [[ $DEV == 1 ]] && stamp pip0 pyproject.toml
fi

# ---------------------------------------------------------------- rustbpe
# cargo: on PATH, in ~/.cargo/bin (rustup's place, often not on PATH in a fresh shell), or installed
# now by rustup into ~/.cargo as a fresh GPU machine needs; failing all three, stop with the fix.
ensure_cargo() {
  command -v cargo >/dev/null && return 0
  [[ -x "$HOME/.cargo/bin/cargo" ]] && { export PATH="$HOME/.cargo/bin:$PATH"; return 0; }
  say "cargo not found: installing Rust with rustup into ~/.cargo (minimal profile)"
  if command -v curl >/dev/null \
      && curl --proto '=https' --tlsv1.2 -sSf --max-time 60 https://sh.rustup.rs \
         | sh -s -- -y -q --profile minimal >/dev/null 2>&1 \
      && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
    return 0
  fi
  echo "[setup] cargo not found and rustup could not install it: install Rust (https://rustup.rs," \
       "or e.g. apt install cargo) and re-run" >&2
  exit 1
}
RUST_INPUTS=(rustbpe/Cargo.toml rustbpe/pyproject.toml rustbpe/src/*.rs)
if ! fresh rustbpe "${RUST_INPUTS[@]}" || ! "$PY" -c "import rustbpe" 2>/dev/null; then
  ensure_cargo
  # The public crates registry where it answers; Debian's packaged crate sources where it does not.
  if ! (cd rustbpe && timeout 120 cargo fetch -q >/dev/null 2>&1); then
    say "crates registry unreachable: using Debian's packaged crate sources (dev/offline_crates.sh)"
    rm -f rustbpe/Cargo.lock  # a lock made against one registry does not match the other
    eval "$(bash dev/offline_crates.sh)"
  fi
  say "building rustbpe (release; a clean build takes 1-2 minutes on 2 cores)"
  "${PIP[@]}" maturin
  (cd rustbpe && "$ROOT/.venv/bin/maturin" build --release -q -o "$ROOT/rustbpe/target/wheels" >/dev/null)
  "${PIP[@]}" --force-reinstall --no-deps rustbpe/target/wheels/rustbpe-*.whl
  rm -f rustbpe/target/wheels/rustbpe-*.whl
  stamp rustbpe "${RUST_INPUTS[@]}"
fi
say "ready: $("$PY" -c 'import torch, rustbpe, nanochat; print("torch", torch.__version__)')"
