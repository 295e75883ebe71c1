"""The seed's connection manager API: an asyncio driver around ConnectionMachine.

The machine (machine.py) decides; this module does the I/O it asks for: calls on the core
(awaited if coroutines, run in a thread if plain calls of a blocking core), signals out
through ``signal_handler``, state callbacks, and one timer per manager in a Scheduler shared
by every manager on the loop. Every task it starts is owned, and cancelled and awaited by
``shutdown()``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from types import CoroutineType
from typing import Any

from . import signals
from .machine import (
    Action,
    AnswerOffer,
    ApplyAnswer,
    CancelRestart,
    ConnectionMachine,
    ConnectionMetrics,
    ConnectionState,
    ICERestartPolicy,
    NetworkChangeType,
    ReadStats,
    SendKeepalive,
    SetState,
    StartRestart,
)
from .scheduler import Scheduler, Timer, default_scheduler

__all__ = [
    "ConnectionMetrics",
    "ConnectionState",
    "ICERestartPolicy",
    "ManagerRegistry",
    "NetworkChangeType",
    "RESTART_ID",
    "TunnelConnectionManager",
    "calls_block",
    "default_registry",
    "get_connection_manager",
    "list_connection_managers",
    "register_connection_manager",
    "unregister_connection_manager",
]

logger = logging.getLogger(__name__)

StateCallback = Callable[[str, ConnectionState], Any]
SignalHandler = Callable[[signals.Signal], Any]
# withdraw(tube_id, kinds): drop this tube's queued signals of these kinds the peer has not
# acknowledged (the signaling client's discard). Optional.
SignalWithdraw = Callable[[str, frozenset[str]], Any]

# What the peer reports about its own end is information, never an event of ours: only the
# local core says our connection changed state, our channel closed or our network changed.
PEER_INFORMATION = frozenset({
    signals.CONNECTION_STATE_CHANGED, signals.NETWORK_CHANGE_DETECTED, signals.CHANNEL_CLOSED,
})
# A cancelled attempt's signals that must not reach the peer late.
ATTEMPT_SIGNALS = frozenset({signals.ICE_RESTART_OFFER, signals.ICE_CANDIDATE})

CONTRACT_METHODS = (
    "create_tube", "set_remote_description", "add_ice_candidate", "restart_ice",
    "get_connection_state", "get_connection_stats", "close_tube",
)
# The key the relay stamps on every signal it relays with the sender's peer id.
PEER_KEY = "peer"
# Extra signal key: a restart offer's attempt number, echoed in its answer, so a late answer
# to an abandoned offer is not applied to the next one. Peers that do not echo it still work.
RESTART_ID = "restart_id"
# How long shutdown waits for async state callbacks (TERMINATED's included) to finish.
CALLBACK_DRAIN_TIMEOUT = 5.0


def calls_block(tube_registry: Any) -> bool:
    """Whether the core's plain methods must run in a thread.

    A core with any coroutine method is asyncio-native (the aiortc core): its plain methods
    are quick and touch loop objects, so they must run on the loop. A core with only plain
    methods (the Rust core) may block in any of them. A core can say which with a
    ``blocking_calls`` attribute.
    """
    explicit = getattr(tube_registry, "blocking_calls", None)
    if explicit is not None:
        return bool(explicit)
    return not any(
        inspect.iscoroutinefunction(getattr(tube_registry, name, None))
        for name in CONTRACT_METHODS
    )


class TunnelConnectionManager:
    """Keeps one tube alive: state, ICE restarts with backoff, NAT keepalives.

    ``initiator`` is the impolite peer of perfect negotiation (its restart offer wins a
    glare). ``scheduler`` (default: the loop's shared one) also supplies the clock.
    ``signal_withdraw`` takes back an abandoned attempt's signals still queued for the peer.
    """

    __slots__ = (
        "tube_id", "conversation_id", "tube_registry", "signal_handler",
        "_machine", "_scheduler", "_time", "_timer", "_callbacks", "_tasks",
        "_restart_task", "_restart_seq", "_cb_queue", "_cb_task", "_in_thread",
        "_closed", "signal_withdraw", "__weakref__",
    )

    def __init__(
        self,
        tube_id: str,
        conversation_id: str,
        tube_registry: Any,
        signal_handler: SignalHandler | None,
        *,
        initiator: bool = True,
        policy: ICERestartPolicy | None = None,
        scheduler: Scheduler | None = None,
        signal_withdraw: SignalWithdraw | None = None,
    ) -> None:
        self.tube_id = tube_id
        self.signal_withdraw = signal_withdraw
        self.conversation_id = conversation_id
        self.tube_registry = tube_registry
        self.signal_handler = signal_handler
        self._scheduler = scheduler
        self._time: Callable[[], float] = (
            scheduler.time if scheduler is not None else time.monotonic)
        self._machine = ConnectionMachine(tube_id, self._time(), initiator=initiator,
                                          policy=policy)
        self._timer: Timer | None = None
        self._callbacks: list[StateCallback] = []
        self._tasks: set[asyncio.Task[Any]] | None = None
        self._restart_task: asyncio.Task[Any] | None = None
        self._restart_seq = 0
        self._cb_queue: deque[tuple[Awaitable[Any], StateCallback]] | None = None
        self._cb_task: asyncio.Task[None] | None = None
        self._in_thread = calls_block(tube_registry)
        self._closed = False
        self._rearm()  # a connect_timeout runs from the start

    def __repr__(self) -> str:
        return f"<TunnelConnectionManager {self.tube_id} {self.state}>"

    # -- the seed's API -------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._machine.state

    @property
    def initiator(self) -> bool:
        return self._machine.initiator

    @property
    def metrics(self) -> ConnectionMetrics:
        return self._machine.metrics

    @property
    def restart_policy(self) -> ICERestartPolicy:
        return self._machine.policy

    @restart_policy.setter
    def restart_policy(self, policy: ICERestartPolicy) -> None:
        self._machine.policy = policy
        self._rearm()

    @property
    def machine(self) -> ConnectionMachine:
        return self._machine

    def add_state_change_callback(self, callback: StateCallback) -> None:
        """``callback(tube_id, state)`` on every state change; sync or async."""
        self._callbacks.append(callback)

    def remove_state_change_callback(self, callback: StateCallback) -> None:
        self._callbacks.remove(callback)

    def update_activity(self) -> None:
        """Something arrived for this tube (call on every WebSocket message). O(1)."""
        self._machine.activity(self._time())

    async def handle_network_change(
        self, change_type: NetworkChangeType | str, data: Any = None
    ) -> None:
        """React to a network change; ``data`` may carry {"packet_loss_rate": x}."""
        change = NetworkChangeType(change_type)
        if self._closed:
            return
        loss = None
        if change is NetworkChangeType.QUALITY_DEGRADATION:
            loss = _loss_rate(data)
            if loss is None:
                loss = _loss_rate(await self._read_stats())
        logger.info("tube %s: network change: %s", self.tube_id, change.value)
        await self._feed(self._machine.network_change(change, self._time(), loss=loss))

    async def handle_signal(self, signal: signals.Signal, *, from_peer: bool | None = None) -> None:
        """Handle a signal for this tube, from the peer or from the core.

        ``from_peer`` None: a signal that came through the relay (it carries the relay's
        ``peer`` field) is the peer's. The peer's reports of its own state, channel or
        network are information only (see PEER_INFORMATION).

        Raises if the core rejects what the signal carries (a bad candidate or SDP), after
        the machine has been told, so the caller can report it to the peer.
        """
        result = self.handle_signal_nowait(signal, from_peer=from_peer)
        if result is not None:
            await result

    def handle_signal_nowait(
        self, signal: signals.Signal, *, from_peer: bool | None = None
    ) -> Awaitable[None] | None:
        """:meth:`handle_signal` without a coroutine of its own: does what needs no waiting
        now and returns what is left to await (the core's call), or None.

        For the signal router's hot path: a trickled candidate costs one call into the
        core and no coroutine here. Errors the core raises come out of the awaitable.
        """
        kind = signal.get("kind")
        self._machine.activity(self._time())  # something arrived for this tube
        if (kind == signals.ICE_CANDIDATE and not self._in_thread and not self._closed
                and signal.get("tube_id", self.tube_id) == self.tube_id):
            # The most frequent signal first: _on_candidate inline, no coroutine of our own.
            result = self.tube_registry.add_ice_candidate(self.tube_id, signal.get("data", ""))
            if type(result) is CoroutineType or inspect.isawaitable(result):
                return result  # type: ignore[no-any-return]
            return None
        if from_peer is None:
            from_peer = PEER_KEY in signal
        if from_peer and kind in PEER_INFORMATION:
            logger.info("tube %s: the peer reports %s %r", self.tube_id, kind,
                        signal.get("data", ""))
            return None
        if self._closed:
            logger.debug("tube %s: %s signal after shutdown ignored", self.tube_id, kind)
            return None
        tube_id = signal.get("tube_id")
        if tube_id and tube_id != self.tube_id:
            logger.warning("tube %s: signal for tube %s ignored", self.tube_id, tube_id)
            return None
        handler = _SIGNAL_HANDLERS.get(kind)  # type: ignore[arg-type]
        if handler is None:
            logger.info("tube %s: %r signal not handled by the manager; ignored",
                        self.tube_id, kind)
            return None
        return handler(self, signal)  # type: ignore[no-any-return]

    async def restart(self, *, manual: bool = True) -> bool:
        """Restart ICE now. Manual: resets the attempt count, allowed from FAILED.

        Not manual: a request under the policy (backoff, attempt limit). Returns whether a
        restart is in progress afterwards.
        """
        now = self._time()
        if manual:
            actions = self._machine.manual_restart(now)
        else:
            actions = self._machine.request_restart(now)
        await self._feed(actions)
        return self._machine.restart_in_progress

    async def shutdown(self) -> None:
        """Cancel every timer and task; state TERMINATED (callbacks fire once). Idempotent."""
        if self._closed:
            return
        actions = self._machine.shutdown(self._time())
        self._dispatch(actions)  # cancels the restart, fires TERMINATED
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        current = asyncio.current_task()
        tasks = [t for t in self._tasks or () if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._drain_callbacks(current)
        logger.debug("tube %s: manager shut down", self.tube_id)

    def snapshot(self) -> dict[str, Any]:
        """A plain dict for status displays; ages and waits in seconds."""
        now = self._time()
        machine = self._machine
        metrics = machine.metrics
        last_restart = metrics.last_restart_time
        return {
            "tube_id": self.tube_id,
            "conversation_id": self.conversation_id,
            "state": machine.state.value,
            "initiator": machine.initiator,
            "core_state": machine.core_state,
            "idle_seconds": max(now - metrics.last_activity, 0.0),  # since last activity
            "restart_attempts": metrics.ice_restart_attempts,
            "max_restart_attempts": machine.policy.max_restart_attempts,
            "restart_in_progress": machine.restart_in_progress,
            "restart_pending": machine.restart_pending,
            "next_restart_in": machine.next_restart_in(now),
            "last_restart_seconds_ago": None if last_restart is None else now - last_restart,
            "restarts_succeeded": metrics.restarts_succeeded,
            "restarts_failed": metrics.restarts_failed,
            "keepalives_sent": metrics.keepalives_sent,
        }

    # -- signals --------------------------------------------------------------------------

    async def _on_core_state(self, signal: signals.Signal) -> None:
        await self._feed(self._machine.core_state_changed(signal.get("data", ""), self._time()))

    async def _on_network_change(self, signal: signals.Signal) -> None:
        data = signal.get("data", "")
        try:
            change = NetworkChangeType(data)
        except ValueError:
            logger.info("tube %s: unknown network change %r, taken as an interface change",
                        self.tube_id, data)
            change = NetworkChangeType.INTERFACE_CHANGE
        await self.handle_network_change(change)

    async def _on_keepalive(self, signal: signals.Signal) -> None:
        """Activity only, already counted."""

    async def _on_candidate(self, signal: signals.Signal) -> None:
        await self._call("add_ice_candidate", self.tube_id, signal.get("data", ""))

    async def _on_answer(self, signal: signals.Signal) -> None:
        await self._feed(self._machine.initial_answer(self._time()))
        await self._call("set_remote_description", self.tube_id, signal.get("data", ""), True)

    async def _on_restart_offer(self, signal: signals.Signal) -> None:
        await self._feed(self._machine.peer_offer(
            signal.get("data", ""), self._time(), _restart_id(signal)))

    async def _on_restart_answer(self, signal: signals.Signal) -> None:
        await self._feed(self._machine.answer_received(
            signal.get("data", ""), self._time(), _restart_id(signal)))

    async def _on_channel_closed(self, signal: signals.Signal) -> None:
        await self._feed(self._machine.channel_closed(self._time(), signal.get("data", "")))

    async def _on_error(self, signal: signals.Signal) -> None:
        logger.warning("tube %s: the peer reported an error: %s",
                       self.tube_id, signal.get("data", ""))

    # -- carrying out actions -------------------------------------------------------------

    async def _feed(self, actions: list[Action]) -> None:
        """Carry out actions in order, awaiting their I/O; then re-arm the timer."""
        for action in actions:
            if not self._do_now(action):
                await self._io(action)
        self._rearm()

    def _dispatch(self, actions: list[Action]) -> None:
        """Carry out actions from a synchronous context: I/O goes to an owned task."""
        io = [action for action in actions if not self._do_now(action)]
        if io:
            self._spawn(self._feed(io), "io")

    def _do_now(self, action: Action) -> bool:
        """Carry out an action that needs no awaiting; False if it does."""
        if isinstance(action, SetState):
            self._notify(action.new)
        elif isinstance(action, StartRestart):
            task = self._spawn(self._run_restart(action.seq), f"restart-{action.seq}")
            if task is not None:
                self._restart_task, self._restart_seq = task, action.seq
        elif isinstance(action, CancelRestart):
            task = self._restart_task
            if (task is not None and self._restart_seq == action.seq and not task.done()
                    and task is not asyncio.current_task()):
                task.cancel()
            self._withdraw(ATTEMPT_SIGNALS)
        else:
            return False
        return True

    async def _io(self, action: Action) -> None:
        machine = self._machine
        if isinstance(action, ApplyAnswer):
            try:
                await self._call("set_remote_description", self.tube_id, action.sdp, True)
            except Exception as exc:
                await self._feed(machine.restart_error(
                    action.seq, self._time(), f"the core rejected the answer: {exc!r}"))
                raise
            await self._feed(machine.answer_applied(action.seq, self._time()))
        elif isinstance(action, AnswerOffer):
            await self._answer_offer(action)
        elif isinstance(action, ReadStats):
            stats = await self._read_stats()
            await self._feed(machine.stats_read(self._time(), _counters(stats)))
        elif isinstance(action, SendKeepalive):
            await self._send_keepalive()
        else:  # pragma: no cover - every action type is handled above
            raise TypeError(f"unknown action {action!r}")

    async def _answer_offer(self, action: AnswerOffer) -> None:
        machine = self._machine
        try:
            answer = await self._call("set_remote_description", self.tube_id, action.sdp, False)
        except Exception as exc:
            await self._feed(machine.peer_offer_failed(
                action.seq, self._time(), f"the core rejected the peer's offer: {exc!r}"))
            raise
        extra = {} if action.ref is None else {RESTART_ID: action.ref}
        signal = signals.make_signal(self.tube_id, self.conversation_id,
                                     signals.ICE_RESTART_ANSWER, answer or "", **extra)
        if await self._send(signal):
            await self._feed(machine.peer_offer_answered(action.seq, self._time()))
        else:
            await self._feed(machine.peer_offer_failed(
                action.seq, self._time(), "the answer could not be sent"))

    async def _run_restart(self, seq: int) -> None:
        """One attempt's I/O: a fresh offer from the core, out to the peer."""
        machine = self._machine
        try:
            offer = await self._call("restart_ice", self.tube_id)
            if not isinstance(offer, str) or not offer:
                raise TypeError(f"restart_ice returned {type(offer).__name__}, not an offer")
        except Exception as exc:
            if getattr(exc, "tube_replaced", False):
                # The core gave the tube up and the side replaces it (a core whose restart
                # cannot move a path): no failure to count; the tube is closing.
                logger.info("tube %s: %s", self.tube_id, exc)
                return
            logger.warning("tube %s: restart_ice failed: %r", self.tube_id, exc)
            await self._feed(machine.restart_error(seq, self._time(), f"restart_ice: {exc!r}"))
            return
        signal = signals.make_signal(self.tube_id, self.conversation_id,
                                     signals.ICE_RESTART_OFFER, offer, **{RESTART_ID: seq})
        if await self._send(signal):
            await self._feed(machine.offer_sent(seq, self._time()))
        else:
            await self._feed(machine.restart_error(seq, self._time(),
                                                   "the offer could not be sent"))

    def _withdraw(self, kinds: frozenset[str]) -> None:
        if self.signal_withdraw is None:
            return
        try:
            self.signal_withdraw(self.tube_id, kinds)
        except Exception:
            logger.exception("tube %s: withdrawing queued signals failed", self.tube_id)

    async def _send_keepalive(self) -> None:
        if getattr(self.tube_registry, "send_keepalive", None) is None:
            logger.debug("tube %s: the core cannot send keepalives", self.tube_id)
            return
        try:
            await self._call("send_keepalive", self.tube_id)
        except Exception as exc:
            logger.warning("tube %s: keepalive failed: %r", self.tube_id, exc)
            return
        self._machine.metrics.keepalives_sent += 1

    async def _read_stats(self) -> dict[str, Any] | None:
        try:
            stats = await self._call("get_connection_stats", self.tube_id)
        except Exception as exc:
            logger.warning("tube %s: cannot read connection stats: %r", self.tube_id, exc)
            return None
        return stats if isinstance(stats, dict) else None

    async def _call(self, name: str, *args: Any) -> Any:
        """Call a core method: awaited if a coroutine, in a thread if the core blocks."""
        method = getattr(self.tube_registry, name)
        if self._in_thread:
            result = await asyncio.to_thread(method, *args)
        else:
            result = method(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _send(self, signal: signals.Signal) -> bool:
        """Give a signal to signal_handler; a handler that raises is logged, never fatal."""
        if self.signal_handler is None:
            logger.warning("tube %s: no signal handler for %s", self.tube_id, signal["kind"])
            return False
        try:
            result = self.signal_handler(signal)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("tube %s: signal handler failed on %s", self.tube_id, signal["kind"])
            return False
        return True

    # -- callbacks ------------------------------------------------------------------------

    def _notify(self, state: ConnectionState) -> None:
        """Call each callback once, in order; async ones run in order in one owned task."""
        for callback in tuple(self._callbacks):
            try:
                result = callback(self.tube_id, state)
            except Exception:
                logger.exception("tube %s: state callback %r failed on %s",
                                 self.tube_id, callback, state)
                continue
            if inspect.isawaitable(result):
                if self._cb_queue is None:
                    self._cb_queue = deque()
                self._cb_queue.append((result, callback))
                if self._cb_task is None or self._cb_task.done():
                    self._cb_task = asyncio.create_task(
                        self._run_callbacks(), name=f"tether-callbacks-{self.tube_id}")

    async def _run_callbacks(self) -> None:
        queue = self._cb_queue
        while queue:
            awaitable, callback = queue.popleft()
            try:
                await awaitable
            except Exception:
                logger.exception("tube %s: state callback %r failed", self.tube_id, callback)

    async def _drain_callbacks(self, current: asyncio.Task[Any] | None) -> None:
        runner = self._cb_task
        if runner is None or runner is current or runner.done():
            return
        try:
            async with asyncio.timeout(CALLBACK_DRAIN_TIMEOUT):
                await asyncio.shield(runner)
        except TimeoutError:
            logger.warning("tube %s: state callbacks still running after %g s; cancelled",
                           self.tube_id, CALLBACK_DRAIN_TIMEOUT)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            while self._cb_queue:
                awaitable, _ = self._cb_queue.popleft()
                if inspect.iscoroutine(awaitable):
                    awaitable.close()

    # -- timer and tasks ------------------------------------------------------------------

    def _rearm(self) -> None:
        """Make sure the timer fires no later than the machine's deadline.

        An earlier timer is kept: firing early is harmless and saves heap churn.
        """
        if self._closed:
            return
        when = self._machine.deadline
        if when is None:
            return
        timer = self._timer
        if timer is not None:
            if timer.when <= when:
                return
            timer.cancel()
        if self._scheduler is None:
            try:
                self._scheduler = default_scheduler()
            except RuntimeError:  # no loop running yet: the first event will arm it
                return
        self._timer = self._scheduler.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._dispatch(self._machine.timer(self._time()))
        self._rearm()

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any] | None:
        if self._closed:
            coro.close()
            return None
        if self._tasks is None:
            self._tasks = set()
        task = asyncio.create_task(coro, name=f"tether-{what}-{self.tube_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("tube %s: %s failed", self.tube_id, task.get_name(),
                         exc_info=task.exception())

    @property
    def task_count(self) -> int:
        """Tasks this manager owns right now (0 when idle: it sleeps in the scheduler)."""
        owned = len(self._tasks) if self._tasks else 0
        return owned + (1 if self._cb_task is not None and not self._cb_task.done() else 0)


_SIGNAL_HANDLERS: dict[
    str, Callable[[TunnelConnectionManager, signals.Signal], Awaitable[None]]
] = {
    signals.CONNECTION_STATE_CHANGED: TunnelConnectionManager._on_core_state,
    signals.NETWORK_CHANGE_DETECTED: TunnelConnectionManager._on_network_change,
    signals.KEEPALIVE: TunnelConnectionManager._on_keepalive,
    signals.ICE_CANDIDATE: TunnelConnectionManager._on_candidate,
    signals.ANSWER: TunnelConnectionManager._on_answer,
    signals.ICE_RESTART_OFFER: TunnelConnectionManager._on_restart_offer,
    signals.ICE_RESTART_ANSWER: TunnelConnectionManager._on_restart_answer,
    signals.CHANNEL_CLOSED: TunnelConnectionManager._on_channel_closed,
    signals.ERROR: TunnelConnectionManager._on_error,
}


def _restart_id(signal: signals.Signal) -> int | None:
    value = signal.get(RESTART_ID)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _loss_rate(data: Any) -> float | None:
    if isinstance(data, dict):
        value = data.get("packet_loss_rate")
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _counters(stats: dict[str, Any] | None) -> tuple[int, int] | None:
    if stats is None:
        return None
    try:
        return int(stats.get("bytes_sent") or 0), int(stats.get("bytes_received") or 0)
    except (TypeError, ValueError):
        return None


class ManagerRegistry:
    """Managers by tube id. Programs may keep their own instead of the default one."""

    def __init__(self) -> None:
        self._managers: dict[str, TunnelConnectionManager] = {}

    def register(self, manager: TunnelConnectionManager) -> None:
        existing = self._managers.get(manager.tube_id)
        if existing is not None and existing is not manager:
            raise ValueError(f"tube {manager.tube_id}: another manager is registered")
        self._managers[manager.tube_id] = manager

    def get(self, tube_id: str) -> TunnelConnectionManager | None:
        return self._managers.get(tube_id)

    async def unregister(self, tube_id: str) -> TunnelConnectionManager | None:
        """Remove the tube's manager and shut it down; returns it (None if there was none)."""
        manager = self._managers.pop(tube_id, None)
        if manager is not None:
            await manager.shutdown()
        return manager

    def list(self) -> list[TunnelConnectionManager]:
        return list(self._managers.values())

    async def close(self) -> None:
        """Unregister (and shut down) every manager."""
        for tube_id in list(self._managers):
            await self.unregister(tube_id)

    def __len__(self) -> int:
        return len(self._managers)

    def __contains__(self, tube_id: object) -> bool:
        return tube_id in self._managers

    def __iter__(self) -> Iterator[TunnelConnectionManager]:
        return iter(list(self._managers.values()))


default_registry = ManagerRegistry()


def register_connection_manager(manager: TunnelConnectionManager) -> None:
    """Add ``manager`` to the process-wide registry, under its ``tube_id``.

    Registering the same manager again is a no-op; another manager under a tube id
    already in use raises ValueError (unregister the old one first).
    """
    default_registry.register(manager)


def get_connection_manager(tube_id: str) -> TunnelConnectionManager | None:
    """The registered manager of tube ``tube_id``, or None if there is none."""
    return default_registry.get(tube_id)


async def unregister_connection_manager(tube_id: str) -> TunnelConnectionManager | None:
    """Remove tube ``tube_id``'s manager from the registry and shut it down (awaited); return
    it, or None if none was registered."""
    return await default_registry.unregister(tube_id)


def list_connection_managers() -> list[TunnelConnectionManager]:
    """Every registered manager (a copy: safe to iterate while tubes come and go)."""
    return default_registry.list()
