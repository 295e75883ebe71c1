"""Parsing untrusted text frames without ever raising (relay and client side).

Frames are parsed with orjson (several times faster than ``json``), giving the standard
library's answers: orjson turns an integer beyond 64 bits into a float, and refuses what
``json`` accepts (lone surrogate escapes, NaN/Infinity, numbers beyond a double). So a
frame orjson refuses is parsed again with ``json``, whose answer (value or error message)
is the one given; so is one where a number may have lost its integer value: an object
holding a float, or any other frame with a run of 19 or more digits (the shortest such
integer). On everything else the two agree (tests/test_signaling_frames.py checks it
against ``json``); our own signals never take the second parse.

``json.loads`` recurses once per nesting level, so ``"[" * 30000`` raises RecursionError
deep inside it. :func:`load` refuses a frame nested deeper than ``MAX_DEPTH``: one object
of scalars (or arrays of scalars) cannot be (C-level passes over its values), nor a frame with at most
``MAX_DEPTH`` brackets, nor an array of objects with one bracket per container (the usual
frame of signals: two C-level counts); otherwise the parsed value is walked, containers
only, without recursion. A RecursionError from the parser itself means the same. Every
parse failure becomes an error message. :func:`nesting_depth_exceeds` answers the same
question on the text, unparsed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from tether.signals import KINDS, SignalError, validate_signal

MAX_DEPTH = 8
"""Deepest nesting a frame may have: an array of signals whose extra fields may nest a bit."""

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_loads = json.JSONDecoder().decode
_fast_loads = orjson.loads
_CONTAINERS = frozenset({dict, list})
_FLAT_EXACT = frozenset({str, int, bool, type(None)})
"""Value types orjson gives exactly as ``json`` does (an int it gives fits in 64 bits)."""
_FLAT_OR_LIST = _FLAT_EXACT | {list}
_DIGITS_AND_OPENERS = bytes(
    48 if 48 <= b <= 57 else 91 if b == 123 else b for b in range(256)
)
"""Maps every digit to ``0`` and ``{`` to ``[``: one pass, then both questions below."""
_LONG_NUMBER = b"0" * 19
"""19 digits in a row: the shortest integer orjson may turn into a float (below
-9223372036854775808; above 18446744073709551615 takes 20)."""


def nesting_depth_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """True if the JSON text nests arrays/objects deeper than ``limit`` (strings ignored)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def value_depth_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True if a parsed JSON value nests lists/dicts deeper than ``limit`` (no recursion).

    Level by level, and a level whose members hold no container is passed over in C.
    """
    level = [value] if type(value) in _CONTAINERS else []
    depth = 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            values = container.values() if type(container) is dict else container
            if not _CONTAINERS.isdisjoint(map(type, values)):
                below += [v for v in values if type(v) in _CONTAINERS]
        level = below
        depth += 1
    return False


def load(text: str | bytes, limit: int = MAX_DEPTH) -> tuple[Any, str | None]:
    """(payload, None) or (None, why it is not acceptable JSON). Never raises.

    The same answers as ``json`` (see the module docstring), from orjson when it can."""
    try:
        payload = _fast_loads(text)
    except Exception:  # refused by orjson: json decides, and words the error
        return _load_exact(text, limit)
    if type(payload) is dict:
        types = set(map(type, payload.values()))
        if types <= _FLAT_EXACT or (
            # an ack: scalars and arrays of scalars, depth 2
            limit >= 2 and types <= _FLAT_OR_LIST
            and all(_FLAT_EXACT.issuperset(map(type, v))
                    for v in payload.values() if type(v) is list)
        ):
            return payload, None  # a signal or an ack: no float, depth at most 2
    raw = text.encode() if type(text) is str else text  # valid UTF-8: orjson took it
    mapped = raw.translate(_DIGITS_AND_OPENERS)
    if _LONG_NUMBER in mapped:
        return _load_exact(text, limit)
    brackets = mapped.count(b"[")  # "[" and "{" (strings' too: an upper bound)
    if brackets <= limit or (
        # An array of objects holding no container (the frame of signals): as many
        # brackets as containers, so nothing nests deeper than 2.
        type(payload) is list and brackets == len(payload) + 1 and limit >= 2
        and _CONTAINERS.issuperset(map(type, payload))
    ) or not value_depth_exceeds(payload, limit):
        return payload, None
    return None, f"frame is nested deeper than {limit} levels"


def _load_exact(text: str | bytes, limit: int) -> tuple[Any, str | None]:
    """:func:`load` with the standard library's parser (what orjson cannot answer)."""
    too_deep = f"frame is nested deeper than {limit} levels"
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        payload = _loads(text)
        if not value_depth_exceeds(payload, limit):
            return payload, None
        return None, too_deep
    except RecursionError:
        return None, too_deep
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"frame is not valid JSON: {str(exc)[:200]}"
    except Exception as exc:  # anything else a hostile frame may provoke
        return None, f"frame could not be parsed ({type(exc).__name__})"


def read_frame(text: str | bytes) -> tuple[dict[str, Any] | None, list[Any], list[str]]:
    """Split a frame from the relay: (control message or None, valid signals, errors).

    A control message is a JSON object with a ``control`` key. Otherwise the frame holds one
    signal or an array of them; each invalid item gives one error naming its index. Never
    raises, whatever ``text`` is.
    """
    if isinstance(text, bytes):
        return None, [], [f"binary frame ({len(text)} bytes) ignored"]
    payload, problem = load(text)
    if problem is not None:
        return None, [], [problem]
    if type(payload) is dict:
        if "control" in payload:
            return payload, [], []
        items, single = [payload], True
    elif type(payload) is list:
        items, single = payload, False
    else:
        return None, [], [f"frame must be a JSON object or array, not {type(payload).__name__}"]
    signals: list[Any] = []
    errors: list[str] = []
    append = signals.append
    for index, item in enumerate(items):
        # The common case inline (the same rules as validate_signal); anything else there.
        if type(item) is dict:
            tube_id, kind = item.get("tube_id"), item.get("kind")
            if (type(tube_id) is str and tube_id and type(kind) is str and kind in KINDS
                    and type(item.get("conversation_id", "")) is str
                    and type(item.get("data", "")) is str):
                append(item)
                continue
        try:
            append(validate_signal(item))
        except SignalError as exc:
            errors.append(str(exc)[:300] if single else f"item {index}: {str(exc)[:300]}")
    return None, signals, errors


class Encoded(dict):  # type: ignore[type-arg]
    """A signal (or control message) that carries its compact ASCII JSON encoding.

    The relay passes on most signals exactly as they arrived; keeping the arriving text saves
    encoding them again. Only made when the text is known to match the dict.
    """

    __slots__ = ("text",)
    text: str


def with_text(item: dict[str, Any], text: str) -> Encoded:
    out = Encoded(item)
    out.text = text
    return out


def text_of(item: dict[str, Any]) -> str:
    """The encoding of ``item``: its own text if it carries one, else compact ASCII JSON."""
    if type(item) is Encoded:
        return item.text
    return json.dumps(item, separators=(",", ":"))
