"""Property tests: the frame decoder and the tunnel's dispatch under arbitrary input.

The decoder raises nothing but FrameError for any input, and what it returns is bounded
and re-encodes to itself. The tunnel, fed arbitrary message sequences by a peer that never
reads (the stand-in channel keeps every byte sent), never raises, never holds more streams
than max_streams, never lets its channel queue pass :attr:`Tunnel.bound`, and closes
leaving no task; real TCP connections are made to a real target for the OPENs it accepts.
"""

from __future__ import annotations

import asyncio
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.tunnel import FrameType, Tunnel, frames
from tether.tunnel.frames import (
    HEADER,
    HEADER_SIZE,
    MAX_DATA,
    MAX_DATA_LARGE,
    MAX_FRAME,
    MAX_REASON,
    MAX_TARGET,
    Frame,
    FrameError,
)

from tether.tunnel.tunnel import MAX_BAD_FRAMES_IN_A_ROW

from .test_tunnel_abuse import holding_target
from .tunnel_peers import FakeChannel

u32 = st.integers(0, 0xFFFFFFFF)
small_ids = st.integers(0, 4)  # few ids, so frames meet the streams they name
type_bytes = st.one_of(st.sampled_from([t.value for t in FrameType]), st.integers(0, 255))


def structured(ids: st.SearchStrategy[int] = u32) -> st.SearchStrategy[bytes]:
    """A header (mostly a known type) and a payload shaped like, or close to, a real one."""
    payload = st.one_of(
        st.binary(max_size=12),
        u32.map(lambda v: struct.pack(">I", v)),
        st.tuples(u32, st.integers(0, 255), st.binary(max_size=40)).map(
            lambda t: struct.pack(">IB", t[0], t[1]) + t[2]),
        st.tuples(u32, st.text(max_size=30)).map(
            lambda t: struct.pack(">I", t[0]) + b"\x00" + t[1].encode()),
        st.integers(MAX_DATA - 2, MAX_DATA + 2).map(lambda n: b"x" * n),
        st.integers(MAX_DATA_LARGE - 2, MAX_DATA_LARGE + 2).map(lambda n: b"x" * n),
        st.integers(MAX_TARGET, MAX_TARGET + 8).map(lambda n: b"\x00" * 5 + b"t" * n),
    )
    return st.tuples(type_bytes, ids, payload).map(lambda t: HEADER.pack(t[0], t[1]) + t[2])


def valid(ids: st.SearchStrategy[int] = u32) -> st.SearchStrategy[bytes]:
    window = st.one_of(st.integers(1024, 1 << 20), u32)
    return st.one_of(
        st.tuples(ids, window).map(lambda t: frames.encode_open(*t)),
        st.tuples(ids, window).map(lambda t: frames.encode_open_ok(*t)),
        st.tuples(ids, st.text(max_size=20)).map(lambda t: frames.encode_open_fail(*t)),
        st.tuples(ids, st.binary(min_size=1, max_size=3000)).map(
            lambda t: frames.encode_data(*t)),
        st.tuples(ids, st.integers(1, 0xFFFFFFFF)).map(lambda t: frames.encode_window(*t)),
        ids.map(frames.encode_fin),
        st.tuples(ids, st.text(max_size=20)).map(lambda t: frames.encode_reset(*t)),
        u32.map(frames.encode_settings),
    )


messages = st.one_of(st.binary(max_size=64), structured(), valid())


# ---------------------------------------------------------------------------- the decoder


def check_decode(raw: bytes | bytearray | memoryview) -> Frame | None:
    try:
        frame = frames.decode(raw)
    except FrameError as exc:
        flat = bytes(raw)  # a view's bytes, whatever its shape
        if len(flat) < HEADER_SIZE:
            assert exc.stream_id is None and exc.frame_type is None
        else:
            type_byte, sid = HEADER.unpack_from(flat)
            assert exc.stream_id == sid
            known = type_byte in {t.value for t in FrameType}
            assert exc.frame_type == (FrameType(type_byte) if known else None)
        return None
    assert 0 <= frame.stream_id <= 0xFFFFFFFF
    assert len(frame.data) <= MAX_DATA_LARGE
    assert len(frame.text) <= max(MAX_REASON, MAX_TARGET)
    assert 0 <= frame.value <= 0xFFFFFFFF
    assert len(bytes(raw)) <= MAX_FRAME
    return frame


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=MAX_FRAME + 16), structured(), valid()))
def test_decode_raises_only_frame_error_and_round_trips(raw: bytes) -> None:
    frame = check_decode(raw)
    for view in (bytearray(raw), memoryview(raw)):
        assert check_decode(view) == frame
    if frame is None:
        return
    again = frames.decode(frames.encode(frame))
    if frame.type in (FrameType.OPEN_FAIL, FrameType.RESET):
        # Invalid UTF-8 in a reason becomes U+FFFD (3 bytes), so a re-encoded reason may
        # be cut back to MAX_REASON bytes: only ever shorter.
        assert again.type is frame.type and again.stream_id == frame.stream_id
        assert frame.text.startswith(again.text)
    else:
        assert again == frame


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers(0, 255))))
def test_decode_of_a_non_binary_message_is_a_frame_error(message: object) -> None:
    try:
        frames.decode(message)  # type: ignore[arg-type]
    except FrameError as exc:
        assert exc.stream_id is None and "binary" in str(exc)
    else:
        raise AssertionError("decoded a non-binary message")


