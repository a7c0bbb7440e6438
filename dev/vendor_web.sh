#!/usr/bin/env bash
# Refresh the chat page's vendored libraries (nanochat/static/vendor/) from npm, at the versions
# pinned below: `npm pack` fetches each package's tarball (no install, no node_modules, no build);
# the minified browser file and the licence are copied out, and VERSIONS records what is there.
# The page loads these from its own server only (scripts/chat_web.py sends a CSP that allows
# nothing else), so the chat works with no internet.
#
#   bash dev/vendor_web.sh      # needs npm and the registry; commit nanochat/static/vendor/ after
#
# To upgrade, change a version here, run it, and run tests/test_browser.py.
set -euo pipefail
MARKED=18.3.0          # markdown -> HTML (GFM tables, fences); see nanochat/static/chat.js for why marked
DOMPURIFY=3.5.0        # sanitises that HTML before it reaches the page
HIGHLIGHTJS=11.12.0    # code highlighting, the "common" bundle of ~36 languages
KATEX=0.19.1           # TeX math -> MathML; only katex.min.js: MathML output needs no KaTeX CSS or fonts

cd "$(dirname "$0")/.."
OUT=nanochat/static/vendor
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
command -v npm >/dev/null || { echo "[vendor_web] npm not found: install Node.js (it brings npm)" >&2; exit 1; }

fetch() {  # fetch NAME VERSION -> $TMP/<dir>/package
  local dir="$TMP/$(echo "$1" | tr -d '@/')"
  mkdir -p "$dir"
  (cd "$dir" && npm pack --silent "$1@$2" >/dev/null && tar xzf ./*.tgz)
  echo "$dir/package"
}

marked=$(fetch marked "$MARKED")
purify=$(fetch dompurify "$DOMPURIFY")
hljs=$(fetch @highlightjs/cdn-assets "$HIGHLIGHTJS")
katex=$(fetch katex "$KATEX")

mkdir -p "$OUT"
rm -f "$OUT"/*
cp "$marked/lib/marked.umd.js" "$OUT/marked.min.js"     # the UMD build is the minified one
sed -i '/^\/\/# sourceMappingURL=/d' "$OUT/marked.min.js"  # its map is not shipped
cp "$marked/LICENSE" "$OUT/LICENSE.marked"
cp "$purify/dist/purify.min.js" "$OUT/purify.min.js"
sed -i '/^\/\/# sourceMappingURL=/d' "$OUT/purify.min.js"
cp "$purify/LICENSE" "$OUT/LICENSE.dompurify"
cp "$hljs/highlight.min.js" "$OUT/highlight.min.js"
cp "$hljs/styles/github.min.css" "$OUT/github.min.css"
cp "$hljs/styles/github-dark.min.css" "$OUT/github-dark.min.css"
cp "$hljs/LICENSE" "$OUT/LICENSE.highlightjs"
cp "$katex/dist/katex.min.js" "$OUT/katex.min.js"
sed -i '/^\/\/# sourceMappingURL=/d' "$OUT/katex.min.js"
cp "$katex/LICENSE" "$OUT/LICENSE.katex"
cat > "$OUT/VERSIONS" <<VERSIONS
marked $MARKED (MIT) https://www.npmjs.com/package/marked
dompurify $DOMPURIFY (MPL-2.0 OR Apache-2.0) https://www.npmjs.com/package/dompurify
@highlightjs/cdn-assets $HIGHLIGHTJS (BSD-3-Clause) https://www.npmjs.com/package/@highlightjs/cdn-assets
katex $KATEX (MIT) https://www.npmjs.com/package/katex
VERSIONS
du -cb "$OUT"/*.js "$OUT"/*.css | tail -1 | awk '{printf "[vendor_web] %s: %.0f KB of scripts and styles\n", "'"$OUT"'", $1/1000}'
