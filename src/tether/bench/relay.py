"""The relay's own benchmark: real ``tether serve`` processes (in memory, on Redis, two on
Redis) driven by light raw WebSocket peers in this process.

The peers are deliberately cheap (a hand-written frame parser, pre-encoded frames, mask key
zero) so that the relay, not the load generator, is what is measured: the relay parses,
validates and relays every signal, and forwards the receiving peer's acknowledgements. The
receiver acknowledges as :class:`SignalingClient` does since issue 9: one ack frame for all
the signal frames it read at once (a burst), never more than one per frame.

Figures (``await measure(quick)``):

- ``relay_signals_per_s``: one signal per frame (issue 9: "the relay at least 50k signals/s
  one per frame"), sent by 8 senders in 8 conversations in parallel (at most 64 frames in
  flight each) through one in-memory relay; counted when the receivers have them; the
  receivers acknowledge per read as above (the relay forwards every ack frame).
- ``relay_ack_each_signals_per_s`` / ``relay_ack_each_cpu_us_per_signal``: the same with one
  ack frame per signal frame (the client before issue 9), for comparison.
- ``relay_p50_ms`` / ``relay_p99_ms``: one conversation paced at 1,000 signals/s.
- ``relay_cpu_us_per_signal`` / ``relay_signals_per_cpu_s``: the relay process's CPU per
  signal in that run, and the rate that makes on one whole core.
- ``relay_batch_signals_per_s``: frames of 10 signals.
- ``relay_<config>_signals_per_s`` / ``_p50_ms`` / ``_p99_ms`` for ``memory``, ``redis``,
  ``redis2`` (two relays on one Redis, half the pairs split across them): 1,000 conversations
  (one sender and one receiver each) at full speed, then paced at 1,000 signals/s in total
  for the latency; ``relay_redis2_vs_redis``.
- ``relay_idle_peer_bytes`` / ``relay_idle_cpu_pct``: the relay's RSS growth per idle connected
  peer and its CPU while they idle, at 100, 1,000 and 10,000 peers (``relay_idle`` has each
  point, with the marginal slope). RSS from /proc of the relay process, peers in this one;
  baseline after 20 warm-up peers, read once every peer is idle (see ``_idle``).

Rerun: ``python -m tether.bench.relay [--quick]`` prints the JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

TOKEN = "relay-bench-token"
CANDIDATE = "candidate:1 1 UDP 2130706431 127.0.0.1 50000 typ host"
BIG_LIMITS = [
    "max_connections=40000", "max_connections_per_address=40000", "max_conversations=40000",
    "max_conversations_per_address=40000", "join_rate=100000", "join_burst=100000",
    "total_join_rate=100000", "total_join_burst=100000",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ---------------------------------------------------------------------------


class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port: temp dir, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="tether-redis-")
        self.process: asyncio.subprocess.Process | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = self.binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt install redis-server)")
        self.process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.dir, "--protected-mode", "yes",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                if self.process.returncode is not None:
                    raise RuntimeError("redis-server exited at once") from None
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start listening")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def close(self) -> None:
        await self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def start_relay(*extra: str, port: int | None = None) -> tuple[asyncio.subprocess.Process, int]:
    port = port or free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether.cli", "serve", "--port", str(port), "--token", TOKEN,
        *extra, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return process, port
        if process.returncode is not None:
            raise RuntimeError("tether serve exited at once")
        await asyncio.sleep(0.1)
    await stop(process)
    raise RuntimeError("tether serve did not become ready")


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def _proc_stats(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


# -- a raw WebSocket peer ------------------------------------------------------------------


def _client_frame(text: str) -> bytes:
    """A masked text frame with mask key 0 (the payload stays as it is)."""
    data = text.encode()
    n = len(data)
    if n < 126:
        header = bytes((0x81, 0x80 | n))
    elif n < 65536:
        header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + b"\0\0\0\0" + data


class RawPeer(asyncio.Protocol):
    """One relay connection: counts relayed signal frames and acknowledges them if asked.

    ``ack`` is the ack's JSON text up to the seqs (``...,"seqs":[``). ``ack_each``: one ack
    frame per signal frame (the client before issue 9); otherwise one ack frame for all the
    frames of one read, as :class:`SignalingClient` now acknowledges a burst.
    """

    def __init__(self, ack: str | None, parse: bool = False, ack_each: bool = False) -> None:
        self.ack = ack
        self.ack_each = ack_each
        self._acks: dict[int, bytes] = {}
        self.parse = parse
        self.buffer = bytearray()
        self.open = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.signals = 0
        self.acks = 0
        self.latencies: list[float] = []
        self.changed = asyncio.Event()
        self.handshake = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.handshake)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(ConnectionError(f"closed during the handshake: {exc}"))
        self.changed.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        if not self.open.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            if b" 101 " not in status:
                self.open.set_exception(ConnectionError(bytes(buf[:200]).decode(errors="replace")))
                return
            self.open.set_result(None)
            pos = end + 4
        size = len(buf)
        frames = 0
        signals = self.signals
        out: list[bytes] = []
        while size - pos >= 2:
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if size - pos < head + length:
                break
            opcode = buf[pos] & 0x0F
            start = pos + head
            pos = start + length
            if opcode == 0x9:  # ping: pong with the same payload
                out.append(bytes((0x8A, 0x80 | length)) + b"\0\0\0\0" + bytes(buf[start:pos]))
                continue
            if opcode != 0x1:
                continue
            first = buf[start + 2:start + 9]
            if first == b"control":  # {"control":...}: presence or a forwarded ack
                if bytes(buf[start:pos]).find(b'"ack"') >= 0:
                    self.acks += 1
                continue
            if self.parse:
                payload = json.loads(bytes(buf[start:pos]))
                for signal in payload if isinstance(payload, list) else [payload]:
                    if signal.get("kind") == "icecandidate":
                        self.latencies.append(time.perf_counter() - float(signal["data"]))
                        self.signals += 1
            else:
                count = buf.count(b'"tube_id"', start, pos)
                self.signals += count
            frames += 1
        del buf[:pos]
        if frames and self.ack is not None:
            out.append(self.ack_frame(1) * frames if self.ack_each
                       else self.ack_frame(max(1, self.signals - signals)))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        self.changed.set()

    def ack_frame(self, seqs: int) -> bytes:
        """An ack of ``seqs`` signals (built once per count)."""
        frame = self._acks.get(seqs)
        if frame is None:
            assert self.ack is not None
            frame = self._acks[seqs] = _client_frame(self.ack + ",".join(["1"] * seqs) + "]}")
        return frame

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_peer(port: int, conversation: str, peer: str, ack: str | None = None,
                    parse: bool = False, ack_each: bool = False) -> RawPeer:
    loop = asyncio.get_running_loop()
    protocol = RawPeer(ack, parse, ack_each)
    protocol.handshake = (
        f"GET /?conversation={conversation}&peer={peer} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()
    await loop.create_connection(lambda: protocol, "127.0.0.1", port)
    async with asyncio.timeout(30):
        await protocol.open
    return protocol


def _signal_frame(conversation: str, per_frame: int, data: str = CANDIDATE) -> bytes:
    signal = {"tube_id": "t1", "conversation_id": conversation, "kind": "icecandidate",
              "data": data, "peer": "tx", "session": "s", "seq": 1, "prev": 0}
    text = json.dumps(signal if per_frame == 1 else [signal] * per_frame, separators=(",", ":"))
    return _client_frame(text)


class Pair:
    """A sender and a receiver in one conversation (possibly on different relays)."""

    def __init__(self, sender: RawPeer, receiver: RawPeer, conversation: str) -> None:
        self.sender = sender
        self.receiver = receiver
        self.conversation = conversation

    @classmethod
    async def open(cls, conversation: str, send_port: int, receive_port: int,
                   parse: bool = False, ack_each: bool = False) -> Pair:
        ack = '{"control":"ack","to":"tx","session":"s","seqs":['
        receiver = await open_peer(receive_port, conversation, "rx", ack, parse, ack_each)
        sender = await open_peer(send_port, conversation, "tx")
        return cls(sender, receiver, conversation)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()

    async def blast(self, frames: int, per_frame: int, window: int = 64,
                    chunk: int = 16) -> None:
        frame = _signal_frame(self.conversation, per_frame)
        target = self.receiver.signals + frames * per_frame
        sent = 0
        base = self.receiver.signals
        while sent < frames:
            while sent * per_frame - (self.receiver.signals - base) >= window * per_frame:
                self.receiver.changed.clear()
                await self.receiver.changed.wait()
            n = min(chunk, frames - sent)
            self.sender.send(frame * n)
            sent += n
        while self.receiver.signals < target:
            if self.receiver.transport is None or self.receiver.transport.is_closing():
                raise ConnectionError("the relay dropped the receiver")
            self.receiver.changed.clear()
            await self.receiver.changed.wait()


async def _throughput(pairs: list[Pair], frames: int, per_frame: int,
                      window: int = 64) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(300):
        await asyncio.gather(*(p.blast(frames, per_frame, window, min(16, window))
                               for p in pairs))
    return len(pairs) * frames * per_frame / (time.perf_counter() - started)


async def _paced(pairs: list[Pair], rate: float, seconds: float) -> tuple[float, float]:
    """Send ``rate`` signals/s in total, round robin over the pairs; (p50, p99) in ms."""
    for pair in pairs:
        pair.receiver.latencies.clear()
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index in range(total):
        due = start + index / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pair = pairs[index % len(pairs)]
        pair.sender.send(_client_frame(json.dumps(
            {"tube_id": "t1", "conversation_id": pair.conversation, "kind": "icecandidate",
             "data": repr(time.perf_counter()), "peer": "tx", "session": "s", "seq": index + 1,
             "prev": 0},
            separators=(",", ":"))))
    deadline = loop.time() + 10
    while sum(len(p.receiver.latencies) for p in pairs) < total and loop.time() < deadline:
        await asyncio.sleep(0.01)
    latencies = sorted(x for p in pairs for x in p.receiver.latencies)
    if not latencies:
        raise RuntimeError("no signal arrived")
    return (latencies[len(latencies) // 2] * 1000,
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000)


async def _pairs(ports: list[int], count: int, prefix: str, parse: bool = False,
                 concurrency: int = 50, ack_each: bool = False) -> list[Pair]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Pair:
        async with semaphore:
            send_port = ports[i % len(ports)]
            receive_port = ports[(i // 2) % len(ports)]
            return await Pair.open(f"{prefix}-{i}", send_port, receive_port, parse, ack_each)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


# -- figures -------------------------------------------------------------------------------


async def _single_relay(quick: bool) -> dict[str, Any]:
    relay, port = await start_relay(*[a for limit in BIG_LIMITS for a in ("--limit", limit)])
    out: dict[str, Any] = {}
    try:
        pairs = await _pairs([port], 8, "one")
        frames = 2_000 if quick else 10_000
        await _throughput(pairs, 200, 1)  # warm up
        _, cpu0 = _proc_stats(relay.pid)
        out["relay_signals_per_s"] = await _throughput(pairs, frames, 1)
        _, cpu1 = _proc_stats(relay.pid)
        # The relay's own CPU per signal (its frame and its share of the receiver's ack
        # frames): what the rate would be with a whole core to itself, on a machine shared
        # with the peers.
        out["relay_cpu_us_per_signal"] = (cpu1 - cpu0) / (len(pairs) * frames) * 1e6
        out["relay_signals_per_cpu_s"] = 1e6 / out["relay_cpu_us_per_signal"]
        out["relay_batch_signals_per_s"] = await _throughput(pairs, frames // 5, 10)
        for pair in pairs:
            pair.close()
        # The same with one ack frame per signal frame (the client before issue 9).
        pairs = await _pairs([port], 8, "each", ack_each=True)
        await _throughput(pairs, 200, 1)
        _, cpu0 = _proc_stats(relay.pid)
        out["relay_ack_each_signals_per_s"] = await _throughput(pairs, frames, 1)
        _, cpu1 = _proc_stats(relay.pid)
        out["relay_ack_each_cpu_us_per_signal"] = (cpu1 - cpu0) / (len(pairs) * frames) * 1e6
        for pair in pairs:
            pair.close()
        paced = await _pairs([port], 1, "paced", parse=True)
        p50, p99 = await _paced(paced, 1000, 1.0 if quick else 3.0)
        out["relay_p50_ms"], out["relay_p99_ms"] = p50, p99
        for pair in paced:
            pair.close()
    finally:
        await stop(relay)
    return out


async def _config(name: str, ports: list[int], tubes: int, quick: bool) -> dict[str, Any]:
    pairs = await _pairs(ports, tubes, name)
    try:
        frames = 10 if quick else 40
        await _throughput(pairs[:50], 20, 1, window=8)  # warm up
        rate = await _throughput(pairs, frames, 1, window=8)
    finally:
        for pair in pairs:
            pair.close()
    paced = await _pairs(ports, tubes, name + "-paced", parse=True)
    try:
        p50, p99 = await _paced(paced, 1000, 1.0 if quick else 3.0)
    finally:
        for pair in paced:
            pair.close()
    return {f"relay_{name}_signals_per_s": rate, f"relay_{name}_p50_ms": p50,
            f"relay_{name}_p99_ms": p99}


async def _configs(quick: bool) -> dict[str, Any]:
    tubes = 200 if quick else 1000
    limits = [a for limit in BIG_LIMITS for a in ("--limit", limit)]
    out: dict[str, Any] = {"relay_tubes": tubes}
    relay, port = await start_relay(*limits)
    try:
        out.update(await _config("memory", [port], tubes, quick))
    except Exception as exc:
        out["relay_memory_error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        await stop(relay)
    if RedisServer.binary() is None:
        out["relay_redis_signals_per_s"] = None
        out["relay_redis_reason"] = "redis-server is not installed"
        return out
    redis = RedisServer()
    relays: list[asyncio.subprocess.Process] = []
    try:
        await redis.start()
        relay, port = await start_relay(*limits, "--redis", redis.url)
        relays.append(relay)
        out.update(await _config("redis", [port], tubes, quick))
        await stop(relay)  # a fresh pair of relays for the next figure
        relay, port = await start_relay(*limits, "--redis", redis.url)
        relays.append(relay)
        relay2, port2 = await start_relay(*limits, "--redis", redis.url)
        relays.append(relay2)
        out.update(await _config("redis2", [port, port2], tubes, quick))
        out["relay_redis2_vs_redis"] = (
            out["relay_redis2_signals_per_s"] / out["relay_redis_signals_per_s"]
        )
    finally:
        for relay in relays:
            await stop(relay)
        await redis.close()
    return out


IDLE_WARMUP_PEERS = 20
"""Connected (and kept) before the baseline: the first connections also load code and fill
caches once per process, which is no peer's cost."""
IDLE_SETTLE_S = 4.0
"""Wait after the joins before reading RSS: longer than the relay writer's idle exit (2 s),
so each peer is idle (no writer task or queue left from its join's presence frame)."""


