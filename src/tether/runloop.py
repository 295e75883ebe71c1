"""Which event loop tether runs on: uvloop where it is importable, asyncio's default elsewhere.

uvloop (libuv) runs the per-datagram work under tether's tunnel - UDP reads, timers, task
steps - with less interpreter time than asyncio's selector loop: the CLI tunnel moved 1.38x
the bytes per second with it (issue 9). It is a dependency on Linux and macOS; on Windows,
or if it fails to import, asyncio's loop is used and nothing else changes.

``TETHER_LOOP=asyncio`` in the environment forces asyncio's loop (to compare, or to rule
uvloop out when chasing a bug).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOOP_ENV = "TETHER_LOOP"


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
