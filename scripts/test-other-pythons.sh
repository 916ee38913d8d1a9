#!/usr/bin/env bash
# Builds the abi3 wheel once and runs the smoke tests under every other
# CPython that pyenv has here (3.12, 3.13); skips those that are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TOKENGATE_VENV:-.venv}"
OUT="target/wheels-abi3"
rm -rf "$OUT"
"$VENV/bin/maturin" build --release -q -o "$OUT" -i "$VENV/bin/python" >/dev/null
WHEEL=$(ls "$OUT"/*.whl)
ROOT="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
for v in 3.12 3.13; do
  PYBIN=$(ls -d "$ROOT"/versions/$v.*/bin/python$v 2>/dev/null | grep -v t/bin | head -1 || true)
  if [ -z "$PYBIN" ]; then echo "   $v: not installed, skipped"; continue; fi
  ENV="target/venv-$v"
  [ -x "$ENV/bin/python" ] || "$PYBIN" -m venv "$ENV"
  "$ENV/bin/python" -m pip install -q pytest pytest-timeout pytest-asyncio hypothesis
  "$ENV/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL"
  (cd tests && "../$ENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" test_smoke.py)
  echo "   $v: ok ($("$ENV/bin/python" -V))"
done
