#!/usr/bin/env bash
# Install the real browser the UI tests drive: Debian's chromium and chromium-driver, via apt-get.
# Idempotent and quiet: does nothing when /usr/bin/chromium is already there. Needs root (or sudo).
#
#   bash dev/install_browser.sh     # then: .venv/bin/python -m pytest tests/test_browser.py
#
# Playwright launches /usr/bin/chromium itself (tests/test_browser.py); never `playwright install`,
# which downloads its own browsers from a CDN (unreachable on offline CI machines).
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "[install_browser] need root (or sudo) to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
command -v apt-get >/dev/null || { echo "[install_browser] no apt-get: install Chromium yourself at /usr/bin/chromium" >&2; exit 1; }
echo "[install_browser] installing chromium + chromium-driver with apt-get (about a minute)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
/usr/bin/chromium --version
