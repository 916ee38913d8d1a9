#!/usr/bin/env bash
# Lint and type gates; any finding fails the run. The argument is a Python that has the built
# extension installed and the lint group of pyproject.toml (default: .venv's).
#   cargo fmt --check; the module graph of src/ (no import circle, floors point down, files of at
#   most 700 lines: scripts/check-module-graph.py); cargo clippy -D warnings with and without the
#   python feature;
#   ruff check and ruff format --check; mypy --strict (settings in pyproject.toml);
#   stubtest: the stubs against the extension as built (scripts/stubtest-allowlist.txt says why
#   each allowed difference is one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
BIN="$(dirname "$PY")"
step() {
  echo "-- $*"
  "$@"
}
step cargo fmt --check
step "$PY" scripts/check-module-graph.py
step cargo clippy --release --all-targets -q -- -D warnings
step cargo clippy --release --all-targets --no-default-features -q -- -D warnings
step "$BIN/ruff" check python tests benches scripts
step "$BIN/ruff" format --check python tests benches scripts
step "$BIN/mypy"
step "$PY" -m mypy.stubtest tokengate --mypy-config-file pyproject.toml --allowlist scripts/stubtest-allowlist.txt
echo "gates: 8 passed"
