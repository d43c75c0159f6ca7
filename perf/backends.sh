#!/usr/bin/env bash
# perf/backends.sh - the two executors of the file-writing workers side by side: `unlade
# unpack IMAGE:TAG` with `--backend uring` and `--backend syscalls`, per file system (a
# freshly made ext4 on a loop device with direct I/O, and a fresh tmpfs) and per number of
# worker threads. Every run starts from `sync; echo 3 > /proc/sys/vm/drop_caches`; cases
# are shuffled per round. Prints one line per run (with the 1-minute load average before
# it, to show how busy the shared machine was) and then, per case, the min and median wall
# time, median user and system CPU seconds and peak RSS (GNU time).
#
# Usage: perf/backends.sh [IMAGE:TAG ...]   (default golang:gz golang:zst golang:tar
#                                            manyfiles:gz manyfiles:zst manyfiles:tar)
# Env:   IMAGES_DIR=/tmp/unlade-images  RUNS=5  WORK=/var/tmp (a disk)
#        FSES="ext4 tmpfs"  THREADS="2"  BACKENDS="syscalls uring"
#        UNLADE_URING=... (the io_uring backend's tuning knobs, engine/src/layer/fsops/uring.rs);
#        a backend written `uring@KNOBS` (e.g. BACKENDS="uring uring@iowq=1:1") runs with
#        UNLADE_URING=KNOBS, so tunings can be compared in the same shuffled rounds.
# Needs: root, e2fsprogs, GNU time (/usr/bin/time).
set -euo pipefail
cd "$(dirname "$0")/.."
images_dir=${IMAGES_DIR:-/tmp/unlade-images}
RUNS=${RUNS:-5}
FSES=${FSES:-ext4 tmpfs}
THREADS=${THREADS:-2}
BACKENDS=${BACKENDS:-syscalls uring}
cases_in=("$@")
((${#cases_in[@]})) || cases_in=(golang:gz golang:zst golang:tar manyfiles:gz manyfiles:zst manyfiles:tar)
[[ -x /usr/bin/time ]] || { echo "needs GNU time: apt-get install time" >&2; exit 1; }

cargo build -q --release -p unlade --bin unlade
bin=$PWD/target/release/unlade
work=$(mktemp -d "${WORK:-/var/tmp}/unlade-backends.XXXXXX")
fsdir=$work/fs
mkdir -p "$fsdir"
source perf/lib.sh
trap cleanup_fs EXIT

# make_fs FS: an empty file system of kind FS at $fsdir.
make_fs() {
  case $1 in
    ext4)
      truncate -s 8G "$work/fs.img"
      mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$work/fs.img"
      loopdev=$(losetup --direct-io=on --find --show "$work/fs.img")
      mount "$loopdev" "$fsdir"
      ;;
    tmpfs) mount -t tmpfs -o size=8g tmpfs "$fsdir" ;;
  esac
}
unmake_fs() {
  umount "$fsdir"
  if [[ -n $loopdev ]]; then losetup -d "$loopdev"; loopdev=; fi
  rm -f "$work/fs.img"
}

all=()
for ic in "${cases_in[@]}"; do
  [[ -f $images_dir/${ic%:*}/index.json ]] || { echo "no layout $images_dir/${ic%:*}" >&2; exit 1; }
  for fs in $FSES; do for t in $THREADS; do for b in $BACKENDS; do
    all+=("$b/$fs/$ic/t$t")
  done; done; done
done

declare -A wall user sys rss
for ((r = 1; r <= RUNS; r++)); do
  mapfile -t order < <(printf '%s\n' "${all[@]}" | shuf)
  for c in "${order[@]}"; do
    IFS=/ read -r b fs ic t <<<"$c"
    make_fs "$fs"
    sync; echo 3 > /proc/sys/vm/drop_caches
    load=$(cut -d' ' -f1 /proc/loadavg)
    # A backend `uring@KNOBS` is the io_uring backend tuned with UNLADE_URING=KNOBS.
    tune=${UNLADE_URING:-}
    [[ $b == *@* ]] && tune=${b#*@}
    UNLADE_URING=$tune /usr/bin/time -f "%e %U %S %M" -o "$work/time" \
      "$bin" unpack "$images_dir/$ic" --root "$fsdir/root" -q --backend "${b%@*}" --threads "${t#t}" >/dev/null
    read -r e u s m < "$work/time"
    wall[$c]+="$e "; user[$c]+="$u "; sys[$c]+="$s "; rss[$c]+="$m "
    printf 'round %d  %-44s %6.2f s (user %5.2f sys %5.2f, %4d MB) load %s\n' \
      "$r" "$c" "$e" "$u" "$s" $((m / 1024)) "$load" >&2
    unmake_fs
  done
done

lo() { tr ' ' '\n' | grep . | sort -n | head -1; }
echo "| fs | image:tag | threads | backend | min s | median s | user s | sys s | peak RSS MB |"
echo "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
for fs in $FSES; do for ic in "${cases_in[@]}"; do for t in $THREADS; do for b in $BACKENDS; do
  c=$b/$fs/$ic/t$t
  printf '| %s | %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %d |\n' "$fs" "$ic" "$t" "$b" \
    "$(lo <<<"${wall[$c]}")" "$(median <<<"${wall[$c]}")" "$(median <<<"${user[$c]}")" \
    "$(median <<<"${sys[$c]}")" $(($(median <<<"${rss[$c]}" | cut -d. -f1) / 1024))
done; done; done; done
