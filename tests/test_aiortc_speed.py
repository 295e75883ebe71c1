"""tether's speed patches to aiortc/aioice (tether/cores/aiortc_speed.py).

Unit level: one RTCSctpTransport with an injected timer clock and captured outgoing chunks
proves the delayed-SACK rule (every second packet, at once on gaps, duplicates, bundled
chunks or outside ESTABLISHED, else within SACK_DELAY) and that ``_transmit`` resends
exactly what aiortc would, without walking the sent queue when nothing is marked.

Real peers: two cores on loopback move data through the patched SCTP, in order and every
byte checked, also with datagrams dropped deterministically on both sides, and with one
peer running aiortc's own SCTP code (``unpatch``) against a patched one.

DTLS records (dtls_records.py, aiortc_fastpath.dtls_direct_records): seal/open round trips,
forgeries and replays dropped, the replay window, resealing; between real peers, our
records against OpenSSL's both ways (with loss), a close_notify that OpenSSL seals after
the switch, and wrong keys falling back to OpenSSL.

Batched sends (udp_batch.py, aiortc_fastpath.batch_sends): real UDP sockets get exactly the
datagrams batched, in order, in fewer system calls (GSO), also behind a transport backlog
and after the kernel refused GSO; real peers batch under loss, also against unpatched aiortc.

SACK per burst (sack_per_burst): one SACK when the loop turn ends, at most SACK_BURST_MAX
packets per SACK, a lone packet waits as with delayed_sack, every second packet again after
a gap; between real peers on uvloop, fewer SACKs than one per two DATA packets. The SACK
fast path (sack_fast_path) ends in the same state as the full path on random SACK
sequences (fast recovery, abandoned chunks, stream resets, the TSN wrap).

One-DATA packets (receive_single_data, send_data_direct): the fast parser reads exactly
what parse_packet reads on random packets and mutations of them (bundles, trailing bytes,
truncation, flipped bytes), the fast serialiser writes serialize_packet's bytes, a
receiver ends in the same state and sends the same SACKs with and without the fast
parser; between real peers every DATA chunk takes the direct send (loss and the
unpatched peer are covered by the tests above, which run every patch).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import math
import random
import sys
from collections import deque
from struct import error as struct_error
from struct import pack
from types import SimpleNamespace
from typing import Any

import pytest
from aiortc.rtcsctptransport import (
    USERDATA_MAX_LENGTH,
    DataChunk,
    ForwardTsnChunk,
    ReconfigChunk,
    RTCSctpTransport,
    SackChunk,
    crc32c,
    parse_packet,
    serialize_packet,
    tsn_plus_one,
)

from tether import runloop
from tether.cores import aiortc_fastpath, aiortc_speed, path_mtu
from tether.cores.aiortc_core import (
    AiortcTubeRegistry,
    decode_sdp,
    encode_sdp,
    resend_in_flight,
)
from tether.cores.gathering import LOOPBACK

from .tube_pair import FAST_LIVENESS, connect_tubes, until

aiortc_speed.install()

ESTABLISHED = RTCSctpTransport.State.ESTABLISHED
PEER_TSN = 1000
LOCAL_TAG = 0x1234


# -- helpers ------------------------------------------------------------------------------


class FakeTimers:
    """An injected clock for call_later: timers run only when the test advances time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Any, tuple[Any, ...], SimpleNamespace]] = []
        self.soon: list[tuple[Any, tuple[Any, ...], SimpleNamespace]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any, *args: Any) -> SimpleNamespace:
        handle = SimpleNamespace(cancelled=False)
        handle.when = lambda at=self.now + delay: at
        handle.cancel = lambda: setattr(handle, "cancelled", True)
        self.timers.append((self.now + delay, callback, args, handle))
        return handle

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, callback, args, handle in sorted(due, key=lambda t: t[0]):
            if not handle.cancelled:
                callback(*args)

    def pending(self) -> list[float]:
        return [when for when, _, _, handle in self.timers if not handle.cancelled]

    def call_soon(self, callback: Any, *args: Any) -> SimpleNamespace:
        handle = SimpleNamespace(cancelled=False)
        handle.cancel = lambda: setattr(handle, "cancelled", True)
        self.soon.append((callback, args, handle))
        return handle

    def end_turn(self) -> None:
        """The loop turn ends: run what was scheduled with call_soon."""
        soon, self.soon = self.soon, []
        for callback, args, handle in soon:
            if not handle.cancelled:
                callback(*args)


def make_sctp(sack: str = "burst") -> tuple[RTCSctpTransport, list[Any], FakeTimers]:
    """An established association's receiving side whose chunks land in a list;
    ``sack``: its SACK rule, ``burst`` (sack_per_burst, the default set) or ``delayed``
    (delayed_sack alone)."""
    sctp = RTCSctpTransport(SimpleNamespace(state="new"))
    if sack == "delayed":
        sctp._handle_data = aiortc_speed._handle_data_delayed_sack.__get__(sctp)  # type: ignore[method-assign]
    timers = FakeTimers()
    sctp._loop = timers  # type: ignore[assignment]
    sctp._association_state = ESTABLISHED
    sctp._local_verification_tag = LOCAL_TAG
    sctp._remote_port = 5000
    sctp._last_received_tsn = PEER_TSN - 1
    sctp._srtt, sctp._rttvar = 0.002, 0.001  # a short path: bursts may be acknowledged together
    sent: list[Any] = []

    async def capture(chunk: Any) -> None:
        sent.append(chunk)

    sctp._send_chunk = capture  # type: ignore[method-assign]
    return sctp, sent, timers


def delivering_sctp() -> tuple[RTCSctpTransport, list[Any], FakeTimers, list[tuple[int, int, bytes]]]:
    """make_sctp()'s receiver, whose delivered messages land in a list too."""
    sctp, sent, timers = make_sctp()
    delivered: list[tuple[int, int, bytes]] = []

    async def record(stream_id: int, pp_id: int, data: bytes) -> None:
        delivered.append((stream_id, pp_id, data))

    sctp._receive = record  # type: ignore[method-assign]
    return sctp, sent, timers, delivered


def data_chunk(tsn: int, payload: bytes = b"x" * 100, stream_id: int = 7) -> DataChunk:
    chunk = DataChunk(flags=0x03)  # one unfragmented message
    chunk.tsn = tsn
    chunk.stream_id = stream_id
    chunk.stream_seq = (tsn - PEER_TSN) % 65536
    chunk.protocol = 53  # WebRTC binary
    chunk.user_data = payload
    return chunk


def packet(*chunks: Any) -> bytes:
    """An SCTP packet bundling ``chunks`` (aiortc's serialize_packet takes only one)."""
    header = pack("!HHL", 5000, 5000, LOCAL_TAG)
    body = b"".join(bytes(c) for c in chunks)
    return header + pack("<L", crc32c(header + b"\x00" * 4 + body)) + body


def sacks(sent: list[Any]) -> list[SackChunk]:
    return [c for c in sent if isinstance(c, SackChunk)]


# -- install -------------------------------------------------------------------------------


def test_install_is_idempotent() -> None:
    before = {name: getattr(RTCSctpTransport, name) for name in (
        "_handle_data", "_transmit", "_mark_received", "_send_sack")}
    aiortc_speed.install()
    aiortc_speed.install()
    assert aiortc_speed.installed()
    for name, function in before.items():
        assert getattr(RTCSctpTransport, name) is function
    # No wrapper wraps a wrapper: the saved originals are aiortc's own functions.
    assert aiortc_speed._originals["_send_sack"].__module__ == "aiortc.rtcsctptransport"


def test_install_refuses_other_versions() -> None:
    aiortc_speed.check_versions(dict(aiortc_speed.PINNED))
    with pytest.raises(aiortc_speed.UnsupportedVersionError, match="aiortc==1.17.0"):
        aiortc_speed.check_versions({"aiortc": "1.17.0", "aioice": "0.13.0"})
    with pytest.raises(aiortc_speed.UnsupportedVersionError, match="aioice"):
        aiortc_speed.check_versions({"aiortc": "1.16.0", "aioice": "0.14.0"})
    aiortc_speed.check_versions()  # the installed ones are the pinned ones


def test_patch_selection() -> None:
    default = list(aiortc_speed.PATCHES)
    assert aiortc_speed.chosen_patches("all") == default
    assert aiortc_speed.chosen_patches("") == default
    assert aiortc_speed.chosen_patches("batch_sends, all") == default
    assert "dtls_direct_records" in default and "batch_sends" in default
    with pytest.raises(ValueError, match="unknown patches"):
        aiortc_speed.chosen_patches("all,push_receive")  # removed: it measured slower
    assert aiortc_speed.chosen_patches("none") == []
    assert aiortc_speed.chosen_patches("delayed_sack, paced_connect") == [
        "delayed_sack", "paced_connect"]
    with pytest.raises(ValueError, match="unknown patches"):
        aiortc_speed.chosen_patches("delayed_sack,turbo")


