#!/usr/bin/env bash
# The test command: set up (idempotent, see dev/setup.sh --dev), then run the whole suite.
#   bash dev/test.sh                 # everything CI runs
#   bash dev/test.sh -m "not slow"   # the quick part; any pytest arguments pass through
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash dev/setup.sh --dev
# The UI tests drive a real Chromium (Debian's package; needs root or sudo the first time).
bash dev/install_browser.sh || echo "[test] could not install Chromium: tests/test_browser.py will fail (see above)" >&2
export WANDB_MODE=disabled MPLCONFIGDIR="${MPLCONFIGDIR:-$(mktemp -d)}"
exec .venv/bin/python -m pytest "$@"
