#!/usr/bin/env bash
# Puts Debian's promtool (from the prometheus package) at DIR/usr/bin/promtool, without
# installing the package (no service, nothing outside DIR). Prints the binary's path.
set -euo pipefail
DIR="$(realpath -m "${1:?usage: scripts/fetch-promtool.sh DIR}")"
BIN="$DIR/usr/bin/promtool"
if [ ! -x "$BIN" ]; then
  mkdir -p "$DIR"
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  (cd "$WORK" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; }; })
  dpkg-deb -x "$WORK"/prometheus_*.deb "$WORK/x"
  mkdir -p "$DIR/usr/bin"
  cp "$WORK/x/usr/bin/promtool" "$BIN"
fi
"$BIN" --version >&2
echo "$BIN"
