#!/usr/bin/env python3
"""perf/table.py RAW.tsv FLOORS.tsv NPROC - the targets of issue 11 from perf/table.sh's
measurements: per file system and IMAGE:FMT, the peer's median wall time over unlade's
(the variant `--backend auto` picks there, and the fastest variant), unlade's median over
the floor (see perf/table.sh for how the floor is made), peak RSS; then each target with
"met" or "MISSED"."""
import csv
import statistics
import sys
from collections import defaultdict

raw, floors_path, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = defaultdict(list)  # (fs, case) -> [(wall, user, sys, rss_kb)]
for fs, _r, case, e, u, s, m in csv.reader(open(raw), delimiter="\t"):
    runs[(fs, case)].append((float(e), float(u), float(s), int(m)))
floors = {r["image"]: r for r in csv.DictReader(open(floors_path), delimiter="\t")}


def med(fs, case, i=0):
    v = runs.get((fs, case))
    return statistics.median(x[i] for x in v) if v else None


PEER = {"gz": "pigz-tar", "zst": "zstd-tar", "tar": "tar-xf"}
# `--backend auto`'s pick (fsops::auto_choice): io_uring on ext4, syscalls elsewhere.
AUTO = {"ext4": "unlade-uring-0", "tmpfs": "unlade-syscalls-0"}
DECODE = {"gz": "igzip", "zst": "zstd", "tar": None}

targets = []  # (fs, what, value, want, ok)
for fs in sorted({k[0] for k in runs}):
    cases = sorted({k[1].split("/", 1)[1] for k in runs if k[0] == fs})
    variants = sorted({k[1].split("/", 1)[0] for k in runs if k[0] == fs and k[1].startswith("unlade-")})
    print(f"\n### {fs} (auto = {AUTO[fs]})")
    print("| case | peer s | auto s | peer ÷ auto | best variant | peer ÷ best | CPU floor s (cpu-s/CPUs) | auto ÷ floor | max RSS MB |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for ic in cases:
        img, fmt = ic.split(":")
        peer = med(fs, f"{PEER[fmt]}/{ic}")
        auto = med(fs, f"{AUTO[fs]}/{ic}")
        best_v = min(variants, key=lambda v: med(fs, f"{v}/{ic}") or 1e9)
        best = med(fs, f"{best_v}/{ic}")
        f = floors.get(img)
        floor = None
        if f:
            create = med(fs, f"tar-xf/{img}:tar", 2) or 0.0
            cpu = float(f["sha256_plain"]) + float(f[f"store_{fmt}"]) + create
            if DECODE[fmt]:
                cpu += float(f[DECODE[fmt]]) + float(f[f"sha256_{fmt}"])
            floor = max(cpu / nproc, float(f[f"cold_read_{fmt}"]))
        rss = max(x[3] for v in variants for x in runs.get((fs, f"{v}/{ic}"), [])) / 1024
        fl = f"{floor:.2f} | {auto / floor:.2f}x" if floor else "- | -"
        print(f"| {ic} | {peer:.2f} | {auto:.2f} | {peer / auto:.2f}x | {best_v} {best:.2f} | "
              f"{peer / best:.2f}x | {fl} | {rss:.0f} |")
        want = {"golang:gz": 2.2, "golang:tar": 1.6, "manyfiles:tar": 1.8, "manyfiles:gz": 1.8, "golang:zst": 1.3}.get(ic)
        if want:
            targets.append((fs, f"{PEER[fmt]} ÷ unlade, {ic}", peer / auto, f"≥ {want}", peer / auto >= want))
        if floor:
            lim = 1.15 if ic == "golang:zst" else 1.2
            targets.append((fs, f"unlade ÷ CPU floor, {ic}", auto / floor, f"≤ {lim}", auto / floor <= lim))
        targets.append((fs, f"peak RSS MB, {ic} (all variants)", rss, "≤ 256", rss <= 256))

print("\n### targets (unlade = the variant auto picks)")
print("| fs | target | value | want | |")
print("| --- | --- | ---: | --- | --- |")
for fs, what, v, want, ok in targets:
    print(f"| {fs} | {what} | {v:.2f} | {want} | {'met' if ok else 'MISSED'} |")
