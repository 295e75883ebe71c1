"""The library API: a real relay, real aiortc peers (loopback), real TCP, in a few lines."""

from __future__ import annotations

import asyncio
import os

import pytest

import tether
from tether.echo import start_echo_server
from tether.signaling import SignalingServer

TOKEN = "api-test-token"
SECRET = "an-api-test-secret-of-enough-length"


@pytest.fixture
async def relay():
    server = SignalingServer(host="127.0.0.1", port=0, token=TOKEN)
    await server.start()
    yield f"ws://127.0.0.1:{server.port}"
    await server.close()


@pytest.fixture
async def echo():
    server = await start_echo_server("127.0.0.1", 0)
    yield server.sockets[0].getsockname()[:2]
    server.close()
    await server.wait_closed()


async def roundtrip(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


async def test_the_library_opens_a_tunnel_in_a_few_lines(relay, echo):
    payload = os.urandom(256 * 1024)
    common = {"signal": relay, "token": TOKEN, "secret": SECRET, "loopback": True}
    async with tether.expose("api", target=f"127.0.0.1:{echo[1]}", **common):
        async with tether.connect("api", **common) as t:
            assert t.host == "127.0.0.1" and t.port > 0
            assert await roundtrip(t.host, t.port, payload) == payload
            assert t.snapshot()[0]["state"] == "connected"


async def test_connect_times_out_without_an_exposing_side(relay):
    conn = tether.connect("nobody", signal=relay, token=TOKEN, secret=SECRET, loopback=True,
                          wait=1.0)
    with pytest.raises(TimeoutError):
        async with conn:
            pass
    assert conn.side._closed  # closed even though start failed


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="listen: .*missing ':PORT'"):
        tether.connect("x", signal="ws://127.0.0.1:1", token="t", secret=SECRET,
                       listen="localhost")
    with pytest.raises(ValueError, match="give a target"):
        tether.expose("x", signal="ws://127.0.0.1:1", token="t", secret=SECRET)
    with pytest.raises(ValueError, match="not loopback"):
        tether.connect("x", signal="ws://127.0.0.1:1", token="t", secret=SECRET,
                       socks="0.0.0.0:0")


def test_the_package_exports_and_documents_its_api():
    names = ["Connection", "Exposure", "connect", "expose", "get_connection_manager",
             "register_connection_manager", "unregister_connection_manager",
             "list_connection_managers", "TunnelConnectionManager", "ICERestartPolicy"]
    for name in names:
        assert name in tether.__all__
        assert getattr(tether, name).__doc__, f"tether.{name} has no docstring"
    from pathlib import Path

    assert (Path(tether.__file__).parent / "py.typed").exists()
