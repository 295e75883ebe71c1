"""What a hostile or broken peer can make a tunnel do, over real aiortc data channels.

The peer here is a :class:`RawPeer`: frames written by hand on one end of a real channel
pair (loopback), as a peer that ignores the rules would send them. The tunnel under test
runs on the other end with real TCP sockets to a real target. Latencies are measured and
printed (run with ``-s`` to see them); the assertions only rule out the old failure modes
(unbounded connections, a 30 s hang), never tight timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiortc import RTCDataChannel

from tether.tunnel import FrameType, Tunnel, frames
from tether.tunnel.frames import HEADER, MAX_TARGET, MAX_WINDOW, MIN_WINDOW, Frame

from .tunnel_peers import channel_pair, echo_server, tunnel_pair

BIG_ID = 1_000_000  # ids a raw sender uses next to a real tunnel, far from the tunnel's own


@pytest.fixture(autouse=True)
def tunnel_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="tether.tunnel")
    return caplog


class RawPeer:
    """Sends hand-made frames on a real channel and records every frame that comes back."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.frames: list[Frame] = []
        self.settings: list[Frame] = []  # the tunnel's SETTINGS, apart from stream frames
        self.arrived: dict[tuple[FrameType, int], float] = {}
        self._changed = asyncio.Event()
        channel.on("message", self._on_message)

    def _on_message(self, message: bytes | str) -> None:
        frame = frames.decode(message)  # the tunnel under test only sends valid frames
        if frame.type is FrameType.SETTINGS:
            self.settings.append(frame)
            return
        self.frames.append(frame)
        self.arrived.setdefault((frame.type, frame.stream_id), time.monotonic())
        self._changed.set()

    def send(self, raw: bytes) -> float:
        self.channel.send(raw)
        return time.monotonic()

    def of(self, ftype: FrameType) -> list[Frame]:
        return [f for f in self.frames if f.type is ftype]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Holder:
    """A TCP target that accepts and holds every connection until the client ends it,
    reading (and with ``echo``, echoing) whatever comes."""

    address: tuple[str, int]
    accepted: int = 0
    live: set[asyncio.StreamWriter] = field(default_factory=set)


@contextlib.asynccontextmanager
async def holding_target(echo: bool = False) -> AsyncIterator[Holder]:
    holder = Holder(("127.0.0.1", 0))
    handlers: set[asyncio.Task[None]] = set()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        holder.accepted += 1
        holder.live.add(writer)
        try:
            while data := await reader.read(65536):
                if echo:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            holder.live.discard(writer)
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    holder.address = server.sockets[0].getsockname()[:2]
    try:
        yield holder
    finally:
        server.close()
        await server.wait_closed()
        while handlers:  # each ends on its own once its connection is gone
            for writer in list(holder.live):
                writer.transport.abort()
            await asyncio.wait(set(handlers), timeout=0.1)


