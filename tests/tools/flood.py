#!/usr/bin/env python3
"""A hostile client of a snapshotter socket for the tests: for SECONDS, keeps
N calls in flight on one connection (Prepare of a new key on PARENT, then its
Remove), as fast as the server answers. Prints the calls that succeeded and
those refused as ResourceExhausted. Messages are encoded by hand: only grpcio
is needed (Debian's python3-grpcio).

Usage: flood.py SOCKET PARENT SECONDS N
"""
import os
import sys
import time

import grpc

# The wire helpers live with the perf scripts (the tests run perf/cri_pull.py too).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "perf"))
from pbwire import field  # noqa: E402


def main():
    sock, parent, seconds, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    ch = grpc.insecure_channel(f"unix://{sock}")
    svc = "/containerd.services.snapshots.v1.Snapshots/"
    prepare = ch.unary_unary(svc + "Prepare")
    remove = ch.unary_unary(svc + "Remove")
    ok = refused = 0
    end = time.monotonic() + seconds
    rnd = 0
    while time.monotonic() < end:
        keys = [f"flood-{rnd}-{i}".encode() for i in range(n)]
        futs = [
            prepare.future(field(1, b"unlade") + field(2, k) + field(3, parent.encode()), timeout=120)
            for k in keys
        ]
        removes = []
        for k, f in zip(keys, futs):
            try:
                f.result()
                ok += 1
                removes.append(remove.future(field(1, b"unlade") + field(2, k), timeout=120))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused += 1
        for f in removes:
            try:
                f.result()
            except grpc.RpcError:
                pass
        rnd += 1
    print(ok, refused)


if __name__ == "__main__":
    main()