def test_gc_less_often() -> None:
    """The default set raises the cyclic collector's thresholds; cycles are still found."""
    assert gc.get_threshold() == runloop.GC_THRESHOLDS
    assert gc.isenabled()
    cycle: list[Any] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


# -- delayed SACK (unit, injected clock) ------------------------------------------------


async def test_sack_every_second_packet() -> None:
    sctp, sent, timers = make_sctp("delayed")
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    assert sacks(sent) == []
    assert timers.pending() == [aiortc_speed.SACK_DELAY]
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 1)))
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + 1]
    assert sacks(sent)[0].gaps == []
    timers.advance(aiortc_speed.SACK_DELAY)  # nothing left to acknowledge
    assert len(sacks(sent)) == 1


@pytest.mark.parametrize("rule", ["delayed", "burst"])
async def test_lone_packet_acknowledged_by_timer(rule: str) -> None:
    sctp, sent, timers = make_sctp(rule)
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    timers.advance(aiortc_speed.SACK_DELAY / 2)
    assert sacks(sent) == []
    timers.advance(aiortc_speed.SACK_DELAY / 2)
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN]
    assert timers.pending() == []
    # RFC 4960 6.2's bound: never later than 200 ms.
    assert aiortc_speed.SACK_DELAY <= 0.2


@pytest.mark.parametrize("rule", ["delayed", "burst"])
async def test_gap_is_acknowledged_at_once(rule: str) -> None:
    sctp, sent, _ = make_sctp(rule)
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 1)))  # PEER_TSN is missing
    [sack] = sacks(sent)
    assert sack.cumulative_tsn == PEER_TSN - 1
    assert sack.gaps == [(2, 2)]
    # The hole fills: again at once, since the packet before it was out of order.
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    assert sacks(sent)[-1].cumulative_tsn == PEER_TSN + 1


@pytest.mark.parametrize("rule", ["delayed", "burst"])
async def test_duplicate_is_acknowledged_at_once(rule: str) -> None:
    sctp, sent, _ = make_sctp(rule)
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 1)))
    sent.clear()
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 1)))
    [sack] = sacks(sent)
    assert sack.duplicates == [PEER_TSN + 1]


@pytest.mark.parametrize("rule", ["delayed", "burst"])
async def test_bundled_chunk_is_acknowledged_at_once(rule: str) -> None:
    sctp, sent, _ = make_sctp(rule)
    forward = ForwardTsnChunk()
    forward.cumulative_tsn = PEER_TSN - 1  # nothing to skip: only the bundling matters
    await sctp._handle_data(packet(data_chunk(PEER_TSN), forward))
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN]


@pytest.mark.parametrize("rule", ["delayed", "burst"])
async def test_not_delayed_outside_established(rule: str) -> None:
    sctp, sent, _ = make_sctp(rule)
    sctp._association_state = RTCSctpTransport.State.SHUTDOWN_SENT
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN]


@pytest.mark.parametrize("rule", ["delayed", "burst"])
async def test_closing_cancels_the_sack_timer(rule: str) -> None:
    sctp, sent, timers = make_sctp(rule)
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    assert timers.pending()
    sctp._set_state(RTCSctpTransport.State.CLOSED)
    assert timers.pending() == []
    timers.end_turn()
    timers.advance(1.0)
    assert sacks(sent) == []


async def test_burst_acknowledged_at_the_end_of_the_turn() -> None:
    """sack_per_burst: the packets one loop turn handled get one SACK when the turn ends."""
    sctp, sent, timers = make_sctp()
    for i in range(3):
        await sctp._handle_data(packet(data_chunk(PEER_TSN + i)))
    assert sacks(sent) == []
    timers.end_turn()
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + 2]
    timers.end_turn()
    timers.advance(aiortc_speed.SACK_DELAY)  # the backstop timer finds nothing left
    assert len(sacks(sent)) == 1


async def test_burst_of_one_waits_like_delayed_sack() -> None:
    """A turn that handled one packet sends no SACK: the next packet or the timer does."""
    sctp, sent, timers = make_sctp()
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    timers.end_turn()
    assert sacks(sent) == []
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 1)))
    timers.end_turn()
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + 1]
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 2)))
    timers.end_turn()
    timers.advance(aiortc_speed.SACK_DELAY)
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + 1, PEER_TSN + 2]


async def test_burst_sack_every_burst_max_packets() -> None:
    """A long burst is acknowledged every SACK_BURST_MAX packets (the sender's Max.Burst),
    the rest when the turn ends."""
    sctp, sent, timers = make_sctp()
    cap = aiortc_speed.SACK_BURST_MAX
    assert 2 <= cap <= 4  # aiortc sends at most 4 packets above its flight size per SACK
    for i in range(2 * cap + 2):
        await sctp._handle_data(packet(data_chunk(PEER_TSN + i)))
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + cap - 1, PEER_TSN + 2 * cap - 1]
    timers.end_turn()
    assert [s.cumulative_tsn for s in sacks(sent)][-1] == PEER_TSN + 2 * cap + 1


async def test_burst_stretch_waits_after_a_gap() -> None:
    """After a gap, one SACK per second packet again for STRETCH_QUIET (the sender's
    window is small after a loss); then bursts are acknowledged together again."""
    sctp, sent, timers = make_sctp()
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 1)))  # PEER_TSN is missing
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))  # fills it
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN - 1, PEER_TSN + 1]
    for i in range(2, 6):  # one burst
        await sctp._handle_data(packet(data_chunk(PEER_TSN + i)))
    assert [s.cumulative_tsn for s in sacks(sent)][2:] == [PEER_TSN + 3, PEER_TSN + 5]
    timers.end_turn()
    timers.advance(aiortc_speed.STRETCH_QUIET)
    sent.clear()
    for i in range(6, 10):
        await sctp._handle_data(packet(data_chunk(PEER_TSN + i)))
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + 9]  # SACK_BURST_MAX
    assert aiortc_speed.SACK_BURST_MAX == 4


async def test_burst_stretch_only_on_a_short_known_round_trip() -> None:
    """A long or unknown round trip: one SACK per second packet, as delayed_sack (slow
    start grows by one MTU per SACK, which costs a long path many round trips)."""
    for srtt in (None, aiortc_speed.STRETCH_MAX_RTT, 0.6):
        sctp, sent, timers = make_sctp()
        sctp._srtt = srtt
        for i in range(4):  # one burst
            await sctp._handle_data(packet(data_chunk(PEER_TSN + i)))
        assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + 1, PEER_TSN + 3], srtt
    sctp, sent, timers = make_sctp()
    sctp._srtt = aiortc_speed.STRETCH_MAX_RTT / 2
    for i in range(4):
        await sctp._handle_data(packet(data_chunk(PEER_TSN + i)))
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + 3]


async def test_burst_gap_acknowledged_at_once() -> None:
    sctp, sent, timers = make_sctp()
    await sctp._handle_data(packet(data_chunk(PEER_TSN)))
    await sctp._handle_data(packet(data_chunk(PEER_TSN + 2)))  # PEER_TSN + 1 is missing
    [sack] = sacks(sent)
    assert (sack.cumulative_tsn, sack.gaps) == (PEER_TSN, [(2, 2)])
    timers.end_turn()  # everything was acknowledged already
    assert len(sacks(sent)) == 1


async def test_unpatched_transport_acknowledges_every_packet() -> None:
    sctp, sent, _ = make_sctp()
    aiortc_speed.unpatch(sctp)
    for i in range(4):
        await sctp._handle_data(packet(data_chunk(PEER_TSN + i)))
    assert [s.cumulative_tsn for s in sacks(sent)] == [PEER_TSN + i for i in range(4)]


async def test_in_order_fast_path_matches_aiortc() -> None:
    """Random arrival orders with duplicates: the patched and aiortc's own bookkeeping
    end in the same state after every chunk."""
    gen = random.Random(9)
    for _ in range(30):
        fast, _, _ = make_sctp()
        plain, _, _ = make_sctp()
        aiortc_speed.unpatch(plain)
        tsns = [PEER_TSN + i for i in range(40)]
        order = tsns + gen.sample(tsns, 10)
        gen.shuffle(order)
        for tsn in order:
            assert fast._mark_received(tsn) == plain._mark_received(tsn)
            assert fast._last_received_tsn == plain._last_received_tsn
            assert fast._sack_misordered == plain._sack_misordered
            assert fast._sack_duplicates == plain._sack_duplicates


