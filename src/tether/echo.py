"""A TCP echo server: the demo's built-in target, and a handy one for tests."""

from __future__ import annotations

import asyncio
import contextlib


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start an echo server; its address is ``server.sockets[0].getsockname()``."""
    return await asyncio.start_server(_echo, host, port)
