"""The relay facing the internet: identity, secrets out of logs, hostile frames, limits, TLS.

Real SignalingServer and SignalingClient / raw websockets peers on loopback. A second client
address is 127.0.0.2 (all of 127/8 is loopback on Linux). Rate limits run on a fake clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tether.signaling import SignalingClient, SignalingServer
from tether.signaling.client import CertificateError
from tether.signaling.conversations import MemoryConversationTable
from tether.signaling.frames import MAX_DEPTH, load, nesting_depth_exceeds, read_frame
from tether.signaling.limits import BucketTable, RelayLimits, TokenBucket, address_key

from .certs import certificate
from .test_signaling_proxy import FreezableProxy

TOKEN = "s3cret-token-value"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = dict(reconnect_base=0.02, reconnect_max=0.1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(condition, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def raw(relay: SignalingServer, peer: str, conversation: str = "conv", *,
              token: str = TOKEN, source: str = "127.0.0.1", resume: str | None = None):
    headers = {"Authorization": f"Bearer {token}"}
    if resume:
        headers["X-Tether-Resume"] = resume
    return await connect(
        f"ws://127.0.0.1:{relay.port}/?conversation={conversation}&peer={peer}",
        additional_headers=headers, proxy=None, local_addr=(source, 0), ping_interval=None,
    )


async def recv(ws, timeout: float = 2.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def sig(data: str = "", tube: str = "t1", **extra) -> dict:
    return {"tube_id": tube, "conversation_id": "", "kind": "icecandidate", "data": data, **extra}


def refusal(excinfo) -> tuple[int, str, str | None]:
    response = excinfo.value.response
    return response.status_code, response.body.decode(), response.headers.get("Retry-After")


# -- identity ---------------------------------------------------------------------------------


async def test_client_keeps_its_place_across_a_half_open_connection_and_a_relay_restart():
    async with SignalingServer(port=0, token=TOKEN) as relay, FreezableProxy(relay.port) as proxy:
        port = relay.port
        a = SignalingClient(proxy.url, TOKEN, "conv", lambda s: None, peer_id="a", **FAST)
        await a.start()
        credential = a.resume
        assert credential.startswith("tr1_")
        # An attacker with the token and the peer id cannot take the place ...
        with pytest.raises(InvalidStatus) as stolen:
            await raw(relay, "a")
        status, body, _ = refusal(stolen)
        assert status == 409 and credential not in body
        # ... but the client itself, reconnecting while the relay still holds its old
        # connection (a half-open path: the relay notices nothing), replaces it.
        old = relay.table._conversations["conv"].peers["a"]
        assert proxy.freeze() == 1
        a.reconnect("test: the path died")
        await eventually(lambda: relay.table.peers("conv") == ["a"]
                         and relay.table._conversations["conv"].peers["a"] is not old)
        await eventually(lambda: a.connected)
        assert old.gone and a.error is None and a.resume == credential
    # The relay restarts and knows nothing: the old credential is ignored, a fresh join works.
    async with SignalingServer(port=port, token=TOKEN) as relay2:
        a2 = SignalingClient(relay2.url, TOKEN, "conv", lambda s: None, peer_id="a", **FAST)
        a2.resume = credential
        await a2.start()
        assert relay2.table.peers("conv") == ["a"] and a2.resume not in ("", credential)
        await a2.close()
    await a.close()


# -- secrets never in logs ------------------------------------------------------------------------


async def test_token_and_credentials_appear_in_no_log_line_at_debug(caplog):
    caplog.set_level(logging.DEBUG)
    async with SignalingServer(port=0, token=TOKEN) as relay:
        got: list[dict] = []
        states: list[str] = []
        a = SignalingClient(relay.url, TOKEN, "conv", got.append, peer_id="a",
                            on_state=states.append, **FAST)
        b = SignalingClient(relay.url, TOKEN, "conv", lambda s: None, peer_id="b", **FAST)
        await a.start()
        await b.start()
        await b.send(sig("hello"))
        await eventually(lambda: got)
        a.reconnect("test: present the credential")  # the X-Tether-Resume header goes out
        await eventually(lambda: states.count("connected") == 2)
        with pytest.raises(InvalidStatus):
            await raw(relay, "x", token="wrong-" + TOKEN)  # a wrong token containing it
        secrets = [TOKEN, a.resume, b.resume]
        await a.close()
        await b.close()
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "Authorization: [redacted]" in text  # websockets did log the header, redacted
    assert "X-Tether-Resume: [redacted]" in text
    assert len(caplog.records) > 50
    for secret in secrets:
        assert secret not in text and secret[-12:] not in text


# -- hostile frames -------------------------------------------------------------------------------


def test_nesting_is_refused_before_parsing():
    assert not nesting_depth_exceeds('[{"a": [1, 2, {"b": []}]}]')
    assert nesting_depth_exceeds("[" * 30_000)
    assert not nesting_depth_exceeds('{"data": "' + "[" * 30_000 + '"}')  # inside a string
    assert not nesting_depth_exceeds('{"data": "\\"' + "[" * 3000 + '"}')  # escaped quote
    payload, problem = load("[" * 30_000)
    assert payload is None and f"deeper than {MAX_DEPTH}" in problem
    payload, problem = load("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert problem is None


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 30_000])
async def test_deep_frames_get_an_error_reply_and_the_connection_stays(depth, caplog):
    async with SignalingServer(port=0, token=TOKEN) as relay:
        a, b = await raw(relay, "a"), await raw(relay, "b")
        await recv(a), await recv(a), await recv(b)  # absent+resume, joined / present
        await a.send("[" * depth + "]" * depth)
        reply = await recv(a)
        assert reply["kind"] == "error" and "nested deeper" in reply["data"]
        await a.send(json.dumps(sig("still here")))
        assert (await recv(b))["data"] == "still here"
        await a.close()
        await b.close()
    assert not any(r.exc_info for r in caplog.records)


async def test_one_frame_of_many_sessions_gives_one_reply_and_no_ack_storm():
    async with SignalingServer(port=0, token=TOKEN) as relay:
        a, b = await raw(relay, "a"), await raw(relay, "b")
        await recv(a), await recv(a), await recv(b)
        items = [sig(str(i), session=f"s{i}", seq=1, prev=0) for i in range(500)]
        await a.send(json.dumps(items))
        reply = await recv(a)  # errors for the 499 other sessions, in one frame
        assert isinstance(reply, list) and len(reply) == 21
        assert "same 'session'" in reply[0]["data"]
        rejected = await recv(a)
        assert rejected == {"control": "rejected", "session": "s1", "seqs": [1], "retry": False}
        relayed = await recv(b)
        assert relayed["session"] == "s0"  # only the first session's signal went through
        with pytest.raises(TimeoutError):
            await recv(b, 0.1)
        with pytest.raises(TimeoutError):
            await recv(a, 0.1)
        await a.send(json.dumps(sig(seq=-1)))
        assert "'seq' must be an integer >= 0" in (await recv(a))["data"]
        await a.close()
        await b.close()


async def test_client_survives_hostile_frames_and_acks_once_per_frame(caplog):
    frames_in: list[str] = []
    received: list[dict] = []

    async def handler(ws):
        await ws.send(json.dumps({"control": "peer", "event": "present"}))
        await ws.send("[" * 30_000)
        await ws.send(json.dumps({"control": "peer", "event": "joined", "x": [[[[[[[[[[]]]]]]]]]]}))
        many = [sig(str(i), peer=f"p{i % 7}", session=f"s{i}", seq=1, prev=0) for i in range(300)]
        await ws.send(json.dumps(many))
        await ws.send(json.dumps(sig("last", peer="p0", session="z", seq=1, prev=0)))
        async for message in ws:
            frames_in.append(message)

    from websockets.asyncio.server import serve

    async with serve(handler, "127.0.0.1", 0) as fake:
        port = fake.sockets[0].getsockname()[1]
        client = SignalingClient(f"ws://127.0.0.1:{port}/", TOKEN, "conv", received.append,
                                 peer_id="me", proxy=None, **FAST)
        await client.start()
        await eventually(lambda: [s["data"] for s in received][-1:] == ["last"])
        await eventually(lambda: len(frames_in) == 2)
        await asyncio.sleep(0.1)
        assert [s["data"] for s in received] == ["0", "last"]
        acks = [json.loads(f) for f in frames_in]
        assert acks == [
            {"control": "ack", "to": "p0", "session": "s0", "seqs": [1]},
            {"control": "ack", "to": "p0", "session": "z", "seqs": [1]},
        ]
        assert client.connected and client.error is None
        await client.close()
    assert not any(r.exc_info for r in caplog.records)


_json_atoms = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_atoms,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["tube_id", "kind", "data", "conversation_id", "control", "seq",
                         "prev", "session", "peer", "to", "seqs", "event", "resume", "x"]),
        inner, max_size=6),
    max_leaves=20,
)
_frames = st.one_of(
    st.text(max_size=200),
    _json.map(json.dumps),
    st.builds(lambda d, s: "[" * d + s + "]" * d, st.integers(0, 3000), st.text(max_size=5)),
    st.builds(lambda d: '{"a":' * d + "1" + "}" * d, st.integers(0, 3000)),
)


@settings(max_examples=300, deadline=None)
@given(_frames)
def test_client_frame_parsing_never_raises(text):
    control, signals, errors = read_frame(text)
    assert control is None or isinstance(control, dict)
    assert all(isinstance(s, dict) for s in signals)
    assert all(isinstance(e, str) and len(e) <= 320 for e in errors)


class _Relay:
    """One relay and a connected pair for the hypothesis tests (made once: they are slow)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # default max_message_bytes: every generated frame stays under the 1009 limit
        self.relay = SignalingServer(port=0, token=TOKEN)
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        await self.relay.start()
        self.a, self.b = await raw(self.relay, "a"), await raw(self.relay, "b")
        await recv(self.a), await recv(self.a), await recv(self.b)

    def roundtrip(self, text: str) -> list:
        return self.loop.run_until_complete(self._roundtrip(text))

    async def _roundtrip(self, text: str) -> list:
        await self.a.send(text)
        await self.a.send(json.dumps(sig("marker", session="m", seq=1)))
        replies = []
        while True:
            message = await recv(self.a)
            if message == {"control": "ack", "peer": "b", "session": "m", "seqs": [1]}:
                return replies
            replies.append(message)
            if isinstance(message, list) or message.get("control") is None:
                continue

    def close(self) -> None:
        async def shut() -> None:
            await self.a.close()
            await self.b.close()
            await self.relay.close()

        self.loop.run_until_complete(shut())
        self.loop.close()


