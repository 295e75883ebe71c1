"""What the signaling client says when the relay is unreachable or misconfigured, and how it
moves between several relay URLs. Real sockets, real servers, short backoff."""

from __future__ import annotations

import asyncio
import logging
import ssl

import pytest

from tether.signaling import SignalingClient, SignalingServer

from .certs import certificate
from .test_cli_tunnel import free_port
from .tube_pair import until

TOKEN = "t0ken-for-error-tests"
LOGGER = "tether.signaling.client"


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING]


def client(url, **kw) -> SignalingClient:
    return SignalingClient(url, TOKEN, "conv", lambda s: None, reconnect_base=0.01,
                           reconnect_max=0.02, **kw)


async def run_until_attempts(c: SignalingClient, attempts: int) -> None:
    task = asyncio.create_task(c.start())
    try:
        await until(lambda: c._failures >= attempts, 20)
    finally:
        await c.close()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_unreachable_relay_gives_one_warning_with_its_reason(caplog):
    caplog.set_level(logging.DEBUG, LOGGER)
    port = free_port()  # nothing listens there
    c = client(f"ws://127.0.0.1:{port}")
    await run_until_attempts(c, 10)
    said = warnings(caplog)
    assert len(said) == 1, said
    assert f"cannot reach the signaling relay at ws://127.0.0.1:{port}/" in said[0]
    assert "refused" in said[0].lower()


async def test_a_plain_http_server_is_named_as_such(caplog):
    caplog.set_level(logging.DEBUG, LOGGER)

    async def http(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await run_until_attempts(client(f"ws://127.0.0.1:{port}"), 5)
    finally:
        server.close()
        await server.wait_closed()
    said = warnings(caplog)
    assert len(said) == 1, said
    assert "answered plain HTTP (200 OK), not a WebSocket upgrade" in said[0]


async def test_ws_url_against_a_tls_relay_says_use_wss(caplog, tmp_path):
    caplog.set_level(logging.DEBUG, LOGGER)
    cert, key = certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with SignalingServer(port=0, token=TOKEN, ssl_context=context) as relay:
        await run_until_attempts(client(f"ws://127.0.0.1:{relay.port}"), 5)
    said = warnings(caplog)
    assert len(said) == 1, said
    assert "use wss:// instead of ws://" in said[0]


async def test_wss_url_against_a_plain_relay_says_use_ws(caplog, tmp_path):
    caplog.set_level(logging.DEBUG, LOGGER)
    cert, _ = certificate(tmp_path)
    async with SignalingServer(port=0, token=TOKEN) as relay:
        await run_until_attempts(client(f"wss://127.0.0.1:{relay.port}", ca_file=cert), 5)
    said = warnings(caplog)
    assert len(said) == 1, said
    assert "use ws:// instead of wss://" in said[0]


async def test_the_client_moves_on_to_the_next_relay_url():
    dead = f"ws://127.0.0.1:{free_port()}"
    async with SignalingServer(port=0, token=TOKEN) as relay:
        c = client([dead, relay.url])
        try:
            async with asyncio.timeout(20):
                await c.start()
            assert c.url == relay.url
        finally:
            await c.close()


def test_every_url_must_be_a_websocket_url():
    with pytest.raises(ValueError, match="expected ws://HOST:PORT"):
        client(["ws://127.0.0.1:1", "http://127.0.0.1:2"])
    with pytest.raises(ValueError, match="at least one"):
        client([])
