"""Tunnel throughput: N MB through K concurrent TCP streams of one tube, in one process.

Two aiortc peers on loopback, a connecting tunnel listening on 127.0.0.1, an exposing
tunnel dialing a local target. Every byte is checked:

- sink mode (default, one way): each client sends seeded random bytes then EOF; the target
  hashes everything it reads and answers with the SHA-256, which the client compares.
- echo mode (--echo, both ways): the target echoes; the client compares every byte.

Measures, does not assert. Both peers share one process (and one core), so numbers are
lower than with two processes. ``--json`` prints one JSON object on the last line.

    .venv/bin/python benchmarks/bench_tunnel.py [--mb 32] [--streams 4] [--echo] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import pathlib
import random
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.tunnel_peers import channel_pair  # noqa: E402  (one loopback pair for tests and bench)
from tether.demo import push_and_verify  # noqa: E402
from tether.echo import start_echo_server  # noqa: E402
from tether.tunnel import DEFAULT_HIGH_WATER, DEFAULT_WINDOW, Tunnel

MB = 1024 * 1024
CHUNK = 64 * 1024


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    digest = hashlib.sha256()
    try:
        while data := await reader.read(256 * 1024):
            digest.update(data)
        writer.write(digest.digest())
        await writer.drain()
    finally:
        writer.close()


async def _client(address: tuple[str, int], size: int, seed: int, echo: bool) -> None:
    if echo:
        await push_and_verify(address, size, seed)  # the demo's checked echo client
        return
    reader, writer = await asyncio.open_connection(*address)
    gen = random.Random(seed)
    digest = hashlib.sha256()
    try:
        left = size
        while left:
            block = gen.randbytes(min(CHUNK, left))
            digest.update(block)
            writer.write(block)
            await writer.drain()
            left -= len(block)
        writer.write_eof()
        if await reader.read() != digest.digest():
            raise RuntimeError(f"stream {seed}: the target's SHA-256 does not match")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def run(mb: float, streams: int, echo: bool, window: int, high_water: int) -> dict[str, Any]:
    total = int(mb * MB)
    if echo:
        target_server = await start_echo_server("127.0.0.1", 0)
    else:
        target_server = await asyncio.start_server(_sink, "127.0.0.1", 0)
    target = target_server.sockets[0].getsockname()[:2]
    pair = channel_pair()
    ca, cb = await pair.__aenter__()
    connect = Tunnel(ca, name="bench-c", target=None, window=window, high_water=high_water)
    expose = Tunnel(cb, name="bench-e", target=target, window=window, high_water=high_water)
    connect.start()
    expose.start()
    try:
        server = await connect.listen("127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        sizes = [total // streams + (1 if i < total % streams else 0) for i in range(streams)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(_client(address, size, seed, echo)
                               for seed, size in enumerate(sizes)))
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        moved = total * (2 if echo else 1)
        return {
            "mode": "echo" if echo else "sink",
            "mb": mb,
            "streams": streams,
            "window": window,
            "high_water": high_water,
            "seconds": round(seconds, 3),
            "throughput_mb_s": round(total / MB / seconds, 2),
            "moved_mb_s": round(moved / MB / seconds, 2),
            "cpu_ms_per_mb": round(cpu * 1000 / (moved / MB), 1),
            "bytes_verified": total,
            "max_buffered_connect": connect.stats["max_buffered"],
            "max_buffered_expose": expose.stats["max_buffered"],
            "buffered_waits": connect.stats["buffered_waits"] + expose.stats["buffered_waits"],
        }
    finally:
        await connect.close()
        await expose.close()
        await pair.__aexit__(None, None, None)
        target_server.close()
        await target_server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=32, help="megabytes to push (default 32)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams (default 4)")
    parser.add_argument("--echo", action="store_true", help="echo target: data goes both ways")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--high-water", type=int, default=DEFAULT_HIGH_WATER)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args.mb, args.streams, args.echo, args.window, args.high_water))
    print(f"tunnel {result['mode']}: {args.mb:g} MB through {args.streams} streams in "
          f"{result['seconds']:.2f} s = {result['throughput_mb_s']:.2f} MB/s "
          f"({result['moved_mb_s']:.2f} MB/s on the channel, "
          f"{result['cpu_ms_per_mb']:.0f} ms CPU per MB moved), every byte verified; "
          f"max bufferedAmount {result['max_buffered_connect']:,} / "
          f"{result['max_buffered_expose']:,}")
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
