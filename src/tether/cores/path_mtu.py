"""Path MTU discovery for aiortc's SCTP association: packets as large as the path carries.

aiortc cuts every message into DATA chunks of 1,160 bytes, so that an SCTP packet in its
DTLS record fits any path (1,189 bytes, as browsers do). Most of a tunnel's CPU is spent
per packet, not per byte (docs/datapath.md), and most paths carry more: 1,500-byte
Ethernet, 9,000-byte jumbo frames, 64 KiB on loopback between containers or processes
of one host. RFC 8261 section 5 asks DTLS/SCTP to find the path MTU by probing
(packetization-layer PMTUD, RFC 8899); aiortc does not, and neither do browsers.

How it works here (RFC 8899's search, in its simplest form):

- Once the association is established, a HEARTBEAT whose info is padded to a candidate
  packet size goes out; the peer's HEARTBEAT-ACK echoes the info, so an answer proves a
  packet of that size crossed the whole path and was taken by the peer's SCTP (any
  peer: every SCTP answers a HEARTBEAT). The chunk size then grows, and the next size
  is tried. A size unanswered after ``MAX_PROBES`` probes ends the search.
- A probe leaves alone, with Don't Fragment, whatever the kernel knows of the route
  (udp_batch ``send_probe``): a router on a smaller link drops it instead of cutting it,
  so an answer means the size really fits. The candidates are the Ethernet and jumbo
  plateaus and the local route's MTU, never above it, never above a DTLS record's 16 KiB.
- Data leaves without Don't Fragment (``let_routers_fragment``): if the path shrinks, a
  larger packet still arrives, cut by the router, until the search has caught up.
  SCTP cannot cut a chunk again, so this is what keeps chunks already cut at the larger
  size moving.
- While packets are above the base and data flows, the size in use is probed again
  every ``CONFIRM_EVERY`` seconds; unanswered, packets go back to the base at once and
  the search starts again below that size. A retransmission timeout at a larger size (a
  possible black hole) goes back to the base too, and searches again a little later.
- The path changes (ICE restart, network change, the path coming back): packets go
  back to the base size at once and the search starts again.
- Beyond 1,500 bytes only if the peer's SDP says it reads larger DTLS records whole
  (``a=x-tether-records:16384``, which tether's own receive path announces): aiortc as
  shipped reads 1,500 bytes of a record and, after a larger one, stays a record behind
  for good. Browsers and other peers are probed up to Ethernet's size.
- Over a TURN relay, without batched sends or where the route's MTU cannot be read (not
  Linux), nothing is probed: packets keep aiortc's size.

The timing (when to probe, when a probe is lost, when to search again, when to confirm)
is :class:`MtuSearch`, pure and tested with an injected clock; :class:`PathMtuProber` is
the I/O around it for one association.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Sequence
from typing import Any

from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    SCTP_DATA_UNORDERED,
    SCTP_MAX_PACKET_LENGTH,
    DataChunk,
    HeartbeatAckChunk,
    HeartbeatChunk,
    RTCSctpTransport,
    serialize_packet,
    tsn_plus_one,
)
from aiortc.utils import uint16_add

from . import sdp as sdp_rules
from .dtls_records import APPLICATION_DATA

logger = logging.getLogger(__name__)

BASE_PACKET = SCTP_MAX_PACKET_LENGTH  # aiortc's (and browsers') packet: fits any path
MAX_PACKET = 16384  # a DTLS 1.2 record carries at most 2^14 bytes of plaintext
SCTP_OVERHEAD = 12 + 16  # common header + DATA chunk header
DTLS_OVERHEAD = 13 + 8 + 16  # record header, explicit nonce, AES-GCM tag
UDP_OVERHEAD = 8
IP_OVERHEAD = {socket.AF_INET: 20, socket.AF_INET6: 40}
PLATEAUS = (1400, 1500, 9000)  # IP MTUs worth trying below the route's own (RFC 1191's spirit)

MAX_PROBES = 3  # probes of one size before it is taken as too large (a probe may be lost)
PROBE_TIMEOUT_MIN = 0.25  # s; a probe is lost after 3 smoothed round trips, at least this
PROBE_TIMEOUT_MAX = 3.0
PROBE_TIMEOUT_UNMEASURED = 1.0
SEARCH_AGAIN_AFTER = 600.0  # s after a size went unanswered (RFC 8899's PMTU_RAISE_TIMER)
SEARCH_AFTER_BLACK_HOLE = 5.0  # s after a retransmission timeout at a larger size
CONFIRM_EVERY = 10.0  # s between probes of the size in use while it is above the base

# Records a peer reads whole. aiortc as shipped reads 1,500 bytes of a record and is out of
# step for good after a larger one (aiortc_speed.RECORD_MAX), so a peer is probed beyond
# that only when its SDP says it reads more: tether's does, with its own receive path.
RECORDS_ATTRIBUTE = "x-tether-records"
UNANNOUNCED_MAX_PACKET = 1500

HEARTBEAT_INFO = 1  # the HEARTBEAT's Heartbeat Info parameter (RFC 4960 section 3.3.5)
PROBE_MARK = b"tether-pmtu\x00"
_PROBE = struct.Struct("!12sIQ")  # mark, packet size, nonce

IP_MTU = 14  # linux/in.h: the route's MTU of a connected socket
IPV6_MTU = 24  # linux/in6.h


def data_size(packet: int) -> int:
    """The user data one DATA chunk carries in an SCTP packet of ``packet`` bytes
    (chunks are padded to 4 bytes): 1,160 for the base packet."""
    return (packet - SCTP_OVERHEAD) // 4 * 4


def packet_sizes(route_mtu: int, family: int) -> tuple[int, ...]:
    """The SCTP packet sizes worth probing on a route of ``route_mtu`` bytes, ascending;
    empty if nothing above the base fits."""
    overhead = IP_OVERHEAD[family] + UDP_OVERHEAD + DTLS_OVERHEAD
    sizes = set()
    for mtu in (*PLATEAUS, route_mtu):
        packet = min(min(mtu, route_mtu) - overhead, MAX_PACKET) // 4 * 4
        if packet > BASE_PACKET:
            sizes.add(packet)
    return tuple(sorted(sizes))


def announce(sdp: str) -> str:
    """Our description, saying how large a record we read whole (when we do)."""
    from . import aiortc_speed  # (it imports this module)

    if not aiortc_speed.reads_whole_records():
        return sdp
    return sdp_rules.with_session_attribute(
        sdp, f"{RECORDS_ATTRIBUTE}:{aiortc_speed.RECORD_MAX}")


def peer_reads(sdp: str) -> int:
    """The largest SCTP packet the peer of this description reads whole."""
    value = sdp_rules.session_attribute(sdp, RECORDS_ATTRIBUTE)
    if value is not None and value.isdigit():
        return max(UNANNOUNCED_MAX_PACKET, min(int(value), MAX_PACKET))
    return UNANNOUNCED_MAX_PACKET


def probe_timeout(srtt: float | None) -> float:
    if srtt is None:
        return PROBE_TIMEOUT_UNMEASURED
    return min(PROBE_TIMEOUT_MAX, max(PROBE_TIMEOUT_MIN, 3 * srtt))


class MtuSearch:
    """When to probe which size, and what the answers (or their absence) mean. Pure."""

    def __init__(self) -> None:
        self.packet = BASE_PACKET  # the confirmed packet size, in use
        self.sizes: tuple[int, ...] = ()
        self.ceiling: int | None = None  # the smallest size that went unanswered...
        self.ceiling_until = 0.0  # ...until then (then it is tried again)
        self.trying: int | None = None  # the size being probed (``packet``: confirming)
        self.sent = 0  # probes of ``trying`` sent
        self.wake_at: float | None = None  # when tick() has something to do
        self.probes = 0
        self.answers = 0

    def restart(self, sizes: Sequence[int], now: float) -> None:
        """A new path (or the first): back to the base size, search ``sizes`` now."""
        self.packet = BASE_PACKET
        self.ceiling = None
        self.sizes = tuple(sorted(size for size in sizes if size > BASE_PACKET))
        self._search(now)

    def _search(self, now: float) -> None:
        """Probe the next size above the one in use (below the ceiling) now; with none
        left, confirm the size in use later, or rest at the base."""
        ceiling = self.ceiling if now < self.ceiling_until else None
        larger = [size for size in self.sizes
                  if size > self.packet and (ceiling is None or size < ceiling)]
        self.sent = 0
        if larger:
            self.trying, self.wake_at = larger[0], now
        elif self.packet > BASE_PACKET:
            self.trying, self.wake_at = None, now + CONFIRM_EVERY
        elif ceiling is not None:  # at the base, a size refused: try it again much later
            self.trying, self.wake_at = None, now + SEARCH_AGAIN_AFTER
        else:
            self.trying, self.wake_at = None, None

    @property
    def searching(self) -> bool:
        """Probing for a larger size (not confirming the one in use, not resting)."""
        return self.trying is not None and self.trying != self.packet

    def tick(self, now: float, timeout: float, sending: bool = True) -> int | None:
        """The size to probe now, if any (called at ``wake_at``). ``sending``: data left
        since the last tick (an idle association's size in use needs no confirming)."""
        if self.wake_at is None or now < self.wake_at:
            return None
        if self.trying is None:  # rested: confirm the size in use, or search again
            if self.packet > BASE_PACKET:
                if not sending:
                    self.wake_at = now + CONFIRM_EVERY
                    return None
                self.trying, self.sent = self.packet, 0
            else:
                self.ceiling = None
                self._search(now)
                if self.trying is None:
                    return None
        elif self.sent >= MAX_PROBES:  # the last of them went unanswered
            self.ceiling, self.ceiling_until = self.trying, now + SEARCH_AGAIN_AFTER
            if self.trying == self.packet:  # the size in use no longer fits: base now
                self.packet = BASE_PACKET
            self._search(now)
            if self.trying is None:
                return None
        self.sent += 1
        self.probes += 1
        self.wake_at = now + timeout
        return self.trying

    def answered(self, size: int, now: float) -> bool:
        """A probe of ``size`` came back; False if it is not the size being probed (a
        late answer to an earlier search says nothing now)."""
        if size != self.trying:
            return False
        self.packet = size
        self.answers += 1
        self._search(now)
        return True

    def black_hole(self, now: float) -> bool:
        """A retransmission timeout: if packets were larger than the base, they may no
        longer fit. Back to the base size; True if that changed it."""
        if self.packet == BASE_PACKET:
            return False
        self.packet = BASE_PACKET
        self.trying, self.sent = None, 0
        self.wake_at = now + SEARCH_AFTER_BLACK_HOLE
        return True


def route_mtu(remote_addr: tuple[Any, ...]) -> tuple[int, int] | None:
    """(this host's MTU on the route to ``remote_addr``, address family), or None where
    it cannot be read. A connected UDP socket sends nothing: connect() is a route lookup."""
    if not sys.platform.startswith("linux"):
        return None
    host, port = remote_addr[0], remote_addr[1]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port))
            if family == socket.AF_INET:
                return sock.getsockopt(socket.IPPROTO_IP, IP_MTU), family
            return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU), family
    except OSError:
        return None


