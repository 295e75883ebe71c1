"""End-to-end delivery bookkeeping of the signaling client: pure state, no I/O, no clock.

A signal counts as delivered only when the *other peer's client* acknowledges it (the relay
merely forwards that acknowledgement), so the sender keeps every signal until then and
sends the unacknowledged ones again, in order, whenever delivery may have failed.

- :class:`Outbox` numbers outgoing signals (``seq`` 1, 2, 3, ... per session) and keeps them
  until acknowledged or discarded. Every written signal carries ``prev``: the seq of the
  previous signal of the session still kept at writing time (0: none). A receiver that has
  not delivered ``prev`` yet knows a signal before this one is missing.
- :class:`Inbox` decides per incoming signal: deliver it, drop a duplicate (still
  acknowledged: its ack was evidently lost), or drop it because an earlier one is missing
  (not acknowledged: the sender sends it again, in order, after the earlier one).
  That keeps each sender's signals in order and exactly once even though resends race
  with new signals and a relay may refuse one signal and accept the next.
- :class:`ResendTimer` is the backstop: when acknowledgements stop coming while the other
  peer is present, resend after a delay that doubles up to a maximum. Times are passed in,
  so it is tested with a fake clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

DELIVER = "deliver"
DUPLICATE = "duplicate"
GAP = "gap"


@dataclass
class _Entry:
    tube_id: str
    kind: str
    text: str
    """The encoded signal without ``prev`` (an object ending in ``}``)."""


class Outbox:
    """Numbered outgoing signals kept until the other peer acknowledges them."""

    def __init__(self) -> None:
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_seq = 1
        self._sent_upto = 0  # highest seq written since the last rewind
        self._epoch = 0  # bumped by rewind() so a writer's stale mark_sent() is ignored

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def epoch(self) -> int:
        return self._epoch

    def add(self, seq: int, tube_id: str, text: str, kind: str = "") -> None:
        """Keep an encoded signal; ``seq`` must be :attr:`next_seq`."""
        if seq != self._next_seq:
            raise ValueError(f"expected seq {self._next_seq}, got {seq}")
        if not text.endswith("}"):
            raise ValueError("text must be an encoded JSON object")
        self._entries[seq] = _Entry(tube_id, kind, text)
        self._next_seq += 1

    def unsent(self) -> list[tuple[int, str]]:
        """(seq, text with ``prev``) of every kept signal not written since the last rewind."""
        out: list[tuple[int, str]] = []
        prev = 0
        for seq, entry in self._entries.items():
            if seq > self._sent_upto:
                out.append((seq, f'{entry.text[:-1]},"prev":{prev}}}'))
            prev = seq
        return out

    def mark_sent(self, upto: int, epoch: int) -> None:
        """Everything up to ``upto`` was written, unless a rewind happened meanwhile."""
        if epoch == self._epoch:
            self._sent_upto = max(self._sent_upto, upto)

    def rewind(self) -> None:
        """Write every kept signal again, from the oldest."""
        self._sent_upto = 0
        self._epoch += 1

    @property
    def has_unsent(self) -> bool:
        return bool(self._entries) and next(reversed(self._entries)) > self._sent_upto

    @property
    def outstanding(self) -> bool:
        """Some kept signal was written and awaits its acknowledgement."""
        return bool(self._entries) and next(iter(self._entries)) <= self._sent_upto

    def ack(self, seqs: list[int]) -> int:
        """Forget acknowledged signals; return how many were still kept."""
        removed = 0
        for seq in seqs:
            if self._entries.pop(seq, None) is not None:
                removed += 1
        return removed

    def discard(self, tube_id: str, kinds: Iterable[str] | None = None) -> int:
        """Forget the kept signals of ``tube_id`` (only those of ``kinds`` if given)."""
        wanted = None if kinds is None else frozenset(kinds)
        doomed = [
            seq
            for seq, entry in self._entries.items()
            if entry.tube_id == tube_id and (wanted is None or entry.kind in wanted)
        ]
        for seq in doomed:
            del self._entries[seq]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()


class Inbox:
    """Per (peer, session): the highest seq handed to the application. Bounded LRU."""

    def __init__(self, limit: int = 1024) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._last: OrderedDict[tuple[str, str], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def last(self, peer: str, session: str) -> int:
        return self._last.get((peer, session), 0)

    def classify(self, peer: str, session: str, seq: int, prev: int | None) -> str:
        """DELIVER (and remember it), DUPLICATE or GAP for one incoming signal.

        ``prev`` None (a sender that does not send it) only drops duplicates.
        """
        key = (peer, session)
        last = self._last.get(key, 0)
        if seq <= last:
            return DUPLICATE
        if prev is not None and prev > last:
            return GAP
        self._remember(key, seq)
        return DELIVER

    def classify_run(self, peer: str, session: str, prev: int, seqs: list[int]) -> bool:
        """Deliver a whole run at once, if :meth:`classify` would deliver each of it.

        A run is the usual frame from the relay: ``seqs`` rise, the first signal names
        ``prev`` as its predecessor and each later one the signal before it. True (and
        remembered) when the run follows on from what was delivered; False, with nothing
        changed, otherwise (then classify each signal)."""
        key = (peer, session)
        last = self._last.get(key, 0)
        if seqs[0] <= last or prev > last:
            return False
        self._remember(key, seqs[-1])
        return True

    def _remember(self, key: tuple[str, str], seq: int) -> None:
        self._last[key] = seq
        self._last.move_to_end(key)
        while len(self._last) > self._limit:
            self._last.popitem(last=False)


class ResendTimer:
    """When to resend unacknowledged signals if no other event (reconnect, peer joined) does.

    Armed when signals go out while none were waiting; any acknowledgement restarts the
    wait at ``first``; each resend it causes doubles the wait, up to ``maximum``.
    """

    def __init__(self, first: float = 5.0, maximum: float = 60.0) -> None:
        if first <= 0 or maximum < first:
            raise ValueError("need 0 < first <= maximum")
        self.first = first
        self.maximum = maximum
        self.interval = first
        self._since: float | None = None

    @property
    def deadline(self) -> float | None:
        return None if self._since is None else self._since + self.interval

    def wrote(self, now: float) -> None:
        """Signals were written; start waiting if no wait is running."""
        if self._since is None:
            self._since = now

    def acked(self, now: float, outstanding: bool) -> None:
        """Progress: wait ``first`` again (or stop if nothing is outstanding)."""
        self.interval = self.first
        self._since = now if outstanding else None

    def due(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    def fired(self, now: float) -> None:
        """A resend happened: the next one waits twice as long."""
        self.interval = min(self.maximum, self.interval * 2)
        self._since = now

    def reset(self, now: float, outstanding: bool) -> None:
        """A new connection or a rejoined peer: start over."""
        self.acked(now, outstanding)
