"""Test helpers for the tunnel: two connected aiortc data channels in one process, on
loopback only, plus a TCP echo server and a two-sided tunnel built on them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

from tether.cores.gathering import LOOPBACK, host_addresses
from tether.echo import start_echo_server
from tether.tunnel import Tunnel, frames


async def _wait_open(channel: RTCDataChannel) -> None:
    if channel.readyState == "open":
        return
    opened = asyncio.Event()
    channel.on("open", opened.set)
    if channel.readyState == "open":
        return
    await opened.wait()


@contextlib.asynccontextmanager
async def channel_pair(timeout: float = 20.0) -> AsyncIterator[tuple[RTCDataChannel, RTCDataChannel]]:
    """Two open, connected RTCDataChannels (negotiated id 0), one per RTCPeerConnection."""
    a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    b = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        ca = a.createDataChannel("tether", negotiated=True, id=0)
        cb = b.createDataChannel("tether", negotiated=True, id=0)
        with host_addresses(LOOPBACK):
            await a.setLocalDescription(await a.createOffer())
            await b.setRemoteDescription(a.localDescription)
            await b.setLocalDescription(await b.createAnswer())
            await a.setRemoteDescription(b.localDescription)
        await asyncio.wait_for(asyncio.gather(_wait_open(ca), _wait_open(cb)), timeout)
        yield ca, cb
    finally:
        await a.close()
        await b.close()


@contextlib.asynccontextmanager
async def echo_server(host: str = "127.0.0.1") -> AsyncIterator[tuple[str, int]]:
    """A TCP echo server (echoes, then half-closes after the client's EOF)."""
    server = await start_echo_server(host)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()


def refused_port(host: str = "127.0.0.1") -> int:
    """A port with nothing listening: bind, read the port, close."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class TunnelPair:
    """The connecting side (listens) and the exposing side (dials ``target``)."""

    connect: Tunnel
    expose: Tunnel
    server: asyncio.Server
    connect_channel: RTCDataChannel
    expose_channel: RTCDataChannel

    @property
    def address(self) -> tuple[str, int]:
        return self.server.sockets[0].getsockname()[:2]


@contextlib.asynccontextmanager
async def tunnel_pair(
    target: tuple[str, int], listen_host: str = "127.0.0.1", **kwargs: Any
) -> AsyncIterator[TunnelPair]:
    """Two tunnels over one channel pair; the connecting one listening on ``listen_host``."""
    async with channel_pair() as (ca, cb):
        connect = Tunnel(ca, name="t-connect", target=None, **kwargs)
        expose = Tunnel(cb, name="t-expose", target=target, **kwargs)
        connect.start()
        expose.start()
        try:
            server = await connect.listen(listen_host, 0)
            yield TunnelPair(connect, expose, server, ca, cb)
        finally:
            await connect.close()
            await expose.close()


class FakeChannel:
    """Just enough of RTCDataChannel: records sent frames, lets the test emit events.

    ``stalled``: the peer reads nothing, so every frame sent stays in bufferedAmount (as
    in aiortc's queue) until :meth:`drain`. For rules that must be exact and deterministic:
    the test decides when frames arrive and how full the channel is.
    """

    def __init__(self, *, stalled: bool = False) -> None:
        self.readyState = "open"
        self.bufferedAmount = 0
        self.bufferedAmountLowThreshold = 0
        self.stalled = stalled
        self.sent: list[bytes] = []
        self.max_buffered = 0
        self.handlers: dict[str, list] = {}

    def on(self, event: str, handler) -> None:
        self.handlers.setdefault(event, []).append(handler)

    def remove_listener(self, event: str, handler) -> None:
        self.handlers[event].remove(handler)

    def emit(self, event: str, *args) -> None:
        for handler in list(self.handlers.get(event, [])):
            handler(*args)

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        if self.stalled:
            self.bufferedAmount += len(data)
            self.max_buffered = max(self.max_buffered, self.bufferedAmount)

    def drain(self) -> None:
        self.bufferedAmount = 0
        self.emit("bufferedamountlow")

    def frames(self, ftype: frames.FrameType | None = None) -> list[frames.Frame]:
        out = [frames.decode(raw) for raw in self.sent]
        return [f for f in out if ftype is None or f.type is ftype]
