"""ws_fastpath reads plain frames itself and must leave every connection exactly as
websockets' own parser would: the same messages in the same order, the same answers on the
wire (pongs, closes), the same state and the same error, for any byte stream cut anywhere.

Each case feeds one random stream of frames - plain, fragmented, control, oversized,
malformed - in random pieces to a FastServerConnection (or FastClientConnection) and to
websockets' ServerConnection (ClientConnection), both after their handshake, and compares.
The real relay and client run on these classes in every signaling test as well.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from tether.signaling.ws_fastpath import FastClientConnection, FastServerConnection

MAX_SIZE = 1000  # small, so that oversized frames are cheap to make


class Wire(asyncio.Transport):
    """Records what a connection writes and asks of its transport."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.calls: list[str] = []
        self.closed = False

    def write(self, data) -> None:
        self.out += data

    def write_eof(self) -> None:
        self.calls.append("eof")

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return default


def _open(kind: type[Connection], server: bool) -> tuple[Connection, Wire]:
    """A connection of ``kind`` past its handshake (state OPEN), on a recording wire."""
    if server:
        protocol = ServerProtocol(state=State.OPEN, max_size=MAX_SIZE)
        conn = kind.__new__(kind)
        Connection.__init__(conn, protocol, max_queue=4)
        conn.request = object()  # (the handshake is done: frames are all that comes)
    else:
        protocol = ClientProtocol(parse_uri("ws://x/"), state=State.OPEN, max_size=MAX_SIZE)
        conn = kind(protocol, max_queue=4)
        conn.response = object()
    wire = Wire()
    Connection.connection_made(conn, wire)
    return conn, wire


def _frames(data: bytes, masked: bool) -> list[tuple]:
    """The frames a connection wrote (a client masks each with a random key)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=masked)
        try:
            while True:
                next(parser)
        except StopIteration as done:
            frame = done.value
        frames.append((frame.opcode, bytes(frame.data), frame.fin))
    return frames


def _outcome(conn: Connection, wire: Wire, masked_out: bool) -> dict:
    protocol = conn.protocol
    return {
        "messages": [(f.opcode, bytes(f.data), f.fin) for f in conn.recv_messages.frames.queue],
        "written": _frames(bytes(wire.out), masked_out),
        # (the same calls; their order may differ: websockets answers a read's control
        # frames before it queues that read's messages, we queue the messages before a
        # control frame as we meet them)
        "calls": sorted(wire.calls),
        "state": protocol.state,
        "close_rcvd": protocol.close_rcvd,
        "close_sent": protocol.close_sent,
        "error": repr(protocol.parser_exc),
    }


def _raw(head1: int, payload: bytes, masked: bool, key: bytes = b"\x01\x02\x03\x04",
         long_form: bool = False) -> bytes:
    """One frame's bytes, header written by hand so that any bits can be set."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if long_form:
        header = bytes([head1, mask_bit | 127]) + struct.pack("!Q", length)
    elif length < 126:
        header = bytes([head1, mask_bit | length])
    elif length < 65536:
        header = bytes([head1, mask_bit | 126]) + struct.pack("!H", length)
    else:
        header = bytes([head1, mask_bit | 127]) + struct.pack("!Q", length)
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        header += key
    return header + payload


_payloads = st.binary(max_size=200) | st.sampled_from([b"x" * 130, b"y" * 700, b"z" * 1200])
_texts = st.text(max_size=60).map(str.encode) | st.just(b"\xff\xfe")  # (and invalid UTF-8)