async def settle(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def report(name: str, latencies: list[float]) -> None:
    ms = sorted(x * 1000 for x in latencies)
    print(f"\n{name}: {len(ms)} replies, median {statistics.median(ms):.1f} ms, "
          f"p99 {ms[int(len(ms) * 0.99) - 1]:.1f} ms, max {ms[-1]:.1f} ms")


# ---------------------------------------------------------------------------- OPEN floods


@pytest.mark.parametrize("open_rate", [None, 64.0], ids=["no-rate-limit", "default-limits"])
async def test_3000_opens_make_at_most_max_streams_target_connections(
    open_rate: float | None,
) -> None:
    """3,000 OPENs at once: at most max_streams (256) connections reach the target (exactly
    256 with the rate limit off); every other OPEN is answered with OPEN_FAIL naming the
    limit, quickly."""
    n = 3000
    async with holding_target() as target, channel_pair() as (raw_channel, channel):
        tunnel = Tunnel(channel, name="expose", target=target.address, open_rate=open_rate)
        tunnel.start()
        peer = RawPeer(raw_channel)
        arrived: dict[int, float] = {}  # when each OPEN reached the tunnel

        def on_open(message: bytes) -> None:
            if message[:1] == b"\x01":
                arrived[HEADER.unpack_from(message)[1]] = time.monotonic()

        channel.on("message", on_open)
        try:
            sent = {sid: peer.send(frames.encode_open(sid, 256 * 1024))
                    for sid in range(1, n + 1)}
            await peer.wait(lambda: len(peer.arrived) == n, timeout=60)
            await settle(lambda: target.accepted == len(peer.of(FrameType.OPEN_OK)))
            await asyncio.sleep(0.2)  # nothing more arrives at the target

            ok, fail = peer.of(FrameType.OPEN_OK), peer.of(FrameType.OPEN_FAIL)
            assert tunnel.max_streams == 256
            assert len(target.live) == target.accepted == len(ok) <= 256
            assert len(ok) + len(fail) == n
            assert {f.stream_id for f in ok} | {f.stream_id for f in fail} == set(sent)
            stats = tunnel.stats
            assert stats["streams_open"] == len(ok)
            assert stats["opens_refused"] == len(fail)
            assert stats["opens_refused_limit"] + stats["opens_refused_rate"] == len(fail)
            if open_rate is None:
                assert len(ok) == 256
                assert all(f.text == "stream limit reached: 256 streams are open, at most "
                           "256 (max_streams)" for f in fail)
            else:
                assert len(ok) >= 128  # the burst, then 64/s
                assert all(f.text.startswith(("stream limit reached", "OPEN rate limit"))
                           for f in fail)
            assert stats["control_dropped"] == 0 and stats["failure"] is None
            assert stats["max_buffered"] <= tunnel.bound
            reply = {f.stream_id: peer.arrived[(FrameType.OPEN_FAIL, f.stream_id)]
                     for f in fail}
            report(f"OPEN_FAIL over the limits ({len(ok)} accepted), from send",
                   [reply[sid] - sent[sid] for sid in reply])
            report("... from the OPEN's arrival at the tunnel (the round trip's second half)",
                   [reply[sid] - arrived[sid] for sid in reply])
            assert max(reply[sid] - sent[sid] for sid in reply) < 10.0  # not the 30 s timeout
        finally:
            await tunnel.close()
        assert not tunnel._tasks


async def test_open_rate_limit_with_a_frozen_clock() -> None:
    """With the default rate limit (64/s, burst 128) and a clock that does not move, 3,000
    OPENs get exactly 128 streams; one more second lets exactly 64 more in."""
    now = [1000.0]
    async with holding_target() as target, channel_pair() as (raw_channel, channel):
        tunnel = Tunnel(channel, name="expose", target=target.address, max_streams=1000,
                        clock=lambda: now[0])
        tunnel.start()
        peer = RawPeer(raw_channel)
        try:
            for sid in range(1, 3001):
                peer.send(frames.encode_open(sid, 256 * 1024))
            await peer.wait(lambda: len(peer.arrived) == 3000, timeout=60)
            await settle(lambda: target.accepted == 128)
            fail = peer.of(FrameType.OPEN_FAIL)
            assert len(peer.of(FrameType.OPEN_OK)) == 128 and len(fail) == 3000 - 128
            assert sorted(f.stream_id for f in peer.of(FrameType.OPEN_OK)) == list(range(1, 129))
            assert all(f.text.startswith("OPEN rate limit: at most 64 OPENs a second, 128 at "
                                         "once") for f in fail)
            assert tunnel.stats["opens_refused_rate"] == 3000 - 128

            now[0] += 1.0
            for sid in range(3001, 3101):
                peer.send(frames.encode_open(sid, 256 * 1024))
            await peer.wait(lambda: len(peer.arrived) == 3100)
            await settle(lambda: target.accepted == 128 + 64)
            late_ok = [f.stream_id for f in peer.of(FrameType.OPEN_OK) if f.stream_id > 3000]
            assert sorted(late_ok) == list(range(3001, 3065))
            await asyncio.sleep(0.2)
            assert target.accepted == 192
        finally:
            await tunnel.close()


async def test_stream_limit_end_to_end_clients_fail_fast() -> None:
    """Two real tunnels, max_streams=16 on the exposing side: 16 of 60 clients reach the
    target, the other 44 see their connection end at once; a freed slot is usable again."""
    async with holding_target() as target, \
            tunnel_pair(target.address, max_streams=16, open_rate=None) as pair:
        clients = []
        started = time.monotonic()
        for _ in range(60):
            clients.append(await asyncio.open_connection(*pair.address))

        ended: list[float] = []

        async def watch(reader: asyncio.StreamReader) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.read()
            ended.append(time.monotonic() - started)

        watchers = [asyncio.create_task(watch(r)) for r, _ in clients]
        try:
            await settle(lambda: len(ended) == 44 and target.accepted == 16)
            await asyncio.sleep(0.3)
            assert len(ended) == 44 and target.accepted == 16
            report("client connections refused by the stream limit", ended)
            assert max(ended) < 10.0
            assert pair.connect.stats["open_failures"] == 44
            assert pair.expose.stats["opens_refused_limit"] == 44
            # A freed slot is usable again.
            survivor = next(w for (r, w), t in zip(clients, watchers) if not t.done())
            survivor.close()
            await settle(lambda: len(target.live) == 15)
            await settle(lambda: pair.expose.stats["streams_open"] == 15)
            r, w = await asyncio.open_connection(*pair.address)
            await settle(lambda: target.accepted == 17)
            w.close()
        finally:
            for _, w in clients:
                w.close()
            for t in watchers:
                t.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)


