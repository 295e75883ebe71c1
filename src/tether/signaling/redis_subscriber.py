"""A lean Redis pub/sub subscriber for one channel (plain ``redis://`` TCP connections).

Every relayed signal between relays arrives as one pub/sub message, so its cost matters:
redis-py's pure-Python reply parser spends about 40 us of CPU per message; this protocol
parses the fixed shape of a ``message`` push (``*3 $7 message $n channel $m data``) with a
few ``bytes.find`` calls. It speaks RESP2 only as far as a subscriber needs: ``AUTH``,
``SELECT`` is not needed (pub/sub ignores the database), ``SUBSCRIBE`` and its confirmation.
``rediss://`` and ``unix://`` URLs use redis-py's subscriber instead (see ``redis_table``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_BUFFER = 64 * 1024 * 1024
"""A subscriber that falls this far behind (or a broken stream) is disconnected."""


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class SubscriberProtocol(asyncio.Protocol):
    """Calls ``on_message(data: str)`` for each message on the subscribed channel."""

    def __init__(self, channel: str, on_message: Callable[[str], None],
                 username: str | None = None, password: str | None = None) -> None:
        self.channel = channel
        self.on_message = on_message
        self.username = username
        self.password = password
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        commands = []
        if self.password:
            auth = ("AUTH", self.username, self.password) if self.username else (
                "AUTH", self.password)
            commands.append(_command(*auth))
        commands.append(_command("SUBSCRIBE", self.channel))
        self.transport.write(b"".join(commands))

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"connection lost: {exc}" if exc else "Redis closed the connection"
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if not self.lost.done():
            self.lost.set_result(why)

    def _fail(self, why: str) -> None:
        log.warning("relay: Redis subscription: %s", why)
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if not self.lost.done():
            self.lost.set_result(why)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        size = len(buf)
        while pos < size:
            kind = buf[pos]
            if kind == 0x2A:  # '*': an array (a push: message or subscribe confirmation)
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                count = int(buf[pos + 1:end])
                items: list[bytes | int] = []
                cur = end + 2
                complete = True
                for _ in range(count):
                    if cur >= size:
                        complete = False
                        break
                    end = buf.find(b"\r\n", cur)
                    if end < 0:
                        complete = False
                        break
                    if buf[cur] == 0x24:  # '$': bulk string
                        length = int(buf[cur + 1:end])
                        start = end + 2
                        if start + length + 2 > size:
                            complete = False
                            break
                        items.append(bytes(buf[start:start + length]))
                        cur = start + length + 2
                    elif buf[cur] == 0x3A:  # ':': integer
                        items.append(int(buf[cur + 1:end]))
                        cur = end + 2
                    else:
                        self._fail(f"unexpected reply {bytes(buf[cur:cur + 40])!r}")
                        return
                if not complete:
                    break
                pos = cur
                if items and items[0] == b"message" and len(items) == 3:
                    payload = items[2]
                    assert isinstance(payload, bytes)
                    try:
                        self.on_message(payload.decode())
                    except Exception:
                        log.exception("relay: failed to handle a message from Redis")
                elif items and items[0] == b"subscribe" and not self.subscribed.done():
                    self.subscribed.set_result(None)
            elif kind in (0x2B, 0x3A):  # '+OK' (AUTH), ':n'
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                pos = end + 2
            elif kind == 0x2D:  # '-ERR ...'
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                self._fail(bytes(buf[pos + 1:end]).decode(errors="replace")[:200])
                return
            else:
                self._fail(f"unexpected reply {bytes(buf[pos:pos + 40])!r}")
                return
        del buf[:pos]
        if len(buf) > MAX_BUFFER:
            self._fail("a reply larger than the subscriber's buffer")


async def subscribe(host: str, port: int, channel: str, on_message: Callable[[str], None],
                    *, username: str | None = None, password: str | None = None,
                    timeout: float = 2.0) -> SubscriberProtocol:
    """Connect and subscribe; the protocol's ``lost`` future resolves when it ends."""
    loop = asyncio.get_running_loop()
    protocol = SubscriberProtocol(channel, on_message, username, password)
    async with asyncio.timeout(timeout):
        await loop.create_connection(lambda: protocol, host, port)
        await protocol.subscribed
    return protocol