@st.composite
def _frame_bytes(draw, masked: bool) -> bytes:
    kind = draw(st.sampled_from(
        ["text", "text", "text", "binary", "ping", "pong", "fragments", "close",
         "rsv", "opcode", "wrong_mask", "long_form", "control_too_long"]
    ))
    key = draw(st.binary(min_size=4, max_size=4))
    if kind == "text":
        return _raw(0x81, draw(_texts), masked, key)
    if kind == "binary":
        return _raw(0x82, draw(_payloads), masked, key)
    if kind == "ping":
        return _raw(0x89, draw(st.binary(max_size=125)), masked, key)
    if kind == "pong":
        return _raw(0x8A, draw(st.binary(max_size=125)), masked, key)
    if kind == "fragments":
        parts = draw(st.lists(st.binary(max_size=50), min_size=1, max_size=4))
        first = draw(st.sampled_from([0x01, 0x02]))
        out = b""
        for i, part in enumerate(parts):
            head1 = (first if i == 0 else 0x00) | (0x80 if i == len(parts) - 1 else 0)
            out += _raw(head1, part, masked, key)
        return out
    if kind == "close":
        code = draw(st.sampled_from([1000, 1001, 4000, 999]))
        return _raw(0x88, Close(code, "bye").serialize() if code != 999 else b"\x03",
                    masked, key)
    if kind == "rsv":
        return _raw(0x81 | draw(st.sampled_from([0x40, 0x20, 0x10])), b"hi", masked, key)
    if kind == "opcode":
        return _raw(0x80 | draw(st.sampled_from([3, 7, 11, 15])), b"hi", masked, key)
    if kind == "wrong_mask":
        return _raw(0x81, b"hi", not masked, key)
    if kind == "long_form":
        return _raw(0x81, draw(_texts), masked, key, long_form=True)
    return _raw(0x89, b"p" * 126, masked, key)  # control frames carry at most 125 bytes


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def _compare(server: bool, stream: bytes, points: list[int], eof: bool) -> None:
    async def run() -> None:
        fast_kind, plain_kind = ((FastServerConnection, ServerConnection) if server
                                 else (FastClientConnection, ClientConnection))
        outcomes = []
        for kind in (fast_kind, plain_kind):
            conn, wire = _open(kind, server)
            for piece in _cut(stream, points):
                if wire.closed:
                    break
                conn.data_received(piece)
            if eof and not wire.closed:
                conn.eof_received()
            outcomes.append(_outcome(conn, wire, masked_out=not server))
        fast, plain = outcomes
        assert fast == plain

    asyncio.run(run())


@pytest.mark.parametrize("server", [True, False], ids=["server side", "client side"])
@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(st.integers(min_value=0, max_value=10**6), max_size=12),
       st.booleans())
def test_matches_websockets(server, data, points, eof) -> None:
    """(A server reads masked frames from its client, a client unmasked ones.)"""
    frames = data.draw(st.lists(_frame_bytes(masked=server), max_size=8))
    _compare(server, b"".join(frames), points, eof)


def test_plain_frames_skip_websockets_parser() -> None:
    """The point of it: a burst of plain frames in one read is taken without websockets'
    parser, whose generator stays at the frame boundary; a ping in between goes to it
    and is answered, and the frames after it are read fast again."""
    async def run() -> None:
        conn, wire = _open(FastServerConnection, server=True)
        parser = conn.protocol.parser
        stream = b"".join(_raw(0x81, f"signal {i}".encode(), True) for i in range(50))
        stream += _raw(0x89, b"are you there", True)
        stream += b"".join(_raw(0x81, f"after {i}".encode(), True) for i in range(5))
        conn.data_received(stream[:-3])
        conn.data_received(stream[-3:])
        texts = [bytes(f.data).decode() for f in conn.recv_messages.frames.queue]
        assert texts == [f"signal {i}" for i in range(50)] + [f"after {i}" for i in range(5)]
        assert _frames(bytes(wire.out), masked=False) == [(Opcode.PONG, b"are you there", True)]
        assert conn.protocol.parser is parser and not conn.protocol.reader.buffer
        assert "pause" in wire.calls  # the assembler's flow control still applies

    asyncio.run(run())


