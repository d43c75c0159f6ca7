#!/usr/bin/env bash
# perf/build-images.sh - builds the two images of the seed's pull experiment as OCI layouts,
# from real Debian packages (the host's apt sources), layered the way their Docker Hub
# namesakes are:
#   redis    base (Debian "required" + apt) / redis-server + redis-tools / config layer
#   golang   base / curl, ca-certificates, wget, gnupg (buildpack-deps:curl)
#            / git, openssh-client, procps (…:scm) / gcc, g++, make, libc6-dev, pkg-config
#            / golang-go / config layer
#   ml       base / an ML stack: PyTorch, the SciPy stack, OpenCV, LLVM 16, Boost, gcc
#            (one layer of about 2.7 GB) / model weights: 4 safetensors files of 400 MB of
#            float16 values drawn as trained weights are (normal, sigma 0.02: they compress
#            by a few percent, as real checkpoints do) / config layer. About 4.4 GB
#            unpacked: a pull for perf/ (issue 22), not for CI.
# Each layer is the files of the packages new to it (dpkg-deb --fsys-tarfile, merged /usr),
# with /var/lib/dpkg/status; the config layer adds /etc files and a whiteout. Layers are
# packed by GNU tar (sorted, PAX, numeric owners, no atime/ctime, mtimes clamped) and
# compressed with `pigz -6 -n`, as registries usually carry them.
#
# Usage: perf/build-images.sh OUTDIR     (writes OUTDIR/redis and OUTDIR/golang, tag "latest";
#                                        IMAGES=ml for the ML-like one)
# Env:   IMAGES="redis golang"  DEBS=/var/cache/unlade-perf-debs (download cache)
# Needs: root (package owners are kept), apt-get, dpkg-deb, GNU tar, pigz, python3.
set -euo pipefail
out=${1:?usage: build-images.sh OUTDIR}
IMAGES=${IMAGES:-redis golang}
DEBS=${DEBS:-/var/cache/unlade-perf-debs}
epoch=${SOURCE_DATE_EPOCH:-1767225600}
[[ $(id -u) == 0 ]] || { echo "run as root (package owners are kept)" >&2; exit 1; }
for t in apt-get dpkg-deb tar pigz python3; do
  command -v $t >/dev/null || { echo "missing $t (apt-get install pigz ...)" >&2; exit 1; }
done
compgen -G "/var/lib/apt/lists/*Packages*" >/dev/null || apt-get update -qq
mkdir -p "$out" "$DEBS"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$work/status"
aptq=(-o APT::Sandbox::User=root -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)