class PathMtuProber:
    """One association's search: sends the probes, takes the answers, sets the size."""

    def __init__(self, sctp: RTCSctpTransport) -> None:
        self.sctp = sctp
        self.search = MtuSearch()
        self._loop = sctp._loop
        self._timer: Any = None
        self._nonce = int.from_bytes(os.urandom(8), "big")
        self._reported = BASE_PACKET
        self._sent_at = 0.0
        self._tsn_seen: int | None = None  # the next TSN at the last wake
        self.rtt: float | None = None  # the last answered probe's round trip

    @property
    def packet(self) -> int:
        return self.search.packet

    def start(self) -> None:
        """Search the current path from the base size (on establishment and on every
        path change)."""
        sizes: tuple[int, ...] = ()
        found = self._probe_path()
        if found is not None:
            batch, remote = found
            route = route_mtu(remote)
            peer = self.sctp.__dict__.get("_tether_peer_reads", UNANNOUNCED_MAX_PACKET)
            if route is not None and batch.let_routers_fragment():
                sizes = tuple(size for size in packet_sizes(*route) if size <= peer)
        self._nonce += 1  # answers to an earlier search's probes are ignored
        self.search.restart(sizes, self._loop.time())
        self._apply()
        self._arm()

    def keep_base(self) -> None:
        """aiortc's packet size from now on, nothing probed (until the path changes)."""
        self.search.restart((), self._loop.time())
        self._apply()
        self._arm()

    def black_hole(self) -> None:
        if self.search.black_hole(self._loop.time()):
            self._apply()
            self._arm()

    def answered(self, info: bytes) -> bool:
        """A HEARTBEAT-ACK's info: True if it was one of our probes."""
        if len(info) < _PROBE.size or not info.startswith(PROBE_MARK):
            return False
        _, size, nonce = _PROBE.unpack_from(info)
        now = self._loop.time()
        if nonce == self._nonce and self.search.answered(size, now):
            self.rtt = now - self._sent_at
            self._apply()
            self._arm()
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _apply(self) -> None:
        """Cut messages at the size in use; say so when it settles on a new one."""
        packet = self.search.packet
        self.sctp._tether_data_max = data_size(packet)  # type: ignore[attr-defined]
        if not self.search.searching and packet != self._reported:
            self._reported = packet
            logger.info("path MTU: %d-byte SCTP packets%s", packet,
                        " (aiortc's size)" if packet == BASE_PACKET else "")

    def _arm(self) -> None:
        self.stop()
        if self.search.wake_at is not None:
            self._timer = self._loop.call_at(self.search.wake_at, self._wake)

    def _wake(self) -> None:
        self._timer = None
        if self.sctp._association_state != RTCSctpTransport.State.ESTABLISHED:
            return
        srtt = self.sctp._srtt  # None until SCTP has timed a DATA chunk
        tsn, self._tsn_seen = self._tsn_seen, self.sctp._local_tsn
        size = self.search.tick(self._loop.time(), probe_timeout(
            srtt if srtt is not None else self.rtt), sending=tsn != self._tsn_seen)
        self._apply()  # a size in use that went unanswered is dropped here
        if size is not None:
            self._send_probe(size)
        self._arm()

    def _probe_path(self) -> tuple[Any, tuple[str, int]] | None:
        """(the SendBatch, the far end) probes go through, with DTLS records sealed by
        tether; None where probing cannot work (see the module's docstring)."""
        dtls = self.sctp.transport
        path = dtls.transport.__dict__.get("_tether_path")
        layer = dtls.__dict__.get("_tether_records")
        if (path is None or layer is None or not layer.opened
                or dtls.state != "connected"):
            return None
        return path.probe_batch()

    def _send_probe(self, size: int) -> None:
        """Seal a probe of ``size`` and send it alone with Don't Fragment (one that
        cannot leave is lost like one dropped on the way)."""
        found = self._probe_path()
        if found is None:
            return
        batch, remote = found
        sctp = self.sctp
        packet = serialize_packet(sctp._local_port, sctp._remote_port,
                                  sctp._remote_verification_tag, self.probe_chunk(size))
        dtls = sctp.transport
        record = dtls._tether_records.seal(APPLICATION_DATA, packet)
        self._sent_at = self._loop.time()
        if batch.send_probe(record, remote):
            dtls._RTCDtlsTransport__tx_bytes += len(record)
            dtls._RTCDtlsTransport__tx_packets += 1

    def probe_chunk(self, size: int) -> HeartbeatChunk:
        """A HEARTBEAT that makes an SCTP packet of exactly ``size`` bytes."""
        info = _PROBE.pack(PROBE_MARK, size, self._nonce)
        padding = size - 12 - 4 - 4 - len(info)  # common header, chunk header, parameter
        chunk = HeartbeatChunk()
        chunk.params = [(HEARTBEAT_INFO, info + bytes(padding))]
        return chunk


