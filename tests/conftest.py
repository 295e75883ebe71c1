"""Shared test setup: every test runs on loopback only."""

from __future__ import annotations

import pytest

from tether.cores.aiortc_core import AiortcTubeRegistry
from tether.cores.gathering import LOOPBACK
from tether.echo import start_echo_server

from .tube_pair import FAST_LIVENESS


@pytest.fixture
async def cores():
    """Two aiortc cores gathering on 127.0.0.1, closed after the test."""
    a = AiortcTubeRegistry(host_addresses=LOOPBACK)
    b = AiortcTubeRegistry(host_addresses=LOOPBACK)
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def fast_cores():
    """Two loopback cores with FAST_LIVENESS, closed after the test."""
    a = AiortcTubeRegistry(host_addresses=LOOPBACK, liveness=FAST_LIVENESS)
    b = AiortcTubeRegistry(host_addresses=LOOPBACK, liveness=FAST_LIVENESS)
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def echo_port():
    """A TCP echo server on loopback (a tunnel's target); its port."""
    server = await start_echo_server("127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
