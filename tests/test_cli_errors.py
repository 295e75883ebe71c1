"""Ordinary mistakes give one or two lines that say how to fix them, never a traceback, and
the right exit code (2: usage, 1: runtime), as real `tether` processes."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from .test_cli_tunnel import TETHER

SECRET = "the-tunnel-secret-for-the-error-test"
ENV = {"TETHER_TOKEN": "tok-for-errors", "TETHER_SECRET": SECRET}


async def run(*args: str, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> tuple[int, str]:
    """Run tether; return its exit code and everything it printed."""
    proc = await asyncio.create_subprocess_exec(
        *TETHER, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200",
             **ENV, **(env or {})})
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "File \"" not in text, text


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_connect_on_a_busy_port(busy_port: int):
    code, text = await run("connect", "db", "--listen", f"127.0.0.1:{busy_port}",
                           "--signal", "ws://127.0.0.1:9")
    assert code == 1
    no_traceback(text)
    assert f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in text
    assert "port 0 for any free one" in text


async def test_serve_on_a_busy_port(busy_port: int):
    code, text = await run("serve", "--port", str(busy_port))
    assert code == 1
    no_traceback(text)
    assert f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in text


async def test_serve_port_out_of_range():
    code, text = await run("serve", "--port", "70000")
    assert code == 2
    no_traceback(text)
    assert "--port" in text and "65535" in text


async def test_listen_on_an_address_that_is_not_local():
    # 192.0.2.1 (TEST-NET-1) is never this machine's: bind fails, nothing is sent anywhere.
    code, text = await run("connect", "db", "--listen", "192.0.2.1:5000",
                           "--signal", "ws://127.0.0.1:9")
    assert code == 1
    no_traceback(text)
    assert "cannot listen on 192.0.2.1:5000: that address is not one of this machine's" in text
    assert "127.0.0.1" in text


@pytest.mark.parametrize("url", ["127.0.0.1:8765", "http://127.0.0.1:8765"])
async def test_signal_that_is_not_a_websocket_url(url: str):
    code, text = await run("connect", "db", "--listen", "127.0.0.1:0", "--signal", url)
    assert code == 2
    no_traceback(text)
    assert "--signal" in text and "ws://HOST:PORT" in text


@pytest.mark.parametrize(("option", "value", "expect"), [
    ("--listen", "127.0.0.1", "missing ':PORT'"),
    ("--listen", "127.0.0.1:99999", "out of range"),
    ("--metrics", "9100", "missing ':PORT'"),
    ("--log-format", "xml", "use text or json"),
])
async def test_bad_option_values(option: str, value: str, expect: str):
    args = ["connect", "db", "--signal", "ws://127.0.0.1:9"]
    if option != "--listen":
        args += ["--listen", "127.0.0.1:0"]
    code, text = await run(*args, option, value)
    assert code == 2
    no_traceback(text)
    assert option in text and expect in text


async def test_missing_token_and_secret():
    code, text = await run("connect", "db", "--listen", "127.0.0.1:0", "--signal",
                           "ws://127.0.0.1:9", env={"TETHER_TOKEN": ""})
    assert code == 2 and "--token" in text and "TETHER_TOKEN" in text
    code, text = await run("connect", "db", "--listen", "127.0.0.1:0", "--signal",
                           "ws://127.0.0.1:9", env={"TETHER_SECRET": ""})
    assert code == 2 and "--secret" in text
    no_traceback(text)


async def test_metrics_port_busy_and_a_wrong_token(busy_port: int, tmp_path):
    # The relay must be reachable for the side to start; a real one on loopback.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = await asyncio.create_subprocess_exec(
        *TETHER, "serve", "--port", str(port), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", ""), **ENV})
    try:
        await asyncio.sleep(0.1)
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.2)
        wrong, said = await run("connect", "db", "--listen", "127.0.0.1:0", "--signal",
                                f"ws://127.0.0.1:{port}", "--loopback",
                                env={"TETHER_TOKEN": "not-the-token",
                                     "TETHER_RUNTIME_DIR": str(tmp_path)})
        code, text = await run("expose", "db", "--target", "127.0.0.1:9", "--signal",
                               f"ws://127.0.0.1:{port}", "--loopback", "--metrics",
                               f"127.0.0.1:{busy_port}",
                               env={"TETHER_RUNTIME_DIR": str(tmp_path)})
    finally:
        serve.terminate()
        await serve.wait()
    assert code == 1
    no_traceback(text)
    assert f"cannot listen on 127.0.0.1:{busy_port}: address already in use" in text
    assert wrong == 2
    no_traceback(said)
    last = said.strip().splitlines()[-1]
    assert last.count("refused the token") == 1 and "--token" in last
    assert "not-the-token" not in said


async def test_status_with_nothing_running(tmp_path):
    code, text = await run("status", env={"TETHER_RUNTIME_DIR": str(tmp_path)})
    assert code == 1 and "no running tunnel" in text
    code, text = await run("stop", "nothing", env={"TETHER_RUNTIME_DIR": str(tmp_path)})
    assert code == 1 and "no running tunnel named 'nothing'" in text
    no_traceback(text)


async def test_demo_bad_sizes():
    code, text = await run("demo", "--streams", "0")
    assert code == 2 and "--streams" in text
    no_traceback(text)


@pytest.mark.parametrize("mode, flag", [(["--target", "127.0.0.1:9"], "--listen 127.0.0.1:0"),
                                        (["--allow", "127.0.0.1:9"], "--socks 127.0.0.1:1080")])
async def test_expose_without_a_secret_prints_a_connect_line_that_matches_it(mode, flag):
    """The printed `tether connect` line carries every flag both ends must share."""
    proc = await asyncio.create_subprocess_exec(
        *TETHER, "expose", "db", *mode, "--signal", "ws://127.0.0.1:9", "--loopback",
        "--ice-server", "stun:127.0.0.1:3478", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200",
             "TETHER_TOKEN": "tok-for-errors"})
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            while b"tether connect" not in (line := await proc.stdout.readline()):
                assert line, "expose ended without printing a connect line"
    finally:
        proc.kill()
        await proc.wait()
    text = line.decode()
    assert "TETHER_SECRET=" in text and "tether connect db" in text
    for part in ("--signal ws://127.0.0.1:9", "--loopback", flag,
                 "--ice-server stun:127.0.0.1:3478"):
        assert part in text, text