async def test_reassembly_matches_aiortc() -> None:
    """Fragmented messages on ordered and unordered streams, arriving in random order
    with duplicates: the patched receiver delivers exactly what aiortc's own delivers,
    in the same order, after every chunk."""
    gen = random.Random(11)
    for _ in range(40):
        chunks, tsn = [], PEER_TSN
        seqs = {1: 0, 2: 0}
        for _ in range(gen.randint(1, 8)):
            stream = gen.choice((1, 2))
            unordered = stream == 2 and gen.random() < 0.5
            fragments = gen.randint(1, 6)
            for i in range(fragments):
                chunk = data_chunk(tsn, bytes([tsn % 256]) * gen.randint(1, 50), stream)
                chunk.flags = ((0x02 if i == 0 else 0) | (0x01 if i == fragments - 1 else 0)
                               | (0x04 if unordered else 0))
                chunk.stream_seq = 0 if unordered else seqs[stream]
                chunks.append(chunk)
                tsn += 1
            if not unordered:
                seqs[stream] += 1
        arrival = chunks[:] if gen.random() < 0.3 else gen.sample(chunks, len(chunks))
        arrival += gen.sample(chunks, min(3, len(chunks)))  # duplicates
        delivered: dict[str, list[tuple[int, int, bytes]]] = {}
        receivers = {}
        for name in ("fast", "plain"):
            sctp, _, _ = make_sctp()
            if name == "plain":
                aiortc_speed.unpatch(sctp)
            out = delivered[name] = []

            async def record(stream_id: int, pp_id: int, data: bytes, out: list = out) -> None:
                out.append((stream_id, pp_id, data))

            sctp._receive = record  # type: ignore[method-assign]
            receivers[name] = sctp
        for chunk in arrival:
            for name, sctp in receivers.items():
                await sctp._receive_data_chunk(chunk)
            assert delivered["fast"] == delivered["plain"]
            assert receivers["fast"]._advertised_rwnd == receivers["plain"]._advertised_rwnd
        assert len(delivered["fast"]) == len([c for c in chunks if c.flags & 0x01])


# -- _transmit without rescanning (unit) ---------------------------------------------------


class CountingDeque(deque):  # type: ignore[type-arg]
    """A deque that counts full walks (``for chunk in queue``)."""

    walks = 0

    def __iter__(self) -> Any:
        self.walks += 1
        return super().__iter__()


def sender(outstanding: int, first_tsn: int | None = None,
           ) -> tuple[RTCSctpTransport, list[Any], CountingDeque]:
    """An established association with ``outstanding`` chunks in flight (TSNs from
    ``first_tsn``, default aiortc's random one)."""
    sctp, sent, _ = make_sctp()
    if first_tsn is not None:
        sctp._local_tsn = first_tsn
        sctp._last_sacked_tsn = sctp._advanced_peer_ack_tsn = (first_tsn - 1) % 2**32
    sctp._ssthresh = 1 << 20
    sctp._cwnd = 64 * USERDATA_MAX_LENGTH
    sctp._sent_queue = CountingDeque()
    sctp._t3_start = lambda: None  # type: ignore[method-assign]
    sctp._t3_restart = lambda: None  # type: ignore[method-assign]
    tsn = sctp._local_tsn
    for _ in range(outstanding):
        chunk = data_chunk(tsn, b"y" * USERDATA_MAX_LENGTH)
        for key, value in dict(_abandoned=False, _acked=False, _book_size=USERDATA_MAX_LENGTH,
                               _expiry=None, _in_flight=False, _max_retransmits=None,
                               _misses=0, _retransmit=False, _sent_count=1,
                               _sent_time=0.0).items():
            setattr(chunk, key, value)
        sctp._flight_size_increase(chunk)
        sctp._sent_queue.append(chunk)
        tsn = tsn_plus_one(tsn)
    sctp._local_tsn = tsn
    sctp._tether_rescan = False
    return sctp, sent, sctp._sent_queue


async def test_transmit_does_not_walk_the_sent_queue() -> None:
    sctp, sent, queue = sender(20)
    await sctp._send(0, 53, b"z" * 100)
    assert queue.walks == 0
    assert [c.tsn for c in sent] == [queue[-1].tsn]


async def test_sack_with_gaps_resends_like_aiortc() -> None:
    """SACKs reporting a hole while newer chunks arrive: the third strike resends the
    missing chunk (fast retransmit), and the patched sender sends exactly what aiortc's
    own code sends, in the same order."""
    runs = []
    for patched in (True, False):
        sctp, sent, queue = sender(12)
        if not patched:
            aiortc_speed.unpatch(sctp)
            sctp._t3_start = lambda: None  # type: ignore[method-assign]
            sctp._t3_restart = lambda: None  # type: ignore[method-assign]
        first = queue[0].tsn
        for end in (3, 5, 7, 9):  # first+1 missing; more of the rest arrives each time
            sack = SackChunk()
            sack.cumulative_tsn = first
            sack.advertised_rwnd = 1 << 20
            sack.gaps = [(2, end)]
            sack.duplicates = []
            await sctp._receive_sack_chunk(sack)
            await sctp._send(0, 53, b"n" * 2000)
        runs.append([((c.tsn - first) % 2**32, c._sent_count)
                     for c in sent if isinstance(c, DataChunk)])
        resent = [c.tsn for c in sent if isinstance(c, DataChunk) and c._sent_count > 1]
        assert resent == [tsn_plus_one(first)]
    assert runs[0] == runs[1]


SACK_STATE = ("_last_sacked_tsn", "_flight_size", "_cwnd", "_ssthresh", "_partial_bytes_acked",
              "_fast_recovery_exit", "_fast_recovery_transmit", "_srtt", "_rttvar", "_rto",
              "_advanced_peer_ack_tsn", "_forward_tsn_streams", "_tether_rescan",
              "_reconfig_queue")


def sack_state(sctp: RTCSctpTransport) -> tuple[Any, ...]:
    chunks = [(c.tsn, c._acked, c._in_flight, c._retransmit, c._misses, c._sent_count,
               c._abandoned) for c in sctp._sent_queue]
    forward, reset = sctp._forward_tsn_chunk, sctp._reconfig_request
    return tuple(getattr(sctp, name, None) for name in SACK_STATE) + (
        chunks, forward and (forward.cumulative_tsn, forward.streams),
        reset and (reset.last_tsn, reset.streams))


def sent_item(chunk: Any) -> Any:
    if isinstance(chunk, DataChunk):
        return chunk.tsn, chunk._sent_count
    if isinstance(chunk, ForwardTsnChunk):
        return "forward", chunk.cumulative_tsn, chunk.streams
    if isinstance(chunk, ReconfigChunk):
        return "reconfig"
    return chunk


