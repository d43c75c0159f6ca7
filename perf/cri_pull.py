#!/usr/bin/env python3
"""N concurrent CRI PullImage calls to containerd's socket, as N kubelet pod starts would
make them: the path where containerd's own duplicate suppression lives (ctr does not go
through it). The two protobuf messages needed are encoded by hand, so only grpcio is
required (pip install grpcio).

Usage: cri_pull.py SOCKET REF N      prints "N pulls in S s" and the image ID

With CRI_PULL_AUTH=USER:PASSWORD in the environment, each request carries it as
PullImageRequest.auth (username, password), as kubelet sends a pod's imagePullSecrets.
"""
import os
import sys
import threading
import time

import grpc
from pbwire import field


def main():
    sock, ref, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # PullImageRequest { image: ImageSpec { image: ref }, auth: AuthConfig { username, password } }
    req = field(1, field(1, ref.encode()))
    auth = os.environ.get("CRI_PULL_AUTH")
    if auth:
        user, _, password = auth.partition(":")
        req += field(2, field(1, user.encode()) + field(2, password.encode()))
    ch = grpc.insecure_channel(f"unix://{sock}")
    pull = ch.unary_unary("/runtime.v1.ImageService/PullImage")
    results, errors = [None] * n, []

    def one(i):
        try:
            results[i] = pull(req, timeout=1800)
        except grpc.RpcError as e:  # noqa: PERF203
            errors.append(f"{e.code()}: {e.details()}")

    t0 = time.monotonic()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.monotonic() - t0
    if errors:
        sys.exit(f"{len(errors)} pulls failed: {errors[0]}")
    # PullImageResponse { image_ref = 1 }
    r = results[0]
    print(f"{n} pulls in {dt:.3f}s")
    print(r[2:].decode(errors="replace") if r else "")


if __name__ == "__main__":
    main()
