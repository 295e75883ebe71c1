"""Signaling figures: the client's signal path end to end, and (when the relay's own
benchmark, :mod:`tether.bench.relay`, is missing or fails) the relay's signals per second
and latency.

``handler_signals_per_s``: a minimal stand-in relay (a plain WebSocket server speaking the
relay's documented wire protocol) writes frames of 10 signals as fast as the client takes
them; a real :class:`~tether.signaling.SignalingClient` reads, acknowledges and hands each
one to a real :class:`~tether.router.SignalRouter`, which delivers it to one of 100
registered, connected managers. Counted when the router has delivered the last one.

``relay_signals_per_s`` / ``relay_p50_ms`` / ``relay_p99_ms``: a real ``tether serve``
process on loopback and two raw WebSocket peers in this process; one signal per frame, as
fast as the relay forwards them, then paced at 1,000 signals/s for the latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from ..connection_manager import ManagerRegistry
from ..router import SignalRouter
from .managers import NullCore, connect_all, make_managers

PER_FRAME = 10
TUBES = 100
CANDIDATE = "candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host"


def _frames(total: int, conversation: str) -> list[str]:
    frames = []
    for start in range(1, total + 1, PER_FRAME):
        batch = [{"tube_id": f"tube-{seq % TUBES:06d}", "conversation_id": conversation,
                  "kind": "icecandidate", "data": CANDIDATE, "peer": "bench-peer",
                  "session": "bench-session", "seq": seq, "prev": 0}
                 for seq in range(start, min(start + PER_FRAME, total + 1))]
        frames.append(json.dumps(batch, separators=(",", ":")))
    return frames


async def measure_handler(total: int) -> dict[str, Any]:
    """Signals per second from WebSocket frames through the client's reader into the router."""
    from ..signaling import SignalingClient

    conversation = "bench-handler"
    frames = _frames(total, conversation)
    go = asyncio.Event()
    sent_at: list[float] = []

    async def fake_relay(ws: ServerConnection) -> None:
        async def drain_acks() -> None:
            async for _ in ws:
                pass

        acks = asyncio.create_task(drain_acks())
        try:
            await go.wait()
            sent_at.append(time.perf_counter())
            for frame in frames:
                await ws.send(frame)
            await ws.wait_closed()
        finally:
            acks.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acks

    core = NullCore()
    registry = ManagerRegistry()
    managers = make_managers(TUBES, core)
    for manager in managers:
        registry.register(manager)
    await connect_all(managers)

    async def reply(signal: dict[str, Any]) -> None:
        return None

    router = SignalRouter(registry, reply=reply)
    done = asyncio.Event()
    count = 0

    async def on_signal(signal: dict[str, Any]) -> None:
        nonlocal count
        await router.route(signal)
        count += 1
        if count >= total:
            done.set()

    async with serve(fake_relay, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        client = SignalingClient(f"ws://127.0.0.1:{port}", "bench-token", conversation,
                                 on_signal)
        try:
            await asyncio.wait_for(client.start(), 30)
            go.set()
            await asyncio.wait_for(done.wait(), 120)
            seconds = time.perf_counter() - sent_at[0]
        finally:
            await client.close()
            await registry.close()
    return {"handler_signals_per_s": total / seconds}


# -- the relay (fallback until tether.bench.relay exists) ------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_port(port: int, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 5 s; always reaped."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def measure_relay(quick: bool) -> dict[str, Any]:
    """The current relay in its own process: signals/s one per frame, p50/p99 at 1,000/s."""
    token = secrets.token_urlsafe(16)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        env={**os.environ, "TETHER_TOKEN": token},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_port(port, proc)
        headers = {"Authorization": f"Bearer {token}"}
        url = f"ws://127.0.0.1:{port}/?conversation=bench-relay&peer="
        async with connect(url + "a", additional_headers=headers) as a, \
                connect(url + "b", additional_headers=headers) as b:
            await a.recv()  # the relay's first message: presence and resume credential
            await b.recv()
            peers = _Peers(a, b)
            acks = asyncio.create_task(peers.read_acks())
            try:
                rate = await _flood(peers, 5_000 if quick else 20_000)
                p50, p99 = await _paced(peers, 1_000.0, 2_000 if quick else 5_000)
            finally:
                acks.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await acks
    finally:
        await stop(proc)
    return {"relay_signals_per_s": rate, "relay_p50_ms": p50, "relay_p99_ms": p99}


WINDOW = 128  # signals in flight: the relay holds at most 256 unacknowledged per conversation


class _Peers:
    """Raw peers on the relay: ``a`` sends signals with (session, seq), ``b`` acknowledges
    each frame as a SignalingClient would, ``a`` reads the forwarded acks (flow control)."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b
        self.sent = 0
        self.acked = 0
        self.acked_changed = asyncio.Event()

    async def read_acks(self) -> None:
        async for message in self.a:
            item = json.loads(message)
            if isinstance(item, dict) and item.get("control") == "ack":
                self.acked += len(item.get("seqs", ()))
                self.acked_changed.set()

    async def send(self, t: float) -> None:
        while self.sent - self.acked >= WINDOW:
            self.acked_changed.clear()
            await asyncio.wait_for(self.acked_changed.wait(), 30)
        self.sent += 1
        await self.a.send(json.dumps({
            "tube_id": "bench-tube", "conversation_id": "", "kind": "icecandidate",
            "data": CANDIDATE, "session": "bench", "seq": self.sent, "prev": 0, "bench_t": t}))

    async def receive(self, total: int, latencies: list[float] | None) -> float:
        """Receive (and acknowledge) ``total`` signals; the time the last one arrived."""
        got = 0
        last = time.perf_counter()
        while got < total:
            message = json.loads(await asyncio.wait_for(self.b.recv(), 30))
            items = message if isinstance(message, list) else [message]
            now = time.perf_counter()
            seqs = []
            for item in items:
                if isinstance(item, dict) and "bench_t" in item:
                    got += 1
                    seqs.append(item["seq"])
                    if latencies is not None:
                        latencies.append((now - item["bench_t"]) * 1000.0)
            if seqs:
                await self.b.send(json.dumps({"control": "ack", "to": "a", "session": "bench",
                                              "seqs": seqs}))
            last = now
        return last


async def _flood(peers: _Peers, total: int) -> float:
    receiver = asyncio.create_task(peers.receive(total, None))
    try:
        t0 = time.perf_counter()
        for _ in range(total):
            await peers.send(t0)
        last = await receiver
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
    return total / (last - t0)


async def _paced(peers: _Peers, rate: float, total: int) -> tuple[float, float]:
    latencies: list[float] = []
    receiver = asyncio.create_task(peers.receive(total, latencies))
    try:
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await peers.send(time.perf_counter())
        await receiver
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
    latencies.sort()
    return (latencies[len(latencies) // 2],
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])
