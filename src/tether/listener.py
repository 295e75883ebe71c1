"""A listening socket that owns the tasks of the connections it accepted.

The control socket, the metrics endpoint and the SOCKS server need the same three things
from asyncio's server: a cap on the connections served at once (one more is handed to the
owner's ``refuse``, or closed), every connection's task remembered, and a ``close()`` that
stops listening, cancels those tasks and awaits them, so no connection outlives its owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """Serves each accepted connection with ``handle``, at most ``max_connections`` at once."""

    def __init__(self, handle: Handler, max_connections: int,
                 refuse: Handler | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.handle = handle
        self.max_connections = max_connections
        self.refuse = refuse
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    @property
    def listening(self) -> bool:
        return self.server is not None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) of a TCP listener."""
        assert self.server is not None, "start first"
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def start_tcp(self, host: str | None, port: int, **kwargs: Any) -> None:
        self.server = await asyncio.start_server(self._accept, host, port, **kwargs)

    async def start_unix(self, path: str, **kwargs: Any) -> None:
        self.server = await asyncio.start_unix_server(self._accept, path, **kwargs)

    async def close(self) -> None:
        """Stop listening, end every connection and wait for them. Idempotent."""
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            if self.refuse is not None:
                await self.refuse(reader, writer)
            else:
                writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        finally:
            self._tasks.discard(task)