@given(st.one_of(structured(), valid()))
def test_decode_of_odd_memoryviews(raw: bytes) -> None:
    """Views with wide items, two dimensions or none decode as the bytes behind them."""
    expected = check_decode(raw)
    padded = raw + b"\x00" * (-len(raw) % 4)
    if padded == raw:
        assert check_decode(memoryview(raw).cast("I")) == expected
        if raw:
            assert check_decode(memoryview(raw).cast("B", (1, len(raw)))) == expected
    scalar = memoryview(b"\x07").cast("B", ())
    assert check_decode(scalar) is None
    released = memoryview(raw)
    released.release()
    try:
        frames.decode(released)
    except FrameError as exc:
        assert "unusable" in str(exc)
    else:
        raise AssertionError("decoded a released view")


# ---------------------------------------------------------------------------- the dispatch

ALLOWED_FAILURES = ("the peer does not speak the tunnel protocol", "the peer is not reading")


async def dispatch_all(sequence: list[bytes | str], target: tuple[str, int],
                       unread: int) -> Tunnel:
    """Feed ``sequence`` to a tunnel whose peer reads nothing and has ``unread`` bytes of
    earlier frames waiting in the channel; check the bounds after every message."""
    channel = FakeChannel(stalled=True)
    tunnel = Tunnel(channel, name="fuzz", target=target, window=4096, high_water=4096,
                    control_limit=2048, max_streams=3, open_rate=None)  # type: ignore[arg-type]
    channel.bufferedAmount = min(unread, tunnel.bound)
    tunnel.start()
    try:
        for message in sequence:
            tunnel._dispatch(message)  # raises nothing, whatever the message
            assert len(tunnel.streams) <= 3
            assert channel.bufferedAmount <= tunnel.bound
            await asyncio.sleep(0)  # let dials, OPEN_OKs and uplinks run in between
        await asyncio.sleep(0.01)
        assert channel.max_buffered <= tunnel.bound
        failure = tunnel.failure
        assert failure is None or failure.startswith(ALLOWED_FAILURES), failure
        for raw in channel.sent:
            frames.decode(raw)  # everything we sent is a valid frame
    finally:
        await tunnel.close()
    assert not tunnel._tasks and not tunnel.streams
    return tunnel


async def run_dispatch(sequence: list[bytes | str], unread: int = 0) -> Tunnel:
    async with holding_target(echo=True) as target:
        return await dispatch_all(sequence, target.address, unread)


# Mostly frames of the protocol for a few stream ids (so OPENs are accepted, DATA echoes
# back, WINDOWs and RESETs hit live streams), mixed with malformed frames and garbage.
protocolish = st.one_of(
    valid(small_ids), valid(small_ids), valid(small_ids), valid(small_ids),
    structured(small_ids), messages, st.text(max_size=8),
)


# Bytes the peer left unread before the sequence: often none, often around the bound
# (4096 + 61445 + 2048 = 67589), where frames start being dropped or the tunnel fails.
unread_bytes = st.one_of(st.just(0), st.integers(0, 100_000), st.integers(63_000, 68_000))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(protocolish, min_size=10, max_size=200), unread_bytes)
def test_dispatch_of_arbitrary_messages_stays_bounded(
    sequence: list[bytes | str], unread: int,
) -> None:
    asyncio.run(run_dispatch(sequence, unread))


unparseable = st.one_of(
    st.binary(max_size=4),
    st.text(max_size=3),
    st.tuples(st.integers(0, 255).filter(lambda b: b not in {t.value for t in FrameType}),
              u32, st.binary(max_size=8)).map(
        lambda t: HEADER.pack(t[0], t[1]) + t[2]),  # a type this side does not know
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(unparseable, min_size=40, max_size=100))
def test_unparseable_messages_fail_the_tunnel_only_after_a_long_run(
    sequence: list[bytes | str],
) -> None:
    tunnel = asyncio.run(run_dispatch(sequence))
    if len(sequence) >= MAX_BAD_FRAMES_IN_A_ROW:
        assert tunnel.failure is not None
        assert tunnel.failure.startswith("the peer does not speak the tunnel protocol")
        assert tunnel.stats["frames_malformed"] == MAX_BAD_FRAMES_IN_A_ROW  # then ignored
    else:
        assert tunnel.failure is None
        assert tunnel.stats["frames_malformed"] == len(sequence)
