"""The tunnel over real aiortc peers (one process, loopback) with real TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import sys
import time

import pytest

from tether.tunnel import MAX_FRAME, FrameType, Tunnel, frames
from tether.tunnel.frames import HEADER

from .tunnel_peers import (
    FakeChannel,
    channel_pair,
    echo_server,
    ipv6_available,
    refused_port,
    start_echo_server,
    tunnel_pair,
)

KiB = 1024
MiB = 1024 * 1024
# Control frames (OPEN, WINDOW, FIN, RESET) are never held back by the high-water mark;
# a handful may sit in the channel queue on top of DATA.
CONTROL_SLACK = 4 * KiB


@pytest.fixture(autouse=True)
def tunnel_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="tether.tunnel")
    return caplog


async def echo_through(address: tuple[str, int], payload: bytes, chunk: int = 64 * KiB) -> bytes:
    """Send ``payload`` (then EOF) while reading the echo; return everything read."""
    reader, writer = await asyncio.open_connection(*address)

    async def send() -> None:
        for i in range(0, len(payload), chunk):
            writer.write(payload[i:i + chunk])
            await writer.drain()
        writer.write_eof()

    async def receive() -> bytes:
        return await reader.read(-1)

    try:
        _, got = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return got


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def channel_bound(tunnel: Tunnel) -> int:
    return tunnel.high_water + MAX_FRAME + CONTROL_SLACK


# ---------------------------------------------------------------------------- basics


async def test_one_stream_echo() -> None:
    activity: list[float] = []
    async with echo_server() as target, tunnel_pair(target) as pair:
        pair.connect.on_activity = lambda: activity.append(time.monotonic())
        reader, writer = await asyncio.open_connection(*pair.address)
        writer.write(b"hello tether")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(12), 10) == b"hello tether"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: pair.connect.stats["streams_open"] == 0
                         and pair.expose.stats["streams_open"] == 0, what="streams to end")
        for tunnel in (pair.connect, pair.expose):
            stats = tunnel.stats
            assert stats["streams_total"] == 1
            assert stats["bytes_to_peer"] == 12 and stats["bytes_from_peer"] == 12
            assert stats["open_failures"] == 0 and stats["streams_reset"] == 0
        assert len(activity) == 1  # at most once a second


async def test_twenty_concurrent_streams_each_echo_one_mib() -> None:
    rng = random.Random(20)
    payloads = [rng.randbytes(MiB) for _ in range(20)]
    async with echo_server() as target, tunnel_pair(target) as pair:
        results = await asyncio.gather(*(echo_through(pair.address, p) for p in payloads))
        for i, (sent, got) in enumerate(zip(payloads, results)):
            assert len(got) == len(sent), f"stream {i}: {len(got)} of {len(sent)} bytes"
            assert got == sent, f"stream {i}: bytes differ"
        await wait_until(lambda: pair.connect.stats["streams_open"] == 0
                         and pair.expose.stats["streams_open"] == 0, what="streams to end")
        for tunnel in (pair.connect, pair.expose):
            stats = tunnel.stats
            assert stats["streams_total"] == 20
            assert stats["bytes_to_peer"] == stats["bytes_from_peer"] == 20 * MiB
            assert stats["max_buffered"] <= channel_bound(tunnel)
        assert not pair.connect._tasks and not pair.expose._tasks


# ---------------------------------------------------------------------------- flow control


async def test_paused_reader_blocks_the_writer_within_a_fixed_bound() -> None:
    """The target reads nothing for 2 s: the client's writes stop, nothing piles up in the
    tunnel beyond the window and the channel high-water mark, and no byte is lost."""
    total = 16 * MiB
    payload = random.Random(7).randbytes(total)
    received = bytearray()
    pause_over = asyncio.Event()

    async def slow_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2.0)
        pause_over.set()
        while data := await reader.read(256 * KiB):
            received.extend(data)
        writer.close()

    # Small kernel buffers on the target side, so the 2 s pause is felt quickly.
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KiB)
    lsock.bind(("127.0.0.1", 0))
    target_server = await asyncio.start_server(slow_target, sock=lsock)
    target = lsock.getsockname()[:2]
    window = 256 * KiB
    try:
        async with tunnel_pair(target, window=window) as pair:
            csock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            csock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * KiB)
            csock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(csock, pair.address)
            reader, writer = await asyncio.open_connection(sock=csock)
            # Keep the kernel from absorbing megabytes on the tunnel's own sockets too
            # (loopback autotuning goes up to 4 MiB / 32 MiB here): the test is about what
            # the tunnel holds, and about the writer being stopped.
            await wait_until(lambda: any(s.writer is not None
                                         for s in pair.expose.streams.values()),
                             what="the exposing side to dial")
            for tunnel, opt in ((pair.expose, socket.SO_SNDBUF), (pair.connect, socket.SO_RCVBUF)):
                for stream in tunnel.streams.values():
                    stream.writer.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, opt, 32 * KiB)
            written = 0

            async def write_all() -> None:
                nonlocal written
                for i in range(0, total, 64 * KiB):
                    writer.write(payload[i:i + 64 * KiB])
                    await writer.drain()
                    written += 64 * KiB
                writer.write_eof()

            writer_task = asyncio.create_task(write_all())
            samples: list[tuple[float, int, int]] = []
            sender_bound = window + 2 * channel_bound(pair.connect)
            start = time.monotonic()
            while True:
                await asyncio.sleep(0.05)
                if pause_over.is_set():
                    break
                up = [s for s in pair.connect.stream_stats()]
                down = [s for s in pair.expose.stream_stats()]
                assert len(up) == 1 and len(down) == 1
                outstanding = up[0]["outstanding"]
                queued = down[0]["queued"]
                buffered = pair.connect_channel.bufferedAmount + pair.expose_channel.bufferedAmount
                assert outstanding <= window
                assert queued <= window
                assert pair.connect_channel.bufferedAmount <= channel_bound(pair.connect)
                assert outstanding + buffered <= sender_bound
                samples.append((time.monotonic() - start, written, outstanding + buffered))

            # The writer was blocked: no progress over the second half of the pause.
            late = [w for t, w, _ in samples if t >= 1.0]
            assert late and late[0] == late[-1], f"writer kept going: {late[0]} -> {late[-1]}"
            assert written < total
            assert not writer_task.done()
            # ... and the window was actually used (the tunnel did not just stall early).
            assert max(b for _, _, b in samples) >= window // 2

            try:
                await asyncio.wait_for(writer_task, 60)
            finally:
                writer_task.cancel()
            await wait_until(lambda: len(received) >= total, 60, "all bytes at the target")
            assert bytes(received) == payload
            for tunnel in (pair.connect, pair.expose):
                assert tunnel.stats["max_buffered"] <= channel_bound(tunnel)
                for s in tunnel.stream_stats():
                    assert s["max_outstanding"] <= window and s["max_queued"] <= window
            writer.close()
    finally:
        target_server.close()
        await target_server.wait_closed()


# ---------------------------------------------------------------------------- half-close


async def test_half_close_in_both_directions() -> None:
    """Client shuts its write side and still gets the whole reply; the target shutting its
    write side first still gets everything the client sends afterwards."""
    payload = os.urandom(700 * KiB)
    got_at_target: list[bytes] = []

    async def target_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(5)
        if first == b"hash:":  # reply after the client's EOF
            data = await reader.read(-1)
            writer.write(hashlib.sha256(data).hexdigest().encode() + os.urandom(0) + data)
            await writer.drain()
        else:  # greet, close our side, then keep reading
            writer.write(b"bye from target")
            writer.write_eof()
            got_at_target.append(first + await reader.read(-1))
        writer.close()

    server = await asyncio.start_server(target_handler, "127.0.0.1", 0)
    try:
        async with tunnel_pair(server.sockets[0].getsockname()[:2]) as pair:
            # 1. The client half-closes first; the reply comes after its EOF.
            reader, writer = await asyncio.open_connection(*pair.address)
            writer.write(b"hash:" + payload)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(-1), 30)
            assert reply == hashlib.sha256(payload).hexdigest().encode() + payload
            writer.close()

            # 2. The target half-closes first; the client keeps sending.
            reader, writer = await asyncio.open_connection(*pair.address)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(-1), 10) == b"bye from target"
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            await wait_until(lambda: bool(got_at_target), 30, "the target to read to EOF")
            assert got_at_target[0] == b"hello" + payload
            writer.close()
            await wait_until(lambda: pair.expose.stats["streams_open"] == 0, what="stream end")
            assert pair.expose.stats["streams_reset"] == 0
            assert pair.connect.stats["streams_reset"] == 0
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------- failures


async def test_refused_target_ends_only_that_stream(tunnel_logs: pytest.LogCaptureFixture) -> None:
    """The target stops listening while a stream is carrying data: a new stream is refused,
    with the reason logged on both sides; the running stream is unaffected."""
    port = refused_port()
    async with contextlib.AsyncExitStack() as stack:
        target_server = await start_echo_server("127.0.0.1", port)
        pair = await stack.enter_async_context(tunnel_pair(("127.0.0.1", port)))

        good_reader, good_writer = await asyncio.open_connection(*pair.address)
        good_writer.write(b"first")
        assert await asyncio.wait_for(good_reader.readexactly(5), 10) == b"first"
        target_server.close()  # nothing listens on the port now; the open stream goes on
        await target_server.wait_closed()

        payload = os.urandom(2 * MiB)

        async def good_stream() -> bytes:
            async def send() -> None:
                for i in range(0, len(payload), 64 * KiB):
                    good_writer.write(payload[i:i + 64 * KiB])
                    await good_writer.drain()
                good_writer.write_eof()
            _, got = await asyncio.gather(send(), good_reader.read(-1))
            return got

        async def bad_stream() -> bytes:
            reader, writer = await asyncio.open_connection(*pair.address)
            writer.write(b"anyone there?")
            try:
                return await asyncio.wait_for(reader.read(-1), 10)
            finally:
                writer.close()

        good, bad = await asyncio.gather(good_stream(), bad_stream())
        assert bad == b""
        assert good == payload
        good_writer.close()

        reason = f"target 127.0.0.1:{port} refused the connection"
        messages = [r.getMessage() for r in tunnel_logs.records]
        assert f"tube t-expose stream 2: {reason}" in messages
        assert any(m.startswith("tube t-connect stream 2: the peer could not open the stream: "
                                + reason) for m in messages), messages
        assert pair.connect.stats["open_failures"] == 1
        assert pair.expose.stats["open_failures"] == 1
        assert pair.connect.stats["streams_reset"] == 0


async def test_refused_target_on_a_port_with_nothing_listening(
    tunnel_logs: pytest.LogCaptureFixture,
) -> None:
    port = refused_port()
    async with tunnel_pair(("127.0.0.1", port)) as pair:
        reader, writer = await asyncio.open_connection(*pair.address)
        assert await asyncio.wait_for(reader.read(-1), 10) == b""
        writer.close()
        text = tunnel_logs.text
        assert f"tube t-expose stream 1: target 127.0.0.1:{port} refused the connection" in text
        assert "tube t-connect stream 1: the peer could not open the stream" in text
        await wait_until(lambda: pair.connect.stats["streams_open"] == 0, what="stream end")


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs")
async def test_dial_timeout(tunnel_logs: pytest.LogCaptureFixture) -> None:
    """A target whose accept queue is full never answers the SYN: the dial times out."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue (never accepted)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(lsock.getsockname())
            fillers.append(s)
        await asyncio.sleep(0.1)
        target = lsock.getsockname()[:2]
        async with tunnel_pair(target, dial_timeout=0.5) as pair:
            reader, writer = await asyncio.open_connection(*pair.address)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(-1), 10) == b""
            assert time.monotonic() - started < 5
            writer.close()
            assert f"target 127.0.0.1:{target[1]} did not answer within 0.5 s" in tunnel_logs.text
    finally:
        for s in fillers:
            s.close()
        lsock.close()


