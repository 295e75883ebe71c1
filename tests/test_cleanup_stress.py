"""Many real tubes with managers, made and closed from concurrent tasks: nothing may leak."""

from __future__ import annotations

import asyncio
import gc
import os

import pytest

from tether.connection_manager import (
    ConnectionState,
    ManagerRegistry,
    TunnelConnectionManager,
)
from tether.cores.aiortc_core import AiortcTubeRegistry
from tether.cores.gathering import LOOPBACK

from .tube_pair import Wire, connect_tubes

CYCLES = 4
PAIRS_PER_CYCLE = 50  # 4 x 50 = 200 tubes, each with both ends and both managers


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Side:
    def __init__(self) -> None:
        self.core = AiortcTubeRegistry(host_addresses=LOOPBACK)
        self.managers = ManagerRegistry()

    def route(self, signal):
        """The core's own signals go to the manager; candidates go to the peer (Wire)."""
        if signal["kind"] == "icecandidate":
            return None
        manager = self.managers.get(signal["tube_id"])
        return manager.handle_signal(signal) if manager is not None else None


async def one_tube(a: Side, b: Side, tube_id: str) -> None:
    """Open a tube with a manager on each end, wait until both are CONNECTED, close it."""
    for side, initiator in ((a, True), (b, False)):
        side.managers.register(TunnelConnectionManager(
            tube_id, "stress", side.core, lambda signal: None, initiator=initiator))
    wire = Wire(a.core, b.core)
    wire.extra = {"a": a.route, "b": b.route}
    try:
        await connect_tubes(a.core, b.core, wire, tube_id=tube_id)
        async with asyncio.timeout(20):
            while any(side.managers.get(tube_id).state is not ConnectionState.CONNECTED
                      for side in (a, b)):
                await asyncio.sleep(0.01)
    finally:
        # As the app does: the manager first, then the tube.
        for side in (a, b):
            await side.managers.unregister(tube_id)
            await side.core.close_tube(tube_id, reason="stress cycle done")


async def settle_counts(a: Side, b: Side) -> dict[str, int]:
    for _ in range(50):
        await asyncio.sleep(0.02)
        gc.collect()
    return {
        "tubes": len(a.core.tube_ids) + len(b.core.tube_ids),
        "managers": len(a.managers) + len(b.managers),
        "tasks": len(asyncio.all_tasks()),
        "fds": open_fds(),
    }


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_tubes_and_managers_leave_nothing_behind():
    a, b = Side(), Side()
    try:
        # One warm-up tube, so lazily made, long-lived things (executors, caches) exist
        # before the baseline is taken.
        await one_tube(a, b, "warm-up")
        baseline = await settle_counts(a, b)
        assert baseline["tubes"] == 0 and baseline["managers"] == 0
        peak_fds = 0
        for cycle in range(CYCLES):
            tube_ids = [f"c{cycle}-t{i}" for i in range(PAIRS_PER_CYCLE)]
            opened = asyncio.gather(*(one_tube(a, b, t) for t in tube_ids))
            await asyncio.sleep(0.05)
            peak_fds = max(peak_fds, open_fds())
            await opened
        after = await settle_counts(a, b)
        assert peak_fds > baseline["fds"]  # the tubes really held sockets
        assert after == baseline
    finally:
        await a.core.close()
        await b.core.close()