# ---------------------------------------------------------------------------- malformed OPENs


MALFORMED_OPENS: list[tuple[str, bytes, str]] = [
    ("oversized target", HEADER.pack(1, BIG_ID + 1) + (65536).to_bytes(4, "big") + b"\x00"
     + b"h" * (MAX_TARGET + 1000), "OPEN target of 2024 bytes exceeds 1024"),
    ("target beyond the frame limit", HEADER.pack(1, BIG_ID + 2) + b"\x00" * frames.MAX_FRAME,
     "frame too large"),
    ("old-style target over 1 KiB", HEADER.pack(1, BIG_ID + 3) + (65536).to_bytes(4, "big")
     + b"h" * 1100, "OPEN target of 1099 bytes exceeds 1024"),
    ("short payload", HEADER.pack(1, BIG_ID + 4) + b"\x00\x01", "payload of 2 bytes"),
    ("unknown flags", HEADER.pack(1, BIG_ID + 5) + (65536).to_bytes(4, "big") + b"\x80",
     "unknown OPEN flags 0x80"),
    ("bad UTF-8 target", HEADER.pack(1, BIG_ID + 6) + (65536).to_bytes(4, "big") + b"\x00"
     + b"h\xc3(:80", "not valid UTF-8"),
    ("bad host:port", frames.encode_open(BIG_ID + 7, 65536, "no-port-here"),
     "malformed OPEN: bad target"),
    ("good host:port", frames.encode_open(BIG_ID + 8, 65536, "db.internal:5432"),
     "dynamic targets are not supported"),
    ("zero window", frames.encode_open(BIG_ID + 9, 0), "window of 0 bytes is out of range"),
    ("tiny window", frames.encode_open(BIG_ID + 10, MIN_WINDOW - 1), "out of range"),
    ("huge window", frames.encode_open(BIG_ID + 11, MAX_WINDOW + 1), "out of range"),
    ("stream id 0", frames.encode_open(0, 65536), "stream id 0 is reserved"),
]


