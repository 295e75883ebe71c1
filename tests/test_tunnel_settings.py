"""SETTINGS: each tunnel tells its peer, just before its first frame, that it accepts DATA
of up to MAX_DATA_LARGE (60 KiB), and sends DATA larger than the protocol's base (16 KiB)
only to a peer that said so. Real aiortc channels, real TCP sockets; the older peer is a tunnel as
tether was before SETTINGS (it announces nothing, ignores a frame type it does not know,
and its decoder refused DATA beyond 16 KiB, which we count here)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from tether.tunnel import FrameType, Tunnel, frames
from tether.tunnel.frames import HEADER_SIZE, MAX_DATA, MAX_DATA_LARGE

from .test_tunnel import echo_through, wait_until
from .tunnel_peers import FakeChannel, channel_pair, echo_server

MiB = 1024 * 1024


class OlderTunnel(Tunnel):
    """A peer from before SETTINGS, as its peer sees it."""

    too_large = 0  # DATA frames its decoder would have refused
    unknown = 0  # SETTINGS frames it logged as an unknown type and ignored

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._announced = True  # it has no SETTINGS to send

    def _dispatch(self, message: bytes | str) -> None:
        if isinstance(message, bytes) and message[:1] == bytes([FrameType.SETTINGS]):
            self.unknown += 1
            return
        if (isinstance(message, bytes) and message[:1] == bytes([FrameType.DATA])
                and len(message) > HEADER_SIZE + MAX_DATA):
            self.too_large += 1
        super()._dispatch(message)


@contextlib.asynccontextmanager
async def pair_of(connect_cls: type[Tunnel], expose_cls: type[Tunnel],
                  target: tuple[str, int]) -> AsyncIterator[tuple[Tunnel, Tunnel, tuple[str, int]]]:
    async with channel_pair() as (ca, cb):
        connect = connect_cls(ca, name="s-connect", target=None)
        expose = expose_cls(cb, name="s-expose", target=target)
        connect.start()
        expose.start()
        try:
            server = await connect.listen("127.0.0.1", 0)
            yield connect, expose, server.sockets[0].getsockname()[:2]
        finally:
            await connect.close()
            await expose.close()


async def test_two_current_tunnels_send_each_other_large_frames() -> None:
    payload = random.Random(8).randbytes(4 * MiB)
    async with echo_server() as target, pair_of(Tunnel, Tunnel, target) as (connect, expose, address):
        assert connect.peer_max_data == expose.peer_max_data == MAX_DATA  # nothing sent yet
        assert await echo_through(address, payload) == payload
        for tunnel in (connect, expose):
            stats = tunnel.stats
            assert stats["peer_max_data"] == MAX_DATA_LARGE
            assert MAX_DATA < stats["largest_data_sent"] <= MAX_DATA_LARGE
            assert stats["frames_malformed"] == 0


@pytest.mark.parametrize("older", ["connect", "expose"])
async def test_an_older_peer_gets_frames_it_accepts_and_loses_nothing(older: str) -> None:
    payload = random.Random(9).randbytes(2 * MiB)
    classes = (OlderTunnel, Tunnel) if older == "connect" else (Tunnel, OlderTunnel)
    async with echo_server() as target, pair_of(*classes, target) as (connect, expose, address):
        old, new = (connect, expose) if older == "connect" else (expose, connect)
        assert await echo_through(address, payload) == payload
        assert old.unknown == 1  # the SETTINGS reached it, once, and was ignored
        assert new.peer_max_data == MAX_DATA
        assert 0 < new.stats["largest_data_sent"] <= MAX_DATA
        assert old.too_large == 0
        assert old.stats["largest_data_sent"] <= MAX_DATA  # it never learnt of more


async def test_settings_go_first_once_and_are_clamped_to_what_the_protocol_allows() -> None:
    channel = FakeChannel()
    tunnel = Tunnel(channel, name="s", target=("127.0.0.1", 9))  # type: ignore[arg-type]
    tunnel.start()
    try:
        assert channel.sent == []  # an idle tunnel sends nothing, not even SETTINGS
        channel.emit("message", frames.encode_open(1, 1))  # refused: the window is too small
        channel.emit("message", frames.encode_open(2, 1))
        assert [f.type for f in channel.frames()] == [
            FrameType.SETTINGS, FrameType.OPEN_FAIL, FrameType.OPEN_FAIL]
        assert channel.frames()[0] == frames.Frame(FrameType.SETTINGS, 0, value=MAX_DATA_LARGE)
        assert tunnel.peer_max_data == MAX_DATA  # until the peer says more
        for announced, used in [(30_000, 30_000), (10**9, MAX_DATA_LARGE), (1, MAX_DATA),
                                (MAX_DATA_LARGE, MAX_DATA_LARGE)]:
            channel.emit("message", frames.encode_settings(announced))
            assert tunnel.peer_max_data == used
        # A SETTINGS without the setting (or with ids we do not know) changes nothing.
        channel.emit("message", frames.HEADER.pack(FrameType.SETTINGS, 0) + b"\x00\x07" + b"\x00" * 4)
        assert tunnel.peer_max_data == MAX_DATA_LARGE
        assert tunnel.stats["frames_malformed"] == 0
        # On another stream id it is malformed: counted, ignored, nothing else happens.
        channel.emit("message", frames.HEADER.pack(FrameType.SETTINGS, 3))
        assert tunnel.stats["frames_malformed"] == 1 and tunnel.failure is None
    finally:
        await tunnel.close()


async def test_a_stream_reads_up_to_the_peers_limit() -> None:
    """The uplink's reads follow peer_max_data: 16 KiB frames before the peer's SETTINGS."""
    channel = FakeChannel()
    tunnel = Tunnel(channel, name="s", target=None)  # type: ignore[arg-type]
    tunnel.start()
    server = await tunnel.listen("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        await wait_until(lambda: channel.frames(FrameType.OPEN), what="the OPEN")
        sid = channel.frames(FrameType.OPEN)[0].stream_id
        channel.emit("message", frames.encode_open_ok(sid, 1 << 20))
        writer.write(b"a" * 200_000)
        await writer.drain()
        await wait_until(lambda: sum(len(f.data) for f in channel.frames(FrameType.DATA)) == 200_000,
                         what="200,000 bytes in DATA frames")
        assert max(len(f.data) for f in channel.frames(FrameType.DATA)) == MAX_DATA
        channel.emit("message", frames.encode_settings(MAX_DATA_LARGE))
        writer.write(b"b" * 200_000)
        await writer.drain()
        await wait_until(lambda: sum(len(f.data) for f in channel.frames(FrameType.DATA)) == 400_000,
                         what="400,000 bytes in DATA frames")
        later = [f for f in channel.frames(FrameType.DATA) if f.data[:1] == b"b"]
        assert max(len(f.data) for f in later) > MAX_DATA
        assert max(len(f.data) for f in later) <= MAX_DATA_LARGE
        writer.close()
    finally:
        await tunnel.close()
        server.close()