async def test_sack_fast_path_matches_aiortc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random SACK sequences (in order, stale, repeated, with gap blocks that trigger fast
    retransmit and recovery or abandon chunks under partial reliability), interleaved with
    new sends, across the TSN wrap: the sender
    with sack_fast_path ends every step in the same state, and sends the same chunks, as
    one whose SACKs all take the full path (aiortc's code behind tether's wrappers)."""
    assert "sack_fast_path" in aiortc_speed.active_patches()
    now = [1000.0]
    monkeypatch.setattr("time.time", lambda: now[0])
    gen = random.Random(17)
    fast_sacks = forwards = 0
    for _ in range(40):
        seed = gen.randrange(10**9)
        peers = []
        for full in (False, True):
            rng = random.Random(seed)
            sctp, sent, _ = sender(rng.randint(1, 30), 2**32 - rng.randint(0, 40))
            sctp._cwnd = rng.choice((4, 8, 30)) * USERDATA_MAX_LENGTH
            sctp._ssthresh = rng.choice((2, 6, 64)) * USERDATA_MAX_LENGTH
            reliable = rng.random() < 0.6
            if not reliable:  # partial reliability: struck chunks are abandoned
                for chunk in sctp._sent_queue:
                    chunk._max_retransmits = 0
            if full:
                sctp._receive_sack_chunk = aiortc_speed._sack_full_path[0].__get__(sctp)  # type: ignore[method-assign]
            cancel = sctp._t3_cancel
            sctp._t3_restart = lambda sent=sent: sent.append("t3 restart")  # type: ignore[method-assign]
            sctp._t3_cancel = lambda sent=sent, cancel=cancel: (  # type: ignore[method-assign]
                sent.append("t3 cancel"), cancel())
            peers.append((sctp, sent))
        steps = random.Random(seed + 1)
        for _ in range(60):
            now[0] += steps.choice((0.0005, 0.002, 0.05))
            action = steps.random()
            sack = None
            if action < 0.3:
                size = steps.choice((100, 1500, 5000))
            elif action < 0.33:  # a channel closes: its stream reset waits for a flush
                stream = steps.choice((0, 2))
                for sctp, _ in peers:
                    sctp._reconfig_queue.append(stream)
                continue
            elif action < 0.38 and not reliable and peers[0][0]._sent_queue:
                k = steps.randrange(len(peers[0][0]._sent_queue))  # a message given up
                for sctp, _ in peers:
                    sctp._sent_queue[k]._max_retransmits = 0
                    sctp._maybe_abandon(sctp._sent_queue[k])
                continue
            else:
                a, _ = peers[0]
                outstanding = [c.tsn for c in a._sent_queue]
                sack = SackChunk()
                sack.advertised_rwnd = 1 << 20
                sack.duplicates = []
                sack.gaps = []
                if not outstanding or action < 0.4:  # stale or repeated
                    back = steps.randint(0, 3)
                    sack.cumulative_tsn = (a._last_sacked_tsn - back) % 2**32
                else:
                    upto = steps.randint(-1, len(outstanding) - 1)
                    sack.cumulative_tsn = (
                        outstanding[upto] if upto >= 0 else a._last_sacked_tsn)
                    rest = len(outstanding) - upto - 1
                    if rest >= 2 and steps.random() < 0.3:
                        start = steps.randint(2, rest)
                        sack.gaps = [(start, steps.randint(start, rest))]
            for sctp, _ in peers:
                if sack is None:
                    await sctp._send(0, 53, b"n" * size)
                else:
                    await sctp._receive_sack_chunk(sack)
            if sack is not None and not sack.gaps:
                fast_sacks += 1
            (a, a_sent), (b, b_sent) = peers
            assert sack_state(a) == sack_state(b)
            assert [sent_item(c) for c in a_sent] == [sent_item(c) for c in b_sent]
        forwards += sum(isinstance(c, ForwardTsnChunk) for c in peers[0][1])
    assert fast_sacks > 500 and forwards > 10


async def test_t3_expiry_resends() -> None:
    sctp, sent, queue = sender(3)
    scheduled: list[Any] = []
    real_ensure_future = asyncio.ensure_future
    try:
        asyncio.ensure_future = scheduled.append  # type: ignore[assignment]
        sctp._t3_expired()
    finally:
        asyncio.ensure_future = real_ensure_future  # type: ignore[assignment]
    [transmit] = scheduled
    await transmit
    assert [c.tsn for c in sent] == [queue[0].tsn]  # cwnd fell to one packet


async def test_resend_in_flight_resends() -> None:
    """tether's own path-change resend marks chunks by hand; the patch still sees them."""
    sctp, sent, queue = sender(4)
    sctp._t3_handle = SimpleNamespace(cancel=lambda: None)
    sctp._t3_start = lambda: None  # type: ignore[method-assign]
    marked = await resend_in_flight(sctp)
    assert marked == 4
    assert [c.tsn for c in sent if isinstance(c, DataChunk)] == [c.tsn for c in queue]


async def test_marks_without_an_event_need_request_rescan() -> None:
    sctp, sent, queue = sender(2)
    queue[0]._retransmit = True
    sctp._flight_size_decrease(queue[0])
    await sctp._transmit()
    assert sent == []  # not walked: nothing told it a chunk was marked
    aiortc_speed.request_rescan(sctp)
    await sctp._transmit()
    assert [c.tsn for c in sent] == [queue[0].tsn]


# -- pace_bursts (unit, injected clock) ----------------------------------------------------


def idle_sender(cwnd_packets: int, srtt: float) -> tuple[RTCSctpTransport, list[Any], FakeTimers]:
    """An established sender with nothing in flight (it was waiting for its application)."""
    sctp, sent, _ = sender(0)
    timers = sctp._loop
    sctp._cwnd = cwnd_packets * USERDATA_MAX_LENGTH
    sctp._srtt = srtt
    return sctp, sent, timers  # type: ignore[return-value]


async def tick(timers: FakeTimers, seconds: float) -> None:
    """Advance the injected clock, then let the tasks its timers started run."""
    timers.advance(seconds)
    for _ in range(3):
        await asyncio.sleep(0)


def data_sent(sent: list[Any]) -> int:
    return sum(isinstance(c, DataChunk) for c in sent)


async def test_what_the_burst_limit_holds_back_is_paced() -> None:
    """A 60 KiB message (53 packets) after an idle spell on a 600 ms path: 4 packets at
    once (Max.Burst), the rest at the window's pace, none waiting for a SACK."""
    sctp, sent, timers = idle_sender(cwnd_packets=160, srtt=0.6)
    await sctp._send(0, 53, b"z" * 60 * 1024)
    packets = math.ceil(60 * 1024 / USERDATA_MAX_LENGTH)
    assert data_sent(sent) == 4
    gap = aiortc_speed.PACE_GAIN * 0.6 * 4 / 160  # half the time cwnd takes for 4 packets
    assert timers.pending() == [pytest.approx(gap)]
    ticks = 0
    while timers.pending():
        await tick(timers, gap)
        ticks += 1
        assert data_sent(sent) == min(4 + 4 * ticks, packets)
    assert ticks == math.ceil((packets - 4) / 4)  # 0.1 s, not 4 round trips (2.4 s)
    assert sctp._flight_size == 60 * 1024


async def test_pacing_never_goes_beyond_cwnd() -> None:
    sctp, sent, timers = idle_sender(cwnd_packets=10, srtt=0.6)
    await sctp._send(0, 53, b"z" * 60 * 1024)
    await tick(timers, 1.0)
    await tick(timers, 1.0)
    assert data_sent(sent) == 10  # cwnd is full: the rest waits for SACKs
    assert timers.pending() == []


async def test_pace_waits_at_least_pace_min_and_one_timer_at_a_time() -> None:
    sctp, sent, timers = idle_sender(cwnd_packets=100_000, srtt=aiortc_speed.PACE_MIN_RTT)
    await sctp._send(0, 53, b"z" * 60 * 1024)
    await sctp._send(0, 53, b"z" * 60 * 1024)  # a second message: still one timer
    assert timers.pending() == [pytest.approx(aiortc_speed.PACE_MIN)]


@pytest.mark.parametrize("srtt", [None, 0.002])
async def test_no_pacing_on_a_short_or_unmeasured_path(srtt: float | None) -> None:
    """There the next SACK comes sooner than a timer would help."""
    sctp, sent, timers = idle_sender(cwnd_packets=160, srtt=0.6)
    sctp._srtt = srtt
    await sctp._send(0, 53, b"z" * 60 * 1024)
    assert data_sent(sent) == 4 and timers.pending() == []


async def test_closing_cancels_the_pace_timer() -> None:
    sctp, sent, timers = idle_sender(cwnd_packets=160, srtt=0.6)
    await sctp._send(0, 53, b"z" * 60 * 1024)
    sctp._set_state(RTCSctpTransport.State.CLOSED)
    await tick(timers, 1.0)
    assert data_sent(sent) == 4 and timers.pending() == []


# -- lazy T3 (unit, injected clock) ------------------------------------------------------


def t3_sctp() -> tuple[RTCSctpTransport, FakeTimers, list[float]]:
    sctp, _, timers = make_sctp()
    expired: list[float] = []

    def count_expiry() -> None:
        sctp._t3_handle = None
        expired.append(timers.now)

    sctp._t3_expired = count_expiry  # type: ignore[method-assign]
    sctp._rto = 1.0
    return sctp, timers, expired


async def test_t3_restart_moves_one_deadline() -> None:
    sctp, timers, expired = t3_sctp()
    sctp._t3_start()
    for _ in range(5):  # five SACKs in the first half second: still one live timer
        timers.advance(0.1)
        sctp._t3_restart()
    assert len(timers.pending()) == 1
    timers.advance(0.5)  # the first handle's time (1.0): re-arms for the rest
    assert expired == [] and timers.pending() == [pytest.approx(1.5)]
    timers.advance(0.5)
    assert expired == [pytest.approx(1.5)]  # one RTO after the last restart, as in aiortc


async def test_t3_restart_with_a_shorter_rto_rearms_at_once() -> None:
    sctp, timers, expired = t3_sctp()
    sctp._rto = 3.0
    sctp._t3_start()
    sctp._rto = 1.0
    timers.advance(0.2)
    sctp._t3_restart()
    assert timers.pending() == [pytest.approx(1.2)]
    timers.advance(1.0)
    assert expired == [pytest.approx(1.2)]


async def test_t3_cancel_stops_it() -> None:
    sctp, timers, expired = t3_sctp()
    sctp._t3_start()
    sctp._t3_restart()
    sctp._t3_cancel()
    assert sctp._t3_handle is None
    timers.advance(5.0)
    assert expired == []


