#!/usr/bin/env bash
# The sdist builds: pip builds a wheel from it (maturin fetched as the build backend, the Rust
# code compiled from the sdist's own files, outside the repository), then a fresh venv installs
# that wheel and imports it.
# usage: scripts/test-sdist.sh SDIST PYTHON
set -euo pipefail
SDIST="$(realpath "${1:?usage: scripts/test-sdist.sh SDIST PYTHON}")"
PY="${2:?usage: scripts/test-sdist.sh SDIST PYTHON}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$PY" -m venv venv
venv/bin/python -m pip install -q --upgrade pip
CARGO_TARGET_DIR="$WORK/target" venv/bin/python -m pip wheel -q --no-deps -w wheels "$SDIST"
ls wheels
venv/bin/python -m pip install -q wheels/*.whl
venv/bin/python - <<'PY'
import tokengate
from tokengate import OperationsCoordinator, task_token_guard

@task_token_guard(tags={"weight": "light"})
def square(x: int) -> int:
    return x * x

with OperationsCoordinator():
    assert [t.result(timeout=30) for t in map(square, range(10))] == [x * x for x in range(10)]
print("sdist: built, installed and ran tokengate", tokengate.__version__)
PY