async def test_malformed_opens_get_open_fail_at_once() -> None:
    """Every OPEN that cannot be served, malformed or not, is answered with OPEN_FAIL right
    away (not left to the opener's 30 s timeout); none dials the target, and the tunnel
    goes on carrying streams."""
    async with echo_server() as target, tunnel_pair(target) as pair:
        peer = RawPeer(pair.connect_channel)
        sent = {}
        for _, raw, _ in MALFORMED_OPENS:
            sid = HEADER.unpack_from(raw)[1]
            sent[sid] = peer.send(raw)
        await peer.wait(lambda: len(peer.of(FrameType.OPEN_FAIL)) == len(MALFORMED_OPENS),
                        timeout=10)
        replies = {f.stream_id: f.text for f in peer.of(FrameType.OPEN_FAIL)}
        for name, raw, expected in MALFORMED_OPENS:
            sid = HEADER.unpack_from(raw)[1]
            assert expected in replies[sid], (name, replies[sid])
        latencies = [peer.arrived[(FrameType.OPEN_FAIL, sid)] - t for sid, t in sent.items()]
        report("OPEN_FAIL for malformed OPENs", latencies)
        assert max(latencies) < 5.0
        stats = pair.expose.stats
        assert stats["streams_total"] == 0
        assert stats["opens_refused"] == len(MALFORMED_OPENS)
        assert stats["opens_refused_malformed"] == 7
        assert stats["windows_refused"] == 3
        assert not peer.of(FrameType.OPEN_OK) and not peer.of(FrameType.RESET)
        # The tunnel goes on.
        reader, writer = await asyncio.open_connection(*pair.address)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"
        writer.close()


async def test_an_oversized_open_is_refused_well_under_a_second() -> None:
    async with holding_target() as target, channel_pair() as (raw_channel, channel):
        tunnel = Tunnel(channel, name="expose", target=target.address)
        tunnel.start()
        peer = RawPeer(raw_channel)
        try:
            raw = (HEADER.pack(1, 7) + (256 * 1024).to_bytes(4, "big") + b"\x00"
                   + b"x" * 5000)
            start = peer.send(raw)
            await peer.wait(lambda: bool(peer.of(FrameType.OPEN_FAIL)), timeout=10)
            elapsed = peer.arrived[(FrameType.OPEN_FAIL, 7)] - start
            print(f"\noversized OPEN refused after {elapsed * 1000:.1f} ms")
            assert elapsed < 5.0
            assert "exceeds" in peer.of(FrameType.OPEN_FAIL)[0].text
            assert target.accepted == 0
        finally:
            await tunnel.close()


# ---------------------------------------------------------------------------- OPEN_OK windows


