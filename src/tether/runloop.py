"""Which event loop tether runs on: uvloop where it is importable, asyncio's default elsewhere.

uvloop (libuv) runs the per-datagram work under tether's tunnel - UDP reads, timers, task
steps - with less interpreter time than asyncio's selector loop: the CLI tunnel moved 1.38x
the bytes per second with it (issue 9). It is a dependency on Linux and macOS; on Windows,
or if it fails to import, asyncio's loop is used and nothing else changes.

``TETHER_LOOP=asyncio`` in the environment forces asyncio's loop (to compare, or to rule
uvloop out when chasing a bug).

:func:`collect_less_often` is the other process-wide setting of a tether process: the
cyclic garbage collector's thresholds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOOP_ENV = "TETHER_LOOP"

GC_THRESHOLDS = (20000, 50, 100)
"""Generation 0 every 20000 net container allocations, older ones every 50 and 100 of
those; CPython's defaults are (700, 10, 10)."""


def collect_less_often() -> None:
    """Run CPython's cyclic garbage collector less often (:data:`GC_THRESHOLDS`).

    tether's hot paths (a datagram of the tunnel, a frame through the relay) allocate
    dozens of container objects each - frames, coroutines, dicts, tuples - that reference
    counting frees at once. With the default thresholds a generation-0 pass ran every few
    dozen datagrams or signals only to find them gone: 4-5 % of a tunnel side's CPU, 3-4 %
    of the relay's (docs/datapath.md, docs/sigspeed.md). Cycles are still collected, later;
    what waits for a pass is bounded by the thresholds. Process-wide, so only the owner of
    a process calls it: ``tether serve``, and the aiortc core's ``gc_less_often`` patch.
    """
    gc.set_threshold(*GC_THRESHOLDS)


def _uvloop() -> Any | None:
    if os.environ.get(LOOP_ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def loop_name() -> str:
    """'uvloop' or 'asyncio': what :func:`run` and :func:`new_event_loop` will use."""
    return "uvloop" if _uvloop() is not None else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the chosen kind (the caller runs and closes it)."""
    uvloop = _uvloop()
    if uvloop is not None:
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the chosen kind, like ``asyncio.run``."""
    logger.debug("event loop: %s", loop_name())
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
