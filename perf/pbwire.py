"""Protobuf by hand, for the scripts that talk gRPC with only grpcio installed
(perf/cri_pull.py, perf/snapshot_calls.py, tests/tools/flood.py): a varint and a
length-delimited field, all their messages need."""


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, payload):
    """Field `num` of wire type 2 (a string, bytes or a message)."""
    return bytes([num << 3 | 2]) + varint(len(payload)) + payload
