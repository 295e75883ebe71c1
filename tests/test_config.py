"""The config file: errors that name the key, and `tether up` running two tunnels (both
ends) from one file in one process, then reloading it on SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import textwrap
from pathlib import Path

import pytest

from tether import config
from tether.config import ConfigError
from tether.echo import start_echo_server
from tether.signaling import SignalingServer

from .test_cli_tunnel import TETHER, Process, echo

SECRET = "a-config-test-secret-long-enough"
TOKEN = "config-test-token"


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
    signal = "ws://127.0.0.1:8765"
    token_file = "token"

    [policy]
    keepalive_interval = 60
    liveness_misses = 4

    [[expose]]
    name = "db"
    target = "127.0.0.1:5432"
    allow = ["10.0.0.0/8:22"]
    secret_file = "secret"

    [[connect]]
    name = "db"
    listen = "127.0.0.1:0"
    socks = "127.0.0.1:1080"
    secret_file = "secret"
    policy = { restart_max = 20 }
"""


def test_a_good_config(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.signal == ("ws://127.0.0.1:8765",) and cfg.token == TOKEN
    db = cfg.find("connect", "db")
    assert db is not None and db.secret == SECRET and db.socks == ("127.0.0.1", 1080)
    policy = db.policy.over(cfg.policy)
    restart = policy.restart_policy()
    assert (restart.keepalive_interval, restart.restart_backoff_max) == (60.0, 20.0)
    assert restart.keep_trying  # tether's default is kept
    assert policy.liveness() == {"misses": 4}
    assert cfg.find("expose", "db").allow_list().permits_address("10.1.1.1", 22)


def test_core_is_chosen_globally_or_per_tunnel(tmp_path):
    from tether.api import build_core
    from tether.fleet import Fleet

    cfg = config.load(write(tmp_path, 'core = "keeper"\n' + GOOD.replace(
        'policy = { restart_max = 20 }', 'policy = { restart_max = 20 }\ncore = "aiortc"')))
    assert cfg.core == "keeper"
    assert cfg.core_of(cfg.find("expose", "db")) == "keeper"
    assert cfg.core_of(cfg.find("connect", "db")) == "aiortc"
    # a core change restarts the tunnel on reload (it is part of what it was built from)
    fleet = Fleet(cfg)
    plain = config.load(write(tmp_path, GOOD))
    db = cfg.find("expose", "db")
    assert fleet._spec(cfg, db) != fleet._spec(plain, plain.find("expose", "db"))
    # what does not fit the keeper core is a clear ValueError (a reload logs it)
    with pytest.raises(ValueError, match="never gathers 127.0.0.1"):
        build_core("keeper", True, [], None, None)
    with pytest.raises(ValueError, match="one turn:/turns: server and no STUN"):
        build_core("keeper", False, ["stun:stun.example.net:3478"], None, None)
    with pytest.raises(ValueError, match="unknown core 'x'"):
        build_core("x", False, [], None, None)


@pytest.mark.parametrize("change, message", [
    ('signal = "ws://127.0.0.1:8765"', None),
    ('sginal = "x"', "unknown key 'sginal'"),
    ('signal = "http://relay:80"', "not a WebSocket URL"),
    ('token_file = "missing"', "token_file: cannot read"),
    ('[policy]\nkeepalive = 3', "policy: unknown key 'keepalive'"),
    ('[policy]\nrestart_attempts = 2.5', "restart_attempts: expected an integer"),
    ('[policy]\nrestart_base = -1', "restart_base: must be positive"),
    ('[policy]\nconnect_timeout = "soon"', "connect_timeout: expected a number"),
    ('[[expose]]\nname = "x"\ntarget = "h:1"\nsecret_file = "secret"\nport = 1',
     "unknown key 'port'"),
    ('[[expose]]\nname = "x"\nsecret_file = "secret"', "give 'target'"),
    ('[[expose]]\nname = "x"\ntarget = "nope"\nsecret_file = "secret"', "target: 'nope'"),
    ('[[expose]]\nname = "x"\nallow = ["10.0.0.0/8"]\nsecret_file = "secret"', "allow:"),
    ('[[expose]]\nname = "x"\ntarget = "h:1"', "give 'secret_file'"),
    ('[[expose]]\nname = "x"\ntarget = "h:1"\nsecret = "short"', "at least"),
    ('[[connect]]\nname = "x"\nsecret_file = "secret"', "give 'listen'"),
    ('[[connect]]\nname = "x"\nsocks = "0.0.0.0:1080"\nsecret_file = "secret"',
     "not loopback"),
    ('[[connect]]\nname = "x"\nlisten = "h:1"\nsecret_file = "secret"\n'
     '[[connect]]\nname = "x"\nlisten = "h:2"\nsecret_file = "secret"', "listed twice"),
    ('[[connect]]\nname = "x"\nlisten = "h:1"\nsecret_file = "secret"\n'
     'policy = { answer_timout = 1 }', "unknown key 'answer_timout'"),
    ("signal = [", "not valid TOML"),
    ('core = "libwebrtc"', "core: 'libwebrtc' is not a core; known: aiortc, keeper"),
    ('[[connect]]\nname = "x"\nlisten = "h:1"\nsecret_file = "secret"\ncore = 1',
     "connect 'x'.core: expected a string"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    path = write(tmp_path, change + "\n")
    if message is None:
        config.load(path)
        return
    with pytest.raises(ConfigError, match=message) as error:
        config.load(path)
    assert str(path) in str(error.value)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path)
    try:
        assert config.load(None, required=False) == config.Config()  # no default file: fine
    finally:
        del os.environ["XDG_CONFIG_HOME"]


async def test_the_cli_reports_config_errors_in_one_line(tmp_path):
    path = write(tmp_path, '[policy]\nkeepalive = 3\n')
    process = await asyncio.create_subprocess_exec(
        *TETHER, "up", "--config",
        str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", ""), "COLUMNS": "200"})
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "unknown key 'keepalive'" in err.decode() and "Traceback" not in err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_two_tunnels_from_one_config_in_one_process_and_a_reload(tmp_path):
    relay = SignalingServer(host="127.0.0.1", port=0, token=TOKEN)
    await relay.start()
    servers = [await start_echo_server("127.0.0.1", 0) for _ in range(3)]
    targets = [s.sockets[0].getsockname()[1] for s in servers]
    ports = [free_port() for _ in range(3)]

    def tunnels(names: list[int]) -> str:
        text = f'signal = "ws://127.0.0.1:{relay.port}"\ntoken_file = "token"\nloopback = true\n'
        for i in names:
            text += (f'[[expose]]\nname = "t{i}"\ntarget = "127.0.0.1:{targets[i]}"\n'
                     f'secret_file = "secret"\n'
                     f'[[connect]]\nname = "t{i}"\nlisten = "127.0.0.1:{ports[i]}"\n'
                     f'secret_file = "secret"\n')
        return text

    path = write(tmp_path, tunnels([0, 1]))
    runtime = {"TETHER_RUNTIME_DIR": str(tmp_path / "run")}
    up = await Process.start("up", tmp_path, "up", "--config", str(path), env=runtime)
    try:
        await up.line(r"up: 4 tunnels", timeout=30)
        for i in (0, 1):
            payload = os.urandom(200_000)
            assert await echo(ports[i], payload, timeout=40) == payload
        # The four tunnels share one network monitor.
        assert up.log.read_text().count("netmon: watching") == 1

        # `tether status` sees every tunnel of the one process.
        status = await asyncio.create_subprocess_exec(
            *TETHER, "status", "--json", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", ""), "COLUMNS": "200", **runtime})
        out, err = await asyncio.wait_for(status.communicate(), 30)
        assert status.returncode == 0, err.decode()
        text = out.decode()
        for role in ("expose", "connect"):
            for name in ("t0", "t1"):
                assert f'"role": "{role}"' in text and f'"name": "{name}"' in text, text[:2000]

        # Reload: t1 goes, t2 comes, t0 goes on (its stream stays open across the reload).
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 30) == b"before"
        path.write_text(tunnels([0, 2]))
        up.process.send_signal(signal.SIGHUP)
        await up.line(r"reloaded: added expose t2, connect t2; removed expose t1, "
                      r"connect t1", timeout=30)
        payload = os.urandom(100_000)
        assert await echo(ports[2], payload, timeout=40) == payload
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", ports[1])
        writer.write(b"after")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == b"after"
        writer.close()

        # A broken config on reload changes nothing.
        path.write_text("nonsense = 1\n")
        up.process.send_signal(signal.SIGHUP)
        await until_logged(up, "unknown key 'nonsense'")
        assert await echo(ports[2], b"still up", timeout=40) == b"still up"
        assert await up.stop() == 0
    finally:
        await up.stop()
        for s in servers:
            s.close()
        await relay.close()


async def until_logged(process: Process, text: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while text not in process.log.read_text():
            await asyncio.sleep(0.1)


async def test_expose_and_connect_take_relay_token_secret_and_knobs_from_the_config(tmp_path):
    relay = SignalingServer(host="127.0.0.1", port=0, token=TOKEN)
    await relay.start()
    target = await start_echo_server("127.0.0.1", 0)
    path = write(tmp_path, f"""
        signal = "ws://127.0.0.1:{relay.port}"
        token_file = "token"
        [policy]
        keepalive_interval = 30
        [[expose]]
        name = "cfg"
        target = "127.0.0.1:{target.sockets[0].getsockname()[1]}"
        secret_file = "secret"
        [[connect]]
        name = "cfg"
        listen = "127.0.0.1:1"
        secret_file = "secret"
    """)
    env = {"TETHER_CONFIG": str(path)}
    # Nothing but the name: relay, token, secret and target come from the config.
    expose = await Process.start("expose", tmp_path, "expose", "cfg", "--loopback", env=env)
    connect = await Process.start("connect", tmp_path, "connect", "cfg", "--loopback",
                                  "--listen", "127.0.0.1:0", "--restart-max", "20", env=env)
    try:
        port = int((await connect.line(r"listening on 127\.0\.0\.1:(\d+)", 30)).group(1))
        assert await echo(port, b"configured", timeout=40) == b"configured"
        # A bad knob on the command line is a usage error naming it.
        bad = await asyncio.create_subprocess_exec(
            *TETHER, "connect", "cfg", "--listen", "127.0.0.1:0", "--restart-attempts", "0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", ""), "COLUMNS": "200", **env})
        _, err = await asyncio.wait_for(bad.communicate(), 30)
        assert bad.returncode == 2 and "--restart-attempts" in err.decode()
        assert "must be positive, got 0" in err.decode()
    finally:
        await connect.stop()
        await expose.stop()
        target.close()
        await relay.close()


async def test_a_reload_that_changes_only_the_allow_list_keeps_the_tunnel(tmp_path):
    from tether.fleet import Fleet

    relay = SignalingServer(host="127.0.0.1", port=0, token=TOKEN)
    await relay.start()

    def cfg(allow: str, target: str = "127.0.0.1:7") -> config.Config:
        return config.load(write(tmp_path, f"""
            signal = "ws://127.0.0.1:{relay.port}"
            token_file = "token"
            loopback = true
            [[expose]]
            name = "f"
            target = "{target}"
            allow = ["{allow}"]
            secret_file = "secret"
        """))

    fleet = Fleet(cfg("10.0.0.0/8:22"), watch_network=False)
    try:
        await fleet.start()
        first = fleet.running[("expose", "f")].tunnel
        changes = await fleet.reload(cfg("10.0.0.0/8:443"))
        assert changes["updated"] == ["expose f"] and not changes["restarted"]
        assert fleet.running[("expose", "f")].tunnel is first
        assert first.side.allow.permits_address("10.0.0.1", 443)
        assert not first.side.allow.permits_address("10.0.0.1", 22)
        changes = await fleet.reload(cfg("10.0.0.0/8:443", target="127.0.0.1:8"))
        assert changes["restarted"] == ["expose f"]
        assert fleet.running[("expose", "f")].tunnel is not first
        assert (await fleet.reload(cfg("10.0.0.0/8:443", target="127.0.0.1:8"))) == {
            "added": [], "removed": [], "restarted": [], "updated": [], "failed": []}
    finally:
        await fleet.close()
        await relay.close()


async def test_the_tunnels_of_one_process_share_one_signaling_connection(tmp_path):
    relay = SignalingServer(host="127.0.0.1", port=0, token=TOKEN)
    await relay.start()
    servers = [await start_echo_server("127.0.0.1", 0) for _ in range(2)]
    targets = [s.sockets[0].getsockname()[1] for s in servers]
    ports = [free_port() for _ in range(2)]
    head = f'signal = "ws://127.0.0.1:{relay.port}"\ntoken_file = "token"\nloopback = true\n'
    exposing = head + "".join(
        f'[[expose]]\nname = "m{i}"\ntarget = "127.0.0.1:{targets[i]}"\n'
        f'secret_file = "secret"\n' for i in range(2))
    connecting = head + "".join(
        f'[[connect]]\nname = "m{i}"\nlisten = "127.0.0.1:{ports[i]}"\n'
        f'secret_file = "secret"\n' for i in range(2))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [write(tmp_path / "a", exposing), write(tmp_path / "b", connecting)]
    procs = []
    try:
        runtime = {"TETHER_RUNTIME_DIR": str(tmp_path / "run")}
        for name, path in zip(("up-expose", "up-connect"), paths):
            procs.append(await Process.start(name, tmp_path, "up", "--config", str(path),
                                             env=runtime))
            await procs[-1].line(r"up: 2 tunnels", timeout=30)
            # two tunnels joined, and the process holds ONE WebSocket to the relay
            assert relay.connection_count == len(procs)
        for i in range(2):
            payload = os.urandom(100_000)
            assert await echo(ports[i], payload, timeout=40) == payload
        # Four tunnel ends in two conversations over TWO WebSockets: one per process.
        assert relay.conversation_count == 2
        assert relay.connection_count == 2
        assert sorted(len(relay.table.peers(f"{c}")) for c in relay.table._conversations) \
            == [2, 2]

        async def cli(*args: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                *TETHER, *args, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", ""), "COLUMNS": "200", **runtime})
            output, _ = await asyncio.wait_for(process.communicate(), 30)
            return process.returncode, output.decode()

        # --role picks one end of a tunnel whose both ends run on this machine.
        code, text = await cli("restart", "m0", "--role", "connect")
        assert code == 0 and "connect m0: restarting" in text and "expose" not in text, text
        code, text = await cli("stop", "m1", "--role", "expose")
        assert code == 0 and text.strip() == "expose m1: stopping", text
        # The stopped end left its conversation; the other tunnel goes on on the connection.
        await until_true(lambda: sorted(len(relay.table.peers(c))
                                        for c in relay.table._conversations) == [1, 2])
        assert relay.connection_count == 2
        assert await echo(ports[0], b"still there", timeout=40) == b"still there"
        for proc in procs:
            assert await proc.stop() == 0
    finally:
        for proc in procs:
            await proc.stop()
        for s in servers:
            s.close()
        await relay.close()


async def until_true(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)
