"""Checked TCP transfers: every byte that a benchmark moves is compared with what was sent.

The payload is made (seeded random bytes and their SHA-256) before the clock starts, so
making it costs the measurement nothing. Push: the client writes the payload and half-closes;
the sink hashes everything it reads and answers with the digest, which must match. Pull:
the source writes the payload and closes; the client hashes what it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from dataclasses import dataclass

MB = 1024 * 1024
CHUNK = 256 * 1024


class DataMismatch(RuntimeError):
    """The bytes that arrived are not the bytes that were sent."""


@dataclass(frozen=True)
class Payload:
    data: bytes
    digest: bytes

    @classmethod
    def make(cls, size: int, seed: int) -> Payload:
        data = random.Random(seed).randbytes(size)
        return cls(data, hashlib.sha256(data).digest())

    @property
    def mb(self) -> float:
        return len(self.data) / MB


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def _write_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        writer.write(view[start:start + CHUNK])
        await writer.drain()


async def sink_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Hash everything the connection sends until EOF; answer with the SHA-256."""
    digest = hashlib.sha256()
    try:
        while data := await reader.read(CHUNK):
            digest.update(data)
        writer.write(digest.digest())
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        await _close(writer)


async def start_sink(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """A TCP server that answers each connection with the SHA-256 of all it read."""
    return await asyncio.start_server(sink_handler, host, port)


def source_handler(payload: Payload):  # noqa: ANN201 (an asyncio client_connected_cb)
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _write_all(writer, payload.data)
            writer.write_eof()
            await reader.read()  # until the client closes: nothing is cut short
        except (ConnectionError, OSError):
            pass
        finally:
            await _close(writer)

    return handle


async def start_source(payload: Payload, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """A TCP server that sends ``payload`` to each connection, then half-closes."""
    return await asyncio.start_server(source_handler(payload), host, port)


def allowed(payload: Payload) -> float:
    """Seconds a transfer may take: a minute, plus 4 s per MiB (down to 0.25 MiB/s)."""
    return 60.0 + 4.0 * payload.mb


async def push(address: tuple[str, int], payload: Payload, timeout: float | None = None) -> float:
    """Send the payload to a sink at ``address``; seconds until its digest came back right."""
    async with asyncio.timeout(timeout or allowed(payload)):
        reader, writer = await asyncio.open_connection(*address)
        try:
            t0 = time.perf_counter()
            await _write_all(writer, payload.data)
            writer.write_eof()
            answer = await reader.read()
            seconds = time.perf_counter() - t0
        finally:
            await _close(writer)
    if answer != payload.digest:
        raise DataMismatch(f"push of {len(payload.data):,} bytes to {address}: the sink's "
                           f"SHA-256 does not match ({len(answer)} bytes answered)")
    return seconds


async def pull(address: tuple[str, int], payload: Payload, timeout: float | None = None) -> float:
    """Read everything a source at ``address`` sends; seconds until it was all there, checked."""
    digest = hashlib.sha256()
    got = 0
    async with asyncio.timeout(timeout or allowed(payload)):
        reader, writer = await asyncio.open_connection(*address)
        try:
            t0 = time.perf_counter()
            while data := await reader.read(CHUNK):
                digest.update(data)
                got += len(data)
            seconds = time.perf_counter() - t0
        finally:
            await _close(writer)
    if got != len(payload.data) or digest.digest() != payload.digest:
        raise DataMismatch(f"pull from {address}: {got:,} of {len(payload.data):,} bytes "
                           "arrived, or they differ")
    return seconds
