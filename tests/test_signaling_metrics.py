"""The relay's /healthz and /metrics on its own port (no token needed, no secrets shown)."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tether.signaling import SignalingClient, SignalingServer

TOKEN = "t0ken-for-metrics"


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        body = await reader.readexactly(length)
    writer.close()
    return int(head.split()[1]), body.decode()


async def test_health_and_metrics_count_what_the_relay_did():
    async with SignalingServer(port=0, token=TOKEN) as relay:
        assert await get(relay.port, "/healthz") == (200, "ready\n")
        got: list[str] = []
        a = SignalingClient(relay.url, TOKEN, "conv", lambda s: None)
        b = SignalingClient(relay.url, TOKEN, "conv", lambda s: got.append(s["data"]))
        await a.start()
        await b.start()
        for n in range(5):
            await a.send({"tube_id": "t", "kind": "icecandidate", "data": str(n)})
        async with asyncio.timeout(10):
            await a.drain()
        status, text = await get(relay.port, "/metrics")
        await a.close()
        await b.close()
        assert status == 200
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                     if line and not line.startswith("#"))
        assert float(lines["tether_relay_connections"]) == 2
        assert float(lines["tether_relay_conversations"]) == 1
        assert float(lines["tether_relay_signals_relayed_total"]) == 5
        assert float(lines["tether_relay_delivery_seconds_count"]) >= 1
        assert float(lines["tether_relay_ready"]) == 1
        assert TOKEN not in text
        # A wrong token is counted as a refusal by kind.
        try:
            await connect(f"{relay.url}?conversation=c&peer=p",
                          additional_headers={"Authorization": "Bearer wrong"})
        except InvalidStatus:
            pass
        _, text = await get(relay.port, "/metrics")
        assert 'tether_relay_errors_total{kind="refused_401"} 1.0' in text
        assert got == ["0", "1", "2", "3", "4"]
