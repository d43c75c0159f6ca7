#!/usr/bin/env bash
# perf/pull.sh - the seed's experiment: one pull vs 20 concurrent pulls of the same image,
# unlade vs containerd, each from an empty root, in one run.
#
# Builds redis-like and golang-like images from Debian packages (perf/build-images.sh),
# serves them from Debian's docker-registry on 127.0.0.1 (pushed with skopeo), and times:
#   unlade-1        one `unlade pull` (with $UNLADE_ARGS, if set)
#   unlade-1s       one `unlade pull --blob-connections 1`: every blob over one stream, as
#                   before ranged fetch
#   cri-chunked-1   cri-1 with containerd's chunked fetch (2.1+): max_concurrent_downloads
#                   and concurrent_layer_fetch_buffer = $CHUNKED (default 16:16777216),
#                   for the transfer service and CRI alike
#   unlade-20proc   20 `unlade pull` processes at once on one root
#   unlade-20lib    20 concurrent `Root::pull` calls in one process (examples/concurrent_pull.rs)
#   ctr-1           Debian's containerd (own instance, root and socket): one `ctr images pull`
#                   (fetch + unpack into overlayfs)
#   ctr-20          20 `ctr images pull` processes at once on that containerd
#   cri-1, cri-20   1 / 20 concurrent CRI PullImage calls (perf/cri_pull.py; containerd's CRI
#                   image service, where its duplicate suppression lives; needs grpcio:
#                   Debian's python3-grpcio), snapshotter overlayfs
#   cri-unlade-1, cri-unlade-20
#                   the same with snapshotter unlade: `unlade snapshotter` beside containerd
#                   as its proxy plugin, configured as `unlade containerd-config` prints for
#                   the version, so unlade pulls each image itself (the fast path); its root
#                   on the same fresh ext4
#   cri-unlade-keep-1, cri-unlade-discard-1
#                   cri-unlade-1 with --blobs keep or discard (cri-unlade-1 hands the layer
#                   blobs to containerd's content store, the default); each notes when the
#                   blobs settled after the pull's answer and the blob bytes each store holds
#   cri-unlade-proxy-1
#                   cri-unlade-1 through unlade's CRI proxy (--cri-listen): what the proxy
#                   costs a pull
#   CASE@B          a cri-unlade-* case with the unlade binary $UNLADE_B instead (an A/B of two
#                   builds in one run, interleaved)
# containerd: CTD=1.6 (the system's, default), 1.7 or 2.1 (scripts/containerd-peers.sh);
# on 2.1 MODE=transfer (CRI through the transfer service, its default) or MODE=local
# (use_local_image_pull). CRI's registry is a hosts.toml (config_path) in every case, as
# 2.1's transfer mode needs.
# Every case starts on a freshly made ext4 (loop device over a sparse file, direct I/O), so
# no case pays for the one before; registry storage and page cache are warm. Shuffled order,
# RUNS rounds; prints medians and ratios to unlade-1 (also per round), and the peak RSS
# (VmHWM) of every process involved: the pull command, containerd, unlade's snapshotter.
#
# Usage: perf/pull.sh                  Env: IMAGES="redis golang" RUNS=3 N=20
#        CASES="unlade-1 ..." (subset)  IMGDIR=/var/tmp/unlade-pull-images (built once, reused)
#        WORK=/var/tmp  CTD=1.6|1.7|2.1  MODE=transfer|local (2.1)  COLD=1 (drop caches
#        before each case: the registry's storage read from disk)  AUTH=1 (a private
#        registry: Basic auth, the credentials only in the CRI requests; cri-* cases only)
#        THROTTLE=RATE[:LATENCY] (every connection to the registry capped at RATE MB/s,
#        each request delayed LATENCY ms, default 20: perf/throttle.py)
# Needs: root; apt-get install containerd docker-registry skopeo pigz e2fsprogs bc.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
N=${N:-20}
IMAGES=${IMAGES:-redis golang}
IMGDIR=${IMGDIR:-/var/tmp/unlade-pull-images}
for t in docker-registry skopeo mkfs.ext4 bc; do
  command -v $t >/dev/null || { echo "needs $t (apt-get install docker-registry skopeo e2fsprogs bc)" >&2; exit 1; }
done
MODE=${MODE:-transfer}
[[ $MODE == transfer || $MODE == local ]] || { echo "MODE=$MODE: transfer or local" >&2; exit 1; }
for img in $IMAGES; do
  [[ -f $IMGDIR/$img/index.json ]] || IMAGES=$IMAGES perf/build-images.sh "$IMGDIR"
done

