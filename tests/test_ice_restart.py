"""ICE restart on the aiortc core: new credentials, new path, DTLS and SCTP stay up."""

from __future__ import annotations

import asyncio

import pytest

from tether.cores.aiortc_core import decode_sdp, sdp_credentials

from .tube_pair import Wire, connect_tubes, until



def states(wire: Wire, side: str) -> list[str]:
    return [s["data"] for s in wire.seen[side] if s["kind"] == "connection_state_changed"]


async def restart(a, b, tube_id: str, offerer: str = "a") -> None:
    first, second = (a, b) if offerer == "a" else (b, a)
    offer = await first.restart_ice(tube_id)
    answer = await second.set_remote_description(tube_id, offer)
    await first.set_remote_description(tube_id, answer, is_answer=True)


def pair_of(core, tube_id):
    pair = core._tubes[tube_id].path.current._nominated[1]
    return pair.local_addr, pair.remote_addr


async def test_restart_moves_to_a_new_path_and_loses_no_message(fast_cores):
    a, b = fast_cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    sender, receiver = a.channel(tube_id), b.channel(tube_id)
    got: list[int] = []
    receiver.on("message", lambda m: got.append(int(m)))
    old_pair = pair_of(a, tube_id)

    async def pump() -> None:
        for i in range(2000):
            sender.send(str(i))
            if i % 50 == 0:
                await asyncio.sleep(0.005)

    # Messages flow before, during and after the restart.
    pumping = asyncio.create_task(pump())
    await asyncio.sleep(0.02)
    await restart(a, b, tube_id)
    await until(lambda: a._tubes[tube_id].path.generation >= 2
                and b._tubes[tube_id].path.generation >= 2)
    await pumping
    await until(lambda: len(got) == 2000)
    assert got == list(range(2000))
    new_pair = pair_of(a, tube_id)
    assert new_pair != old_pair  # fresh sockets on both sides
    assert a.get_connection_state(tube_id) == "connected"
    assert b.get_connection_state(tube_id) == "connected"
    # The old sockets are gone: only the current generation's remain open.
    assert all(p.transport is not None for p in a._tubes[tube_id].path.current._protocols)


async def test_restart_credentials_change_and_candidates_are_tagged(fast_cores):
    a, b = fast_cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    before = a._tubes[tube_id].path.local_credentials
    offer = await a.restart_ice(tube_id)
    ufrag, pwd = sdp_credentials(decode_sdp(offer))
    assert (ufrag, pwd) != before

    def tagged() -> list[str]:
        return [s["data"] for s in wire.seen["a"]
                if s["kind"] == "icecandidate" and s["data"].endswith(f" ufrag {ufrag}")]

    await until(lambda: tagged())
    # b has no description for that ufrag yet: it holds them instead of dropping them.
    assert set(tagged()) <= set(b._tubes[tube_id].pending_candidates)


async def test_dead_path_reported_in_seconds_then_restart_recovers(fast_cores):
    a, b = fast_cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    await until(lambda: a._tubes[tube_id].path.watching and b._tubes[tube_id].path.watching)
    # Black-hole the current path, as a dead link would: b's sockets under its current
    # generation neither deliver nor send anything any more.
    b.drop_traffic(tube_id, True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await until(lambda: "disconnected" in states(wire, "a"), timeout=5)
    detected = loop.time() - started
    assert detected < 3.0
    await restart(a, b, tube_id)
    await until(lambda: states(wire, "a")[-1:] == ["connected"] and
                states(wire, "b")[-1:] == ["connected"])
    got = asyncio.get_running_loop().create_future()
    b.channel(tube_id).on("message", lambda m: got.done() or got.set_result(m))
    a.channel(tube_id).send(b"after restart")
    assert await asyncio.wait_for(got, 10) == b"after restart"


async def test_glare_the_peer_offer_replaces_our_own(fast_cores):
    a, b = fast_cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    offer_a = await a.restart_ice(tube_id)
    await b.restart_ice(tube_id)  # b offers too, at the same time
    # b is the polite side: it answers a's offer, dropping its own.
    answer = await b.set_remote_description(tube_id, offer_a)
    await a.set_remote_description(tube_id, answer, is_answer=True)
    await until(lambda: a._tubes[tube_id].path.generation == 2
                and b._tubes[tube_id].path.generation == 2)
    assert b._tubes[tube_id].path.pending is None


async def test_restart_before_the_first_answer_is_refused(fast_cores):
    a, _ = fast_cores
    result = await a.create_tube("conv", {})
    with pytest.raises(RuntimeError, match="before the first answer"):
        await a.restart_ice(result["tube_id"])
