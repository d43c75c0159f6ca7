#!/usr/bin/env bash
# A short cargo-fuzz run of the apply target (parser + applier into a temp
# dir, checking nothing next to DEST changes), from the committed seeds.
# FUZZ_SECONDS sets the length (default 60). Runs on the stable toolchain
# (no sanitizer); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
mkdir -p corpus/apply
cargo fuzz run -s none apply corpus/apply seeds -- \
  -max_total_time="${FUZZ_SECONDS:-60}" -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tail -n 15
