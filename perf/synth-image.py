#!/usr/bin/env python3
"""synth-image.py OUT LAYERS FILES_PER_LAYER: an OCI layout of LAYERS gzip layers, each
FILES_PER_LAYER text-like files (1-32 KiB, about 3:1 compressible) in 100-file directories,
deterministic. For measuring how unpacking scales with CPUs where no Debian packages
are at hand (perf/scale.sh runs on a machine without network)."""
import gzip, hashlib, io, json, os, random, sys, tarfile

out, nlayers, nfiles = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(os.path.join(out, "blobs/sha256"), exist_ok=True)
words = [bytes(random.Random(i).choices(b"abcdefghijklmnopqrstuvwxyz", k=random.Random(i).randint(2, 9))) for i in range(4096)]

def put(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs/sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)

layers, diff_ids = [], []
for l in range(nlayers):
    rng = random.Random(l)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(nfiles):
            if i % 100 == 0:
                d = tarfile.TarInfo(f"l{l}/d{i // 100}")
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                t.addfile(d)
            size = rng.randint(1024, 32768)
            text = b" ".join(rng.choices(words, k=size // 5))[:size]
            ti = tarfile.TarInfo(f"l{l}/d{i // 100}/f{i}")
            ti.size, ti.mode, ti.mtime = len(text), 0o644, 1700000000
            t.addfile(ti, io.BytesIO(text))
    raw = buf.getvalue()
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    d, n = put(gzip.compress(raw, compresslevel=6, mtime=0))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
cfg = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
cd, cn = put(json.dumps(cfg).encode())
m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn}, "layers": layers}
md, mn = put(json.dumps(m).encode())
idx = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
       "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
open(os.path.join(out, "index.json"), "w").write(json.dumps(idx))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
