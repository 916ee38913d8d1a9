#!/usr/bin/env bash
# Free-threaded leg: builds CPython 3.13t into the cache if needed
# (scripts/build-free-threaded.sh, ~6 min), builds tokengate for it (a cp313t wheel: the limited
# API does not exist there), checks that importing tokengate leaves the GIL disabled, and runs
# the test suite but its slow tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
FTPY=$(scripts/build-free-threaded.sh | tail -1)
ENV="target/venv-313t"
[ -x "$ENV/bin/python" ] || "$FTPY" -m venv "$ENV"
# The test extra, but hypothesis (it builds a PyO3 extension that refuses 3.13t: its property tests
# are skipped here) and mypy (its ast-serialize dependency does not build for 3.13t: the two mypy
# tests of test_typing.py are skipped; the typed user code still runs).
"$ENV/bin/python" -m pip install -q "maturin>=1.9.4,<2" pytest pytest-timeout pytest-asyncio "loky>=3.4" \
  "prometheus_client>=0.20" "pytest-xdist>=3" "anyio>=4" "tqdm>=4.60" "rich>=13"
VIRTUAL_ENV="$PWD/$ENV" PATH="$PWD/$ENV/bin:$PATH" "$ENV/bin/maturin" develop --release -q
"$ENV/bin/python" -c 'import sys, tokengate; assert not sys._is_gil_enabled(), "importing tokengate re-enabled the GIL"; print("   GIL disabled after import: ok")'
scripts/fetch-promtool.sh target/tools >/dev/null
# The terminal tests must run here too, not skip (tmux; the browser test skips here: no selenium).
scripts/install-tmux.sh
TOKENGATE_REQUIRE_TMUX=1 PATH="$PWD/target/tools/usr/bin:$PATH" "$ENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
