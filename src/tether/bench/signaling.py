"""Signaling figures: the client's signal path end to end, and (when the relay's own
benchmark, :mod:`tether.bench.relay`, is missing or fails) the relay's signals per second
and latency.

``handler_signals_per_s`` (issue 9: "the client's signal path at least 300k signals/s"):
a stand-in relay in this process speaks the relay's documented wire protocol over a real
loopback TCP connection: it accepts the WebSocket handshake (no compression: the client
offers none, so the real relay sends none either), sends the presence message the relay
sends first, then writes frames of 10 signals (``icecandidate``, one sender and session,
seq 1, 2, 3, ... with ``prev``, 100 tubes in turn) from bytes built beforehand, as fast as
the socket takes them. What is counted is what this process then does per signal: a real
:class:`~tether.signaling.SignalingClient` reads each WebSocket frame, parses and
validates it, checks each signal's order (its Inbox) and acknowledges it to the sender (ack
frames written back on the socket and read by the stand-in), then hands each signal to
a real :class:`~tether.router.SignalRouter` (its ``route_nowait``), which records activity
and delivers it to one of 100 registered, CONNECTED :class:`~tether.connection_manager.TunnelConnectionManager`s,
which hands the candidate to its core (a :class:`~tether.bench.managers.NullCore` that
counts). The clock runs from the first frame written to the last candidate reaching the
core; the stand-in's writing costs this process almost nothing (pre-built bytes).

``handler_sealed_signals_per_s``: the same with end-to-end sealing as the CLI does it with a
tunnel secret: the frames carry signals sealed by the other role's
:class:`~tether.sealing.Sealer`, and each is opened (AES-GCM, replay check) before routing.
``..._per_cpu_s``: the same count per CPU second of this process (steadier than wall time
on a machine shared with other work). ``handler_ack_frames_per_frame``: ack frames the
client wrote per frame it read (at most 1; less when it coalesced the acks of a burst).

``relay_signals_per_s`` / ``relay_p50_ms`` / ``relay_p99_ms``: a real ``tether serve``
process on loopback and two raw WebSocket peers in this process; one signal per frame, as
fast as the relay forwards them, then paced at 1,000 signals/s for the latency.

Rerun: ``python -m tether.bench.signaling [N]`` prints the handler figures as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import connect

try:  # websockets' C unmasking, as the client's own reader uses it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from ..connection_manager import ManagerRegistry
from ..router import SignalRouter
from .managers import NullCore, connect_all, make_managers

PER_FRAME = 10
TUBES = 100
CANDIDATE = "candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host"
SENDER, SESSION = "bench-peer", "bench-session"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _signals(total: int, conversation: str) -> list[dict[str, Any]]:
    return [{"tube_id": f"tube-{seq % TUBES:06d}", "conversation_id": conversation,
             "kind": "icecandidate", "data": CANDIDATE} for seq in range(1, total + 1)]


def _frames(total: int, conversation: str, sealer: Any = None) -> list[str]:
    """Frames of PER_FRAME signals as the relay writes them (with the transport fields)."""
    frames = []
    wires = _signals(total, conversation)
    if sealer is not None:
        wires = [sealer.seal(signal) for signal in wires]
    for start in range(0, total, PER_FRAME):
        batch = []
        for seq in range(start + 1, min(start + PER_FRAME, total) + 1):
            wire = wires[seq - 1]
            wire.update(peer=SENDER, session=SESSION, seq=seq, prev=seq - 1)
            batch.append(wire)
        frames.append(json.dumps(batch, separators=(",", ":")))
    return frames


def server_frame(text: str) -> bytes:
    """An unmasked WebSocket text frame (relay -> client)."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + data
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + data


