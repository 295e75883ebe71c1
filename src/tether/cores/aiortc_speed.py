"""Every speed patch tether makes to aiortc's and aioice's private code, in one place.

aiortc and aioice are pinned exactly (``PINNED``); :func:`install` refuses other versions,
so a new release is this one file to revisit rather than something patched blindly. Each
patch is a small named function below whose docstring says what the library does, what
we do instead, why that is correct, and the upstream change it stands for. ``install()``
applies them once, at class level (every RTCSctpTransport and aioice Connection in the
process); :func:`unpatch` gives one SCTP transport aiortc's own code back (tests use it to
make a patched peer talk to an unpatched one).

Issue 9 measured where a CLI tunnel's CPU went: SACK work alone was 22-28 % on each side
(aiortc sends one SACK per DATA packet), and the sender rescanned its whole sent queue
on every SACK. The patches, in order of effect:

1. delayed SACK (:func:`delayed_sack`),
2. a ``_transmit`` that rescans the sent queue only when something may need resending
   (:func:`transmit_without_rescan`),
3. an in-order fast path for received TSNs (:func:`mark_received_fast`),
4. faster ICE check pacing for the first checks (:func:`paced_connect`),
5. no empty DTLS BIO read after each received record (:func:`dtls_quiet_receive`),
6. STUN/DTLS told apart by the first byte, not by a failed parse (:func:`stun_demux`),
7. one moving T3 deadline instead of a new timer per SACK (:func:`lazy_t3_restart`),
8. reassembly scans only when a message can complete (:func:`reassemble_on_last_fragment`),
9. DTLS application-data records sealed and opened with cryptography's AESGCM instead of
   through pyOpenSSL's BIOs (:func:`tether.cores.aiortc_fastpath.dtls_direct_records`),
10. the datagrams of one loop turn sent together, with UDP GSO on Linux
   (:func:`tether.cores.aiortc_fastpath.batch_sends`),
11. one SACK per receive burst (at most SACK_BURST_MAX packets) instead of one per two
   packets (:func:`sack_per_burst`),
12. a SACK without gap blocks handled inline on the sender (:func:`sack_fast_path`),
13. the cyclic garbage collector run less often (:func:`gc_less_often`),
14. a packet holding one DATA chunk parsed by a short path and handed straight to the
   DATA handler (:func:`receive_single_data`),
15. a DATA chunk serialised, sealed and queued on the path in one call, without a
   coroutine per layer (:func:`tether.cores.aiortc_fastpath.send_data_direct`),
16. DTLS's receive task handling every queued datagram per call (:func:`receive_drained`),
17. the common in-order DATA packet taken in one call (:func:`receive_in_order`),
18. what the burst limit held back sent at the window's pace, not on the next SACK
   (:func:`pace_bursts`; a correction for slow paths rather than a speed-up).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Any

import aioice.ice
import aiortc.rtcdtlstransport as rtcdtls
from aioice.ice import CandidatePair, Connection, StunProtocol
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcsctptransport import (
    SCTP_DATA_LAST_FRAG,
    SCTP_TSN_MODULO,
    USERDATA_MAX_LENGTH,
    DataChunk,
    InitChunk,
    RTCSctpTransport,
    SackChunk,
    parse_packet,
)
from aiortc.utils import uint32_gt
from google_crc32c import value as crc32c

from .. import runloop

logger = logging.getLogger(__name__)

PINNED = {"aiortc": "1.16.0", "aioice": "0.13.0"}

# Delayed SACK (RFC 4960 section 6.2): acknowledge every second DATA packet at once,
# any other one within SACK_DELAY. The RFC asks for at most 200 ms (500 ms at most). A
# sender never waits on it for its retransmission timer (aiortc's RTO is at least 1 s);
# it only holds one packet of an idle sender's window a little longer, so a few ms is
# plenty: long enough that a busy stream is always acknowledged by the every-second
# rule, short enough that a lone request's packet leaves the window soon.
SACK_DELAY = 0.005
SACK_EVERY = 2

# ICE check pacing (RFC 8445 section 14.2: Ta may be as low as 5 ms for non-media
# traffic). aioice starts one check every 20 ms; we start the first FAST_CHECKS checks
# 5 ms apart, then go back to aioice's 20 ms so a long check list is not a burst.
FAST_CHECK_INTERVAL = 0.005
FAST_CHECKS = 8
CHECK_INTERVAL = 0.02


# The user data one DATA chunk carries: aiortc's fixed cut, until path_mtu finds that
# this association's path carries larger packets (an instance attribute then).
RTCSctpTransport._tether_data_max = USERDATA_MAX_LENGTH  # type: ignore[attr-defined]


class UnsupportedVersionError(RuntimeError):
    """aiortc or aioice is not the version these patches were written for."""


_originals: dict[str, Callable[..., Any]] = {}
_installed = False
_active: tuple[str, ...] = ()


def installed() -> bool:
    return _installed


def active_patches() -> tuple[str, ...]:
    """The patches install() applied."""
    return _active


def check_versions(versions: dict[str, str] | None = None) -> None:
    """Raise UnsupportedVersionError unless aiortc and aioice are the pinned versions."""
    found = versions if versions is not None else {
        name: metadata.version(name) for name in PINNED
    }
    wrong = {name: found.get(name) for name, want in PINNED.items() if found.get(name) != want}
    if wrong:
        raise UnsupportedVersionError(
            "tether's speed patches (tether/cores/aiortc_speed.py) were written for "
            + ", ".join(f"{n}=={v}" for n, v in PINNED.items())
            + "; found "
            + ", ".join(f"{n}=={v}" for n, v in wrong.items())
            + ". Revisit the patches (or pin the versions) before running."
        )


PATCHES_ENV = "TETHER_SPEED_PATCHES"


def chosen_patches(value: str | None = None) -> list[str]:
    """The patches to apply, in PATCHES order: all of them, unless
    ``TETHER_SPEED_PATCHES`` says ``none`` or names some (comma-separated; ``all`` in the
    list stands for the default set), e.g. to measure one against aiortc as shipped."""
    value = os.environ.get(PATCHES_ENV, "all") if value is None else value
    value = value.strip().lower()
    if value == "none":
        return []
    names = {name.strip() for name in (value or "all").split(",") if name.strip()}
    if "all" in names:
        names.discard("all")
        names.update(PATCHES)
    unknown = sorted(names - set(PATCHES))
    if unknown:
        raise ValueError(f"{PATCHES_ENV}: unknown patches {unknown}; known: {sorted(PATCHES)}")
    return [name for name in PATCHES if name in names]


def install() -> None:
    """Apply the patches once (idempotent); refuse unpinned aiortc/aioice versions
    (unless ``TETHER_SPEED_PATCHES=none``: nothing is patched then)."""
    global _installed, _active
    if _installed:
        return
    names = chosen_patches()
    if names:
        check_versions()
    sctp = RTCSctpTransport
    for name in ("_handle_data", "_send_sack", "_set_state", "_transmit",
                 "_receive_sack_chunk", "_t3_expired", "_t3_cancel", "_mark_received",
                 "_send", "_receive_chunk"):
        _originals[name] = getattr(sctp, name)
    _originals["connect"] = Connection.connect
    _originals["dtls_recv_next"] = RTCDtlsTransport._recv_next
    _originals["dtls_send_data"] = RTCDtlsTransport._send_data
    _originals["dtls_write_ssl"] = RTCDtlsTransport._write_ssl
    _originals["stun_datagram_received"] = StunProtocol.datagram_received
    for name in ("_t3_start", "_t3_restart", "_receive_data_chunk"):
        _originals[name] = getattr(sctp, name)
    for name in names:
        PATCHES[name]()
    _active = tuple(names)
    _installed = True
    logger.debug("aiortc speed patches installed: %s", ", ".join(names) or "none")


def unpatch(sctp: RTCSctpTransport) -> None:
    """Give one SCTP transport aiortc's own methods back (it then behaves as shipped)."""
    for name, function in _originals.items():
        if name not in ("connect", "stun_datagram_received") and not name.startswith("dtls_"):
            setattr(sctp, name, function.__get__(sctp, type(sctp)))
    dtls = sctp.transport
    dtls._recv_next = _originals["dtls_recv_next"].__get__(dtls, type(dtls))
    aiortc_fastpath.give_back(dtls)


