"""The asyncio driver: rules through a fake core and a manual clock, then real aiortc tubes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from tether import connection_manager as cm
from tether.connection_manager import (
    ConnectionState,
    ICERestartPolicy,
    ManagerRegistry,
    NetworkChangeType,
    TunnelConnectionManager,
    calls_block,
    get_connection_manager,
    register_connection_manager,
    unregister_connection_manager,
)
from tether.scheduler import LoopScheduler, ManualScheduler, default_scheduler
from tether.signals import make_signal

S = ConnectionState
IP = NetworkChangeType.IP_ADDRESS_CHANGE
BLIND = NetworkChangeType.ICE_FAILURE  # no known cause: under the backoff rules
TUBE = "tube-1"


class FakeCore:
    """An asyncio-native core (Contract 2) that records calls and answers at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.restart_error: Exception | None = None
        self.restart_gate: asyncio.Event | None = None  # restart_ice waits on it if set
        self.restart_cancelled = 0
        self.reject_sdp = False
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "packet_loss_rate": 0.0,
                      "rtt_ms": 1.0}
        self.keepalives = 0

    async def create_tube(self, conversation_id, settings, trickle_ice=True, offer=None,
                          signal_callback=None, tube_id=None):
        return {"tube_id": tube_id or TUBE, "offer": "T0ZGRVI="}

    async def set_remote_description(self, tube_id, sdp, is_answer=False):
        self.calls.append(("set_remote_description", sdp, is_answer))
        if self.reject_sdp:
            raise ValueError("SDP is not valid base64 text")
        return None if is_answer else f"answer-to-{sdp}"

    async def add_ice_candidate(self, tube_id, candidate):
        self.calls.append(("add_ice_candidate", candidate))
        if candidate == "bad":
            raise ValueError("bad ICE candidate")

    async def restart_ice(self, tube_id):
        self.calls.append(("restart_ice",))
        if self.restart_gate is not None:
            try:
                await self.restart_gate.wait()
            except asyncio.CancelledError:
                self.restart_cancelled += 1
                raise
        if self.restart_error is not None:
            raise self.restart_error
        return f"offer-{len(self.restarts)}"

    def get_connection_state(self, tube_id):
        return "connected"

    def get_connection_stats(self, tube_id):
        self.calls.append(("get_connection_stats",))
        return dict(self.stats)

    async def close_tube(self, tube_id, reason=None):
        self.calls.append(("close_tube", reason))

    def send_keepalive(self, tube_id):
        self.keepalives += 1

    @property
    def restarts(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == "restart_ice"]


class Outbox(list):
    """A signal_handler that keeps what it is given."""

    def __call__(self, signal):
        self.append(signal)

    def kinds(self) -> list[str]:
        return [s["kind"] for s in self]


