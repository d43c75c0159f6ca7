#!/usr/bin/env bash
# perf/scale.sh BIN LAYOUT - how `unlade unpack` scales with CPUs: one unpack at
# --parallel 1, 2, 4, 8 and 20 concurrent processes, into tmpfs (/dev/shm), 3 rounds
# in shuffled order; prints medians. Meant for a many-core machine (the device of
# the project's tooling), with a release binary and perf/synth-image.py's layout.
set -euo pipefail
bin=$1 layout=$2
root=/dev/shm/unlade-scale
echo "machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r)"
declare -A t
one() {
  local c=$1; rm -rf "$root"; sync
  local t0 t1; t0=$(date +%s.%N)
  case $c in
    p*) "$bin" unpack "$layout:latest" --root "$root" -q --parallel "${c#p}" > /dev/null ;;
    20proc) for i in $(seq 20); do "$bin" unpack "$layout:latest" --root "$root" -q > /dev/null & done; wait ;;
  esac
  t1=$(date +%s.%N); t[$c]+="$(awk "BEGIN{printf \"%.3f\", $t1 - $t0}") "
}
cases="p1 p2 p4 p8 20proc"
for r in 1 2 3; do for c in $(echo $cases | tr ' ' '\n' | shuf); do one "$c"; done; done
rm -rf "$root"
for c in $cases; do
  printf '%-8s %s  median %s\n' "$c" "${t[$c]}" "$(echo "${t[$c]}" | tr ' ' '\n' | grep . | sort -n | sed -n 2p)"
done
