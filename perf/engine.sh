#!/usr/bin/env bash
# perf/engine.sh - the write engine against one GNU tar process, side by side, in one run
# (issue 11's table): for each IMAGE:TAG, `unlade unpack` of the OCI layout into an empty
# root against its peer applying the same layer blobs in order —
#   tar  ->  tar -xf LAYER            gz  ->  pigz -dc LAYER | tar -x
#   zst  ->  zstd -dc LAYER | tar -x
# Every case runs on a freshly made ext4 (perf/lib.sh: loop device, direct I/O) after
# `sync; echo 3 > /proc/sys/vm/drop_caches`, so input and output start cold for all;
# cases are shuffled per round. Prints, per case, the median wall time with min/max,
# the median user and system CPU seconds and peak RSS (GNU time), and the peer ÷ unlade
# ratio of medians. Set-up (mkfs, mount) and tear-down are not timed.
#
# Usage: perf/engine.sh [IMAGE:TAG ...]   (default golang:gz golang:zst golang:tar
#                                          manyfiles:tar manyfiles:gz)
# Env:   IMAGES_DIR=/tmp/unlade-images (../shared/testimages/build.sh builds it)
#        RUNS=3  WORK=/var/tmp (a disk)
#        VARIANTS="auto:0" - unlade runs per case, BACKEND:THREADS each (0: the default,
#                 one per CPU), e.g. VARIANTS="syscalls:1 syscalls:0 uring:1 uring:0"
#        FS=ext4 (a fresh ext4 per case) or FS=tmpfs (a fresh tmpfs per case)
#        RAW=FILE - also append one line per run: fs, round, case, wall s, user s, sys s,
#                 peak RSS KB (tab-separated; perf/table.sh reads it)
# Needs: root, e2fsprogs, GNU tar, pigz, zstd, GNU time (/usr/bin/time), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
images_dir=${IMAGES_DIR:-/tmp/unlade-images}
RUNS=${RUNS:-3}
cases_in=("$@")
((${#cases_in[@]})) || cases_in=(golang:gz golang:zst golang:tar manyfiles:tar manyfiles:gz)
[[ -x /usr/bin/time ]] || { echo "needs GNU time: apt-get install time" >&2; exit 1; }

cargo build -q --release -p unlade --bin unlade
bin=$PWD/target/release/unlade
work=$(mktemp -d "${WORK:-/var/tmp}/unlade-engine.XXXXXX")
fsdir=$work/fs
mkdir -p "$fsdir"
source perf/lib.sh
trap cleanup_fs EXIT
tarflags="--xattrs --xattrs-include=* --same-owner --numeric-owner -p --delay-directory-restore"

# cmd_of CASE OUT: the command line of a case, writing under OUT.
cmd_of() {
  local c=$1 out=$2 img=${1#*/} tool=${1%%/*}
  local name=${img%:*} tag=${img#*:}
  if [[ $tool == unlade-* ]]; then
    local v=${tool#unlade-} threads=""
    [[ ${v#*-} != 0 ]] && threads="--threads ${v#*-}"
    echo "$bin unpack $images_dir/$name:$tag --root $out -q --backend ${v%-*} $threads >/dev/null"
    return
  fi
  local s="mkdir -p $out"
  for l in $(layers_of "$images_dir/$name" "$tag"); do
    case $tag in
      tar) s+=" && tar $tarflags -xf $l -C $out" ;;
      gz) s+=" && pigz -dc $l | tar $tarflags -x -C $out" ;;
      zst) s+=" && zstd -qdc $l | tar $tarflags -x -C $out" ;;
    esac
  done
  echo "$s"
}
peer_of() { case ${1#*:} in tar) echo tar-xf ;; gz) echo pigz-tar ;; zst) echo zstd-tar ;; esac; }

variants=(${VARIANTS:-auto:0})
unlades=()
for v in "${variants[@]}"; do unlades+=("unlade-${v%:*}-${v#*:}"); done
all=()
for ic in "${cases_in[@]}"; do
  [[ -f $images_dir/${ic%:*}/index.json ]] || { echo "no layout $images_dir/${ic%:*}" >&2; exit 1; }
  for u in "${unlades[@]}"; do all+=("$u/$ic"); done
  all+=("$(peer_of "$ic")/$ic")
done
if [[ ${FS:-ext4} == tmpfs ]]; then
  fresh_fs() { mount -t tmpfs -o size=12G tmpfs "$fsdir"; }
  drop_fs() { umount "$fsdir"; }
fi

declare -A wall user sys rss
for ((r = 1; r <= RUNS; r++)); do
  mapfile -t order < <(printf '%s\n' "${all[@]}" | shuf)
  for c in "${order[@]}"; do
    fresh_fs
    cmd=$(cmd_of "$c" "$fsdir/out")
    sync; echo 3 > /proc/sys/vm/drop_caches
    /usr/bin/time -f "%e %U %S %M" -o "$work/time" bash -c "$cmd"
    read -r e u s m < "$work/time"
    wall[$c]+="$e "; user[$c]+="$u "; sys[$c]+="$s "; rss[$c]+="$m "
    [[ -n ${RAW:-} ]] && printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${FS:-ext4}" "$r" "$c" "$e" "$u" "$s" "$m" >> "$RAW"
    printf 'round %d  %-22s %6.2f s (user %5.2f sys %5.2f, %d MB)\n' "$r" "$c" "$e" "$u" "$s" $((m / 1024)) >&2
    drop_fs
  done
done

mm() { tr ' ' '\n' | grep . | sort -n | sed -n '1p;$p' | tr '\n' ' '; }
echo "file system: ${FS:-ext4}, $RUNS rounds, $(nproc) CPUs, $(uname -r)"
echo "| case | median s | min–max s | user s | sys s | peak RSS MB | peer ÷ unlade |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for ic in "${cases_in[@]}"; do
  p=$(peer_of "$ic")/$ic
  mp=$(median <<<"${wall[$p]}")
  for c in "${unlades[@]/%//$ic}" "$p"; do
    read -r lo hi <<<"$(mm <<<"${wall[$c]}")"
    ratio=$([[ $c != "$p" ]] && echo "$(bc -l <<<"scale=2; $mp / $(median <<<"${wall[$c]}")")x" || echo "")
    printf '| %s | %.2f | %.2f–%.2f | %.2f | %.2f | %d | %s |\n' "$c" "$(median <<<"${wall[$c]}")" "$lo" "$hi" \
      "$(median <<<"${user[$c]}")" "$(median <<<"${sys[$c]}")" $(($(median <<<"${rss[$c]}" | cut -d. -f1) / 1024)) "$ratio"
  done
done