# closure PKG... -> name=version lines a fresh system would install
closure() {
  apt-get -s install --no-install-recommends "${aptq[@]}" -o Dir::State::status="$work/status" "$@" \
    2>/dev/null | awk '/^Inst /{v=$3; gsub(/[()]/,"",v); print $2"="v}' | LC_ALL=C sort -u
}
deb() { local n=${1%%=*} v=${1#*=}; ls "$DEBS/${n}_${v//:/%3a}"_*.deb 2>/dev/null | head -1; }
download() {
  local need=() p
  for p in "$@"; do [[ -n $(deb "$p") ]] || need+=("$p"); done
  ((${#need[@]} == 0)) || (cd "$DEBS" && apt-get download -q "${aptq[@]}" "${need[@]}" >/dev/null)
}

# layer DIR NAME : pack DIR as layer NAME (NAME.tar, NAME.blob)
layer() {
  (cd "$1" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | LC_ALL=C sort) > "$work/$2.list"
  tar -C "$1" -cf "$work/$2.tar" --sort=name --numeric-owner --format=posix \
    --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' \
    --mtime="@$epoch" --clamp-mtime -T "$work/$2.list"
  pigz -6 -n < "$work/$2.tar" > "$work/$2.blob"
  rm -rf "$1"
}

# pkg_layer NAME PKG... : the packages of PKG's closure not in earlier layers of this image
pkg_layer() {
  local name=$1; shift
  closure "$@" > "$work/want"
  grep -v -x -F -f "$work/have" "$work/want" > "$work/new" || true
  cat "$work/want" >> "$work/have"; sort -u -o "$work/have" "$work/have"
  mapfile -t pk < "$work/new"
  echo "  layer $name: ${#pk[@]} packages" >&2
  download "${pk[@]}"
  local d=$work/l.$name p
  mkdir -p "$d"
  # Merged /usr: extraction follows these links; only the base layer keeps them.
  for p in bin sbin lib lib64; do mkdir -p "$d/usr/$p"; ln -s "usr/$p" "$d/$p"; done
  for p in "${pk[@]}"; do
    dpkg-deb --fsys-tarfile "$(deb "$p")" | tar -x --keep-directory-symlink -C "$d"
    dpkg-deb -f "$(deb "$p")" | sed '1a Status: install ok installed' >> "$work/stanzas"
    echo >> "$work/stanzas"
  done
  if [[ $name != base ]]; then
    for p in bin sbin lib lib64; do rm -f "$d/$p"; rmdir "$d/usr/$p" 2>/dev/null || true; done
  fi
  mkdir -p "$d/var/lib/dpkg"; cp "$work/stanzas" "$d/var/lib/dpkg/status"
  if [[ $name == base ]]; then
    cp "$d/usr/share/base-passwd/passwd.master" "$d/etc/passwd"
    cp "$d/usr/share/base-passwd/group.master" "$d/etc/group"
    mkdir -p "$d/tmp" "$d/root"; chmod 1777 "$d/tmp"; chmod 700 "$d/root"
  fi
  layer "$d" "$name"
  layers+=("$name")
}

# config_layer NAME : a small last layer (an entrypoint, a data dir, a whiteout)
config_layer() {
  local d=$work/l.$1
  mkdir -p "$d/usr/local/bin" "$d/data" "$d/usr/share/doc"
  printf '#!/bin/sh\nexec "$@"\n' > "$d/usr/local/bin/docker-entrypoint.sh"
  chmod 755 "$d/usr/local/bin/docker-entrypoint.sh"
  touch "$d/usr/share/doc/.wh.debian-archive-keyring"
  layer "$d" "$1"
  layers+=("$1")
}

# weights_layer NAME FILES MB : FILES safetensors files of MB megabytes of float16 weights
weights_layer() {
  local d=$work/l.$1
  mkdir -p "$d/models/llm"
  python3 - "$d/models/llm" "$2" "$3" <<'EOF'
import json, math, os, random, struct, sys
out, files, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# The high byte of an IEEE float16 (sign, 5 exponent bits, 2 mantissa bits) of N(0, 0.02)
# as a table from a uniform byte, built from the distribution's CDF, so that
# bytes.translate draws a whole tensor at C speed; the low byte (8 mantissa bits) is
# uniform. Such a tensor deflates by a few percent, as real checkpoints do.
def cdf(x):
    return 0.5 * (1 + math.erf(x / (0.02 * math.sqrt(2))))
def magnitude(e, m):
    return (2.0 ** (e - 15)) * (1 + m / 4) if e else (m / 4) * 2.0 ** -14
cells = []
for sign in (0, 1):
    for e in range(31):
        for m in range(4):
            lo, hi = magnitude(e, m), (magnitude(e, m + 1) if m < 3 else magnitude(e + 1, 0))
            p = (cdf(hi) - cdf(lo)) if sign == 0 else (cdf(-lo) - cdf(-hi))
            cells.append((p, (sign << 7) | (e << 2) | m))
total = sum(p for p, _ in cells)
edges, run = [], 0.0
for p, b in cells:
    run += p / total
    edges.append((run, b))
table, j = bytearray(256), 0
for i in range(256):
    u = (i + 0.5) / 256
    while j < len(edges) - 1 and edges[j][0] < u:
        j += 1
    table[i] = edges[j][1]
rng = random.Random(22)
step = 8 << 20
for f in range(files):
    n = mb * 1000 * 1000 // 2
    name = "model-%05d-of-%05d.safetensors" % (f + 1, files)
    header = json.dumps({"model.layers.%d.weight" % f: {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
    with open(os.path.join(out, name), "wb") as o:
        o.write(struct.pack("<Q", len(header)) + header)
        left = n
        while left:
            k = min(left, step)
            buf = bytearray(2 * k)
            buf[0::2] = rng.randbytes(k)
            buf[1::2] = rng.randbytes(k).translate(table)
            o.write(buf)
            left -= k
EOF
  layer "$d" "$1"
  layers+=("$1")
}

write_layout() { # IMAGE
  python3 - "$out/$1" "$epoch" "$work" "${layers[@]}" <<'EOF'
import hashlib, json, os, shutil, sys, datetime
out, epoch, work, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
shutil.rmtree(out, ignore_errors=True)
os.makedirs(os.path.join(out, "blobs/sha256"))
def put(path=None, data=None):
    h = hashlib.sha256()
    if data is None:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d = h.hexdigest()
        os.replace(path, os.path.join(out, "blobs/sha256", d))
        size = os.path.getsize(os.path.join(out, "blobs/sha256", d))
    else:
        h.update(data); d = h.hexdigest(); size = len(data)
        open(os.path.join(out, "blobs/sha256", d), "wb").write(data)
    return "sha256:" + d, size
def sha_file(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
layers, diff_ids = [], []
for n in names:
    diff_ids.append(sha_file(f"{work}/{n}.tar"))
    d, s = put(f"{work}/{n}.blob")
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
cfg = {"created": created, "architecture": "amd64", "os": "linux",
       "config": {"Entrypoint": ["docker-entrypoint.sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
       "rootfs": {"type": "layers", "diff_ids": diff_ids}}
cd, cs = put(data=json.dumps(cfg, sort_keys=True).encode())
m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
     "layers": layers}
md, ms = put(data=json.dumps(m, sort_keys=True).encode())
idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
       "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
                      "platform": {"architecture": "amd64", "os": "linux"},
                      "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
open(os.path.join(out, "index.json"), "w").write(json.dumps(idx))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
total = sum(l["size"] for l in layers)
print(f"{os.path.basename(out)}: {len(layers)} layers, {total/1e6:.1f} MB compressed", file=sys.stderr)
EOF
}

required=$(apt-cache dumpavail | awk '/^Package:/{p=$2} /^Priority: required/{print p}' | LC_ALL=C sort -u)
for img in $IMAGES; do
  echo "image $img" >&2
  : > "$work/have"; : > "$work/stanzas"; layers=()
  pkg_layer base $required apt
  case $img in
    redis)
      pkg_layer redis redis-server redis-tools ;;
    golang)
      pkg_layer curl ca-certificates curl wget gnupg dirmngr
      pkg_layer scm git openssh-client procps
      pkg_layer build gcc g++ make libc6-dev pkg-config
      pkg_layer go golang-go ;;
    ml)
      pkg_layer stack python3-torch libtorch-dev python3-scipy python3-sklearn python3-pandas \
        python3-opencv llvm-16-dev clang-16 libboost-all-dev gcc g++ python3-dev
      weights_layer weights 4 400 ;;
    *) echo "unknown image $img" >&2; exit 1 ;;
  esac
  config_layer config
  write_layout "$img"
done