def prober(sctp: RTCSctpTransport) -> PathMtuProber | None:
    return sctp.__dict__.get("_tether_pmtu")


def path_changed(sctp: RTCSctpTransport) -> None:
    """The ICE path changed or came back: packets of the base size until the new path
    has been probed."""
    found = prober(sctp)
    if found is not None and sctp._association_state == RTCSctpTransport.State.ESTABLISHED:
        found.start()


# -- the patch ---------------------------------------------------------------------------

_wrapped: dict[str, Any] = {}


def path_mtu() -> None:
    """Install the search: messages are cut at the association's size (``_send``), the
    search starts when the association is established and stops when it closes
    (``_set_state``), HEARTBEAT-ACKs reach it (``_receive_chunk``, which aiortc ends
    with nothing for them), and a retransmission timeout is a possible black hole
    (``_t3_expired``). Upstream: the same in aiortc's RTCSctpTransport, with the base
    size as today's constant."""
    for name in ("_set_state", "_receive_chunk", "_t3_expired"):
        _wrapped[name] = getattr(RTCSctpTransport, name)
    RTCSctpTransport._send = _send_sized  # type: ignore[method-assign]
    RTCSctpTransport._set_state = _set_state_probing  # type: ignore[method-assign]
    RTCSctpTransport._receive_chunk = _receive_chunk_probing  # type: ignore[method-assign]
    RTCSctpTransport._t3_expired = _t3_expired_probing  # type: ignore[method-assign]


