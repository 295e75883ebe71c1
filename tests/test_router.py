"""The router: signals reach their tube's manager; a tube we do not know is said so, typed."""

from __future__ import annotations

from typing import Any

from tether import signals
from tether.router import CLOSE_REASON, UNKNOWN_TUBE, SignalRouter


class Recorder:
    """A manager as the router sees it: counts activity, keeps what it is handed."""

    def __init__(self) -> None:
        self.handled: list[dict[str, Any]] = []
        self.activity = 0

    def update_activity(self) -> None:
        self.activity += 1

    async def handle_signal(self, signal: dict[str, Any]) -> None:
        self.handled.append(signal)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(**kwargs):
    managers: dict[str, Recorder] = {}
    replies: list[dict[str, Any]] = []

    async def reply(signal: dict[str, Any]) -> None:
        replies.append(signal)

    clock = Clock()
    router = SignalRouter(managers, reply=reply, clock=clock, **kwargs)
    return router, managers, replies, clock


def sig(kind: str, tube: str = "t1", data: str = "") -> dict[str, Any]:
    return signals.make_signal(tube, "conv", kind, data, peer="p")


async def test_every_signal_reaches_its_manager_and_counts_as_activity():
    router, managers, replies, _ = make()
    managers["t1"] = Recorder()
    await router.route(sig("keepalive"))
    await router.route(sig("icecandidate", data="candidate:1"))
    assert [s["kind"] for s in managers["t1"].handled] == ["keepalive", "icecandidate"]
    assert managers["t1"].activity == 2 and replies == []


async def test_an_early_candidate_is_held_and_replayed_when_its_tube_appears():
    router, managers, replies, _ = make()
    await router.route(sig("icecandidate", data="candidate:1"))
    assert router.held_count == 1 and replies == []
    managers["t1"] = Recorder()
    await router.tube_added("t1")
    assert [s["data"] for s in managers["t1"].handled] == ["candidate:1"]
    assert router.held_count == 0


async def test_a_restart_offer_for_an_unknown_tube_is_answered_at_once_typed():
    router, _, replies, _ = make()
    for kind in ("ice_restart_offer", "ice_restart_answer", "answer", "keepalive"):
        await router.route(sig(kind, tube=f"gone-{kind}"))
    assert [r["kind"] for r in replies] == ["channel_closed"] * 4
    assert all(r[CLOSE_REASON] == UNKNOWN_TUBE for r in replies)
    assert [r["tube_id"] for r in replies] == [
        "gone-ice_restart_offer", "gone-ice_restart_answer", "gone-answer", "gone-keepalive"]
    assert router.held_count == 0


async def test_errors_closings_and_offers_are_never_answered_with_a_closing():
    router, _, replies, _ = make()
    for kind in ("error", "channel_closed", "offer"):
        await router.route(sig(kind, tube="nobody"))
    assert replies == []


async def test_held_candidates_expire_with_a_typed_reply():
    router, _, replies, clock = make(hold_seconds=30.0)
    await router.route(sig("icecandidate", tube="never", data="candidate:1"))
    clock.now = 31.0
    await router.route(sig("icecandidate", tube="other", data="candidate:2"))
    assert [(r["tube_id"], r["kind"], r[CLOSE_REASON]) for r in replies] == [
        ("never", "channel_closed", UNKNOWN_TUBE)]
    assert router.held_count == 1


async def test_holding_is_bounded():
    router, _, replies, _ = make(max_tubes=2, max_per_tube=2)
    for tube in ("a", "b", "c"):
        await router.route(sig("icecandidate", tube=tube))
    assert [r["tube_id"] for r in replies] == ["c"]
    for _ in range(3):
        await router.route(sig("icecandidate", tube="a"))
    assert router.held_count == 3  # a: 2 (the limit), b: 1
    assert replies[-1]["kind"] == "error" and "more than 2" in replies[-1]["data"]


class Failing(Recorder):
    async def handle_signal(self, signal: dict[str, Any]) -> None:
        raise ValueError("bad candidate")


class Plain(Recorder):
    """A manager whose handle_signal is a plain function."""

    def handle_signal(self, signal: dict[str, Any]) -> None:  # type: ignore[override]
        self.handled.append(signal)


async def test_a_failing_signal_is_answered_with_an_error_and_routing_goes_on(caplog):
    router, managers, replies, _ = make()
    managers["t1"], managers["t2"] = Failing(), Plain()
    await router.route(sig("icecandidate", data="candidate:bad"))
    await router.route(sig("icecandidate", tube="t2", data="candidate:2"))
    assert [(r["tube_id"], r["kind"]) for r in replies] == [("t1", "error")]
    assert "bad candidate" in replies[0]["data"]
    assert managers["t1"].activity == 1 and managers["t2"].activity == 1
    assert [s["data"] for s in managers["t2"].handled] == ["candidate:2"]
    assert "icecandidate signal failed" in caplog.text


async def test_an_error_for_a_known_tube_reaches_its_manager():
    router, managers, replies, _ = make()
    managers["t1"] = Recorder()
    await router.route(sig("error", data="the peer's core failed"))
    assert [s["kind"] for s in managers["t1"].handled] == ["error"] and replies == []
