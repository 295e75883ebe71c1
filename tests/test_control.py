"""`tether status | restart | stop` against real running tunnels, from another process; the
control socket's protocol, permissions and stale-socket handling; the status arithmetic
(rates, idle time, recovery times) with an injected clock."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from tether import control
from tether.connection_manager import ConnectionState
from tether.tubestats import Histogram, TubeTrack, classify

from .test_cli_tunnel import TETHER, Process, echo, free_port
from .tube_pair import until

TOKEN = "relay-token-for-the-control-test"
SECRET = "the-tunnel-secret-for-the-control-test"


async def tether(*args: str, env: dict[str, str], timeout: float = 30.0) -> tuple[int, str, str]:
    """Run one short tether command; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *TETHER, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200", **env})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status_json(env: dict[str, str], *name: str) -> dict:
    code, out, err = await tether("status", *name, "--json", env=env)
    assert code == 0, err
    return json.loads(out)


def tubes_of(status: dict, name: str, role: str) -> list[dict]:
    return [t for s in status["tunnels"] if s["name"] == name and s["role"] == role
            for t in s["tubes"]]


async def test_status_restart_and_stop_of_two_running_tunnels(tmp_path: Path, echo_port: int):
    runtime = tmp_path / "run"
    env = {"TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET, "TETHER_RUNTIME_DIR": str(runtime)}
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    procs: list[Process] = []
    try:
        serve = await Process.start("serve", tmp_path, "serve", "--port", str(port), env=env)
        procs.append(serve)
        await until(lambda: "ws://" in serve.log.read_text(), 20)
        listens = {}
        for name in ("alpha", "beta"):
            procs.append(await Process.start(
                f"expose-{name}", tmp_path, "expose", name, "--target",
                f"127.0.0.1:{echo_port}", "--signal", url, "--loopback", env=env))
            connect = await Process.start(f"connect-{name}", tmp_path, "connect", name,
                                          "--listen", "127.0.0.1:0", "--signal", url,
                                          "--loopback", env=env)
            procs.append(connect)
            listens[name] = int((await connect.line(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
            await until(lambda c=connect: "tunnel open" in c.log.read_text(), 60)

        # Sockets: a private directory, owner-only sockets, one per side.
        await until(lambda: len(list(runtime.iterdir())) == 4, 30)
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
        socks = sorted(p.name for p in runtime.iterdir())
        assert socks == ["connect-alpha.sock", "connect-beta.sock", "expose-alpha.sock",
                         "expose-beta.sock"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in runtime.iterdir())

        payload = os.urandom(300_000)
        assert await echo(listens["alpha"], payload) == payload
        # A stream held open, so status shows it with its client address.
        reader, writer = await asyncio.open_connection("127.0.0.1", listens["alpha"])
        writer.write(b"held open")
        assert await reader.readexactly(9) == b"held open"
        client = "127.0.0.1:%d" % writer.get_extra_info("sockname")[1]

        status = await status_json(env)
        assert sorted((s["role"], s["name"]) for s in status["tunnels"]) == [
            ("connect", "alpha"), ("connect", "beta"), ("expose", "alpha"), ("expose", "beta")]
        for tunnel in status["tunnels"]:
            assert tunnel["signaling"]["connected"] and tunnel["pid"] > 0
        [tube] = [t for t in tubes_of(status, "alpha", "connect") if t["state"] == "connected"]
        assert tube["path"]["via"] == "direct"
        assert tube["path"]["local"].startswith("127.0.0.1:")
        assert tube["path"]["remote"].startswith("127.0.0.1:")
        assert tube["rtt_ms"] is not None and tube["rtt_ms"] >= 0
        assert tube["bytes_to_peer"] >= len(payload) + 9
        assert tube["bytes_from_peer"] >= len(payload) + 9
        [held] = [s for s in tube["streams"] if s["client"] == client]
        assert held["bytes_sent"] == 9 and held["state"] == "open"
        assert tube["idle_seconds"] is not None

        # During a transfer: a rate, and an idle time that stays near zero.
        flowing = asyncio.Event()

        async def transfer() -> None:
            r, w = await asyncio.open_connection("127.0.0.1", listens["beta"])
            chunk = b"y" * 65536
            try:
                while True:
                    w.write(chunk)
                    await w.drain()
                    await r.readexactly(len(chunk))
                    flowing.set()
            finally:
                w.close()

        mover = asyncio.create_task(transfer())
        try:
            await asyncio.wait_for(flowing.wait(), 30)
            await asyncio.sleep(2.5)
            [busy] = [t for t in tubes_of(await status_json(env, "beta"), "beta", "connect")
                      if t["state"] == "connected"]
            print(f"\nduring a transfer: up {busy['rate_to_peer'] / 1e6:.2f} MB/s, "
                  f"idle {busy['idle_seconds']:.2f} s")
            assert busy["rate_to_peer"] > 0 and busy["rate_from_peer"] > 0
            assert busy["idle_seconds"] < 2.0
        finally:
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)

        # The human form names both tunnels and shows the path.
        code, text, _ = await tether("status", env=env)
        assert code == 0
        print("\n" + text)
        assert "connect alpha" in text and "expose beta" in text and "direct 127.0.0.1:" in text

        # A manual restart of alpha, counted with its cause on both sides; beta untouched.
        code, text, err = await tether("restart", "alpha", env=env)
        assert code == 0, err
        assert "connect alpha: restarting 1 tube" in text

        async def restarted() -> bool:
            tubes = tubes_of(await status_json(env, "alpha"), "alpha", "connect")
            return any(t["restarts"]["by_reason"].get("manual") and t["state"] == "connected"
                       for t in tubes)

        for _ in range(60):
            if await restarted():
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("no manual restart recorded")
        writer.write(b"after restart")
        assert await reader.readexactly(13) == b"after restart"  # the stream lived through it
        writer.close()
        beta = await status_json(env, "beta")
        assert all(not t["restarts"]["by_reason"] for s in beta["tunnels"] for t in s["tubes"])

        # Stop beta from here: both its processes exit 0 and remove their sockets.
        code, text, err = await tether("stop", "beta", env=env)
        assert code == 0, err
        for proc in procs:
            if proc.name.endswith("beta"):
                assert await asyncio.wait_for(proc.process.wait(), 20) == 0
        assert sorted(p.name for p in runtime.iterdir()) == ["connect-alpha.sock",
                                                              "expose-alpha.sock"]
        code, _, err = await tether("status", "beta", env=env)
        assert code == 1 and "no running tunnel named 'beta'" in err
        assert await echo(listens["alpha"], b"alpha still works") == b"alpha still works"
    finally:
        for proc in reversed(procs):
            await proc.stop()
    logs = "".join(p.log.read_text() for p in procs)
    assert TOKEN not in logs and SECRET not in logs


# -- the protocol, on a real Unix socket in this process ------------------------------------


async def ask_raw(path: Path, data: bytes) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    writer.write_eof()
    lines = (await asyncio.wait_for(reader.read(), 10)).splitlines()
    writer.close()
    return [json.loads(line) for line in lines]


async def test_protocol_answers_and_refuses(tmp_path: Path):
    calls = []

    async def restart() -> dict:
        calls.append("restart")
        return {"restarted": ["t1"]}

    server = control.ControlServer("expose", "db", {"status": lambda: {"status": {"x": 1}},
                                                    "restart": restart}, directory=tmp_path)
    path = await server.start()
    try:
        assert path == tmp_path / "expose-db.sock"
        assert await control.request(path, "status") == {"ok": True, "status": {"x": 1}}
        assert (await control.request(path, "restart"))["restarted"] == ["t1"]
        assert calls == ["restart"]
        with pytest.raises(control.ControlError, match="unknown command 'reboot'"):
            await control.request(path, "reboot")
        # Several requests on one connection, bad ones answered, the good ones still served.
        answers = await ask_raw(path, b'{"cmd": "status"}\nnot json\n[1]\n{"cmd": "status"}\n')
        assert [a["ok"] for a in answers] == [True, False, False, True]
        assert "not JSON" in answers[1]["error"]
        # An oversized request is refused and the connection closed.
        answers = await ask_raw(path, b"x" * (control.MAX_REQUEST * 2) + b"\n")
        assert answers == [{"ok": False, "error": f"request longer than {control.MAX_REQUEST} "
                                                   "bytes"}]
        assert await control.request(path, "status")  # still serving
    finally:
        await server.close()
    assert not path.exists()


async def test_connections_are_bounded(tmp_path: Path):
    server = control.ControlServer("connect", "db", {"status": lambda: {}}, directory=tmp_path)
    path = await server.start()
    idle = []
    try:
        for _ in range(control.MAX_CONNECTIONS):
            idle.append(await asyncio.open_unix_connection(str(path)))
        await until(lambda: server._listener.connections == control.MAX_CONNECTIONS, 5)
        answers = await ask_raw(path, b"")  # refused before it says anything
        assert answers == [{"ok": False, "error": "too many control connections"}]
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()


async def test_stale_sockets_are_replaced_and_live_ones_kept(tmp_path: Path):
    # A socket file left by a dead process: bound, never listening, closed.
    stale = tmp_path / "expose-db.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()
    assert stale.exists() and not control._alive(stale)
    first = control.ControlServer("expose", "db", {"status": lambda: {}}, directory=tmp_path)
    second = control.ControlServer("expose", "db", {"status": lambda: {}}, directory=tmp_path)
    try:
        assert await first.start() == stale  # replaced
        path = await second.start()  # the name is taken by a live process: a pid suffix
        assert path == tmp_path / f"expose-db-{os.getpid()}.sock"
        found = control.find("db", tmp_path)
        assert sorted(e.path for e in found) == sorted([stale, path])
    finally:
        await first.close()
    # A listed socket whose process is gone is removed by the client.
    orphan = tmp_path / "connect-gone.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(orphan))
    dead.close()
    assert [e.name for e in control.endpoints(tmp_path)] == [f"db-{os.getpid()}"]
    assert not orphan.exists()
    await second.close()


def test_socket_names_are_safe_and_short():
    assert control.socket_name("expose", "db") == "expose-db"
    odd = control.socket_name("connect", "../etc/passwd")
    assert "/" not in odd and odd.startswith("connect-")
    long = control.socket_name("connect", "n" * 500)
    assert len(long) < 80
    assert control.socket_name("connect", "n" * 500) != control.socket_name("connect", "n" * 499)


def test_runtime_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TETHER_RUNTIME_DIR", str(tmp_path / "rt"))
    path = control.runtime_dir(create=True)
    assert path == tmp_path / "rt" and stat.S_IMODE(path.stat().st_mode) == 0o700
    path.chmod(0o755)
    assert stat.S_IMODE(control.runtime_dir(create=True).stat().st_mode) == 0o700
    monkeypatch.delenv("TETHER_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert control.runtime_dir(create=True) == tmp_path / "tether"


# -- status arithmetic, with an injected clock ----------------------------------------------


def test_rates_and_idle_follow_the_bytes():
    track = TubeTrack(created=0.0)
    for t in range(0, 11):  # 1 MB/s up, 0.5 MB/s down for 10 s
        track.sample(float(t), t * 1_000_000, t * 500_000)
    up, down = track.rates(10.0)
    assert up == pytest.approx(1_000_000) and down == pytest.approx(500_000)
    assert track.moved_at == 10.0  # idle is 0 during a transfer
    for t in range(11, 20):  # nothing moves
        track.sample(float(t), 10_000_000, 5_000_000)
    assert track.rates(19.0) == (0.0, 0.0)
    assert track.moved_at == 10.0  # idle 9 s at t=19
    # No sample for a long while: the last rate does not linger.
    track.sample(20.0, 11_000_000, 5_000_000)
    assert track.rates(40.0)[0] < 100_000


def test_recovery_histogram_and_causes():
    hist = Histogram()
    for value in (0.3, 0.7, 4.0, 400.0):
        hist.observe(value)
    assert hist.cumulative() == [("0.5", 1), ("1.0", 2), ("2.0", 2), ("5.0", 3), ("10.0", 3),
                                 ("30.0", 3), ("60.0", 3), ("300.0", 3), ("+Inf", 4)]
    assert hist.total == pytest.approx(405.0) and hist.n == 4
    assert classify("ice_failure") == "ice_failure"
    assert classify("disconnected for more than 2 s") == "disconnected"
    assert classify("retry after a failed attempt") == "retry"
    assert classify("something new") == "other"


def test_side_stats_counts_outages_and_causes():
    from tether.tubestats import SideStats

    class Machine:
        _ever_connected = True
        _attempt = None
        _pending_reason = "disconnected for more than 1 s"

    now = [100.0]

    class FakeSide:  # only what SideStats reads when no tunnel is attached
        tubes: dict = {}

    stats = SideStats(FakeSide(), clock=lambda: now[0])  # type: ignore[arg-type]
    stats.state_changed("t", ConnectionState.CONNECTED, Machine())
    now[0] = 110.0
    stats.state_changed("t", ConnectionState.DEGRADED, Machine())
    now[0] = 111.0
    stats.state_changed("t", ConnectionState.RECONNECTING, Machine())
    now[0] = 112.5
    stats.state_changed("t", ConnectionState.CONNECTED, Machine())
    assert stats.restarts == {"disconnected": 1}
    assert stats.recovery.n == 1 and stats.recovery.total == pytest.approx(2.5)
    stats.manual_restart()
    now[0] = 113.0
    stats.state_changed("t", ConnectionState.RECONNECTING, Machine())
    assert stats.restarts["manual"] == 1
    stats.tube_closed("t", "bye")
    assert stats.closed[-1]["reason"] == "bye" and "t" not in stats.tracks


def test_the_table_and_lines_render():
    from rich.console import Console

    from tether.display import status_line, status_report, tube_table

    tube = {"tube_id": "t1", "state": "connected", "retrying": False, "rtt_ms": 2.5,
            "idle_seconds": 0.0, "rate_to_peer": 2.5 * 1024 * 1024, "rate_from_peer": 2048,
            "bytes_to_peer": 50 * 1024 * 1024, "bytes_from_peer": 1024, "streams_open": 1,
            "streams_total": 3, "next_restart_in": None,
            "path": {"via": "relay", "local": "10.0.0.1:5000", "remote": "192.0.2.9:3478"},
            "restarts": {"started": 2, "succeeded": 2, "failed": 0, "answered": 0,
                         "by_reason": {"network_change": 2}},
            "streams": [{"id": 1, "client": "127.0.0.1:5555", "state": "open",
                         "age_seconds": 12.0, "bytes_sent": 10, "bytes_received": 20}]}
    status = {"name": "db", "role": "connect", "pid": 7, "uptime_seconds": 60.0,
              "signaling": {"connected": True}, "listen": "127.0.0.1:5432", "tubes": [tube],
              "rate_to_peer": tube["rate_to_peer"], "rate_from_peer": 2048,
              "restarts_by_reason": {"network_change": 2}, "closed_tubes": [],
              "last_errors": []}
    console = Console(record=True, width=200)
    console.print(tube_table("connect db", [tube], caption=status_line(status)))
    table = console.export_text()
    assert "relay 10.0.0.1:5000 -> 192.0.2.9:3478" in table and "2.5 MB/s" in table
    assert "2 kB/s" in table and "0.0 s" in table
    line = status_line(status)
    assert "\n" not in line and "up 2.5 MB/s" in line and "2 restarts" in line
    report = status_report(status)
    assert "stream 1: 127.0.0.1:5555, open, age 12 s" in report
    assert "causes: network_change 2" in report
    assert "listen 127.0.0.1:5432" in report.splitlines()[0]
    assert "socks 127.0.0.1:1080" in status_report({**status, "socks": "127.0.0.1:1080"})
    # A restart that yielded to the peer's crossing offer is counted as such.
    tube["restarts"]["yielded"] = 1
    assert ", 1 yielded (causes" in status_report(status)
    # An 80-column terminal keeps the columns that matter, whole, on one line each.
    narrow = Console(record=True, width=80)
    narrow.print(tube_table("connect db", [tube], width=80))
    text = narrow.export_text()
    assert "connected" in text and "relay 192.0.2.9:3478" in text and "…" not in text
    assert "received MB" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("Unix sockets and /proc: Linux only")
