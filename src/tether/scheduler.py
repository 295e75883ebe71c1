"""One timer for many managers: a heap of deadlines behind a single loop timer.

Ten thousand tubes, each with a keepalive due in five minutes, must not mean ten thousand
sleeping tasks. A Scheduler keeps every deadline in one heap and asks to be woken only for
the earliest; LoopScheduler arms a single ``loop.call_at`` for it, ManualScheduler is woken
by a test calling ``advance``. Cancelled entries stay in the heap until they surface or
until they are half of it, when the heap is rebuilt.
"""

from __future__ import annotations

import abc
import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

_COMPACT_MIN = 64


class Timer:
    """A scheduled callback; ``cancel()`` it to drop it."""

    __slots__ = ("when", "callback", "cancelled", "_scheduler")

    def __init__(self, when: float, callback: Callable[[], object], scheduler: Scheduler) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        self._scheduler = scheduler

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._scheduler._cancelled_one()


class Scheduler(abc.ABC):
    """The heap; subclasses say what time it is and how they get woken."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._dead = 0

    @abc.abstractmethod
    def time(self) -> float:
        """The current time, in the clock the deadlines use."""

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback()`` once ``time()`` reaches ``when``."""
        timer = Timer(when, callback, self)
        first = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (when, next(self._order), timer))
        if first is None or when < first:
            self._wake_at(when)
        return timer

    def __len__(self) -> int:
        """Timers still pending."""
        return len(self._heap) - self._dead

    def next_deadline(self) -> float | None:
        self._drop_cancelled_head()
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> int:
        """Run every timer due at ``now``; return how many ran.

        Timers added by the callbacks wait for the next wake-up, even if already due, so a
        callback that keeps rescheduling itself cannot spin here forever.
        """
        due: list[Timer] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                self._dead -= 1
            else:
                timer.cancelled = True  # fired: a later cancel() is a no-op
                due.append(timer)
        for timer in due:
            try:
                timer.callback()
            except Exception:
                logger.exception("timer callback %r failed", timer.callback)
        return len(due)

    # -- for subclasses -------------------------------------------------------------------

    def _wake_at(self, when: float) -> None:
        """The earliest deadline is now ``when``."""

    def _cancelled_one(self) -> None:
        self._dead += 1
        if self._dead > _COMPACT_MIN and self._dead * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._dead = 0

    def _drop_cancelled_head(self) -> None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._dead -= 1


class LoopScheduler(Scheduler):
    """Drives the heap from one asyncio timer, always armed for the earliest deadline.

    Time is ``time.monotonic()`` (what asyncio's and uvloop's clocks are built on), so it can
    be read before a loop runs; the loop is bound when the first timer is armed.
    """

    time = staticmethod(time.monotonic)

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__()
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None

    def _wake_at(self, when: float) -> None:
        if self._armed_for is not None and self._armed_for <= when:
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._handle is not None:
            self._handle.cancel()
        delay = max(when - time.monotonic(), 0.0)
        self._handle = loop.call_at(loop.time() + delay, self._fire)
        self._armed_for = when

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = None
        self.run_due(time.monotonic())
        following = self.next_deadline()
        if following is not None:
            self._wake_at(following)


class ManualScheduler(Scheduler):
    """Time moves only when ``advance`` is called: for tests of timing rules without sleeping."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self.now = start

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> int:
        """Move time forward, running each due timer at its own deadline; return how many."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        return self.advance_to(self.now + seconds)

    def advance_to(self, when: float, *, max_rounds: int = 100_000) -> int:
        ran = 0
        for _ in range(max_rounds):
            deadline = self.next_deadline()
            if deadline is None or deadline > when:
                self.now = max(self.now, when)
                return ran
            self.now = max(self.now, deadline)
            ran += self.run_due(self.now)
        raise RuntimeError(f"timers keep rescheduling at {self.now}; a callback is not advancing")


_default: LoopScheduler | None = None


def default_scheduler() -> LoopScheduler:
    """The running loop's shared scheduler (one per loop; call from inside the loop)."""
    global _default
    loop = asyncio.get_running_loop()
    if _default is None or _default._loop is not loop:
        # A new loop (or another thread's): managers already made keep the one they hold.
        _default = LoopScheduler(loop)
    return _default
