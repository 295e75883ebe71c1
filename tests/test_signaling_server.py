"""The signaling relay, driven by raw websockets clients so every frame on the wire is seen."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tether.signaling import SignalingServer
from tether.signaling import server as server_module

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 4096  # max_message_bytes for most tests: small frames, fast tests


@pytest.fixture
async def relay():
    server = SignalingServer(host="127.0.0.1", port=0, token=TOKEN, max_message_bytes=LIMIT)
    await server.start()
    yield server
    await server.close()


def url(server: SignalingServer, conversation: str | None = "conv", peer: str | None = "a") -> str:
    query = "&".join(
        f"{k}={v}" for k, v in (("conversation", conversation), ("peer", peer)) if v is not None
    )
    return f"ws://127.0.0.1:{server.port}/?{query}"


async def join(
    server: SignalingServer,
    peer: str,
    conversation: str = "conv",
    token: str | None = TOKEN,
    resume: str | None = None,
) -> ClientConnection:
    """Connect; the relay's first message (presence of the other peer) is checked and eaten.

    Its resume credential is kept as ``ws.resume``; ``resume`` presents one.
    """
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if resume is not None:
        headers["X-Tether-Resume"] = resume
    ws = await connect(url(server, conversation, peer), additional_headers=headers, proxy=None)
    first = await recv_raw(ws)
    assert first["control"] == "peer" and first["event"] in ("present", "absent"), first
    assert first["resume"].startswith("tr1_") and len(first["resume"]) > 30, first
    ws.resume = first["resume"]
    return ws


async def recv_raw(ws: ClientConnection, timeout: float = 2.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv(ws: ClientConnection, timeout: float = 2.0):
    """The next message that is not a presence event (those have their own test)."""
    while True:
        message = await recv_raw(ws, timeout)
        if not (isinstance(message, dict) and message.get("control") == "peer"):
            return message


async def nothing_arrives(ws: ClientConnection, within: float = 0.05) -> None:
    with pytest.raises(TimeoutError):
        await recv(ws, within)


def sig(tube: str = "t1", kind: str = "icecandidate", data: str = "", **extra):
    return {"tube_id": tube, "conversation_id": "conv", "kind": kind, "data": data, **extra}


def status_of(excinfo: pytest.ExceptionInfo) -> tuple[int, str]:
    response = excinfo.value.response
    return response.status_code, response.body.decode()


# -- handshake ------------------------------------------------------------------------------


async def test_wrong_or_missing_token_is_refused_with_401(relay, caplog):
    caplog.set_level(logging.INFO, logger="tether.signaling.server")
    with pytest.raises(InvalidStatus) as wrong:
        await join(relay, "a", token="nope")
    assert status_of(wrong) == (401, "invalid token\n")
    assert wrong.value.response.headers["WWW-Authenticate"].startswith("Bearer")

    with pytest.raises(InvalidStatus) as missing:
        await join(relay, "a", token=None)
    status, body = status_of(missing)
    assert status == 401 and "missing token" in body and "Authorization: Bearer" in body

    with pytest.raises(InvalidStatus) as basic:
        await connect(url(relay), additional_headers={"Authorization": "Basic eDp5"}, proxy=None)
    assert status_of(basic)[0] == 401
    assert relay.conversation_count == 0
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert any("peer='a'" in m and "conversation='conv'" in m and "401" in m for m in refusals)


async def test_missing_or_bad_query_parameters_are_refused_with_400(relay):
    for conversation, peer, words in [
        (None, "a", "missing query parameter 'conversation'"),
        ("conv", None, "missing query parameter 'peer'"),
        ("", "a", "'conversation' must be 1 to"),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            await connect(
                url(relay, conversation, peer),
                additional_headers={"Authorization": f"Bearer {TOKEN}"},
                proxy=None,
            )
        status, body = status_of(refused)
        assert status == 400 and words in body, body


async def test_third_peer_is_refused_with_409_but_same_peer_replaces(relay, caplog):
    caplog.set_level(logging.INFO, logger="tether.signaling.server")
    a1 = await join(relay, "a")
    b = await join(relay, "b")
    with pytest.raises(InvalidStatus) as third:
        await join(relay, "c")
    status, body = status_of(third)
    assert status == 409 and "already has 2 peers" in body and "third peer" in body
    assert "'a'" not in body and "'b'" not in body  # names no other peer

    # Same peer id without (or with a wrong) resume credential: refused like a third peer.
    for wrong in (None, "tr1_" + "x" * 32, b.resume):
        with pytest.raises(InvalidStatus) as claim:
            await join(relay, "a", resume=wrong)
        status, body = status_of(claim)
        assert status == 409 and "resume credential" in body and "'b'" not in body

    a2 = await join(relay, "a", resume=a1.resume)  # its credential: replaces, not a third peer
    assert a2.resume == a1.resume  # the credential stays with the peer id
    await asyncio.wait_for(a1.wait_closed(), 2)
    assert a1.close_code == server_module.CLOSE_REPLACED
    assert sorted(relay.table.peers("conv")) == ["a", "b"]

    await a2.send(json.dumps(sig(data="from a2")))
    assert (await recv(b))["data"] == "from a2"
    await b.send(json.dumps(sig(data="from b")))
    assert (await recv(a2))["data"] == "from b"
    assert any("replacing its previous connection" in r.getMessage() for r in caplog.records)
    await a2.close()
    await b.close()


async def test_connect_and_disconnect_are_logged_with_conversation_and_peer(relay, caplog):
    caplog.set_level(logging.INFO, logger="tether.signaling.server")
    a = await join(relay, "alice", conversation="room")
    await a.close()
    for _ in range(100):
        if relay.conversation_count == 0:
            break
        await asyncio.sleep(0.01)
    messages = [r.getMessage() for r in caplog.records]
    assert any("'alice' joined conversation 'room'" in m for m in messages)
    assert any("'alice' left conversation 'room'" in m for m in messages)
    assert relay.conversation_count == 0  # the last peer leaving forgets the conversation


# -- relaying ---------------------------------------------------------------------------------


async def test_relays_one_signal_and_an_array_in_order_and_forwards_the_receivers_ack(relay):
    a = await join(relay, "a")
    b = await join(relay, "b")

    await a.send(json.dumps(sig(kind="offer", data="sdp", session="S", seq=1, prev=0)))
    got = await recv(b)
    assert got == sig(kind="offer", data="sdp", session="S", seq=1, prev=0, peer="a")
    await nothing_arrives(a)  # the relay itself acknowledges nothing

    batch = [sig(data=f"c{i}", session="S", seq=i) for i in (2, 3, 4)]
    await a.send(json.dumps(batch))
    got = await recv(b)
    assert [s["data"] for s in got] == ["c2", "c3", "c4"]
    assert all(s["peer"] == "a" for s in got)

    # The receiving client acknowledges; the relay forwards that to the sender.
    await b.send(json.dumps({"control": "ack", "to": "a", "session": "S", "seqs": [1, 2, 3, 4]}))
    assert await recv(a) == {"control": "ack", "peer": "b", "session": "S", "seqs": [1, 2, 3, 4]}
    # An ack for a peer that is not connected is dropped, not held.
    await b.send(json.dumps({"control": "ack", "to": "zed", "session": "S", "seqs": [9]}))
    await nothing_arrives(a)
    await nothing_arrives(b)

    # the other direction, and a signal without seq
    await b.send(json.dumps(sig(tube="t2", kind="answer")))
    assert (await recv(a))["tube_id"] == "t2"
    await nothing_arrives(b)
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"control": "nope"}, "unknown control message 'nope'"),
        ({"control": "ack", "session": "S", "seqs": [1]}, "'to' must be the sender's peer id"),
        ({"control": "ack", "to": "b", "seqs": [1]}, "'session' must be a string"),
        ({"control": "ack", "to": "b", "session": "S", "seqs": []}, "'seqs' must be a non-empty"),
        ({"control": "ack", "to": "b", "session": "S", "seqs": [True]}, "'seqs' must be"),
        ({"control": "ack", "to": "b", "session": "S", "seqs": "1"}, "'seqs' must be"),
    ],
)
async def test_bad_control_messages_get_an_error_and_are_not_forwarded(relay, message, words):
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send(json.dumps(message))
    error = await recv(a)
    assert error["kind"] == "error" and words in error["data"], error
    await nothing_arrives(b)
    await a.close()
    await b.close()


def without_resume(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "resume"}


async def test_presence_events(relay):
    a = await connect(url(relay, peer="a"), additional_headers=AUTH, proxy=None)
    assert without_resume(await recv_raw(a)) == {"control": "peer", "event": "absent"}
    b = await connect(url(relay, peer="b"), additional_headers=AUTH, proxy=None)
    first_b = await recv_raw(b)
    assert without_resume(first_b) == {"control": "peer", "event": "present"}
    assert await recv_raw(a) == {"control": "peer", "event": "joined"}  # no credential

    # b replaces its own connection: a hears "joined" again (never "left" for it)
    b2 = await connect(
        url(relay, peer="b"),
        additional_headers={**AUTH, "X-Tether-Resume": first_b["resume"]},
        proxy=None,
    )
    assert await recv_raw(b2) == first_b
    assert await recv_raw(a) == {"control": "peer", "event": "joined"}
    await asyncio.wait_for(b.wait_closed(), 2)

    await b2.close()
    assert await recv_raw(a) == {"control": "peer", "event": "left"}
    with pytest.raises(TimeoutError):
        await recv_raw(a, 0.05)
    await a.close()


async def test_sender_cannot_speak_for_another_peer_and_empty_conversation_is_filled(relay):
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send(json.dumps(sig(peer="b", conversation_id="")))
    got = await recv(b)
    assert got["peer"] == "a" and got["conversation_id"] == "conv"
    await a.close()
    await b.close()


GOOD = sig(data="still works")


@pytest.mark.parametrize(
    ("frame", "words", "tube_id"),
    [
        ("this is not json", "frame is not valid JSON", ""),
        ("42", "frame must be a JSON object or array, not int", ""),
        (json.dumps({"kind": "offer", "data": ""}), "missing or empty 'tube_id'", ""),
        (json.dumps(sig(tube="t7", kind="bogus")), "unknown kind 'bogus'", "t7"),
        (json.dumps(sig(tube="t8", data=5)), "'data' must be a string", "t8"),
        (json.dumps(sig(tube="t9", conversation_id="other")), "does not match", "t9"),
        (json.dumps([sig(control="ack")]), "item 0: the key 'control' is reserved", "t1"),
        (json.dumps(sig(prev=-1)), "'prev' must be an integer", "t1"),
        (json.dumps(sig(seq="7")), "'seq' must be an integer", "t1"),
        (b"\x00\x01binary", "binary frames are not accepted", ""),
    ],
)
async def test_malformed_frame_gets_an_error_and_the_connection_stays_open(
    relay, frame, words, tube_id
):
    a = await join(relay, "a")
    b = await join(relay, "b")
    await a.send(frame)
    error = await recv(a)
    assert error["kind"] == "error" and error["conversation_id"] == "conv"
    assert words in error["data"], error["data"]
    assert error["tube_id"] == tube_id
    assert "peer" not in error  # relay errors are told apart from a peer's error signals

    await a.send(json.dumps(GOOD))
    assert (await recv(b))["data"] == "still works"  # and nothing bad was relayed before it
    await a.close()
    await b.close()


async def test_array_mixing_good_and_bad_items(relay):
    a = await join(relay, "a")
    b = await join(relay, "b")
    frame = [
        sig(data="g0", session="S", seq=1),
        {"kind": "offer", "data": "", "session": "S", "seq": 2},  # no tube_id
        sig(data="g2", session="S", seq=3),
        sig(tube="t9", kind="nope", session="S", seq=4),
        17,
    ]
    await a.send(json.dumps(frame))

    relayed = await recv(b)
    assert [s["data"] for s in relayed] == ["g0", "g2"]

    replies = [await recv(a) for _ in range(2)]
    errors = next(r for r in replies if isinstance(r, list))
    assert [e["data"].split(":")[0] for e in errors] == ["item 1", "item 3", "item 4"]
    assert [e["tube_id"] for e in errors] == ["", "t9", ""]
    rejected = [r for r in replies if isinstance(r, dict)]
    assert rejected == [{"control": "rejected", "session": "S", "seqs": [2, 4], "retry": False}]

    await a.send(json.dumps(GOOD))
    assert (await recv(b))["data"] == "still works"
    await a.close()
    await b.close()


async def test_many_bad_items_are_summarised(relay):
    a = await join(relay, "a")
    await a.send(json.dumps([1] * 50))
    errors = await recv(a)
    assert len(errors) == server_module.MAX_ERRORS_PER_FRAME + 1
    assert "30 more bad item(s)" in errors[-1]["data"]
    await a.close()


async def test_oversized_frame_gets_an_error_and_is_not_relayed(relay):
    a = await join(relay, "a")
    b = await join(relay, "b")
    big = sig(tube="big", data="x" * (LIMIT + 100), session="S", seq=1)
    await a.send(json.dumps(big))
    replies = [await recv(a), await recv(a)]
    error = next(r for r in replies if "kind" in r)
    assert f"exceeds the relay's limit of {LIMIT} bytes" in error["data"]
    assert error["tube_id"] == "big"
    assert {"control": "rejected", "session": "S", "seqs": [1], "retry": False} in replies

    await a.send(json.dumps(GOOD))
    assert (await recv(b))["data"] == "still works"

    # Beyond 4x the limit, websockets itself closes with 1009 (message too big).
    await a.send("x" * (server_module.WS_SIZE_FACTOR * LIMIT + 1))
    await asyncio.wait_for(a.wait_closed(), 2)
    assert a.close_code == 1009
    await b.close()


# -- holding signals for an absent peer ------------------------------------------------------


async def test_signals_sent_before_the_other_peer_joins_are_delivered_when_it_joins(relay):
    a = await join(relay, "a")
    await a.send(json.dumps(sig(data="1", session="S", seq=1)))
    await a.send(json.dumps([sig(data="2", session="S", seq=2), sig(data="3", session="S", seq=3)]))
    await nothing_arrives(a)  # held, so not acknowledged yet
    assert relay.table.held_count("conv") == 3

    b = await join(relay, "b")
    got = await recv(b)
    assert [s["data"] for s in got] == ["1", "2", "3"]
    assert await recv_raw(a) == {"control": "peer", "event": "joined"}
    assert relay.table.held_count("conv") == 0
    # a resend of what was held is held only once
    await b.close()
    assert await recv_raw(a) == {"control": "peer", "event": "left"}
    await a.send(json.dumps([sig(data="1", session="S", seq=1), sig(data="4", session="S", seq=4)]))
    await a.send(json.dumps(sig(data="1", session="S", seq=1)))
    await nothing_arrives(a)
    assert relay.table.held_count("conv") == 2
    await a.close()
    await b.close()


async def test_held_queue_is_bounded():
    async with SignalingServer(port=0, token=TOKEN, max_held=2) as relay:
        a = await join(relay, "a")
        await a.send(json.dumps([sig(data=str(i), session="S", seq=i) for i in (1, 2, 3)]))
        replies = [await recv(a), await recv(a)]
        error = next(r for r in replies if "kind" in r)
        assert error["data"].startswith("item 2: the relay's queue for this conversation is full")
        assert {"control": "rejected", "session": "S", "seqs": [3], "retry": True} in replies

        b = await join(relay, "b")
        assert [s["data"] for s in await recv(b)] == ["1", "2"]
        await a.close()
        await b.close()


# -- bounds and lifecycle ----------------------------------------------------------------------


async def test_max_conversations_is_enforced():
    async with SignalingServer(port=0, token=TOKEN, max_conversations=1) as relay:
        a = await join(relay, "a", conversation="one")
        b = await join(relay, "b", conversation="one")  # same conversation: fine
        with pytest.raises(InvalidStatus) as refused:
            await join(relay, "c", conversation="two")
        status, body = status_of(refused)
        assert status == 503 and "relay is full" in body
        await a.close()
        await b.close()
        for _ in range(100):
            if relay.conversation_count == 0:
                break
            await asyncio.sleep(0.01)
        c = await join(relay, "c", conversation="two")  # room again
        await c.close()


async def test_close_is_idempotent_and_closes_connections_with_1001():
    relay = SignalingServer(port=0, token=TOKEN)
    await relay.start()
    a = await join(relay, "a")
    await relay.close()
    await relay.close()
    await asyncio.wait_for(a.wait_closed(), 2)
    assert a.close_code == 1001
    with pytest.raises(ConnectionClosed):
        await a.send("{}")
    with pytest.raises(OSError):
        await join(relay, "b")


def test_token_is_required():
    with pytest.raises(ValueError):
        SignalingServer(port=0, token="")
