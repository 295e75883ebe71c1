"""Direct TCP on loopback: the ceiling every tunnel is compared with (both ends in this process)."""

from __future__ import annotations

from typing import Any

from .checked import Payload, push, start_sink


async def measure(mb: float, seed: int = 1) -> dict[str, Any]:
    payload = Payload.make(int(mb * 1024 * 1024), seed)
    server = await start_sink()
    try:
        address = server.sockets[0].getsockname()[:2]
        seconds = await push(address, payload)
    finally:
        server.close()
        await server.wait_closed()
    return {"tcp_mb_s": payload.mb / seconds}
