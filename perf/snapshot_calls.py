#!/usr/bin/env python3
"""N Prepares of new active snapshots on one committed parent, then their N Removes, one
call at a time, against a snapshotter socket (what containerd's unpack and garbage
collection do). Prints the seconds of each phase. Messages are encoded by hand: only
grpcio is needed (Debian's python3-grpcio).

Usage: snapshot_calls.py SOCKET N
"""
import grpc, sys, time
def varint(n):
    out=bytearray()
    while True:
        b=n&0x7F; n>>=7; out.append(b|(0x80 if n else 0))
        if not n: return bytes(out)
def field(num,p): return bytes([num<<3|2])+varint(len(p))+p
sock, n = sys.argv[1], int(sys.argv[2])
ch=grpc.insecure_channel("unix://"+sock)
svc="/containerd.services.snapshots.v1.Snapshots/"
prep=ch.unary_unary(svc+"Prepare"); rm=ch.unary_unary(svc+"Remove"); commit=ch.unary_unary(svc+"Commit")
prep(field(1,b"u")+field(2,b"base-a"))
commit(field(1,b"u")+field(2,b"base")+field(3,b"base-a"))
t=time.monotonic()
for i in range(n): prep(field(1,b"u")+field(2,f"k{i}".encode())+field(3,b"base"))
tp=time.monotonic()-t
t=time.monotonic()
for i in range(n): rm(field(1,b"u")+field(2,f"k{i}".encode()))
tr=time.monotonic()-t
print(f"{n} Prepares {tp:.2f} s, {n} Removes {tr:.2f} s")
