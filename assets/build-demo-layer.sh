#!/usr/bin/env bash
# Rebuilds assets/demo-layer.tar.gz: the files of three Debian bookworm packages
# (hello, tree, less) as one layer, packed the way image builders do (sorted,
# PAX, numeric owners, no atime/ctime), gzip without a name or timestamp.
# Needs: apt-get (Debian package lists), dpkg-deb, GNU tar, gzip. Run as root.
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/demo-layer.tar.gz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download hello tree less >/dev/null
mkdir root
for d in ./*.deb; do dpkg-deb --fsys-tarfile "$d" | tar -x -C root; done
tar -C root -cf layer.tar --sort=name --format=posix --numeric-owner \
  --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' .
gzip -n -9 < layer.tar > "$out"
echo "$out: $(sha256sum < layer.tar | cut -d' ' -f1) (diff ID)"
