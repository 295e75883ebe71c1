"""Relays sharing their conversations through a real Redis (``tether serve --redis``).

Every test starts Debian's ``redis-server`` on a free loopback port (temp dir, no
persistence) and real ``tether serve`` processes; skipped only when redis-server is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tether.bench.relay import RedisServer
from tether.signaling import SignalingClient

from .test_cli_tunnel import Process, echo, free_port
from .tube_pair import until

pytestmark = pytest.mark.skipif(
    RedisServer.binary() is None,
    reason="redis-server is not installed (Debian: apt install redis-server)",
)

TOKEN = "relay-token-for-redis-tests"
SECRET = "the-tunnel-secret-only-peers-know"


@pytest.fixture
async def redis():
    server = RedisServer()
    await server.start()
    yield server
    await server.close()


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode().split("\r\n"):
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(head.split()[1]), body.decode()


class Relay:
    """A ``tether serve --redis`` process."""

    def __init__(self, process: Process, port: int) -> None:
        self.process = process
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, tmp, name: str, redis: RedisServer, *extra: str,
                    port: int | None = None) -> Relay:
        port = port or free_port()
        process = await Process.start(name, tmp, "serve", "--port", str(port), "--redis",
                                      redis.url, *extra, env={"TETHER_TOKEN": TOKEN})
        relay = cls(process, port)
        await relay.wait_ready()
        return relay

    async def wait_ready(self, timeout: float = 30.0) -> None:
        async def ready() -> bool:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                return (await http_get(self.port, "/healthz"))[0] == 200
            return False

        async with asyncio.timeout(timeout):
            while not await ready():
                if self.process.process.returncode is not None:
                    raise AssertionError(f"relay exited: {self.process.log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        return await self.process.stop(sig)


def collector() -> tuple[list[str], callable]:
    got: list[str] = []
    return got, lambda s: got.append(s["data"])


def sig(n: int) -> dict:
    return {"tube_id": "t1", "kind": "icecandidate", "data": f"s{n}"}


async def test_two_relays_on_one_redis_carry_a_real_tunnel(tmp_path, redis, echo_port):
    a = await Relay.start(tmp_path, "relay-a", redis)
    b = await Relay.start(tmp_path, "relay-b", redis)
    procs = []
    env = {"TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET}
    try:
        expose = await Process.start("expose", tmp_path, "expose", "db", "--target",
                                     f"127.0.0.1:{echo_port}", "--signal", a.url, "--loopback",
                                     env=env)
        procs.append(expose)
        connect_ = await Process.start("connect", tmp_path, "connect", "db", "--listen",
                                       "127.0.0.1:0", "--signal", b.url, "--loopback", env=env)
        procs.append(connect_)
        listen = int((await connect_.line(r"listening on 127\.0\.0\.1:(\d+)", 30)).group(1))
        payload = os.urandom(256 * 1024)
        assert await echo(listen, payload, timeout=60) == payload
        status, text = await http_get(a.port, "/metrics")
        assert status == 200
        assert "tether_relay_signals_relayed_total" in text
        assert "tether_relay_redis_seconds_count" in text
    finally:
        for proc in reversed(procs):
            await proc.stop()
        await a.stop()
        await b.stop()
    logs = "".join(p.log.read_text() for p in [*procs, a.process, b.process])
    assert TOKEN not in logs and SECRET not in logs


async def test_a_killed_relay_loses_no_signal(tmp_path, redis):
    a = await Relay.start(tmp_path, "relay-a", redis)
    b = await Relay.start(tmp_path, "relay-b", redis)
    got_x, on_x = collector()
    got_y, on_y = collector()
    x = SignalingClient([a.url, b.url], TOKEN, "conv", on_x, reconnect_base=0.05,
                        reconnect_max=0.5, resend_after=1.0)
    y = SignalingClient([b.url, a.url], TOKEN, "conv", on_y, reconnect_base=0.05,
                        reconnect_max=0.5, resend_after=1.0)
    try:
        await x.start()
        await y.start()
        assert x.url.startswith(a.url) and y.url.startswith(b.url)
        for n in range(100):
            await x.send(sig(n))
            await y.send(sig(1000 + n))
            if n == 40:
                assert await a.stop(signal.SIGKILL) != 0  # mid-stream, no goodbye
            await asyncio.sleep(0.005)
        async with asyncio.timeout(60):
            await x.drain()
            await y.drain()
        assert got_y == [f"s{n}" for n in range(100)]  # all, once, in order
        assert got_x == [f"s{1000 + n}" for n in range(100)]
        assert x.url.startswith(b.url)  # moved to the surviving relay
    finally:
        await x.close()
        await y.close()
        await a.stop()
        await b.stop()


async def test_a_relay_killed_mid_setup_of_a_tunnel_loses_nothing(tmp_path, redis, echo_port):
    a = await Relay.start(tmp_path, "relay-a", redis)
    b = await Relay.start(tmp_path, "relay-b", redis)
    env = {"TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET}
    both = ["--signal", a.url, "--signal", b.url, "--loopback"]
    procs = []
    try:
        expose = await Process.start("expose", tmp_path, "expose", "db", "--target",
                                     f"127.0.0.1:{echo_port}", *both, env=env)
        procs.append(expose)
        connect_ = await Process.start("connect", tmp_path, "connect", "db", "--listen",
                                       "127.0.0.1:0", *both, env=env)
        procs.append(connect_)
        listen = int((await connect_.line(r"listening on 127\.0\.0\.1:(\d+)", 30)).group(1))
        # Both sides are on relay A, setting up their tube: kill A now.
        assert await a.stop(signal.SIGKILL) != 0
        payload = os.urandom(64 * 1024)
        assert await echo(listen, payload, timeout=90) == payload
        # And a new stream later still works (through relay B only).
        assert await echo(listen, b"again", timeout=60) == b"again"
    finally:
        for proc in reversed(procs):
            await proc.stop()
        await a.stop()
        await b.stop()


async def test_redis_restart_refuses_joins_clearly_then_recovers(tmp_path, redis):
    relay = await Relay.start(tmp_path, "relay", redis)
    got, on_y = collector()
    x = SignalingClient(relay.url, TOKEN, "conv", lambda s: None, reconnect_base=0.05,
                        reconnect_max=0.5, resend_after=1.0)
    y = SignalingClient(relay.url, TOKEN, "conv", on_y, reconnect_base=0.05,
                        reconnect_max=0.5, resend_after=1.0)
    try:
        await x.start()
        await y.start()
        await x.send(sig(1))
        async with asyncio.timeout(20):
            await x.drain()

        await redis.stop()
        async with asyncio.timeout(30):
            while (await http_get(relay.port, "/healthz"))[0] != 503:
                await asyncio.sleep(0.2)
        status, why = await http_get(relay.port, "/healthz")
        assert "not ready" in why
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{relay.url}/?conversation=other&peer=p",
                          additional_headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.value.response.status_code == 503
        assert b"Redis" in refused.value.response.body
        await x.send(sig(2))  # kept by the client meanwhile

        await redis.start()  # same port, empty: the relay notices and the peers join again
        await relay.wait_ready(30)
        await x.send(sig(3))
        async with asyncio.timeout(60):
            await x.drain()
        assert got == ["s1", "s2", "s3"]
    finally:
        await x.close()
        await y.close()
        await relay.stop()
    assert "Traceback" not in relay.process.log.read_text()


async def test_limits_hold_across_relays(tmp_path, redis):
    limit = ["--limit", "max_conversations_per_address=2"]
    a = await Relay.start(tmp_path, "relay-a", redis, *limit)
    b = await Relay.start(tmp_path, "relay-b", redis, *limit)
    clients: list[SignalingClient] = []

    async def join(url: str, conversation: str) -> SignalingClient:
        client = SignalingClient(url, TOKEN, conversation, lambda s: None,
                                 reconnect_base=0.05, reconnect_max=0.2)
        clients.append(client)
        await client.start()
        # Connected means the handshake is done; the join is recorded when the relay's
        # first message (presence) arrives.
        await until(lambda: client.peer_present is not None, 20)
        return client

    try:
        await join(a.url, "one")
        await join(b.url, "two")
        # A third conversation from the same address, on either relay: refused (429).
        for relay in (a, b):
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"{relay.url}/?conversation=three&peer=p",
                              additional_headers={"Authorization": f"Bearer {TOKEN}"})
            assert refused.value.response.status_code == 429
        # Peers of existing conversations still join, on the other relay...
        await join(a.url, "two")
        # ... but a third peer in a conversation, on another relay, is refused (409).
        with pytest.raises(InvalidStatus) as crowded:
            await connect(f"{b.url}/?conversation=two&peer=third",
                          additional_headers={"Authorization": f"Bearer {TOKEN}"})
        assert crowded.value.response.status_code == 409
        # A conversation that ends frees its slot for the whole cluster.
        await clients[0].close()
        async with asyncio.timeout(20):
            await join(b.url, "three")
    finally:
        for client in clients:
            await client.close()
        await a.stop()
        await b.stop()


async def test_metrics_address_and_health(tmp_path, redis):
    metrics_port = free_port()
    relay = await Relay.start(tmp_path, "relay", redis, "--metrics",
                              f"127.0.0.1:{metrics_port}")
    try:
        # The relay's own port is ready; its metrics listener may come a moment later.
        async with asyncio.timeout(30):
            while True:
                try:
                    status, text = await http_get(metrics_port, "/healthz")
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.1)
        assert (status, text.strip()) == (200, "ready")
        status, text = await http_get(metrics_port, "/metrics")
        assert status == 200 and "tether_relay_connections" in text
        status, _ = await http_get(metrics_port, "/other")
        assert status == 404
    finally:
        await relay.stop()


def test_serve_rejects_a_bad_redis_url(tmp_path):
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "tether.cli", "serve", "--token", TOKEN, "--redis",
         "localhost:6379"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2
    assert "redis://HOST:PORT/DB" in done.stderr


class SequencedEcho:
    """A numbered byte stream through the tunnel, checked byte for byte as it echoes back.

    Byte ``i`` of the stream is ``i * 7 % 251``, so any loss, duplicate or reordering is
    caught at the first wrong byte."""

    CHUNK = 4096

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.sent = 0
        self.received = 0
        self.stop = asyncio.Event()
        self._pattern = bytes(n * 7 % 251 for n in range(251 * self.CHUNK))

    def _slice(self, start: int, length: int) -> bytes:
        start %= 251
        return self._pattern[start:start + length]

    async def write(self) -> None:
        while not self.stop.is_set():
            self.writer.write(self._slice(self.sent, self.CHUNK))
            self.sent += self.CHUNK
            await self.writer.drain()
            await asyncio.sleep(0.02)
        self.writer.write_eof()

    async def read(self) -> None:
        while data := await self.reader.read(65536):
            expected = self._slice(self.received, len(data))
            if data != expected:
                at = next(i for i, (x, y) in enumerate(zip(data, expected)) if x != y)
                raise AssertionError(f"echo differs at byte {self.received + at}")
            self.received += len(data)


async def test_a_relay_killed_mid_restart_of_a_tube_loses_nothing(tmp_path, redis, echo_port):
    from .test_control import status_json, tether, tubes_of

    a = await Relay.start(tmp_path, "relay-a", redis)
    b = await Relay.start(tmp_path, "relay-b", redis)
    # Each side on its own "host": its own runtime dir, so `tether restart` reaches one side.
    env_x = {"TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET,
             "TETHER_RUNTIME_DIR": str(tmp_path / "run-expose")}
    env_c = {**env_x, "TETHER_RUNTIME_DIR": str(tmp_path / "run-connect")}
    procs: list[Process] = []
    tasks: list[asyncio.Task] = []
    writer = None
    try:
        procs.append(await Process.start(
            "expose", tmp_path, "expose", "db", "--target", f"127.0.0.1:{echo_port}",
            "--signal", a.url, "--signal", b.url, "--loopback", env=env_x))
        connect_ = await Process.start(
            "connect", tmp_path, "connect", "db", "--listen", "127.0.0.1:0",
            "--signal", b.url, "--signal", a.url, "--loopback", env=env_c)
        procs.append(connect_)
        listen = int((await connect_.line(r"listening on 127\.0\.0\.1:(\d+)", 60)).group(1))
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        stream = SequencedEcho(reader, writer)
        tasks = [asyncio.create_task(stream.write()), asyncio.create_task(stream.read())]
        await until(lambda: stream.received >= 64 * 1024 or any(t.done() for t in tasks), 90)
        assert not any(t.done() for t in tasks), "the echo stream ended before the restart"

        # On loopback a restart takes tens of ms, faster than a kill can be aimed: freeze
        # relay A (the expose side's) first, so the restart's signals are surely in flight
        # through it, then kill it with no goodbye while the restart waits on them.
        a.process.process.send_signal(signal.SIGSTOP)
        code, text, err = await tether("restart", "db", env=env_c, timeout=60)
        assert code == 0, err
        assert "connect db: restarting 1 tube" in text
        await asyncio.sleep(0.5)
        assert await a.stop(signal.SIGKILL) != 0

        async def restarted() -> dict | None:
            for tube in tubes_of(await status_json(env_c, "db"), "db", "connect"):
                r = tube["restarts"]
                assert not r["failed"], f"the restart failed: {tube}"
                if r["succeeded"] >= 1 or (r["started"] >= 1 and tube["state"] == "connected"
                                           and r["by_reason"].get("manual")):
                    return tube
            return None

        async with asyncio.timeout(120):
            while (tube := await restarted()) is None:
                assert not any(t.done() for t in tasks), "the echo stream ended mid-restart"
                await asyncio.sleep(0.5)
        # Premise check: the restart could not finish while relay A was frozen, so it took
        # at least the freeze (0.5 s) and its last signals went through relay B.
        assert max(tube["restarts"]["recoveries_seconds"] or [0.0]) >= 0.4, tube
        # The echo goes on after the restart, through relay B alone.
        mark = stream.received
        await until(lambda: stream.received >= mark + 64 * 1024
                    or any(t.done() for t in tasks), 90)
        stream.stop.set()
        async with asyncio.timeout(90):
            await asyncio.gather(*tasks)
        assert stream.received == stream.sent  # every byte, in order (checked as it came)
        print(f"\nrestart {tube['restarts']}, {stream.sent} bytes echoed in order")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if writer is not None:
            writer.close()
        for proc in reversed(procs):
            await proc.stop()
        await a.stop()
        await b.stop()
    logs = "".join(p.log.read_text() for p in [*procs, a.process, b.process])
    assert TOKEN not in logs and SECRET not in logs
