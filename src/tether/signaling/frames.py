"""Parsing untrusted text frames without ever raising (relay and client side).

``json.loads`` recurses once per nesting level, so ``"[" * 30000`` raises RecursionError
deep inside it. :func:`load` parses each frame once and refuses one nested deeper than
``MAX_DEPTH``: a frame with at most ``MAX_DEPTH`` brackets cannot be, nor an array of objects
with one bracket per container (the usual frame of signals: two C-level counts); otherwise
the parsed value is walked, containers only, without recursion. A RecursionError from the
parser itself means the same. Every parse failure becomes an error message.
:func:`nesting_depth_exceeds` answers the same question on the text, unparsed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tether.signals import KINDS, SignalError, validate_signal

MAX_DEPTH = 8
"""Deepest nesting a frame may have: an array of signals whose extra fields may nest a bit."""

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_loads = json.JSONDecoder().decode
_CONTAINERS = frozenset({dict, list})


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
    """(payload, None) or (None, why it is not acceptable JSON). Never raises."""
    too_deep = f"frame is nested deeper than {limit} levels"
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        payload = _loads(text)
        brackets = text.count("[") + text.count("{")
        if brackets <= limit or (
            # An array of objects holding no container (the frame of signals): as many
            # brackets as containers, so nothing nests deeper than 2.
            type(payload) is list and brackets == len(payload) + 1 and limit >= 2
            and _CONTAINERS.issuperset(map(type, payload))
        ) or not value_depth_exceeds(payload, limit):
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
