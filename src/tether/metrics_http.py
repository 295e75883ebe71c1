"""A small HTTP listener for ``GET /metrics`` (and ``GET /healthz``), on the event loop.

Both the relay (``tether serve --metrics``) and the tunnel ends (``--metrics``) serve their
Prometheus text this way rather than with prometheus_client's server thread: what they report
lives on the event loop, and no thread may touch it. Bounded like every server here: the
request head's size, the time to send it, and concurrent connections; every handler task is
owned and cancelled on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .listener import Listener

logger = logging.getLogger(__name__)

#: Prometheus' text exposition format (prometheus_client.exposition.CONTENT_TYPE_LATEST).
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
MAX_HEAD = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


class MetricsHTTPServer:
    """Answers ``GET``/``HEAD`` of ``/metrics`` with ``render()`` and, when ``health`` is
    given, ``/healthz`` with 200 or 503 and its reason (for load balancers)."""

    def __init__(self, host: str, port: int, render: Callable[[], bytes],
                 health: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.host, self.port = host, port
        self.render = render
        self.health = health
        self._listener = Listener(self._serve, MAX_CONNECTIONS)

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.address

    async def start(self) -> None:
        await self._listener.start_tcp(self.host, self.port, limit=MAX_HEAD)
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        logger.info("metrics on http://%s:%d/metrics", shown, port)

    async def close(self) -> None:
        await self._listener.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                parts = head.split(b"\r\n", 1)[0].split()
                path = parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
                if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                    code, body, kind = 405, b"GET only\n", TEXT
                elif path in (b"/metrics", b"/"):
                    code, body, kind = 200, self.render(), CONTENT_TYPE
                elif path == b"/healthz" and self.health is not None:
                    ok, why = self.health()
                    code, body, kind = 200 if ok else 503, (why + "\n").encode(), TEXT
                else:
                    hint = b"try /metrics or /healthz\n" if self.health else b"try /metrics\n"
                    code, body, kind = 404, hint, TEXT
                head_only = len(parts) == 3 and parts[0] == b"HEAD"
                writer.write(
                    f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + (b"" if head_only else body))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
