#!/usr/bin/env bash
# The whole test suite, from a fresh clone. `.ci/run` calls exactly this script.
#
# Stages, in order; each prints its counts and its duration, and a table of all of them ends the run:
#   wheel     the release artefacts (scripts/build-wheels.sh): an abi3 manylinux2014 wheel and an
#             sdist, both through `twine check`
#   gates     cargo fmt, clippy (-D warnings, with and without the python feature), ruff (lint and
#             format), mypy --strict, stubtest against the built wheel (scripts/gates.sh)
#   cargo     the engine's own tests (no interpreter), then the loom models
#   install   the wheel into fresh venvs of 3.9 to 3.13 with no Rust toolchain on PATH, and
#             its smoke tests there (scripts/test-wheel-install.sh)
#   sdist     the sdist builds a wheel that imports
#   pytest    the full suite (all but the slow tests) on 3.12 (the primary leg), 3.11 and 3.13,
#             each against the installed wheel
#   ray       the Ray lane's tests, the executor contract on Ray and the README's examples, on 3.12
#             with the ray extra, against a 2-node local Ray cluster (two `ray start`, loopback)
#   slow      the slow tests (soak, storms, churn) on 3.12
#   3.13t     the full suite on free-threaded 3.13t, built from Debian's source package into
#             ~/.cache/tokengate when missing (about 6 minutes; scripts/build-free-threaded.sh)
#
# TOKENGATE_STAGES (space-separated stage names) runs a subset; extra arguments go to every pytest run.
# A missing interpreter fails the run: CI must not pass by testing less than it says.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
LOGS="target/ci-logs"
DIST="target/dist"
mkdir -p "$LOGS"
ALL_STAGES="wheel gates cargo install sdist pytest-3.12 pytest-3.11 pytest-3.13 ray slow 3.13t"
STAGES="${TOKENGATE_STAGES:-$ALL_STAGES}"
for s in $STAGES; do
  if [[ " $ALL_STAGES " != *" $s "* ]]; then
    echo "unknown stage $s (stages: $ALL_STAGES)" >&2
    exit 2
  fi
done
SUMMARY=()
T_START=$SECONDS

wants() { [[ " $STAGES " == *" $1 "* ]]; }

# python_of 3.12 -> the newest pyenv CPython 3.12.x (GIL build), or fails.
python_of() {
  scripts/python-of.sh "$1"
}

# counts LOG -> what a stage's log says it ran: cargo's "test result" lines added up, else the
# last summary line (pytest's "N passed ...", or a script's own "NAME: ..." line).
counts() {
  if grep -q "^test result:" "$1"; then
    grep "^test result:" "$1" | awk '{p += $4; f += $6} END {printf "%d passed, %d failed (cargo)", p, f}'
  else
    grep -E "[0-9]+ (passed|failed)|^[a-z0-9.]+: " "$1" | tail -1 | sed -E 's/^=+ //; s/ =+$//' || true
  fi
}

# stage NAME COMMAND...: runs COMMAND with its output shown and kept in target/ci-logs/NAME.log.
stage() {
  local name=$1
  shift
  echo
  echo "== $name"
  local t0=$SECONDS status
  # A subshell with -e of its own: a failing command inside a stage's function stops the stage
  # (-e is off in any command that is part of an || list, functions included).
  set +e
  (set -e; "$@") 2>&1 | tee "$LOGS/$name.log"
  status=${PIPESTATUS[0]}
  set -e
  local dt=$((SECONDS - t0)) line
  line="$(printf '%-12s %4ds  %s' "$name" "$dt" "$(counts "$LOGS/$name.log")")"
  if [ "$status" -ne 0 ]; then
    line="$line  FAILED (exit $status)"
  fi
  SUMMARY+=("$line")
  echo "-- $line"
  if [ "$status" -ne 0 ]; then
    finish 1
  fi
}

finish() {
  echo
  echo "== summary (seconds per stage; the whole run $((SECONDS - T_START)) s)"
  printf '   %s\n' "${SUMMARY[@]}"
  if [ "$1" -ne 0 ]; then
    echo "== FAILED"
    exit "$1"
  fi
  echo "== all tests passed"
  exit 0
}

# venv_for 3.12: target/venv-3.12 with the wheel (not editable), the test extra and the lint tools.
venv_for() {
  local v=$1 env="target/venv-$1"
  if [ ! -x "$env/bin/python" ]; then
    "$(python_of "$v")" -m venv "$env"
  fi
  "$env/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$env/bin/python" -m pip install -q $("$env/bin/python" scripts/extras.py test) $("$env/bin/python" scripts/extras.py --group lint)
  "$env/bin/python" -m pip install -q $("$env/bin/python" scripts/extras.py --group browser)
  "$env/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL"
  "$env/bin/python" -m pip install -q "$WHEEL"
}

