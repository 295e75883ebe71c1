"""A SOCKS5 server (RFC 1928 CONNECT, RFC 1929 username/password) whose every connection
becomes a stream through the tunnel, to the target the client named.

The exposing side decides what may be dialed (its ``--allow`` list, see tether.allow);
its refusal comes back as an OPEN_FAIL reason with a code (tether.tunnel.reasons), which
becomes the SOCKS reply: not allowed (2), network unreachable (3), host unreachable (4),
connection refused (5), general failure (1). No tube up within the wait: network
unreachable (3).

Without users the server must listen on a loopback address (no authentication, like
``ssh -D``); on any other address a users file is required (RFC 1929). Everything a
client can make the server hold is bounded: the handshake must complete within
``handshake_timeout`` seconds, every field is at most 255 bytes by the protocol, and at
most ``max_clients`` connections are served at once (more are closed at once).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .listener import Listener
from .tunnel import reasons
from .tunnel.stream import format_hostport

logger = logging.getLogger(__name__)

VERSION = 5
AUTH_VERSION = 1
NO_AUTH = 0x00
USER_PASS = 0x02
NO_ACCEPTABLE = 0xFF
CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_NAME = 0x03
ATYP_IPV6 = 0x04

# Reply codes (RFC 1928 section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_CLIENTS = 1024

_REPLY_FOR_CODE = {
    reasons.DENIED: NOT_ALLOWED,
    reasons.NET_UNREACHABLE: NETWORK_UNREACHABLE,
    reasons.UNREACHABLE: HOST_UNREACHABLE,
    reasons.NO_SUCH_HOST: HOST_UNREACHABLE,
    reasons.TIMEOUT: HOST_UNREACHABLE,
    reasons.REFUSED: CONNECTION_REFUSED,
}

#: Carries one client connection to ``target`` through the tunnel (ConnectSide.carry).
Opener = Callable[[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int],
                   Callable[[str | None], None]], Awaitable[None]]


class SocksError(Exception):
    """The client broke the protocol or may not do what it asked; ``reply`` is the reply
    code to send before closing (None: close without a reply)."""

    def __init__(self, message: str, reply: int | None = None, *, auth: bool = False) -> None:
        super().__init__(message)
        self.reply = reply
        self.auth = auth  # a failed authentication (counted apart from broken handshakes)


@dataclass(frozen=True, slots=True)
class Request:
    """A CONNECT request: the target and, with authentication, who asked."""

    host: str
    port: int
    user: str | None = None


def reply_for(reason: str) -> int:
    """The SOCKS reply code for an OPEN_FAIL reason."""
    return _REPLY_FOR_CODE.get(reasons.code_of(reason), GENERAL_FAILURE)


def encode_reply(code: int) -> bytes:
    """A reply with an unspecified bound address (0.0.0.0:0): the real one is at the far
    end of the tunnel."""
    return struct.pack(">BBBB4sH", VERSION, code, 0, ATYP_IPV4, b"\0\0\0\0", 0)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def read_users(path: str) -> dict[str, str]:
    """``user:password`` lines (blank lines and ``#`` comments ignored); ValueError if bad."""
    users: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.rstrip("\r\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            user, sep, password = text.partition(":")
            if not sep or not user or not password:
                raise ValueError(f"{path}:{number}: expected user:password")
            if len(user.encode()) > 255 or len(password.encode()) > 255:
                raise ValueError(f"{path}:{number}: user and password are at most 255 bytes")
            users[user] = password
    if not users:
        raise ValueError(f"{path}: no user:password lines")
    return users


async def _read(reader: asyncio.StreamReader, n: int) -> bytes:
    return await reader.readexactly(n)


async def handshake(reader: asyncio.StreamReader, write: Callable[[bytes], Any],
                    users: Mapping[str, str] | None) -> Request:
    """Run the server side of the handshake up to (not including) the final reply.

    ``users``: None for no authentication, else the accepted user names and passwords.
    Raises :class:`SocksError` (with the reply to send, if any) on anything wrong, and
    asyncio.IncompleteReadError if the client hangs up midway.
    """
    version, count = await _read(reader, 2)
    if version != VERSION:
        raise SocksError(f"not SOCKS5 (version byte {version})")
    if count == 0:
        raise SocksError("the client offers no authentication method")
    methods = await _read(reader, count)
    wanted = NO_AUTH if users is None else USER_PASS
    if wanted not in methods:
        write(bytes((VERSION, NO_ACCEPTABLE)))
        raise SocksError("the client does not offer " + (
            "no-authentication" if users is None else "username/password authentication"))
    write(bytes((VERSION, wanted)))
    user = None
    if users is not None:
        user = await _authenticate(reader, write, users)
    version, command, reserved, atyp = await _read(reader, 4)
    if version != VERSION:
        raise SocksError(f"bad request version {version}", GENERAL_FAILURE)
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(await _read(reader, 4)))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(await _read(reader, 16)))
    elif atyp == ATYP_NAME:
        (size,) = await _read(reader, 1)
        raw = await _read(reader, size)
        host = _name(raw)
    else:
        raise SocksError(f"unknown address type {atyp}", ADDRESS_TYPE_NOT_SUPPORTED)
    (port,) = struct.unpack(">H", await _read(reader, 2))
    if command != CONNECT:
        raise SocksError(f"command {command} is not supported (only CONNECT)",
                         COMMAND_NOT_SUPPORTED)
    if reserved != 0:
        raise SocksError("reserved byte is not zero", GENERAL_FAILURE)
    if port == 0:
        raise SocksError("port 0", HOST_UNREACHABLE)
    return Request(host, port, user)


