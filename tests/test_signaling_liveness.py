"""Signaling never sits on a dead socket: end-to-end acks, check(), reconnect(), stuck peers.

Real SignalingServer, real SignalingClients and raw websockets peers on 127.0.0.1. Half-open
connections are made with FreezableProxy (tests/test_signaling_proxy.py): it stops carrying
bytes without telling either end, like a path through a deleted source address. Timings
are printed (run with -s to see them); assertions on them are loose.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tether.signaling import SignalingClient, SignalingServer
from tether.signaling import server as server_module

from .test_signaling_proxy import FreezableProxy

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = dict(reconnect_base=0.02, reconnect_max=0.1)


class Peer:
    """A SignalingClient plus what it received and the presence events it saw."""

    def __init__(self, url: str, peer_id: str, conversation: str = "conv", **kw) -> None:
        self.inbox: list[dict] = []
        self.states: list[str] = []
        self.peer_events: list[str] = []
        self.on_signal_hook = None
        kw = {**FAST, **kw}
        self.client = SignalingClient(
            url,
            TOKEN,
            conversation,
            self._on_signal,
            peer_id=peer_id,
            on_state=self.states.append,
            on_peer=self.peer_events.append,
            **kw,
        )

    def _on_signal(self, signal: dict) -> None:
        self.inbox.append(signal)
        if self.on_signal_hook is not None:
            self.on_signal_hook(signal)

    def data(self) -> list[str]:
        return [s["data"] for s in self.inbox]


def sig(data: str, tube: str = "t1", kind: str = "icecandidate") -> dict:
    return {"tube_id": tube, "conversation_id": "", "kind": kind, "data": data}


def noise() -> str:
    """8 KB that permessage-deflate cannot shrink."""
    return secrets.token_hex(4000)


async def eventually(condition, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@pytest.fixture
async def relay():
    server = SignalingServer(port=0, token=TOKEN)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def proxy(relay):
    async with FreezableProxy(relay.port) as p:
        yield p


def small_send_buffers(relay: SignalingServer) -> None:
    """Connections accepted from now on inherit a small kernel send buffer, so a peer that
    stops reading blocks the relay's writer after a few KB instead of a few MB."""
    for sock in relay._server.sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def raw_join(
    relay: SignalingServer,
    peer: str,
    conversation: str = "conv",
    rcvbuf: int | None = None,
    resume: str | None = None,
) -> ClientConnection:
    """A bare websockets peer; ``rcvbuf`` shrinks its socket receive buffer; ``resume``
    presents a resume credential (to replace a connection of the same peer id)."""
    sock = None
    if rcvbuf is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port))
    return await connect(
        f"ws://127.0.0.1:{relay.port}/?conversation={conversation}&peer={peer}",
        additional_headers={**AUTH, "X-Tether-Resume": resume} if resume else AUTH,
        proxy=None,
        sock=sock,
        ping_interval=None,
    )


