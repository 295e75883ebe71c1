"""A machine-readable record of what a running side did: one JSON object per line.

``tether expose|connect --events FILE`` appends here, so that a person, a script or the
network lab can tell exactly when a tube changed state, the network changed, signaling
dropped or a tube was opened or closed, without parsing human log lines. Every line has
``ts`` (Unix time, float) and ``event``:

- ``{"event": "state", "tube_id", "state"}``: a connection manager's state changed
  ('failed' adds ``retrying``: true when the tube is kept and tried again, not given up);
- ``{"event": "network_change", "change", "detail"}``: the network monitor saw a change;
- ``{"event": "signaling", "state"}``: the signaling client connected or disconnected;
- ``{"event": "peer", "what"}``: the other peer joined or left the relay;
- ``{"event": "tube", "tube_id", "what", "detail"}``: offered, answered, open or closed;
- ``{"event": "refused", "reason", "detail"}``: a signal that did not open with the tunnel
  secret was dropped (wrong secret, changed in transit, replayed, unsealed).

Lines are small and written whole with one ``write`` on a line-buffered file, the way a
logging FileHandler does; a write that fails is reported once and the record stops.
"""

from __future__ import annotations

import json
import logging
import time
from typing import IO, Any

logger = logging.getLogger(__name__)


class EventLog:
    """Appends events to ``path``; ``EventLog(None)`` records nothing."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"ts": time.time(), "event": event, **fields}
        try:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as exc:
            logger.error("cannot write events to %s (%s); no more events are recorded",
                         self.path, exc)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