@pytest.fixture(scope="module")
def shared_relay():
    relay = _Relay()
    yield relay
    relay.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_frames)
def test_relay_answers_any_text_frame_with_documented_replies_only(shared_relay, text):
    relay = shared_relay

    async def b_acks_marker() -> None:
        # b plays a client: acknowledges the marker (and drains whatever was relayed)
        while True:
            message = await recv(relay.b)
            items = message if isinstance(message, list) else [message]
            if any(isinstance(i, dict) and i.get("data") == "marker" for i in items):
                await relay.b.send(json.dumps({"control": "ack", "to": "a", "session": "m",
                                               "seqs": [1]}))
                return

    async def both() -> list:
        acker = asyncio.create_task(b_acks_marker())
        try:
            return await relay._roundtrip(text)
        finally:
            await acker

    replies = relay.loop.run_until_complete(both())
    assert len(replies) <= 3  # one error frame, at most two rejected notices
    for reply in replies:
        for item in reply if isinstance(reply, list) else [reply]:
            if item.get("control") == "rejected":
                assert set(item) == {"control", "session", "seqs", "retry"}
            else:
                assert item["kind"] == "error" and "peer" not in item
                assert set(item) == {"kind", "tube_id", "conversation_id", "data"}
    relay.loop.run_until_complete(relay.a.ping())  # the connection is still open


