"""The tunnel's frame format: pure encoding and decoding, no I/O.

One frame travels as one binary data-channel message. Every frame starts with a 5-byte
header, then a payload whose layout depends on the type::

    0      1              5
    +------+--------------+------------------------------------+
    | type | stream id    | payload                            |
    | u8   | u32, big end |                                    |
    +------+--------------+------------------------------------+

    type        payload
    OPEN     1  window u32 (the opener's receive window), then optionally flags u8 and
                a UTF-8 target "host:port" or "[ipv6]:port" (at most MAX_TARGET bytes).
                No flag is defined yet. Without a target (9 bytes) the acceptor dials
                its fixed target; with one, it dials that target if its dial policy
                (``--allow``) permits. An OPEN with an unknown flag is malformed, so a
                future feature fails loudly at an older peer instead of being misread.
    OPEN_OK  2  window u32 (the acceptor's receive window)
    OPEN_FAIL 3 UTF-8 reason; it may end with a code in brackets, " [refused]", that
                says why in a form the opener can map (see tether.tunnel.reasons)
    DATA     4  1 .. MAX_DATA bytes of the stream, or up to the larger size the peer
                announced in its SETTINGS (at most MAX_DATA_LARGE)
    WINDOW   5  credit increment u32, > 0
    FIN      6  empty: the sender's direction of the stream has ended (TCP half-close)
    RESET    7  UTF-8 reason: the stream is gone in both directions
    SETTINGS 8  stream id 0; zero or more (id u16, value u32) pairs, at most
                MAX_SETTINGS: what the sender accepts. Sent once by each side, just
                before its first frame; ids a side does not know are ignored. Defined:
                1 (SETTING_MAX_DATA), the largest DATA payload the sender of SETTINGS
                accepts (values below MAX_DATA mean MAX_DATA: every peer accepts that).

Stream id 0 is never used for a stream; SETTINGS, which is about the whole tunnel, uses it.
An older peer that does not know SETTINGS logs it once as an unknown frame type and
ignores it, and never sends one, so the two keep to MAX_DATA: the larger DATA frames are
only sent to a peer that asked for them. Why larger frames at all: every DATA frame
costs a message's work at both ends (a flush, a reassembly, a dispatch, a TCP write);
with 60 KiB frames the CLI tunnel moved about 1.1x as fast as with 16 KiB ones, at 7-13 %
less CPU per MB (docs/datapath.md, eighth round).

Reasons are at most MAX_REASON bytes (longer ones
are cut when encoding); invalid UTF-8 in a reason is replaced, not rejected, since reasons
are only ever logged. An OPEN target must be valid UTF-8: it would name a host.

Windows (OPEN, OPEN_OK) travel as u32 but a tunnel accepts only MIN_WINDOW..MAX_WINDOW
(:func:`window_problem`): a zero window would stall a stream forever, a tiny one turns
every byte into frames, and one beyond MAX_WINDOW is not a window any peer of ours sends.

:func:`decode` raises only :class:`FrameError` (a ValueError), for any input.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size  # 5
U32 = struct.Struct(">I")
MAX_U32 = 0xFFFFFFFF
MAX_STREAM_ID = MAX_U32

#: Smallest and largest receive window a tunnel announces or accepts from its peer.
MIN_WINDOW = 1024
MAX_WINDOW = 1 << 30

#: The DATA payload every peer accepts (the protocol's base; the larger size needs SETTINGS).
MAX_DATA = 16 * 1024
#: The largest DATA payload this side accepts and announces: one SCTP message within
#: aiortc's 64 KiB maximum message size, still small enough (3 ms at 20 MB/s) for streams
#: to interleave fairly on one channel.
MAX_DATA_LARGE = 60 * 1024
#: SETTINGS ids, and how many pairs a SETTINGS frame may carry.
SETTING_MAX_DATA = 1
MAX_SETTINGS = 16
#: Largest reason carried by OPEN_FAIL / RESET.
MAX_REASON = 1024
#: Largest OPEN target.
MAX_TARGET = 1024
#: OPEN flags this side understands (none yet); any other bit makes the OPEN malformed.
KNOWN_OPEN_FLAGS = 0x00
#: Largest frame of any type.
MAX_FRAME = HEADER_SIZE + MAX_DATA_LARGE


class FrameType(enum.IntEnum):
    OPEN = 1
    OPEN_OK = 2
    OPEN_FAIL = 3
    DATA = 4
    WINDOW = 5
    FIN = 6
    RESET = 7
    SETTINGS = 8


class FrameError(ValueError):
    """A message from the peer is not a valid frame.

    ``stream_id`` names the stream the frame was for when the header could be read (so
    the caller can reset just that stream, or refuse just that OPEN), else None;
    ``frame_type`` is the frame's type when it is a known one, else None.
    """

    def __init__(self, message: str, stream_id: int | None = None,
                 frame_type: FrameType | None = None) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.frame_type = frame_type


def window_problem(window: int) -> str | None:
    """Why ``window`` is not acceptable as a stream's receive window, or None if it is."""
    if MIN_WINDOW <= window <= MAX_WINDOW:
        return None
    return f"a window of {window} bytes is out of range {MIN_WINDOW}..{MAX_WINDOW}"


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame. Only the fields of its type are meaningful."""

    type: FrameType
    stream_id: int
    data: bytes = b""  # DATA
    value: int = 0  # OPEN / OPEN_OK window, WINDOW increment, SETTINGS max DATA (0: none)
    text: str = ""  # OPEN_FAIL / RESET reason, OPEN target


# ---------------------------------------------------------------------------- encoding

_pack_header = HEADER.pack
_DATA = FrameType.DATA.value


def _check_id(stream_id: int) -> None:
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range 0..{MAX_STREAM_ID}")


def _check_u32(name: str, value: int, minimum: int = 0) -> None:
    if not minimum <= value <= MAX_U32:
        raise ValueError(f"{name} {value} out of range {minimum}..{MAX_U32}")


def _text(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_REASON:
        raw = raw[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return raw


def encode_open(stream_id: int, window: int, target: str = "") -> bytes:
    """An OPEN; 9 bytes without a target, else window, flags 0 and the target."""
    _check_id(stream_id)
    _check_u32("window", window)
    head = _pack_header(FrameType.OPEN, stream_id) + U32.pack(window)
    if not target:
        return head
    raw = target.encode("utf-8")
    if len(raw) > MAX_TARGET:
        raise ValueError(f"OPEN target of {len(raw)} bytes exceeds {MAX_TARGET}")
    return head + b"\x00" + raw


def encode_open_ok(stream_id: int, window: int) -> bytes:
    _check_id(stream_id)
    _check_u32("window", window)
    return _pack_header(FrameType.OPEN_OK, stream_id) + U32.pack(window)


def encode_open_fail(stream_id: int, reason: str) -> bytes:
    _check_id(stream_id)
    return _pack_header(FrameType.OPEN_FAIL, stream_id) + _text(reason)


def encode_data(stream_id: int, data: bytes) -> bytes:
    """A DATA frame; ``data`` must be 1..MAX_DATA_LARGE bytes (the hot path: few checks;
    more than MAX_DATA only to a peer whose SETTINGS allow it)."""
    n = len(data)
    if not 0 < n <= MAX_DATA_LARGE:
        raise ValueError(f"DATA payload of {n} bytes: must be 1..{MAX_DATA_LARGE}")
    return _pack_header(_DATA, stream_id) + data


def encode_window(stream_id: int, increment: int) -> bytes:
    _check_id(stream_id)
    _check_u32("window increment", increment, minimum=1)
    return _pack_header(FrameType.WINDOW, stream_id) + U32.pack(increment)


def encode_fin(stream_id: int) -> bytes:
    _check_id(stream_id)
    return _pack_header(FrameType.FIN, stream_id)


def encode_reset(stream_id: int, reason: str) -> bytes:
    _check_id(stream_id)
    return _pack_header(FrameType.RESET, stream_id) + _text(reason)


def encode_settings(max_data: int) -> bytes:
    """A SETTINGS frame announcing the largest DATA payload this side accepts."""
    _check_u32("max data", max_data)
    return _pack_header(FrameType.SETTINGS, 0) + _SETTING.pack(SETTING_MAX_DATA, max_data)


def encode(frame: Frame) -> bytes:
    """Encode a :class:`Frame` (the inverse of :func:`decode`)."""
    t, sid = frame.type, frame.stream_id
    if t is FrameType.OPEN:
        return encode_open(sid, frame.value, frame.text)
    if t is FrameType.OPEN_OK:
        return encode_open_ok(sid, frame.value)
    if t is FrameType.OPEN_FAIL:
        return encode_open_fail(sid, frame.text)
    if t is FrameType.DATA:
        return encode_data(sid, frame.data)
    if t is FrameType.WINDOW:
        return encode_window(sid, frame.value)
    if t is FrameType.FIN:
        return encode_fin(sid)
    if t is FrameType.RESET:
        return encode_reset(sid, frame.text)
    if t is FrameType.SETTINGS:
        if sid != 0:
            raise ValueError(f"SETTINGS is sent on stream id 0, not {sid}")
        return encode_settings(frame.value) if frame.value else _pack_header(t, 0)
    raise ValueError(f"unknown frame type {t!r}")


# ---------------------------------------------------------------------------- decoding

_unpack_header = HEADER.unpack_from
_unpack_u32 = U32.unpack_from
_SETTING = struct.Struct(">HI")
_TYPES = {t.value: t for t in FrameType}


def decode(message: bytes | bytearray | memoryview) -> Frame:
    """Decode one data-channel message; raise :class:`FrameError` if it is malformed."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be binary, got {type(message).__name__}")
    if isinstance(message, memoryview):
        try:
            if message.ndim != 1 or message.itemsize != 1:  # decode the bytes behind it
                message = message.tobytes()
            size = len(message)
        except ValueError as exc:  # a released view
            raise FrameError(f"frame buffer is unusable: {exc}") from None
    else:
        size = len(message)
    if size < HEADER_SIZE:
        raise FrameError(f"frame too short: {size} bytes, the header alone is {HEADER_SIZE}")
    type_byte, stream_id = _unpack_header(message)
    ftype = _TYPES.get(type_byte)
    if size > MAX_FRAME:
        raise FrameError(f"frame too large: {size} bytes, the limit is {MAX_FRAME}",
                         stream_id, ftype)
    if ftype is None:
        raise FrameError(f"unknown frame type 0x{type_byte:02x}", stream_id)
    payload_size = size - HEADER_SIZE

    if ftype is FrameType.DATA:
        if payload_size == 0:
            raise FrameError("empty DATA frame", stream_id, ftype)
        return Frame(ftype, stream_id, data=bytes(message[HEADER_SIZE:]))
    if ftype is FrameType.WINDOW:
        _expect_size(ftype, payload_size, 4, stream_id)
        (increment,) = _unpack_u32(message, HEADER_SIZE)
        if increment == 0:
            raise FrameError("WINDOW frame with a zero increment", stream_id, ftype)
        return Frame(ftype, stream_id, value=increment)
    if ftype is FrameType.FIN:
        _expect_size(ftype, payload_size, 0, stream_id)
        return Frame(ftype, stream_id)
    if ftype is FrameType.OPEN_OK:
        _expect_size(ftype, payload_size, 4, stream_id)
        return Frame(ftype, stream_id, value=_unpack_u32(message, HEADER_SIZE)[0])
    if ftype is FrameType.OPEN:
        return _decode_open(message, payload_size, stream_id)
    if ftype is FrameType.SETTINGS:
        return _decode_settings(message, payload_size, stream_id)
    # OPEN_FAIL, RESET: a reason
    if payload_size > MAX_REASON:
        raise FrameError(f"{ftype.name} reason of {payload_size} bytes exceeds {MAX_REASON}",
                         stream_id, ftype)
    return Frame(ftype, stream_id, text=bytes(message[HEADER_SIZE:]).decode("utf-8", "replace"))


