#!/usr/bin/env python3
"""One CRI image-service call to containerd's socket, for the tests, with only grpcio
installed (Debian's python3-grpcio): the request is encoded and the answer decoded by hand.

Usage: cri_call.py SOCKET imagefsinfo [API]
    ImageFsInfo: one line per image file system, "MOUNTPOINT<TAB>USED_BYTES<TAB>INODES_USED"
    (what kubelet's image garbage collection measures). API: v1 (default) or v1alpha2
    (older kubelets; containerd 1.x).
"""
import sys

import grpc


def varint(b, i):
    """The varint at b[i:]: (value, index after it)."""
    n = shift = 0
    while True:
        if i >= len(b):
            raise ValueError("truncated varint")
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def fields(b):
    """A message's fields as (number, value): an int for varints, bytes for the rest."""
    out, i = [], 0
    while i < len(b):
        key, i = varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = varint(b, i)
        elif wire == 2:
            n, i = varint(b, i)
            v, i = b[i : i + n], i + n
        elif wire == 1:
            v, i = b[i : i + 8], i + 8
        elif wire == 5:
            v, i = b[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((num, v))
    return out


def first(msg, num, default=None):
    return next((v for n, v in fields(msg) if n == num), default)


def imagefsinfo(ch, api):
    call = ch.unary_unary(f"/runtime.{api}.ImageService/ImageFsInfo")
    resp = call(b"", timeout=60)
    # ImageFsInfoResponse { repeated FilesystemUsage image_filesystems = 1; ... }
    # FilesystemUsage { timestamp = 1; FilesystemIdentifier fs_id = 2 { mountpoint = 1 };
    #                   UInt64Value used_bytes = 3; UInt64Value inodes_used = 4 }
    for num, usage in fields(resp):
        if num != 1:
            continue
        mountpoint = first(first(usage, 2, b""), 1, b"").decode()
        used = first(first(usage, 3, b""), 1, 0)
        inodes = first(first(usage, 4, b""), 1, 0)
        print(f"{mountpoint}\t{used}\t{inodes}")


def main():
    if len(sys.argv) not in (3, 4) or sys.argv[2] != "imagefsinfo":
        sys.exit(__doc__.strip())
    api = sys.argv[3] if len(sys.argv) == 4 else "v1"
    if api not in ("v1", "v1alpha2"):
        sys.exit(__doc__.strip())
    ch = grpc.insecure_channel(f"unix://{sys.argv[1]}")
    try:
        imagefsinfo(ch, api)
    except grpc.RpcError as e:
        sys.exit(f"{e.code()}: {e.details()}")


if __name__ == "__main__":
    main()
