#!/usr/bin/env bash
# Fallback for machines that cannot reach the Rust crates registry: make the crates rustbpe needs
# available to cargo from the crate sources that Debian 13 ("trixie") packages as librust-*-dev.
# Nothing is installed system-wide: apt downloads the .debs into a private folder, they are
# unpacked there, and a private CARGO_HOME is written whose config replaces crates-io with it.
# dev/setup.sh calls this only when `cargo fetch` fails; with internet you never need it.
#
#   eval "$(bash dev/offline_crates.sh [DIR])"   # prints: export CARGO_HOME=DIR/cargo-home
#
# DIR defaults to ~/.cache/rust-offline-trixie; a second run reuses it. Needs apt and a Debian
# mirror in the machine's apt sources (it reads which one from there).
set -euo pipefail
DIR=$(realpath -m "${1:-$HOME/.cache/rust-offline-trixie}")
if [[ -f "$DIR/cargo-home/config.toml" ]]; then
  echo "export CARGO_HOME=$DIR/cargo-home"
  exit 0
fi
# rustbpe's dependencies (pyo3, pyo3-log, log, rayon, fancy-regex, ahash, compact_str, dary_heap)
# and everything they pull in.
CRATES="ahash aho-corasick arc-swap autocfg bit-set bit-vec castaway cfg-if compact-str
crossbeam-deque crossbeam-epoch crossbeam-utils dary-heap either equivalent fancy-regex getrandom
hashbrown heck indexmap indoc itoa libc log memchr memoffset once-cell portable-atomic proc-macro2
pyo3 pyo3-build-config pyo3-ffi pyo3-log pyo3-macros pyo3-macros-backend quote rayon rayon-core
regex regex-automata regex-syntax rustversion ryu static-assertions syn target-lexicon
unicode-ident unindent version-check zerocopy zerocopy-derive"
PKGS=$(for c in $CRATES; do printf 'librust-%s-dev ' "$c"; done)

mirror=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
  | grep -v -- '-security' | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
  | awk '{print $1}' | grep -m1 '/debian$' || true)
if [[ -z "$mirror" ]]; then
  echo "offline_crates.sh: no Debian mirror in the apt sources; install the crates another way" >&2
  exit 1
fi
mkdir -p "$DIR"/apt/lists/partial "$DIR"/apt/parts "$DIR"/debs "$DIR"/registry "$DIR"/cargo-home
echo "deb $mirror trixie main" > "$DIR/apt/sources.list"
apt_opts=(-o "Dir::State::Lists=$DIR/apt/lists" -o "Dir::Etc::SourceList=$DIR/apt/sources.list"
          -o "Dir::Etc::SourceParts=$DIR/apt/parts" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
          -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" -qq update >&2
# shellcheck disable=SC2086
(cd "$DIR/debs" && apt-get "${apt_opts[@]}" -qq download $PKGS >&2)
for deb in "$DIR"/debs/*.deb; do
  tmp=$(mktemp -d)
  dpkg-deb -x "$deb" "$tmp"
  cp -a "$tmp"/usr/share/cargo/registry/. "$DIR/registry/"
  rm -rf "$tmp"
done
# Written last: its presence means the folder is complete.
cat > "$DIR/cargo-home/config.toml.tmp" <<CFG
[source.crates-io]
replace-with = "debian-trixie"

[source.debian-trixie]
directory = "$DIR/registry"

[net]
offline = true
CFG
mv "$DIR/cargo-home/config.toml.tmp" "$DIR/cargo-home/config.toml"
echo "export CARGO_HOME=$DIR/cargo-home"
