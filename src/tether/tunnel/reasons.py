"""Why an OPEN failed, in a form the opener can act on: a code at the end of the reason.

An OPEN_FAIL reason is text for people ("target 10.0.0.5:22 refused the connection"). A
reason may end with a code in brackets, `` [refused]``, so the opening side can tell a
SOCKS client the right thing (RFC 1928 reply codes) without parsing prose. A reason with
no code (from an older peer) is a general failure. Pure: no I/O.
"""

from __future__ import annotations

import errno
import re

#: The peer's allow-list does not permit the target (or it takes no dynamic targets).
DENIED = "denied"
#: The target host answered with a TCP reset.
REFUSED = "refused"
#: No route to the target host, or it did not answer.
UNREACHABLE = "unreachable"
#: No route to the target network.
NET_UNREACHABLE = "net-unreachable"
#: The target did not answer within the dial timeout.
TIMEOUT = "timeout"
#: The target's name does not resolve.
NO_SUCH_HOST = "no-such-host"
#: The target is not a valid host:port.
BAD_TARGET = "bad-target"
#: The exposing side is busy (stream limit, OPEN rate limit, closing).
BUSY = "busy"
#: Anything else.
FAILED = "failed"

CODES = frozenset({DENIED, REFUSED, UNREACHABLE, NET_UNREACHABLE, TIMEOUT, NO_SUCH_HOST,
                   BAD_TARGET, BUSY, FAILED})

_TAIL = re.compile(r" \[([a-z-]+)\]\Z")


def tag(reason: str, code: str) -> str:
    """``reason`` with ``code`` appended: ``"... refused the connection [refused]"``."""
    if code not in CODES:
        raise ValueError(f"unknown OPEN_FAIL code {code!r}")
    return f"{reason} [{code}]"


def split(reason: str) -> tuple[str, str]:
    """(text, code) of a received reason; FAILED when it carries no known code."""
    match = _TAIL.search(reason)
    if match is None or match.group(1) not in CODES:
        return reason, FAILED
    return reason[:match.start()], match.group(1)


def code_of(reason: str) -> str:
    return split(reason)[1]


def for_os_error(exc: OSError) -> str:
    """The code for a failed dial."""
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return REFUSED
    if exc.errno == errno.ENETUNREACH:
        return NET_UNREACHABLE
    if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return UNREACHABLE
    if exc.errno in (errno.ETIMEDOUT,):
        return TIMEOUT
    return UNREACHABLE


class Refusal(Exception):
    """A target this side will not or cannot dial; ``code`` says why (one of CODES)."""

    def __init__(self, message: str, code: str = DENIED) -> None:
        super().__init__(message)
        if code not in CODES:
            raise ValueError(f"unknown OPEN_FAIL code {code!r}")
        self.code = code
