#!/usr/bin/env bash
# Model-checks the engine's sleep/wake and shutdown handshakes with loom.
set -euo pipefail
cd "$(dirname "$0")/.."
LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}" RUSTFLAGS="--cfg loom" \
  CARGO_TARGET_DIR=target/loom cargo test --release --no-default-features --lib -q pool::loom_tests