def _name(raw: bytes) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SocksError("the host name is not ASCII (use its IDNA form)",
                         ADDRESS_TYPE_NOT_SUPPORTED) from None
    if not name or any(c.isspace() or c in "/@[]:\\" or not c.isprintable() for c in name):
        raise SocksError(f"{name!r} is not a host name", ADDRESS_TYPE_NOT_SUPPORTED)
    return name


async def _authenticate(reader: asyncio.StreamReader, write: Callable[[bytes], Any],
                        users: Mapping[str, str]) -> str:
    version, size = await _read(reader, 2)
    if version != AUTH_VERSION:
        write(bytes((AUTH_VERSION, 1)))
        raise SocksError(f"bad authentication version {version}")
    user_raw = await _read(reader, size)
    (size,) = await _read(reader, 1)
    password_raw = await _read(reader, size)
    user = user_raw.decode("utf-8", "replace")
    expected = users.get(user)
    # Compare even for an unknown user, so timing does not tell which users exist.
    ok = hmac.compare_digest((expected or "\0" * 32).encode(), password_raw)
    if expected is None or not ok:
        write(bytes((AUTH_VERSION, 1)))
        raise SocksError(f"wrong user name or password (user {user!r})", auth=True)
    write(bytes((AUTH_VERSION, 0)))
    return user


class SocksServer:
    """Listens on (host, port); each client's CONNECT is carried by ``opener``."""

    def __init__(self, opener: Opener, host: str, port: int, *,
                 users: Mapping[str, str] | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        if users is None and not is_loopback(host):
            raise ValueError(f"SOCKS on {format_hostport(host, port)} (not loopback) needs "
                             "username/password authentication: give a users file "
                             "(--socks-users FILE, lines user:password)")
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.opener = opener
        self.host = host
        self.port = port
        self.users = dict(users) if users is not None else None
        self.handshake_timeout = handshake_timeout
        self.max_clients = max_clients
        self._listener = Listener(self._on_client, max_clients, refuse=self._refuse)
        self.stats = {"clients": 0, "refused_busy": 0, "bad_handshakes": 0,
                      "auth_failures": 0, "connected": 0, "open_failures": 0}

    @property
    def listening(self) -> bool:
        return self._listener.listening

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.address

    async def start(self) -> None:
        await self._listener.start_tcp(self.host, self.port)
        logger.info("SOCKS5 on %s (%s)", format_hostport(*self.address),
                    "no authentication, loopback" if self.users is None
                    else f"{len(self.users)} users")

    async def close(self) -> None:
        await self._listener.close()

    async def __aenter__(self) -> SocksServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _refuse(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self.stats["refused_busy"] += 1
        logger.warning("SOCKS: %d clients already; closing a new one",
                       self._listener.connections)
        writer.transport.abort()

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.stats["clients"] += 1
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # shutting down; the root task ends quietly

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = format_hostport(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else "?"
        try:
            async with asyncio.timeout(self.handshake_timeout):
                request = await handshake(reader, writer.write, self.users)
        except SocksError as exc:
            if exc.auth:
                self.stats["auth_failures"] += 1
            else:
                self.stats["bad_handshakes"] += 1
            logger.warning("SOCKS client %s: %s", who, exc)
            if exc.reply is not None:
                writer.write(encode_reply(exc.reply))
            await _close(writer)
            return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            self.stats["bad_handshakes"] += 1
            what = ("did not finish the handshake within "
                    f"{self.handshake_timeout:g} s" if isinstance(exc, TimeoutError)
                    else "hung up during the handshake")
            logger.info("SOCKS client %s %s", who, what)
            writer.transport.abort()
            return
        target = format_hostport(request.host, request.port)

        def on_open(reason: str | None) -> None:
            if writer.is_closing():
                return
            if reason is None:
                self.stats["connected"] += 1
                writer.write(encode_reply(SUCCEEDED))
                return
            self.stats["open_failures"] += 1
            code = reply_for(reason)
            logger.info("SOCKS client %s: %s refused (SOCKS reply %d): %s", who, target,
                        code, reasons.split(reason)[0])
            writer.write(encode_reply(code))

        logger.info("SOCKS client %s: CONNECT %s%s", who, target,
                    f" (user {request.user})" if request.user else "")
        await self.opener(reader, writer, (request.host, request.port), on_open)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(5):
            await writer.wait_closed()
    except (TimeoutError, ConnectionError, OSError):
        writer.transport.abort()


__all__ = ["Request", "SocksError", "SocksServer", "encode_reply", "handshake", "is_loopback",
           "read_users", "reply_for"]
