"""Routes signals arriving from the peer (over WebSocket) to the manager of their tube.

This is the seed's WebSocket message handler: every signal reaches the manager named by its
tube_id, and every one counts as activity for that tube. A candidate for a tube that does
not exist yet (it outran its offer) is held, bounded, and replayed when the tube appears.

Any other signal for a tube this side does not know means the peer still talks about a tube
that is gone here: we restarted, or closed it. That is answered at once with a typed
``channel_closed`` (``reason: "unknown_tube"``), so the peer closes its end and offers a new
tube instead of waiting for restarts that cannot succeed. What cannot be held is answered
the same way, never dropped silently; errors and closings are never answered.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any

from . import signals

logger = logging.getLogger(__name__)

# The extra key of a channel_closed signal that says why, and its value for a tube the
# sender does not know.
CLOSE_REASON = "reason"
UNKNOWN_TUBE = "unknown_tube"
# Kinds that may arrive before the signal that creates their tube.
EARLY_KINDS = frozenset({signals.ICE_CANDIDATE})

Reply = Callable[[signals.Signal], Awaitable[None]]
# Returns True when it took the signal (e.g. an offer that creates a tube).
UnknownTubeHandler = Callable[[signals.Signal], Awaitable[bool]]


@dataclass
class _Held:
    since: float
    signals: list[signals.Signal] = field(default_factory=list)


class SignalRouter:
    """Deliver peer signals to managers, holding early ones for tubes not yet created.

    ``managers`` is a manager registry (get(tube_id) -> manager or None). ``reply`` sends an
    error signal back to the peer. Holding is bounded: ``max_tubes`` unknown tubes, each
    with at most ``max_per_tube`` signals, for at most ``hold_seconds``.
    """

    def __init__(
        self,
        managers: Any,
        *,
        reply: Reply,
        on_unknown_tube: UnknownTubeHandler | None = None,
        max_tubes: int = 64,
        max_per_tube: int = 64,
        hold_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.managers = managers
        self._reply = reply
        self._on_unknown_tube = on_unknown_tube
        self._max_tubes = max_tubes
        self._max_per_tube = max_per_tube
        self._hold_seconds = hold_seconds
        self._clock = clock
        self._held: dict[str, _Held] = {}

    @property
    def held_count(self) -> int:
        return sum(len(h.signals) for h in self._held.values())

    async def route(self, signal: signals.Signal) -> None:
        """Handle one signal from the peer (the signaling client's on_signal)."""
        tube_id = signal.get("tube_id", "")
        manager = self.managers.get(tube_id)
        if manager is not None:
            # The hot path, inline (no coroutine of its own): see _deliver.
            manager.update_activity()
            try:
                nowait = getattr(manager, "handle_signal_nowait", None)
                result = (manager.handle_signal(signal) if nowait is None
                          else nowait(signal))
                if result is not None and (
                        type(result) is CoroutineType or inspect.isawaitable(result)):
                    await result
            except Exception as exc:
                await self._failed(signal, exc)
            return
        await self._route_unknown(signal, tube_id)

    def route_nowait(self, signal: signals.Signal) -> Awaitable[None] | None:
        """:meth:`route` without a coroutine of its own on the hot path: returns None when
        the signal was handled, else what is left to await (usable as the signaling
        client's ``on_signal``, which awaits only what is awaitable).

        A signal for a known tube whose manager has ``handle_signal_nowait`` costs no
        coroutine here unless the manager hands back the core's call (then one, which
        reports the core's errors as :meth:`route` does).
        """
        tube_id = signal.get("tube_id", "")
        manager = self.managers.get(tube_id)
        if manager is None:
            return self._route_unknown(signal, tube_id)
        nowait = getattr(manager, "handle_signal_nowait", None)
        if nowait is None:
            return self._deliver(manager, signal)
        try:  # records the activity itself
            result = nowait(signal)
        except Exception as exc:
            return self._failed(signal, exc)
        if result is None:
            return None
        return self._finish(signal, result)

    async def _finish(self, signal: signals.Signal, result: Awaitable[None]) -> None:
        try:
            await result
        except Exception as exc:
            await self._failed(signal, exc)

    async def _route_unknown(self, signal: signals.Signal, tube_id: str) -> None:
        kind = signal.get("kind")
        if kind == signals.ERROR:
            logger.warning("peer or relay reported an error%s: %s",
                           f" for tube {tube_id}" if tube_id else "", signal.get("data"))
            return
        if self._on_unknown_tube is not None and await self._on_unknown_tube(signal):
            await self.tube_added(tube_id)
            return
        if kind in EARLY_KINDS:
            await self._hold(signal)
        elif kind not in (signals.ERROR, signals.CHANNEL_CLOSED, signals.OFFER):
            logger.info("tube %s: %s for a tube we do not know; telling the peer",
                        tube_id, kind)
            await self._unknown(signal, f"unknown tube {tube_id}")

    async def tube_added(self, tube_id: str) -> None:
        """Replay what was held for ``tube_id`` now that its manager is registered."""
        held = self._held.pop(tube_id, None)
        manager = self.managers.get(tube_id)
        if held is None or manager is None:
            return
        logger.debug("tube %s: replaying %d held signals", tube_id, len(held.signals))
        for signal in held.signals:
            await self._deliver(manager, signal)

    async def _deliver(self, manager: Any, signal: signals.Signal) -> None:
        manager.update_activity()
        try:
            result = manager.handle_signal(signal)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            await self._failed(signal, exc)

    async def _failed(self, signal: signals.Signal, exc: Exception) -> None:
        logger.error("tube %s: %s signal failed", signal["tube_id"], signal["kind"],
                     exc_info=exc)
        await self._error(signal, f"{signal['kind']} failed: {exc}")

    async def _hold(self, signal: signals.Signal) -> None:
        tube_id = signal["tube_id"]
        await self._expire()
        held = self._held.get(tube_id)
        if held is None:
            if len(self._held) >= self._max_tubes:
                await self._unknown(signal, f"unknown tube {tube_id}: too many unknown "
                                            "tubes held")
                return
            held = self._held[tube_id] = _Held(since=self._clock())
        if len(held.signals) >= self._max_per_tube:
            await self._error(signal, f"unknown tube {tube_id}: more than "
                                      f"{self._max_per_tube} signals held")
            return
        logger.debug("tube %s: holding %s until the tube exists", tube_id, signal["kind"])
        held.signals.append(signal)

    async def _expire(self) -> None:
        deadline = self._clock() - self._hold_seconds
        for tube_id in [t for t, h in self._held.items() if h.since < deadline]:
            held = self._held.pop(tube_id)
            logger.warning("tube %s: never appeared; %d held signals discarded",
                           tube_id, len(held.signals))
            await self._unknown(held.signals[0], f"unknown tube {tube_id}: "
                                f"{len(held.signals)} signals discarded after "
                                f"{self._hold_seconds:g} s")

    async def _unknown(self, about: signals.Signal, message: str) -> None:
        """Tell the peer this side has no such tube (typed: it closes its end)."""
        reply = signals.make_signal(about.get("tube_id", ""), about.get("conversation_id", ""),
                                    signals.CHANNEL_CLOSED, message,
                                    **{CLOSE_REASON: UNKNOWN_TUBE})
        try:
            await self._reply(reply)
        except Exception:
            logger.exception("could not send the unknown-tube reply: %s", message)

    async def _error(self, about: signals.Signal, message: str) -> None:
        if about.get("kind") == signals.ERROR:
            return  # never answer an error with an error
        reply = signals.make_signal(about.get("tube_id", ""), about.get("conversation_id", ""),
                                    signals.ERROR, message)
        try:
            await self._reply(reply)
        except Exception:
            logger.exception("could not send error reply: %s", message)