@pytest.mark.skipif(not ipv6_available(), reason="::1 is not available")
async def test_ipv6_listen_and_target(tunnel_logs: pytest.LogCaptureFixture) -> None:
    payload = os.urandom(300 * KiB)
    async with echo_server("::1") as target, tunnel_pair(target, listen_host="::1") as pair:
        host, port = pair.address
        assert host == "::1"
        assert await echo_through((host, port), payload) == payload
        assert f"listening on [::1]:{port}" in tunnel_logs.text
        assert f"dialing [::1]:{target[1]}" in tunnel_logs.text


async def test_malformed_frames_reset_only_the_named_stream(
    tunnel_logs: pytest.LogCaptureFixture,
) -> None:
    async with echo_server() as target, tunnel_pair(target) as pair:
        # Two streams, both open and working.
        ra, wa = await asyncio.open_connection(*pair.address)
        rb, wb = await asyncio.open_connection(*pair.address)
        for r, w, tag in ((ra, wa, b"A"), (rb, wb, b"B")):
            w.write(tag * 10)
            assert await asyncio.wait_for(r.readexactly(10), 10) == tag * 10
        ids = sorted(s["id"] for s in pair.expose.stream_stats())
        sid_a, sid_b = ids
        # Garbage from the connecting side's channel, as a broken peer would send it.
        ch = pair.connect_channel
        ch.send(b"\x01\x02")                                   # too short: no stream named
        ch.send("a text message")                              # not binary
        ch.send(HEADER.pack(0x63, 999) + b"?")                 # unknown type, unknown stream
        ch.send(HEADER.pack(5, sid_b) + b"\x00")               # bad WINDOW: resets B only
        ch.send(HEADER.pack(1, sid_a) + b"\x00\x04\x00\x00")   # OPEN for an id in use
        # Stream B is reset on both sides; its client sees the connection end.
        with contextlib.suppress(ConnectionError):
            leftover = await asyncio.wait_for(rb.read(-1), 10)
            assert leftover == b""
        wb.close()
        # Stream A still carries data both ways.
        payload = os.urandom(MiB)

        async def send() -> None:
            wa.write(payload)
            await wa.drain()
            wa.write_eof()

        _, got = await asyncio.wait_for(asyncio.gather(send(), ra.read(-1)), 30)
        assert got == payload
        wa.close()
        # And a new stream works.
        assert await echo_through(pair.address, b"after the garbage") == b"after the garbage"
        assert pair.expose.stats["frames_malformed"] == 4
        text = tunnel_logs.text
        assert "tube t-expose: ignoring a malformed frame from the peer: frame too short" in text
        assert "ignoring a malformed frame from the peer: a text message" in text
        assert "unknown frame type 0x63" in text
        assert f"tube t-expose stream {sid_b}: malformed frame from the peer: WINDOW frame" in text
        assert f"tube t-expose stream {sid_a}: refusing the peer's OPEN: stream id {sid_a} " \
               "is already in use" in text
        assert f"tube t-connect stream {sid_b}: reset by the peer: malformed frame" in text


