#!/usr/bin/env bash
# Side-by-side: `unlade apply` against `pigz -dc | tar -x` and `tar -xf` on the same
# layer, in the same run, each tool once per round in a freshly shuffled order: on this
# VM the run right after `tar -xf` is measurably slower, and a fixed or rotated order
# pins that on one tool. Shuffling spreads it over all of them.
#
# Usage: perf/apply.sh LAYER.tar.gz [RUNS] [WORKDIR]
#   LAYER.tar.gz  a gzip layer, e.g. the Debian base layer that
#                 ../shared/testimages/build.sh writes to OUT/.layers/base.tar.gz
#   RUNS          timed runs per tool (default 5), after one warm-up each
#   WORKDIR       where outputs go (default /var/tmp/unlade-perf): the file system
#                 measured. Each run writes a fresh directory, removed (and synced) right
#                 after it is timed, so every tool starts from the same state: memory
#                 reused rather than first-touched (on a VM, first touches of guest memory
#                 are slow), and ext4 in the same after-delete state for all tools.
# Needs: root, GNU tar, pigz, python3 (for medians). Prints a markdown table.
# The input is read once first so every tool starts from the page cache.
set -euo pipefail
layer=$(realpath "$1")
runs=${2:-5}
work=${3:-/var/tmp/unlade-perf}
here=$(cd "$(dirname "$0")/.." && pwd)
(cd "$here" && cargo build --release -q)
unlade=$here/target/release/unlade
rm -rf "$work"
mkdir -p "$work"
cat "$layer" > /dev/null
# Layer facts from one unlade run.
facts=$("$unlade" apply "$layer" "$work/facts")
entries=$(head -1 <<<"$facts" | sed -E 's/applied ([0-9]+) entries.*/\1/')
bytes=$(head -1 <<<"$facts" | sed -E 's/.*, ([0-9]+) bytes uncompressed.*/\1/')
files=$(head -1 <<<"$facts" | sed -E 's/.*\(([0-9]+) files.*/\1/')
rm -rf "$work/facts"
tarflags=(--xattrs --xattrs-include='*' --same-owner --numeric-owner -p --delay-directory-restore)
declare -A cmds=(
  [unlade]="$unlade apply -q $layer OUT"
  [unlade-whole]="$unlade apply -q --decode whole $layer OUT"
  [pigz-tar]="pigz -dc $layer | tar ${tarflags[*]} -x -C OUT"
  [tar-xf]="tar ${tarflags[*]} -xf $layer -C OUT"
)
order=(unlade unlade-whole pigz-tar tar-xf)
declare -A times
for r in $(seq 0 "$runs"); do
  for t in $(printf '%s\n' "${order[@]}" | shuf); do
    out="$work/$t.$r"
    mkdir -p "$out"
    sync
    cmd=${cmds[$t]//OUT/$out}
    s=$(date +%s.%N)
    bash -c "$cmd" > /dev/null
    e=$(date +%s.%N)
    if ((r > 0)); then times[$t]+="$(python3 -c "print($e-$s)") "; fi
    rm -rf "$out"
    sync
    sleep 1
  done
done
rm -rf "$work"
fs=$(df -T "$(dirname "$work")" | awk 'NR==2{print $2}')
echo "layer: $(basename "$layer"), $(du -h "$layer" | cut -f1) gzip, $bytes bytes uncompressed, $entries entries ($files regular files); target fs: $fs; $(nproc) CPUs; $runs runs each"
echo
echo "| tool | median s | min s | max s | MB/s (uncompressed) | files/s | entries/s |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for t in "${order[@]}"; do
  python3 - "$t" "$bytes" "$files" "$entries" ${times[$t]} <<'PY'
import statistics, sys
t, b, f, n, *xs = sys.argv[1:]
xs = [float(x) for x in xs]
m = statistics.median(xs)
print(f"| {t} | {m:.3f} | {min(xs):.3f} | {max(xs):.3f} | {int(b)/m/1e6:.0f} | {int(f)/m:.0f} | {int(n)/m:.0f} |")
PY
done