# -- STUN/DTLS demultiplexing (unit) -----------------------------------------------------


async def test_stun_demux() -> None:
    from aioice import stun
    from aioice.ice import StunProtocol

    got: list[tuple[str, Any]] = []
    receiver = SimpleNamespace(
        data_received=lambda data, component: got.append(("data", data)),
        request_received=lambda message, addr, protocol: got.append(("stun", message)),
    )
    protocol = StunProtocol(receiver)
    protocol.local_candidate = SimpleNamespace(component=1)
    dtls_record = bytes([23, 0xFE, 0xFD]) + b"\x00" * 40
    protocol.datagram_received(dtls_record, ("127.0.0.1", 9))
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    protocol.datagram_received(bytes(request), ("127.0.0.1", 9))
    protocol.datagram_received(b"\x05junk", ("127.0.0.1", 9))  # neither: data, as aioice does
    assert [kind for kind, _ in got] == ["data", "stun", "data"]
    assert got[0][1] == dtls_record
    assert StunProtocol.datagram_received is aiortc_speed._datagram_received_demux


# -- ICE pacing (pure) -------------------------------------------------------------------


def test_check_pacing() -> None:
    assert aiortc_speed.check_interval(0) == aiortc_speed.FAST_CHECK_INTERVAL == 0.005
    assert aiortc_speed.check_interval(aiortc_speed.FAST_CHECKS - 1) == 0.005
    assert aiortc_speed.check_interval(aiortc_speed.FAST_CHECKS) == 0.02


# -- real peers ----------------------------------------------------------------------------


def aiortc_packets(tube_id: str, *sides: AiortcTubeRegistry) -> None:
    """Keep aiortc's 1,189-byte packets on this tube (path_mtu grows them to 16 KiB on
    loopback): the tests that count per-packet work need packets at the rate of a path
    that carries no more."""
    for side in sides:
        path_mtu.prober(side._tube(tube_id).pc.sctp).keep_base()


def answer_as_shipped(b: AiortcTubeRegistry) -> None:
    """The tubes ``b`` answers run aiortc's own code (``unpatch``), and its answers say
    what aiortc as shipped says: nothing of reading records beyond 1,500 bytes."""
    real_create = b.create_tube

    async def create_unpatched(*args: Any, **kwargs: Any) -> dict[str, str]:
        result = await real_create(*args, **kwargs)
        aiortc_speed.unpatch(b._tube(result["tube_id"]).pc.sctp)
        answer = decode_sdp(result["answer"])
        assert "a=x-tether-records:16384" in answer
        result["answer"] = encode_sdp(answer.replace("a=x-tether-records:16384\r\n", ""))
        return result

    b.create_tube = create_unpatched  # type: ignore[method-assign]


def drop_every(registry: AiortcTubeRegistry, tube_id: str, nth: int) -> dict[str, int]:
    """Drop every ``nth`` SCTP datagram this side sends on the nominated path."""
    conn = registry._tube(tube_id).pc.sctp.transport.transport._connection
    protocol = conn._nominated[1].protocol
    send_data = protocol.send_data
    counts = {"sent": 0, "dropped": 0}

    async def lossy(data: bytes, addr: tuple[str, int]) -> None:
        counts["sent"] += 1
        if counts["sent"] % nth == 0:
            counts["dropped"] += 1
            return
        await send_data(data, addr)

    protocol.send_data = lossy
    return counts


async def move(a: AiortcTubeRegistry, b: AiortcTubeRegistry, tube_id: str,
               size: int, seed: int) -> None:
    """Send ``size`` bytes a->b and b->a in messages of varying size; check each side
    receives every byte, in order."""

    def payload(side: int) -> list[bytes]:
        gen = random.Random(seed * 2 + side)
        out, left = [], size
        while left:
            n = min(left, gen.choice((1, 100, 1200, 5000, 16384, 65536)))
            out.append(gen.randbytes(n))
            left -= n
        return out

    async def one_way(src: AiortcTubeRegistry, dst: AiortcTubeRegistry, side: int) -> None:
        messages = payload(side)
        want = hashlib.sha256(b"".join(messages)).hexdigest()
        got = hashlib.sha256()
        received = 0
        done = asyncio.Event()
        channel_in = dst.channel(tube_id)

        @channel_in.on("message")
        def on_message(message: bytes) -> None:
            nonlocal received
            got.update(message)
            received += len(message)
            if received >= size:
                done.set()

        channel_out = src.channel(tube_id)
        for message in messages:
            channel_out.send(message)
            while channel_out.bufferedAmount > 1 << 20:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(done.wait(), 60)
        assert received == size
        assert got.hexdigest() == want

    await asyncio.gather(one_way(a, b, 0), one_way(b, a, 1))


