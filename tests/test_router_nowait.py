"""route_nowait / handle_signal_nowait: the signal hot path without coroutines of its own,
with exactly route()'s outcomes (delivery, activity, error replies, unknown tubes)."""

from __future__ import annotations

import inspect
from typing import Any

from tether import signals
from tether.connection_manager import ManagerRegistry, TunnelConnectionManager
from tether.router import CLOSE_REASON, UNKNOWN_TUBE, SignalRouter

from .test_router import Recorder


class Core:
    """Contract 2, asyncio-native; add_ice_candidate refuses candidates containing 'bad'."""

    def __init__(self) -> None:
        self.candidates: list[tuple[str, str]] = []

    async def add_ice_candidate(self, tube_id: str, candidate: str) -> None:
        if "bad" in candidate:
            raise ValueError(f"cannot parse {candidate!r}")
        self.candidates.append((tube_id, candidate))

    def get_connection_state(self, tube_id: str) -> str:
        return "connected"

    def get_connection_stats(self, tube_id: str) -> dict[str, Any]:
        return {"bytes_sent": 0, "bytes_received": 0, "packet_loss_rate": 0.0, "rtt_ms": 1.0}

    async def close_tube(self, tube_id: str, reason: str | None = None) -> None:
        return None

    def send_keepalive(self, tube_id: str) -> None:
        return None


class PlainCore(Core):
    """A core whose add_ice_candidate is a plain call (nothing to await)."""

    def add_ice_candidate(self, tube_id: str, candidate: str) -> None:  # type: ignore[override]
        if "bad" in candidate:
            raise ValueError(f"cannot parse {candidate!r}")
        self.candidates.append((tube_id, candidate))


async def setup(core: Core):
    registry = ManagerRegistry()
    sent: list[dict[str, Any]] = []

    async def to_peer(signal: dict[str, Any]) -> None:
        sent.append(signal)

    manager = TunnelConnectionManager("t1", "conv", core, to_peer)
    registry.register(manager)
    await manager.handle_signal(signals.make_signal("t1", "conv", "connection_state_changed",
                                                    "connected"))
    replies: list[dict[str, Any]] = []

    async def reply(signal: dict[str, Any]) -> None:
        replies.append(signal)

    return SignalRouter(registry, reply=reply), registry, manager, replies


def candidate(data: str, tube: str = "t1") -> dict[str, Any]:
    return signals.make_signal(tube, "conv", signals.ICE_CANDIDATE, data, peer="p")


async def finish(result: Any) -> None:
    if result is not None:
        assert inspect.isawaitable(result)
        await result


async def test_candidates_reach_the_core_in_order_with_one_awaitable_at_most():
    core = Core()
    router, registry, manager, replies = await setup(core)
    try:
        for i in range(5):
            result = router.route_nowait(candidate(f"candidate:{i}"))
            assert inspect.isawaitable(result)  # the core's call, wrapped once
            await result
        await router.route(candidate("candidate:5"))
        assert core.candidates == [("t1", f"candidate:{i}") for i in range(6)]
        assert replies == []
    finally:
        await registry.close()


async def test_a_plain_core_call_leaves_nothing_to_await():
    core = PlainCore()
    router, registry, manager, replies = await setup(core)
    try:
        assert router.route_nowait(candidate("candidate:1")) is None
        assert manager.handle_signal_nowait(candidate("candidate:2")) is None
        assert core.candidates == [("t1", "candidate:1"), ("t1", "candidate:2")]
    finally:
        await registry.close()


async def test_the_cores_refusal_is_answered_as_route_answers_it(caplog):
    for core in (Core(), PlainCore()):
        router, registry, manager, replies = await setup(core)
        try:
            await finish(router.route_nowait(candidate("candidate:bad")))
            await router.route(candidate("candidate:bad-too"))
            await finish(router.route_nowait(candidate("candidate:good")))
            assert [(r["tube_id"], r["kind"]) for r in replies] == [("t1", "error")] * 2
            assert "cannot parse 'candidate:bad'" in replies[0]["data"]
            assert core.candidates == [("t1", "candidate:good")]
        finally:
            await registry.close()
    assert "icecandidate signal failed" in caplog.text


async def test_other_kinds_and_unknown_tubes_take_the_full_path():
    core = Core()
    router, registry, manager, replies = await setup(core)
    try:
        # a keepalive is handled by the manager's own handler (a coroutine to await)
        await finish(router.route_nowait(signals.make_signal("t1", "conv", "keepalive", "",
                                                             peer="p")))
        # the peer's reports are information only: nothing to await
        assert router.route_nowait(signals.make_signal(
            "t1", "conv", "connection_state_changed", "connected", peer="p")) is None
        # an early candidate is held, anything else for an unknown tube is answered
        await finish(router.route_nowait(candidate("candidate:1", tube="t2")))
        assert router.held_count == 1
        await finish(router.route_nowait(signals.make_signal("t3", "conv", "answer", "x",
                                                             peer="p")))
        assert [(r["tube_id"], r["kind"], r.get(CLOSE_REASON)) for r in replies] == [
            ("t3", signals.CHANNEL_CLOSED, UNKNOWN_TUBE)]
    finally:
        await registry.close()


async def test_a_shut_down_manager_ignores_the_candidate():
    core = Core()
    router, registry, manager, replies = await setup(core)
    await manager.shutdown()
    try:
        assert manager.handle_signal_nowait(candidate("candidate:1")) is None
        assert core.candidates == []
    finally:
        await registry.close()


async def test_a_manager_without_nowait_still_gets_its_signals():
    replies: list[dict[str, Any]] = []

    async def reply(signal: dict[str, Any]) -> None:
        replies.append(signal)

    manager = Recorder()  # no handle_signal_nowait: route_nowait falls back to handle_signal
    router = SignalRouter({"t1": manager}, reply=reply)
    await finish(router.route_nowait(candidate("candidate:1")))
    assert [s["data"] for s in manager.handled] == ["candidate:1"]
    assert manager.activity == 1 and replies == []