def _decode_open(message: bytes | bytearray | memoryview, payload_size: int,
                 stream_id: int) -> Frame:
    ftype = FrameType.OPEN
    if payload_size < 4:
        raise FrameError(f"OPEN frame payload of {payload_size} bytes, need at least 4",
                         stream_id, ftype)
    if payload_size > 5 + MAX_TARGET:
        raise FrameError(f"OPEN target of {payload_size - 5} bytes exceeds {MAX_TARGET}",
                         stream_id, ftype)
    (window,) = _unpack_u32(message, HEADER_SIZE)
    if payload_size == 4:
        return Frame(ftype, stream_id, value=window)
    flags = message[HEADER_SIZE + 4]
    if flags & ~KNOWN_OPEN_FLAGS:
        raise FrameError(f"unknown OPEN flags 0x{flags & ~KNOWN_OPEN_FLAGS:02x}",
                         stream_id, ftype)
    try:
        target = bytes(message[HEADER_SIZE + 5:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"OPEN target is not valid UTF-8 (byte {exc.start})",
                         stream_id, ftype) from None
    return Frame(ftype, stream_id, value=window, text=target)


def _decode_settings(message: bytes | bytearray | memoryview, payload_size: int,
                     stream_id: int) -> Frame:
    ftype = FrameType.SETTINGS
    if stream_id != 0:
        raise FrameError(f"SETTINGS on stream id {stream_id}; it belongs to stream id 0",
                         stream_id, ftype)
    if payload_size % _SETTING.size or payload_size > MAX_SETTINGS * _SETTING.size:
        raise FrameError(f"SETTINGS payload of {payload_size} bytes: must be whole "
                         f"{_SETTING.size}-byte pairs, at most {MAX_SETTINGS}", stream_id, ftype)
    max_data = 0
    for at in range(HEADER_SIZE, HEADER_SIZE + payload_size, _SETTING.size):
        key, value = _SETTING.unpack_from(message, at)
        if key == SETTING_MAX_DATA:
            max_data = value
    return Frame(ftype, 0, value=max_data)


def _expect_size(ftype: FrameType, got: int, want: int, stream_id: int) -> None:
    if got != want:
        raise FrameError(f"{ftype.name} frame payload of {got} bytes, expected {want}",
                         stream_id, ftype)
