#!/usr/bin/env bash
# Rebuilds assets/demo-image/: a small OCI image layout (linux/amd64, tag
# "latest") from Debian bookworm packages, the default input of README's first
# command. Three layers, as an image builder would make them:
#   1. base-files, libc6, libtinfo6, busybox-static with its applet links  (gzip)
#   2. hello, tree, less                                (zstd)
#   3. /etc/motd, a whiteout of /usr/share/doc/hello, and a hard link to a file
#      of layer 1 (the cross-layer cases an unpacker must get right)  (plain tar)
# Packed sorted, PAX, numeric owners, no atime/ctime; gzip without a name or
# timestamp; mtimes clamped to SOURCE_DATE_EPOCH (default 2026-01-01).
# Needs: apt-get (Debian package lists), dpkg-deb, GNU tar, gzip, zstd, python3.
# Run as root (package owners are kept).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/demo-image
epoch=${SOURCE_DATE_EPOCH:-1767225600}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download base-files libc6 libtinfo6 busybox-static hello tree less >/dev/null 2>&1

pack() { # dir → layer.tar
  tar -C "$1" -cf "$2" --sort=name --format=posix --numeric-owner \
    --mtime="@$epoch" --clamp-mtime \
    --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' .
}

mkdir l1 l2 l3
for d in base-files_*.deb libc6_*.deb libtinfo6_*.deb busybox-static_*.deb; do dpkg-deb --fsys-tarfile "$d" | tar -x -C l1; done
# Busybox applets as links in /bin (sh, ls, cat, ...), where nothing else is.
for a in $(l1/bin/busybox --list); do
  [[ -e l1/bin/$a || -e l1/usr/bin/$a ]] || ln -s busybox "l1/bin/$a"
done
for d in hello_*.deb tree_*.deb less_*.deb; do dpkg-deb --fsys-tarfile "$d" | tar -x -C l2; done
mkdir -p l3/etc l3/usr/share/doc l3/usr/share/demo
echo "unpacked by unlade" > l3/etc/motd
touch l3/usr/share/doc/.wh.hello
pack l1 1.tar
pack l2 2.tar
pack l3 3.tar
# Layer 3 also hard-links a file of layer 1: append the link entry with
# Python's tarfile (GNU tar cannot link to a file it is not archiving).
python3 - <<'EOF'
import tarfile, io
with tarfile.open("3.tar") as t:
    members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
with tarfile.open("3.tar", "w", format=tarfile.PAX_FORMAT) as t:
    for m, data in members:
        t.addfile(m, io.BytesIO(data) if data is not None else None)
    link = tarfile.TarInfo("./usr/share/demo/os-release")
    link.type = tarfile.LNKTYPE
    link.linkname = "./usr/lib/os-release"
    link.mtime = members[0][0].mtime
    t.addfile(link)
EOF
gzip -n -9 < 1.tar > 1.blob
zstd -q -19 --no-check < 2.tar > 2.blob
cp 3.tar 3.blob

rm -rf "$out"
mkdir -p "$out/blobs/sha256"
python3 - "$out" "$epoch" <<'EOF'
import hashlib, json, os, shutil, sys, datetime
out, epoch = sys.argv[1], int(sys.argv[2])
def put(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs/sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)
types = ["application/vnd.oci.image.layer.v1.tar+gzip",
         "application/vnd.oci.image.layer.v1.tar+zstd",
         "application/vnd.oci.image.layer.v1.tar"]
layers, diff_ids = [], []
for i, mt in enumerate(types, 1):
    diff_ids.append("sha256:" + hashlib.sha256(open(f"{i}.tar", "rb").read()).hexdigest())
    d, n = put(open(f"{i}.blob", "rb").read())
    layers.append({"mediaType": mt, "digest": d, "size": n})
created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
config = {"created": created, "architecture": "amd64", "os": "linux",
          "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
          "rootfs": {"type": "layers", "diff_ids": diff_ids}}
cd, cn = put(json.dumps(config, sort_keys=True).encode())
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
            "layers": layers}
md, mn = put(json.dumps(manifest, sort_keys=True).encode())
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
open(os.path.join(out, "index.json"), "w").write(json.dumps(index, sort_keys=True))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
print(md)
EOF
du -sh "$out"