class StandInRelay(asyncio.Protocol):
    """The relay's side of one client connection: handshake, presence, pre-built frames.

    Reads (and counts) the client's frames: its acknowledgements (unmasked and parsed in
    C, so that reading them costs this process little). Echoes a close frame.
    """

    def __init__(self, frames: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        self.frames = frames
        self.opened = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ack_frames = 0
        self.acked_seqs = 0
        self.on_ack: Callable[[dict[str, Any]], None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.started_at = 0.0
        self.started_cpu = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during the handshake: {exc}"))
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.opened.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            key = b""
            for line in bytes(buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                + server_frame('{"control":"peer","event":"present"}'))
            del buf[:end + 4]
            self.opened.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:  # client frames are masked: 2 + (0|2|8) + 4 + payload
            length = buf[pos + 1] & 0x7F
            head = 2 if length < 126 else 4 if length == 126 else 10
            if size - pos < head + 4:
                break
            if head > 2:
                length = int.from_bytes(buf[pos + 2:pos + head], "big")
            if size - pos < head + 4 + length:
                break
            opcode = buf[pos] & 0x0F
            mask = buf[pos + head:pos + head + 4]
            start = pos + head + 4
            pos = start + length
            if opcode == 0x1:
                message = orjson.loads(apply_mask(bytes(buf[start:pos]), bytes(mask)))
                if isinstance(message, dict) and message.get("control") == "ack":
                    self.ack_frames += 1
                    self.acked_seqs += len(message.get("seqs", ()))
                    if self.on_ack is not None:
                        self.on_ack(message)
            elif opcode == 0x8 and self.transport is not None:
                self.transport.write(b"\x88\x00")
                self.transport.close()
        del buf[:pos]

    async def pump(self, chunk: int = 32) -> None:
        """Write every frame, ``chunk`` at a time, whenever the socket takes more."""
        assert self.transport is not None
        self.started_at = time.perf_counter()
        self.started_cpu = time.process_time()
        for start in range(0, len(self.frames), chunk):
            await self.writable.wait()
            if self.transport.is_closing():
                raise ConnectionError("the client closed the connection")
            self.transport.write(b"".join(self.frames[start:start + chunk]))


class CountingCore(NullCore):
    """A NullCore that counts the candidates it is handed and says when it has ``total``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.candidates = 0
        self.done = asyncio.get_running_loop().create_future()

    async def add_ice_candidate(self, tube_id, candidate):
        self.candidates += 1
        if self.candidates >= self.total and not self.done.done():
            self.done.set_result((time.perf_counter(), time.process_time()))


async def _router_into(core: NullCore) -> tuple[ManagerRegistry, SignalRouter]:
    """TUBES registered, CONNECTED managers on ``core``, and a router to them."""
    registry = ManagerRegistry()
    managers = make_managers(TUBES, core)
    for manager in managers:
        registry.register(manager)
    await connect_all(managers)

    async def reply(signal: dict[str, Any]) -> None:
        return None

    return registry, SignalRouter(registry, reply=reply)


async def measure_handler(total: int, *, sealed: bool | None = None) -> dict[str, Any]:
    """Signals per second from WebSocket frames through the client into the managers' core.

    ``sealed`` None: both figures (the sealed one with a fifth of ``total``)."""
    if sealed is None:
        out = await measure_handler(total, sealed=False)
        out.update(await measure_handler(max(PER_FRAME, total // 5), sealed=True))
        out.update(await measure_router(total))
        out.update(await measure_floor(total))
        return out
    from ..sealing import Sealer
    from ..signaling import SignalingClient

    name = "bench-handler"
    opener = None
    conversation = name
    wire_sealer = None
    if sealed:
        secret = secrets.token_urlsafe(32)
        opener = Sealer(secret, name, "connect")
        wire_sealer = Sealer(secret, name, "expose")
        conversation = opener.conversation_id
    frames = [server_frame(f) for f in _frames(total, conversation, wire_sealer)]

    core = CountingCore(total)
    registry, router = await _router_into(core)
    # route_nowait: the router's entry for an on_signal that may return None (no
    # coroutine of its own for a candidate to a known tube; route() costs one more).
    on_signal: Any = router.route_nowait
    if opener is not None:
        open_, route = opener.open, router.route_nowait

        def on_signal(wire: dict[str, Any]) -> Any:
            return route(open_(wire))

    loop = asyncio.get_running_loop()
    relays: list[StandInRelay] = []

    def accept() -> StandInRelay:
        relays.append(StandInRelay(frames))
        return relays[-1]

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = SignalingClient(f"ws://127.0.0.1:{port}", "bench-token", conversation,
                             on_signal, proxy=None)
    pump: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(30):
            await client.start()
        relay = relays[0]
        async with asyncio.timeout(30):
            await relay.opened
        pump = asyncio.create_task(relay.pump())
        async with asyncio.timeout(120):
            finished, finished_cpu = await core.done
        seconds = finished - relay.started_at
        cpu_seconds = finished_cpu - relay.started_cpu
        async with asyncio.timeout(30):
            await pump
    finally:
        if pump is not None and not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        await client.close()
        await registry.close()
        server.close()
        await server.wait_closed()
    key = "handler_sealed_signals_per_s" if sealed else "handler_signals_per_s"
    out = {key: total / seconds, key.replace("_per_s", "_per_cpu_s"): total / cpu_seconds}
    if not sealed:
        out["handler_ack_frames_per_frame"] = relay.ack_frames / len(frames)
    return out


async def measure_router(total: int) -> dict[str, Any]:
    """``router_signals_per_s``: the router alone (``route_nowait``) on parsed signals, as
    the client hands them over, into the same 100 managers and counting core (best of 3).

    A yardstick for the machine as much as a figure: the day issue 9 set the 300k/s target
    for the whole path, this part alone did 1.1M/s."""
    wires = _signals(total, "bench")
    for seq, wire in enumerate(wires, 1):
        wire.update(peer=SENDER, session=SESSION, seq=seq, prev=seq - 1)
    core = CountingCore(3 * total)
    registry, router = await _router_into(core)
    route = router.route_nowait
    best = math.inf
    try:
        for _ in range(3):
            started = time.perf_counter()
            for wire in wires:
                result = route(wire)
                if result is not None:
                    await result
            best = min(best, time.perf_counter() - started)
    finally:
        await registry.close()
    if core.candidates != 3 * total:
        raise RuntimeError(f"the router delivered {core.candidates} of {3 * total} candidates")
    return {"router_signals_per_s": total / best}


async def measure_floor(total: int) -> dict[str, Any]:
    """``handler_floor_signals_per_s``: the least any Python client does per signal, on the
    same frames: parse each frame (orjson), find each signal's tube in a dict, await its
    core's ``add_ice_candidate`` (best of 3, per CPU second). No validation, order check,
    acknowledgement, router, manager or socket: what is left when all of those cost
    nothing. ``tether bench`` divides it by ``handler_signals_per_cpu_s``:
    ``handler_cpu_vs_floor``, the client's CPU per signal in floors."""
    frames = _frames(total, "bench")
    core = CountingCore(3 * total)
    cores = {f"tube-{tube:06d}": core for tube in range(TUBES)}
    loads = orjson.loads
    best = math.inf
    for _ in range(3):
        started = time.process_time()
        for frame in frames:
            for signal in loads(frame):
                await cores[signal["tube_id"]].add_ice_candidate(signal["tube_id"], signal["data"])
        best = min(best, time.process_time() - started)
    if core.candidates != 3 * total:
        raise RuntimeError(f"the floor delivered {core.candidates} of {3 * total} candidates")
    return {"handler_floor_signals_per_s": total / best}


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
            async with asyncio.timeout(5):
                await proc.wait()
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
    each frame (the most a SignalingClient sends), ``a`` reads the forwarded acks (flow
    control)."""

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
            async with asyncio.timeout(30):
                await self.acked_changed.wait()
        self.sent += 1
        await self.a.send(json.dumps({
            "tube_id": "bench-tube", "conversation_id": "", "kind": "icecandidate",
            "data": CANDIDATE, "session": "bench", "seq": self.sent, "prev": 0, "bench_t": t}))

    async def receive(self, total: int, latencies: list[float] | None) -> float:
        """Receive (and acknowledge) ``total`` signals; the time the last one arrived."""
        got = 0
        last = time.perf_counter()
        while got < total:
            async with asyncio.timeout(30):
                message = json.loads(await self.b.recv())
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


def main() -> None:
    from .. import runloop

    total = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(json.dumps(runloop.run(measure_handler(total)), indent=1))


if __name__ == "__main__":
    main()
