"""The resumable-stream carrier protocol, pure: frames, and the two byte counters.

A user's TCP connection becomes a *session*; its bytes travel over a *carrier*, an ordered
byte stream through the current tube that may end at any moment (the Rust core ends its
streams when its path dies). Each side numbers the bytes it sends from 0, keeps what the
peer has not acknowledged (:class:`SendBuffer`, bounded) and, on a new carrier, sends
again from the offset the peer reports in its hello (:class:`ReceiveState` counts what
was delivered). The user's EOF is one more unit after the last byte (TCP's FIN), so
"received" reports it too.

Frames: a 1-byte kind, a 4-byte payload length, the payload (all big-endian).

- HELLO  magic "TTRS", version, flags (bit 0: resume), 16-byte session id, received (u64),
         carrier number (u32: a later dial wins over a stale one that arrives late)
- DATA   offset (u64) + bytes (1..64 KiB)
- ACK    received (u64), cumulative (FIN counts as one)
- FIN    offset (u64): the sender's user half-closed after this many bytes
- RESET  reason (UTF-8, at most 512 bytes): the session is over, the user's connection too

No I/O here (tether.tunnel.resume does it), so every rule is testable without sockets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"TTRS"
VERSION = 1
HELLO, DATA, ACK, FIN, RESET = 1, 2, 3, 4, 5
FLAG_RESUME = 1
SESSION_ID_BYTES = 16  # 128 random bits
MAX_DATA = 64 * 1024
MAX_RESET = 512
HEADER = struct.Struct("!BI")
_HELLO = struct.Struct("!4sBB16sQI")
_U64 = struct.Struct("!Q")
_MAX_PAYLOAD = {HELLO: _HELLO.size, DATA: _U64.size + MAX_DATA, ACK: _U64.size,
                FIN: _U64.size, RESET: MAX_RESET}


class ProtocolError(ValueError):
    """The carrier broke the protocol (malformed frame or impossible offset)."""


@dataclass(frozen=True)
class Hello:
    session_id: bytes
    resume: bool
    received: int
    carrier: int = 0


@dataclass(frozen=True)
class Data:
    offset: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    received: int


@dataclass(frozen=True)
class Fin:
    offset: int


@dataclass(frozen=True)
class Reset:
    reason: str


Frame = Hello | Data | Ack | Fin | Reset


def encode(frame: Frame) -> bytes:
    """One frame on the wire."""
    if isinstance(frame, Data):
        if not 0 < len(frame.payload) <= MAX_DATA:
            raise ValueError(f"DATA carries 1..{MAX_DATA} bytes, not {len(frame.payload)}")
        body = _U64.pack(frame.offset) + frame.payload
        kind = DATA
    elif isinstance(frame, Ack):
        kind, body = ACK, _U64.pack(frame.received)
    elif isinstance(frame, Fin):
        kind, body = FIN, _U64.pack(frame.offset)
    elif isinstance(frame, Hello):
        if len(frame.session_id) != SESSION_ID_BYTES:
            raise ValueError("a session id is 16 bytes")
        kind = HELLO
        body = _HELLO.pack(MAGIC, VERSION, FLAG_RESUME if frame.resume else 0,
                           frame.session_id, frame.received, frame.carrier)
    elif isinstance(frame, Reset):
        kind, body = RESET, frame.reason.encode("utf-8", "replace")[:MAX_RESET]
    else:
        raise TypeError(f"not a frame: {frame!r}")
    return HEADER.pack(kind, len(body)) + body


def check_header(kind: int, length: int) -> None:
    """Raise ProtocolError for an unknown kind or a payload too long for it."""
    limit = _MAX_PAYLOAD.get(kind)
    if limit is None:
        raise ProtocolError(f"unknown frame kind {kind}")
    if length > limit:
        raise ProtocolError(f"frame kind {kind}: {length} bytes, at most {limit}")


def decode_body(kind: int, body: bytes) -> Frame:
    """The frame of this kind with this payload (its header already checked)."""
    check_header(kind, len(body))
    if kind == DATA:
        if len(body) <= _U64.size:
            raise ProtocolError("DATA without bytes")
        return Data(_U64.unpack_from(body)[0], bytes(body[_U64.size:]))
    if kind in (ACK, FIN):
        if len(body) != _U64.size:
            raise ProtocolError(f"frame kind {kind}: {len(body)} bytes, not 8")
        value = _U64.unpack(body)[0]
        return Ack(value) if kind == ACK else Fin(value)
    if kind == HELLO:
        if len(body) != _HELLO.size:
            raise ProtocolError(f"HELLO of {len(body)} bytes, not {_HELLO.size}")
        magic, version, flags, session_id, received, carrier = _HELLO.unpack(body)
        if magic != MAGIC:
            raise ProtocolError("not a tether resumable-stream carrier (bad magic)")
        if version != VERSION:
            raise ProtocolError(f"carrier protocol version {version}, this side speaks "
                                f"{VERSION}")
        if flags & ~FLAG_RESUME:
            raise ProtocolError(f"unknown HELLO flags {flags:#x}")
        return Hello(session_id, bool(flags & FLAG_RESUME), received, carrier)
    return Reset(body.decode("utf-8", "replace"))


class FrameDecoder:
    """Frames out of a byte stream fed in pieces; bounded (one frame at most buffered)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buf)
            check_header(kind, length)
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(decode_body(kind, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames


class SendBuffer:
    """Bytes sent but not yet acknowledged, from offset ``base``; at most ``limit``.

    ``fin`` is the offset of the user's EOF once it came; an ACK of ``fin + 1`` means the
    peer has it.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the send buffer needs room")
        self.limit = limit
        self.base = 0
        self.acked = 0
        self.fin: int | None = None
        self._buf = bytearray()

    @property
    def next(self) -> int:
        """The offset of the next byte the user gives."""
        return self.base + len(self._buf)

    @property
    def space(self) -> int:
        return self.limit - len(self._buf)

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def fin_acked(self) -> bool:
        return self.fin is not None and self.acked == self.fin + 1

    def push(self, data: bytes) -> int:
        """Keep ``data`` until acknowledged; its offset. Raises past the limit or the FIN."""
        if self.fin is not None:
            raise ValueError("the user already half-closed")
        if len(data) > self.space:
            raise ValueError(f"{len(data)} bytes do not fit ({self.space} free)")
        offset = self.next
        self._buf += data
        return offset

    def close(self) -> int:
        """The user's EOF; the FIN offset."""
        if self.fin is None:
            self.fin = self.next
        return self.fin

    def _top(self) -> int:
        return self.next + (1 if self.fin is not None else 0)

    def ack(self, received: int) -> None:
        """The peer has everything before ``received``; drop it. Going back is an error."""
        if not self.acked <= received <= self._top():
            raise ProtocolError(f"ACK {received} outside [{self.acked}, {self._top()}]")
        self.acked = received
        drop = min(received, self.next) - self.base
        if drop > 0:
            del self._buf[:drop]
            self.base += drop

    def resend(self, received: int) -> list[Frame]:
        """A new carrier: the peer reports ``received``; what to send it again, in order."""
        self.ack(received)
        frames: list[Frame] = []
        view = memoryview(self._buf)
        for start in range(0, len(view), MAX_DATA):
            frames.append(Data(self.base + start, bytes(view[start:start + MAX_DATA])))
        view.release()
        if self.fin is not None and not self.fin_acked:
            frames.append(Fin(self.fin))
        return frames


class ReceiveState:
    """What has been delivered to the user: ``offset`` bytes, then maybe the EOF."""

    def __init__(self) -> None:
        self.offset = 0
        self.eof = False

    @property
    def received(self) -> int:
        """What a HELLO or ACK reports (the EOF counts as one)."""
        return self.offset + (1 if self.eof else 0)

    def data(self, frame: Data) -> bytes:
        """The part of ``frame`` not delivered yet (a resent overlap is cut off)."""
        if self.eof:
            raise ProtocolError("DATA after FIN")
        if frame.offset > self.offset:
            raise ProtocolError(f"DATA at {frame.offset}, expected {self.offset}: a gap")
        skip = self.offset - frame.offset
        fresh = frame.payload[skip:]
        self.offset += len(fresh)
        return fresh

    def fin(self, frame: Fin) -> bool:
        """The peer's EOF; True if it is new (deliver it now)."""
        if frame.offset != self.offset:
            raise ProtocolError(f"FIN at {frame.offset}, but {self.offset} bytes came")
        if self.eof:
            return False
        self.eof = True
        return True
