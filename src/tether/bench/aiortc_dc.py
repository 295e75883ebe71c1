"""A bare aiortc data channel, one process per peer (aiortc as shipped: the peers are
:mod:`tether.bench.aiortc_peer` run as scripts with ``python -P``, which never import tether
or its aiortc patches). The bench passes the offer and answer between them.

Figures: ``aiortc_dc_mb_s`` (one way, until the receiver's SHA-256 matched),
``aiortc_connect_ms`` (createOffer to the data channel open, in the offerer),
``aiortc_cpu_ms_per_mb_send`` / ``_receive``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from .signaling import stop

PEER = Path(__file__).with_name("aiortc_peer.py")


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        err = b""
        if proc.stderr is not None:
            err = await proc.stderr.read()
        raise RuntimeError(f"bare aiortc peer ended: {err.decode(errors='replace')[-400:]}")
    return json.loads(line)


async def _send(proc: asyncio.subprocess.Process, record: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(record) + "\n").encode())
    await proc.stdin.drain()


async def measure(mb: float, seed: int = 5) -> dict[str, Any]:
    size = int(mb * 1024 * 1024)
    pipes = {"stdin": asyncio.subprocess.PIPE, "stdout": asyncio.subprocess.PIPE,
             "stderr": asyncio.subprocess.PIPE}
    answerer = await asyncio.create_subprocess_exec(sys.executable, "-P", str(PEER), "answer",
                                                    **pipes)
    offerer = await asyncio.create_subprocess_exec(sys.executable, "-P", str(PEER), "offer",
                                                   str(size), str(seed), **pipes)
    try:
        offer = await _line(offerer, 60)
        await _send(answerer, {**offer, "size": size})
        await _send(offerer, await _line(answerer, 60))
        result = await _line(offerer, 300)
        received = await _line(answerer, 60)
    finally:
        await stop(offerer)
        await stop(answerer)
    if not result.get("ok"):
        raise RuntimeError("bare aiortc: the receiver's SHA-256 does not match what was sent")
    return {
        "aiortc_dc_mb_s": mb / result["seconds"],
        "aiortc_connect_ms": result["connect_ms"],
        "aiortc_cpu_ms_per_mb_send": result["cpu_s"] * 1000.0 / mb,
        "aiortc_cpu_ms_per_mb_receive": received["cpu_s"] * 1000.0 / mb,
    }
