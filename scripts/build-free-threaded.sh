#!/usr/bin/env bash
# Build a free-threaded CPython 3.13t from Debian's source package into a cache
# directory (about 6 minutes on 2 cores), without touching apt's own config or ~/.pyenv.
# Prints the interpreter path on its last line. Re-running reuses the cache.
# Recipe: ../shared/reference/toolchain.md section 3.
set -euo pipefail
CACHE="${TOKENGATE_CACHE:-$HOME/.cache/tokengate}"
PREFIX="$CACHE/py313t"
PY="$PREFIX/bin/python3.13t"
if [ -x "$PY" ]; then echo "$PY"; exit 0; fi
S="$CACHE/ft-build"
mkdir -p "$S/apt/lists/partial" "$S/cache"
echo "deb-src http://deb.debian.org/debian trixie main" > "$S/apt/src.list"
A=(-o Dir::Etc::sourcelist="$S/apt/src.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$S/apt/lists"
   -o Dir::Cache::pkgcache="$S/apt/pkg.bin" -o Dir::Cache::srcpkgcache="$S/apt/src.bin")
if [ ! -f "$S/cache/Python-3.13.5.tar.xz" ]; then
  apt-get "${A[@]}" update >&2
  (cd "$S" && apt-get "${A[@]}" source --download-only python3.13=3.13.5-2+deb13u5 >&2)
  cp "$S/python3.13_3.13.5.orig.tar.xz" "$S/cache/Python-3.13.5.tar.xz"
fi
PYTHON_BUILD_CACHE_PATH="$S/cache" MAKE_OPTS="${MAKE_OPTS:--j2}" \
  "$(pyenv root)/plugins/python-build/bin/python-build" 3.13.5t "$PREFIX" >&2
"$PY" -c 'import sys; assert not sys._is_gil_enabled()' >&2
echo "$PY"