async def test_open_ok_with_a_bad_window_resets_the_stream_on_both_sides(
    tunnel_logs: pytest.LogCaptureFixture,
) -> None:
    """A peer answers OPEN with OPEN_OK and a window of 0 (once a stream stuck forever),
    1 byte, or 4 GiB: the stream is reset with the reason on both sides and the client's
    connection ends at once."""
    windows = [0, 1, MIN_WINDOW - 1, MAX_WINDOW + 1, 0xFFFFFFFF]
    async with channel_pair() as (channel, raw_channel):
        tunnel = Tunnel(channel, name="connect", target=None)
        tunnel.start()
        peer = RawPeer(raw_channel)
        server = await tunnel.listen("127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        try:
            for i, window in enumerate(windows, start=1):
                reader, writer = await asyncio.open_connection(*address)
                await peer.wait(lambda: len(peer.of(FrameType.OPEN)) == i)
                sid = peer.of(FrameType.OPEN)[-1].stream_id
                start = peer.send(frames.encode_open_ok(sid, window))
                await peer.wait(lambda: (FrameType.RESET, sid) in peer.arrived, timeout=10)
                reset = [f for f in peer.of(FrameType.RESET) if f.stream_id == sid][0]
                assert reset.text == ("protocol error: the peer's OPEN_OK announced a window "
                                      f"of {window} bytes is out of range "
                                      f"{MIN_WINDOW}..{MAX_WINDOW}")
                with contextlib.suppress(ConnectionError):
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                elapsed = time.monotonic() - start
                print(f"\nOPEN_OK window {window}: stream reset, client closed after "
                      f"{elapsed * 1000:.1f} ms")
                writer.close()
                assert f"tube connect stream {sid}: reset: {reset.text}" in tunnel_logs.text
            await settle(lambda: tunnel.stats["streams_open"] == 0)
            assert tunnel.stats["windows_refused"] == len(windows)
            assert tunnel.stats["open_failures"] == len(windows)
            assert not peer.of(FrameType.DATA)
        finally:
            await tunnel.close()


# ---------------------------------------------------------------------------- garbage


N_RANDOM = 5000


async def test_a_storm_of_random_frames_leaves_the_tunnel_bounded_and_working() -> None:
    """5,000 random frames (valid, malformed and plain garbage) from the peer: nothing
    escapes, the streams stay within max_streams, the channel within its bound, and a real
    stream still works afterwards."""
    import random

    rng = random.Random(1234)
    types = list(FrameType)

    def random_frame() -> bytes:
        roll = rng.random()
        sid = BIG_ID + rng.randrange(64)
        if roll < 0.3:  # plain garbage, sometimes with a valid header
            return rng.randbytes(rng.randrange(0, 40))
        ftype = rng.choice(types)
        if roll < 0.6:  # a known type with a random payload
            return HEADER.pack(ftype, sid) + rng.randbytes(rng.randrange(0, 12))
        frame = {
            FrameType.OPEN: lambda: frames.encode_open(sid, rng.choice([0, 5, 65536])),
            FrameType.OPEN_OK: lambda: frames.encode_open_ok(sid, rng.randrange(1 << 32)),
            FrameType.OPEN_FAIL: lambda: frames.encode_open_fail(sid, "nope"),
            FrameType.DATA: lambda: frames.encode_data(sid, rng.randbytes(rng.randrange(1, 3000))),
            FrameType.WINDOW: lambda: frames.encode_window(sid, rng.randrange(1, 1 << 32)),
            FrameType.FIN: lambda: frames.encode_fin(sid),
            FrameType.RESET: lambda: frames.encode_reset(sid, "bye"),
            FrameType.SETTINGS: lambda: frames.encode_settings(rng.randrange(1 << 32)),
        }[ftype]
        return frame()

    async with echo_server() as target, \
            tunnel_pair(target, max_streams=8, open_rate=None) as pair:
        expose = pair.expose
        peer = RawPeer(pair.connect_channel)  # sees the replies, next to the real tunnel
        peak = 0
        delivered = 0

        def watch(_: object) -> None:
            nonlocal peak, delivered
            peak = max(peak, len(expose.streams))
            delivered += 1

        pair.expose_channel.on("message", watch)
        # Paced in batches: a burst of thousands of messages overflows the loopback UDP
        # socket, and aiortc's SCTP then recovers only after long retransmission timeouts.
        for i in range(N_RANDOM):
            pair.connect_channel.send(random_frame())
            if i % 250 == 249:
                await settle(lambda: delivered == i + 1, timeout=30)
        # The peer ends whatever it opened, then a marker that is answered once all is read.
        for sid in range(BIG_ID, BIG_ID + 64):
            pair.connect_channel.send(frames.encode_reset(sid, "done"))
        marker = BIG_ID + 999
        pair.connect_channel.send(frames.encode_open(marker, 0))
        await peer.wait(lambda: (FrameType.OPEN_FAIL, marker) in peer.arrived, timeout=60)
        await settle(lambda: expose.stats["streams_open"] == 0)
        stats = expose.stats
        print(f"\nrandom frames: {stats['frames_malformed']} malformed, "
              f"{stats['opens_refused']} OPENs refused, {stats['streams_total']} streams, "
              f"{stats['control_dropped']} control frames dropped, "
              f"max buffered {stats['max_buffered']} bytes")
        assert stats["failure"] is None
        assert stats["frames_malformed"] > N_RANDOM // 4 and stats["streams_total"] > 0
        assert peak <= 8
        assert stats["max_buffered"] <= expose.bound
        # A real stream still works.
        reader, writer = await asyncio.open_connection(*pair.address)
        writer.write(b"after the storm")
        assert await asyncio.wait_for(reader.readexactly(15), 10) == b"after the storm"
        writer.close()
