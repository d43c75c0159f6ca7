#!/usr/bin/env bash
# A short cargo-fuzz run of every target (fuzz/fuzz_targets/), as CI runs
# it: first each target's saved reproducers (fuzz/regressions/<target>/,
# each input run once), then FUZZ_SECONDS (default 20) of fuzzing from the
# committed corpus (fuzz/corpus/<target>/) and seeds (fuzz/seeds/). New
# inputs go to a scratch directory, so the committed corpora stay as they
# are (scripts/fuzz-campaign.sh grows them). Fails on the first crash,
# leaving the artifact in fuzz/artifacts/<target>/. Runs on the stable
# toolchain (no sanitizer); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
source ../scripts/fuzz-lib.sh
fuzz_install
cargo fuzz build -s none
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in $(fuzz_targets); do
  fuzz_replay "$t"
  mkdir -p "$scratch/$t"
  corpora=("$scratch/$t")
  [[ -d corpus/$t ]] && corpora+=("corpus/$t")
  # shellcheck disable=SC2207
  corpora+=($(fuzz_seed_dirs "$t"))
  echo "== $t: ${FUZZ_SECONDS:-20} s from ${corpora[*]:1}"
  log=$scratch/$t.log
  # shellcheck disable=SC2046
  if ! cargo fuzz run -s none "$t" "${corpora[@]}" -- $(fuzz_opts "$t") \
    -max_total_time="${FUZZ_SECONDS:-20}" -print_final_stats=1 >"$log" 2>&1; then
    grep -m1 -A12 -E "panicked at|ERROR: libFuzzer|==ERROR" "$log" || tail -n 40 "$log"
    grep -A1 "Test unit written" "$log" || true
    echo "fuzz smoke: $t crashed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  echo "$t: $(fuzz_stat "$log" number_of_executed_units) execs, $(fuzz_stat "$log" average_exec_per_sec)/s, $(fuzz_stat "$log" peak_rss_mb) MB peak"
done
