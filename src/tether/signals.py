"""The signal envelope (docs/architecture.md, "Signals"), shared by cores, managers and signaling.

A signal is a JSON object ``{"tube_id", "conversation_id", "kind", "data", ...}``. Extra
keys are kept as they are, so the envelope can grow (an authentication field later)
without breaking older peers.
"""

from __future__ import annotations

import json
from typing import Any

OFFER = "offer"
ANSWER = "answer"
ICE_CANDIDATE = "icecandidate"
ICE_RESTART_OFFER = "ice_restart_offer"
ICE_RESTART_ANSWER = "ice_restart_answer"
CONNECTION_STATE_CHANGED = "connection_state_changed"
NETWORK_CHANGE_DETECTED = "network_change_detected"
KEEPALIVE = "keepalive"
CHANNEL_CLOSED = "channel_closed"
ERROR = "error"

KINDS = frozenset(
    {
        OFFER,
        ANSWER,
        ICE_CANDIDATE,
        ICE_RESTART_OFFER,
        ICE_RESTART_ANSWER,
        CONNECTION_STATE_CHANGED,
        NETWORK_CHANGE_DETECTED,
        KEEPALIVE,
        CHANNEL_CLOSED,
        ERROR,
    }
)

Signal = dict[str, Any]


class SignalError(ValueError):
    """A frame or an item in it is not a valid signal; the message says why."""


def make_signal(
    tube_id: str, conversation_id: str, kind: str, data: str = "", **extra: Any
) -> Signal:
    """Build a signal dict; ``extra`` keys ride along unchanged."""
    if kind not in KINDS:
        raise SignalError(f"unknown kind {kind!r}")
    signal: Signal = {
        "tube_id": tube_id,
        "conversation_id": conversation_id,
        "kind": kind,
        "data": data,
    }
    signal.update(extra)
    return signal


def validate_signal(item: Any) -> Signal:
    """Return ``item`` if it is a well-formed signal, else raise SignalError naming the fault."""
    if not isinstance(item, dict):
        raise SignalError(f"a signal must be a JSON object, not {type(item).__name__}")
    tube_id = item.get("tube_id")
    if not isinstance(tube_id, str) or not tube_id:
        raise SignalError("missing or empty 'tube_id'")
    kind = item.get("kind")
    if not isinstance(kind, str):
        raise SignalError("missing 'kind'")
    if kind not in KINDS:
        raise SignalError(f"unknown kind {kind!r}")
    conversation_id = item.get("conversation_id", "")
    if not isinstance(conversation_id, str):
        raise SignalError("'conversation_id' must be a string")
    data = item.get("data", "")
    if not isinstance(data, str):
        raise SignalError("'data' must be a string")
    return item


def parse_frame(text: str | bytes) -> tuple[list[Signal], list[str]]:
    """Split a WebSocket frame into valid signals and error messages.

    A frame holds one signal or a JSON array of signals. Each bad item yields one error
    message naming its index; the good items are returned in order. Never raises.
    """
    try:
        payload = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return [], [f"frame is not valid JSON: {exc}"]
    except RecursionError:
        return [], ["frame is nested too deeply"]
    if isinstance(payload, dict):
        try:
            return [validate_signal(payload)], []
        except SignalError as exc:
            return [], [str(exc)]
    if not isinstance(payload, list):
        return [], [
            f"frame must be a JSON object or array, not {type(payload).__name__}"
        ]
    signals: list[Signal] = []
    errors: list[str] = []
    for index, item in enumerate(payload):
        try:
            signals.append(validate_signal(item))
        except SignalError as exc:
            errors.append(f"item {index}: {exc}")
    return signals, errors
