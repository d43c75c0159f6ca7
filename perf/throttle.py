#!/usr/bin/env python3
"""A network like a real one, on 127.0.0.1: a TCP proxy in front of a registry that caps each
connection's download rate (as an object-store-backed registry serves one connection) and
delays each request (a round trip to a registry elsewhere).

Usage: throttle.py TARGET_PORT [--rate MBPS] [--latency MS] [--port PORT]
    TARGET_PORT   the registry's port on 127.0.0.1
    --rate        megabytes (10^6) per second per connection, server to client (default 40;
                  0: no cap)
    --latency     milliseconds added before each request reaches the registry (default 20)
    --port        where to listen (default 0: a free port)
Prints "listening PORT" once it accepts connections; runs until killed. Listens on
127.0.0.1 only.
"""
import argparse
import asyncio
import time

CHUNK = 64 << 10


async def pump(reader, writer, pace):
    """Forwards `reader` to `writer`, each chunk waiting `pace(len)` seconds first."""
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            wait = pace(len(data))
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        close(writer)


def request_latency(latency):
    """Client to server: a chunk after a quiet moment (a new request on a kept-alive
    connection, or the first) waits `latency`."""
    last = [0.0]

    def pace(_n):
        now = time.monotonic()
        wait = latency if latency and now - last[0] > latency else 0.0
        last[0] = now + wait
        return wait

    return pace


def rate_cap(rate):
    """Server to client: at most `rate` bytes a second (a token bucket holding at most one
    chunk, so that no burst outruns the cap)."""
    state = {"allowance": 0.0, "stamp": time.monotonic()}

    def pace(n):
        if not rate:
            return 0.0
        now = time.monotonic()
        state["allowance"] = min(state["allowance"] + (now - state["stamp"]) * rate, CHUNK)
        state["stamp"] = now
        state["allowance"] -= n
        return -state["allowance"] / rate if state["allowance"] < 0 else 0.0

    return pace


def close(writer):
    try:
        writer.close()
    except Exception:  # noqa: BLE001 (a connection already gone)
        pass


def main():
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument("target", type=int)
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--latency", type=float, default=20.0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    rate, latency = a.rate * 1e6, a.latency / 1000

    async def handle(creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", a.target)
        except OSError:
            close(cwriter)
            return
        await asyncio.gather(
            pump(creader, swriter, request_latency(latency)),
            pump(sreader, cwriter, rate_cap(rate)),
        )

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", a.port)
        print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
