"""Path MTU discovery (cores/path_mtu.py): the search's timing with an injected clock,
the sizes it tries, and real aiortc peers that grow their packets to what the path
carries - and no further when the path drops larger datagrams."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiortc.rtcsctptransport import USERDATA_MAX_LENGTH, DataChunk, HeartbeatChunk

from tether.cores import path_mtu
from tether.cores.aiortc_core import AiortcTubeRegistry, path_info
from tether.cores.path_mtu import (
    BASE_PACKET,
    MAX_PROBES,
    SEARCH_AFTER_BLACK_HOLE,
    CONFIRM_EVERY,
    SEARCH_AGAIN_AFTER,
    MtuSearch,
    data_size,
    packet_sizes,
    probe_timeout,
)

from .test_aiortc_speed import move
from .tube_pair import connect_tubes, until

V4, V6 = socket.AF_INET, socket.AF_INET6


def test_base_packet_is_aiortcs() -> None:
    assert data_size(BASE_PACKET) == USERDATA_MAX_LENGTH == 1160
    assert data_size(16384) == 16356


def test_sizes_stay_within_the_route_and_a_dtls_record() -> None:
    # loopback: Ethernet, jumbo, then a whole DTLS record (16 KiB of plaintext)
    assert packet_sizes(65535, V4) == (1332, 1432, 8932, 16384)
    assert packet_sizes(1500, V4) == (1332, 1432)  # IP 20 + UDP 8 + DTLS 37
    assert packet_sizes(1500, V6) == (1312, 1412)  # IP 40
    assert packet_sizes(9000, V6) == (1312, 1412, 8912)
    assert packet_sizes(1280, V6) == (1192,)
    assert packet_sizes(1200, V4) == ()  # nothing above the base fits
    for mtu in (1280, 1400, 1500, 4000, 9000, 65535):
        for family in (V4, V6):
            for size in packet_sizes(mtu, family):
                overhead = (20 if family == V4 else 40) + 8 + 37
                assert BASE_PACKET < size <= 16384 and size + overhead <= mtu and size % 4 == 0


def test_probe_timeout() -> None:
    assert probe_timeout(None) == 1.0
    assert probe_timeout(0.001) == 0.25
    assert probe_timeout(0.2) == pytest.approx(0.6)
    assert probe_timeout(5.0) == 3.0


def test_search_climbs_while_probes_are_answered() -> None:
    search = MtuSearch()
    search.restart((1332, 1432, 8932, 16384), now=10.0)
    assert search.packet == BASE_PACKET and search.wake_at == 10.0
    for size in (1332, 1432, 8932, 16384):
        assert search.tick(search.wake_at, timeout=0.25) == size
        assert search.tick(search.wake_at - 0.01, timeout=0.25) is None  # not yet due
        assert search.answered(size, now=10.1)
        assert search.packet == size
    assert not search.searching and search.trying is None  # the top
    assert search.wake_at == pytest.approx(10.1 + CONFIRM_EVERY)  # confirmed from time to time
    assert search.probes == 4 and search.answers == 4


def test_an_unanswered_size_ends_the_search() -> None:
    search = MtuSearch()
    search.restart((1432, 8932, 16384), now=0.0)
    assert search.tick(0.0, 0.25) == 1432
    search.answered(1432, 0.01)
    now = 0.01
    for attempt in range(MAX_PROBES):  # three probes, each lost
        assert search.tick(now, 0.25) == 8932
        now = search.wake_at
    assert now == pytest.approx(0.01 + MAX_PROBES * 0.25)
    assert search.tick(now, 0.25) is None  # the last one timed out: too large
    assert search.packet == 1432 and search.trying is None and search.ceiling == 8932
    # the size in use is confirmed now and then; the refused one is not tried again...
    assert search.wake_at == pytest.approx(now + CONFIRM_EVERY)
    assert search.tick(search.wake_at, 0.25) == 1432
    assert search.answered(1432, search.wake_at - 0.2)
    assert search.trying is None
    # ...until SEARCH_AGAIN_AFTER has passed
    later = now + SEARCH_AGAIN_AFTER
    search.wake_at = later
    assert search.tick(later, 0.25) == 1432  # a confirmation first
    assert not search.answered(16384, later)  # not the size being probed
    assert search.answered(1432, later)
    assert search.tick(later, 0.25) == 8932  # then the refused size again
    assert search.answered(8932, later) and search.packet == 8932


def test_a_lost_probe_is_sent_again() -> None:
    search = MtuSearch()
    search.restart((1432,), now=0.0)
    assert search.tick(0.0, 0.5) == 1432
    assert search.tick(0.5, 0.5) == 1432  # the first was lost
    assert search.answered(1432, 0.6)
    assert search.packet == 1432 and search.probes == 2


def test_an_idle_association_is_not_confirmed() -> None:
    search = MtuSearch()
    search.restart((1432,), now=0.0)
    assert search.tick(0.0, 0.25) == 1432
    search.answered(1432, 0.0)
    assert search.tick(CONFIRM_EVERY, 0.25, sending=False) is None  # nothing sent: no probe
    assert search.wake_at == 2 * CONFIRM_EVERY and search.probes == 1
    assert search.tick(2 * CONFIRM_EVERY, 0.25, sending=True) == 1432


def test_the_size_in_use_unanswered_goes_back_to_the_base() -> None:
    search = MtuSearch()
    search.restart((1332, 1432, 8932), now=0.0)
    for size in (1332, 1432, 8932):
        assert search.tick(search.wake_at, 0.25) == size
        search.answered(size, 0.0)
    now = search.wake_at
    assert now == CONFIRM_EVERY
    for attempt in range(MAX_PROBES):  # the path shrank: the confirmations are lost
        assert search.tick(now, 0.25) == 8932
        assert search.packet == 8932  # still in use while it may be only a lost probe
        now = search.wake_at
    assert search.tick(now, 0.25) == 1332  # base now, and the search below 8932 at once
    assert search.packet == BASE_PACKET and search.searching
    search.answered(1332, now)
    assert search.tick(now, 0.25) == 1432
    search.answered(1432, now)
    assert search.packet == 1432 and search.trying is None


def test_black_hole_goes_back_to_the_base_and_searches_later() -> None:
    search = MtuSearch()
    assert not search.black_hole(0.0)  # at the base already: nothing to do
    search.restart((1432, 16384), now=0.0)
    for size in (1432, 16384):
        assert search.tick(search.wake_at, 0.25) == size
        search.answered(size, 0.0)
    assert search.black_hole(now=3.0)
    assert search.packet == BASE_PACKET
    assert search.tick(3.0 + SEARCH_AFTER_BLACK_HOLE - 0.1, 0.25) is None
    assert search.tick(3.0 + SEARCH_AFTER_BLACK_HOLE, 0.25) == 1432


def test_restart_forgets_the_old_path() -> None:
    search = MtuSearch()
    search.restart((1432, 16384), now=0.0)
    assert search.tick(0.0, 0.25) == 1432
    search.answered(1432, 0.0)
    search.restart((1332,), now=1.0)  # a new path: base until probed
    assert search.packet == BASE_PACKET
    assert not search.answered(16384, 1.0)  # an answer meant for the old path
    assert search.tick(1.0, 0.25) == 1332
    search.restart((), now=2.0)  # nothing to probe (a relay, or no route MTU)
    assert search.packet == BASE_PACKET and search.wake_at is None


def test_probe_chunk_makes_a_packet_of_the_size() -> None:
    prober = path_mtu.PathMtuProber.__new__(path_mtu.PathMtuProber)
    prober._nonce = 7
    for size in (1332, 8932, 16384):
        chunk = prober.probe_chunk(size)
        assert isinstance(chunk, HeartbeatChunk)
        assert 12 + len(bytes(chunk)) == size  # the common header, then the chunk


# -- real peers --------------------------------------------------------------------------


needs_route_mtu = pytest.mark.skipif(path_mtu.route_mtu(("127.0.0.1", 9)) is None,
                                     reason="the route's MTU cannot be read here (not Linux)")


def sctp_of(registry: AiortcTubeRegistry, tube_id: str) -> Any:
    return registry._tube(tube_id).pc.sctp


def data_sizes(registry: AiortcTubeRegistry, tube_id: str) -> list[int]:
    """The user data of each DATA chunk this side sends from now on."""
    sctp = sctp_of(registry, tube_id)
    send_chunk = sctp._send_chunk
    sizes: list[int] = []

    async def noting(chunk: Any) -> None:
        if isinstance(chunk, DataChunk):
            sizes.append(len(chunk.user_data))
        await send_chunk(chunk)

    sctp._send_chunk = noting
    return sizes


def drop_larger_than(registry: AiortcTubeRegistry, tube_id: str, limit: int) -> dict[str, int]:
    """This side's path drops datagrams above ``limit`` bytes (a smaller link further on,
    no "fragmentation needed" coming back): data and probes alike."""
    path = registry._tube(tube_id).path
    protocol = path.current._nominated[1].protocol
    send_data, batch = protocol.send_data, protocol._tether_batch
    send_probe = batch.send_probe
    counts = {"dropped": 0, "probes_dropped": 0}

    async def small_only(data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > limit:
            counts["dropped"] += 1
            return
        await send_data(data, addr)

    def small_probes_only(data: bytes, addr: tuple[str, int]) -> bool:
        if len(data) > limit:
            counts["probes_dropped"] += 1
            return True  # it left; the path loses it
        return send_probe(data, addr)

    protocol.send_data = small_only
    batch.send_probe = small_probes_only
    return counts


async def grown(a: AiortcTubeRegistry, b: AiortcTubeRegistry) -> tuple[str, Any]:
    """A tube from ``a`` to ``b`` once ``a`` sends 16 KiB packets: (its id, a's SCTP)."""
    tube_id = await connect_tubes(a, b)
    sctp = sctp_of(a, tube_id)
    await until(lambda: path_mtu.prober(sctp).packet == 16384, 5)
    return tube_id, sctp


@needs_route_mtu
async def test_real_peers_grow_their_packets_on_loopback(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    for side in (a, b):
        await until(lambda side=side: path_info(side, tube_id)["sctp_packet"] == 16384, 5)
        assert sctp_of(side, tube_id)._tether_data_max == 16356
    sizes = data_sizes(a, tube_id)
    await move(a, b, tube_id, 2 << 20, seed=3)  # every byte, in order, both ways
    assert max(sizes) == 16356
    assert len(sizes) < (2 << 20) // 4000  # far fewer chunks than 1,160-byte ones


@needs_route_mtu
async def test_a_path_that_drops_large_datagrams_keeps_what_it_carries(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id, sctp = await grown(a, b)  # the first search
    dropped = drop_larger_than(a, tube_id, 1500)  # an Ethernet link beyond loopback
    path_mtu.path_changed(sctp)  # the path changed: base size, search again
    assert sctp._tether_data_max == USERDATA_MAX_LENGTH
    prober = path_mtu.prober(sctp)
    await until(lambda: prober.search.trying is None and prober.search.wake_at is not None, 5)
    assert prober.packet == 1432 and dropped["probes_dropped"] == MAX_PROBES
    sizes = data_sizes(a, tube_id)
    await move(a, b, tube_id, 1 << 20, seed=4)
    assert max(sizes) == data_size(1432) == 1404
    assert dropped == {"dropped": 0, "probes_dropped": MAX_PROBES}


@needs_route_mtu
async def test_a_path_that_shrinks_is_found_by_the_next_confirmation(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id, sctp = await grown(a, b)
    prober = path_mtu.prober(sctp)
    assert prober.search.wake_at is not None  # the next confirmation
    await move(a, b, tube_id, 100_000, seed=8)  # data flows: the size in use is confirmed
    dropped = drop_larger_than(a, tube_id, 1500)
    prober.search.wake_at = asyncio.get_running_loop().time()  # it is due now
    prober._arm()
    await until(lambda: prober.packet == 1432 and prober.search.trying is None, 10)
    # 3 confirmations of 16384 lost, then 8932 refused 3 times below it
    assert dropped == {"dropped": 0, "probes_dropped": 2 * MAX_PROBES}
    sizes = data_sizes(a, tube_id)
    await move(a, b, tube_id, 1 << 20, seed=7)
    assert max(sizes) == 1404


@needs_route_mtu
async def test_retransmission_timeout_goes_back_to_the_base(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id, sctp = await grown(a, b)
    sctp._t3_expired()  # as the timer would: the large packets may no longer fit
    assert sctp._tether_data_max == USERDATA_MAX_LENGTH
    assert path_mtu.prober(sctp).search.wake_at is not None  # searching again later
    await move(a, b, tube_id, 256 << 10, seed=6)


async def test_closing_stops_the_search(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    sctp = sctp_of(a, tube_id)
    prober = path_mtu.prober(sctp)
    assert prober is not None
    prober.search.restart((1332,), asyncio.get_running_loop().time() + 60)
    prober._arm()
    assert prober._timer is not None
    await a.close_tube(tube_id)
    assert prober._timer is None



SDP = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
       "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\n")


def test_records_announced_at_session_level() -> None:
    announced = path_mtu.announce(SDP)  # tether's receive path reads whole records
    assert "t=0 0\r\na=x-tether-records:16384\r\nm=application" in announced
    assert path_mtu.peer_reads(announced) == 16384
    assert path_mtu.peer_reads(SDP) == 1500  # aiortc as shipped, a browser: say nothing
    media_level = SDP + "a=x-tether-records:16384\r\n"
    assert path_mtu.peer_reads(media_level) == 1500  # only the session level counts
    for value, reads in (("99999", 16384), ("1000", 1500), ("lots", 1500), ("", 1500)):
        sdp = SDP.replace("t=0 0\r\n", f"t=0 0\r\na=x-tether-records:{value}\r\n")
        assert path_mtu.peer_reads(sdp) == reads


async def test_tether_peers_read_each_others_records(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    for side in (a, b):
        assert sctp_of(side, tube_id)._tether_peer_reads == 16384