cargo build -q --release -p unlade --bin unlade --example concurrent_pull
bin=$PWD/target/release/unlade
ex=$PWD/target/release/examples/concurrent_pull
work=$(mktemp -d "${WORK:-/var/tmp}/unlade-pull.XXXXXX")
fsdir=$work/fs
mkdir -p "$fsdir"
source perf/lib.sh
reg_pid=
cleanup() {
  if [[ -n ${thr_pid:-} ]]; then kill "$thr_pid" 2>/dev/null; wait "$thr_pid" 2>/dev/null || true; fi
  if [[ -n $reg_pid ]]; then kill "$reg_pid" 2>/dev/null; wait "$reg_pid" 2>/dev/null || true; fi
  if [[ -n ${snap_pid:-} ]]; then kill "$snap_pid" 2>/dev/null; wait "$snap_pid" 2>/dev/null || true; fi
  cleanup_fs
}
trap cleanup EXIT

# The registry, on a free loopback port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
reg=127.0.0.1:$port
# AUTH=1: a private registry (Basic auth); the credentials go only in each CRI
# PullImage's auth (as kubelet sends a pod's imagePullSecrets), never in a config.
auth_cfg= creds=
if [[ ${AUTH:-0} == 1 ]]; then
  command -v htpasswd >/dev/null || { echo "AUTH=1 needs htpasswd (apache2-utils)" >&2; exit 1; }
  htpasswd -Bbn perf "secret-$port" > "$work/htpasswd"
  auth_cfg="auth: {htpasswd: {realm: perf, path: $work/htpasswd}}"
  creds="perf:secret-$port"
  export CRI_PULL_AUTH=$creds
fi
cat > "$work/registry.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: $reg}
$auth_cfg
EOF
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
for img in $IMAGES; do
  skopeo copy -q --dest-tls-verify=false ${creds:+--dest-creds=$creds} \
    "oci:$IMGDIR/$img:latest" "docker://$reg/perf/$img:latest"