def _set_state_probing(self: RTCSctpTransport, state: Any) -> None:
    _wrapped["_set_state"](self, state)
    if state == RTCSctpTransport.State.ESTABLISHED and prober(self) is None:
        self.__dict__["_tether_pmtu"] = found = PathMtuProber(self)
        found.start()
    elif state == RTCSctpTransport.State.CLOSED and (found := prober(self)) is not None:
        found.stop()


def _receive_chunk_probing(self: RTCSctpTransport, chunk: Any) -> Awaitable[None]:
    # A plain function handing back aiortc's coroutine: every SACK a sender receives
    # comes through here, and must not cost a coroutine more.
    if type(chunk) is HeartbeatAckChunk and (found := prober(self)) is not None:
        for kind, value in chunk.params:
            if kind == HEARTBEAT_INFO and found.answered(value):
                return _taken()
    return _wrapped["_receive_chunk"](self, chunk)  # type: ignore[no-any-return]


async def _taken() -> None:
    """A probe's answer, taken: nothing more to do with the chunk."""


def _t3_expired_probing(self: RTCSctpTransport) -> None:
    found = prober(self)
    if found is not None:
        found.black_hole()
    _wrapped["_t3_expired"](self)


async def _send_sized(
    self: RTCSctpTransport,
    stream_id: int,
    pp_id: int,
    user_data: bytes,
    expiry: float | None = None,
    max_retransmits: int | None = None,
    ordered: bool = True,
) -> None:
    """aiortc's ``_send`` (a message cut into DATA chunks, queued, then ``_transmit``),
    cutting at this association's chunk size instead of the module's constant."""
    stream_seq = self._outbound_stream_seq.get(stream_id, 0) if ordered else 0
    cut = self._tether_data_max  # type: ignore[attr-defined]
    length = len(user_data)
    fragments = -(-length // cut)  # math.ceil, as aiortc
    queue = self._outbound_queue
    tsn = self._local_tsn
    for fragment in range(fragments):
        chunk = DataChunk()
        flags = 0 if ordered else SCTP_DATA_UNORDERED
        if fragment == 0:
            flags |= SCTP_DATA_FIRST_FRAG
        if fragment == fragments - 1:
            flags |= SCTP_DATA_LAST_FRAG
        chunk.flags = flags
        chunk.tsn = tsn
        chunk.stream_id = stream_id
        chunk.stream_seq = stream_seq
        chunk.protocol = pp_id
        chunk.user_data = data = user_data[fragment * cut:(fragment + 1) * cut]
        chunk._abandoned = False
        chunk._acked = False
        chunk._book_size = len(data)
        chunk._expiry = expiry
        chunk._in_flight = False
        chunk._max_retransmits = max_retransmits
        chunk._misses = 0
        chunk._retransmit = False
        chunk._sent_count = 0
        chunk._sent_time = None
        tsn = tsn_plus_one(tsn)
        queue.append(chunk)
    self._local_tsn = tsn
    if ordered:
        self._outbound_stream_seq[stream_id] = uint16_add(stream_seq, 1)
    await self._transmit()
