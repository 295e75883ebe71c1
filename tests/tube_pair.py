"""Test helper: two AiortcTubeRegistry cores in one process, signals wired straight across."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tether.cores.aiortc_core import AiortcTubeRegistry

# Liveness tuned so dead paths are found in about a second (tests of restarts and candidates).
FAST_LIVENESS = {"interval": 0.2, "misses": 3, "generation_timeout": 5.0}


class Wire:
    """Carries each core's trickled candidates to the other core, and records every signal."""

    def __init__(self, a: AiortcTubeRegistry, b: AiortcTubeRegistry) -> None:
        self.a, self.b = a, b
        self.seen: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        self.extra: dict[str, Callable[[dict[str, Any]], Any] | None] = {"a": None, "b": None}

    def callback(self, side: str) -> Callable[[dict[str, Any]], Any]:
        other = self.b if side == "a" else self.a

        async def on_signal(signal: dict[str, Any]) -> None:
            self.seen[side].append(signal)
            if signal["kind"] == "icecandidate" and signal["tube_id"] in other.tube_ids:
                await other.add_ice_candidate(signal["tube_id"], signal["data"])
            hook = self.extra[side]
            if hook is not None:
                result = hook(signal)
                if asyncio.iscoroutine(result):
                    await result

        return on_signal

    def kinds(self, side: str) -> list[str]:
        return [s["kind"] for s in self.seen[side]]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, polling the event loop (fails after ``timeout``)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def connect_tubes(
    a: AiortcTubeRegistry, b: AiortcTubeRegistry, wire: Wire | None = None,
    conversation_id: str = "conv", tube_id: str | None = None,
) -> str:
    """Create a tube on ``a`` (offer) and ``b`` (answer), wait until both channels open."""
    wire = wire or Wire(a, b)
    offer = await a.create_tube(conversation_id, {}, signal_callback=wire.callback("a"),
                                tube_id=tube_id)
    tube_id = offer["tube_id"]
    answer = await b.create_tube(conversation_id, {}, offer=offer["offer"], tube_id=tube_id,
                                 signal_callback=wire.callback("b"))
    # a's candidates went out before b's tube existed: hand them over now.
    for signal in list(wire.seen["a"]):
        if signal["kind"] == "icecandidate":
            await b.add_ice_candidate(tube_id, signal["data"])
    await a.set_remote_description(tube_id, answer["answer"], is_answer=True)
    await asyncio.wait_for(asyncio.gather(a.wait_channel(tube_id), b.wait_channel(tube_id)), 20)
    return tube_id