# -- 1. delayed SACK ----------------------------------------------------------------------


def delayed_sack() -> None:
    """aiortc sends a SACK after every packet that carried DATA (``_handle_data``).

    We send one for every second packet with DATA, and at once when the packet showed a
    gap or a duplicate, filled a gap, carried any other chunk, or the association is not
    established (shutting down); a lone packet is acknowledged by a timer within
    SACK_DELAY. That is the delayed acknowledgement of RFC 4960 / RFC 9260 section 6.2
    (a SACK for at least every second packet - not every second DATA chunk - and within
    200 ms of an unacknowledged DATA chunk's arrival, 500 ms at most) with section 6.7's
    exceptions (gaps, duplicates and filled gaps are reported at once), so fast
    retransmit keeps its speed. Halving the SACKs halves the SACK work on both sides (issue 9: 22-28 % of
    the CPU). Upstream: aiortc's own ``_handle_data`` gets a delayed-ack rule and timer.
    """
    RTCSctpTransport._handle_data = _handle_data_delayed_sack  # type: ignore[method-assign]
    RTCSctpTransport._send_sack = _send_sack_counted  # type: ignore[method-assign]
    RTCSctpTransport._set_state = _set_state_cancelling  # type: ignore[method-assign]


def may_delay_sack(sctp: RTCSctpTransport, only_data: bool) -> bool:
    """Whether the SACK for the packet just handled may wait (the rule of delayed_sack)."""
    return (
        only_data
        and not sctp._sack_misordered
        and not sctp._sack_duplicates
        and sctp._association_state == RTCSctpTransport.State.ESTABLISHED
        and getattr(sctp, "_tether_unacked", 0) + 1 < SACK_EVERY
    )


async def _receive_packet(self: RTCSctpTransport, data: bytes) -> bool | None:
    """Hand a packet's chunks to aiortc as ``_handle_data`` does; whether it carried only
    DATA and filled no gap (None: dropped, bad packet or verification tag)."""
    if _single_data[0]:
        parsed = parse_single_data(data)
        if parsed is not None:  # the common packet: one DATA chunk (receive_single_data)
            tag, chunk = parsed
            if tag != self._local_verification_tag:
                return None
            only_data = not self._sack_misordered
            self._RTCSctpTransport__log_debug("< %s", chunk)  # type: ignore[attr-defined]
            await self._receive_data_chunk(chunk)
            return only_data
    try:
        _, _, verification_tag, chunks = parse_packet(data)
    except ValueError:
        return None
    if any(isinstance(chunk, InitChunk) for chunk in chunks):
        if len(chunks) != 1:  # RFC 4960 section 3.3.2: INIT is never bundled
            return None
        expected_tag = 0
    else:
        expected_tag = self._local_verification_tag
    if verification_tag != expected_tag:
        return None
    # A packet that fills a gap is acknowledged at once too (RFC 4960 section 6.7).
    only_data = not self._sack_misordered
    for chunk in chunks:
        if type(chunk) is not DataChunk:
            only_data = False
        await self._receive_chunk(chunk)
    return only_data


async def _handle_data_delayed_sack(self: RTCSctpTransport, data: bytes) -> None:
    only_data = await _receive_packet(self, data)
    if only_data is None or not self._sack_needed:
        return
    if may_delay_sack(self, only_data):
        self._tether_unacked = getattr(self, "_tether_unacked", 0) + 1
        if getattr(self, "_tether_sack_timer", None) is None:
            self._tether_sack_timer = self._loop.call_later(SACK_DELAY, _sack_timer_fired, self)
        return
    await self._send_sack()


async def _send_sack_counted(self: RTCSctpTransport) -> None:
    self._tether_unacked = 0
    await _originals["_send_sack"](self)


def _sack_timer_fired(sctp: RTCSctpTransport) -> None:
    """The delayed SACK's timer: acknowledge what is still unacknowledged."""
    sctp._tether_sack_timer = None
    if sctp._sack_needed and sctp._association_state == RTCSctpTransport.State.ESTABLISHED:
        _run_now(sctp, sctp._send_sack())


