"""Held remote candidates: kept for a generation that is coming, dropped for one that is gone
or that never came, so they can never block a later ICE restart."""

from __future__ import annotations

import pytest

from tether.cores.aiortc_core import HELD_CANDIDATES_LIMIT

from .tube_pair import FAST_LIVENESS, Wire, connect_tubes, until



def candidate(ufrag: str | None, port: int = 9) -> str:
    line = f"candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host"
    return f"{line} ufrag {ufrag}" if ufrag else line


async def restart(a, b, tube_id: str) -> None:
    offer = await a.restart_ice(tube_id)
    answer = await b.set_remote_description(tube_id, offer)
    await a.set_remote_description(tube_id, answer, is_answer=True)
    await until(lambda: a._tubes[tube_id].path.pending is None
                and b._tubes[tube_id].path.pending is None)


async def test_candidate_of_a_retired_generation_is_dropped_not_held(fast_cores):
    a, b = fast_cores
    tube_id = await connect_tubes(a, b, Wire(a, b))
    tube = b._tubes[tube_id]
    first_ufrag = tube.path.remote_ufrag(tube.path.current)
    await restart(a, b, tube_id)
    assert tube.path.generation == 2
    await b.add_ice_candidate(tube_id, candidate(first_ufrag))
    assert tube.pending_candidates == []
    assert tube.candidates_dropped == 1


async def test_candidate_for_no_generation_is_dropped_once_too_old(fast_cores):
    a, b = fast_cores
    tube_id = await connect_tubes(a, b, Wire(a, b))
    tube = b._tubes[tube_id]
    await b.add_ice_candidate(tube_id, candidate("lost"))
    assert tube.pending_candidates == [candidate("lost")]  # its offer may still come
    tube.held[0].at -= FAST_LIVENESS["generation_timeout"] + 1  # ... but it did not, in time
    await b.add_ice_candidate(tube_id, candidate("next", 10))
    assert tube.pending_candidates == [candidate("next", 10)]
    assert tube.candidates_dropped == 1


async def test_a_full_hold_of_stale_candidates_does_not_block_a_restart(fast_cores):
    a, b = fast_cores
    tube_id = await connect_tubes(a, b, Wire(a, b))
    tube = b._tubes[tube_id]
    for port in range(HELD_CANDIDATES_LIMIT):
        await b.add_ice_candidate(tube_id, candidate("gone", 1000 + port))
    with pytest.raises(ValueError, match="too many candidates held"):
        await b.add_ice_candidate(tube_id, candidate("gone", 999))
    assert len(tube.held) == HELD_CANDIDATES_LIMIT  # the bound stays
    for item in tube.held:
        item.at -= FAST_LIVENESS["generation_timeout"] + 1
    # The restart's own candidates (trickled through the Wire) get held and applied.
    await restart(a, b, tube_id)
    await until(lambda: tube.path.generation == 2 and a._tubes[tube_id].path.generation == 2)
    assert tube.candidates_dropped == HELD_CANDIDATES_LIMIT
    assert tube.pending_candidates == []


async def test_first_generation_candidates_wait_for_the_answer_however_long(fast_cores):
    a, b = fast_cores
    offer = await a.create_tube("conv", {})
    tube = a._tubes[offer["tube_id"]]
    await a.add_ice_candidate(offer["tube_id"], candidate("peer"))
    tube.held[0].at -= 3600  # no description yet: age does not matter
    await a.add_ice_candidate(offer["tube_id"], candidate("peer", 10))
    assert len(tube.held) == 2 and tube.candidates_dropped == 0


async def test_a_malformed_candidate_is_refused_and_nothing_is_held(fast_cores):
    a, _ = fast_cores
    offer = await a.create_tube("conv", {})
    with pytest.raises(ValueError, match="bad ICE candidate"):
        await a.add_ice_candidate(offer["tube_id"], "candidate:nonsense")
    await a.add_ice_candidate(offer["tube_id"], candidate("peer"))
    assert a._tubes[offer["tube_id"]].pending_candidates == [candidate("peer")]

