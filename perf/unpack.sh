#!/usr/bin/env bash
# perf/unpack.sh - unpacking one image from an OCI layout, side by side, in one run:
#   unlade-1        one `unlade unpack` into an empty root
#   unlade-20proc   20 `unlade unpack` processes at once on one empty root
#   unlade-20lib    20 concurrent unpacks through the library in one process
#                   (engine/examples/concurrent_unpack.rs)
#   ctr-import      Debian's containerd (its own instance, own root and socket):
#                   `ctr images import` of the same layout (as a tar), which copies the
#                   blobs into its content store and unpacks into overlayfs snapshots
# and, with SYNC=1, `unlade unpack --sync` in both modes (written, syncfs); with BUSY=1,
# unlade-1 and both sync modes again while another process writes 4 GiB to the same file
# system (the case where syncfs also waits for someone else's data).
# Cases run in shuffled order, RUNS times each, every one on a freshly made ext4 (a loop
# device over a sparse file in WORK, direct I/O, mounted noinit_itable), so no case pays
# for the deletions or the fragmentation of the one before; the page cache holds the
# layout. Set-up and tear-down are not timed. Prints medians and ratios to unlade-1.
#
# Usage: perf/unpack.sh [LAYOUT[:TAG]]      (default /tmp/unlade-images/golang:gz,
#        which ../shared/testimages/build.sh builds: IMAGES=golang build.sh)
# Env:   RUNS=5  N=20  WORK=/var/tmp (on a disk)  SYNC=0  CASES="unlade-1 ..." (a subset)
# Needs: root, containerd (apt-get install containerd), e2fsprogs, bc.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:-/tmp/unlade-images/golang:gz}
RUNS=${RUNS:-5}
N=${N:-20}
SYNC=${SYNC:-0}
BUSY=${BUSY:-0}
layout=$ref
if [[ ! -d $ref && $ref == *:* ]]; then layout=${ref%:*}; fi
[[ -f $layout/index.json ]] || { echo "no OCI layout at $layout" >&2; exit 1; }
command -v containerd >/dev/null || { echo "needs containerd: apt-get install containerd" >&2; exit 1; }

cargo build -q --release -p unlade --bin unlade --example concurrent_unpack
bin=$PWD/target/release/unlade
ex=$PWD/target/release/examples/concurrent_unpack
work=$(mktemp -d "${WORK:-/var/tmp}/unlade-perf.XXXXXX")
fsdir=$work/fs
mkdir -p "$fsdir"
source perf/lib.sh
trap cleanup_fs EXIT

# containerd imports tar archives of layouts; a ref name annotation that is only a tag
# gets --base-name in front.
tar -C "$layout" -cf "$work/layout.tar" .
cat "$layout"/blobs/sha256/* "$work/layout.tar" > /dev/null   # every case reads warm input


declare -A times round ratios
run_case() {
  local c=$1 root=$fsdir/root t0 t1
  fresh_fs
  [[ $c == ctr-import ]] && start_containerd 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
  local busy=
  if [[ $c == *-busy ]]; then
    # Another writer on the same file system (a container writing logs, a
    # build): 4 GiB of dirty data produced during the unpack.
    dd if=/dev/zero of="$fsdir/other-writer" bs=1M count=4096 status=none &
    busy=$!
  fi
  case ${c%-busy} in
    unlade-1)
      t0=$(now); "$bin" unpack "$ref" --root "$root" -q > "$work/out"; t1=$(now) ;;
    unlade-sync-written)
      t0=$(now); "$bin" unpack "$ref" --root "$root" -q --sync --sync-mode written > "$work/out"; t1=$(now) ;;
    unlade-sync-syncfs)
      t0=$(now); "$bin" unpack "$ref" --root "$root" -q --sync --sync-mode syncfs > "$work/out"; t1=$(now) ;;
    unlade-20proc)
      t0=$(now)
      for i in $(seq "$N"); do "$bin" unpack "$ref" --root "$root" > "$work/out.$i" & done
      wait; t1=$(now)
      echo "    ($N processes: $(grep -ho '[0-9]* applied here' "$work"/out.* | awk '{s+=$1} END {print s}') layers applied in total)" ;;
    unlade-20lib)
      t0=$(now); "$ex" "$ref" "$root" "$N" > "$work/out"; t1=$(now)
      echo "    ($(head -1 "$work/out"))" ;;
    ctr-import)
      t0=$(now)
      ctr -a "$work/ctd/sock" -n perf images import --base-name perf.local/image \
        --snapshotter overlayfs "$work/layout.tar" > "$work/out"
      t1=$(now)
      echo "    (containerd: $(ctr -a "$work/ctd/sock" -n perf snapshots --snapshotter overlayfs ls | tail -n +2 | wc -l) snapshots)" ;;
  esac
  [[ $c == ctr-import ]] && stop_containerd
  if [[ -n $busy ]]; then kill "$busy" 2>/dev/null || true; wait "$busy" 2>/dev/null || true; fi
  drop_fs
  local dt; dt=$(echo "$t1 - $t0" | bc -l)
  times[$c]+="$dt "
  round[$c]=$dt
  printf '  %-24s %7.3f s\n' "$c" "$dt"
}

read -ra cases <<< "${CASES:-unlade-1 unlade-20proc unlade-20lib ctr-import}"
((SYNC)) && cases+=(unlade-sync-written unlade-sync-syncfs)
((BUSY)) && cases+=(unlade-1-busy unlade-sync-written-busy unlade-sync-syncfs-busy)
echo "image: $ref ($(du -sh "$layout" | cut -f1) layout); fresh ext4 per case on a loop device in $work"
echo "machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r); containerd $(containerd --version | awk '{print $3}'); unlade $(git rev-parse --short HEAD)"
for r in $(seq "$RUNS"); do
  echo "run $r"
  for c in $(printf '%s\n' "${cases[@]}" | shuf); do run_case "$c"; done
  # Ratios within one round cancel the machine's drift between rounds.
  for c in "${cases[@]}"; do ratios[$c]+="$(echo "${round[$c]} / ${round[${cases[0]}]}" | bc -l) "; done
done

echo
echo "medians over $RUNS runs:"
base_case=${cases[0]}
base=$(echo "${times[$base_case]}" | median)
for c in "${cases[@]}"; do
  m=$(echo "${times[$c]}" | median)
  printf '  %-24s %7.3f s   %5.2fx %s   (median of per-round ratios %5.2fx)\n' "$c" "$m" \
    "$(echo "$m / $base" | bc -l)" "$base_case" "$(echo "${ratios[$c]}" | median)"
done
