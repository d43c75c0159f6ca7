# perf/lib.sh - what perf/unpack.sh and perf/pull.sh share: a fresh ext4 per case, a
# private containerd, a clock, medians. Sourced; expects `work` (a scratch directory on a
# disk) and `fsdir` (the mount point) to be set, and uses the globals `loopdev` and
# `ctd_pid` (cleanup() below undoes whatever is left of them).

loopdev= ctd_pid=

# A freshly made ext4 at $fsdir (loop device over a sparse file, direct I/O), so no case
# pays for the deletions or the fragmentation of the one before.
fresh_fs() {
  truncate -s 16G "$work/fs.img"
  mkfs.ext4 -q -F -E lazy_itable_init=1,nodiscard "$work/fs.img"
  loopdev=$(losetup --direct-io=on --find --show "$work/fs.img")
  mount -o noinit_itable "$loopdev" "$fsdir"
}
drop_fs() {
  umount -R "$fsdir"
  losetup -d "$loopdev"; loopdev=
  rm -f "$work/fs.img"
}

# Which containerd: CTD=1.6 (the system's, bookworm's; the default), 1.7 (trixie's) or 2.1
# (sid's), the newer ones from scripts/containerd-peers.sh ($UNLADE_PEERS/SUITE/usr/bin,
# first on PATH so that its shim runs; runc stays bookworm's).
CTD=${CTD:-1.6}
case $CTD in
  1.6) ctd_bin=/usr/bin ;;
  1.7) ctd_bin=${UNLADE_PEERS:-/opt/unlade-peers}/trixie/usr/bin ;;
  2.1) ctd_bin=${UNLADE_PEERS:-/opt/unlade-peers}/sid/usr/bin ;;
  *) echo "CTD=$CTD: 1.6, 1.7 or 2.1" >&2; exit 1 ;;
esac
[[ -x $ctd_bin/containerd ]] || { echo "no containerd $CTD in $ctd_bin (scripts/containerd-peers.sh)" >&2; exit 1; }
ctd_path=$ctd_bin:/usr/sbin:/usr/bin:/sbin:/bin
ctr() { PATH=$ctd_path "$ctd_bin/ctr" "$@"; }

# start_containerd [TOML]: containerd $CTD with its root on $fsdir, its own state and
# socket ($work/ctd/sock); TOML (top-level keys or plugin tables) goes into its config.
start_containerd() {
  mkdir -p "$work/ctd"
  cat > "$work/ctd/config.toml" <<TOML
version = $([[ $CTD == 2.* ]] && echo 3 || echo 2)
root = "$fsdir/containerd"
state = "$work/ctd/state"
${1:-}
[grpc]
  address = "$work/ctd/sock"
TOML
  PATH=$ctd_path "$ctd_bin/containerd" --config "$work/ctd/config.toml" > "$work/ctd/log" 2>&1 &
  ctd_pid=$!
  for _ in $(seq 100); do
    if [[ -S $work/ctd/sock ]] && ctr -a "$work/ctd/sock" version >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  echo "containerd did not start: $(tail -3 "$work/ctd/log")" >&2; exit 1
}
stop_containerd() {
  kill "$ctd_pid"; wait "$ctd_pid" 2>/dev/null || true; ctd_pid=
  rm -rf "$work/ctd"
}

# Stops what is still running or mounted and removes $work.
cleanup_fs() {
  if [[ -n $ctd_pid ]]; then kill "$ctd_pid" 2>/dev/null; wait "$ctd_pid" 2>/dev/null || true; fi
  umount -R "$fsdir" 2>/dev/null || true
  if [[ -n $loopdev ]]; then losetup -d "$loopdev" 2>/dev/null || true; fi
  rm -rf "$work"
}

# layers_of LAYOUT TAG: the layer blobs of the image tagged TAG in the OCI layout LAYOUT,
# in order (paths into the layout), from its manifest.
layers_of() {
  python3 - "$1" "$2" <<'PY'
import json, sys
lay, tag = sys.argv[1], sys.argv[2]
blob = lambda d: f"{lay}/blobs/sha256/{d.split(':')[1]}"
idx = json.load(open(f"{lay}/index.json"))
m = next(m for m in idx["manifests"]
         if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(blob(m["digest"])))
print(" ".join(blob(l["digest"]) for l in man["layers"]))
PY
}

now() { date +%s.%N; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