async def test_patched_peers_deliver_every_byte(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    sctp = a._tube(tube_id).pc.sctp
    await move(a, b, tube_id, 3 << 20, seed=1)
    assert sctp._handle_data.__func__ is aiortc_speed._handle_data_burst_sack
    assert sctp._receive_sack_chunk.__func__ is aiortc_speed._receive_sack_fast
    if sys.platform.startswith("linux"):  # a clean path: datagrams left in GSO sends
        for side in (a, b):
            batch = batches(side, tube_id)
            assert batch.gso_sends > 50 and batch.gso_datagrams > 2 * batch.gso_sends - 1


def count_chunks(registry: AiortcTubeRegistry, tube_id: str) -> dict[str, int]:
    """Count the SACK and DATA chunks this side's SCTP sends."""
    sctp = registry._tube(tube_id).pc.sctp
    send_chunk = sctp._send_chunk
    counts = {"sack": 0, "data": 0}

    async def counting(chunk: Any) -> None:
        if isinstance(chunk, SackChunk):
            counts["sack"] += 1
        elif isinstance(chunk, DataChunk):
            counts["data"] += 1
        await send_chunk(chunk)

    sctp._send_chunk = counting  # type: ignore[method-assign]
    return counts


@pytest.mark.skipif(runloop._uvloop() is None, reason="uvloop is not available")
def test_burst_sacks_between_real_peers() -> None:
    """sack_per_burst between real peers on uvloop (what tether runs on): fewer SACKs than
    delayed_sack's one per two DATA packets, every byte still delivered. (asyncio's own
    loop reads one datagram per socket per turn, so there bursts are single packets and
    the rule acknowledges every second one, as delayed_sack does.)"""

    async def body() -> None:
        a = AiortcTubeRegistry(host_addresses=LOOPBACK, liveness=FAST_LIVENESS)
        b = AiortcTubeRegistry(host_addresses=LOOPBACK, liveness=FAST_LIVENESS)
        try:
            tube_id = await connect_tubes(a, b)
            aiortc_packets(tube_id, a, b)
            counts = count_chunks(a, tube_id), count_chunks(b, tube_id)
            await move(a, b, tube_id, 4 << 20, seed=5)
        finally:
            await a.close()
            await b.close()
        for mine, theirs in (counts, counts[::-1]):
            print(f"SACKs per DATA packet: {mine['sack'] / theirs['data']:.2f}")
            assert theirs["data"] > 3000
            assert mine["sack"] < 0.45 * theirs["data"]

    runloop.run(body())


async def test_patched_peers_under_loss(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    lost_a = drop_every(a, tube_id, 29)
    lost_b = drop_every(b, tube_id, 31)
    await move(a, b, tube_id, 2 << 20, seed=2)
    assert lost_a["dropped"] > 10 and lost_b["dropped"] > 10
    assert a._tube(tube_id).chunks_resent > 0 and b._tube(tube_id).chunks_resent > 0


async def test_patched_and_unpatched_peer_under_loss(fast_cores: Any) -> None:
    """One peer runs aiortc's own SCTP code: the two still interoperate, with loss."""
    a, b = fast_cores
    answer_as_shipped(b)
    tube_id = await connect_tubes(a, b)
    plain = b._tube(tube_id).pc.sctp
    assert plain._handle_data.__func__ is aiortc_speed._originals["_handle_data"]
    await until(lambda: bool(plain.transport.transport._connection._nominated), 10)
    drop_every(a, tube_id, 23)
    drop_every(b, tube_id, 37)
    await move(a, b, tube_id, 2 << 20, seed=3)
    assert a._tube(tube_id).chunks_resent > 0 and b._tube(tube_id).chunks_resent > 0
    batch = batches(a, tube_id)  # the patched side's datagrams left in batches
    assert batch is not None and batch.datagrams > 1000
    assert path_mtu.prober(a._tube(tube_id).pc.sctp).packet <= 1500  # probed no further


class CountingSSL:
    """A pyOpenSSL connection that counts reads of an empty outgoing BIO."""

    def __init__(self, ssl: Any) -> None:
        self._inner = ssl
        self.empty_reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def bio_read(self, size: int) -> bytes:
        from OpenSSL import SSL

        try:
            return self._inner.bio_read(size)
        except SSL.WantReadError:
            self.empty_reads += 1
            raise


async def test_dtls_receive_skips_empty_bio_reads(fast_cores: Any) -> None:
    """Receiving application data no longer reads the (empty) outgoing BIO each time;
    aiortc's own code does, once per datagram."""
    a, b = fast_cores
    answer_as_shipped(b)
    tube_id = await connect_tubes(a, b)
    counted = {}
    for name, side in (("patched", a), ("plain", b)):
        dtls = side._tube(tube_id).pc.sctp.transport
        await until(lambda dtls=dtls: dtls._RTCDtlsTransport__handshake_done, 10)
        counted[name] = dtls._ssl = CountingSSL(dtls._ssl)
    await move(a, b, tube_id, 1 << 20, seed=4)
    assert counted["patched"].empty_reads == 0
    assert counted["plain"].empty_reads > 500  # ~1 MiB in 1.2 KB datagrams


# -- the event loop choice ---------------------------------------------------------------


def test_runloop_uses_uvloop_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether import runloop

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.delenv(runloop.LOOP_ENV, raising=False)
    pytest.importorskip("uvloop")
    assert runloop.loop_name() == "uvloop"
    assert runloop.run(loop_module()).startswith("uvloop")
    monkeypatch.setenv(runloop.LOOP_ENV, "asyncio")
    assert runloop.loop_name() == "asyncio"
    assert runloop.run(loop_module()).startswith("asyncio")
    loop = runloop.new_event_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


# -- DTLS records (tether.cores.dtls_records) ---------------------------------------------


def record_pair() -> tuple[Any, Any]:
    from tether.cores.dtls_records import RecordLayer

    master, client_random, server_random = bytes(range(48)), b"c" * 32, b"s" * 32
    suite = "ECDHE-ECDSA-AES128-GCM-SHA256"
    client = RecordLayer.for_suite(suite, master, client_random, server_random, True, 1, 5)
    server = RecordLayer.for_suite(suite, master, client_random, server_random, False, 1, 9)
    assert client is not None and server is not None
    return client, server


def test_records_round_trip_both_ways() -> None:
    from tether.cores.dtls_records import HEADER_SIZE, record_seq

    client, server = record_pair()
    for size in (0, 1, 1188, 1400):
        data = random.Random(size).randbytes(size)
        record = client.seal(23, data)
        assert record[0] == 23 and record[1:3] == b"\xfe\xfd"
        assert len(record) == HEADER_SIZE + 8 + size + 16
        assert server.open(record) == data
        assert client.open(server.seal(23, data)) == data
    assert record_seq(client.seal(23, b"x")) == (1, 9)  # 5 + the four records above


def test_records_drop_tampered_and_replayed() -> None:
    client, server = record_pair()
    record = client.seal(23, b"hello")
    tampered = bytearray(record)
    tampered[-1] ^= 1
    assert server.open(bytes(tampered)) is None
    assert server.open(record) == b"hello"  # the forgery did not burn the sequence number
    assert server.open(record) is None  # replay
    assert server.rejected == 2
    assert client.open(record) is None  # our own record does not open with the read key


def test_replay_window() -> None:
    from tether.cores.dtls_records import WINDOW, ReplayWindow

    window = ReplayWindow()
    for seq in (3, 1, 2, 10):
        assert window.fresh(seq)
        window.mark(seq)
    assert not any(window.fresh(seq) for seq in (1, 2, 3, 10))
    assert window.fresh(4) and window.fresh(9) and window.fresh(11)
    window.mark(10 + WINDOW)
    assert not window.fresh(10)  # now older than the window
    assert window.fresh(11) and not window.fresh(10 + WINDOW)
    window.mark(1000)
    assert window.bits == 1 and not window.fresh(1000) and window.fresh(999)


def test_reseal_moves_an_openssl_record_to_our_sequence() -> None:
    from tether.cores.dtls_records import record_seq

    client, server = record_pair()
    theirs = client.seal(21, b"\x01\x00")  # what OpenSSL sealed: seq 5
    client.next_seq = 40
    again = client.reseal(theirs)
    assert again is not None and record_seq(again) == (1, 40)
    assert server._read.decrypt(server._read_salt + again[13:21], again[21:],
                                again[3:11] + again[:3] + (2).to_bytes(2, "big")) == b"\x01\x00"


def test_split_records() -> None:
    from tether.cores.dtls_records import split_records

    client, _ = record_pair()
    a, b = client.seal(23, b"a"), client.seal(23, b"bb")
    assert split_records(a + b) == [a, b]
    assert split_records(a + b[:-1]) is None
    assert split_records(b"") == []


# -- direct records between real peers --------------------------------------------------


def sides(registry: AiortcTubeRegistry, tube_id: str) -> Any:
    return registry._tube(tube_id).pc.sctp.transport


async def test_direct_records_interoperate_with_openssl(fast_cores: Any) -> None:
    """A peer sealing its own records against one whose records all go through OpenSSL
    (``unpatch``): each side opens the other's records, with loss, every byte checked."""
    a, b = fast_cores
    answer_as_shipped(b)
    tube_id = await connect_tubes(a, b)
    await until(lambda: bool(sides(b, tube_id).transport._connection._nominated), 10)
    drop_every(a, tube_id, 41)
    await move(a, b, tube_id, 2 << 20, seed=5)
    mine, plain = sides(a, tube_id), sides(b, tube_id)
    layer = mine._tether_records
    assert layer is not None and layer.opened > 1000  # OpenSSL's records opened by us
    assert mine._tether_direct_send  # ours were opened by OpenSSL (move() got every byte)
    assert plain.__dict__.get("_tether_records") is None


async def test_direct_records_between_patched_peers(fast_cores: Any) -> None:
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    aiortc_packets(tube_id, a, b)
    await move(a, b, tube_id, 1 << 20, seed=6)
    for side in (a, b):
        dtls = sides(side, tube_id)
        assert dtls._tether_direct_send and dtls._tether_records.opened > 300


async def shutdown_reaches_the_peer(a: AiortcTubeRegistry, b: AiortcTubeRegistry) -> Any:
    tube_id = await connect_tubes(a, b)
    await move(a, b, tube_id, 256 << 10, seed=7)
    closing, peer = sides(a, tube_id), sides(b, tube_id)
    assert closing._tether_direct_send
    next_seq = closing._tether_records.next_seq
    await closing.stop()
    assert closing._tether_records.next_seq == next_seq + 1  # close_notify sealed again
    await until(lambda: peer.state == "closed", 10)
    return peer


async def test_dtls_shutdown_reaches_the_peer(fast_cores: Any) -> None:
    """A close_notify OpenSSL seals after we sealed records ourselves is sealed again
    with our sequence number, and the peer's OpenSSL takes it: its DTLS closes."""
    await shutdown_reaches_the_peer(*fast_cores)


async def test_wrong_keys_fall_back_to_openssl(fast_cores: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys that do not authenticate the first record leave the records to OpenSSL."""
    from tether.cores import dtls_records

    real = dtls_records.derive_keys

    def wrong(*args: Any) -> Any:
        keys = real(*args)
        return dtls_records.Keys(bytes(len(keys.client_key)), bytes(len(keys.server_key)),
                                 keys.client_salt, keys.server_salt)

    monkeypatch.setattr(dtls_records, "derive_keys", wrong)
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    await move(a, b, tube_id, 256 << 10, seed=9)
    for side in (a, b):
        dtls = sides(side, tube_id)
        assert dtls._tether_records is None and not dtls.__dict__.get("_tether_direct_send")


# -- the datagrams of one loop turn sent together (udp_batch, batch_sends) --------------


def batches(registry: AiortcTubeRegistry, tube_id: str) -> Any:
    """The SendBatch of this side's nominated socket."""
    path = registry._tube(tube_id).path
    protocol = path.current._nominated[1].protocol
    return protocol.__dict__.get("_tether_batch")


async def test_batched_sends_between_real_peers(fast_cores: Any) -> None:
    """Both sides batch their datagrams (GSO where the kernel has it), under loss, and
    every byte arrives in order."""
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    aiortc_packets(tube_id, a, b)
    await until(lambda: a._tube(tube_id).path.watching and b._tube(tube_id).path.watching, 10)
    drop_every(a, tube_id, 43)
    drop_every(b, tube_id, 47)
    await move(a, b, tube_id, 2 << 20, seed=11)
    for side in (a, b):
        batch = batches(side, tube_id)
        assert batch is not None and batch.datagrams > 1000
        print(f"\nbatch: {batch.datagrams} datagrams, {batch.gso_sends} GSO sends carried "
              f"{batch.gso_datagrams}")
        if sys.platform.startswith("linux"):
            assert batch.gso_sends > 0 and batch.gso_datagrams > 2 * batch.gso_sends - 1
    # Both sides saw losses, so both spread their sends for a while after them.
    assert batches(a, tube_id).spread_until > 0 and batches(b, tube_id).spread_until > 0


class Sink(asyncio.DatagramProtocol):
    """A real UDP socket on loopback that records what arrives."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


async def udp_pair() -> tuple[Any, Any, Sink, Any]:
    """A sending transport with its SendBatch, and a receiving sink's transport."""
    from tether.cores import udp_batch

    loop = asyncio.get_running_loop()
    sender, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                     local_addr=("127.0.0.1", 0))
    sink = Sink()
    receiver, _ = await loop.create_datagram_endpoint(lambda: sink, local_addr=("127.0.0.1", 0))
    batch = udp_batch.SendBatch.for_transport(sender)
    assert batch is not None
    return sender, batch, sink, receiver


async def test_send_batch_keeps_datagrams_and_order() -> None:
    """Runs of equal sizes, shorter tails, mixed sizes and two addresses: the receivers
    get exactly the datagrams sent, in order, in fewer system calls where GSO works."""
    sender, batch, sink, receiver = await udp_pair()
    other_sink = Sink()
    other, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: other_sink, local_addr=("127.0.0.1", 0))
    to, to_other = receiver.get_extra_info("sockname"), other.get_extra_info("sockname")
    try:
        gen = random.Random(4)
        want: list[bytes] = []
        want_other: list[bytes] = []
        for turn in range(30):
            for i in range(gen.choice((1, 2, 5, 40))):
                size = gen.choice((1229, 1229, 1229, 700, 60))
                data = bytes([turn % 256, i % 256]) + gen.randbytes(size - 2)
                if gen.random() < 0.1:
                    want_other.append(data)
                    batch.add(data, to_other)
                else:
                    want.append(data)
                    batch.add(data, to)
            await asyncio.sleep(0)  # the turn ends: the batch leaves
            await asyncio.sleep(0.002)
        await until(lambda: len(sink.got) == len(want) and len(other_sink.got) == len(want_other),
                    10)
        assert sink.got == want and other_sink.got == want_other
        assert batch.datagrams == len(want) + len(want_other)
        if sys.platform.startswith("linux"):
            assert batch.gso and batch.gso_sends > 10
    finally:
        batch.close()
        for transport in (sender, receiver, other):
            transport.close()


async def test_send_batch_falls_back_when_the_kernel_refuses_gso() -> None:
    """More segments than the kernel takes in one GSO send (UDP_MAX_SEGMENTS, 64 or 128
    depending on the kernel) is refused with EINVAL: the batch turns GSO off for the socket and the datagrams still
    arrive, through the transport's sendto."""
    from tether.cores import udp_batch

    if not sys.platform.startswith("linux"):
        pytest.skip("UDP GSO is Linux only")
    sender, batch, sink, receiver = await udp_pair()
    to = receiver.get_extra_info("sockname")
    try:
        run = [bytes([i % 256]) * 10 for i in range(300)]
        assert not batch._send_run(run, 10, to)  # a real EINVAL from the kernel
        assert not batch.gso
        for i, data in enumerate(run):
            batch.add(data, to)
            if i % 20 == 19:  # a turn ends; small turns stay below the receive buffer
                await asyncio.sleep(0.005)
        await until(lambda: len(sink.got) == len(run), 10)
        assert sink.got == run and batch.gso_sends == 0
        assert udp_batch.MAX_SEGMENTS < 64
    finally:
        batch.close()
        sender.close()
        receiver.close()


async def test_send_batch_queues_behind_a_backlog_and_closes_with_the_transport() -> None:
    """A transport whose buffer holds datagrams gets the batch appended behind them (never
    overtaken by a direct send); what was handed over before the transport closed still
    leaves, then the batch's descriptor is closed and later datagrams are dropped."""
    sender, batch, sink, receiver = await udp_pair()
    to = receiver.get_extra_info("sockname")
    try:
        sent: list[bytes] = []
        real_size = sender.get_write_buffer_size
        sender.get_write_buffer_size = lambda: 1  # as if the kernel had said EAGAIN before
        sender_sendto = sender.sendto

        def recording(data: bytes, addr: Any = None) -> None:
            sent.append(data)
            sender_sendto(data, addr)

        sender.sendto = recording
        for i in range(4):
            batch.add(bytes([i]) * 500, to)
        batch.flush()
        assert sent == [bytes([i]) * 500 for i in range(4)] and batch.gso_sends == 0
        sender.get_write_buffer_size = real_size
        await until(lambda: len(sink.got) == 4, 10)
        sock = batch._sock
        batch.add(b"last words", to)  # handed over, then the transport closes
        sender.close()
        batch.flush()
        assert batch._sock is None and (sock is None or sock.fileno() == -1)
        await until(lambda: len(sink.got) == 5, 10)
        batch.add(b"too late", to)
        batch.flush()
        await asyncio.sleep(0.05)
        assert sink.got[4:] == [b"last words"]
    finally:
        batch.close()
        sender.close()
        receiver.close()


async def test_send_batch_spreads_sends_after_a_loss() -> None:
    """After ``lost()`` (SCTP saw a gap or T3 expired) datagrams leave one per sendto, so a
    router that drops a GSO send whole cannot take a burst; batches come back later."""
    from tether.cores import udp_batch

    sender, batch, sink, receiver = await udp_pair()
    to = receiver.get_extra_info("sockname")
    try:
        batch.lost()
        for i in range(6):
            batch.add(bytes([i]) * 1000, to)
        batch.flush()
        assert batch.gso_sends == 0
        batch.spread_until -= udp_batch.SPREAD_AFTER_LOSS  # as if that time had passed
        for i in range(6):
            batch.add(bytes([i]) * 1000, to)
        batch.flush()
        assert batch.gso_sends == (1 if batch.gso else 0)
        await until(lambda: len(sink.got) == 12, 10)
        assert sink.got == [bytes([i]) * 1000 for i in range(6)] * 2
    finally:
        batch.close()
        sender.close()
        receiver.close()


# -- one-DATA packets: receive_single_data, send_data_direct ------------------------------


def random_data_chunk(gen: random.Random, max_size: int = 1300) -> DataChunk:
    chunk = DataChunk(flags=gen.randrange(16))
    chunk.tsn = gen.getrandbits(32)
    chunk.stream_id = gen.getrandbits(16)
    chunk.stream_seq = gen.getrandbits(16)
    chunk.protocol = gen.getrandbits(32)
    chunk.user_data = gen.randbytes(gen.randrange(0, max_size))
    return chunk


def checksummed(data: bytes) -> bytes:
    """``data`` with its SCTP checksum set (so a structural mutation reaches the parser)."""
    return data[:8] + pack("<L", crc32c(data[:8] + b"\x00" * 4 + data[12:])) + data[12:]


def aiortc_reads(data: bytes) -> tuple[int, list[Any]] | None:
    try:
        _, _, tag, chunks = parse_packet(data)
    except (ValueError, struct_error):
        return None
    return tag, chunks


def test_data_packet_matches_serialize_packet() -> None:
    gen = random.Random(21)
    for _ in range(1000):
        chunk = random_data_chunk(gen)
        ports_tag = (gen.getrandbits(16), gen.getrandbits(16), gen.getrandbits(32))
        assert aiortc_fastpath.data_packet(*ports_tag, chunk) == serialize_packet(*ports_tag, chunk)


def test_parse_single_data_matches_parse_packet() -> None:
    """On random one-DATA packets and mutations of them, the fast parser returns a chunk
    exactly when parse_packet reads one DATA chunk, and then the same one."""
    gen = random.Random(22)
    fast_hits = 0
    for _ in range(600):
        chunk = random_data_chunk(gen)
        good = serialize_packet(gen.getrandbits(16), gen.getrandbits(16), gen.getrandbits(32), chunk)
        flip = gen.randrange(len(good))
        cut = gen.randrange(1, len(good))
        length_field = gen.choice((0, 4, 15, 16, 17, len(good) - 12, len(good) - 11, 65535))
        variants = [
            good,
            good[:flip] + bytes([good[flip] ^ (1 << gen.randrange(8))]) + good[flip + 1:],
            checksummed(good + b"\x00" * gen.randint(1, 3)),  # trailing bytes, not a chunk
            checksummed(good[:cut]),
            checksummed(good + bytes(random_data_chunk(gen, 40))),  # bundled DATA
            checksummed(good + bytes(SackChunk())),  # bundled control chunk
            checksummed(good[:12] + bytes([gen.choice((0, 3, 1, 200))]) + good[13:]),  # type
            checksummed(good[:14] + pack("!H", length_field) + good[16:]),
        ]
        for data in variants:
            got = aiortc_speed.parse_single_data(data)
            want = aiortc_reads(data)
            single = (want is not None and len(want[1]) == 1
                      and type(want[1][0]) is DataChunk)
            assert (got is not None) == single, data.hex()
            if got is not None:
                assert want is not None
                fast_hits += 1
                assert got[0] == want[0]
                assert type(got[1]) is DataChunk and vars(got[1]) == vars(want[1][0])
    assert fast_hits > 1000


async def test_single_data_receiver_matches_aiortc() -> None:
    """Random arrival orders with duplicates, gaps and bundles, through ``_handle_data``:
    with and without the fast parser the receiver delivers the same messages, sends the
    same SACKs and ends in the same state after every packet."""
    gen = random.Random(23)
    for _ in range(30):
        tsns = [PEER_TSN + i for i in range(30)]
        order = tsns + gen.sample(tsns, 6)
        gen.shuffle(order)
        packets = []
        for tsn in order:
            chunks = [data_chunk(tsn, bytes([tsn % 256]) * gen.randint(1, 1100))]
            if gen.random() < 0.1:
                chunks.append(data_chunk(gen.choice(tsns)))
            packets.append(packet(*chunks))
        packets.insert(gen.randrange(len(packets)), b"\x00" * 40)  # a bad checksum
        stray = packet(data_chunk(PEER_TSN + 30))  # the next TSN, but another association's tag
        packets.insert(gen.randrange(len(packets)), checksummed(stray[:4] + pack("!L", LOCAL_TAG + 1) + stray[8:]))
        runs = {}
        for fast in (True, False):
            aiortc_speed._single_data[0] = fast
            try:
                sctp, sent, timers, delivered = delivering_sctp()
                states = []
                for data in packets:
                    await sctp._handle_data(data)
                    timers.end_turn()
                    states.append((sctp._last_received_tsn, sorted(sctp._sack_misordered),
                                   list(sctp._sack_duplicates), sctp._advertised_rwnd,
                                   len(delivered), [(c.cumulative_tsn, c.gaps, c.duplicates)
                                                    for c in sacks(sent)]))
                runs[fast] = (states, delivered)
            finally:
                aiortc_speed._single_data[0] = "receive_single_data" in aiortc_speed.active_patches()
        assert runs[True] == runs[False]
        assert len(runs[True][1]) == 30


async def test_direct_sends_between_real_peers(fast_cores: Any) -> None:
    """Between real patched peers every DATA chunk after the first few leaves through
    send_data_direct's one call (IcePath.send_now), and every byte arrives."""
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    aiortc_packets(tube_id, a, b)
    path = a._tube(tube_id).path
    direct = {"now": 0}
    send_now = path.send_now

    def counting(data: bytes) -> bool:
        done = send_now(data)
        direct["now"] += done
        return done

    path.send_now = counting  # type: ignore[method-assign]
    sent = count_chunks(a, tube_id)
    await move(a, b, tube_id, 2 << 20, seed=6)
    assert sent["data"] > 1500
    assert direct["now"] > sent["data"] - 20


@pytest.mark.skipif(runloop._uvloop() is None, reason="uvloop is not available")
def test_drained_receive_between_real_peers() -> None:
    """receive_drained on uvloop (what tether runs on; asyncio's own loop reads one
    datagram per socket per turn, so little ever waits in the queue): DTLS's receive task
    handles queued datagrams without a receive call each (IcePath.recv_nowait), every
    byte still arrives in order both ways, and a closed path still ends the task."""

    async def body() -> None:
        a = AiortcTubeRegistry(host_addresses=LOOPBACK, liveness=FAST_LIVENESS)
        b = AiortcTubeRegistry(host_addresses=LOOPBACK, liveness=FAST_LIVENESS)
        try:
            tube_id = await connect_tubes(a, b)
            path = b._tube(tube_id).path
            drained = {"n": 0}
            recv_nowait = path.recv_nowait

            def counting() -> bytes | None:
                data = recv_nowait()
                drained["n"] += data is not None
                return data

            path.recv_nowait = counting  # type: ignore[method-assign]
            await move(a, b, tube_id, 4 << 20, seed=7)
            print("datagrams drained:", drained["n"])
            assert drained["n"] > 100
            dtls = b._tube(tube_id).pc.sctp.transport
            path._received.put_nowait(None)  # what IcePath.close queues
            await until(lambda: dtls.state == "closed", 10)
        finally:
            await a.close()
            await b.close()

    runloop.run(body())


# -- receive_in_order ----------------------------------------------------------------------


def fragmented_stream(gen: random.Random, messages: int) -> list[DataChunk]:
    """Messages of 1-6 fragments on two streams, ordered or not, in TSN order."""
    chunks = []
    tsn = PEER_TSN
    seqs = {1: 0, 7: 0}
    for _ in range(messages):
        stream_id = gen.choice((1, 7))
        unordered = gen.random() < 0.2
        parts = gen.randint(1, 6)
        for i in range(parts):
            flags = (0x02 if i == 0 else 0) | (0x01 if i == parts - 1 else 0)
            chunk = DataChunk(flags=flags | (0x04 if unordered else 0))
            chunk.tsn = tsn
            chunk.stream_id = stream_id
            chunk.stream_seq = seqs[stream_id]
            chunk.protocol = 53
            chunk.user_data = bytes([tsn % 256]) * gen.randint(1, 1200)
            chunks.append(chunk)
            tsn += 1
        if not unordered:
            seqs[stream_id] += 1
    return chunks


def count_in_order(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the packets take_in_order takes (its callers look it up at call time)."""
    taken = {"n": 0}
    take = aiortc_speed.take_in_order

    def counting(sctp: Any, data: bytes) -> bool | None:
        result = take(sctp, data)
        taken["n"] += result is not None
        return result

    monkeypatch.setattr(aiortc_speed, "take_in_order", counting)
    return taken


async def test_in_order_receiver_matches_aiortc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fragmented messages on two streams arriving mostly in order, with swaps, losses
    made good later, duplicates and bundles, loop turns and the SACK timer in between:
    with and without receive_in_order the receiver delivers the same messages, sends the
    same SACKs and holds the same state after every packet; and most packets took the
    in-order call."""
    gen = random.Random(31)
    taken = count_in_order(monkeypatch)
    packets_total = 0
    for _ in range(40):
        chunks = fragmented_stream(gen, 12)
        order = list(range(len(chunks)))
        for _ in range(gen.randint(0, 3)):  # swaps
            i = gen.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        if gen.random() < 0.5:  # a loss made good three packets later
            i = gen.randrange(len(order) - 4)
            order.insert(i + 3, order.pop(i))
        for _ in range(gen.randint(0, 2)):  # duplicates
            order.insert(gen.randrange(len(order)), gen.choice(order))
        packets = [packet(chunks[i]) for i in order]
        if gen.random() < 0.3:
            packets.append(packet(chunks[0], chunks[-1]))  # a bundle of two old chunks
        steps = [gen.choice(("none", "none", "turn", "timer")) for _ in packets]
        packets_total += len(packets)
        runs = {}
        for in_order in (True, False):
            monkeypatch.setattr(aiortc_speed, "_in_order", [in_order])
            sctp, sent, timers, delivered = delivering_sctp()
            states = []
            for data, step in zip(packets, steps, strict=True):
                await sctp._handle_data(data)
                if step == "turn":
                    timers.end_turn()
                elif step == "timer":
                    timers.end_turn()
                    timers.advance(aiortc_speed.SACK_DELAY)
                states.append((
                    sctp._last_received_tsn, sorted(sctp._sack_misordered),
                    list(sctp._sack_duplicates), sctp._advertised_rwnd, sctp._sack_needed,
                    getattr(sctp, "_tether_unacked", 0), len(timers.pending()),
                    {sid: [c.tsn for c in s.reassembly] for sid, s in sctp._inbound_streams.items()},
                    list(delivered),
                    [(c.cumulative_tsn, c.gaps, c.duplicates) for c in sacks(sent)],
                ))
            runs[in_order] = states
        assert runs[True] == runs[False]
    assert taken["n"] > packets_total // 3


async def test_in_order_receive_between_real_peers(fast_cores: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Between real patched peers DTLS's receive path takes most DATA packets with
    take_in_order, and every byte arrives."""
    taken = count_in_order(monkeypatch)
    a, b = fast_cores
    tube_id = await connect_tubes(a, b)
    sent = count_chunks(a, tube_id)
    await move(a, b, tube_id, 2 << 20, seed=8)
    assert taken["n"] > sent["data"] // 2
