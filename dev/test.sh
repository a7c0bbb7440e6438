#!/usr/bin/env bash
# The test command: set up (idempotent, see dev/setup.sh --dev), then run the whole suite.
#   bash dev/test.sh                 # everything CI runs
#   bash dev/test.sh -m "not slow"   # the quick part; any pytest arguments pass through
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash dev/setup.sh --dev
export WANDB_MODE=disabled MPLCONFIGDIR="${MPLCONFIGDIR:-$(mktemp -d)}"
exec .venv/bin/python -m pytest "$@"