async def _idle(quick: bool) -> dict[str, Any]:
    """RSS growth of a real ``tether serve`` per idle connected peer (WebSocket connection).

    ``bytes_per_peer`` = (VmRSS now - VmRSS with ``IDLE_WARMUP_PEERS`` peers) / peers added
    since: everything the process holds more (Python objects, allocator slack, websockets'
    and our buffers), read from /proc, peers in this other process. ``marginal_bytes_per_peer``
    is the slope from the previous point."""
    points = [100, 1000] if quick else [100, 1000, 10_000]
    relay, port = await start_relay(*[a for limit in BIG_LIMITS for a in ("--limit", limit)])
    series: list[dict[str, Any]] = []
    pairs: list[Pair] = []
    try:
        pairs.extend(await _pairs([port], IDLE_WARMUP_PEERS // 2, "warm", concurrency=10))
        await asyncio.sleep(IDLE_SETTLE_S)
        base_rss, _ = _proc_stats(relay.pid)
        last_rss, last_peers = base_rss, 0
        for peers in points:
            more = await _pairs([port], peers // 2 - (len(pairs) - IDLE_WARMUP_PEERS // 2),
                                f"idle{peers}", concurrency=100)
            pairs.extend(more)
            await asyncio.sleep(IDLE_SETTLE_S)
            rss, cpu0 = _proc_stats(relay.pid)
            await asyncio.sleep(3.0)
            _, cpu1 = _proc_stats(relay.pid)
            series.append({"peers": peers, "rss_bytes": rss,
                           "bytes_per_peer": (rss - base_rss) / peers,
                           "marginal_bytes_per_peer": (rss - last_rss) / (peers - last_peers),
                           "cpu_pct": (cpu1 - cpu0) / 3.0 * 100})
            last_rss, last_peers = rss, peers
    finally:
        for pair in pairs:
            pair.close()
        await stop(relay)
    last = series[-1]
    return {"relay_idle": series, "relay_idle_peer_bytes": last["bytes_per_peer"],
            "relay_idle_cpu_pct": last["cpu_pct"]}


async def measure(quick: bool) -> dict[str, Any]:
    """Every relay figure (see the module docstring); a part that fails gives its reason."""
    out: dict[str, Any] = {}
    for part in (_single_relay, _configs, _idle):
        try:
            out.update(await part(quick))
        except Exception as exc:  # one broken part must not hide the others
            out[f"{part.__name__.strip('_')}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(measure(quick)), indent=1))


if __name__ == "__main__":
    main()