# ---------------------------------------------------------------------------- endings


async def test_close_leaves_no_task_and_closes_client_sockets() -> None:
    async with echo_server() as target, channel_pair() as (ca, cb):
        await asyncio.sleep(0.1)
        before = asyncio.all_tasks()
        connect = Tunnel(ca, name="c", target=None)
        expose = Tunnel(cb, name="e", target=target)
        connect.start()
        expose.start()
        server = await connect.listen("127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        clients = [await asyncio.open_connection(*address) for _ in range(3)]
        for i, (r, w) in enumerate(clients):
            w.write(b"x" * 1000)
            assert await asyncio.wait_for(r.readexactly(1000), 10) == b"x" * 1000
        # One more with data still flowing when close() comes.
        r4, w4 = await asyncio.open_connection(*address)
        w4.write(os.urandom(4 * MiB))
        clients.append((r4, w4))
        await asyncio.sleep(0.2)
        assert connect.stats["streams_open"] == 4
        assert any(t.get_name().startswith("tether-tunnel") for t in asyncio.all_tasks())

        await connect.close()
        await expose.close()
        await connect.close()  # idempotent

        for r, w in clients:
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(r.read(-1), 5)  # EOF or reset, not a hang
            w.close()
        await asyncio.sleep(0.1)
        new = {t for t in asyncio.all_tasks() - before if not t.done()}
        assert not [t for t in new if t.get_name().startswith("tether-tunnel")], new
        assert not [t for t in new if "tunnel" in repr(t.get_coro())], new
        assert connect.stats["streams_open"] == 0 and expose.stats["streams_open"] == 0
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)


