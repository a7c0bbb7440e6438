#!/usr/bin/env bash
# Install the real browser the UI tests drive: Debian's chromium and chromium-driver, via apt-get,
# with fonts for emoji and CJK so that screenshots of the UI show those characters (not boxes).
# Idempotent and quiet: does nothing when /usr/bin/chromium is already there. Needs root (or sudo).
#
#   bash dev/install_browser.sh     # then: .venv/bin/python -m pytest tests/test_browser.py
#
# Playwright launches /usr/bin/chromium itself (tests/test_browser.py); never `playwright install`,
# which downloads its own browsers from a CDN (unreachable on offline CI machines).
set -euo pipefail
PACKAGES=(chromium chromium-driver fonts-noto-color-emoji fonts-wqy-microhei)
installed=$(dpkg-query -W -f='${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null | grep -c '^installed$' || true)
if [[ -x /usr/bin/chromium && $installed -eq ${#PACKAGES[@]} ]]; then
  exit 0  # everything is there already
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "[install_browser] need root (or sudo) to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
command -v apt-get >/dev/null || { echo "[install_browser] no apt-get: install Chromium yourself at /usr/bin/chromium" >&2; exit 1; }
echo "[install_browser] installing ${PACKAGES[*]} with apt-get (about a minute)"
export DEBIAN_FRONTEND=noninteractive
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
# quiet, but apt's own words are shown if it fails
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "[install_browser] apt-get failed (see above)" >&2
  exit 1
fi
/usr/bin/chromium --version 2>/dev/null
