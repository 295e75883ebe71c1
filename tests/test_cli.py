"""The command line as a person runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import json
import sys

from tether.signaling import SignalingServer

TETHER = [sys.executable, "-m", "tether.cli"]


async def run(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *TETHER, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out.decode(), err.decode()


async def test_demo_json_verifies_every_byte():
    code, out, err = await run("demo", "--mb", "2", "--streams", "3", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bytes_sent"] == result["bytes_verified"] == 2 * 1024 * 1024
    assert result["streams"] == 3 and result["connect_ms"] > 0
    assert result["throughput_mb_s"] > 0
    if result["path_broken"]:  # killed halfway: healed by an ICE restart from either side
        assert result["restarts"] >= 1 and result["bytes_lost"] == 0, result


async def test_wrong_token_says_what_to_do():
    async with SignalingServer(host="127.0.0.1", port=0, token="right") as server:
        code, _, err = await run(
            "connect", "db", "--listen", "127.0.0.1:0",
            "--signal", f"ws://127.0.0.1:{server.port}", "--token", "wrong",
            "--secret", "a-tunnel-secret-of-some-length", timeout=30)
    assert code == 2
    assert "refused the token" in err and "--token" in err


async def test_bad_address_is_a_usage_error():
    code, _, err = await run("expose", "db", "--target", "nohost", "--signal", "ws://x",
                             "--token", "t")
    assert code == 2 and "--target" in err


async def test_connect_needs_the_tunnel_secret():
    code, _, err = await run("connect", "db", "--listen", "127.0.0.1:0",
                             "--signal", "ws://127.0.0.1:9", "--token", "t")
    assert code == 2 and "--secret" in err


async def test_a_short_tunnel_secret_is_refused():
    code, _, err = await run("connect", "db", "--listen", "127.0.0.1:0",
                             "--signal", "ws://127.0.0.1:9", "--token", "t", "--secret", "short")
    assert code == 2 and "at least 16" in err


async def test_a_signal_url_that_is_no_websocket_url_is_a_usage_error():
    code, _, err = await run("connect", "db", "--listen", "127.0.0.1:0", "--signal",
                             "http://127.0.0.1:9", "--token", "t",
                             "--secret", "a-tunnel-secret-of-some-length")
    assert code == 2 and "not a WebSocket URL" in err and "Traceback" not in err


async def test_a_busy_listen_address_is_one_clear_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = await run("connect", "db", "--listen", f"127.0.0.1:{port}", "--signal",
                                 "ws://127.0.0.1:9", "--token", "t",
                                 "--secret", "a-tunnel-secret-of-some-length")
    assert code == 1 and "address already in use" in err and "Traceback" not in err


async def test_version_flag_and_the_library_at_the_top():
    import tether

    code, out, _ = await run("--version")
    assert code == 0 and out.strip() == tether.__version__
    assert tether.TunnelConnectionManager.__module__ == "tether.connection_manager"
