"""`tether connect --run CMD`: real `tether` processes, a real relay, a real command."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tether.echo import start_echo_server
from tether.signaling import SignalingServer

from .test_cli_tunnel import Process

TOKEN = "run-mode-token"
SECRET = "a-run-mode-secret-long-enough"
ENV = {"TETHER_TOKEN": TOKEN, "TETHER_SECRET": SECRET}

# The command: echo a line through the tunnel ({port} substituted, TETHER_PORT set), then
# exit with the code it is given.
CLIENT = textwrap.dedent("""
    import os, socket, sys
    port = int(sys.argv[1])
    assert port == int(os.environ["TETHER_PORT"]), (port, os.environ["TETHER_PORT"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"ping through the tunnel")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    print("echoed:", got.decode(), flush=True)
    sys.exit(int(sys.argv[2]) if got == b"ping through the tunnel" else 99)
""")

# A command that waits for SIGTERM and exits 3 when it comes.
WAITER = textwrap.dedent("""
    import signal, sys, time, pathlib
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
    pathlib.Path(sys.argv[1]).write_text("ready")
    time.sleep(60)
    sys.exit(0)
""")


@pytest.fixture
async def tunnel_end(tmp_path):
    """A relay (in this process) and `tether expose` (a process) of an echo server."""
    relay = SignalingServer(host="127.0.0.1", port=0, token=TOKEN)
    await relay.start()
    echo = await start_echo_server("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{relay.port}"
    expose = await Process.start(
        "expose", tmp_path, "expose", "run", "--target",
        f"127.0.0.1:{echo.sockets[0].getsockname()[1]}", "--signal", url, "--loopback",
        env=ENV)
    try:
        yield url
    finally:
        await expose.stop()
        echo.close()
        await echo.wait_closed()
        await relay.close()


async def test_run_returns_the_commands_exit_code(tmp_path, tunnel_end):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    for code in (0, 7):
        connect = await Process.start(
            f"connect-{code}", tmp_path, "connect", "run", "--signal", tunnel_end,
            "--loopback", "--run", f"{sys.executable} {script} {{port}} {code}", env=ENV)
        assert await asyncio.wait_for(connect.process.wait(), 90) == code, \
            connect.log.read_text()[-3000:]
        await connect.stop()
        # stdout is the command's alone (it may be redirected); tether speaks on stderr.
        assert "echoed: ping through the tunnel" in connect.lines
        assert not any(line.startswith("listening on") for line in connect.lines)
        assert "listening on 127.0.0.1:" in connect.log.read_text()


async def test_sigterm_is_forwarded_and_its_exit_code_returned(tmp_path, tunnel_end):
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    ready = tmp_path / "ready"
    connect = await Process.start(
        "connect-term", tmp_path, "connect", "run", "--signal", tunnel_end, "--loopback",
        "--run", f"{sys.executable} {script} {ready}", env=ENV)
    async with asyncio.timeout(60):
        while not ready.exists():
            assert connect.process.returncode is None, connect.log.read_text()[-3000:]
            await asyncio.sleep(0.1)
    connect.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(connect.process.wait(), 30) == 3
    await connect.stop()


async def test_a_missing_command_exits_127(tmp_path, tunnel_end):
    connect = await Process.start(
        "connect-missing", tmp_path, "connect", "run", "--signal", tunnel_end, "--loopback",
        "--run", "no-such-command-for-tether {port}", env=ENV)
    assert await asyncio.wait_for(connect.process.wait(), 90) == 127
    await connect.stop()
    assert "cannot run 'no-such-command-for-tether'" in Path(connect.log).read_text()