done
# Every case reads warm registry storage.
find "$work/registry" -type f -exec cat {} + > /dev/null
# THROTTLE=RATE[:LATENCY]: every client reaches the registry through perf/throttle.py, each
# connection capped at RATE MB/s, each request delayed LATENCY ms (default 20): a network
# like a real one. The registry is then known by the proxy's address.
thr_pid=
if [[ -n ${THROTTLE:-} ]]; then
  rate=${THROTTLE%%:*} lat=20
  [[ $THROTTLE == *:* ]] && lat=${THROTTLE#*:}
  coproc THR { exec python3 perf/throttle.py "$port" --rate "$rate" --latency "$lat"; }
  thr_pid=$THR_PID
  read -r _ tport <&"${THR[0]}"
  reg=127.0.0.1:$tport
fi
# containerd reaches the plain-HTTP registry through a hosts.toml (ctr and CRI alike).
mkdir -p "$work/certs.d/$reg"
printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$reg" "$reg" \
  > "$work/certs.d/$reg/hosts.toml"


# CRI's configuration for SNAPSHOTTER on containerd $CTD: for unlade, what
# `unlade containerd-config` prints for that version (and $MODE on 2.1); for overlayfs,
# containerd's defaults but the snapshotter (and, on 2.1 with MODE=local,
# use_local_image_pull). The registry by config_path either way.
cri_config() { # SNAPSHOTTER
  local images='plugins."io.containerd.grpc.v1.cri"'
  if [[ $CTD == 2.* ]]; then images="plugins.'io.containerd.cri.v1.images'"; fi
  if [[ $1 == chunked ]]; then
    local conns=${CHUNKED:-16:16777216}
    printf "[plugins.'io.containerd.transfer.v1.local']\n  max_concurrent_downloads = %s\n  concurrent_layer_fetch_buffer = %s\n" \
      "${conns%%:*}" "${conns#*:}"
    printf '[%s]\n  snapshotter = "overlayfs"\n  max_concurrent_downloads = %s\n  concurrent_layer_fetch_buffer = %s\n' \
      "$images" "${conns%%:*}" "${conns#*:}"
  elif [[ $1 == unlade ]]; then
    "$bin" containerd-config --containerd-version "$CTD" --address "$work/unlade.sock" \
      --root "$fsdir/root" $([[ $CTD == 2.* ]] && echo "--pull-mode $MODE")
  else
    if [[ $CTD == 2.* ]]; then
      printf '[%s]\n  snapshotter = "overlayfs"\n' "$images"
      [[ $MODE == local ]] && printf '  use_local_image_pull = true\n'
    else
      printf '[%s.containerd]\n  snapshotter = "overlayfs"\n' "$images"
    fi
  fi
  printf '[%s.registry]\n  config_path = "%s"\n' "$images" "$work/certs.d"
}
snap_pid=
start_unlade_snapshotter() { # [ARGS...]
  "$ubin" snapshotter --root "$fsdir/root" --address "$work/unlade.sock" --hosts-dir "$work/certs.d" \
    --containerd-address "$work/ctd/sock" --log-level info,unlade::containerd::handoff=debug \
    ${UNLADE_ARGS:-} "$@" 2> "$work/unlade.log" &
  snap_pid=$!
  for _ in $(seq 100); do [[ -S $work/unlade.sock ]] && return; sleep 0.1; done
  echo "unlade snapshotter did not start: $(tail -3 "$work/unlade.log")" >&2; exit 1
}
# The peak resident memory of a live process, in MiB.
hwm() { awk '/^VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
stop_unlade_snapshotter() {
  rss_note+=", unlade snapshotter $(hwm "$snap_pid") MiB"
  kill "$snap_pid"; wait "$snap_pid" 2>/dev/null || true; snap_pid=
  # What it mounted for active snapshots (none after a pull).
  { grep -o " $fsdir/root/containerd/mnt/[^ ]*" /proc/self/mounts || true; } | xargs -r -n1 umount -l
}
# perf/cri_pull.py needs grpcio: the first python3 that has it.
PY=$(for p in python3 /usr/bin/python3; do $p -c 'import grpc' 2>/dev/null && { echo "$p"; break; }; done || true)

ctr_pull() { # REF
  ctr -a "$work/ctd/sock" -n perf images pull $([[ $CTD == 2.* ]] && echo --local) \
    --hosts-dir "$work/certs.d" --snapshotter overlayfs "$1" > /dev/null
}

declare -A times round ratios
run_case() { # IMAGE CASE
  local img=$1 label=$2 c=${2%@B} ref=$reg/perf/$1:latest root=$fsdir/root t0 t1 note=
  ubin=$bin
  if [[ $label == *@B ]]; then ubin=${UNLADE_B:?CASE@B needs UNLADE_B}; fi
  fresh_fs
  # COLD=1: nothing cached, the registry's blobs read from disk too.
  if [[ ${COLD:-0} == 1 ]]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
  local snapper=overlayfs
  if [[ $c == cri-unlade-proxy-* ]]; then
    snapper=unlade
    start_unlade_snapshotter --cri-listen "$work/cri.sock" --cri-upstream "$work/ctd/sock"
  elif [[ $c == cri-unlade-keep-* || $c == cri-unlade-discard-* ]]; then
    snapper=unlade; start_unlade_snapshotter --blobs "$(echo "$c" | cut -d- -f3)"
  elif [[ $c == cri-unlade-* ]]; then
    snapper=unlade; start_unlade_snapshotter
  fi
  [[ $c == cri-chunked-* ]] && start_containerd "$(cri_config chunked)"
  [[ $c == ctr-* || ( $c == cri-* && $c != cri-chunked-* ) ]] && start_containerd "$(cri_config $snapper)"
  rss_note=
  case $c in
    unlade-1|unlade-1s)
      t0=$(now)
      /usr/bin/time -f %M -o "$work/rss" "$bin" pull --plain-http "$ref" --root "$root" -q \
        ${UNLADE_ARGS:-} $([[ $c == unlade-1s ]] && echo --blob-connections 1) > "$work/out"
      t1=$(now)
      rss_note="peak RSS: unlade pull $(( $(cat "$work/rss") / 1024 )) MiB" ;;
    unlade-20proc)
      t0=$(now)
      pids=()
      for i in $(seq "$N"); do "$bin" pull --plain-http "$ref" --root "$root" > "$work/out.$i" 2>/dev/null & pids+=($!); done
      wait "${pids[@]}"; t1=$(now)
      note="$(grep -ho '[0-9]* applied here, [0-9]* blobs fetched' "$work"/out.* |
        awk '{a+=$1; b+=$4} END {print a" layers applied, "b" blobs fetched in total"}')" ;;
    unlade-20lib)
      t0=$(now); "$ex" "$ref" "$root" "$N" --plain-http > "$work/out"; t1=$(now)
      note=$(head -1 "$work/out") ;;
    ctr-1)
      t0=$(now); ctr_pull "$ref"; t1=$(now) ;;
    ctr-20)
      t0=$(now)
      pids=()
      for _ in $(seq "$N"); do ctr_pull "$ref" & pids+=($!); done
      wait "${pids[@]}"; t1=$(now) ;;
    cri-1|cri-unlade-1|cri-chunked-1|cri-unlade-keep-1|cri-unlade-discard-1)
      t0=$(now); $PY perf/cri_pull.py "$work/ctd/sock" "$ref" 1 > "$work/out"; t1=$(now) ;;
    cri-20|cri-unlade-20)
      t0=$(now); $PY perf/cri_pull.py "$work/ctd/sock" "$ref" "$N" > "$work/out"; t1=$(now) ;;
    cri-unlade-proxy-1)
      t0=$(now); $PY perf/cri_pull.py "$work/cri.sock" "$ref" 1 > "$work/out"; t1=$(now) ;;
  esac
  if [[ $c == ctr-* || $c == cri-* ]]; then
    note="containerd: $(ctr -a "$work/ctd/sock" -n "$([[ $c == cri-* ]] && echo k8s.io || echo perf)" \
      snapshots --snapshotter $snapper ls | tail -n +2 | wc -l) snapshots"
    if [[ $snapper == unlade ]]; then
      note+="; unlade: $(grep -o ' applied=[0-9]*' "$work/unlade.log" |
        awk -F= '{a+=$2} END {print a+0}') layers applied, $(grep -c 'pulled for containerd' "$work/unlade.log" || true) pulls, $(grep -c 'falls back to containerd' "$work/unlade.log" || true) fallbacks"
      # The blobs after the pull's answer: handed to containerd (or discarded), each
      # layer once; how long that took past the answer, and the blob bytes each store
      # then holds.
      if [[ $c != cri-unlade-keep-* ]]; then
        local want; want=$(grep -o ' layers=[0-9]*' "$work/unlade.log" | awk -F= '{a+=$2} END {print a+0}')
        # Every layer's hand-off ended and unlade's copies are gone (its store then holds
        # only manifests and configs, well under 1 MiB).
        for _ in $(seq 1200); do
          (( $(grep -c 'blob hand-off\|not handed to containerd' "$work/unlade.log" || true) >= want )) &&
            (( $(du -sb "$root/content/blobs" | cut -f1) < 1048576 )) && break
          sleep 0.05
        done
        note+="; blobs settled $(echo "$(now) - $t1" | bc -l | xargs printf '%.2f') s after the answer"
      fi
      note+="; blob bytes: unlade $(du -sb "$root/content/blobs" | cut -f1)"
    fi
    note+=", containerd $(du -sb "$fsdir/containerd/io.containerd.content.v1.content/blobs" 2>/dev/null | cut -f1)"
    rss_note="peak RSS: containerd $(hwm "$ctd_pid") MiB"
    stop_containerd
    if [[ $snapper == unlade ]]; then stop_unlade_snapshotter; fi
    note+="; $rss_note"
  elif [[ -n $rss_note ]]; then
    note="$rss_note"
  fi
  drop_fs
  local dt; dt=$(echo "$t1 - $t0" | bc -l)
  times[${img}_$label]+="$dt "
  round[${img}_$label]=$dt
  printf '  %-8s %-14s %8.3f s  %s\n' "$img" "$label" "$dt" "${note:+($note)}"
}

