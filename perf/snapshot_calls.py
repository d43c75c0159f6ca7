#!/usr/bin/env python3
"""N Prepares of new active snapshots on one committed parent, then their N Removes, one
call at a time, against a snapshotter socket (what containerd's unpack and garbage
collection do). Prints the seconds of each phase. Messages are encoded by hand: only
grpcio is needed (Debian's python3-grpcio).

Usage: snapshot_calls.py SOCKET N
"""
import sys
import time

import grpc
from pbwire import field

SVC = "/containerd.services.snapshots.v1.Snapshots/"


def main():
    sock, n = sys.argv[1], int(sys.argv[2])
    ch = grpc.insecure_channel("unix://" + sock)
    prepare = ch.unary_unary(SVC + "Prepare")
    remove = ch.unary_unary(SVC + "Remove")
    commit = ch.unary_unary(SVC + "Commit")
    prepare(field(1, b"u") + field(2, b"base-a"))
    commit(field(1, b"u") + field(2, b"base") + field(3, b"base-a"))
    t = time.monotonic()
    for i in range(n):
        prepare(field(1, b"u") + field(2, f"k{i}".encode()) + field(3, b"base"))
    tp = time.monotonic() - t
    t = time.monotonic()
    for i in range(n):
        remove(field(1, b"u") + field(2, f"k{i}".encode()))
    tr = time.monotonic() - t
    print(f"{n} Prepares {tp:.2f} s, {n} Removes {tr:.2f} s")


if __name__ == "__main__":
    main()
