"""The tunnel's limits, exact and deterministic: pure rate limiters on a fake clock, and a
stand-in channel for the cases a real aiortc pair cannot produce on demand (a peer that
stopped reading, so our side's channel queue only grows). Targets are real TCP servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.tunnel import FrameType, LogThrottle, TokenBucket, Tunnel, frames
from tether.tunnel.frames import HEADER, MAX_FRAME, MIN_WINDOW
from tether.tunnel.tunnel import MAX_BAD_FRAMES_IN_A_ROW

from .test_tunnel_abuse import holding_target, settle
from .tunnel_peers import FakeChannel


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_frame(sid: int, window: int = 65536) -> bytes:
    return frames.encode_open(sid, window)


# ---------------------------------------------------------------------------- pure limiters


def test_token_bucket_burst_then_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(64, 128, clock)
    assert sum(bucket.take() for _ in range(1000)) == 128
    clock.now += 0.5
    assert sum(bucket.take() for _ in range(1000)) == 32
    clock.now += 1000.0  # saved-up tokens stop at the burst
    assert sum(bucket.take() for _ in range(1000)) == 128
    clock.now -= 50.0  # a clock stepping back refills nothing; time counts from there
    assert not bucket.take()
    clock.now += 1 / 64
    assert bucket.take() and not bucket.take()


@given(st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 50)),
                max_size=40),
       st.floats(0.1, 1000), st.integers(1, 500))
def test_token_bucket_never_gives_more_than_burst_plus_rate_times_time(
    steps: list[tuple[float, int]], rate: float, burst: int,
) -> None:
    clock = Clock(0.0)
    bucket = TokenBucket(rate, burst, clock)
    taken = 0
    for advance, attempts in steps:
        clock.now += advance
        taken += sum(bucket.take() for _ in range(attempts))
        assert taken <= burst + rate * clock.now + 1e-6
        assert 0 <= bucket.tokens <= burst


def test_token_bucket_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1, 0.5)


def test_log_throttle_counts_what_it_drops() -> None:
    clock = Clock()
    throttle = LogThrottle(per_second=1.0, burst=3, clock=clock)
    assert [throttle.admit() for _ in range(5)] == [0, 0, 0, None, None]
    clock.now += 1.0
    assert throttle.admit() == 2
    assert throttle.admit() is None
    assert throttle.suppressed_total == 3


def test_tunnel_rejects_bad_limits() -> None:
    channel = FakeChannel()
    for kwargs, message in [
        ({"window": 0}, "window of 0 bytes is out of range"),
        ({"window": MIN_WINDOW - 1}, "out of range"),
        ({"window": frames.MAX_WINDOW + 1}, "out of range"),
        ({"max_streams": 0}, "max_streams"),
        ({"open_rate": 0}, "open_rate"),
        ({"open_burst": 0}, "open_burst"),
        ({"control_limit": 100}, "control_limit"),
    ]:
        with pytest.raises(ValueError, match=message):
            Tunnel(channel, name="t", target=None, **kwargs)  # type: ignore[arg-type]
    tunnel = Tunnel(channel, target=None)  # type: ignore[arg-type]
    stats = tunnel.stats
    assert stats["max_streams"] == 256 and tunnel.open_rate == 64 and tunnel.open_burst == 128
    assert tunnel.bound == tunnel.high_water + MAX_FRAME + tunnel.control_limit


# ---------------------------------------------------------------------------- OPEN limits


async def test_stream_limit_refuses_at_once_and_frees_slots() -> None:
    async with holding_target() as target:
        channel = FakeChannel()
        tunnel = Tunnel(channel, name="e", target=target.address, max_streams=3,
                        open_rate=None)  # type: ignore[arg-type]
        tunnel.start()
        try:
            for sid in range(1, 11):
                channel.emit("message", open_frame(sid))
            # Refusals go out synchronously, before any dial.
            fails = channel.frames(FrameType.OPEN_FAIL)
            assert [f.stream_id for f in fails] == list(range(4, 11))
            assert fails[0].text == ("stream limit reached: 3 streams are open, at most 3 "
                                     "(max_streams)")
            await settle(lambda: len(channel.frames(FrameType.OPEN_OK)) == 3)
            await settle(lambda: len(target.live) == 3)
            assert target.accepted == 3
            # The peer ends stream 2: its slot is free again once it has ended.
            channel.emit("message", frames.encode_reset(2, "done"))
            await settle(lambda: len(tunnel.streams) == 2)
            channel.emit("message", open_frame(11))
            channel.emit("message", open_frame(12))
            await settle(lambda: target.accepted == 4)
            assert [f.stream_id for f in channel.frames(FrameType.OPEN_FAIL)][-1] == 12
            stats = tunnel.stats
            assert stats["opens_refused_limit"] == 8 and stats["opens_refused"] == 8
            assert stats["open_failures"] == 8 and stats["streams_total"] == 4
        finally:
            await tunnel.close()
        assert not tunnel._tasks


async def test_rate_limit_on_an_injected_clock_and_refusals_cost_no_token() -> None:
    clock = Clock()
    async with holding_target() as target:
        channel = FakeChannel()
        tunnel = Tunnel(channel, name="e", target=target.address, max_streams=2,
                        open_rate=2.0, open_burst=3, clock=clock)  # type: ignore[arg-type]
        tunnel.start()
        try:
            for sid in range(1, 6):  # 2 accepted, 3 refused by the stream limit (no token)
                channel.emit("message", open_frame(sid))
            assert tunnel.stats["opens_refused_limit"] == 3
            assert tunnel.stats["opens_refused_rate"] == 0
            await settle(lambda: target.accepted == 2)
            channel.emit("message", frames.encode_reset(1, "done"))
            await settle(lambda: len(tunnel.streams) == 1)
            channel.emit("message", open_frame(6))  # the burst's third token
            channel.emit("message", frames.encode_reset(2, "done"))
            await settle(lambda: len(tunnel.streams) == 1)
            channel.emit("message", open_frame(7))  # no token left: refused by rate
            (last,) = [f for f in channel.frames(FrameType.OPEN_FAIL) if f.stream_id == 7]
            assert last.text == ("OPEN rate limit: at most 2 OPENs a second, 3 at once "
                                 "(open_rate, open_burst)")
            clock.now += 0.5  # one token back
            channel.emit("message", open_frame(8))
            await settle(lambda: target.accepted == 4)
            assert sorted(s for s in tunnel.streams) == [6, 8]
            stats = tunnel.stats
            assert stats["opens_refused_rate"] == 1 and stats["opens_refused"] == 4
        finally:
            await tunnel.close()


async def test_refusal_logs_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether.tunnel")
    clock = Clock()
    channel = FakeChannel()
    tunnel = Tunnel(channel, name="e", target=("127.0.0.1", 9), clock=clock)  # type: ignore[arg-type]
    tunnel.start()
    try:
        for sid in range(1, 501):
            channel.emit("message", frames.encode_open(sid, 0))
        refusals = [r for r in caplog.records if "refusing the peer's OPEN" in r.getMessage()]
        assert len(refusals) == 20
        assert len(channel.frames(FrameType.OPEN_FAIL)) == 500  # every OPEN is answered
        clock.now += 1.0
        channel.emit("message", frames.encode_open(501, 0))
        last = [r for r in caplog.records if "refusing" in r.getMessage()][-1].getMessage()
        assert last.endswith("(480 similar messages suppressed)")
    finally:
        await tunnel.close()


# ---------------------------------------------------------------------------- control bound


async def test_a_peer_that_floods_opens_and_reads_nothing_gets_its_excess_dropped() -> None:
    """The peer sends 20,000 OPENs and reads nothing: OPEN_FAILs go out until the channel
    holds ``bound`` bytes, the rest are dropped and counted; nothing grows past the bound,
    and the tunnel lives on (refusals are optional). Once the peer reads, replies resume."""
    channel = FakeChannel(stalled=True)
    tunnel = Tunnel(channel, name="e", target=("127.0.0.1", 9), high_water=16 * 1024,
                    control_limit=8 * 1024)  # type: ignore[arg-type]
    tunnel.start()
    try:
        for sid in range(1, 20_001):
            channel.emit("message", frames.encode_open(sid, 1))  # tiny window: refused
        sent = len(channel.frames(FrameType.OPEN_FAIL))
        stats = tunnel.stats
        assert channel.max_buffered <= tunnel.bound
        assert tunnel.bound - channel.bufferedAmount < len(channel.sent[-1])  # really full
        assert sent + stats["control_dropped"] == 20_000
        fails = [raw for raw in channel.sent if raw[0] == FrameType.OPEN_FAIL]
        assert sent * min(map(len, fails)) <= tunnel.bound  # no more than the bound holds
        assert stats["failure"] is None and not tunnel.closed
        channel.drain()
        channel.emit("message", frames.encode_open(20_001, 1))
        assert channel.frames(FrameType.OPEN_FAIL)[-1].stream_id == 20_001
    finally:
        await tunnel.close()


async def test_a_frame_streams_need_that_does_not_fit_fails_the_tunnel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The channel is full of frames the peer has not read and a WINDOW grant (which the
    stream cannot do without) is due: the tunnel fails with the reason, tells its owner,
    ends its streams, stops listening and ignores the peer from then on."""
    failures: list[str] = []
    channel = FakeChannel(stalled=True)
    tunnel = Tunnel(channel, name="c", target=None, window=4096,
                    on_fail=failures.append)  # type: ignore[arg-type]
    tunnel.start()
    server = await tunnel.listen("127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    try:
        reader, writer = await asyncio.open_connection(*address)
        await settle(lambda: channel.frames(FrameType.OPEN))
        sid = channel.frames(FrameType.OPEN)[0].stream_id
        channel.emit("message", frames.encode_open_ok(sid, 65536))
        channel.bufferedAmount = tunnel.bound  # the peer has stopped reading
        channel.emit("message", frames.encode_data(sid, b"d" * 1024))  # a grant is due
        assert await asyncio.wait_for(reader.readexactly(1024), 5) == b"d" * 1024
        await settle(lambda: tunnel.failure is not None)
        assert tunnel.failure.startswith("the peer is not reading: ")
        assert "a WINDOW frame would pass the limit" in tunnel.failure
        assert failures == [tunnel.failure]
        assert tunnel.stats["failure"] == tunnel.failure and tunnel.closed
        assert "the tunnel fails: the peer is not reading" in caplog.text
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await settle(lambda: not tunnel.streams)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)
        channel.drain()
        channel.emit("message", frames.encode_open(99, 65536))  # ignored now
        assert not channel.frames(FrameType.OPEN_FAIL)
        assert failures == [tunnel.failure]  # told once
    finally:
        await tunnel.close()
    assert not tunnel._tasks


