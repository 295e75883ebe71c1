"""tether never waits with ``asyncio.wait_for``.

On Python 3.11 (what tether supports first) ``wait_for`` loses a cancellation that lands in
the loop turn its inner future completes (cpython#86296, fixed in 3.12): under load it left
about 1 stopped `tether` in 3 running. ``asyncio.timeout`` has no such window, so tether's
own code (the CLI, the tunnel, the cores, the lab and the benchmarks) uses it everywhere.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import tether

SOURCE = Path(tether.__file__).parent


def test_no_wait_for_in_tether():
    offenders = [f"{path.relative_to(SOURCE)}:{number}"
                 for path in sorted(SOURCE.rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if "wait_for(" in line and not line.lstrip().startswith("#")]
    assert offenders == [], "use `async with asyncio.timeout(...)` instead: " + ", ".join(
        offenders)


async def test_a_cancellation_that_lands_as_the_wait_completes_is_kept():
    """The pattern tether uses, cancelled in the very turn its inner wait completes. With
    ``await asyncio.wait_for(done.wait(), 10)`` instead, Python 3.11.7 returns "ran on"."""
    done = asyncio.Event()

    async def waiter() -> str:
        async with asyncio.timeout(10):
            await done.wait()
        await asyncio.sleep(0)  # a cancellation kept so far is raised here at the latest
        return "ran on"

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    done.set()      # the inner wait completes in the next turn ...
    task.cancel()   # ... and the cancellation lands in the same one
    try:
        result = await task
    except asyncio.CancelledError:
        result = "cancelled"
    assert result == "cancelled"
