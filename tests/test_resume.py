"""Resumable streams (tether.tunnel.resume): real TCP sockets end to end.

user -> listener -> ResumeClient -> carrier via a cuttable relay (standing in for the Rust
core's tube) -> ResumeGateway -> target. The relay is cut mid-transfer, many times, while
a sequence-checked byte stream flows both ways; every byte must arrive once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.tunnel import resume_frames as rf
from tether.tunnel.resume import ResumeClient, ResumeGateway, Session, read_frame

PATTERN = random.Random(11).randbytes(65521) * 2  # a prime period: a shifted byte shows


def pattern(offset: int, size: int) -> bytes:
    out = bytearray()
    while size > 0:
        start = offset % 65521
        piece = PATTERN[start:start + min(size, 65521)]
        out += piece
        offset += len(piece)
        size -= len(piece)
    return bytes(out)


# -- pure protocol ----------------------------------------------------------------------

frames_st = st.one_of(
    st.builds(rf.Hello, st.binary(min_size=16, max_size=16), st.booleans(),
              st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.builds(rf.Data, st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=300)),
    st.builds(rf.Ack, st.integers(0, 2**64 - 1)),
    st.builds(rf.Fin, st.integers(0, 2**64 - 1)),
    st.builds(rf.Reset, st.text(max_size=40)),
)


@given(st.lists(frames_st, max_size=8), st.lists(st.integers(1, 50), max_size=20))
def test_frames_survive_any_split(frames: list[rf.Frame], cuts: list[int]) -> None:
    wire = b"".join(rf.encode(f) for f in frames)
    decoder = rf.FrameDecoder()
    got: list[rf.Frame] = []
    at = 0
    for cut in cuts:
        got += decoder.feed(wire[at:at + cut])
        at += cut
    got += decoder.feed(wire[at:])
    assert got == frames


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_malformed_carrier_bytes_are_a_protocol_error_never_a_crash(data: bytes) -> None:
    decoder = rf.FrameDecoder()
    try:
        decoder.feed(data)
    except rf.ProtocolError:
        pass


@given(st.integers(0, 255), st.binary(max_size=80))
def test_any_header_and_body_decodes_or_is_refused(kind: int, body: bytes) -> None:
    try:
        frame = rf.decode_body(kind, body)
    except rf.ProtocolError:
        return
    assert rf.encode(frame)[rf.HEADER.size:] == body or isinstance(frame, rf.Reset)


def test_hello_refuses_a_stranger() -> None:
    good = rf.encode(rf.Hello(b"x" * 16, False, 0))
    with pytest.raises(rf.ProtocolError, match="magic"):
        rf.FrameDecoder().feed(good[:5] + b"HTTP" + good[9:])
    with pytest.raises(rf.ProtocolError, match="version"):
        rf.FrameDecoder().feed(good[:9] + b"\x09" + good[10:])
    with pytest.raises(rf.ProtocolError, match="at most"):
        rf.FrameDecoder().feed(rf.HEADER.pack(rf.DATA, 10 << 20))
    with pytest.raises(rf.ProtocolError, match="unknown frame kind"):
        rf.FrameDecoder().feed(rf.HEADER.pack(77, 0))


def test_send_buffer_is_bounded_and_resends_from_the_peers_offset() -> None:
    buf = rf.SendBuffer(limit=100_000)
    assert buf.push(b"a" * 70_000) == 0
    with pytest.raises(ValueError, match="do not fit"):
        buf.push(b"b" * 40_000)
    assert buf.push(b"b" * 30_000) == 70_000 and buf.space == 0
    buf.ack(50_000)
    assert buf.base == 50_000 and buf.space == 50_000
    with pytest.raises(rf.ProtocolError):
        buf.ack(10)  # an ACK never goes back
    with pytest.raises(rf.ProtocolError):
        buf.ack(100_001)  # nor past what was sent
    fin = buf.close()
    frames = buf.resend(60_000)
    assert [type(f) for f in frames] == [rf.Data, rf.Fin]
    assert frames[0].offset == 60_000 and len(frames[0].payload) == 40_000
    assert frames[1] == rf.Fin(100_000) == rf.Fin(fin)
    buf.ack(100_001)
    assert buf.fin_acked and buf.resend(100_001) == []


def test_receive_state_cuts_resent_overlap_and_refuses_gaps() -> None:
    recv = rf.ReceiveState()
    assert recv.data(rf.Data(0, b"hello")) == b"hello"
    assert recv.data(rf.Data(3, b"lo world")) == b" world"  # resent overlap cut off
    with pytest.raises(rf.ProtocolError, match="gap"):
        recv.data(rf.Data(20, b"x"))
    with pytest.raises(rf.ProtocolError):
        recv.fin(rf.Fin(5))
    assert recv.fin(rf.Fin(11)) and recv.received == 12
    assert not recv.fin(rf.Fin(11))
    with pytest.raises(rf.ProtocolError, match="after FIN"):
        recv.data(rf.Data(11, b"x"))


# -- real sockets -----------------------------------------------------------------------


class Relay:
    """A TCP relay to ``upstream`` that can be cut: every connection through it ends at
    once (in-flight bytes lost), the way the Rust core ends a dead tube's streams."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.cuts = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.transport.abort()
                return
            pair = (writer, up_writer)
            self.conns.add(pair)
            try:
                await asyncio.gather(self._pipe(reader, up_writer),
                                     self._pipe(up_reader, writer))
            finally:
                self.conns.discard(pair)
                writer.transport.abort()
                up_writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self.tasks.discard(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()
        except (ConnectionError, OSError):
            dst.transport.abort()

    def cut(self, graceful: bool = False) -> int:
        """End every connection through the relay now; how many."""
        self.cuts += 1
        conns = list(self.conns)
        self.conns.clear()
        for a, b in conns:
            for w in (a, b):
                if graceful:
                    w.close()  # a clean EOF without any FIN frame: still a lost carrier
                else:
                    w.transport.abort()
        return len(conns)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


class Rig:
    """user listener -> ResumeClient -> Relay -> ResumeGateway -> target server."""

    def __init__(self, target_handler: Any, **options: Any) -> None:
        self.target_handler = target_handler
        self.options = options
        self.outcomes: list[str] = []

    async def _target(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.target_tasks.add(task)
        try:
            await self.target_handler(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # the rig is closing: quietly
        finally:
            self.target_tasks.discard(task)

    async def __aenter__(self) -> Rig:
        self.target_tasks: set[asyncio.Task[Any]] = set()
        self.target = await asyncio.start_server(self._target, "127.0.0.1", 0)
        self.gateway = ResumeGateway(self.target.sockets[0].getsockname()[:2],
                                     **self.options)
        await self.gateway.start()
        self.relay = Relay(self.gateway.address)
        await self.relay.start()

        relay_address = self.relay.address

        async def address() -> tuple[str, int]:
            return relay_address

        self.client = ResumeClient(address, **self.options)

        async def on_user(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.outcomes.append(await self.client.carry(reader, writer))

        self.listener = await asyncio.start_server(on_user, "127.0.0.1", 0)
        return self

    @property
    def listen(self) -> tuple[str, int]:
        return self.listener.sockets[0].getsockname()[:2]

    async def __aexit__(self, *exc: object) -> None:
        self.listener.close()
        await self.client.close()
        await self.relay.close()
        await self.gateway.close()
        self.target.close()
        for task in list(self.target_tasks):
            task.cancel()
        await asyncio.gather(*self.target_tasks, return_exceptions=True)
        await self.listener.wait_closed()
        await self.target.wait_closed()


async def send_pattern(writer: asyncio.StreamWriter, total: int, seed: int) -> None:
    sent = 0
    while sent < total:
        size = min(48_000, total - sent)
        writer.write(pattern(seed + sent, size))
        await writer.drain()
        sent += size


async def check_pattern(reader: asyncio.StreamReader, total: int, seed: int,
                        progress: Any = None) -> int:
    got = 0
    while True:
        data = await reader.read(65536)
        if not data:
            return got
        assert data == pattern(seed + got, len(data)), f"wrong bytes at offset {got}"
        got += len(data)
        assert got <= total, "more bytes than were sent"
        if progress is not None:
            progress(got)


TOTAL = 6 * 1024 * 1024
UP, DOWN = 0, 12345


async def pattern_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Checks what comes, sends its own stream, half-closes when done; then closes."""
    results = await asyncio.gather(check_pattern(reader, TOTAL, UP),
                                   _send_then_eof(writer, TOTAL, DOWN), return_exceptions=True)
    target_results.append(results[0])
    writer.close()


async def _send_then_eof(writer: asyncio.StreamWriter, total: int, seed: int) -> None:
    await send_pattern(writer, total, seed)
    writer.write_eof()


target_results: list[Any] = []


async def test_a_stream_survives_many_cut_carriers_both_ways_with_no_byte_lost() -> None:
    target_results.clear()
    async with Rig(pattern_target, limit=512 * 1024) as rig:
        reader, writer = await asyncio.open_connection(*rig.listen)

        async def user_up() -> None:
            await send_pattern(writer, TOTAL, UP)
            writer.write_eof()  # the user's half-close must reach the target as EOF

        cuts = effective = 0

        def cut_every(got: int) -> None:  # cut mid-transfer, by progress, not by time
            nonlocal cuts, effective
            if got // 200_000 > cuts:
                cuts += 1
                effective += rig.relay.cut(graceful=cuts % 2 == 0) > 0

        async with asyncio.timeout(90):
            up = asyncio.create_task(user_up())
            got = await check_pattern(reader, TOTAL, DOWN, cut_every)
            await up
            while not target_results:
                await asyncio.sleep(0.01)
        writer.close()
        assert got == TOTAL
        assert target_results == [TOTAL]
        async with asyncio.timeout(30):
            while not rig.outcomes or rig.gateway.sessions:
                await asyncio.sleep(0.01)
        print(f"relay cut {effective} carriers; client resumes {rig.client.resumes}, "
              f"gateway resumes {rig.gateway.resumes}")
        assert rig.outcomes == ["complete"]
        assert effective >= 10 and rig.client.resumes >= effective - 1
        assert rig.gateway.resumes >= effective - 1


async def echo_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await asyncio.sleep(0.05)
    writer.close()


async def test_half_close_propagates_and_the_other_direction_goes_on() -> None:
    async with Rig(echo_target) as rig:
        reader, writer = await asyncio.open_connection(*rig.listen)
        payload = secrets.token_bytes(300_000)
        writer.write(payload)
        writer.write_eof()  # half-close: the echo still comes back, then its EOF
        async with asyncio.timeout(30):
            assert await reader.read() == payload
            while not rig.outcomes:
                await asyncio.sleep(0.01)
        assert rig.outcomes == ["complete"]
        writer.close()


async def test_a_session_the_gateway_does_not_know_is_reset_and_the_user_closed() -> None:
    async with Rig(echo_target) as rig:
        # A raw carrier that asks to resume a session nobody has.
        r, w = await asyncio.open_connection(*rig.gateway.address)
        w.write(rf.encode(rf.Hello(secrets.token_bytes(16), True, 0)))
        async with asyncio.timeout(10):
            frame = await read_frame(r)
        assert isinstance(frame, rf.Reset) and "unknown session" in frame.reason
        w.close()
        # A live session whose gateway forgets it (a restarted peer): the user's
        # connection is closed once its carrier resumes.
        reader, writer = await asyncio.open_connection(*rig.listen)
        writer.write(b"ping")
        async with asyncio.timeout(20):
            assert await reader.readexactly(4) == b"ping"
        for session in list(rig.gateway.sessions.values()):
            rig.gateway.sessions.pop(session.id)
            await session.close()
        rig.relay.cut()
        async with asyncio.timeout(20):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
            while not rig.outcomes:
                await asyncio.sleep(0.01)
        assert "refused the session" in rig.outcomes[0]
        assert "unknown session" in rig.outcomes[0]
        writer.close()


async def test_garbage_on_a_carrier_is_refused_and_the_gateway_goes_on() -> None:
    async with Rig(echo_target) as rig:
        r, w = await asyncio.open_connection(*rig.gateway.address)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            rest = await r.read()
        assert rest == b"" or rf.FrameDecoder().feed(rest)[0].__class__ is rf.Reset
        w.close()
        reader, writer = await asyncio.open_connection(*rig.listen)
        writer.write(b"still works")
        async with asyncio.timeout(20):
            assert await reader.readexactly(11) == b"still works"
        writer.close()
        assert rig.gateway.refused


async def stalled_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)  # never reads: the tunnel must push back, not buffer


async def test_buffers_stay_bounded_when_the_target_does_not_read() -> None:
    limit = 256 * 1024
    async with Rig(stalled_target, limit=limit) as rig:
        reader, writer = await asyncio.open_connection(*rig.listen)
        block = b"x" * 65536
        highest = 0

        async def push() -> None:
            while True:
                writer.write(block)
                await writer.drain()

        pusher = asyncio.create_task(push())
        try:
            for _ in range(60):
                await asyncio.sleep(0.02)
                for s in [*rig.client.sessions.values(), *rig.gateway.sessions.values()]:
                    highest = max(highest, s.send.pending)
                    assert s.send.pending <= limit
        finally:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)
        assert not pusher.done() or pusher.cancelled()
        client_session = next(iter(rig.client.sessions.values()))
        assert client_session.send.pending > 0  # the buffer filled: reading stopped there
        writer.transport.abort()


async def test_a_session_without_a_carrier_for_too_long_ends() -> None:
    async with Rig(echo_target, detach_limit=0.5) as rig:
        reader, writer = await asyncio.open_connection(*rig.listen)
        writer.write(b"hi")
        async with asyncio.timeout(20):
            assert await reader.readexactly(2) == b"hi"
        assert rig.relay.server is not None
        rig.relay.server.close()  # no new carriers any more
        rig.relay.cut()
        async with asyncio.timeout(20):
            with contextlib.suppress(ConnectionError):
                await reader.read()
            while not rig.outcomes or rig.gateway.sessions:
                await asyncio.sleep(0.02)
        assert rig.outcomes[0].startswith("no carrier for 0.5 s")
        writer.close()


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=1, max_size=120))
def test_garbage_after_a_good_hello_ends_that_session_only(garbage: bytes) -> None:
    """Whatever follows a valid hello on a carrier: the gateway refuses or drops it, or
    delivers what is valid, and never fails; a fresh session works afterwards."""

    async def run() -> None:
        async with Rig(echo_target) as rig:
            r, w = await asyncio.open_connection(*rig.gateway.address)
            w.write(rf.encode(rf.Hello(secrets.token_bytes(16), False, 0, 1)) + garbage)
            async with asyncio.timeout(10):
                reply = await read_frame(r)
                assert isinstance(reply, rf.Hello)
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError,
                                         rf.ProtocolError, TimeoutError):
                    async with asyncio.timeout(0.2):
                        while await read_frame(r) is not None:
                            pass
            w.transport.abort()
            reader, writer = await asyncio.open_connection(*rig.listen)
            writer.write(b"fresh")
            async with asyncio.timeout(20):
                assert await reader.readexactly(5) == b"fresh"
            writer.close()

    asyncio.run(run())


async def test_a_session_whose_last_ack_was_lost_completes_on_the_resume_hello() -> None:
    """Both FINs crossed, the ACK of ours died with the carrier: the peer's resume hello
    (received = our FIN + 1) is the last thing missing, and must end the session."""
    server_side: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        server_side.append((r, w))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    user_r, user_w = await asyncio.open_connection(*address)
    carrier_r, carrier_w = await asyncio.open_connection(*address)
    try:
        async with asyncio.timeout(10):
            while len(server_side) < 2:
                await asyncio.sleep(0.01)
        session = Session(b"s" * 16, *server_side[0])
        session.start()
        user_w.write(b"abc")
        user_w.write_eof()
        async with asyncio.timeout(10):
            while session.send.fin is None:
                await asyncio.sleep(0.01)
        assert session.recv.fin(rf.Fin(0))  # the peer's EOF came on the lost carrier
        await session.attach(*server_side[1], peer_received=4, hello=False)
        assert session.ended.is_set() and session.outcome == "complete"
        await session.close()
        assert await user_r.read() == b""  # its user sees the end, not a reset
    finally:
        for w in (user_w, carrier_w, *[w for _, w in server_side]):
            w.close()
        server.close()
        await server.wait_closed()
