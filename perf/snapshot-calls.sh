#!/usr/bin/env bash
# perf/snapshot-calls.sh A B [N] [ROUNDS]: two unlade binaries serving `unlade snapshotter`,
# each timed on N Prepares and N Removes (perf/snapshot_calls.py, one call at a time; default
# 2000) on a freshly made ext4, A and B in shuffled order each round (default 5). Prints each
# run and the medians. Run as root on a quiet machine.
set -euo pipefail
a=$1 b=$2 n=${3:-2000} rounds=${4:-5}
work=$(mktemp -d /var/tmp/unlade-calls.XXXXXX) fsdir=$work/mnt
mkdir -p "$fsdir"
. "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
pid=
trap 'if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi; cleanup_fs' EXIT
run() { # BIN -> "prepare_s remove_s"
  fresh_fs
  "$1" --root "$fsdir/root" snapshotter --address "$fsdir/s.sock" --no-fast-path 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do [[ -S $fsdir/s.sock ]] && break; sleep 0.1; done
  /usr/bin/python3 "$here/snapshot_calls.py" "$fsdir/s.sock" "$n" | awk '{print $3, $7}'
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  drop_fs
}
declare -a ra rb
for ((i = 0; i < rounds; i++)); do
  if ((RANDOM % 2)); then order="a b"; else order="b a"; fi
  for w in $order; do
    r=$(run "$([[ $w == a ]] && echo "$a" || echo "$b")")
    echo "$w: $n Prepares, $n Removes (s): $r"
    if [[ $w == a ]]; then ra+=("$r"); else rb+=("$r"); fi
  done
done
median() { sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
for w in a b; do
  if [[ $w == a ]]; then set -- "${ra[@]}"; else set -- "${rb[@]}"; fi
  p=$(printf '%s\n' "$@" | awk '{print $1}' | median)
  r=$(printf '%s\n' "$@" | awk '{print $2}' | median)
  echo "median $w: Prepares $p s, Removes $r s"
done