run_pytest() {
  local env="target/venv-$1"
  venv_for "$1"
  shift
  # From the repository root; the package comes from the installed wheel, not from python/.
  "$env/bin/python" -c 'import sys, tokengate; print("   tokengate from", tokengate.__file__, "on", sys.version.split()[0])'
  # The soak test runs 60 s here (20 s when pytest is run by hand).
  # promtool (scripts/fetch-promtool.sh) checks the metrics' text.
  scripts/fetch-promtool.sh target/tools >/dev/null
  # The dashboard's browser test must run here, not skip: Debian's chromium and its driver.
  scripts/install-browser.sh
  # So must the terminal tests (`tokengate top` and a progress bar in a tmux pane).
  scripts/install-tmux.sh
  # And the Dask lane's tests (distributed comes with the test extra; loopback clusters only).
  TOKENGATE_REQUIRE_DASK=1 TOKENGATE_REQUIRE_BROWSER=1 TOKENGATE_REQUIRE_TMUX=1 PATH="$ROOT/target/tools/usr/bin:$PATH" TOKENGATE_SOAK_SECONDS="${TOKENGATE_SOAK_SECONDS:-60}" \
    "$env/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

# The Ray lane's stage: its own venv (Ray is large and the other legs need not have it).
run_ray() {
  local env="target/venv-ray"
  if [ ! -x "$env/bin/python" ]; then
    "$(python_of 3.12)" -m venv "$env"
  fi
  "$env/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$env/bin/python" -m pip install -q $("$env/bin/python" scripts/extras.py test) $("$env/bin/python" scripts/extras.py ray)
  "$env/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL"
  "$env/bin/python" -m pip install -q "$WHEEL"
  "$env/bin/python" -c 'import sys, ray, tokengate; print("   tokengate from", tokengate.__file__, "with Ray", ray.__version__, "on", sys.version.split()[0])'
  TOKENGATE_REQUIRE_RAY=1 TOKENGATE_REQUIRE_DASK=1 "$env/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_cluster_ray.py tests/test_cluster_executor.py tests/test_readme.py -k "ray or readme" "$@"
}

# The build tools: maturin (the build backend), ziglang and twine (the release group), on 3.12.
TOOLS="target/venv-tools"
setup_tools() {
  if [ ! -x "$TOOLS/bin/python" ]; then
    "$(python_of 3.12)" -m venv "$TOOLS"
  fi
  "$TOOLS/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$TOOLS/bin/python" -m pip install -q "maturin>=1.9.4,<2" $("$TOOLS/bin/python" scripts/extras.py --group release)
  scripts/fetch-promtool.sh target/tools
}

if wants wheel; then
  stage tools setup_tools
  stage wheel env PATH="$ROOT/$TOOLS/bin:$PATH" scripts/build-wheels.sh "$DIST"
fi
WHEEL=$(ls "$DIST"/tokengate-*-cp39-abi3-*.whl 2>/dev/null | head -1 || true)
if [ -z "$WHEEL" ]; then
  echo "no wheel in $DIST: run the wheel stage" >&2
  exit 1
fi
if ! wants wheel && [ -n "$(find src python Cargo.toml pyproject.toml -newer "$WHEEL" -type f -print -quit)" ]; then
  echo "warning: $WHEEL is older than the sources; add the wheel stage to test them" >&2
fi

if wants gates; then
  stage gates-setup venv_for 3.12
  stage gates scripts/gates.sh "target/venv-3.12/bin/python"
fi
if wants cargo; then
  stage cargo cargo test --no-default-features -q
  stage loom scripts/loom.sh
fi
if wants install; then
  stage install scripts/test-wheel-install.sh "$WHEEL" 3.9 3.10 3.11 3.12 3.13
fi
if wants sdist; then
  stage sdist scripts/test-sdist.sh "$(ls "$DIST"/tokengate-*.tar.gz)" "$(python_of 3.12)"
fi
for v in 3.12 3.11 3.13; do
  if wants "pytest-$v"; then
    stage "pytest-$v" run_pytest "$v" -m "not slow" "$@"
  fi
done
if wants ray; then
  stage ray run_ray "$@"
fi
if wants slow; then
  stage slow run_pytest 3.12 -m slow "$@"
fi
if wants 3.13t; then
  stage 3.13t scripts/test-free-threaded.sh "$@"
fi
finish 0