read -ra cases <<< "${CASES:-unlade-1 unlade-20proc unlade-20lib ctr-1 ctr-20 cri-1 cri-20}"
if [[ " ${cases[*]} " == *" cri-"* ]] && [[ -z $PY ]]; then
  echo "cri-* cases need grpcio (apt-get install python3-grpcio); dropping them" >&2
  read -ra cases <<< "$(printf '%s\n' "${cases[@]}" | grep -v '^cri-' | tr '\n' ' ')"
fi
echo "machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB, kernel $(uname -r); containerd $("$ctd_bin/containerd" --version | awk '{print $3}')$([[ $CTD == 2.* ]] && echo " ($MODE pull)"); igzip $(command -v igzip >/dev/null && echo on PATH || echo absent)${THROTTLE:+; registry throttled to $rate MB/s a connection, $lat ms a request}; unlade $(git rev-parse --short HEAD)"
for img in $IMAGES; do
  echo "image $img: $(python3 -c "
import json,sys
d='$IMGDIR/$img'; i=json.load(open(d+'/index.json'))['manifests'][0]['digest'].split(':')[1]
m=json.load(open(d+'/blobs/sha256/'+i)); print(len(m['layers']), 'layers,', round(sum(l['size'] for l in m['layers'])/1e6,1), 'MB compressed')")"
done
for r in $(seq "$RUNS"); do
  echo "run $r"
  for job in $(for img in $IMAGES; do for c in "${cases[@]}"; do echo "$img:$c"; done; done | shuf); do
    run_case "${job%%:*}" "${job#*:}"
  done
  for img in $IMAGES; do
    for c in "${cases[@]}"; do
      ratios[${img}_$c]+="$(echo "${round[${img}_$c]} / ${round[${img}_${cases[0]}]}" | bc -l) "
    done
  done
done

echo
echo "medians over $RUNS runs (ratio to ${cases[0]} of the same image):"
for img in $IMAGES; do
  base=$(echo "${times[${img}_${cases[0]}]}" | median)
  for c in "${cases[@]}"; do
    m=$(echo "${times[${img}_$c]}" | median)
    printf '  %-8s %-14s %8.3f s  %6.2fx   (per-round ratios, median %5.2fx)\n' "$img" "$c" "$m" \
      "$(echo "$m / $base" | bc -l)" "$(echo "${ratios[${img}_$c]}" | median)"
  done
done
