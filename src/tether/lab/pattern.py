"""The byte stream the echo checker sends and expects back.

Each connection carries a sequence of 8-byte big-endian words ``(conn << 48) + index``, so
every word of every connection is unique: a lost, duplicated, reordered or misrouted chunk
shows up as a mismatch at a known offset. Any slice can be regenerated from its offset alone,
so neither side keeps a copy of what was sent.
"""

from __future__ import annotations

import sys
from array import array

WORD = 8
_CONN_SHIFT = 48


def pattern(conn: int, offset: int, length: int) -> bytes:
    """The ``length`` bytes at ``offset`` of connection ``conn``'s stream."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    if length == 0:
        return b""
    first = offset // WORD
    last = (offset + length + WORD - 1) // WORD
    base = conn << _CONN_SHIFT
    words = array("Q", range(base + first, base + last))
    if sys.byteorder == "little":
        words.byteswap()
    start = offset - first * WORD
    return words.tobytes()[start:start + length]


def first_mismatch(conn: int, offset: int, data: bytes) -> int | None:
    """The stream offset of the first byte of ``data`` that differs from the pattern, or None."""
    expected = pattern(conn, offset, len(data))
    if expected == data:
        return None
    for i, (got, want) in enumerate(zip(data, expected)):
        if got != want:
            return offset + i
    return offset + min(len(data), len(expected))
