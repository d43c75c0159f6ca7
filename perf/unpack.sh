#!/usr/bin/env bash
# perf/unpack.sh - unpacking one image from an OCI layout, side by side, in one run:
#   unlade-1        one `unlade unpack` into an empty root
#   unlade-20proc   20 `unlade unpack` processes at once on one empty root
#   unlade-20lib    20 concurrent unpacks through the library in one process
#                   (engine/examples/concurrent_unpack.rs)
#   ctr-import      Debian's containerd (its own instance, own root and socket):
#                   `ctr images import` of the same layout (as a tar), which copies the
#                   blobs into its content store and unpacks into overlayfs snapshots
# and, with SYNC=1, `unlade unpack --sync` (written and syncfs modes) against unlade-1.
# Cases run in shuffled order, RUNS times each, every one from an empty root with the
# page cache holding the layout; `sync` (untimed) between runs. Prints medians.
#
# Usage: perf/unpack.sh [LAYOUT[:TAG]]      (default /tmp/unlade-images/golang:gz,
#        which ../shared/testimages/build.sh builds: IMAGES=golang build.sh)
# Env:   RUNS=5  N=20  WORK=/var/tmp (a disk file system, not tmpfs)  SYNC=0
# Needs: root, containerd (apt-get install containerd), a release build (done here).
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:-/tmp/unlade-images/golang:gz}
RUNS=${RUNS:-5}
N=${N:-20}
SYNC=${SYNC:-0}
layout=$ref tag=
if [[ ! -d $ref && $ref == *:* ]]; then layout=${ref%:*} tag=${ref##*:}; fi
[[ -f $layout/index.json ]] || { echo "no OCI layout at $layout" >&2; exit 1; }
command -v containerd >/dev/null || { echo "needs containerd: apt-get install containerd" >&2; exit 1; }

cargo build -q --release -p unlade --bin unlade --example concurrent_unpack
bin=$PWD/target/release/unlade
ex=$PWD/target/release/examples/concurrent_unpack
work=$(mktemp -d "${WORK:-/var/tmp}/unlade-perf.XXXXXX")
ctd_pid=
cleanup() {
  [[ -n $ctd_pid ]] && kill "$ctd_pid" 2>/dev/null && wait "$ctd_pid" 2>/dev/null || true
  mountpoint -q "$work" && umount "$work" || true
  rm -rf "$work"
}
trap cleanup EXIT

# containerd imports tar archives of layouts; the ref name annotation (a tag) gets a base name.
tar -C "$layout" -cf "$work/layout.tar" .
cat "$layout"/blobs/sha256/* > /dev/null   # page cache: every case reads warm blobs

start_containerd() {
  mkdir -p "$work/ctd"
  cat > "$work/ctd/config.toml" <<EOF
version = 2
root = "$work/ctd/root"
state = "$work/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/ctd/sock"
EOF
  containerd --config "$work/ctd/config.toml" > "$work/ctd/log" 2>&1 &
  ctd_pid=$!
  for _ in $(seq 100); do [[ -S $work/ctd/sock ]] && ctr -a "$work/ctd/sock" version >/dev/null 2>&1 && return; sleep 0.1; done
  echo "containerd did not start: $(tail -3 "$work/ctd/log")" >&2; exit 1
}
stop_containerd() {
  kill "$ctd_pid"; wait "$ctd_pid" 2>/dev/null || true; ctd_pid=
  umount -R "$work/ctd/root" 2>/dev/null || true
  rm -rf "$work/ctd"
}

now() { date +%s.%N; }
declare -A times
run_case() {
  local c=$1 root=$work/root t0 t1
  rm -rf "$root"; sync
  case $c in
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
      applied=$(grep -ho '[0-9]* applied here' "$work"/out.* | awk '{s+=$1} END {print s}')
      echo "    ($N processes: $applied layers applied in total)" ;;
    unlade-20lib)
      t0=$(now); "$ex" "$ref" "$root" "$N" > "$work/out"; t1=$(now)
      echo "    ($(head -1 "$work/out"))" ;;
    ctr-import)
      start_containerd
      t0=$(now)
      ctr -a "$work/ctd/sock" -n perf images import --base-name perf.local/image \
        --snapshotter overlayfs "$work/layout.tar" > "$work/out"
      t1=$(now)
      ctr -a "$work/ctd/sock" -n perf snapshots --snapshotter overlayfs ls | tail -n +2 | wc -l \
        | xargs -I{} echo "    (containerd: {} snapshots)"
      stop_containerd ;;
  esac
  rm -rf "$root"
  local dt; dt=$(echo "$t1 - $t0" | bc -l)
  times[$c]+="$dt "
  printf '  %-20s %7.3f s\n' "$c" "$dt"
}

cases=(unlade-1 unlade-20proc unlade-20lib ctr-import)
((SYNC)) && cases+=(unlade-sync-written unlade-sync-syncfs)
echo "image: $ref ($(du -sh "$layout" | cut -f1) layout); work dir: $work ($(df -T "$work" | awk 'NR==2{print $2}'))"
echo "machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB, $(uname -r); containerd $(containerd --version | awk '{print $3}')"
for r in $(seq "$RUNS"); do
  echo "run $r"
  for c in $(printf '%s\n' "${cases[@]}" | shuf); do run_case "$c"; done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "medians over $RUNS runs:"
base=$(echo "${times[unlade-1]}" | median)
for c in "${cases[@]}"; do
  m=$(echo "${times[$c]}" | median)
  printf '  %-20s %7.3f s   %5.2fx unlade-1\n' "$c" "$m" "$(echo "$m / $base" | bc -l)"
done
