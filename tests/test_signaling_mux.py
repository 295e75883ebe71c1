"""Several conversations on ONE signaling connection (SignalingMux), against real relays
on 127.0.0.1 and real WebSockets; the Redis case with a real redis-server."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from tether.bench.relay import RedisServer
from tether.signaling import (
    AuthenticationError,
    ConversationFullError,
    SignalingClient,
    SignalingServer,
)
from tether.signaling.mux import MuxConversation, SignalingMux
from tether.signaling.redis_table import RedisConversationTable

TOKEN = "mux-s3cret"
FAST = dict(reconnect_base=0.02, reconnect_max=0.2)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def relay():
    server = SignalingServer(port=0, token=TOKEN)
    await server.start()
    yield server
    await server.close()


class Inbox:
    def __init__(self) -> None:
        self.data: list[str] = []
        self.peer_events: list[str] = []

    def on_signal(self, signal: dict) -> None:
        self.data.append(signal["data"])


def sig(conversation: str, data: str) -> dict:
    return {"tube_id": "t1", "conversation_id": conversation, "kind": "icecandidate",
            "data": data}


async def eventually(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def classic(url: str, conversation: str, inbox: Inbox, **kw) -> SignalingClient:
    return SignalingClient(url, TOKEN, conversation, inbox.on_signal,
                           on_peer=inbox.peer_events.append, **{**FAST, **kw})


def on_mux(mux: SignalingMux, conversation: str, inbox: Inbox, **kw) -> MuxConversation:
    return mux.conversation(conversation, inbox.on_signal, on_peer=inbox.peer_events.append,
                            **kw)


async def close_all(*things) -> None:
    for thing in things:
        await thing.close()


async def exchange(pairs: list[tuple[object, object, str]], count: int,
                   disturb=None) -> None:
    """Each (mux side, classic side, conversation) sends ``count`` signals both ways;
    ``disturb()`` is awaited halfway."""
    for n in range(count):
        for left, right, conversation in pairs:
            await left.send(sig(conversation, f"{conversation}>{n}"))
            await right.send(sig(conversation, f"{conversation}<{n}"))
        if n == count // 2 and disturb is not None:
            await disturb()
        await asyncio.sleep(0.002)


async def start_pairs(muxed: dict, others: dict) -> None:
    for c in muxed:
        await muxed[c].start()
        await others[c].start()


async def all_delivered(ins: dict, muxed: dict, others: dict, count: int) -> None:
    """Every signal arrived, once, in order, both ways (sequence-checked)."""
    async with asyncio.timeout(30):
        for c in ins:
            await muxed[c].drain()
            await others[c].drain()
    for c, (mine, theirs) in ins.items():
        assert mine.data == [f"{c}<{n}" for n in range(count)]
        assert theirs.data == [f"{c}>{n}" for n in range(count)]


# -- the wire, by hand --------------------------------------------------------------------


async def test_join_and_relay_by_hand_name_the_conversation(relay):
    inbox = Inbox()
    other = classic(relay.url, "c1", inbox)
    await other.start()
    async with connect(relay.url + "?mux=1", additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"control": "join", "conversation": "c1", "peer": "m"}))
        joined = json.loads(await ws.recv())
        assert joined["control"] == "joined" and joined["conversation"] == "c1"
        assert joined["event"] == "present" and joined["resume"].startswith("tr1_")
        # a signal for a conversation not joined: error + rejected (retry), nothing relayed
        await ws.send(json.dumps({**sig("c2", "x"), "session": "s", "seq": 1}))
        error = json.loads(await ws.recv())
        assert error["kind"] == "error" and "not joined" in error["data"]
        rejected = json.loads(await ws.recv())
        assert rejected == {"control": "rejected", "conversation": "c2", "session": "s",
                            "seqs": [1], "retry": True}
        # a bad join is refused with the handshake's status; the connection stays
        await ws.send(json.dumps({"control": "join", "conversation": "", "peer": "m"}))
        refused = json.loads(await ws.recv())
        assert refused["control"] == "refused" and refused["status"] == 400
        await ws.send(json.dumps({**sig("c1", "hello"), "session": "s", "seq": 1}))
        await eventually(lambda: inbox.data == ["hello"])
        ack = json.loads(await ws.recv())
        assert ack["control"] == "ack" and ack["conversation"] == "c1" and ack["seqs"] == [1]
        await other.send(sig("c1", "back"))
        got = json.loads(await ws.recv())
        assert got["data"] == "back" and got["conversation_id"] == "c1"
    await other.close()


async def test_resume_credential_replaces_a_membership_on_another_connection(relay):
    async with connect(relay.url + "?mux=1", additional_headers=AUTH) as old, \
            connect(relay.url + "?mux=1", additional_headers=AUTH) as new:
        for conversation in ("c1", "c2"):
            await old.send(json.dumps({"control": "join", "conversation": conversation,
                                       "peer": "p"}))
        credential = {}
        for _ in range(2):
            reply = json.loads(await old.recv())
            credential[reply["conversation"]] = reply["resume"]
        # without the credential: 409, like the handshake
        await new.send(json.dumps({"control": "join", "conversation": "c1", "peer": "p"}))
        refused = json.loads(await new.recv())
        assert refused["control"] == "refused" and refused["status"] == 409
        # with it: the new connection takes c1 over; c2 stays on the old one
        await new.send(json.dumps({"control": "join", "conversation": "c1", "peer": "p",
                                   "resume": credential["c1"]}))
        joined = json.loads(await new.recv())
        assert joined["control"] == "joined" and joined["resume"] == credential["c1"]
        closed = json.loads(await old.recv())
        assert closed == {"conversation": "c1", "control": "closed", "code": 4000,
                          "reason": "replaced by a newer connection of this peer"}
        assert relay.table.peers("c2") == ["p"] and relay.table.peers("c1") == ["p"]
        # the last membership taken over closes the old connection (code 4000)
        await new.send(json.dumps({"control": "join", "conversation": "c2", "peer": "p",
                                   "resume": credential["c2"]}))
        assert json.loads(await new.recv())["control"] == "joined"
        await old.wait_closed()
        assert old.close_code == 4000


# -- the client ---------------------------------------------------------------------------


async def test_two_conversations_share_one_connection(relay):
    mux = SignalingMux(relay.url, TOKEN, **FAST)
    ins = {c: (Inbox(), Inbox()) for c in ("c1", "c2")}
    muxed = {c: on_mux(mux, c, ins[c][0]) for c in ins}
    others = {c: classic(relay.url, c, ins[c][1]) for c in ins}
    try:
        await start_pairs(muxed, others)
        assert relay.connection_count == 3  # one mux + two classic
        assert relay.conversation_count == 2
        pairs = [(muxed[c], others[c], c) for c in ins]
        await exchange(pairs, 40)
        for c, (mine, theirs) in ins.items():
            await eventually(lambda: len(mine.data) == 40 and len(theirs.data) == 40)
            assert mine.data == [f"{c}<{n}" for n in range(40)]
            assert theirs.data == [f"{c}>{n}" for n in range(40)]
            assert "joined" in mine.peer_events
        async with asyncio.timeout(20):
            for c in ins:
                await muxed[c].drain()
    finally:
        await close_all(*muxed.values(), *others.values(), mux)


async def test_dropped_socket_rejoins_every_conversation_and_loses_nothing(relay):
    mux = SignalingMux(relay.url, TOKEN, **FAST)
    ins = {c: (Inbox(), Inbox()) for c in ("c1", "c2")}
    muxed = {c: on_mux(mux, c, ins[c][0], resend_after=1.0) for c in ins}
    others = {c: classic(relay.url, c, ins[c][1], resend_after=1.0) for c in ins}
    try:
        await start_pairs(muxed, others)
        first = mux._link

        async def drop() -> None:
            assert mux._link is not None
            mux._link.transport.abort()  # a dead socket, no goodbye

        await exchange([(muxed[c], others[c], c) for c in ins], 60, drop)
        await all_delivered(ins, muxed, others, 60)
        assert all(muxed[c].resume.startswith("tr1_") for c in ins)
        assert mux._link is not None and mux._link is not first
        assert relay.connection_count == 3
    finally:
        await close_all(*muxed.values(), *others.values(), mux)


async def test_relay_restart_rejoins_and_loses_nothing():
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    port = relay.port
    mux = SignalingMux(relay.url, TOKEN, **FAST)
    ins = {c: (Inbox(), Inbox()) for c in ("c1", "c2")}
    muxed = {c: on_mux(mux, c, ins[c][0], resend_after=1.0) for c in ins}
    others = {c: classic(relay.url, c, ins[c][1], resend_after=1.0) for c in ins}
    holder = {"relay": relay}

    async def restart() -> None:
        await holder["relay"].close()
        await asyncio.sleep(0.2)
        holder["relay"] = SignalingServer(port=port, token=TOKEN)
        await holder["relay"].start()

    try:
        await start_pairs(muxed, others)
        await exchange([(muxed[c], others[c], c) for c in ins], 40, restart)
        await all_delivered(ins, muxed, others, 40)
        assert holder["relay"].connection_count == 3
    finally:
        await close_all(*muxed.values(), *others.values(), mux)
        await holder["relay"].close()


async def test_a_refused_join_does_not_disturb_the_other_conversation(relay):
    mux = SignalingMux(relay.url, TOKEN, **FAST)
    ok_in, ok_other, full_in = Inbox(), Inbox(), Inbox()
    # "full" already has its two peers: a third is refused (409)
    taken = [classic(relay.url, "full", Inbox()) for _ in range(2)]
    good = on_mux(mux, "ok", ok_in)
    other = classic(relay.url, "ok", ok_other)
    full = on_mux(mux, "full", full_in)
    try:
        for client in (*taken, good, other):
            await client.start()
        with pytest.raises(ConversationFullError, match="409"):
            await asyncio.wait_for(full.start(), 20)
        assert mux.connected and good.connected
        await good.send(sig("ok", "still here"))
        await eventually(lambda: ok_other.data == ["still here"])
        await other.send(sig("ok", "and back"))
        await eventually(lambda: ok_in.data == ["and back"])
        assert relay.connection_count == 4  # the two in "full", "ok"'s other, the mux
    finally:
        await close_all(full, good, other, *taken, mux)


async def test_a_wrong_token_fails_every_conversation_of_the_mux(relay):
    mux = SignalingMux(relay.url, "wrong", **FAST)
    conversations = [on_mux(mux, f"c{n}", Inbox()) for n in range(2)]
    try:
        for conversation in conversations:
            with pytest.raises(AuthenticationError, match="401"):
                await asyncio.wait_for(conversation.start(), 20)
        assert isinstance(mux.error, AuthenticationError)
        assert relay.connection_count == 0
    finally:
        await close_all(*conversations, mux)


async def test_per_connection_cap_refuses_the_join_past_it():
    relay = SignalingServer(port=0, token=TOKEN, max_conversations_per_connection=2)
    await relay.start()
    mux = SignalingMux(relay.url, TOKEN, **FAST)
    conversations = [on_mux(mux, f"c{n}", Inbox()) for n in range(3)]
    try:
        await conversations[0].start()
        await conversations[1].start()
        third = asyncio.create_task(conversations[2].start())
        await eventually(lambda: "refused_429" in relay.metrics.render().decode())
        assert not third.done() and not conversations[2].connected  # it keeps trying
        assert relay.conversation_count == 2
        assert conversations[0].connected and conversations[1].connected
        # by hand: the refusal names the cap
        async with connect(relay.url + "?mux=1", additional_headers=AUTH) as ws:
            for n in range(3):
                await ws.send(json.dumps({"control": "join", "conversation": f"h{n}",
                                          "peer": "p"}))
            replies = [json.loads(await ws.recv()) for _ in range(3)]
        assert [r["control"] for r in replies] == ["joined", "joined", "refused"]
        assert replies[2]["status"] == 429 and "(2)" in replies[2]["reason"]
        third.cancel()
    finally:
        await close_all(*conversations, mux)
        await relay.close()


async def test_leaving_one_conversation_keeps_the_others(relay):
    mux = SignalingMux(relay.url, TOKEN, **FAST)
    a_in, b_in, b_other = Inbox(), Inbox(), Inbox()
    a = on_mux(mux, "a", a_in)
    b = on_mux(mux, "b", b_in)
    other = classic(relay.url, "b", b_other)
    try:
        await a.start()
        await b.start()
        await other.start()
        await a.close()
        await eventually(lambda: relay.conversation_count == 1)
        assert mux.connected and b.connected
        await b.send(sig("b", "x"))
        await eventually(lambda: b_other.data == ["x"])
        again = on_mux(mux, "a", Inbox())  # the id is free again on this connection
        await again.start()
        await again.close()
    finally:
        await close_all(b, other, mux)


# -- Redis: a mux peer on relay 1, a classic peer on relay 2 --------------------------------


@pytest.mark.skipif(RedisServer.binary() is None, reason="redis-server is not installed")
async def test_mux_peer_and_classic_peer_on_two_relays_sharing_redis():
    redis = RedisServer()
    await redis.start()
    relays = []
    try:
        for _ in range(2):
            table = RedisConversationTable(redis.url)
            await table.start()
            server = SignalingServer(port=0, token=TOKEN, table=table)
            await server.start()
            relays.append(server)
        mux = SignalingMux(relays[0].url, TOKEN, **FAST)
        ins = {c: (Inbox(), Inbox()) for c in ("c1", "c2")}
        muxed = {c: on_mux(mux, c, ins[c][0], resend_after=1.0) for c in ins}
        others = {c: classic(relays[1].url, c, ins[c][1], resend_after=1.0) for c in ins}
        try:
            await start_pairs(muxed, others)

            async def drop() -> None:
                mux._link.transport.abort()

            await exchange([(muxed[c], others[c], c) for c in ins], 40, drop)
            await all_delivered(ins, muxed, others, 40)
            assert relays[0].connection_count == 1 and relays[1].connection_count == 2
        finally:
            await close_all(*muxed.values(), *others.values(), mux)
    finally:
        for server in relays:
            await server.close()
        await redis.close()