def _run_now(sctp: RTCSctpTransport, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` from a timer callback: it sends a datagram and normally never suspends,
    so it runs to its end right here; if it does suspend, a task owned by ``sctp`` (and
    cancelled when the association closes) finishes it."""
    try:
        coro.send(None)
    except StopIteration:
        return
    except ConnectionError as exc:  # the path closed under us: the SACK has nowhere to go
        logger.debug("delayed SACK not sent: %s", exc)
        return
    coro.close()
    _own_task(sctp, sctp._send_sack())


def _own_task(sctp: RTCSctpTransport, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` as a task that ``sctp`` owns (cancelled when the association closes)."""
    tasks: set[asyncio.Task[None]] = sctp.__dict__.setdefault("_tether_tasks", set())
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _set_state_cancelling(self: RTCSctpTransport, state: Any) -> None:
    _originals["_set_state"](self, state)
    if state == RTCSctpTransport.State.CLOSED:
        for name in ("_tether_sack_timer", "_tether_burst_end", "_tether_pace_timer"):
            timer = getattr(self, name, None)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)
        for task in list(getattr(self, "_tether_tasks", ())):
            task.cancel()


# -- 1a. a packet holding one DATA chunk, parsed and dispatched directly ------------------


def receive_single_data() -> None:
    """aiortc's ``parse_packet`` is generic: a loop over the chunks, a chunk class looked up
    by type, a body slice that ``DataChunk.__init__`` slices again, and a checksum over two
    concatenations; then ``_receive_chunk`` logs and walks an isinstance chain to reach
    ``_receive_data_chunk``. Nearly every packet of a stream holds exactly one DATA chunk.

    For such a packet (:func:`parse_single_data`: a DATA chunk of at least its header's
    length that ends the packet, as ``parse_packet``'s loop would find it) we check the
    same CRC32c, make the same DataChunk (flags, TSN, stream, sequence, PPID, user data)
    and call ``_receive_data_chunk`` directly, after the same verification tag check and
    debug log. Any other packet, or one whose checksum fails, takes the generic path,
    which drops or handles it as before. Upstream: a single-chunk fast path in
    ``parse_packet`` and a dispatch table in ``_receive_chunk``.
    """
    _single_data[0] = True


_single_data = [False]  # receive_single_data is on (read by _receive_packet)
_DATA_HEADER = struct.Struct("!LHHL")  # TSN, stream id, stream sequence, PPID
_ZERO_CHECKSUM = b"\x00\x00\x00\x00"


def parse_single_data(data: bytes) -> tuple[int, DataChunk] | None:
    """The verification tag and DATA chunk of a packet that holds exactly that one chunk,
    as ``parse_packet`` would return them; None for any other packet, and for one whose
    checksum fails (``parse_packet`` then decides)."""
    length = len(data)
    if length < 28 or data[12] != 0:
        return None
    chunk_length = (data[14] << 8) | data[15]
    end = 12 + chunk_length
    if chunk_length < 16 or end > length or end + (-chunk_length & 3) <= length - 4:
        return None  # too short, too long, or another chunk follows
    if int.from_bytes(data[8:12], "little") != crc32c(data[:8] + _ZERO_CHECKSUM + data[12:]):
        return None
    chunk = DataChunk.__new__(DataChunk)
    chunk.flags = data[13]
    chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = _DATA_HEADER.unpack_from(data, 16)
    chunk.user_data = data[28:end]
    return int.from_bytes(data[4:8], "big"), chunk


# -- 1b. one SACK per receive burst -------------------------------------------------------


def sack_per_burst() -> None:
    """With delayed_sack, a receiver acknowledges every second DATA packet; a burst of
    packets that arrives in one loop turn (uvloop reads up to 32 datagrams per wakeup and
    DTLS's receive task handles them back to back) still costs a SACK per two packets on
    both sides (building, sealing and sending it here; opening, parsing and handling it,
    then a ``_transmit``, on the sender).

    We acknowledge the DATA of one burst with one SACK, sent by a ``call_soon`` callback
    at the end of the loop turn in which the burst was handled, or at once when
    SACK_BURST_MAX packets are unacknowledged. A turn that handled a single packet sends
    nothing; that packet is acknowledged with the next one or by the 5 ms timer, as with
    delayed_sack, so there are never more SACKs than with delayed_sack. Gaps, duplicates,
    filled gaps, bundled control chunks and states other than ESTABLISHED are
    acknowledged at once as with delayed_sack (RFC 4960 section 6.7), and for
    STRETCH_QUIET after a gap SACKs go back to one per second packet (the lab's 5 %
    loss ran at a third of the speed without that: the sender's window is small after a
    loss and grows by at most one MTU per SACK), and on a path whose smoothed round trip
    is unknown or STRETCH_MAX_RTT or more (slow start, which also grows by one MTU per
    SACK, takes that many more round trips: the lab's 600 ms slow_path ran at a third of
    the speed). This is
    a stretch acknowledgement bounded by what arrived together, as Linux TCP does for a
    GRO-merged segment; RFC 4960 section 6.2 asks for a SACK per second packet (a
    SHOULD). The cap matters to the sender: aiortc (like usrsctp) sends at most
    Max.Burst = 4 packets above its flight size per SACK, so a SACK for more than four
    packets would shrink its flight; its slow start grows cwnd by at most one MTU per
    SACK (RFC 4960 section 7.2.1), so with fewer SACKs slow start is slower (congestion
    avoidance counts bytes and is unchanged). Upstream: aiortc sends the delayed SACK
    when its receive loop has drained what arrived.
    """
    RTCSctpTransport._handle_data = _handle_data_burst_sack  # type: ignore[method-assign]
    RTCSctpTransport._send_sack = _send_sack_counted  # type: ignore[method-assign]
    RTCSctpTransport._set_state = _set_state_cancelling  # type: ignore[method-assign]


SACK_BURST_MAX = 4  # the sender's Max.Burst (aiortc, usrsctp): a SACK for more would shrink its flight
# Stretch only on short paths. A SACK for four packets lets the sender's slow start grow by
# one MTU per four packets instead of per two, which costs little where a round trip is a
# few ms and a lot where it is hundreds: the lab's slow_path (600 ms) fell from 0.2 to
# 0.06 MB/s with stretched SACKs. The round trip is the association's own smoothed one
# (aiortc's _srtt, measured from the first DATA on, the channel's open message included).
STRETCH_MAX_RTT = 0.05
# After a gap (a lost or reordered packet), SACKs go back to one per second packet for
# this long: the sender's window is small then and grows by at most one MTU per SACK.
STRETCH_QUIET = 2.0


def sack_limit(sctp: RTCSctpTransport) -> int:
    """How many packets one SACK may cover now: SACK_BURST_MAX on a path whose round trip
    is known and under STRETCH_MAX_RTT, else SACK_EVERY; SACK_EVERY too until
    STRETCH_QUIET after the last gap this receiver saw."""
    srtt = sctp._srtt
    if srtt is None or srtt >= STRETCH_MAX_RTT:
        return SACK_EVERY
    gap_at = getattr(sctp, "_tether_gap_at", None)
    if gap_at is not None and sctp._loop.time() - gap_at < STRETCH_QUIET:
        return SACK_EVERY
    return SACK_BURST_MAX


async def _handle_data_burst_sack(self: RTCSctpTransport, data: bytes) -> None:
    if _in_order[0]:  # receive_in_order
        taken = take_in_order(self, data)
        if taken is not None:
            if taken:
                await self._send_sack()
            return
    only_data = await _receive_packet(self, data)
    if only_data is None:
        return
    if self._sack_misordered:  # a gap: the sender's window is small for a while
        self._tether_gap_at = self._loop.time()
    if not self._sack_needed:
        return
    if (only_data and not self._sack_misordered and not self._sack_duplicates
            and self._association_state == RTCSctpTransport.State.ESTABLISHED
            and _sack_may_wait(self)):
        return
    await self._send_sack()


def _sack_may_wait(sctp: RTCSctpTransport) -> bool:
    """Count one more packet of DATA (no gap, no duplicate, ESTABLISHED) into the burst's
    SACK: True if the SACK may wait (the end of the loop turn and the SACK_DELAY timer are
    armed), False if it is due now (the burst reached sack_limit)."""
    unacked = getattr(sctp, "_tether_unacked", 0) + 1
    if unacked >= sack_limit(sctp):
        return False
    sctp._tether_unacked = unacked
    if getattr(sctp, "_tether_burst_end", None) is None:
        sctp._tether_burst_end = sctp._loop.call_soon(_burst_ended, sctp)
    if getattr(sctp, "_tether_sack_timer", None) is None:
        sctp._tether_sack_timer = sctp._loop.call_later(SACK_DELAY, _sack_timer_fired, sctp)
    return True


def _burst_ended(sctp: RTCSctpTransport) -> None:
    """The loop turn that handled a burst is over: acknowledge it, unless it was a single
    packet (that one waits for the next packet or the timer, as with delayed_sack)."""
    sctp._tether_burst_end = None
    if (sctp._sack_needed and getattr(sctp, "_tether_unacked", 0) >= SACK_EVERY
            and sctp._association_state == RTCSctpTransport.State.ESTABLISHED):
        _run_now(sctp, sctp._send_sack())


# -- 2. _transmit without rescanning -------------------------------------------------------


def transmit_without_rescan() -> None:
    """aiortc's ``_transmit`` walks the whole sent queue (up to the 1 MiB receive window,
    ~900 chunks) looking for chunks marked for retransmission, on every SACK and every
    send, although chunks are only ever marked by a SACK with gap reports (the strike
    rule, RFC 4960 section 7.2.4), by T3 expiring (section 6.3.3), or by tether's
    ``resend_in_flight`` (which cancels T3 after marking).

    We keep a per-transport flag set on exactly those events (a SACK with gaps,
    ``_t3_expired``, ``_t3_cancel``, :func:`request_rescan`) and walk the queue only when
    it is set; the flag clears once a walk finds nothing left to resend. What is sent,
    and in which order, is unchanged: the same retransmissions before new data, the
    same burst limit (section 6.1 / 7.2.4) and T3 restarts. Upstream: aiortc keeps a
    count of chunks marked for retransmission and skips the walk at zero.
    """
    RTCSctpTransport._transmit = _transmit_flagged  # type: ignore[method-assign]
    RTCSctpTransport._receive_sack_chunk = _receive_sack_flagging  # type: ignore[method-assign]
    RTCSctpTransport._t3_expired = _t3_expired_flagging  # type: ignore[method-assign]
    RTCSctpTransport._t3_cancel = _t3_cancel_flagging  # type: ignore[method-assign]


def request_rescan(sctp: RTCSctpTransport) -> None:
    """Tell the patched ``_transmit`` that chunks were marked for retransmission by hand."""
    sctp._tether_rescan = True


async def _receive_sack_flagging(self: RTCSctpTransport, chunk: SackChunk) -> None:
    if chunk.gaps:
        self._tether_rescan = True
    await _originals["_receive_sack_chunk"](self, chunk)


def _t3_expired_flagging(self: RTCSctpTransport) -> None:
    self._tether_rescan = True
    _originals["_t3_expired"](self)


def _t3_cancel_flagging(self: RTCSctpTransport) -> None:
    self._tether_rescan = True
    _originals["_t3_cancel"](self)


async def _transmit_flagged(self: RTCSctpTransport) -> None:
    if self._forward_tsn_chunk is not None:
        await self._send_chunk(self._forward_tsn_chunk)
        self._forward_tsn_chunk = None
        if not self._t3_handle:
            self._t3_start()

    # Burst limit: 2 packets in fast recovery, else 4 (SCTP_MAX_BURST), of this
    # association's chunk size (path_mtu may have raised it).
    burst = (2 if self._fast_recovery_exit is not None else 4) * self._tether_data_max
    cwnd = min(self._flight_size + burst, self._cwnd)

    if getattr(self, "_tether_rescan", True):
        self._tether_rescan = False
        if not await _retransmit_marked(self, cwnd):
            self._tether_rescan = True  # stopped by the window: look again next time
            return

    outbound = self._outbound_queue
    while outbound and self._flight_size < cwnd:
        chunk = outbound.popleft()
        self._sent_queue.append(chunk)
        self._flight_size_increase(chunk)
        chunk._sent_count += 1
        chunk._sent_time = time.time()
        await self._send_chunk(chunk)
        if not self._t3_handle:
            self._t3_start()
    if _pacing[0] and outbound and self._flight_size < self._cwnd and (
            self._srtt is not None and self._srtt >= PACE_MIN_RTT):
        pace_rest(self)


async def _retransmit_marked(sctp: RTCSctpTransport, cwnd: int) -> bool:
    """Resend the chunks marked for retransmission, in TSN order; False if the
    congestion window stopped it before the end of the sent queue."""
    earliest = True
    for chunk in sctp._sent_queue:
        if chunk._retransmit:
            if sctp._fast_recovery_transmit:
                sctp._fast_recovery_transmit = False  # one resend regardless of cwnd
            elif sctp._flight_size >= cwnd:
                return False
            sctp._flight_size_increase(chunk)
            chunk._misses = 0
            chunk._retransmit = False
            chunk._sent_count += 1
            await sctp._send_chunk(chunk)
            if earliest:
                sctp._t3_restart()  # the earliest outstanding TSN was resent
        earliest = False
    return True


# -- 2a. what Max.Burst held back follows at the window's pace ----------------------------


def pace_bursts() -> None:
    """aiortc's ``_transmit`` sends at most Max.Burst (4) packets beyond the flight size
    per call (RFC 4960 section 6.1 D), and it is called when the application sends and
    when a SACK arrives. When the flight is small - the sender was waiting for the
    application, such as a tunnel stream waiting for its peer's credit - and then a large
    message is queued, the rest of it waits for SACKs: 4 packets, then a round trip,
    then 2 more per SACK, so a 60 KiB message (53 packets) takes about 4 round trips to
    leave although cwnd allows it at once. On the lab's 600 ms path that is 2.4 s per
    message, and a message is delivered only when it is complete.

    We keep the burst limit and pace what it held back instead: when ``_transmit``
    stopped at the burst limit with data queued and room in cwnd, another ``_transmit``
    runs after ``PACE_GAIN`` x the time the window takes for a burst (srtt x burst /
    cwnd, at least PACE_MIN), so the window is spent over about half a round trip, as a
    pacing TCP sender in slow start does (Linux paces at twice cwnd/srtt), and never as
    one line-rate burst. Only on a path whose smoothed round trip is PACE_MIN_RTT or
    more: on a shorter one the next SACK comes within a few ms anyway, and a timer only
    splits the bursts a receiver acknowledges together (on loopback, 0.37-0.44 SACKs
    per DATA packet became 0.41-0.46). One timer per association, cancelled when it
    closes. It is part of the ``_transmit`` that transmit_without_rescan installs
    (without that patch aiortc's own ``_transmit`` runs and nothing is paced).
    Upstream: the same pacing timer in aiortc's ``_transmit``.
    """
    _pacing[0] = True
    RTCSctpTransport._set_state = _set_state_cancelling  # type: ignore[method-assign]


_pacing = [False]  # pace_bursts is on (read by _transmit_flagged)
PACE_GAIN = 0.5
PACE_MIN = 0.001
PACE_MIN_RTT = 0.02
MAX_BURST = 4  # aiortc's SCTP_MAX_BURST packets


def pace_rest(sctp: RTCSctpTransport) -> None:
    """Arm the timer that sends the next burst, unless it is armed already."""
    if getattr(sctp, "_tether_pace_timer", None) is not None:
        return
    burst_bytes = MAX_BURST * sctp._tether_data_max
    delay = max(PACE_MIN, PACE_GAIN * sctp._srtt * burst_bytes / sctp._cwnd)
    sctp._tether_pace_timer = sctp._loop.call_later(delay, _pace_fired, sctp)


def _pace_fired(sctp: RTCSctpTransport) -> None:
    # A task, as aiortc's own T3 runs _transmit: a send may suspend (a TURN channel bind),
    # and a _transmit cut off there would leave a chunk counted in flight but never sent.
    sctp._tether_pace_timer = None
    if sctp._association_state == RTCSctpTransport.State.ESTABLISHED:
        _own_task(sctp, sctp._transmit())


# -- 2b. a SACK without gap blocks, handled inline ----------------------------------------


def sack_fast_path() -> None:
    """aiortc's ``_receive_sack_chunk`` pops each acknowledged chunk with two comparison
    calls (``uint32_gte`` -> ``uint32_gt``) and a ``_flight_size_decrease`` call per
    chunk, and tether's loss/rescan wrappers (transmit_without_rescan, batch_sends) add
    two coroutine layers per SACK, although nearly every SACK of a healthy stream has no
    gap blocks and only moves the cumulative TSN.

    For a SACK without gap blocks we run the same steps inline: ignore it if it is older
    than the last one, pop the chunks up to the cumulative TSN (the first popped one
    measures the RTT if it was sent once, Karn's rule), take the chunks still counted
    in flight out of the flight size, grow cwnd as aiortc does (slow start by at most
    one MTU, congestion avoidance by byte counting, only when cwnd was fully used;
    RFC 4960 section 7.2.1/7.2.2), leave fast recovery once the cumulative TSN reaches
    its exit point, cancel or restart T3 (section 6.3.2), then aiortc's own
    ``_update_advanced_peer_ack_point`` (unless nothing was abandoned: then it only
    moves the advanced peer ack point), ``_data_channel_flush`` (unless no message and
    no stream reset waits) and ``_transmit``.
    A SACK with gap blocks (loss) takes the full path (aiortc's code behind the
    wrappers). The state afterwards is the same as aiortc's (tested on random SACK
    sequences against it). Upstream: the same loop without helper calls in aiortc.
    """
    _sack_full_path.append(RTCSctpTransport._receive_sack_chunk)
    RTCSctpTransport._receive_sack_chunk = _receive_sack_fast  # type: ignore[method-assign]


_HALF = 0x80000000
_sack_full_path: list[Callable[..., Any]] = []  # the SACK handler sack_fast_path wraps


async def _receive_sack_fast(self: RTCSctpTransport, chunk: SackChunk) -> None:
    if chunk.gaps:
        await _sack_full_path[0](self, chunk)
        return
    cumulative = chunk.cumulative_tsn
    if 0 < (self._last_sacked_tsn - cumulative) % SCTP_TSN_MODULO < _HALF:
        return  # older than the last SACK (uint32_gt)
    received_time = time.time()
    self._last_sacked_tsn = cumulative
    cwnd_fully_utilized = self._flight_size >= self._cwnd
    done = 0
    done_bytes = 0
    flight = self._flight_size
    sent = self._sent_queue
    while sent and (cumulative - sent[0].tsn) % SCTP_TSN_MODULO < _HALF:  # uint32_gte
        schunk = sent.popleft()
        done += 1
        if not schunk._acked:
            done_bytes += schunk._book_size
        if schunk._in_flight:
            schunk._in_flight = False
            flight -= schunk._book_size
        if done == 1 and schunk._sent_count == 1:
            self._update_rto(received_time - schunk._sent_time)
    self._flight_size = flight

    exit_tsn = self._fast_recovery_exit
    if exit_tsn is None:
        if done and cwnd_fully_utilized:
            if self._cwnd <= self._ssthresh:
                self._cwnd += min(done_bytes, self._tether_data_max)  # one MTU at most
            else:
                self._partial_bytes_acked += done_bytes
                if self._partial_bytes_acked >= self._cwnd:
                    self._partial_bytes_acked -= self._cwnd
                    self._cwnd += self._tether_data_max
    elif (cumulative - exit_tsn) % SCTP_TSN_MODULO < _HALF:  # uint32_gte
        self._fast_recovery_exit = None

    if not sent:
        self._t3_cancel()
    elif done:
        self._t3_restart()
    outbound = self._outbound_queue
    if (self._forward_tsn_streams or (outbound and outbound[0]._abandoned)
            or (sent and sent[0]._abandoned)
            or 0 < (self._advanced_peer_ack_tsn - cumulative) % SCTP_TSN_MODULO <= _HALF):
        self._update_advanced_peer_ack_point()  # partial reliability has work to do
    else:  # what it does when nothing was abandoned
        self._advanced_peer_ack_tsn = cumulative
    if self._data_channel_queue or self._reconfig_queue:  # else it would do nothing
        await self._data_channel_flush()
    await self._transmit()


# -- 3. in-order fast path for received TSNs --------------------------------------------


def mark_received_fast() -> None:
    """aiortc's ``_mark_received`` sorts the out-of-order set and rebuilds the duplicate
    list and out-of-order set on every DATA chunk, even when nothing is out of order.

    When the chunk is the next TSN expected and nothing is out of order or duplicated,
    we only advance the cumulative TSN; every other case goes to aiortc's code. The
    result is the same state (RFC 4960 section 6.2: the cumulative TSN is the last TSN
    received in sequence). Upstream: the same early return in ``_mark_received``.
    """
    RTCSctpTransport._mark_received = _mark_received_fast  # type: ignore[method-assign]


def _mark_received_fast(self: RTCSctpTransport, tsn: int) -> bool:
    last = self._last_received_tsn
    if (last is not None and tsn == (last + 1) % SCTP_TSN_MODULO
            and not self._sack_misordered and not self._sack_duplicates):
        self._last_received_tsn = tsn
        return False
    return _originals["_mark_received"](self, tsn)


# -- 4. ICE check pacing ------------------------------------------------------------------


def paced_connect() -> None:
    """aioice's ``Connection.connect`` starts one connectivity check every 20 ms (its Ta).

    We start the first FAST_CHECKS checks FAST_CHECK_INTERVAL (5 ms) apart, then 20 ms
    apart as aioice does. RFC 8445 section 14.2 lets Ta go down to 5 ms for non-media
    traffic; a data channel is that. A trickled remote candidate therefore waits at most
    5 ms for its check instead of 20, which is most of a loopback or LAN connect.
    Everything else - pairing, unfreezing, early checks, completion, consent - is
    aioice's own code, called in aioice's order. Upstream: a configurable Ta in aioice.
    """
    Connection.connect = _connect_paced  # type: ignore[method-assign]


def check_interval(started: int) -> float:
    """Ta after ``started`` checks have started."""
    return FAST_CHECK_INTERVAL if started < FAST_CHECKS else CHECK_INTERVAL


def _checks_started(conn: Connection) -> int:
    idle = (CandidatePair.State.FROZEN, CandidatePair.State.WAITING)
    return sum(1 for pair in conn._check_list if pair.state not in idle)


async def _connect_paced(self: Connection) -> None:
    if not self._local_candidates_end:
        raise ConnectionError("Local candidates gathering was not performed")
    if self.remote_username is None or self.remote_password is None:
        raise ConnectionError("Remote username or password is missing")

    for remote_candidate in self._remote_candidates:
        self._pair_remote_candidate(remote_candidate)
    self.sort_check_list()
    self._unfreeze_initial()
    for early_check in self._early_checks:
        self.check_incoming(*early_check)
    self._early_checks.clear()
    self._early_checks_done = True

    while self._check_periodic():
        await asyncio.sleep(check_interval(_checks_started(self)))

    result = await self._check_list_state.get() if self._check_list else aioice.ice.ICE_FAILED
    for pair in self._check_list:
        if pair.task:
            pair.task.cancel()
    if result != aioice.ice.ICE_COMPLETED:
        raise ConnectionError("ICE negotiation failed")
    self._query_consent_task = asyncio.create_task(self.query_consent())


# -- 5. DTLS: no empty BIO read per received record --------------------------------------

DTLS_APPLICATION_DATA = 23  # DTLS 1.2 record content type (RFC 6347 section 4.1)


def dtls_quiet_receive() -> None:
    """aiortc's ``RTCDtlsTransport._recv_next`` calls ``_write_ssl`` after every record it
    decrypts, in case OpenSSL produced a record to send; ``_write_ssl`` then reads the
    outgoing memory BIO, which after application data is always empty, and pyOpenSSL
    signals an empty BIO by raising WantReadError: about 20 us per received datagram on
    this machine, for nothing.

    Once the handshake is done, we skip that read after a DTLS 1.2 application-data
    record (content type 23) that decrypted: reading application data never makes
    OpenSSL write (alerts, handshake messages, DTLS 1.3 records and failures still take
    aiortc's path, which reads the BIO as before). During the handshake aiortc's own
    method runs unchanged. Upstream: aiortc flushes only after handshake-type records
    (or checks BIO_ctrl_pending first).
    """
    RTCDtlsTransport._recv_next = _recv_next_quiet  # type: ignore[method-assign]


async def _recv_next_quiet(self: RTCDtlsTransport) -> None:
    if not self._RTCDtlsTransport__handshake_done:  # type: ignore[attr-defined]
        await _originals["dtls_recv_next"](self)
        return
    ice = self.transport
    await receive_datagram(self, await ice._recv(), quiet=True)
    path = ice.__dict__.get("_tether_path") if _drain[0] else None
    if path is not None:  # what else is queued, without a receive call each (receive_drained)
        for _ in range(DRAIN_MAX):
            data = path.recv_nowait()
            if data is None:
                break
            await receive_datagram(self, data, quiet=True)


def receive_drained() -> None:
    """aiortc's DTLS receive task calls ``_recv_next`` once per datagram: a coroutine that
    awaits the ICE transport's ``_recv`` (tether's IcePath.recv), which awaits its
    queue's ``get``: three coroutine layers per datagram, although uvloop hands over up
    to 32 datagrams per wakeup and they wait in that queue together.

    After the handshake (with dtls_quiet_receive), once ``_recv_next`` has handled the
    datagram it waited for, it handles up to DRAIN_MAX more that are already queued
    (``IcePath.recv_nowait``), each exactly as before (receive_datagram). The same
    datagrams are handled in the same order in the same loop step: ``Queue.get`` on a
    non-empty queue never suspends, so the task did not yield between them before
    either; a closed path still raises ConnectionError. Upstream: aiortc's receive loop
    drains what its transport has queued (an ``RTCIceTransport`` batch receive).
    """
    _drain[0] = True


_drain = [False]  # receive_drained is on (read by _recv_next_quiet)
DRAIN_MAX = 64  # datagrams handled per _recv_next call at most

# The most plaintext a DTLS 1.2 record carries (2^14). aiortc reads at most 1,500 bytes of
# a record; OpenSSL keeps the rest for the next read, so a larger record puts every read
# after it one record behind, for good. Ours read whole records (path_mtu relies on it).
RECORD_MAX = 16384


def reads_whole_records() -> bool:
    """Whether DTLS's receive path in use takes records of RECORD_MAX whole: tether's
    (dtls_quiet_receive), not aiortc's."""
    return RTCDtlsTransport._recv_next is _recv_next_quiet


async def receive_datagram(self: RTCDtlsTransport, data: bytes, quiet: bool) -> None:
    """One datagram after the DTLS handshake, as aiortc's ``_recv_next`` handles it;
    ``quiet``: skip the empty BIO read after application data (dtls_quiet_receive)."""
    self._RTCDtlsTransport__rx_bytes += len(data)  # type: ignore[attr-defined]
    self._RTCDtlsTransport__rx_packets += 1  # type: ignore[attr-defined]
    first_byte = data[0]
    if first_byte == DTLS_APPLICATION_DATA:
        layer = aiortc_fastpath.records(self)
        if layer is not None:
            plains = aiortc_fastpath.open_records(self, layer, data)
            if plains is not None:
                receiver = self._data_receiver
                if receiver:
                    handle = receiver._handle_data
                    inline = (_in_order[0]
                              and getattr(handle, "__func__", None) is _handle_data_burst_sack)
                    for plain in plains:
                        if inline:  # receive_in_order, without the _handle_data coroutine
                            taken = take_in_order(receiver, plain)
                            if taken is not None:
                                if taken:
                                    await receiver._send_sack()
                                continue
                        await handle(plain)
                return
    if 19 < first_byte < 64:  # DTLS
        self._ssl.bio_write(data)
        plain: bytes | None
        try:
            plain = self._ssl.recv(RECORD_MAX)  # aiortc reads 1,500: see path_mtu
        except rtcdtls.SSL.ZeroReturnError:
            plain = None
        except rtcdtls.SSL.Error:
            plain = b""
        if not quiet or first_byte != DTLS_APPLICATION_DATA or not plain:
            await self._write_ssl()
        if plain is None:
            raise ConnectionError  # the remote party shut DTLS down
        if plain and self._data_receiver:
            await self._data_receiver._handle_data(plain)
    elif 127 < first_byte < 192 and self._rx_srtp:  # SRTP / SRTCP, as aiortc does
        arrival_time_ms = rtcdtls.clock.current_ms()
        try:
            if rtcdtls.is_rtcp(data):
                await self._handle_rtcp_data(self._rx_srtp.unprotect_rtcp(data))
            else:
                await self._handle_rtp_data(self._rx_srtp.unprotect(data),
                                            arrival_time_ms=arrival_time_ms)
        except rtcdtls.pylibsrtp.Error as exc:
            logger.debug("SRTP unprotect failed: %s", exc)


# -- 6. STUN/DTLS demultiplexing by the first byte -----------------------------------------


def stun_demux() -> None:
    """aioice's ``StunProtocol.datagram_received`` tries to parse every datagram as STUN
    and hands it on as data when that raises ValueError: an exception per DTLS datagram.

    We hand a datagram whose first byte is 20-63 straight on as data: RFC 7983 section 7
    (RFC 5764 section 5.1.2) assigns that range to DTLS, and a STUN message's first byte
    is 0-3. Every other datagram goes through aioice's code as before. Upstream: the same
    check at the top of aioice's ``datagram_received``.
    """
    StunProtocol.datagram_received = _datagram_received_demux  # type: ignore[method-assign]


def _datagram_received_demux(self: StunProtocol, data: bytes | str, addr: tuple[Any, ...]) -> None:
    if data and 19 < data[0] < 64:  # type: ignore[operator]
        self.receiver.data_received(data, self.local_candidate.component)
        return
    _originals["stun_datagram_received"](self, data, addr)


# -- 7. a lazy T3 timer ------------------------------------------------------------------


def lazy_t3_restart() -> None:
    """aiortc restarts the T3-rtx timer on every SACK that acknowledges new data: cancel
    the TimerHandle, make a new one (RFC 4960 section 6.3.2 rule R3). The cancelled
    handles pile up in the loop's heap until their time comes.

    We keep one handle and move a deadline: a restart only records ``now + RTO``; when
    the handle fires before the deadline it re-arms for the rest, and only a due
    deadline runs aiortc's ``_t3_expired``. A restart whose deadline is earlier than the
    armed handle (the RTO shrank) re-arms at once, so T3 never fires later than aiortc's
    would; ``_t3_cancel`` and ``_t3_handle`` keep their meaning. Upstream: the same
    deadline timer in aiortc (TCP stacks do the same).
    """
    RTCSctpTransport._t3_start = _t3_start_lazy  # type: ignore[method-assign]
    RTCSctpTransport._t3_restart = _t3_restart_lazy  # type: ignore[method-assign]


def _t3_arm(sctp: RTCSctpTransport, delay: float) -> None:
    sctp._t3_handle = sctp._loop.call_later(delay, _t3_due, sctp)


def _t3_start_lazy(self: RTCSctpTransport) -> None:
    assert self._t3_handle is None
    self._tether_t3_deadline = self._loop.time() + self._rto
    _t3_arm(self, self._rto)


def _t3_restart_lazy(self: RTCSctpTransport) -> None:
    deadline = self._loop.time() + self._rto
    self._tether_t3_deadline = deadline
    handle = self._t3_handle
    if handle is None:
        _t3_arm(self, self._rto)
    elif deadline < handle.when():
        handle.cancel()
        _t3_arm(self, self._rto)


def _t3_due(sctp: RTCSctpTransport) -> None:
    remaining = sctp._tether_t3_deadline - sctp._loop.time()
    if remaining > 0.001:
        _t3_arm(sctp, remaining)
        return
    sctp._t3_expired()


# -- 8. reassembly only when a message can complete --------------------------------------


def reassemble_on_last_fragment() -> None:
    """aiortc's ``_receive_data_chunk`` scans the stream's whole reassembly list for
    complete messages after every DATA chunk (``InboundStream.pop_messages``): a message
    of n fragments costs n^2/2 steps (a 16 KiB tunnel frame is 14 fragments, a 64 KiB
    message 55).

    We skip the scan when the chunk was appended after every chunk already held and is
    not a message's last fragment: such a chunk cannot complete a message (the last
    fragment of any message it belongs to is still missing, and it fills no gap before
    a held chunk) and cannot unblock an ordered stream (only a delivered message moves
    the stream sequence number). Every other chunk - a last fragment, or one that arrived
    out of order - gets aiortc's scan, so messages come out exactly as before (RFC 4960
    section 6.9 reassembly). Upstream: the same check in ``_receive_data_chunk``.
    """
    RTCSctpTransport._receive_data_chunk = _receive_data_chunk_lazy  # type: ignore[method-assign]


async def _receive_data_chunk_lazy(self: RTCSctpTransport, chunk: DataChunk) -> None:
    self._sack_needed = True
    if self._mark_received(chunk.tsn):
        return  # a duplicate
    stream = self._get_inbound_stream(chunk.stream_id)
    held = stream.reassembly
    appended = not held or uint32_gt(chunk.tsn, held[-1].tsn)
    stream.add_chunk(chunk)
    self._advertised_rwnd -= len(chunk.user_data)
    if not appended or chunk.flags & SCTP_DATA_LAST_FRAG:
        for message in stream.pop_messages():
            self._advertised_rwnd += len(message[2])
            await self._receive(*message)
    await self._reset_deferred_streams()


# -- 13. the cyclic garbage collector less often -------------------------------------------


def gc_less_often() -> None:
    """CPython's cyclic garbage collector runs a generation-0 pass every 700 net container
    allocations (and older generations every 10 of those). The data path allocates dozens
    of container objects per 1200-byte packet (chunks, coroutine frames, tuples, lists),
    nearly all freed by reference counting at once, so a pass ran every few dozen packets
    only to find them gone: 4-5 % of each side's CPU in perf (gc_collect_main,
    visit_decref, visit_reachable).

    We raise the thresholds to ``runloop.GC_THRESHOLDS`` (generation 0 every 20000 net
    allocations, older generations every 50 and 100 of those), as ``tether serve`` does for
    the relay. Cycles are still collected, only later; what waits for a pass is bounded by
    the thresholds. The setting is process-wide: the core is what a tether process is for,
    and it is applied once, when the first aiortc core is made. Upstream: nothing in aiortc; this is an application's tuning knob
    (``gc.set_threshold``), as other long-running Python servers use it.
    """
    runloop.collect_less_often()


# -- 17. an in-order DATA packet taken in one call ----------------------------------------


def receive_in_order() -> None:
    """With the patches above, a received packet still goes ``_handle_data`` ->
    ``_receive_packet`` -> ``_receive_data_chunk`` -> ``_reset_deferred_streams``: four
    coroutines, a debug log call, a stream lookup and the SACK rule's attribute
    look-ups, for what in a stream is nearly always the same step - the next TSN, a
    fragment that is not a message's last, on an established association with nothing
    out of order.

    For exactly that packet (:func:`take_in_order`: one DATA chunk, this association's
    tag, the next TSN, no gap or duplicate pending, not a last fragment, a stream that
    exists, no stream reset waiting) we log it as aiortc does and make the same state
    changes in one plain call - the chunk appended to its stream, the cumulative TSN
    advanced, the window reduced, ``_sack_needed`` set - and apply sack_per_burst's rule
    (the same counters and timers, the SACK sent at once when the burst is full). A last
    fragment (a message completes: reassembly and delivery) and every other packet take
    the path above, so the state after each packet is what it would have been
    (tests/test_aiortc_speed.py compares them packet by packet). DTLS's receive path
    (:func:`receive_datagram`) calls it directly, without the ``_handle_data``
    coroutine. Upstream: aiortc's receive path gets a fast path for in-order chunks,
    as kernel SCTP and usrsctp have.
    """
    _in_order[0] = True


_in_order = [False]  # receive_in_order is on (read by _handle_data_burst_sack, receive_datagram)
_ESTABLISHED = RTCSctpTransport.State.ESTABLISHED


def take_in_order(sctp: RTCSctpTransport, data: bytes) -> bool | None:
    """Take ``data`` if it is the common in-order packet (see :func:`receive_in_order`):
    None if it was not taken (nothing changed), else whether a SACK is due now (the
    caller awaits ``_send_sack``)."""
    if (sctp._association_state is not _ESTABLISHED or sctp._sack_misordered
            or sctp._sack_duplicates or sctp._reconfig_deferred is not None):
        return None
    parsed = parse_single_data(data)
    if parsed is None:
        return None
    tag, chunk = parsed
    last = sctp._last_received_tsn
    if (tag != sctp._local_verification_tag or chunk.flags & SCTP_DATA_LAST_FRAG
            or last is None or chunk.tsn != (last + 1) % SCTP_TSN_MODULO):
        return None
    stream = sctp._inbound_streams.get(chunk.stream_id)
    if stream is None:
        return None
    sctp._RTCSctpTransport__log_debug("< %s", chunk)  # type: ignore[attr-defined]
    # _receive_data_chunk_lazy, for a chunk that is the next TSN and not a last fragment:
    # every chunk held has an earlier TSN (nothing is out of order), so it is appended.
    sctp._sack_needed = True
    sctp._last_received_tsn = chunk.tsn
    stream.reassembly.append(chunk)
    sctp._advertised_rwnd -= len(chunk.user_data)
    return not _sack_may_wait(sctp)  # sack_per_burst's rule (a packet of DATA only)


PATCHES: dict[str, Callable[[], None]] = {
    "delayed_sack": delayed_sack,
    "sack_per_burst": sack_per_burst,
    "transmit_without_rescan": transmit_without_rescan,
    "mark_received_fast": mark_received_fast,
    "paced_connect": paced_connect,
    "dtls_quiet_receive": dtls_quiet_receive,
    "stun_demux": stun_demux,
    "lazy_t3_restart": lazy_t3_restart,
    "reassemble_on_last_fragment": reassemble_on_last_fragment,
}

from . import aiortc_fastpath  # noqa: E402  (it uses this module's names at call time)

PATCHES["dtls_direct_records"] = aiortc_fastpath.dtls_direct_records
PATCHES["batch_sends"] = aiortc_fastpath.batch_sends
PATCHES["sack_fast_path"] = sack_fast_path  # after batch_sends: it wraps its SACK hook
PATCHES["gc_less_often"] = gc_less_often
PATCHES["receive_single_data"] = receive_single_data
PATCHES["send_data_direct"] = aiortc_fastpath.send_data_direct
PATCHES["receive_drained"] = receive_drained
PATCHES["receive_in_order"] = receive_in_order
PATCHES["pace_bursts"] = pace_bursts

from . import path_mtu  # noqa: E402  (the same)

PATCHES["path_mtu"] = path_mtu.path_mtu
