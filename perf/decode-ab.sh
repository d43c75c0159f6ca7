#!/usr/bin/env bash
# Whole-buffer (libdeflate, --decode whole) against streaming (zlib-rs on three threads,
# the default with two or more CPUs) on one gzip
# layer: the two run alternately, pair after pair, each into a fresh directory removed
# outside the timing. Prints each path's median and the median of the per-pair ratios.
#
# Usage: perf/decode-ab.sh LAYER.tar.gz [PAIRS] [WORKDIR]   (default 12, /var/tmp/unlade-ab)
set -euo pipefail
layer=$(realpath "$1")
pairs=${2:-12}
work=${3:-/var/tmp/unlade-ab}
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release -q)
unlade=$here/target/release/unlade
mkdir -p "$work"
cat "$layer" > /dev/null
whole=()
stream=()
for _ in $(seq 1 "$pairs"); do
  for mode in whole streaming; do
    rm -rf "$work/o"
    sync
    sleep 0.5
    s=$(date +%s%N)
    "$unlade" apply -q --decode "$mode" "$layer" "$work/o" > /dev/null
    e=$(date +%s%N)
    if [[ $mode == whole ]]; then whole+=($(((e - s) / 1000000))); else stream+=($(((e - s) / 1000000))); fi
  done
done
rm -rf "$work"
python3 - "${whole[*]}" "${stream[*]}" <<'PY'
import statistics as st, sys
a = [int(x) for x in sys.argv[1].split()]
b = [int(x) for x in sys.argv[2].split()]
print(f"whole-buffer median {st.median(a)} ms, streaming median {st.median(b)} ms, "
      f"median ratio whole/streaming {st.median([x / y for x, y in zip(a, b)]):.3f} ({len(a)} pairs)")
PY
