#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver (the dashboard's browser test drives them with
# selenium; nothing is downloaded at test time) unless both are on PATH already. Needs root.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null
  apt-get install -y -q chromium chromium-driver >/dev/null
}
chromium --version >&2
