#!/usr/bin/env python3
"""pytar: writes a tar of a directory tree with Python's tarfile.

Usage: pytar.py ustar|gnu|pax SRC OUT
"""
import os
import sys
import tarfile

fmt = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[sys.argv[1]]
src, out = sys.argv[2], sys.argv[3]
paths = []
for root, dirs, files in os.walk(src):
    dirs.sort()
    for n in dirs + sorted(files):
        paths.append(os.path.join(root, n))
paths.sort()
with tarfile.open(out, "w", format=fmt) as tar:
    for p in paths:
        ti = tar.gettarinfo(p, arcname=os.path.relpath(p, src))
        ti.uname = ti.gname = ""
        if fmt != tarfile.PAX_FORMAT:
            ti.mtime = int(ti.mtime)
        if ti.isreg():
            with open(p, "rb") as f:
                tar.addfile(ti, f)
        else:
            tar.addfile(ti)
