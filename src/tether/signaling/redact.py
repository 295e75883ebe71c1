"""Keep secrets out of logs: the relay token and resume credentials never reach a handler.

``websockets`` logs request headers and frame contents at DEBUG level (so ``-v`` used to
print ``Authorization: Bearer <token>``). :func:`install` attaches one :class:`Redactor`
filter to the ``websockets`` loggers and to tether's signaling loggers; it rewrites any
record whose text contains a registered secret, the value of an ``Authorization`` or
``X-Tether-Resume`` header, or a resume credential (recognisable by its prefix).
"""

from __future__ import annotations

import logging
import re
import threading

RESUME_PREFIX = "tr1_"
"""Every resume credential starts with this, so logs can be scrubbed without a registry."""
RESUME_HEADER = "X-Tether-Resume"
REDACTED = "[redacted]"

_CREDENTIAL = re.compile(re.escape(RESUME_PREFIX) + r"[A-Za-z0-9_-]{8,}")
_SECRET_HEADERS = frozenset({"authorization", RESUME_HEADER.lower(), "proxy-authorization"})
LOGGERS = (
    "websockets",
    "websockets.client",
    "websockets.server",
    "tether.signaling",
    "tether.signaling.server",
    "tether.signaling.client",
    "tether.signaling.conversations",
)


class Redactor(logging.Filter):
    """A logging filter that scrubs secrets from records (it never drops a record)."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        if secret:
            with self._lock:
                self._secrets = self._secrets | {secret}

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if RESUME_PREFIX in text:
            text = _CREDENTIAL.sub(RESUME_PREFIX + REDACTED, text)
        return text

    def _frame_with_secret(self, arg: object) -> bool:
        data = getattr(arg, "data", None)
        if not isinstance(data, (bytes, bytearray)):
            return False
        if RESUME_PREFIX.encode() in data:
            return True
        return any(secret.encode() in data for secret in self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # websockets' header lines: "> %s: %s" / "< %s: %s" with (name, value)
        if (
            isinstance(args, tuple)
            and len(args) == 2
            and isinstance(args[0], str)
            and args[0].lower() in _SECRET_HEADERS
        ):
            record.args = (args[0], REDACTED)
            return True
        if isinstance(args, tuple) and any(self._frame_with_secret(arg) for arg in args):
            # websockets logs frames truncated in the middle, so a secret's tail may show
            # without its prefix: hide the whole frame.
            record.args = tuple(
                "<frame hidden: it holds a secret>" if self._frame_with_secret(arg) else arg
                for arg in args
            )
        try:
            text = record.getMessage()
        except Exception:
            return True  # a broken record: let logging report it as usual
        clean = self.scrub(text)
        if clean != text:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            exc_text = str(record.exc_info[1])
            if self.scrub(exc_text) != exc_text:
                record.exc_info = None
                record.exc_text = None
                record.msg = f"{record.msg} (exception details hidden: they held a secret)"
        return True


REDACTOR = Redactor()


def install(*secrets: str) -> Redactor:
    """Register ``secrets`` and make sure the filter sits on every logger that could leak them."""
    for secret in secrets:
        REDACTOR.add(secret)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if REDACTOR not in logger.filters:
            logger.addFilter(REDACTOR)
    return REDACTOR
