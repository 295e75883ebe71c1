"""What many connection managers cost: memory, idle CPU, registry operations.

Every manager sits on a core that does nothing, is registered and CONNECTED (so it has a
keepalive deadline in the shared scheduler). ``measure_managers(n, idle)`` returns every
figure; ``measure(quick)`` gives the bench's two: ``manager_bytes_per_tube`` and
``manager_idle_cpu_pct_10k`` (CPU share of this process while 10k connected managers idle).
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

from ..connection_manager import ICERestartPolicy, ManagerRegistry, TunnelConnectionManager
from ..scheduler import default_scheduler
from ..signals import make_signal


class NullCore:
    """Contract 2 with nothing behind it (asyncio-native, so nothing goes to a thread)."""

    STATS = {"bytes_sent": 0, "bytes_received": 0, "packet_loss_rate": 0.0, "rtt_ms": 1.0}

    async def create_tube(self, conversation_id, settings, trickle_ice=True, offer=None,
                          signal_callback=None, tube_id=None):
        return {"tube_id": tube_id, "offer": ""}

    async def set_remote_description(self, tube_id, sdp, is_answer=False):
        return None

    async def add_ice_candidate(self, tube_id, candidate):
        return None

    async def restart_ice(self, tube_id):
        return "b2ZmZXI="

    def get_connection_state(self, tube_id):
        return "connected"

    def get_connection_stats(self, tube_id):
        return self.STATS

    async def close_tube(self, tube_id, reason=None):
        return None

    def send_keepalive(self, tube_id):
        return None


async def discard(signal: dict[str, Any]) -> None:
    return None


def make_managers(n: int, core: NullCore, policy: ICERestartPolicy | None = None):
    return [TunnelConnectionManager(f"tube-{i:06d}", "bench", core, discard, policy=policy)
            for i in range(n)]


async def connect_all(managers) -> None:
    for manager in managers:
        await manager.handle_signal(make_signal(manager.tube_id, "bench",
                                                "connection_state_changed", "connected"))


async def cpu_share(seconds: float) -> float:
    """Process CPU time / wall time while the loop runs for ``seconds``."""
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


async def measure_managers(n: int, idle: float) -> dict[str, Any]:
    core = NullCore()
    result: dict[str, Any] = {"managers": n}

    # Memory: everything a registered, connected manager holds (timer entry included).
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    registry = ManagerRegistry()
    managers = make_managers(n, core)
    for manager in managers:
        registry.register(manager)
    await connect_all(managers)
    gc.collect()
    result["bytes_per_manager"] = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    await registry.close()
    del managers, registry
    gc.collect()

    # Registry operations, without tracemalloc's overhead.
    registry = ManagerRegistry()
    t0 = time.perf_counter()
    managers = make_managers(n, core)
    result["create_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for manager in managers:
        registry.register(manager)
    result["register_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    await connect_all(managers)
    result["connect_us"] = (time.perf_counter() - t0) / n * 1e6
    ids = [m.tube_id for m in managers]
    t0 = time.perf_counter()
    for tube_id in ids:
        registry.get(tube_id)
    result["get_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(10):
        for manager in managers:
            manager.update_activity()
    result["update_activity_ns"] = (time.perf_counter() - t0) / (10 * n) * 1e9

    # Idle: all connected, keepalives 300 s away. Nothing should run.
    result["pending_timers"] = len(default_scheduler())
    result["tasks_while_idle"] = len(asyncio.all_tasks()) - 1
    result["idle_cpu"] = await cpu_share(idle)

    t0 = time.perf_counter()
    for tube_id in ids:
        await registry.unregister(tube_id)
    result["unregister_us"] = (time.perf_counter() - t0) / n * 1e6
    result["timers_left"] = len(default_scheduler())
    del managers, registry
    gc.collect()

    # Busy: every manager sends a keepalive each second, all through the one timer.
    registry = ManagerRegistry()
    managers = make_managers(n, core, ICERestartPolicy(keepalive_interval=1.0))
    for manager in managers:
        registry.register(manager)
    await connect_all(managers)
    result["keepalive_1s_cpu"] = await cpu_share(idle)
    result["keepalives_per_s"] = sum(m.metrics.keepalives_sent for m in managers) / idle
    await registry.close()
    return result


async def measure(quick: bool = False) -> dict[str, Any]:
    """The bench's manager figures at 10k tubes (idle sampled 1 s quick, 3 s otherwise)."""
    row = await measure_managers(10_000, 1.0 if quick else 3.0)
    return {
        "manager_bytes_per_tube": row["bytes_per_manager"],
        "manager_idle_cpu_pct_10k": row["idle_cpu"] * 100.0,
        "manager_keepalive_1s_cpu_pct_10k": row["keepalive_1s_cpu"] * 100.0,
        "manager_register_us": row["register_us"],
    }
