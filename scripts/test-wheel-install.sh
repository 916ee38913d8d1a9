#!/usr/bin/env bash
# Installs the wheel into a fresh venv of each given CPython version (pyenv's), with no Rust
# toolchain on PATH and binary packages only, and runs the smoke tests there. Each install log
# is kept in target/ci-logs/install-<version>.log.
# usage: scripts/test-wheel-install.sh WHEEL VERSION...
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL="$(realpath "${1:?usage: scripts/test-wheel-install.sh WHEEL VERSION...}")"
shift
mkdir -p target/ci-logs
# PATH without any directory that holds cargo or rustc.
NORUST=$(tr ':' '\n' <<<"$PATH" | while read -r d; do
  if [ -n "$d" ] && [ ! -e "$d/cargo" ] && [ ! -e "$d/rustc" ]; then printf '%s:' "$d"; fi
done)
NORUST="${NORUST%:}"
for v in "$@"; do
  PYBIN=$(scripts/python-of.sh "$v")
  ENV="target/fresh-$v"
  LOG="target/ci-logs/install-$v.log"
  rm -rf "$ENV"
  # -e of its own in the subshell: it is not part of an || list, so a failing step stops it.
  set +e
  (
    set -e
    export PATH="$NORUST"
    if command -v cargo >/dev/null || command -v rustc >/dev/null; then
      echo "a Rust toolchain is still on PATH" >&2
      exit 1
    fi
    "$PYBIN" -m venv "$ENV"
    "$ENV/bin/python" -m pip install --upgrade --only-binary :all: pip
    "$ENV/bin/python" -m pip install --only-binary :all: "$WHEEL"
    "$ENV/bin/python" -m pip install --only-binary :all: pytest pytest-timeout pytest-asyncio
  ) >"$LOG" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    cat "$LOG"
    exit "$rc"
  fi
  echo "   $v: $(grep -E '^Successfully installed .*tokengate' "$LOG")"
  (cd tests && PATH="$NORUST" "../$ENV/bin/python" -m pytest -q -p no:cacheprovider test_smoke.py test_typing.py -k "not type_checks and not seeded")
done
echo "install: the wheel installed and passed its smoke tests on CPython $*"