async def recv(ws: ClientConnection, timeout: float = 2.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_first(ws: ClientConnection) -> dict:
    """The relay's first message (presence); its resume credential is kept as ws.resume."""
    first = await recv(ws)
    ws.resume = first.pop("resume")
    return first


async def close_all(*peers: Peer) -> None:
    for peer in peers:
        await peer.client.close()


# -- end-to-end acknowledgement ---------------------------------------------------------------


async def test_an_ack_means_the_peer_got_it_lost_on_a_half_open_receiver_then_redelivered(
    relay, proxy
):
    a = Peer(relay.url, "a")
    b = Peer(proxy.url, "b")  # b reaches the relay through the proxy
    await a.client.start()
    await b.client.start()
    await eventually(lambda: a.client.peer_present and b.client.peer_present)
    assert a.peer_events == ["joined"] and b.peer_events == ["joined"]

    assert proxy.freeze() == 1  # b's connection is now half-open; nobody notices
    await a.client.send(sig("offer-after-network-change", kind="offer"))
    await asyncio.sleep(0.3)
    # The relay wrote it to b's socket, but that is not delivery: no ack, still kept.
    assert b.inbox == []
    assert a.client.unacked == 1
    assert sorted(relay.table.peers("conv")) == ["a", "b"]  # the relay did not notice

    started = time.monotonic()
    b.client.reconnect("test: network changed")
    await eventually(lambda: b.inbox)
    delivered_after = time.monotonic() - started
    await asyncio.wait_for(a.client.drain(), 3)
    print(f"\n[half-open receiver] reconnect() -> signal delivered: {delivered_after * 1000:.0f} ms")
    await asyncio.sleep(0.1)
    assert b.data() == ["offer-after-network-change"]  # once
    assert a.peer_events == ["joined", "joined"]  # b rejoined: that triggered the resend
    assert delivered_after < 1.0
    await close_all(a, b)


async def test_a_lost_ack_is_recovered_by_check_and_the_duplicate_is_seen_once(relay, proxy):
    a = Peer(proxy.url, "a")  # a's path will die just after b received a's signal
    b = Peer(relay.url, "b")
    await a.client.start()
    await b.client.start()
    await eventually(lambda: a.client.peer_present)
    b.on_signal_hook = lambda signal: proxy.freeze()  # before b's ack goes out

    await a.client.send(sig("s1"))
    await eventually(lambda: b.inbox)
    await asyncio.sleep(0.2)
    assert a.client.unacked == 1  # the ack died on a's half-open path

    started = time.monotonic()
    assert await a.client.check(timeout=0.3) is False
    await asyncio.wait_for(a.client.drain(), 3)  # resent after reconnecting; b acks the dup
    print(f"\n[lost ack] check(0.3) -> drained: {(time.monotonic() - started) * 1000:.0f} ms")
    assert b.data() == ["s1"]
    assert a.states == ["connected", "disconnected", "connected"]
    await close_all(a, b)


async def test_resend_timer_recovers_a_lost_ack_while_the_peer_is_present(relay, monkeypatch):
    dropped: list[dict] = []
    forward = server_module._Endpoint.forward

    def drop_first_ack(self, message):
        if not dropped:
            dropped.append(message)
            return True  # pretend it was queued
        return forward(self, message)

    monkeypatch.setattr(server_module._Endpoint, "forward", drop_first_ack)
    a = Peer(relay.url, "a", resend_after=0.2)
    b = Peer(relay.url, "b")
    await a.client.start()
    await b.client.start()
    await eventually(lambda: a.client.peer_present)
    await a.client.send(sig("x"))
    await asyncio.wait_for(a.client.drain(), 3)
    assert dropped and b.data() == ["x"]
    assert a.states == ["connected"]  # no reconnect needed
    await close_all(a, b)


# -- the relay: stuck peers stall nobody else ---------------------------------------------------


async def _stuck_peer(relay: SignalingServer, sender: Peer) -> ClientConnection:
    """Peer "b" that stops reading while ``sender`` floods it, until the relay's writer
    for b is blocked in a send and frames pile up in b's queue."""
    small_send_buffers(relay)
    b = await raw_join(relay, "b", rcvbuf=4096)
    assert await recv_first(b) == {"control": "peer", "event": "present"}
    b.transport.pause_reading()
    endpoint = relay.table._conversations["conv"].peers["b"]
    for i in range(60):
        await sender.client.send(sig(f"{i}:{noise()}"))
        if endpoint.queued >= 3:
            break
        await asyncio.sleep(0.01)
    await eventually(lambda: endpoint.queued >= 3)
    return b


async def test_a_stuck_receiver_delays_neither_its_own_rejoin_nor_other_conversations():
    async with SignalingServer(port=0, token=TOKEN, write_limit=4096) as relay:
        a = Peer(relay.url, "a")
        await a.client.start()
        stuck = await _stuck_peer(relay, a)
        old_endpoint = relay.table._conversations["conv"].peers["b"]

        # Another conversation is served at once.
        started = time.monotonic()
        x = await raw_join(relay, "x", conversation="other")
        y = await raw_join(relay, "y", conversation="other")
        await y.send(json.dumps({"tube_id": "t", "kind": "offer", "data": "hi"}))
        while (await recv(x)).get("data") != "hi":
            pass
        other = time.monotonic() - started

        # b reconnects (its old connection is stuck): it joins and is served at once.
        started = time.monotonic()
        b2 = await raw_join(relay, "b", resume=stuck.resume)
        first = await recv(b2)
        joined = time.monotonic() - started
        assert first == {"control": "peer", "event": "present", "resume": stuck.resume}
        assert old_endpoint.gone
        got = await recv(b2)  # what was queued for the stuck connection moved over
        assert isinstance(got, (dict, list))
        print(
            f"\n[stuck peer] other conversation served in {other * 1000:.1f} ms; "
            f"b rejoined (first message) in {joined * 1000:.1f} ms (was 2900 ms)"
        )
        assert joined < 1.0 and other < 1.0
        # The replaced connection cannot even flush its close frame: it is aborted after
        # replace_grace (1 s), not after the 5 s close timeout, and nobody waited for it.
        await asyncio.wait_for(old_endpoint.ws.wait_closed(), 3)
        print(f"[stuck peer] old connection gone {(time.monotonic() - started):.2f} s after")
        for ws in (x, y, b2):
            await ws.close()
        stuck.transport.abort()
        await a.client.close()


async def test_a_stuck_writer_drops_its_connection_and_the_sender_is_told(caplog):
    async with SignalingServer(
        port=0, token=TOKEN, write_limit=4096, send_timeout=0.3
    ) as relay:
        a = Peer(relay.url, "a")
        await a.client.start()
        stuck = await _stuck_peer(relay, a)
        started = time.monotonic()
        await eventually(lambda: a.peer_events[-1:] == ["left"], timeout=3)
        print(f"\n[stuck writer] dropped after {(time.monotonic() - started) * 1000:.0f} ms")
        assert relay.table.peers("conv") == ["a"]
        assert any("did not finish within 0.3s" in r.getMessage() for r in caplog.records)
        assert a.client.unacked > 0  # nothing was acknowledged: a keeps it all
        stuck.transport.abort()
        await a.client.close()


async def test_a_full_outgoing_queue_drops_that_connection_and_holds_its_signals():
    async with SignalingServer(
        port=0, token=TOKEN, write_limit=4096, send_queue_frames=3
    ) as relay:
        a = Peer(relay.url, "a")
        await a.client.start()
        small_send_buffers(relay)
        b = await raw_join(relay, "b", rcvbuf=4096)
        assert await recv_first(b) == {"control": "peer", "event": "present"}
        b.transport.pause_reading()
        for i in range(60):
            await a.client.send(sig(f"{i}:{noise()}"))
            await asyncio.sleep(0.005)
            if "left" in a.peer_events:
                break
        await eventually(lambda: "left" in a.peer_events)
        assert relay.table.peers("conv") == ["a"]
        await eventually(lambda: relay.table.held_count("conv") > 0)
        b.transport.abort()

        # b comes back and gets everything, once, in order (held + a's resend on "joined")
        b2 = Peer(relay.url, "b", max_message_bytes=64 * 1024)
        await b2.client.start()
        await asyncio.wait_for(a.client.drain(), 5)
        sent = i + 1
        assert [d.split(":")[0] for d in b2.data()] == [str(n) for n in range(sent)]
        await close_all(a, b2)


# -- check() and reconnect() -----------------------------------------------------------------


async def test_check_on_a_healthy_connection_answers_and_concurrent_checks_share_one(relay):
    a = Peer(relay.url, "a")
    await a.client.start()
    started = time.monotonic()
    first, second = await asyncio.gather(a.client.check(), a.client.check())
    print(f"\n[check] healthy: {(time.monotonic() - started) * 1000:.1f} ms")
    assert first is True and second is True
    assert a.states == ["connected"]
    await a.client.close()
    assert await a.client.check() is False  # closed


async def test_check_on_a_half_open_connection_reconnects_within_about_the_timeout(
    relay, proxy
):
    a = Peer(proxy.url, "a", reconnect_base=2.0, reconnect_max=5.0)  # no quick backoff
    await a.client.start()
    proxy.freeze()
    started = time.monotonic()
    results = await asyncio.gather(a.client.check(timeout=0.5), a.client.check(timeout=0.5))
    failed_after = time.monotonic() - started
    await asyncio.wait_for(a.client.wait_connected(), 3)
    reconnected_after = time.monotonic() - started
    print(
        f"\n[check] half-open: check() returned after {failed_after * 1000:.0f} ms, "
        f"reconnected after {reconnected_after * 1000:.0f} ms (timeout 500 ms)"
    )
    assert results == [False, False]
    assert 0.45 < failed_after < 1.0
    assert reconnected_after < 1.5
    assert a.states == ["connected", "disconnected", "connected"]  # one reconnect
    assert proxy.accepted == 2
    await a.client.send(sig("works"))
    await a.client.close()


async def test_reconnect_drops_the_connection_and_connects_again_at_once(relay):
    a = Peer(relay.url, "a", reconnect_base=2.0, reconnect_max=5.0)
    b = Peer(relay.url, "b")
    await a.client.start()
    await b.client.start()
    started = time.monotonic()
    a.client.reconnect("test: network changed")
    await eventually(lambda: a.states.count("connected") == 2)
    elapsed = time.monotonic() - started
    print(f"\n[reconnect] connected again after {elapsed * 1000:.1f} ms")
    assert elapsed < 0.5  # no 1-2 s backoff
    assert a.states == ["connected", "disconnected", "connected"]
    await a.client.send(sig("after"))
    await eventually(lambda: b.data() == ["after"])
    await close_all(a, b)


async def test_reconnect_when_not_connected_cuts_the_backoff_short():
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    port = relay.port
    await relay.close()
    a = Peer(f"ws://127.0.0.1:{port}/", "a", reconnect_base=3.0, reconnect_max=5.0)
    starting = asyncio.create_task(a.client.start())
    await asyncio.sleep(0.1)  # first attempt failed: now in a 1.5-3 s backoff sleep
    async with SignalingServer(port=port, token=TOKEN):
        started = time.monotonic()
        a.client.reconnect("test: network changed")
        await asyncio.wait_for(starting, 2)
        elapsed = time.monotonic() - started
        print(f"\n[reconnect] from backoff: connected after {elapsed * 1000:.1f} ms")
        assert elapsed < 0.5
        await a.client.close()


async def test_reconnect_abandons_a_hanging_connection_attempt():
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts TCP, never answers the WebSocket handshake

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    a = Peer(f"ws://127.0.0.1:{port}/", "a", open_timeout=10.0)
    starting = asyncio.create_task(a.client.start())
    await eventually(lambda: len(accepted) == 1)
    a.client.reconnect("test: network changed")
    await eventually(lambda: len(accepted) == 2, timeout=1.0)  # not after open_timeout
    await a.client.close()
    await asyncio.wait_for(starting, 1)
    for writer in accepted:
        writer.transport.abort()
    server.close()
    await server.wait_closed()


async def test_check_when_not_connected_hurries_the_reconnect():
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    port = relay.port
    await relay.close()
    a = Peer(f"ws://127.0.0.1:{port}/", "a", reconnect_base=3.0, reconnect_max=5.0)
    starting = asyncio.create_task(a.client.start())
    await asyncio.sleep(0.1)
    async with SignalingServer(port=port, token=TOKEN):
        assert await a.client.check() is False
        await asyncio.wait_for(starting, 1)
        assert a.client.connected
        await a.client.close()


# -- presence and discard ----------------------------------------------------------------------


async def test_peer_presence_reaches_on_peer(relay):
    a = Peer(relay.url, "a")
    await a.client.start()
    await eventually(lambda: a.client.peer_present is False)
    assert a.peer_events == []  # absent from the start: nothing changed

    b = Peer(relay.url, "b")
    await b.client.start()
    await eventually(lambda: a.peer_events == ["joined"] and b.peer_events == ["joined"])
    await b.client.close()
    await eventually(lambda: a.peer_events == ["joined", "left"])
    assert a.client.peer_present is False

    b = Peer(relay.url, "b")
    await b.client.start()
    await eventually(lambda: a.peer_events == ["joined", "left", "joined"])
    await close_all(a, b)


async def test_on_peer_exceptions_are_logged(relay, caplog):
    def boom(event: str) -> None:
        raise RuntimeError("app bug")

    a = SignalingClient(relay.url, TOKEN, "conv", lambda s: None, peer_id="a", on_peer=boom)
    b = Peer(relay.url, "b")
    await a.start()
    await b.client.start()
    await eventually(lambda: any("on_peer failed" in r.getMessage() for r in caplog.records))
    await b.client.send(sig("still"))
    await asyncio.wait_for(b.client.drain(), 3)
    await a.close()
    await b.client.close()


async def test_discard_forgets_a_closed_tubes_signals(relay):
    a = Peer(relay.url, "a")  # not started yet: nothing can be acknowledged meanwhile
    await a.client.send(
        [
            sig("1", tube="t1"),
            sig("2", tube="t2"),
            sig("3", tube="t1"),
            sig("4", tube="t2", kind="ice_restart_offer"),
            sig("5", tube="t2"),
        ]
    )
    assert a.client.discard("t1") == 2
    assert a.client.discard("t1") == 0
    assert a.client.discard("unknown") == 0
    assert a.client.discard("t2", {"ice_restart_offer", "answer"}) == 1  # only those kinds
    assert a.client.unacked == 2
    await a.client.start()
    b = Peer(relay.url, "b")
    await b.client.start()
    await asyncio.wait_for(a.client.drain(), 3)
    # seq 2 follows no kept signal, seq 5 follows seq 2: delivered despite the gaps
    assert b.data() == ["2", "5"]
    await close_all(a, b)


async def test_signals_keep_flowing_while_the_peer_flaps(relay, proxy):
    """Resends race with new signals across several half-open drops: once each, in order."""
    a = Peer(relay.url, "a")
    b = Peer(proxy.url, "b")
    await a.client.start()
    await b.client.start()
    await eventually(lambda: a.client.peer_present)
    sent = 0
    for _ in range(4):
        await a.client.send([sig(str(sent + i)) for i in range(5)])
        sent += 5
        await asyncio.sleep(0.02)
        proxy.freeze()
        await a.client.send([sig(str(sent + i)) for i in range(3)])
        sent += 3
        b.client.reconnect("test")
        await a.client.send(sig(str(sent)))
        sent += 1
    await asyncio.wait_for(a.client.drain(), 5)
    assert b.data() == [str(i) for i in range(sent)]
    await close_all(a, b)
