"""Rate limits for what a peer can make a tunnel do: pure, with an injectable clock.

A :class:`TokenBucket` paces the peer's OPENs (each one may cost a TCP connection to the
target); a :class:`LogThrottle` keeps a peer that floods bad frames from flooding the log
too. Neither does I/O or sleeps, so tests drive them with a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full.

    >>> now = [0.0]
    >>> bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    >>> [bucket.take() for _ in range(4)]
    [True, True, True, False]
    >>> now[0] = 0.5
    >>> bucket.take(), bucket.take()
    (True, False)
    """

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate {rate} must be positive")
        if not burst >= 1:
            raise ValueError(f"burst {burst} must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._tokens

    def take(self) -> bool:
        """Take one token if there is one; False (and nothing taken) otherwise."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:  # a clock that steps back refills nothing (and loses nothing)
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)


class LogThrottle:
    """Lets ``burst`` messages through, then ``per_second``; counts the rest.

    :meth:`admit` returns None for a message to drop, else how many were dropped since the
    last one let through (so the log can say so).
    """

    def __init__(self, per_second: float = 1.0, burst: int = 20,
                 clock: Clock = time.monotonic) -> None:
        self._bucket = TokenBucket(per_second, burst, clock)
        self.suppressed = 0  # dropped since the last message let through
        self.suppressed_total = 0

    def admit(self) -> int | None:
        if self._bucket.take():
            skipped, self.suppressed = self.suppressed, 0
            return skipped
        self.suppressed += 1
        self.suppressed_total += 1
        return None
