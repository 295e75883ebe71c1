"""The aiortc core against Contract 2, with real peers on loopback."""

from __future__ import annotations

import asyncio
import base64

import pytest

from tether.cores.aiortc_core import (
    UnknownTubeError,
    decode_sdp,
    split_candidates,
)

from .tube_pair import Wire, connect_tubes, until


async def test_offer_answer_trickle_connects(cores):
    a, b = cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    assert a.get_connection_state(tube_id) == "connected"
    assert b.get_connection_state(tube_id) == "connected"
    # Trickle: candidates came as signals, ending with '', and none rode in the SDP.
    for side in "ab":
        candidates = [s["data"] for s in wire.seen[side] if s["kind"] == "icecandidate"]
        assert candidates[-1] == ""
        assert candidates[0].startswith("candidate:") and " 127.0.0.1 " in candidates[0]
    await until(lambda: "connected" in [s["data"] for s in wire.seen["a"]
                                        if s["kind"] == "connection_state_changed"])
    assert all(s["tube_id"] == tube_id and s["conversation_id"] == "conv"
               for s in wire.seen["a"])


async def test_sdp_is_base64_without_candidates_when_trickling(cores):
    a, _ = cores
    result = await a.create_tube("conv", {})
    sdp = decode_sdp(result["offer"])
    assert sdp.startswith("v=0") and "a=candidate:" not in sdp
    assert base64.b64decode(result["offer"]).decode() == sdp
    assert "a=ice-ufrag:" in sdp


async def test_without_trickle_candidates_ride_in_the_sdp(cores):
    a, b = cores
    offer = await a.create_tube("conv", {}, trickle_ice=False)
    sdp = decode_sdp(offer["offer"])
    _, candidates = split_candidates(sdp)
    assert candidates and all(" 127.0.0.1 " in c for c in candidates)
    answer = await b.create_tube("conv", {}, trickle_ice=False, offer=offer["offer"],
                                 tube_id=offer["tube_id"])
    await a.set_remote_description(offer["tube_id"], answer["answer"], is_answer=True)
    await asyncio.wait_for(a.wait_channel(offer["tube_id"]), 20)


async def test_candidate_before_remote_description_is_held(cores):
    a, b = cores
    wire = Wire(a, b)
    offer = await a.create_tube("conv", {}, signal_callback=wire.callback("a"))
    tube_id = offer["tube_id"]
    answer = await b.create_tube("conv", {}, offer=offer["offer"], tube_id=tube_id,
                                 signal_callback=wire.callback("b"))
    for s in wire.seen["a"]:
        if s["kind"] == "icecandidate":
            await b.add_ice_candidate(tube_id, s["data"])
    await until(lambda: "" in [s["data"] for s in wire.seen["b"] if s["kind"] == "icecandidate"])
    # b's candidates reached a (the Wire forwards them) before a has the answer: held.
    assert a._tubes[tube_id].pending_candidates
    await a.set_remote_description(tube_id, answer["answer"], is_answer=True)
    assert a._tubes[tube_id].pending_candidates == []
    await asyncio.wait_for(a.wait_channel(tube_id), 20)


async def test_stats_are_real(cores):
    a, b = cores
    tube_id = await connect_tubes(a, b)
    before = a.get_connection_stats(tube_id)
    received = asyncio.Event()
    total = 0

    def on_message(message):
        nonlocal total
        total += len(message)
        if total >= 500_000:
            received.set()

    (await b.wait_channel(tube_id)).on("message", on_message)
    channel = await a.wait_channel(tube_id)
    for _ in range(50):
        channel.send(b"x" * 10_000)
    await asyncio.wait_for(received.wait(), 20)
    after = a.get_connection_stats(tube_id)
    assert after["bytes_sent"] - before["bytes_sent"] >= 500_000
    assert b.get_connection_stats(tube_id)["bytes_received"] >= 500_000
    assert after["rtt_ms"] is not None and 0 < after["rtt_ms"] < 1000
    assert 0.0 <= after["packet_loss_rate"] < 1.0


async def test_messages_sent_before_the_peer_listens_are_kept_in_order(cores):
    """The peer's tunnel may send the moment its channel opens; ours listens a moment later."""
    a, b = cores
    tube_id = await connect_tubes(a, b)
    sender = a.channel(tube_id)
    receiver = await b.wait_channel(tube_id)
    for i in range(5):
        sender.send(f"early {i}".encode())
    await until(lambda: len(b._tubes[tube_id].early) == 5)  # arrived, nobody listening yet
    got: list[bytes] = []
    receiver.on("message", got.append)
    assert got == [f"early {i}".encode() for i in range(5)]
    sender.send(b"later")
    await until(lambda: len(got) == 6)
    assert got[-1] == b"later" and b._tubes[tube_id].early == []


async def test_keepalive_reaches_the_peer_as_a_signal(cores):
    a, b = cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    a.send_keepalive(tube_id)
    await until(lambda: "keepalive" in wire.kinds("b"))
    assert "keepalive" not in wire.kinds("a")


async def test_close_is_idempotent_and_unknown_tubes_are_named(cores):
    a, b = cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    await a.close_tube(tube_id, reason="test")
    await a.close_tube(tube_id, reason="again")
    await a.close_tube("never-existed")
    assert tube_id not in a.tube_ids
    with pytest.raises(UnknownTubeError, match="unknown tube"):
        a.get_connection_state(tube_id)
    # The peer notices: its channel closes and it says so.
    await until(lambda: "channel_closed" in wire.kinds("b"))


async def test_bad_input_gets_clear_errors(cores):
    a, _ = cores
    with pytest.raises(ValueError, match="base64"):
        await a.create_tube("conv", {}, offer="not base64 !!!")
    assert a.tube_ids == []
    result = await a.create_tube("conv", {})
    with pytest.raises(ValueError, match="already exists"):
        await a.create_tube("conv", {}, tube_id=result["tube_id"])
    with pytest.raises(UnknownTubeError):
        await a.add_ice_candidate("nope", "")
