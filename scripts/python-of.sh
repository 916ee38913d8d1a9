#!/usr/bin/env bash
# Prints the newest pyenv CPython X.Y (GIL build) interpreter, or fails naming what is missing.
# usage: scripts/python-of.sh 3.12
set -euo pipefail
v="${1:?usage: scripts/python-of.sh X.Y}"
root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
py=$(ls -d "$root"/versions/"$v".*/bin/python"$v" 2>/dev/null | grep -v 't/bin' | sort -V | tail -1 || true)
if [ -z "$py" ]; then
  echo "CPython $v is not installed under $root (pyenv install $v)" >&2
  exit 1
fi
echo "$py"
