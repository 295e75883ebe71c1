"""The reconnecting signaling client against a real relay on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.server import serve

from tether.signaling import (
    AuthenticationError,
    ConversationFullError,
    OutboundQueueFullError,
    PeerReplacedError,
    SignalingClient,
    SignalingClosedError,
    SignalingServer,
    SignalTooLargeError,
)
from tether.signaling import server as server_module
from tether.signals import SignalError

TOKEN = "s3cret"
FAST = dict(reconnect_base=0.02, reconnect_max=0.1)


@pytest.fixture
async def relay():
    server = SignalingServer(port=0, token=TOKEN)
    await server.start()
    yield server
    await server.close()


class Peer:
    """A SignalingClient plus what it received."""

    def __init__(self, url: str, peer_id: str | None = None, token: str = TOKEN, **kw):
        self.inbox: list[dict] = []
        self.states: list[str] = []
        self.arrived = asyncio.Event()
        kw = {**FAST, **kw}
        self.client = SignalingClient(
            url, token, "conv", self._on_signal, peer_id=peer_id, on_state=self.states.append, **kw
        )

    def _on_signal(self, signal: dict) -> None:
        self.inbox.append(signal)
        self.arrived.set()

    def data(self, kind: str | None = None) -> list[str]:
        return [s["data"] for s in self.inbox if kind is None or s["kind"] == kind]

    async def wait_for(self, count: int, timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.inbox) < count:
                self.arrived.clear()
                await self.arrived.wait()


def sig(data: str, tube: str = "t1", kind: str = "icecandidate") -> dict:
    return {"tube_id": tube, "conversation_id": "conv", "kind": kind, "data": data}


async def eventually(condition, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# -- connecting ---------------------------------------------------------------------------


async def test_wrong_token_raises_authentication_error_and_is_not_retried(relay):
    before = asyncio.all_tasks()
    peer = Peer(relay.url, token="wrong")
    with pytest.raises(AuthenticationError, match="HTTP 401.*invalid token"):
        await asyncio.wait_for(peer.client.start(), 2)
    assert not peer.client.connected
    assert peer.states == ["failed"]
    with pytest.raises(AuthenticationError):
        await peer.client.wait_connected()
    with pytest.raises(SignalingClosedError):
        await peer.client.send(sig("x"))
    await peer.client.close()
    assert asyncio.all_tasks() == before


async def test_third_peer_gets_conversation_full_error(relay):
    a, b, c = Peer(relay.url, "a"), Peer(relay.url, "b"), Peer(relay.url, "c")
    await a.client.start()
    await b.client.start()
    with pytest.raises(ConversationFullError, match="409"):
        await asyncio.wait_for(c.client.start(), 2)
    for p in (a, b, c):
        await p.client.close()


async def test_start_retries_until_the_relay_comes_up():
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    port = relay.port
    await relay.close()

    peer = Peer(f"ws://127.0.0.1:{port}/")
    starting = asyncio.create_task(peer.client.start())
    await asyncio.sleep(0.1)  # a few failed attempts
    assert not starting.done()
    async with SignalingServer(port=port, token=TOKEN):
        await asyncio.wait_for(starting, 2)
        assert peer.client.connected
        await peer.client.close()


async def test_same_peer_id_replaces_only_with_the_resume_credential(relay):
    first = Peer(relay.url, "same")
    await first.client.start()
    assert first.client.resume.startswith("tr1_")

    # Knowing the peer id is not enough: refused like a third peer, first keeps its place.
    intruder = Peer(relay.url, "same")
    with pytest.raises(ConversationFullError, match="409") as refused:
        await intruder.client.start()
    assert "resume credential" in str(refused.value)
    assert first.client.connected and first.client.error is None
    await intruder.client.close()

    # The holder of the credential (e.g. the same process after a half-open connection) may.
    second = Peer(relay.url, "same")
    second.client.resume = first.client.resume
    await second.client.start()
    await eventually(lambda: first.client.error is not None)
    assert isinstance(first.client.error, PeerReplacedError)
    assert first.states[-1] == "failed"
    assert second.client.connected
    assert second.client.resume == first.client.resume
    await first.client.close()
    await second.client.close()


# -- relaying -------------------------------------------------------------------------------


async def test_relay_between_two_clients_one_signal_and_a_list_in_order(relay):
    a, b = Peer(relay.url, "a"), Peer(relay.url, "b")
    received_async: list[str] = []

    async def on_signal_async(signal: dict) -> None:
        await asyncio.sleep(0)
        received_async.append(signal["data"])

    c = SignalingClient(relay.url, TOKEN, "conv2", on_signal_async, peer_id="c", **FAST)
    d = SignalingClient(relay.url, TOKEN, "conv2", lambda s: None, peer_id="d", **FAST)
    for client in (a.client, b.client, c, d):
        await client.start()

    await a.client.send(sig("offer-sdp", kind="offer"))
    await a.client.send([sig(f"cand{i}") for i in range(5)])
    await b.wait_for(6)
    assert b.data() == ["offer-sdp"] + [f"cand{i}" for i in range(5)]
    assert all(s["peer"] == "a" for s in b.inbox)
    await a.client.drain()
    assert a.client.unacked == 0

    await b.client.send(sig("answer-sdp", kind="answer"))
    await a.wait_for(1)
    assert a.data() == ["answer-sdp"]

    await d.send([{"tube_id": "t", "kind": "keepalive", "data": str(i)} for i in range(3)])
    await eventually(lambda: len(received_async) == 3)
    assert received_async == ["0", "1", "2"]
    for client in (a.client, b.client, c, d):
        await client.close()


async def test_exception_in_on_signal_is_logged_and_the_client_keeps_going(relay, caplog):
    got: list[str] = []

    def on_signal(signal: dict) -> None:
        got.append(signal["data"])
        if signal["data"] == "boom":
            raise RuntimeError("app bug")

    receiver = SignalingClient(relay.url, TOKEN, "conv", on_signal, peer_id="r", **FAST)
    sender = Peer(relay.url, "s")
    await receiver.start()
    await sender.client.start()
    await sender.client.send([sig("boom"), sig("after")])
    await eventually(lambda: got == ["boom", "after"])
    assert receiver.connected
    assert any("on_signal failed" in r.getMessage() for r in caplog.records)
    await receiver.close()
    await sender.client.close()


async def test_signals_sent_before_the_other_peer_joins_arrive_when_it_joins(relay):
    a = Peer(relay.url, "a")
    await a.client.send(sig("queued before start"))  # queued even before connecting
    await a.client.start()
    await a.client.send(sig("sent while alone"))
    await eventually(lambda: relay.table.held_count("conv") == 2)
    assert a.client.unacked == 2  # held by the relay, not yet delivered

    b = Peer(relay.url, "b")
    await b.client.start()
    await b.wait_for(2)
    assert b.data() == ["queued before start", "sent while alone"]
    await a.client.drain()
    await a.client.close()
    await b.client.close()


async def test_relay_error_reaches_on_signal_and_a_rejected_signal_is_kept_for_later(caplog):
    async with SignalingServer(port=0, token=TOKEN, max_held=1) as relay:
        a = Peer(relay.url, "a")
        await a.client.start()
        await a.client.send([sig("held"), sig("overflow", tube="t2")])
        await a.wait_for(1)
        error = a.inbox[0]
        assert error["kind"] == "error" and error["tube_id"] == "t2"
        assert "queue for this conversation is full" in error["data"]
        await eventually(lambda: any("keeping 1 signal" in r.getMessage() for r in caplog.records))
        # Kept, and not spinning: nothing is resent while the peer is absent.
        await asyncio.sleep(0.2)
        assert a.client.unacked == 2
        assert relay.table.held_count("conv") == 1
        assert len([r for r in caplog.records if "keeping" in r.getMessage()]) == 1

        b = Peer(relay.url, "b")
        await b.client.start()  # "joined": a resends what is not acknowledged
        await b.wait_for(2)
        assert b.data() == ["held", "overflow"]
        await asyncio.wait_for(a.client.drain(), 3)
        await a.client.close()
        await b.client.close()


async def test_malformed_incoming_items_are_logged_and_skipped(caplog):
    good = {"tube_id": "t", "conversation_id": "conv", "kind": "offer", "data": "ok"}

    async def handler(ws) -> None:
        await ws.send("not json")
        await ws.send(b"\x00binary")
        await ws.send(json.dumps({"control": "ack", "seqs": "junk"}))
        await ws.send(json.dumps([good, {"kind": "offer"}, 5]))
        await ws.send(json.dumps({**good, "data": "last"}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as fake:
        port = fake.sockets[0].getsockname()[1]
        peer = Peer(f"ws://127.0.0.1:{port}/", "p")
        await peer.client.start()
        await peer.wait_for(2)
        assert peer.data() == ["ok", "last"]
        reasons = " | ".join(r.getMessage() for r in caplog.records)
        assert "frame is not valid JSON" in reasons
        assert "item 1: missing or empty 'tube_id'" in reasons
        assert "item 2: a signal must be a JSON object" in reasons
        assert "binary" in reasons and "malformed ack" in reasons
        assert peer.client.connected
        await peer.client.close()


# -- surviving a relay restart ---------------------------------------------------------------


async def test_relay_restart_both_reconnect_and_every_signal_arrives_once_in_order(
    monkeypatch,
):
    # The first relay instance loses every ack, so at the restart all of a's signals are
    # unacknowledged (some delivered, some not): the resend must not duplicate them.
    def lose_ack(self, message):
        return True

    monkeypatch.setattr(server_module._Endpoint, "forward", lose_ack)
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    port = relay.port
    a, b = Peer(relay.url, "a"), Peer(relay.url, "b")
    await a.client.start()
    await b.client.start()

    await a.client.send([sig(f"s{i}") for i in range(1, 4)])
    await b.wait_for(3)
    assert a.client.unacked == 3

    await relay.close()  # restart: its memory is gone
    await eventually(lambda: not a.client.connected and not b.client.connected)
    await a.client.send([sig(f"s{i}") for i in range(4, 7)])  # sent while it is down
    await b.client.send(sig("from b while down"))

    monkeypatch.undo()
    async with SignalingServer(port=port, token=TOKEN) as relay2:
        await asyncio.wait_for(a.client.wait_connected(), 3)
        await asyncio.wait_for(b.client.wait_connected(), 3)
        await b.wait_for(6)
        await a.wait_for(1)
        await asyncio.wait_for(a.client.drain(), 3)
        await asyncio.wait_for(b.client.drain(), 3)
        assert b.data() == [f"s{i}" for i in range(1, 7)]  # once each, in order
        assert a.data() == ["from b while down"]
        assert a.states[:3] == ["connected", "disconnected", "connected"]
        assert relay2.table.peers("conv") and relay2.conversation_count == 1
        await a.client.close()
        await b.client.close()


async def test_held_signals_lost_in_a_relay_restart_are_resent():
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    port = relay.port
    a = Peer(relay.url, "a")
    await a.client.start()
    await a.client.send([sig("1"), sig("2")])
    await eventually(lambda: relay.table.held_count("conv") == 2)
    await relay.close()  # the held signals die with it

    async with SignalingServer(port=port, token=TOKEN):
        await asyncio.wait_for(a.client.wait_connected(), 3)
        b = Peer(f"ws://127.0.0.1:{port}/", "b")
        await b.client.start()
        await b.wait_for(2)
        await a.client.drain()
        assert b.data() == ["1", "2"]
        await a.client.close()
        await b.client.close()


# -- lifecycle and bounds --------------------------------------------------------------------


async def test_close_ends_every_task(relay):
    before = asyncio.all_tasks()
    a, b = Peer(relay.url, "a"), Peer(relay.url, "b")
    await a.client.start()
    await b.client.start()
    await a.client.send(sig("x"))
    await b.wait_for(1)
    await a.client.close()
    await a.client.close()  # idempotent
    await b.client.close()
    assert not a.client.connected
    assert a.states == ["connected", "disconnected", "closed"]
    await eventually(lambda: relay.conversation_count == 0)
    await eventually(lambda: asyncio.all_tasks() == before)  # the relay's handlers too
    with pytest.raises(SignalingClosedError):
        await a.client.wait_connected()


async def test_close_while_reconnecting_or_starting_ends_every_task():
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    port = relay.port
    await relay.close()
    before = asyncio.all_tasks()
    peer = Peer(f"ws://127.0.0.1:{port}/", reconnect_base=0.5, reconnect_max=1.0)
    starting = asyncio.create_task(peer.client.start())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(peer.client.close(), 1)
    await asyncio.wait_for(starting, 1)  # start() returns quietly once closed
    assert asyncio.all_tasks() == before


async def test_outbound_queue_is_bounded(relay):
    peer = Peer(relay.url, max_outbound=3)  # not started: nothing is acknowledged
    await peer.client.send([sig("1"), sig("2")])
    with pytest.raises(OutboundQueueFullError, match="max_outbound=3"):
        await peer.client.send([sig("3"), sig("4")])  # all or nothing
    await peer.client.send(sig("3"))
    with pytest.raises(OutboundQueueFullError):
        await peer.client.send(sig("4"))
    assert peer.client.unacked == 3
    await peer.client.close()


async def test_send_validates_signals(relay):
    peer = Peer(relay.url, max_message_bytes=2048)
    with pytest.raises(SignalError, match="unknown kind"):
        await peer.client.send({"tube_id": "t", "kind": "nope"})
    with pytest.raises(SignalError, match="signal 1: missing or empty 'tube_id'"):
        await peer.client.send([sig("ok"), {"kind": "offer"}])
    with pytest.raises(SignalError, match="not this client's conversation"):
        await peer.client.send({**sig("x"), "conversation_id": "other"})
    with pytest.raises(SignalTooLargeError, match="max_message_bytes=2048"):
        await peer.client.send(sig("x" * 3000))
    assert peer.client.unacked == 0
    await peer.client.close()


async def test_a_large_backlog_is_split_into_frames_within_the_limit():
    async with SignalingServer(port=0, token=TOKEN, max_message_bytes=2048) as relay:
        a = Peer(relay.url, "a", max_message_bytes=2048)
        b = Peer(relay.url, "b", max_message_bytes=2048)
        await a.client.send([sig("y" * 500 + str(i)) for i in range(20)])  # ~10 KB
        await a.client.start()
        await b.client.start()
        await b.wait_for(20)
        assert [d[-2:].lstrip("y") for d in b.data()] == [str(i) for i in range(20)]
        assert not [s for s in b.inbox if s["kind"] == "error"]
        await a.client.drain()
        await a.client.close()
        await b.client.close()


def test_constructor_rejects_bad_urls_and_arguments():
    with pytest.raises(ValueError):
        SignalingClient("http://example.com/", TOKEN, "conv", print)
    with pytest.raises(ValueError):
        SignalingClient("ws://127.0.0.1:1/", TOKEN, "", print)


async def test_abrupt_drops_are_survived_without_loss_or_duplicates(relay):
    a, b = Peer(relay.url, "a"), Peer(relay.url, "b")
    await a.client.start()
    await b.client.start()
    sent = 0
    for round_ in range(3):
        await a.client.send([sig(f"m{sent + i}") for i in range(5)])
        sent += 5
        # Cut every TCP connection without a closing handshake (code 1006 on both sides).
        for ws in list(relay._server.connections):
            ws.transport.abort()
        await a.client.send(sig(f"m{sent}"))
        sent += 1
    await b.wait_for(sent)
    await asyncio.wait_for(a.client.drain(), 3)
    assert b.data() == [f"m{i}" for i in range(sent)]
    assert b.states.count("disconnected") >= 1
    await a.client.close()
    await b.client.close()


async def test_burst_in_both_directions_keeps_order(relay):
    a, b = Peer(relay.url, "a"), Peer(relay.url, "b")
    await a.client.start()
    await b.client.start()
    n = 300

    async def pump(peer: Peer, tag: str) -> None:
        for i in range(0, n, 10):
            await peer.client.send([sig(f"{tag}{j}") for j in range(i, i + 10)])
            await asyncio.sleep(0)

    await asyncio.gather(pump(a, "a"), pump(b, "b"))
    await a.wait_for(n)
    await b.wait_for(n)
    assert a.data() == [f"b{i}" for i in range(n)]
    assert b.data() == [f"a{i}" for i in range(n)]
    await a.client.close()
    await b.client.close()


async def test_close_from_inside_on_signal(relay):
    before = asyncio.all_tasks()
    holder: list[SignalingClient] = []

    async def on_signal(signal: dict) -> None:
        await holder[0].close()

    closer = SignalingClient(relay.url, TOKEN, "conv", on_signal, peer_id="x", **FAST)
    holder.append(closer)
    other = Peer(relay.url, "y")
    await closer.start()
    await other.client.start()
    await other.client.send(sig("close now"))
    await eventually(lambda: closer._task.done())
    await closer.close()
    await other.client.close()
    await eventually(lambda: asyncio.all_tasks() == before)  # the relay's handlers too
