"""``tether demo --json`` (a whole tunnel in one process, echo, every byte checked) as a
subprocess; its own result gives ``demo_mb_s`` (each way) and ``demo_connect_ms``."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from .signaling import stop


async def measure(mb: float, timeout: float = 300.0) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether.cli", "demo", "--json", "--no-break-path",
        "--mb", f"{mb:g}", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        await stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"tether demo exited with {proc.returncode}: "
                           f"{err.decode(errors='replace')[-300:]}")
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError("tether demo --json printed no JSON line")
    result = json.loads(lines[-1])
    if result.get("bytes_verified") != result.get("bytes_sent"):
        raise RuntimeError(f"tether demo verified {result.get('bytes_verified')} of "
                           f"{result.get('bytes_sent')} bytes")
    return {"demo_mb_s": result["throughput_mb_s"], "demo_connect_ms": result["connect_ms"]}
