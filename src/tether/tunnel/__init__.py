"""TCP <-> data-channel framing: many TCP streams over one tube, with flow control."""

from .frames import (
    MAX_DATA,
    MAX_DATA_LARGE,
    MAX_FRAME,
    MAX_WINDOW,
    MIN_WINDOW,
    Frame,
    FrameError,
    FrameType,
    decode,
    encode,
)
from . import reasons
from .limits import LogThrottle, TokenBucket
from .reasons import Refusal
from .stream import Stream, StreamState, format_hostport
from .tunnel import (
    DEFAULT_CONTROL_LIMIT,
    DEFAULT_HIGH_WATER,
    DEFAULT_MAX_STREAMS,
    DEFAULT_OPEN_BURST,
    DEFAULT_OPEN_RATE,
    DEFAULT_WINDOW,
    DialPolicy,
    OpenCallback,
    Tunnel,
    parse_hostport,
)

__all__ = [
    "DEFAULT_CONTROL_LIMIT",
    "DEFAULT_HIGH_WATER",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_OPEN_BURST",
    "DEFAULT_OPEN_RATE",
    "DEFAULT_WINDOW",
    "MAX_DATA",
    "MAX_DATA_LARGE",
    "MAX_FRAME",
    "MAX_WINDOW",
    "MIN_WINDOW",
    "DialPolicy",
    "Frame",
    "FrameError",
    "FrameType",
    "LogThrottle",
    "OpenCallback",
    "Refusal",
    "Stream",
    "StreamState",
    "TokenBucket",
    "Tunnel",
    "decode",
    "encode",
    "format_hostport",
    "parse_hostport",
    "reasons",
]