def test_a_frame_a_byte_at_a_time_is_held_in_place() -> None:
    """A peer trickling a large frame byte by byte must not make us copy what we hold on
    every byte (quadratic work): the bytes are appended in place and the frame is looked
    at once, when it is whole."""
    async def run() -> None:
        conn, wire = _open(FastServerConnection, server=True)
        frame = _raw(0x81, b"t" * 900, True)
        header = 2 + 2 + 4  # (a 16-bit length and a mask)
        for i in range(header + 1):  # a header cut short is looked at again per byte
            conn.data_received(frame[i:i + 1])
        held = conn._held
        for i in range(header + 1, len(frame) - 1):
            conn.data_received(frame[i:i + 1])
            assert conn._held is held and len(held) == i + 1
        conn.data_received(frame[-1:])
        assert conn._held is None
        assert [bytes(f.data) for f in conn.recv_messages.frames.queue] == [b"t" * 900]

    asyncio.run(run())


def test_truncated_frame_at_eof_fails_as_websockets_does() -> None:
    async def run() -> None:
        outcomes = []
        for kind in (FastServerConnection, ServerConnection):
            conn, wire = _open(kind, server=True)
            conn.data_received(_raw(0x81, b"x" * 300, True)[:100])
            if kind is FastServerConnection:
                assert not conn.protocol.reader.buffer  # held here: websockets saw nothing
            conn.eof_received()
            assert "stream ends after 92 bytes" in repr(conn.protocol.parser_exc)
            outcomes.append(_outcome(conn, wire, masked_out=False))
        assert outcomes[0] == outcomes[1]

    asyncio.run(run())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=40) | st.sampled_from(["a" * 125, "b" * 126, "c" * 65535,
                                                        "d" * 65536, "é" * 63]),
                max_size=6))
def test_written_text_frames_are_websockets_frames(texts) -> None:
    """write_texts frames by hand what websockets' send_text frames: byte for byte, after
    what websockets had waiting (here a pong)."""
    async def run() -> None:
        conn, wire = _open(FastServerConnection, server=True)
        conn.protocol.send_pong(b"first")
        conn.write_texts(texts)
        expected = Frame(Opcode.PONG, b"first").serialize(mask=False) + b"".join(
            Frame(Opcode.TEXT, text.encode()).serialize(mask=False) for text in texts)
        assert bytes(wire.out) == expected

    asyncio.run(run())


async def test_recv_batch_over_a_real_connection() -> None:
    """Real sockets: messages written together come out of one recv_batch in order; a
    fragmented one is left for the next call, which assembles it; text that is not UTF-8
    fails the connection with 1007 as websockets does, after what came before it."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosedError

    batches: list[list] = []
    ended: list[BaseException] = []
    got = asyncio.Event()

    async def handler(ws: FastServerConnection) -> None:
        try:
            while True:
                batches.append(await ws.recv_batch())
                got.set()
        except ConnectionClosedError as exc:
            ended.append(exc)

    async with serve(handler, "127.0.0.1", 0, create_connection=FastServerConnection) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as client:
            client.transport.write(b"".join(_raw(0x81, f"m{i}".encode(), True) for i in range(5)))
            await asyncio.wait_for(got.wait(), 5)
            got.clear()
            client.transport.write(_raw(0x81, b"a", True) + _raw(0x01, b"frag", True)
                                   + _raw(0x80, b"ment", True) + _raw(0x82, b"\x00", True))
            while sum(map(len, batches)) < 8:
                await asyncio.wait_for(got.wait(), 5)
                got.clear()
            client.transport.write(_raw(0x81, b"ok", True) + _raw(0x81, b"\xff", True))
            await asyncio.wait_for(client.wait_closed(), 5)
            assert client.close_code == 1007
    flat = [message for batch in batches for message in batch]
    assert flat == [f"m{i}" for i in range(5)] + ["a", "fragment", b"\x00", "ok"]
    assert max(map(len, batches)) > 1  # (one write on loopback is normally one read)
    assert any(batch[0] == "fragment" for batch in batches)  # assembled by recv(), first
    assert len(ended) == 1 and ended[0].rcvd is None and ended[0].sent.code == 1007
