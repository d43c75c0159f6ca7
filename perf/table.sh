#!/usr/bin/env bash
# perf/table.sh - issue 11's whole table, in one run, on one machine:
#  1. perf/engine.sh on a fresh ext4 per case, then on a fresh tmpfs per case: every
#     IMAGE in gz, zst and tar; unlade with each backend at 1 thread and at all threads
#     (VARIANTS) against its peer (`pigz -dc | tar -x`, `zstd -dc | tar -x`, `tar -xf`);
#     cold cache, cases shuffled per round, RUNS rounds; min / median / max, CPU, peak RSS;
#  2. floors, warm, one core each, the best of 3: decode-only (`igzip -dc`,
#     `libdeflate-gunzip -dc`, `zstd -dc`, output to /dev/null), sha256 of the
#     uncompressed and of the compressed layers (`openssl dgst -sha256`), the copy of the
#     blobs into a file system (`cat > fresh ext4`, what unlade's content store does and
#     the peers do not), a cold read of the blobs;
#  3. perf/unpack.sh: `ctr images import` (Debian's containerd 1.6.20, overlayfs) against
#     one `unlade unpack` of golang:gz;
#  4. the targets, computed from the medians above (perf/table.py).
# The CPU floor of IMAGE:FMT is what any tool doing unlade's job must spend, divided by
# the CPUs: decode (igzip for gz: the fastest measured; zstd; nothing for tar) + sha256 of
# the uncompressed layers (the diff IDs) + sha256 of the compressed ones (the blob
# digests; for tar they are the same bytes, hashed once) + the copy into the content
# store + the kernel time of creating the files (the system CPU of `tar -xf` of the plain
# layers in the same run and on the same file system). The wall floor is the larger of
# that and the cold read.
#
# Usage: perf/table.sh            (about 35 minutes on 2 CPUs; keep the machine quiet)
# Env:   IMAGES="golang manyfiles base redis"  RUNS=5  IMAGES_DIR=/tmp/unlade-images
#        VARIANTS="syscalls:1 syscalls:0 uring:1 uring:0"  OUT=perf/table-DATE.txt
#        SKIP_CTR=1 (no containerd part)
#        RAW_FROM=FILE: no sections 1 and 3; the runs of section 1 are read from FILE (the
#                 .raw.tsv of an earlier run), and the floors and targets made again
# Needs: what perf/engine.sh and perf/unpack.sh need, and igzip (apt-get install isal),
#        libdeflate-gunzip (libdeflate-tools), openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
export IMAGES_DIR=${IMAGES_DIR:-/tmp/unlade-images}
export RUNS=${RUNS:-5}
export VARIANTS=${VARIANTS:-"syscalls:1 syscalls:0 uring:1 uring:0"}
read -ra images <<< "${IMAGES:-golang manyfiles base redis}"
out=${OUT:-perf/table-$(date +%F).txt}
for t in igzip libdeflate-gunzip zstd openssl pigz; do
  command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done
cases=()
for i in "${images[@]}"; do for f in gz zst tar; do cases+=("$i:$f"); done; done

cargo build -q --release -p unlade --bin unlade
work=$(mktemp -d "${WORK:-/var/tmp}/unlade-table.XXXXXX")
fsdir=$work/fs
mkdir -p "$fsdir"
source perf/lib.sh
trap cleanup_fs EXIT


# cpu CMD: user + system CPU seconds of `bash -c CMD`, the least of 3 (warm).
cpu() {
  local best= t
  for _ in 1 2 3; do
    /usr/bin/time -f "%U %S" -o "$work/t" bash -c "$1" >/dev/null
    t=$(awk '{print $1 + $2}' "$work/t")
    if [[ -z $best ]] || (($(bc -l <<<"$t < $best"))); then best=$t; fi
  done
  printf '%.3f' "$best"
}

{
  echo "# perf/table.sh, $(date -u +%FT%TZ), unlade $(git rev-parse --short HEAD)"
  echo "# machine: $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p')), $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# RUNS=$RUNS VARIANTS=\"$VARIANTS\" (threads 0 = the default: one per CPU)"
  echo
  if [[ -n ${RAW_FROM:-} ]]; then
    echo "## 1. (runs read from $RAW_FROM)"
    cp "$RAW_FROM" "$work/raw.tsv"
  else
    echo "## 1a. fresh ext4 per case, cold cache"
    FS=ext4 RAW=$work/raw.tsv perf/engine.sh "${cases[@]}"
    echo
    echo "## 1b. fresh tmpfs per case, cold cache"
    FS=tmpfs RAW=$work/raw.tsv perf/engine.sh "${cases[@]}"
    # Kept now: a later section that fails (a full disk under containerd)
    # must not take the runs with it; RAW_FROM= remakes the rest.
    cp "$work/raw.tsv" "${out%.txt}.raw.tsv"
  fi
  echo
  echo "## 2. floors (warm, one core, CPU seconds, best of 3)"
  printf 'image\tigzip\tlibdeflate\tzstd\tsha256_plain\tsha256_gz\tsha256_zst\tstore_gz\tstore_zst\tstore_tar\tcold_read_gz\tcold_read_zst\tcold_read_tar\n' > "$work/floors.tsv"
  for i in "${images[@]}"; do
    declare -A blobs=()
    for f in gz zst tar; do blobs[$f]=$(layers_of "$IMAGES_DIR/$i" $f); done
    gz=${blobs[gz]} zst=${blobs[zst]} tar=${blobs[tar]}
    cat $gz $zst $tar > /dev/null
    ig=0 ld=0
    for l in $gz; do
      ig=$(awk -v a="$ig" -v b="$(cpu "igzip -dc $l > /dev/null")" 'BEGIN {printf "%.3f", a + b}')
      ld=$(awk -v a="$ld" -v b="$(cpu "libdeflate-gunzip -dc $l > /dev/null")" 'BEGIN {printf "%.3f", a + b}')
    done
    zs=$(cpu "for l in $zst; do zstd -qdc \$l; done > /dev/null")
    sp=$(cpu "openssl dgst -sha256 $tar")
    sg=$(cpu "openssl dgst -sha256 $gz")
    sz=$(cpu "openssl dgst -sha256 $zst")
    row="$i\t$ig\t$ld\t$zs\t$sp\t$sg\t$sz"
    for f in gz zst tar; do
      fresh_fs
      /usr/bin/time -f "%U %S" -o "$work/t" bash -c "cat ${blobs[$f]} > $fsdir/blobs"
      row+="\t$(awk '{printf "%.3f", $1 + $2}' "$work/t")"
      drop_fs
    done
    for f in gz zst tar; do
      sync; echo 3 > /proc/sys/vm/drop_caches
      t0=$(now); cat ${blobs[$f]} > /dev/null; t1=$(now)
      row+="\t$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
    done
    printf "$row\n" >> "$work/floors.tsv"
  done
  column -t "$work/floors.tsv"
  if [[ ${SKIP_CTR:-0} != 1 && -z ${RAW_FROM:-} ]]; then
    echo
    echo "## 3. containerd: ctr images import against unlade unpack (warm input, fresh ext4)"
    CASES="unlade-1 ctr-import" perf/unpack.sh "$IMAGES_DIR/golang:gz"
  fi
  echo
  echo "## 4. targets (medians of section 1; floors of section 2)"
  python3 perf/table.py "$work/raw.tsv" "$work/floors.tsv" "$(nproc)"
} | tee "$out"
if [[ -n ${RAW_FROM:-} ]]; then echo "wrote $out" >&2; else echo "wrote $out and ${out%.txt}.raw.tsv" >&2; fi
