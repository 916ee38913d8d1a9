#!/usr/bin/env bash
# Installs Debian's tmux (the terminal tests run `tokengate top` and a progress bar in a tmux pane
# and read its screen back) unless it is on PATH already. Needs root.
set -euo pipefail
if command -v tmux >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q tmux >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null
  apt-get install -y -q tmux >/dev/null
}
tmux -V >&2