async def settle(rounds: int = 20) -> None:
    """Let spawned tasks run (no real time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def sig(kind: str, data: str = "", **extra) -> dict[str, Any]:
    return make_signal(TUBE, "conv", kind, data, **extra)


@pytest.fixture
def clock() -> ManualScheduler:
    return ManualScheduler(start=1000.0)


@pytest.fixture
def core() -> FakeCore:
    return FakeCore()


@pytest.fixture
def outbox() -> Outbox:
    return Outbox()


@pytest.fixture
async def make(clock, core, outbox):
    made: list[TunnelConnectionManager] = []

    def factory(**kwargs) -> TunnelConnectionManager:
        kwargs.setdefault("scheduler", clock)
        manager = TunnelConnectionManager(kwargs.pop("tube_id", TUBE), "conv",
                                          kwargs.pop("core", core),
                                          kwargs.pop("handler", outbox), **kwargs)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        await manager.shutdown()


async def connect(manager: TunnelConnectionManager) -> None:
    for state in ("connecting", "connected"):
        await manager.handle_signal(make_signal(manager.tube_id, "conv",
                                                "connection_state_changed", state))
    await settle()
    assert manager.state is S.CONNECTED


# -- states and callbacks ------------------------------------------------------------------


async def test_callbacks_fire_once_each_in_order_and_a_raising_one_harms_nothing(make):
    manager = make()
    calls: list[tuple[str, ConnectionState]] = []

    def first(tube_id, state):
        assert tube_id == TUBE
        calls.append(("first", state))

    async def second(tube_id, state):
        await asyncio.sleep(0)
        calls.append(("second", state))

    def broken(tube_id, state):
        calls.append(("broken", state))
        raise RuntimeError("callback bug")

    async def broken_async(tube_id, state):
        raise RuntimeError("async callback bug")

    def last(tube_id, state):
        calls.append(("last", state))

    for callback in (first, second, broken, broken_async, last):
        manager.add_state_change_callback(callback)
    await connect(manager)
    # Sync callbacks run as the state changes; the async one's body after, in its own order.
    sync_calls = [c for c in calls if c[0] != "second"]
    assert sync_calls == [("first", S.CONNECTING), ("broken", S.CONNECTING),
                          ("last", S.CONNECTING), ("first", S.CONNECTED),
                          ("broken", S.CONNECTED), ("last", S.CONNECTED)]
    assert [c for c in calls if c[0] == "second"] == [("second", S.CONNECTING),
                                                      ("second", S.CONNECTED)]
    await manager.shutdown()
    assert calls.count(("first", S.TERMINATED)) == 1
    assert calls.count(("second", S.TERMINATED)) == 1  # shutdown awaited the async one
    await manager.shutdown()
    assert calls.count(("first", S.TERMINATED)) == 1


async def test_initial_signals_reach_the_core(make, core):
    manager = make()
    await manager.handle_signal(sig("answer", "QU5TV0VS"))
    assert manager.state is S.CONNECTING
    await manager.handle_signal(sig("icecandidate", "candidate:1 1 udp 1 127.0.0.1 5000 typ host"))
    await manager.handle_signal(sig("icecandidate", ""))
    assert core.calls == [("set_remote_description", "QU5TV0VS", True),
                          ("add_ice_candidate", "candidate:1 1 udp 1 127.0.0.1 5000 typ host"),
                          ("add_ice_candidate", "")]
    # What the core rejects raises, so the router can tell the peer.
    with pytest.raises(ValueError, match="bad ICE candidate"):
        await manager.handle_signal(sig("icecandidate", "bad"))


async def test_signal_kinds(make, core, clock):
    manager = make()
    await connect(manager)
    clock.advance(50.0)
    await manager.handle_signal(sig("keepalive"))
    assert manager.metrics.last_activity == clock.now  # every handled signal is activity
    await manager.handle_signal(sig("error", "something broke"))
    await manager.handle_signal({"tube_id": TUBE, "kind": "bogus", "data": ""})
    await manager.handle_signal(make_signal("other-tube", "conv", "channel_closed"))
    assert manager.state is S.CONNECTED
    await manager.handle_signal(sig("network_change_detected", "no-such-change"))
    await settle()
    assert len(core.restarts) == 1  # taken as an interface change
    await manager.handle_signal(sig("channel_closed", "tunnel channel closed"))
    assert manager.state is S.FAILED


async def test_core_closed_means_failed_unless_we_shut_down(make):
    manager = make()
    await connect(manager)
    await manager.handle_signal(sig("connection_state_changed", "closed"))
    assert manager.state is S.FAILED
    other = make(tube_id="tube-2")
    await connect(other)
    await other.shutdown()
    await other.handle_signal(make_signal("tube-2", "conv", "connection_state_changed", "closed"))
    assert other.state is S.TERMINATED


# -- restarts ------------------------------------------------------------------------------


async def test_restart_offer_answer_connected(make, core, outbox):
    manager = make()
    states: list[ConnectionState] = []
    manager.add_state_change_callback(lambda tube_id, state: states.append(state))
    await connect(manager)
    await manager.handle_network_change(NetworkChangeType.INTERFACE_CHANGE)
    await settle()
    assert manager.state is S.RECONNECTING
    (offer,) = [s for s in outbox if s["kind"] == "ice_restart_offer"]
    assert offer["data"] == "offer-1" and offer["restart_id"] == 1
    assert offer["tube_id"] == TUBE and offer["conversation_id"] == "conv"
    await manager.handle_signal(sig("ice_restart_answer", "ANSWER", restart_id=1))
    assert ("set_remote_description", "ANSWER", True) in core.calls
    assert manager.state is S.RECONNECTING  # until the core says connected
    await manager.handle_signal(sig("connection_state_changed", "connected"))
    assert manager.state is S.CONNECTED
    assert states == [S.CONNECTING, S.CONNECTED, S.RECONNECTING, S.CONNECTED]
    assert manager.metrics.restarts_succeeded == 1
    assert manager.metrics.ice_restart_attempts == 1
    assert manager.metrics.last_restart_time is not None


async def test_five_changes_in_a_second_make_one_restart(make, core, outbox, clock):
    manager = make()
    await connect(manager)
    for _ in range(5):
        await manager.handle_network_change(IP)
        clock.advance(0.2)
    await settle()
    assert len(core.restarts) == 1
    assert outbox.kinds().count("ice_restart_offer") == 1


async def test_backoff_runs_on_the_shared_timer(make, core, clock):
    core.restart_error = RuntimeError("no ICE restart here")
    manager = make(policy=ICERestartPolicy(max_restart_attempts=4))
    await connect(manager)
    start = clock.now
    await manager.handle_network_change(IP)
    await settle()
    seen = [len(core.restarts)]
    for wait in (4.9, 0.1, 9.9, 0.1, 19.9, 0.1):
        clock.advance(wait)
        await settle()
        seen.append(len(core.restarts))
    assert seen == [1, 1, 2, 2, 3, 3, 4]
    assert clock.now - start == pytest.approx(35.0)
    # The fourth failure used up the policy.
    assert manager.state is S.FAILED
    assert manager.metrics.restarts_failed == 4
    assert manager.snapshot()["next_restart_in"] is None
    # A manual restart from FAILED resets the count and runs at once.
    core.restart_error = None
    assert await manager.restart(manual=True)
    await settle()
    assert len(core.restarts) == 5 and manager.state is S.RECONNECTING
    assert manager.metrics.ice_restart_attempts == 1


class _Replaced(RuntimeError):
    tube_replaced = True


async def test_a_core_that_replaces_the_tube_is_not_a_failed_restart(make, core, outbox,
                                                                        caplog):
    # The Rust core gives a tube up instead of restarting it (the side makes a new one):
    # no failure counted, no offer sent, nothing logged above INFO.
    core.restart_error = _Replaced("replacing the tube")
    manager = make()
    await connect(manager)
    with caplog.at_level(logging.INFO, logger="tether"):
        await manager.handle_network_change(IP)
        await settle()
    assert len(core.restarts) == 1
    assert manager.metrics.restarts_failed == 0
    assert "ice_restart_offer" not in outbox.kinds()
    assert "replacing the tube" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_answer_timeout_then_next_attempt(make, core, clock, outbox):
    manager = make()
    await connect(manager)
    await manager.handle_network_change(IP)
    await settle()
    clock.advance(14.9)
    await settle()
    assert len(core.restarts) == 1
    clock.advance(0.1)  # 15 s without an answer: failed; attempt 2 allowed since 5 s
    await settle()
    assert len(core.restarts) == 2
    assert manager.metrics.restarts_failed == 1
    # The late answer to attempt 1 is not applied to attempt 2's offer.
    await manager.handle_signal(sig("ice_restart_answer", "LATE", restart_id=1))
    assert ("set_remote_description", "LATE", True) not in core.calls


async def test_change_during_backoff_runs_when_it_ends(make, core, clock):
    manager = make()
    await connect(manager)
    await manager.handle_network_change(IP)
    await settle()
    await manager.handle_signal(sig("ice_restart_answer", "A"))
    await manager.handle_signal(sig("connection_state_changed", "connected"))
    clock.advance(2.0)
    await manager.handle_network_change(BLIND)
    assert manager.state is S.DEGRADED
    assert manager.snapshot()["next_restart_in"] == pytest.approx(3.0)
    clock.advance(2.9)
    await settle()
    assert len(core.restarts) == 1
    clock.advance(0.1)
    await settle()
    assert len(core.restarts) == 2 and manager.state is S.RECONNECTING


async def test_glare_initiator_ignores_non_initiator_answers(make, core, outbox):
    core.restart_gate = asyncio.Event()  # our restart_ice is still running
    impolite = make(initiator=True)
    await connect(impolite)
    await impolite.handle_network_change(IP)
    await settle()
    await impolite.handle_signal(sig("ice_restart_offer", "PEER", restart_id=7))
    assert ("set_remote_description", "PEER", False) not in core.calls
    assert impolite.metrics.glare_ignored == 1
    await impolite.shutdown()

    polite_core, polite_out = FakeCore(), Outbox()
    polite_core.restart_gate = asyncio.Event()
    polite = make(initiator=False, core=polite_core, handler=polite_out, tube_id=TUBE)
    await connect(polite)
    await polite.handle_network_change(IP)
    await settle()
    await polite.handle_signal(sig("ice_restart_offer", "PEER", restart_id=7))
    await settle()
    assert polite_core.restart_cancelled == 1  # our own attempt was abandoned
    assert ("set_remote_description", "PEER", False) in polite_core.calls
    (answer,) = [s for s in polite_out if s["kind"] == "ice_restart_answer"]
    assert answer["data"] == "answer-to-PEER" and answer["restart_id"] == 7
    assert polite.state is S.RECONNECTING
    await polite.handle_signal(sig("connection_state_changed", "connected"))
    assert polite.state is S.CONNECTED
    assert polite.metrics.restarts_failed == 0 and polite.metrics.ice_restart_attempts == 0


async def test_bad_restart_answer_fails_the_attempt_and_raises(make, core):
    manager = make()
    await connect(manager)
    await manager.handle_network_change(IP)
    await settle()
    core.reject_sdp = True
    with pytest.raises(ValueError):
        await manager.handle_signal(sig("ice_restart_answer", "garbage"))
    assert manager.metrics.restarts_failed == 1
    assert manager.state is S.RECONNECTING  # the next attempt waits for its backoff


async def test_a_signal_handler_that_raises_fails_only_that_attempt(make, core, clock):
    def broken_handler(signal):
        raise ConnectionError("relay down")

    manager = make(handler=broken_handler)
    await connect(manager)
    await manager.handle_network_change(IP)
    await settle()
    assert manager.metrics.restarts_failed == 1
    clock.advance(5.0)
    await settle()
    assert len(core.restarts) == 2  # retried on schedule
    assert manager.state is S.RECONNECTING


async def test_timeout_rule(make, core, clock):
    manager = make()
    await connect(manager)
    clock.advance(20.0)
    manager.update_activity()
    clock.advance(29.0)
    await manager.handle_network_change(NetworkChangeType.CONNECTION_TIMEOUT)
    await settle()
    assert core.restarts == []
    clock.advance(1.0)
    await manager.handle_network_change(NetworkChangeType.CONNECTION_TIMEOUT)
    await settle()
    assert len(core.restarts) == 1


async def test_quality_rule_uses_given_loss_or_reads_the_core(make, core):
    manager = make()
    await connect(manager)
    await manager.handle_network_change(NetworkChangeType.QUALITY_DEGRADATION,
                                        {"packet_loss_rate": 0.01})
    core.stats["packet_loss_rate"] = 0.01
    await manager.handle_network_change(NetworkChangeType.QUALITY_DEGRADATION)
    await settle()
    assert core.restarts == []
    core.stats["packet_loss_rate"] = 0.2
    await manager.handle_network_change("quality_degraded")
    await settle()
    assert len(core.restarts) == 1


async def test_disconnect_grace(make, core, clock):
    manager = make(policy=ICERestartPolicy(disconnected_grace=3.0))
    await connect(manager)
    await manager.handle_signal(sig("connection_state_changed", "disconnected"))
    assert manager.state is S.DEGRADED
    clock.advance(2.9)
    await settle()
    assert core.restarts == []
    clock.advance(0.1)
    await settle()
    assert len(core.restarts) == 1


async def test_connect_timeout_runs_without_any_event(make, clock):
    manager = make(policy=ICERestartPolicy(connect_timeout=20.0))
    clock.advance(19.9)
    assert manager.state is S.INITIALIZING
    clock.advance(0.1)
    assert manager.state is S.FAILED


def test_a_manager_can_be_made_outside_a_loop(core, outbox):
    manager = TunnelConnectionManager(TUBE, "conv", core, outbox,
                                      policy=ICERestartPolicy(connect_timeout=5.0))
    manager.update_activity()
    manager.restart_policy = ICERestartPolicy(connect_timeout=1.0)
    assert manager.state is S.INITIALIZING and manager.task_count == 0


# -- keepalive -----------------------------------------------------------------------------


async def test_keepalive_when_idle_postponed_by_activity_and_data(make, core, clock):
    manager = make()
    await connect(manager)
    clock.advance(299.0)
    await settle()
    assert core.keepalives == 0
    clock.advance(1.0)
    await settle()
    assert core.keepalives == 1 and manager.metrics.keepalives_sent == 1
    clock.advance(100.0)
    manager.update_activity()  # a WebSocket message at +400
    clock.advance(299.0)
    await settle()
    assert core.keepalives == 1
    clock.advance(1.0)  # +700: 300 s after the last activity
    await settle()
    assert core.keepalives == 2
    # Bytes on the tube are activity too.
    clock.advance(300.0)
    await settle()
    assert core.keepalives == 3
    clock.advance(100.0)
    core.stats["bytes_received"] += 5000
    clock.advance(200.0)
    await settle()
    assert core.keepalives == 3
    clock.advance(300.0)
    await settle()
    assert core.keepalives == 4


async def test_replacing_the_policy_rearms_the_timer(make, core, clock):
    manager = make()
    await connect(manager)
    manager.restart_policy = ICERestartPolicy(keepalive_interval=10.0)
    clock.advance(10.0)
    await settle()
    assert core.keepalives == 1


async def test_a_core_without_send_keepalive_is_fine(make, clock):
    class Plain(FakeCore):
        send_keepalive = None

    manager = make(core=Plain())
    await connect(manager)
    clock.advance(300.0)
    await settle()
    assert manager.metrics.keepalives_sent == 0


# -- shutdown, registry, scale -----------------------------------------------------------


async def test_shutdown_cancels_tasks_and_timers_and_fires_terminated_once(make, core, clock):
    core.restart_gate = asyncio.Event()  # restart_ice never returns
    manager = make()
    terminated: list[str] = []

    async def on_state(tube_id, state):
        if state is S.TERMINATED:
            terminated.append(tube_id)

    manager.add_state_change_callback(on_state)
    await connect(manager)
    before = len(asyncio.all_tasks())
    await manager.handle_network_change(IP)
    await settle()
    assert manager.task_count == 1 and len(asyncio.all_tasks()) == before + 1
    assert len(clock) == 1
    await asyncio.gather(manager.shutdown(), manager.shutdown())
    assert terminated == [TUBE]
    assert manager.state is S.TERMINATED
    assert core.restart_cancelled == 1
    assert manager.task_count == 0 and len(asyncio.all_tasks()) == before
    assert len(clock) == 0
    # Nothing after shutdown wakes it up.
    await manager.handle_signal(sig("connection_state_changed", "connected"))
    await manager.handle_network_change(IP)
    manager.update_activity()
    assert clock.advance(10_000.0) == 0
    assert manager.state is S.TERMINATED and terminated == [TUBE]


async def test_shutdown_cancels_io_started_by_the_timer(make, clock):
    class SlowStats(FakeCore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()
            self.gate.set()
            self.cancelled = 0

        async def get_connection_stats(self, tube_id):
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return dict(self.stats)

    core = SlowStats()
    manager = make(core=core)
    await connect(manager)  # the baseline read passes
    core.gate.clear()
    clock.advance(300.0)  # keepalive due: the read now hangs in a task the manager owns
    await settle()
    assert manager.task_count == 1
    async with asyncio.timeout(5):
        await manager.shutdown()
    assert core.cancelled == 1 and manager.task_count == 0


async def test_registry(make):
    registry = ManagerRegistry()
    one, two = make(), make(tube_id="tube-2")
    registry.register(one)
    registry.register(one)  # again: no-op
    registry.register(two)
    assert registry.get(TUBE) is one and TUBE in registry and len(registry) == 2
    with pytest.raises(ValueError, match="another manager"):
        registry.register(make())
    assert registry.list() == [one, two]
    assert await registry.unregister(TUBE) is one
    assert one.state is S.TERMINATED and registry.get(TUBE) is None
    assert await registry.unregister(TUBE) is None
    await registry.close()
    assert two.state is S.TERMINATED and len(registry) == 0


async def test_module_level_registry_functions(make):
    manager = make()
    manager.add_state_change_callback(lambda tube_id, state: None)
    register_connection_manager(manager)
    try:
        assert get_connection_manager(TUBE) is manager
        assert manager in cm.list_connection_managers()
    finally:
        assert await unregister_connection_manager(TUBE) is manager
    assert get_connection_manager(TUBE) is None
    assert manager.state is S.TERMINATED


async def test_many_managers_share_one_timer_and_no_tasks(make, core, clock):
    before = len(asyncio.all_tasks())
    managers = [make(tube_id=f"t{i}") for i in range(200)]
    for manager in managers:
        await manager.handle_signal(make_signal(manager.tube_id, "conv",
                                                "connection_state_changed", "connected"))
    await settle()
    assert len(clock) == 200  # one pending deadline each, in the one scheduler
    assert sum(m.task_count for m in managers) == 0
    assert len(asyncio.all_tasks()) == before
    clock.advance(300.0)
    await settle()
    assert core.keepalives == 200


async def test_snapshot(make, clock):
    manager = make()
    await connect(manager)
    clock.advance(12.5)
    snap = manager.snapshot()
    assert snap["tube_id"] == TUBE and snap["conversation_id"] == "conv"
    assert snap["state"] == "connected" and snap["core_state"] == "connected"
    assert snap["idle_seconds"] == pytest.approx(12.5)
    assert snap["restart_attempts"] == 0 and snap["next_restart_in"] is None
    assert snap["last_restart_seconds_ago"] is None
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in snap.values())


# -- a blocking core, real loop --------------------------------------------------------------


class BlockingCore:
    """Plain methods only, like the Rust core: each may block, so none may run on the loop."""

    def __init__(self) -> None:
        self.threads: dict[str, int] = {}

    def _enter(self, name: str) -> None:
        self.threads[name] = threading.get_ident()
        time.sleep(0.05)

    def set_remote_description(self, tube_id, sdp, is_answer=False):
        self._enter("set_remote_description")

    def add_ice_candidate(self, tube_id, candidate):
        self._enter("add_ice_candidate")

    def restart_ice(self, tube_id):
        self._enter("restart_ice")
        return "b2ZmZXI="

    def get_connection_stats(self, tube_id):
        self._enter("get_connection_stats")
        return {"bytes_sent": 0, "bytes_received": 0, "packet_loss_rate": 0.5}


async def test_blocking_core_calls_run_off_the_loop(outbox):
    core = BlockingCore()
    assert calls_block(core) and not calls_block(FakeCore())
    manager = TunnelConnectionManager(TUBE, "conv", core, outbox)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticking = asyncio.create_task(ticker())
    try:
        await manager.handle_signal(sig("answer", "QQ=="))
        await manager.handle_signal(sig("icecandidate", ""))
        await manager.handle_signal(sig("connection_state_changed", "connected"))
        await manager.handle_network_change(NetworkChangeType.QUALITY_DEGRADATION)
        async with asyncio.timeout(5):
            while "ice_restart_offer" not in outbox.kinds():
                await asyncio.sleep(0.01)
    finally:
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)
        await manager.shutdown()
    main = threading.get_ident()
    assert set(core.threads) == {"set_remote_description", "add_ice_candidate",
                                 "get_connection_stats", "restart_ice"}
    assert main not in core.threads.values()
    assert ticks >= 10  # the loop kept running through ~0.25 s of blocking calls


# -- the schedulers ------------------------------------------------------------------------


def test_manual_scheduler_runs_timers_in_order_at_their_time():
    clock = ManualScheduler()
    seen: list[tuple[str, float]] = []
    for name, when in (("b", 2.0), ("a", 1.0), ("c", 2.0), ("x", 1.5)):
        timer = clock.call_at(when, lambda name=name: seen.append((name, clock.now)))
        if name == "x":
            timer.cancel()
    assert len(clock) == 3
    assert clock.advance(1.9) == 1
    assert clock.advance(5.0) == 2
    assert seen == [("a", 1.0), ("b", 2.0), ("c", 2.0)]
    assert clock.now == 6.9 and len(clock) == 0


def test_cancelled_timers_do_not_pile_up():
    clock = ManualScheduler()
    for i in range(1000):
        clock.call_at(float(i), lambda: None).cancel()
    assert len(clock) == 0 and len(clock._heap) <= 200


async def test_loop_scheduler_arms_one_loop_timer_for_the_earliest():
    scheduler = LoopScheduler()
    fired: list[str] = []
    now = scheduler.time()
    scheduler.call_at(now + 0.06, lambda: fired.append("late"))
    scheduler.call_at(now + 0.02, lambda: fired.append("early"))
    scheduler.call_at(now + 0.04, lambda: fired.append("middle")).cancel()
    await asyncio.sleep(0.03)
    assert fired == ["early"]
    await asyncio.sleep(0.06)
    assert fired == ["early", "late"]
    assert scheduler.next_deadline() is None
    assert default_scheduler() is default_scheduler()


async def test_default_scheduler_drives_a_real_keepalive(core, outbox):
    manager = TunnelConnectionManager(TUBE, "conv", core, outbox,
                                      policy=ICERestartPolicy(keepalive_interval=0.05))
    try:
        await connect(manager)
        async with asyncio.timeout(5):
            while core.keepalives < 2:
                await asyncio.sleep(0.01)
    finally:
        await manager.shutdown()
    assert manager.task_count == 0


# -- real aiortc tubes -----------------------------------------------------------------------


async def test_a_manager_follows_a_real_tube(cores):
    from .tube_pair import Wire, connect_tubes

    a, b = cores
    assert not calls_block(a)
    wire = Wire(a, b)
    tube_id = "real-tube"
    registries = {"a": ManagerRegistry(), "b": ManagerRegistry()}
    states: dict[str, list[ConnectionState]] = {"a": [], "b": []}
    managers: dict[str, TunnelConnectionManager] = {}
    for side, core in (("a", a), ("b", b)):
        manager = TunnelConnectionManager(tube_id, "conv", core, lambda s: None,
                                          initiator=side == "a",
                                          policy=ICERestartPolicy(keepalive_interval=0.2))
        manager.add_state_change_callback(lambda _, state, side=side: states[side].append(state))
        registries[side].register(manager)
        managers[side] = manager
        # As in the app: the core's candidates go to the peer (the Wire does that), its
        # other signals (states, keepalives) to this side's manager.
        wire.extra[side] = lambda signal, side=side: (
            None if signal["kind"] == "icecandidate"
            else registries[side].get(signal["tube_id"]).handle_signal(signal))
    await connect_tubes(a, b, wire, tube_id=tube_id)
    async with asyncio.timeout(10):
        while any(m.state is not S.CONNECTED for m in managers.values()):
            await asyncio.sleep(0.01)
        # Idle: a's manager sends keepalives over the control channel; b's core reports them.
        while managers["a"].metrics.keepalives_sent < 1 or "keepalive" not in wire.kinds("b"):
            await asyncio.sleep(0.02)
    assert states["a"][:2] == [S.CONNECTING, S.CONNECTED]
    assert managers["a"].snapshot()["core_state"] == "connected"
    tasks_before = len(asyncio.all_tasks())
    for side in "ab":
        assert await registries[side].unregister(tube_id) is managers[side]
        assert managers[side].state is S.TERMINATED
        assert managers[side].task_count == 0 and managers[side]._timer is None
    assert len(asyncio.all_tasks()) <= tasks_before
    # The tube outlives its manager (the app closes it); closing it reaches no manager.
    wire.extra = {"a": None, "b": None}
    await a.close_tube(tube_id)
    await b.close_tube(tube_id)
    assert a.tube_ids == [] and b.tube_ids == []
    assert states["a"].count(S.TERMINATED) == 1 and states["a"][-1] is S.TERMINATED


# -- the peer's reports, withdrawn signals, a path that comes back --------------------------


async def test_the_peers_reports_are_information_not_events(make, core):
    manager = make()
    await connect(manager)
    # Through the relay (a 'peer' key), a peer or an intruder claims our state changed.
    for kind, data in (("connection_state_changed", "failed"),
                       ("channel_closed", "closed"),
                       ("network_change_detected", "ip_change")):
        await manager.handle_signal(sig(kind, data, peer="someone"))
    await settle()
    assert manager.state is S.CONNECTED
    assert core.restarts == []
    # The same kinds from our own core are events.
    await manager.handle_signal(sig("network_change_detected", "ip_change"), from_peer=False)
    await settle()
    assert len(core.restarts) == 1


async def test_an_abandoned_attempt_withdraws_its_queued_signals(make, core):
    withdrawn: list[tuple[str, frozenset[str]]] = []
    manager = make(signal_withdraw=lambda tube, kinds: withdrawn.append((tube, kinds)))
    await connect(manager)
    await manager.handle_network_change(IP)
    await settle()
    assert withdrawn == []
    # The old path answers again before the peer did: the attempt is over, its offer too.
    await manager.handle_signal(sig("connection_state_changed", "connected"))
    assert manager.state is S.CONNECTED
    assert withdrawn == [(TUBE, frozenset({"ice_restart_offer", "icecandidate"}))]
    assert manager.metrics.ice_restart_attempts == 0


async def test_connected_while_our_offer_waits_ends_the_attempt(make, core, clock):
    manager = make()
    await connect(manager)
    await manager.handle_network_change(IP)
    await settle()
    assert manager.state is S.RECONNECTING
    await manager.handle_signal(sig("connection_state_changed", "connected"))
    assert manager.state is S.CONNECTED and not manager.machine.restart_in_progress
    # Nothing times out 15 s later and restarts a healthy connection.
    clock.advance(20.0)
    await settle()
    assert len(core.restarts) == 1 and manager.state is S.CONNECTED
    # A late answer to that offer is still applied: the peer switched to it.
    await manager.handle_signal(sig("ice_restart_answer", "LATE", restart_id=1))
    assert ("set_remote_description", "LATE", True) in core.calls
