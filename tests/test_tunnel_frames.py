"""The tunnel's frame format and address parsing: pure functions, no I/O."""

from __future__ import annotations

import struct

import pytest

from tether.tunnel import parse_hostport
from tether.tunnel import frames as f
from tether.tunnel.frames import Frame, FrameError, FrameType


ROUND_TRIP = [
    Frame(FrameType.OPEN, 1, value=256 * 1024),
    Frame(FrameType.OPEN, 7, value=1, text="db.internal:5432"),
    Frame(FrameType.OPEN_OK, 1, value=0xFFFFFFFF),
    Frame(FrameType.OPEN_FAIL, 3, text="target 127.0.0.1:5999 refused the connection"),
    Frame(FrameType.OPEN_FAIL, 3, text=""),
    Frame(FrameType.DATA, 0xFFFFFFFF, data=b"x"),
    Frame(FrameType.DATA, 2, data=bytes(range(256)) * 64),  # exactly MAX_DATA
    Frame(FrameType.DATA, 2, data=bytes(range(256)) * 240),  # exactly MAX_DATA_LARGE
    Frame(FrameType.WINDOW, 5, value=65536),
    Frame(FrameType.FIN, 9),
    Frame(FrameType.RESET, 4, text="réinitialisé: connexion perdue"),
    Frame(FrameType.SETTINGS, 0, value=60 * 1024),
    Frame(FrameType.SETTINGS, 0),  # no setting at all
]


@pytest.mark.parametrize("frame", ROUND_TRIP, ids=lambda fr: f"{fr.type.name}-{fr.stream_id}")
def test_round_trip(frame: Frame) -> None:
    raw = f.encode(frame)
    assert raw[0] == frame.type.value
    assert struct.unpack(">I", raw[1:5])[0] == frame.stream_id
    assert f.decode(raw) == frame
    assert f.decode(bytearray(raw)) == frame
    assert f.decode(memoryview(raw)) == frame


def test_every_type_is_covered_and_sizes() -> None:
    assert {fr.type for fr in ROUND_TRIP} == set(FrameType)
    assert f.HEADER_SIZE == 5
    assert f.MAX_DATA == 16 * 1024  # the base every peer accepts: part of the protocol
    assert f.MAX_DATA_LARGE == 60 * 1024
    assert len(f.encode_data(1, b"a" * f.MAX_DATA_LARGE)) == f.MAX_FRAME
    # One SCTP message within aiortc's (and the SDP's default) 64 KiB maximum.
    assert f.MAX_FRAME <= 65536
    assert f.encode_settings(0x0102) == bytes([8, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2])
    assert len(f.encode_window(1, 1)) == 9
    assert len(f.encode_fin(1)) == 5
    assert f.encode_open_ok(0x01020304, 0x0A0B0C0D) == bytes([2, 1, 2, 3, 4, 10, 11, 12, 13])


