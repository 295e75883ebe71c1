"""The Rust core through tether's CLI: ``serve`` + ``expose`` + ``connect`` with ``--core keeper``.

The figure next to ``keeper`` (the Rust core alone, its own tunnel mode): the same core
under tether's manager, signaling and sealing, every TCP stream a resumable session
(tether.tunnel.resume). The Rust core gathers no 127.0.0.1 candidates, so, like
tether.bench.keeper, this makes a network namespace with a 10.x.y.z/32 on its loopback,
runs the three CLI processes and the checked push there (``python -m
tether.bench.keeper_tether MB SEED`` inside it), and deletes the namespace afterwards.

Figures: ``keeper_tether_mb_s`` (push through ``connect --listen`` to a hashing sink),
``keeper_tether_connect_ms`` (the connecting side's offer to its open tunnel, from its
events file), ``keeper_tether_cpu_ms_per_mb`` (the busier side).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from . import checked
from .checked import Payload
from .cli_tunnel import cli_tunnel, timed_push
from .keeper import Skip, in_lo_namespace, unavailable

__all__ = ["Skip", "measure", "unavailable"]


async def measure(mb: float, seed: int = 5, timeout: float | None = None) -> dict[str, Any]:
    """Run the measurement in a fresh namespace (removed after, whatever happened)."""
    return await in_lo_namespace("tbt", "tether.bench.keeper_tether", mb, seed,
                                 timeout or 150.0 + 4.0 * mb, "tether --core keeper run")


# -- inside the namespace ----------------------------------------------------------------


async def _run_inside(mb: float, seed: int) -> dict[str, Any]:
    payload = Payload.make(int(mb * checked.MB), seed)
    sink = await checked.start_sink()
    try:
        async with cli_tunnel(sink.sockets[0].getsockname()[1], ["--core", "keeper"]) as run:
            mb_s, busier = await timed_push(run, payload)
            out: dict[str, Any] = {"keeper_tether_mb_s": mb_s,
                                   "keeper_tether_connect_ms": run.connect_ms}
            if busier is not None:
                out["keeper_tether_cpu_ms_per_mb"] = busier
            return out
    finally:
        sink.close()
        await sink.wait_closed()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_run_inside(float(sys.argv[1]), int(sys.argv[2])))),
          flush=True)
