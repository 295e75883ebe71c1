"""Prometheus metrics scraped over HTTP from a running tunnel (real aiortc peers, a real
relay, a real TCP stream), before and after a manual ICE restart; and `--metrics` on the
real CLI."""

from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tether.app import ConnectSide, ExposeSide
from tether.cores.gathering import LOOPBACK
from tether.echo import start_echo_server
from tether.exporter import MetricsServer
from tether.signaling import SignalingServer

from .test_cli_tunnel import Process, echo, free_port
from .tube_pair import until


async def http_get(address: tuple[str, int], path: str = "/metrics",
                   method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def samples(body: bytes) -> dict[tuple[str, frozenset], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


@pytest.fixture
async def tunnel():
    """A relay, an echo target, and both sides of tunnel 'db' with a tube up."""
    relay = SignalingServer(host="127.0.0.1", port=0, token="t0ken")
    await relay.start()
    target = await start_echo_server("127.0.0.1", 0)
    common = dict(signal_url=f"ws://127.0.0.1:{relay.port}", token="t0ken",
                  host_addresses=LOOPBACK, secret="a-secret-for-the-metrics-test")
    expose = ExposeSide("db", target=target.sockets[0].getsockname()[:2], **common)
    connect = ConnectSide("db", listen=("127.0.0.1", 0), **common)
    await expose.start()
    await connect.start()
    try:
        await connect.wait_ready(timeout=60)
        yield expose, connect
    finally:
        await connect.close()
        await expose.close()
        target.close()
        await target.wait_closed()
        await relay.close()


async def test_metrics_of_a_running_tunnel(tunnel):
    expose, connect = tunnel
    server = MetricsServer(connect, "127.0.0.1", 0)
    await server.start()
    try:
        payload = os.urandom(200_000)
        assert await echo(connect.listen_address[1], payload) == payload
        code, body = await http_get(server.address)
        assert code == 200
        found = samples(body)
        tube = connect.current.tube_id
        base = {"tunnel": "db", "role": "connect", "tube": tube}
        assert value(found, "tether_tube_state", state="connected", **base) == 1.0
        assert value(found, "tether_tube_state", state="failed", **base) == 0.0
        assert value(found, "tether_tube_bytes_sent_total", **base) >= len(payload)
        assert value(found, "tether_tube_bytes_received_total", **base) >= len(payload)
        assert value(found, "tether_tube_streams_opened_total", **base) == 1
        assert value(found, "tether_tube_streams", **base) == 0
        assert value(found, "tether_signaling_connected", tunnel="db") == 1.0
        assert value(found, "tether_restarts_total", reason="manual", tunnel="db") == 0

        async def rtt_known() -> bool:
            return any(n == "tether_tube_rtt_seconds" for n, _ in
                       samples((await http_get(server.address))[1]))

        for _ in range(100):
            if await rtt_known():
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("no RTT measured")

        # A manual restart: counted with its cause, its recovery in the histogram.
        assert await connect.restart() == [tube]
        await until(lambda: connect.current.manager.state.value == "connected"
                    and connect.current.manager.metrics.restarts_succeeded >= 1, 30)
        found = samples((await http_get(server.address))[1])
        assert value(found, "tether_restarts_total", reason="manual", tunnel="db") == 1
        assert value(found, "tether_recovery_seconds_count", tunnel="db") == 1
        assert value(found, "tether_recovery_seconds_bucket", le="+Inf", tunnel="db") == 1
        assert value(found, "tether_recovery_seconds_sum", tunnel="db") > 0

        # Anything else is refused; HEAD has no body.
        assert (await http_get(server.address, "/other"))[0] == 404
        assert (await http_get(server.address, method="POST"))[0] == 405
        assert (await http_get(server.address, method="HEAD")) == (200, b"")
    finally:
        await server.close()


async def test_each_side_has_its_own_registry(tunnel):
    expose, connect = tunnel
    one, two = MetricsServer(expose, "127.0.0.1", 0), MetricsServer(connect, "127.0.0.1", 0)
    await one.start()
    await two.start()
    try:
        roles = set()
        for server in (one, two):
            found = samples((await http_get(server.address))[1])
            roles |= {dict(ls)["role"] for n, ls in found if n == "tether_tubes"}
            assert len([1 for n, _ in found if n == "tether_tubes"]) == 1
        assert roles == {"expose", "connect"}
    finally:
        await one.close()
        await two.close()


async def test_metrics_flag_on_the_cli(tmp_path):
    """`tether expose --metrics HOST:PORT` serves /metrics while it runs."""
    port, metrics_port = free_port(), free_port()
    env = {"TETHER_TOKEN": "tok-metrics", "TETHER_SECRET": "a-secret-for-the-metrics-cli",
           "TETHER_RUNTIME_DIR": str(tmp_path / "run")}
    procs = []
    try:
        serve = await Process.start("serve", tmp_path, "serve", "--port", str(port), env=env)
        procs.append(serve)
        await until(lambda: "ws://" in serve.log.read_text(), 20)
        expose = await Process.start("expose", tmp_path, "expose", "db", "--target",
                                     "127.0.0.1:9", "--signal", f"ws://127.0.0.1:{port}",
                                     "--loopback", "--metrics", f"127.0.0.1:{metrics_port}",
                                     env=env)
        procs.append(expose)
        await until(lambda: "metrics on http://127.0.0.1" in expose.log.read_text(), 30)
        code, body = await http_get(("127.0.0.1", metrics_port))
        assert code == 200
        found = samples(body)
        assert value(found, "tether_tubes", tunnel="db", role="expose") == 0
        assert value(found, "tether_signaling_connected", tunnel="db") == 1
    finally:
        for proc in reversed(procs):
            await proc.stop()


