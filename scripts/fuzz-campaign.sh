#!/usr/bin/env bash
# A fuzzing campaign: every target (or those named as arguments) in turn,
# one libFuzzer process at a time, on the stable toolchain (`-s none`),
# growing fuzz/corpus/<target>/ from it and the seeds (fuzz/seeds/).
#
#   FUZZ_SECONDS_PER_TARGET=480 scripts/fuzz-campaign.sh
#   FUZZ_TOTAL_SECONDS=3600 scripts/fuzz-campaign.sh        # split evenly
#   FUZZ_MINIMIZE=1 ...   # then merge each corpus down (same edges, few inputs)
#   FUZZ_SECONDS_PER_TARGET=0 FUZZ_MINIMIZE=1 ...   # only that
#
# Prints, per target, the executions (libFuzzer's
# stat::number_of_executed_units), their rate, the corpus size and whether
# it crashed; a crash stops that target's run (the next target still
# runs), and its artifact is copied to fuzz/regressions/<target>/, which
# scripts/fuzz-smoke.sh replays. Logs are kept in fuzz/artifacts/logs/.
# Exits non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
source ../scripts/fuzz-lib.sh
fuzz_install
cargo fuzz build -s none

if (($#)); then
  targets=("$@")
else
  # shellcheck disable=SC2207
  targets=($(fuzz_targets))
fi
if [[ -n ${FUZZ_SECONDS_PER_TARGET:-} ]]; then
  per=$FUZZ_SECONDS_PER_TARGET
else
  per=$((${FUZZ_TOTAL_SECONDS:-3600} / ${#targets[@]}))
fi
echo "== campaign: ${targets[*]}, $per s each"

mkdir -p artifacts/logs
summary=()
crashed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  before=$(find "corpus/$t" -type f | wc -l)
  # shellcheck disable=SC2207
  seeds=($(fuzz_seed_dirs "$t"))
  log=artifacts/logs/$t.log
  ((per > 0)) || continue
  echo "== $t: $per s, corpus $before inputs, seeds ${seeds[*]:-none}"
  start=$(date +%s)
  rc=0
  # shellcheck disable=SC2046
  cargo fuzz run -s none "$t" "corpus/$t" "${seeds[@]}" -- $(fuzz_opts "$t") \
    -max_total_time="$per" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  secs=$(($(date +%s) - start))
  execs=$(fuzz_stat "$log" number_of_executed_units)
  rate=$(fuzz_stat "$log" average_exec_per_sec)
  rss=$(fuzz_stat "$log" peak_rss_mb)
  after=$(find "corpus/$t" -type f | wc -l)
  size=$(du -sh "corpus/$t" | cut -f1)
  new=$(fuzz_keep_artifacts "$t")
  if ((rc)); then
    crashed=1
    verdict="CRASHED (rc $rc; $new new reproducer(s) in fuzz/regressions/$t/)"
    grep -m1 -A12 -E "panicked at|ERROR: libFuzzer|==ERROR" "$log" || tail -n 20 "$log"
  else
    verdict="no crash"
  fi
  line="$t: ${secs} s, ${execs:-?} execs (${rate:-?}/s), peak ${rss:-?} MB, corpus $before -> $after inputs ($size), $verdict"
  echo "$line"
  summary+=("$line")
done

if [[ ${FUZZ_MINIMIZE:-0} == 1 ]]; then
  for t in "${targets[@]}"; do
    echo "== $t: minimizing corpus/$t"
    fuzz_minimize "$t"
    echo "$t: corpus now $(find "corpus/$t" -type f | wc -l) inputs ($(du -sh "corpus/$t" | cut -f1))"
  done
fi

echo "== summary"
((${#summary[@]})) && printf '%s\n' "${summary[@]}"
exit "$crashed"
