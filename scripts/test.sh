#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds the extension into a
# virtualenv (.venv, made if missing), then runs
#   1. cargo tests of the engine (no Python involved),
#   2. pytest on CPython 3.11 (the default interpreter),
#   3. the abi3 wheel's import and smoke tests on pyenv's 3.12 and 3.13 when present,
#   4. the free-threaded leg (3.13t) when TOKENGATE_FT=1 or its cached build exists.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${TOKENGATE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# The test extra of pyproject.toml, plus the build backend.
"$VENV/bin/python" -m pip install -q "maturin>=1.9.4,<2" $("$VENV/bin/python" scripts/extras.py test)
VIRTUAL_ENV="$PWD/$VENV" PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release -q

echo "== cargo test (engine, no Python)"
cargo test --no-default-features -q 2>&1 | grep -E "^test result|FAILED|panicked" || true
cargo test --no-default-features -q >/dev/null 2>&1

echo "== loom models of the sleep/wake and shutdown handshakes"
scripts/loom.sh 2>&1 | grep -E "^test result|FAILED|panicked" || true
scripts/loom.sh >/dev/null 2>&1

echo "== pytest ($("$VENV/bin/python" -V))"
# The soak test runs 60 s in CI (20 s when pytest is run by hand).
TOKENGATE_SOAK_SECONDS="${TOKENGATE_SOAK_SECONDS:-60}" "$VENV/bin/python" -m pytest -q "$@"

echo "== abi3 wheel on other interpreters"
scripts/test-other-pythons.sh

if [ "${TOKENGATE_FT:-0}" = "1" ] || [ -x "${TOKENGATE_CACHE:-$HOME/.cache/tokengate}/py313t/bin/python3.13t" ]; then
  echo "== free-threaded 3.13t"
  scripts/test-free-threaded.sh
fi
echo "== all tests passed"