async def test_a_local_connection_is_refused_not_fatal_when_the_channel_is_full() -> None:
    channel = FakeChannel(stalled=True)
    tunnel = Tunnel(channel, name="c", target=None)  # type: ignore[arg-type]
    tunnel.start()
    server = await tunnel.listen("127.0.0.1", 0)
    try:
        channel.bufferedAmount = tunnel.bound
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        stats = tunnel.stats
        assert stats["control_dropped"] == 1 and stats["open_failures"] == 1
        assert stats["failure"] is None and not channel.sent  # nor SETTINGS: it goes with a frame
    finally:
        await tunnel.close()


# ---------------------------------------------------------------------------- bad frames


async def test_only_a_long_run_of_unparseable_messages_fails_the_tunnel() -> None:
    failures: list[str] = []
    channel = FakeChannel()
    tunnel = Tunnel(channel, name="e", target=("127.0.0.1", 9),
                    on_fail=failures.append)  # type: ignore[arg-type]
    tunnel.start()
    try:
        junk = [b"", b"\x01", "text", HEADER.pack(0x42, 1), b"\xff" * 30]
        for _ in range(3):  # runs just short of the limit, broken by one valid frame
            for i in range(MAX_BAD_FRAMES_IN_A_ROW - 1):
                channel.emit("message", junk[i % len(junk)])
            channel.emit("message", frames.encode_fin(12345))
        # Malformed frames of a known type do not count: the peer speaks the protocol.
        for i in range(200):
            channel.emit("message", HEADER.pack(FrameType.WINDOW, i) + b"\x00")
        assert tunnel.failure is None
        assert tunnel.stats["frames_malformed"] == 3 * (MAX_BAD_FRAMES_IN_A_ROW - 1) + 200
        for i in range(MAX_BAD_FRAMES_IN_A_ROW):
            channel.emit("message", junk[i % len(junk)])
        assert tunnel.failure.startswith(
            f"the peer does not speak the tunnel protocol: {MAX_BAD_FRAMES_IN_A_ROW} "
            "unparseable messages in a row (the last: ")
        assert failures == [tunnel.failure]
    finally:
        await tunnel.close()