async def test_channel_close_ends_every_stream_and_loop() -> None:
    async with echo_server() as target, tunnel_pair(target) as pair:
        address = pair.address
        clients = [await asyncio.open_connection(*address) for _ in range(3)]
        for r, w in clients:
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
        pair.connect_channel.close()
        for r, w in clients:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(-1), 10) == b""
            w.close()
        await wait_until(lambda: not pair.connect._tasks and not pair.expose._tasks,
                         what="tunnel tasks to end")
        assert pair.connect.stats["streams_open"] == 0
        assert pair.expose.stats["streams_open"] == 0
        assert pair.connect.closed and pair.expose.closed
        with pytest.raises(ConnectionRefusedError):  # the listener closed with the channel
            await asyncio.open_connection(*address)


# ---------------------------------------------------------------------------- protocol rules
# A stand-in channel makes the credit and high-water rules exact and deterministic: the
# test decides when frames arrive and how full the channel is.


async def test_sender_never_exceeds_its_credit() -> None:
    channel = FakeChannel()
    tunnel = Tunnel(channel, name="fake", target=None)  # type: ignore[arg-type]
    tunnel.start()
    try:
        server = await tunnel.listen("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"z" * 50_000)
        await writer.drain()
        await wait_until(lambda: channel.frames(FrameType.OPEN), what="OPEN")
        (open_frame,) = channel.frames(FrameType.OPEN)
        assert open_frame.value == tunnel.window
        sid = open_frame.stream_id
        channel.emit("message", frames.encode_open_ok(sid, 1024))  # the peer's window

        def data_sent() -> int:
            return sum(len(f.data) for f in channel.frames(FrameType.DATA))

        await wait_until(lambda: data_sent() == 1024, what="the first 1024 bytes")
        await asyncio.sleep(0.2)
        assert data_sent() == 1024  # out of credit: waits
        assert tunnel.stream_stats()[0]["outstanding"] == 1024
        channel.emit("message", frames.encode_window(sid, 600))
        await wait_until(lambda: data_sent() == 1624, what="600 more bytes")
        await asyncio.sleep(0.2)
        assert data_sent() == 1624
        # A WINDOW that grants more than was ever sent breaks the rules: reset.
        channel.emit("message", frames.encode_window(sid, 5000))
        await wait_until(lambda: channel.frames(FrameType.RESET), what="RESET")
        assert "exceeds the peer's window" in channel.frames(FrameType.RESET)[0].text
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
    finally:
        await tunnel.close()


async def test_data_waits_while_the_channel_is_above_its_high_water_mark() -> None:
    channel = FakeChannel()
    tunnel = Tunnel(channel, name="fake", target=None, high_water=100_000)  # type: ignore[arg-type]
    tunnel.start()
    assert channel.bufferedAmountLowThreshold == 25_000
    try:
        server = await tunnel.listen("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        await wait_until(lambda: channel.frames(FrameType.OPEN), what="OPEN")
        sid = channel.frames(FrameType.OPEN)[0].stream_id
        channel.bufferedAmount = 100_000  # full
        channel.emit("message", frames.encode_open_ok(sid, 1 << 20))
        writer.write(b"q" * 40_000)
        await writer.drain()
        await asyncio.sleep(0.3)
        assert not channel.frames(FrameType.DATA)  # held back
        assert tunnel.stats["buffered_waits"] >= 1
        channel.bufferedAmount = 20_000
        channel.emit("bufferedamountlow")
        await wait_until(lambda: sum(len(f.data) for f in channel.frames(FrameType.DATA))
                         == 40_000, what="the data to go")
        assert max(len(f.data) for f in channel.frames(FrameType.DATA)) <= 16 * KiB
        writer.close()
    finally:
        await tunnel.close()


async def test_receiver_resets_a_stream_that_overruns_its_window() -> None:
    async with echo_server() as target:
        channel = FakeChannel()
        tunnel = Tunnel(channel, name="fake", target=target, window=1024)  # type: ignore[arg-type]
        tunnel.start()
        try:
            channel.emit("message", frames.encode_open(1, 4096))
            await wait_until(lambda: channel.frames(FrameType.OPEN_OK), what="OPEN_OK")
            assert channel.frames(FrameType.OPEN_OK)[0].value == 1024
            channel.emit("message", frames.encode_data(1, b"a" * 1000))
            channel.emit("message", frames.encode_data(1, b"b" * 1000))  # 2000 > 1024
            (reset,) = channel.frames(FrameType.RESET)
            assert reset.stream_id == 1 and "flow control violation" in reset.text
            await wait_until(lambda: tunnel.stats["streams_open"] == 0, what="stream end")
            # DATA after FIN is a violation too.
            channel.emit("message", frames.encode_open(2, 4096))
            await wait_until(lambda: len(channel.frames(FrameType.OPEN_OK)) == 2, what="OPEN_OK")
            channel.emit("message", frames.encode_fin(2))
            channel.emit("message", frames.encode_data(2, b"late"))
            assert "DATA after FIN" in channel.frames(FrameType.RESET)[-1].text
        finally:
            await tunnel.close()
        assert not tunnel._tasks