def test_long_reason_is_cut_on_a_character_boundary() -> None:
    raw = f.encode_reset(1, "é" * 2000)  # 4000 bytes of UTF-8
    frame = f.decode(raw)
    assert len(raw) - f.HEADER_SIZE <= f.MAX_REASON
    assert frame.text == "é" * (f.MAX_REASON // 2)


@pytest.mark.parametrize(
    ("raw", "message", "stream_id"),
    [
        (b"", "too short", None),
        (b"\x04\x00\x00\x01", "too short", None),
        (b"\x63\x00\x00\x00\x05payload", "unknown frame type 0x63", 5),
        (b"\x00\x00\x00\x00\x05", "unknown frame type 0x00", 5),
        (f.HEADER.pack(4, 3) + b"x" * (f.MAX_DATA_LARGE + 1), "too large", 3),
        (f.HEADER.pack(8, 3) + b"\x00\x01\x00\x00\xf0\x00", "SETTINGS on stream id 3", 3),
        (f.HEADER.pack(8, 0) + b"\x00\x01\x00\x00\xf0", "whole 6-byte pairs", 0),
        (f.HEADER.pack(8, 0) + b"\x00\x09\x00\x00\x00\x01" * 17, "at most 16", 0),
        (f.HEADER.pack(4, 3), "empty DATA", 3),
        (f.HEADER.pack(5, 3) + b"\x00\x00\x01", "WINDOW frame payload of 3 bytes, expected 4", 3),
        (f.HEADER.pack(5, 3) + b"\x00\x00\x00\x00", "zero increment", 3),
        (f.HEADER.pack(6, 3) + b"!", "FIN frame payload of 1 bytes, expected 0", 3),
        (f.HEADER.pack(2, 3), "OPEN_OK frame payload of 0 bytes", 3),
        (f.HEADER.pack(1, 3) + b"\x00\x00", "OPEN frame payload of 2 bytes", 3),
        (f.HEADER.pack(1, 3) + b"\x00" * 5 + b"h" * (f.MAX_TARGET + 1), "OPEN target", 3),
        (f.HEADER.pack(1, 3) + b"\x00" * 4 + b"\x01db:5432", "unknown OPEN flags 0x01", 3),
        (f.HEADER.pack(1, 3) + b"\x00" * 5 + b"db\xff:5432", "not valid UTF-8", 3),
        (f.HEADER.pack(7, 3) + b"r" * (f.MAX_REASON + 1), "RESET reason", 3),
    ],
)
def test_malformed_input_raises_a_clear_error(raw: bytes, message: str, stream_id: int | None) -> None:
    with pytest.raises(FrameError, match=message) as info:
        f.decode(raw)
    assert info.value.stream_id == stream_id
    assert isinstance(info.value, ValueError)


def test_settings_keep_what_this_side_knows_and_ignore_the_rest() -> None:
    pair = struct.Struct(">HI").pack
    raw = f.HEADER.pack(8, 0) + pair(7, 123) + pair(1, 40_000) + pair(0xFFFF, 0xFFFFFFFF)
    assert f.decode(raw) == Frame(FrameType.SETTINGS, 0, value=40_000)
    assert f.decode(f.HEADER.pack(8, 0) + pair(7, 123)) == Frame(FrameType.SETTINGS, 0)
    with pytest.raises(ValueError, match="stream id 0"):
        f.encode(Frame(FrameType.SETTINGS, 1, value=1))


def test_text_message_is_not_a_frame() -> None:
    with pytest.raises(FrameError, match="binary"):
        f.decode("hello")  # type: ignore[arg-type]


def test_invalid_utf8_in_a_reason_is_replaced_not_fatal() -> None:
    frame = f.decode(f.HEADER.pack(3, 1) + b"bad \xff byte")
    assert frame.type is FrameType.OPEN_FAIL
    assert frame.text == "bad \ufffd byte"


def test_encoders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="DATA payload"):
        f.encode_data(1, b"")
    with pytest.raises(ValueError, match="DATA payload"):
        f.encode_data(1, b"x" * (f.MAX_DATA_LARGE + 1))
    with pytest.raises(ValueError, match="window increment"):
        f.encode_window(1, 0)
    with pytest.raises(ValueError, match="stream id"):
        f.encode_fin(-1)
    with pytest.raises(ValueError, match="stream id"):
        f.encode_fin(1 << 32)
    with pytest.raises(ValueError, match="window"):
        f.encode_open(1, 1 << 32)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5432", ("127.0.0.1", 5432)),
        ("[::1]:5432", ("::1", 5432)),
        ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
        (" localhost:0 ", ("localhost", 0)),
        ("db.example.com:65535", ("db.example.com", 65535)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("127.0.0.1", "missing ':PORT'"),
        (":5432", "missing host"),
        ("::1:5432", "brackets"),
        ("[::1]5432", "expected ':PORT'"),
        ("[::1:5432", "missing ']'"),
        ("[nothost]:80", "not an IPv6 address"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:", "not a number"),
        ("127.0.0.1:-1", "not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("a b:80", "not a host"),
    ],
)
def test_parse_hostport_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hostport(text)
