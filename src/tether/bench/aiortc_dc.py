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
import tempfile
from pathlib import Path
from typing import Any

from .signaling import stop

PEER = Path(__file__).with_name("aiortc_peer.py")


async def _line(proc: asyncio.subprocess.Process, timeout: float, log: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        line = await proc.stdout.readline()
    if not line:
        tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
        raise RuntimeError(f"bare aiortc peer ended ({await proc.wait()}): {tail}")
    return json.loads(line)


async def _send(proc: asyncio.subprocess.Process, record: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(record) + "\n").encode())
    await proc.stdin.drain()


async def measure(mb: float, seed: int = 5) -> dict[str, Any]:
    size = int(mb * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="tether-bench-aiortc-") as tmp:
        logs = {role: Path(tmp) / f"{role}.log" for role in ("offer", "answer")}

        async def start(*args: str) -> asyncio.subprocess.Process:
            with open(logs[args[0]], "wb") as log:  # the child keeps its own copy
                return await asyncio.create_subprocess_exec(
                    sys.executable, "-P", str(PEER), *args, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=log)

        answerer = await start("answer")
        try:
            offerer = await start("offer", str(size), str(seed))
            try:
                offer = await _line(offerer, 60, logs["offer"])
                await _send(answerer, {**offer, "size": size})
                await _send(offerer, await _line(answerer, 60, logs["answer"]))
                result = await _line(offerer, 300, logs["offer"])
                received = await _line(answerer, 60, logs["answer"])
            finally:
                await stop(offerer)
        finally:
            await stop(answerer)
    if not result.get("ok"):
        raise RuntimeError("bare aiortc: the receiver's SHA-256 does not match what was sent")
    return {
        "aiortc_dc_mb_s": mb / result["seconds"],
        "aiortc_connect_ms": result["connect_ms"],
        "aiortc_cpu_ms_per_mb_send": result["cpu_s"] * 1000.0 / mb,
        "aiortc_cpu_ms_per_mb_receive": received["cpu_s"] * 1000.0 / mb,
    }
