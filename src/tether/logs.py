"""Logs for people and for services: one line per event, a timestamp, no secrets.

:func:`setup` replaces whatever handlers the root logger had with one handler:

- ``text``: ``2026-11-26T04:38:55.123Z INFO tether.app: message``, one line, never wrapped
  (rich wrapped at 80 columns when not on a terminal, which broke grep); on a terminal it
  prints through the rich console so the live table stays intact;
- ``json``: one object per line (``ts``, ``level``, ``logger``, ``msg``; ``exc`` with -v);
- verbosity: 0 is INFO for tether, 1 (``-v``) is tether's DEBUG, 2 (``-vv``) adds aiortc,
  aioice and websockets at DEBUG (aiortc's SCTP debug alone is ~100k lines per 50 MB);
- tracebacks only from ``-v`` on; otherwise an exception shows as ``: Type: message``;
- every record passes the signaling redactor (tokens, tunnel secrets, Authorization
  headers, resume credentials) before it is formatted; :func:`add_secret` registers more.

The last warnings and errors are kept (:data:`RECENT`) for `tether status`.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
from typing import Any

from .signaling import redact

FORMATS = ("text", "json")
LIBRARIES = ("aiortc", "aioice", "websockets")
RECENT_KEPT = 20


class _State:
    verbosity = 0


STATE = _State()


def verbosity() -> int:
    """The -v count the process was set up with."""
    return STATE.verbosity


def add_secret(*secrets: str | None) -> None:
    """Never log these strings (the relay token, a tunnel secret...)."""
    redact.install(*[s for s in secrets if s])


def _timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", " | ")


class LineFormatter(logging.Formatter):
    """``ts LEVEL logger: message``; tracebacks only if ``tracebacks``."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(record.getMessage())
        line = f"{_timestamp(record.created)} {record.levelname} {record.name}: {message}"
        if record.exc_info and record.exc_info[1] is not None:
            if self.tracebacks:
                return line + "\n" + self.formatException(record.exc_info)
            exc = record.exc_info[1]
            line += f": {type(exc).__name__}: {_one_line(str(exc))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created), "level": record.levelname,
            "logger": record.name, "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {exc}"
            if self.tracebacks:
                entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class LineHandler(logging.Handler):
    """Writes whole lines to stderr (looked up at each write, so rich's Live redirection and
    pytest's capture both see them), or through a rich console on a terminal."""

    def __init__(self, console: Any = None) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            console = self.console
            if console is not None and console.is_terminal:
                console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)
            else:
                stream = sys.stderr
                stream.write(line + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


class RecentRecords(logging.Handler):
    """Keeps the last warnings and errors (bounded) for status displays."""

    def __init__(self, kept: int = RECENT_KEPT) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=kept)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append({"ts": record.created, "level": record.levelname,
                                 "logger": record.name,
                                 "message": _one_line(record.getMessage())})
        except Exception:
            self.handleError(record)

    def matching(self, text: str | None = None, limit: int = 5) -> list[dict[str, Any]]:
        found = [r for r in self.records if text is None or text in r["message"]]
        return found[-limit:]


RECENT = RecentRecords()


def setup(verbosity: int = 0, fmt: str = "text", *, console: Any = None,
          default: int = logging.INFO) -> None:
    """Configure logging for a CLI process (see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    STATE.verbosity = verbosity
    handler = LineHandler(console if fmt == "text" else None)
    handler.setFormatter((JsonFormatter if fmt == "json" else LineFormatter)(verbosity >= 1))
    handler.addFilter(redact.REDACTOR)  # every logger, not only the ones redact knows
    RECENT.addFilter(redact.REDACTOR)
    redact.install()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.addHandler(RECENT)
    root.setLevel(logging.DEBUG if verbosity >= 2 else default)
    logging.getLogger("tether").setLevel(logging.DEBUG if verbosity >= 1 else default)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
