"""Parsing untrusted text frames without ever raising (relay and client side).

``json.loads`` recurses once per nesting level, so ``"[" * 30000`` raises RecursionError
deep inside it. :func:`nesting_depth_exceeds` refuses such frames before parsing, cheaply
(two C-level counts in the common case, a scan of the bracket characters only otherwise),
and :func:`load` turns every parse failure, RecursionError included, into an error message.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tether.signals import SignalError, validate_signal

MAX_DEPTH = 8
"""Deepest nesting a frame may have: an array of signals whose extra fields may nest a bit."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


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


def load(text: str | bytes, limit: int = MAX_DEPTH) -> tuple[Any, str | None]:
    """(payload, None) or (None, why it is not acceptable JSON). Never raises."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if nesting_depth_exceeds(text, limit):
            return None, f"frame is nested deeper than {limit} levels"
        return json.loads(text), None
    except RecursionError:
        return None, f"frame is nested deeper than {limit} levels"
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
    if isinstance(payload, dict):
        if "control" in payload:
            return payload, [], []
        items, single = [payload], True
    elif isinstance(payload, list):
        items, single = payload, False
    else:
        return None, [], [f"frame must be a JSON object or array, not {type(payload).__name__}"]
    signals: list[Any] = []
    errors: list[str] = []
    for index, item in enumerate(items):
        try:
            signals.append(validate_signal(item))
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
