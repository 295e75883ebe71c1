"""TCP <-> data-channel framing: many TCP streams over one tube, with flow control."""

from .frames import MAX_DATA, MAX_FRAME, Frame, FrameError, FrameType, decode, encode
from .stream import Stream, StreamState, format_hostport
from .tunnel import (
    DEFAULT_HIGH_WATER,
    DEFAULT_WINDOW,
    Tunnel,
    parse_hostport,
)

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_WINDOW",
    "MAX_DATA",
    "MAX_FRAME",
    "Frame",
    "FrameError",
    "FrameType",
    "Stream",
    "StreamState",
    "Tunnel",
    "decode",
    "encode",
    "format_hostport",
    "parse_hostport",
]
