"""A TCP proxy on loopback that can turn its connections half-open, and its own tests.

``FreezableProxy`` sits between a signaling client and the relay. ``freeze()`` makes every
connection it carries at that moment silently dead, in both directions, the way a path
through a deleted source address is: bytes are no longer read nor forwarded, and neither
end is told (no FIN, no RST). New connections still pass, like a new path after a network
change. Other test modules import it from here.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest


class _Pipe:
    def __init__(self) -> None:
        self.frozen = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []


class FreezableProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port> until frozen."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pipes: list[_Pipe] = []

    async def start(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def freeze(self) -> int:
        """Make every current connection half-open; return how many."""
        count = 0
        for pipe in self._pipes:
            if not pipe.frozen:
                pipe.frozen = True
                count += 1
        return count

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            for writer in pipe.writers:
                writer.transport.abort()
            for task in pipe.tasks:
                task.cancel()
        tasks = [task for pipe in self._pipes for task in pipe.tasks]
        if tasks:
            await asyncio.wait(tasks)
        if self._server is not None:
            await self._server.wait_closed()
        self._pipes.clear()

    async def __aenter__(self) -> FreezableProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pipe = _Pipe()
        pipe.writers.append(writer)
        self._pipes.append(pipe)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pipe.writers.append(up_writer)
        pipe.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, pipe)),
            asyncio.create_task(self._pump(up_reader, writer, pipe)),
        ]

    @staticmethod
    async def _pump(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, pipe: _Pipe
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while not pipe.frozen:
                data = await source.read(65536)
                if pipe.frozen:
                    break  # in flight on a dead path: lost
                if not data:
                    sink.close()  # a real end of stream: pass it on
                    return
                sink.write(data)
                await sink.drain()
        if pipe.frozen:
            await asyncio.Event().wait()  # dead path: never read, never close, until close()


# -- the proxy's own tests ----------------------------------------------------------------


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_proxy_forwards_until_frozen_then_stays_silent_and_new_connections_pass():
    server = await _echo_server()
    port = server.sockets[0].getsockname()[1]
    async with FreezableProxy(port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 2) == b"hello"

        assert proxy.freeze() == 1
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):  # no data, and no EOF either: half-open
            await asyncio.wait_for(reader.read(1), 0.2)
        assert not reader.at_eof()

        reader2, writer2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer2.write(b"again")
        assert await asyncio.wait_for(reader2.readexactly(5), 2) == b"again"
        assert proxy.accepted == 2
        writer.transport.abort()
        writer2.close()
    server.close()
    await server.wait_closed()
