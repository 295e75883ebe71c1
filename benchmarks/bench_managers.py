"""What many connection managers cost: memory, idle CPU, registry operations.

    python benchmarks/bench_managers.py [--json] [--counts 1000 10000] [--idle 3]

Every manager sits on a core that does nothing, is registered and CONNECTED (so it has a
keepalive deadline in the shared scheduler). Measures and prints; asserts nothing. With
--json the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from tether.connection_manager import (  # noqa: E402
    ICERestartPolicy,
    ManagerRegistry,
    TunnelConnectionManager,
)
from tether.scheduler import default_scheduler  # noqa: E402
from tether.signals import make_signal  # noqa: E402


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


async def measure(n: int, idle: float) -> dict[str, Any]:
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


COLUMNS = [
    ("managers", "managers", "{:d}"),
    ("bytes_per_manager", "bytes/mgr", "{:,.0f}"),
    ("create_us", "create us", "{:.1f}"),
    ("register_us", "register us", "{:.2f}"),
    ("connect_us", "connect us", "{:.1f}"),
    ("get_us", "get us", "{:.3f}"),
    ("update_activity_ns", "activity ns", "{:.0f}"),
    ("unregister_us", "unregister us", "{:.1f}"),
    ("pending_timers", "timers", "{:d}"),
    ("tasks_while_idle", "idle tasks", "{:d}"),
    ("idle_cpu", "idle CPU", "{:.2%}"),
    ("keepalive_1s_cpu", "CPU @1 ka/s", "{:.1%}"),
    ("keepalives_per_s", "ka/s", "{:,.0f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) for key, _, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


async def main(counts: list[int], idle: float) -> list[dict[str, Any]]:
    return [await measure(n, idle) for n in counts]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--idle", type=float, default=3.0, help="seconds per CPU sample")
    args = parser.parse_args()
    rows = asyncio.run(main(args.counts, args.idle))
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{args.idle:g} s per CPU sample")
    print(table(rows))
    if args.json:
        print(json.dumps({"benchmark": "managers", "idle_seconds": args.idle, "results": rows}))
