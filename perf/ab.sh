#!/usr/bin/env bash
# perf/ab.sh A B IMAGE:TAG [ROUNDS] [-- UNLADE ARGS...]: two unlade binaries (or one binary
# with two argument sets, A="bin --backend uring") unpacking the same image, each run on a
# freshly made ext4 after dropping caches, A and B in shuffled order each round. Prints each
# run and the median wall, user and sys seconds and peak RSS of both, and B÷A of the medians.
# Run as root on a quiet machine; images from ../shared/testimages/build.sh in $IMAGES_DIR.
set -euo pipefail
a=$1 b=$2 img=$3 rounds=${4:-5}
shift 4 || shift $#
[[ ${1:-} == -- ]] && shift
images=${IMAGES_DIR:-/tmp/unlade-images}
name=${img%%:*} tag=${img#*:}
work=$(mktemp -d /var/tmp/unlade-ab.XXXXXX) fsdir=$work/mnt
mkdir -p "$fsdir"
. "$(dirname "$0")/lib.sh"
trap cleanup_fs EXIT
run() { # BIN-WITH-ARGS [UNLADE ARGS] -> "wall user sys rss"
  local bin=$1; shift
  fresh_fs
  sync; echo 3 > /proc/sys/vm/drop_caches
  # shellcheck disable=SC2086
  /usr/bin/time -o "$work/t" -f '%e %U %S %M' $bin unpack "$images/$name:$tag" --root "$fsdir/root" -q "$@" >/dev/null
  cat "$work/t"
  drop_fs
}
declare -a ra rb
for ((i = 0; i < rounds; i++)); do
  if ((RANDOM % 2)); then order="a b"; else order="b a"; fi
  for w in $order; do
    if [[ $w == a ]]; then r=$(run "$a" "$@"); ra+=("$r"); else r=$(run "$b" "$@"); rb+=("$r"); fi
    echo "round $i $w: $r"
  done
done
med() { # COLUMN ROWS...
  local c=$1; shift
  printf '%s\n' "$@" | awk -v c="$c" '{print $c}' | median
}
for col in 1 2 3 4; do
  ma=$(med $col "${ra[@]}") mb=$(med $col "${rb[@]}")
  label=$(echo "wall user sys rss_kb" | cut -d' ' -f$col)
  echo "$label A=$ma B=$mb B/A=$(awk -v x="$ma" -v y="$mb" 'BEGIN{printf "%.3f", y/x}')"
done