# -- limits (fake clock) ----------------------------------------------------------------------------


def test_token_bucket_and_bucket_table_on_a_fake_clock():
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, now=clock())
    assert [bucket.take(clock()) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(clock()) == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take(clock()) == 0.0
    table = BucketTable(1.0, 1, clock, max_keys=2)
    assert table.take("x") == 0.0 and table.take("x") == pytest.approx(1.0)
    table.take("y"), table.take("z")  # x is forgotten (LRU): a fresh budget, bounded memory
    assert len(table) == 2 and table.wait("x") == 0.0
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    with pytest.raises(ValueError):
        RelayLimits(join_rate=0)


async def test_wrong_tokens_get_slower_per_address_and_429_carries_retry_after():
    clock = FakeClock()
    limits = RelayLimits(failed_auth_burst=3, failed_auth_rate=0.5)
    async with SignalingServer(port=0, token=TOKEN, limits=limits, clock=clock) as relay:
        for _ in range(3):
            with pytest.raises(InvalidStatus) as wrong:
                await raw(relay, "a", token="nope", source="127.0.0.2")
            assert refusal(wrong)[0] == 401
        # Budget spent: refused before the token is looked at, even the right one.
        with pytest.raises(InvalidStatus) as slowed:
            await raw(relay, "a", token=TOKEN, source="127.0.0.2")
        status, body, retry = refusal(slowed)
        assert status == 429 and "failed authentication" in body and retry == "2"
        ok = await raw(relay, "a")  # another address is not affected
        clock.now += 2.0
        ok2 = await raw(relay, "b", source="127.0.0.2")  # and the budget refills
        await ok.close()
        await ok2.close()


async def test_connection_conversation_and_join_limits_per_address():
    clock = FakeClock()
    limits = RelayLimits(max_connections_per_address=3, max_conversations_per_address=2,
                         join_burst=10, join_rate=1.0)
    async with SignalingServer(port=0, token=TOKEN, limits=limits, clock=clock) as relay:
        c1 = await raw(relay, "a", "c1", source="127.0.0.2")
        c2 = await raw(relay, "a", "c2", source="127.0.0.2")
        with pytest.raises(InvalidStatus) as conversations:
            await raw(relay, "a", "c3", source="127.0.0.2")
        status, body, retry = refusal(conversations)
        assert status == 429 and "too many conversations" in body and retry is not None
        c1b = await raw(relay, "b", "c1", source="127.0.0.2")  # joining one is fine
        with pytest.raises(InvalidStatus) as connections:
            await raw(relay, "b", "c2", source="127.0.0.2")
        assert refusal(connections)[:1] == (429,) and "connections" in refusal(connections)[1]
        other = await raw(relay, "b", "c2")  # another address is not affected
        await c1.close()
        await eventually(lambda: relay._connections.get("127.0.0.2") == 2)
        for _ in range(15):  # a connection slot is free again; now the join rate bites
            try:
                ws = await raw(relay, "x", "c1", source="127.0.0.2")
            except InvalidStatus as exc:
                assert exc.response.status_code in (409, 429)
                if exc.response.status_code == 429:
                    assert "slow down" in exc.response.body.decode()
                    assert exc.response.headers["Retry-After"] == "1"
                    break
            else:
                await ws.close()
        else:
            pytest.fail("the join rate never limited")
        for ws in (c2, c1b, other):
            await ws.close()
        await eventually(lambda: relay.connection_count == 0)


async def test_held_signals_are_bounded_in_bytes_and_expire():
    clock = FakeClock()
    table = MemoryConversationTable(max_held=100, max_held_bytes=10_000,
                                    max_held_total_bytes=15_000, held_ttl=60, clock=clock)
    async with SignalingServer(port=0, token=TOKEN, table=table, clock=clock) as relay:
        a = await raw(relay, "a", "c1")
        a2 = await raw(relay, "a", "c2")
        await recv(a), await recv(a2)
        for i in range(5):
            await a.send(json.dumps(sig("x" * 3000, session="s", seq=i + 1)))
        replies = [await recv(a), await recv(a), await recv(a), await recv(a)]
        assert "10000 bytes waiting" in replies[0]["data"]
        assert replies[1] == {"control": "rejected", "session": "s", "seqs": [4], "retry": True}
        assert table.held_count("c1") == 3
        await a2.send(json.dumps(sig("y" * 3000, session="t", seq=1)))
        await a2.send(json.dumps(sig("y" * 3000, session="t", seq=2)))
        assert "15000 bytes in total" in (await recv(a2))["data"]
        clock.now += 61
        assert await table.expire() == 4  # 3 in c1, 1 in c2
        assert table.held_total == 0 and table.held_total_bytes == 0
        b = await raw(relay, "b", "c1")
        assert (await recv(b))["event"] == "present"
        with pytest.raises(TimeoutError):
            await recv(b, 0.1)  # nothing held any more: a resends on "joined"
        for ws in (a, a2, b):
            await ws.close()


# -- TLS ---------------------------------------------------------------------------------------------


async def test_wss_relay_verifies_with_the_given_ca_and_refuses_an_unknown_one(tmp_path):
    cert, key = certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with SignalingServer(port=0, token=TOKEN, ssl_context=context) as relay:
        assert relay.url.startswith("wss://")
        got: list[dict] = []
        a = SignalingClient(relay.url, TOKEN, "conv", got.append, ca_file=cert, **FAST)
        b = SignalingClient(relay.url, TOKEN, "conv", lambda s: None, ca_file=cert, **FAST)
        await a.start()
        await b.start()
        await b.send(sig("over tls"))
        await eventually(lambda: got)
        assert got[0]["data"] == "over tls"
        # The system store does not know this CA: a clear, fatal error.
        stranger = SignalingClient(relay.url, TOKEN, "conv2", lambda s: None, **FAST)
        with pytest.raises(CertificateError, match="certificate"):
            await stranger.start()
        await stranger.close()
        await a.close()
        await b.close()
    with pytest.raises(ValueError, match="wss://"):
        SignalingClient("ws://127.0.0.1:1/", TOKEN, "conv", lambda s: None, ca_file=cert)


class _QueuePeer:
    """The table's view of a connection (conversations.Peer): a bounded queue, recorded."""

    def __init__(self, peer_id: str, room: int = 100) -> None:
        self.peer_id, self.address, self.resume, self.credential = peer_id, "", "", ""
        self.room = room
        self.signals: list[dict] = []
        self.evicted: str | None = None

    def deliver(self, signals, *, bounded=True):
        if bounded and len(self.signals) + len(signals) > self.room:
            return False
        self.signals.extend(signals)
        return True

    def presence(self, event):
        return True

    def forward(self, message):
        return True

    def take_undelivered(self):
        return []

    def supersede(self):
        pass

    def evict(self, reason):
        self.evicted = reason


async def test_relay_now_takes_the_common_case_and_leaves_the_rest_to_relay():
    """The relay's coroutine-free path: it delivers when the other peer takes the signal,
    and otherwise changes nothing, so relay() decides exactly as it always did."""
    table = MemoryConversationTable()
    a, b = _QueuePeer("a"), _QueuePeer("b", room=2)
    await table.join("c", a)
    assert not table.relay_now("c", a, [sig("alone")])  # no other peer: relay() holds it
    assert table.held_count("c") == 0
    assert not (await table.relay("c", a, [sig("alone")])).rejected
    assert table.held_count("c") == 1
    await table.join("c", b)  # gets the held signal on joining
    assert [s["data"] for s in b.signals] == ["alone"]
    assert table.relay_now("c", a, [sig("one")])
    assert [s["data"] for s in b.signals] == ["alone", "one"]
    assert not table.relay_now("c", a, [sig("two")])  # b's queue is full: nothing done
    assert b.evicted is None and table.held_count("c") == 0
    assert not (await table.relay("c", a, [sig("two")])).rejected  # relay() evicts and holds
    assert b.evicted is not None and table.held_count("c") == 1
    stale = _QueuePeer("a")  # a connection of "a" that is not the current one
    assert not table.relay_now("c", stale, [sig("x")])
    assert (await table.relay("c", stale, [sig("x")])).superseded
    assert not table.relay_now("elsewhere", a, [sig("x")])
