"""Speed patches on aiortc's per-datagram data path (issue 9), registered in aiortc_speed.

- :func:`batch_sends`: the datagrams one ICE socket sends in a loop turn leave together,
  with UDP GSO on Linux (tether.cores.udp_batch).
- :func:`dtls_direct_records`: DTLS application-data records sealed and opened with
  cryptography's AESGCM (tether.cores.dtls_records) instead of through pyOpenSSL's BIOs.
- :func:`send_data_direct`: a DATA chunk serialised, sealed and queued on the ICE path in
  one call, without a coroutine per layer (needs the two above).

A third one, ``push_receive`` (received datagrams run through DTLS and SCTP on the socket
callback instead of IcePath's queue and DTLS's receive task), was removed: on uvloop it
cost more CPU per MB than the queue, with and without batched sends (docs/datapath.md).
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from google_crc32c import value as crc32c

from aiortc.rtcdtlstransport import SSL, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcsctptransport import DataChunk, RTCSctpTransport, SackChunk

from . import aiortc_speed, udp_batch
from .dtls_records import (
    APPLICATION_DATA,
    HEADER_SIZE,
    RecordLayer,
    record_seq,
    split_records,
)

logger = logging.getLogger(__name__)


# -- the datagrams of one loop turn sent together ------------------------------------------


def batch_sends() -> None:
    """aioice sends every datagram with its own ``transport.sendto``: a system call and
    the transport's layers per 1200-byte SCTP packet, although SCTP sends a burst per
    SACK (and a receiver a SACK for every second packet of a burst).

    We collect the datagrams one ICE socket sends in a loop turn and send them at the
    end of the turn (tether.cores.udp_batch): on Linux, a run of equal-sized datagrams
    to one address is one ``sendmsg`` with UDP GSO (``UDP_SEGMENT``), which the kernel
    cuts into the same datagrams in the same order; elsewhere, or when a socket refuses
    GSO, one ``sendto`` each as before. Correct because the wire sees the same datagrams
    in the same order (STUN sent on the socket flushes the batch first; a transport with
    a backlog gets the batch queued behind it), only up to one loop turn later, which
    SCTP and DTLS cannot tell from network delay. Liveness accounting is unchanged
    (IcePath counts a send when DTLS hands it over; fault injection drops it there). A
    TURN relay's datagrams keep aioice's path. After SCTP saw a loss (a SACK with gaps,
    T3 expiring) the path's sends are spread for udp_batch.SPREAD_AFTER_LOSS: a Linux
    router on the way drops a GSO send whole, and SCTP recovers from a lost burst much
    more slowly (the lab's packet_loss measured it). Upstream: aioice (or asyncio) gets a
    ``sendmsg``-based batched datagram send, as QUIC stacks (quiche, msquic) do.
    """
    udp_batch.enable()
    _before_batch["sack"] = RTCSctpTransport._receive_sack_chunk
    _before_batch["t3"] = RTCSctpTransport._t3_expired
    RTCSctpTransport._receive_sack_chunk = _receive_sack_noting_loss  # type: ignore[method-assign]
    RTCSctpTransport._t3_expired = _t3_expired_noting_loss  # type: ignore[method-assign]


_before_batch: dict[str, Any] = {}


def _note_loss(sctp: RTCSctpTransport) -> None:
    path = getattr(getattr(sctp.transport, "transport", None), "_tether_path", None)
    if path is not None:
        path.lost()


async def _receive_sack_noting_loss(self: RTCSctpTransport, chunk: SackChunk) -> None:
    if chunk.gaps:
        _note_loss(self)
    await _before_batch["sack"](self, chunk)


def _t3_expired_noting_loss(self: RTCSctpTransport) -> None:
    _note_loss(self)
    _before_batch["t3"](self)


# -- DTLS records sealed and opened with cryptography's AESGCM -----------------------------

_NO_LAYER = object()


def dtls_direct_records() -> None:
    """aiortc protects every SCTP packet through pyOpenSSL's memory BIOs: SSL_write and
    BIO_read to send, BIO_write and SSL_read to receive, each a cffi call with its error
    checks - most of the DTLS cost per datagram.

    Once the handshake is done and the suite is AES-GCM (what aiortc negotiates), we seal
    and open application-data records ourselves (tether.cores.dtls_records: RFC 5246 PRF,
    RFC 6347 records and replay window, RFC 5288 AES-GCM). Everything else - handshake,
    alerts, other suites, other epochs - stays with OpenSSL. Sending switches over only
    after a received record authenticated under our keys (proof they are right) and
    continues OpenSSL's sequence numbers; a record OpenSSL seals later (an alert, a
    handshake retransmission) is sealed again with our next sequence number, so the peer
    never sees the sequence go back. Upstream: aiortc could do the same (libwebrtc and
    Pion do their own DTLS record layer).
    """
    RTCDtlsTransport._send_data = _send_data_direct  # type: ignore[method-assign]
    RTCDtlsTransport._write_ssl = _write_ssl_tracking  # type: ignore[method-assign]


def records(dtls: RTCDtlsTransport) -> RecordLayer | None:
    """``dtls``'s record layer once the handshake is done (None: OpenSSL does it all)."""
    layer = dtls.__dict__.get("_tether_records", _NO_LAYER)
    if layer is not _NO_LAYER:
        return layer  # type: ignore[return-value]
    if ("dtls_direct_records" not in aiortc_speed.active_patches()
            or not dtls._RTCDtlsTransport__handshake_done):  # type: ignore[attr-defined]
        return None
    layer = None
    sent = dtls.__dict__.get("_tether_sent")
    ssl = dtls._ssl
    try:
        if sent is not None and sent[0] > 0 and ssl.get_protocol_version_name() == "DTLSv1.2":
            layer = RecordLayer.for_suite(
                ssl.get_cipher_name() or "", ssl.master_key(), ssl.client_random(),
                ssl.server_random(), dtls._role == "client", sent[0], sent[1] + 1)
    except Exception as exc:  # an SSL object without the secrets: OpenSSL keeps the work
        logger.debug("no direct DTLS records: %s", exc)
    dtls._tether_records = layer
    return layer


def open_records(dtls: RTCDtlsTransport, layer: RecordLayer, data: bytes) -> list[bytes] | None:
    """The plaintexts of a datagram of application-data records of ``layer``'s epoch
    (records that do not authenticate, or replays, are dropped), or None when OpenSSL
    must handle the datagram (other records, or keys not proven and this one fails)."""
    if len(data) > HEADER_SIZE and int.from_bytes(data[11:13], "big") == len(data) - HEADER_SIZE:
        parts = [data]  # the usual datagram: one record
    else:
        parts = split_records(data) or []
    if not parts:
        return None
    for record in parts:
        if record[0] != APPLICATION_DATA or record_seq(record)[0] != layer.epoch:
            return None
    out = []
    for record in parts:
        plain = layer.open(record)
        if plain is None and not layer.opened:
            # Our keys are not proven and this record fails under them: let OpenSSL
            # have this association's records from now on.
            logger.warning("DTLS records: own keys did not authenticate; using OpenSSL")
            dtls._tether_records = None
            return None
        if plain:
            out.append(plain)
    return out


async def _send_data_direct(self: RTCDtlsTransport, data: bytes) -> None:
    layer = records(self)
    if layer is None or not layer.opened or self._state != DtlsState.CONNECTED:
        await aiortc_speed._originals["dtls_send_data"](self, data)
        return
    if not self.__dict__.get("_tether_direct_send"):
        sent = self.__dict__.get("_tether_sent")
        if sent is not None and sent[0] == layer.epoch:
            layer.next_seq = max(layer.next_seq, sent[1] + 1)
        self._tether_direct_send = True
    record = layer.seal(APPLICATION_DATA, data)
    await self.transport._send(record)
    self._RTCDtlsTransport__tx_bytes += len(record)  # type: ignore[attr-defined]
    self._RTCDtlsTransport__tx_packets += 1  # type: ignore[attr-defined]


async def _write_ssl_tracking(self: RTCDtlsTransport) -> None:
    """aiortc's ``_write_ssl`` that notes the highest (epoch, sequence number) OpenSSL
    used, and once we seal records ourselves, seals OpenSSL's records of our epoch again."""
    try:
        data = self._ssl.bio_read(1500)
    except SSL.Error:
        data = b""
    if not data:
        return
    parts = split_records(data)
    if parts:
        layer = self.__dict__.get("_tether_records")
        if self.__dict__.get("_tether_direct_send") and layer:
            data = b"".join(
                (layer.reseal(r) or r) if record_seq(r)[0] == layer.epoch else r for r in parts)
        else:
            top = max(record_seq(r) for r in parts)
            sent = self.__dict__.get("_tether_sent")
            if sent is None or top > sent:
                self._tether_sent = top
    await self.transport._send(data)
    self._RTCDtlsTransport__tx_bytes += len(data)  # type: ignore[attr-defined]
    self._RTCDtlsTransport__tx_packets += 1  # type: ignore[attr-defined]


def give_back(dtls: RTCDtlsTransport) -> None:
    """This DTLS transport uses aiortc's own record path (unpatch)."""
    dtls._tether_records = None
    dtls._send_data = aiortc_speed._originals["dtls_send_data"].__get__(dtls, type(dtls))
    dtls._write_ssl = aiortc_speed._originals["dtls_write_ssl"].__get__(dtls, type(dtls))


# -- a DATA chunk serialised, sealed and handed to the path in one call --------------------

_DATA_PACKET = struct.Struct("!HHLLBBHLHHL")  # common header (checksum 0) + DATA chunk header
_CHECKSUM = struct.Struct("<L")
_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


def data_packet(sport: int, dport: int, tag: int, chunk: DataChunk) -> bytes:
    """The SCTP packet holding only ``chunk``: the same bytes as aiortc's
    ``serialize_packet(sport, dport, tag, chunk)`` (RFC 4960 sections 3.1, 3.3.1, CRC32c
    of appendix B over the packet with a zero checksum field)."""
    user_data = chunk.user_data
    length = 16 + len(user_data)
    body = _DATA_PACKET.pack(sport, dport, tag, 0, 0, chunk.flags, length, chunk.tsn,
                             chunk.stream_id, chunk.stream_seq, chunk.protocol)
    body += user_data
    if length & 3:
        body += _PAD[length & 3]
    return body[:8] + _CHECKSUM.pack(crc32c(body)) + body[12:]


def send_data_direct() -> None:
    """aiortc sends each DATA chunk through four coroutine layers: ``_send_chunk`` builds a
    ``serialize_packet`` (the chunk's ``bytes()``, the header, a concatenation for the
    checksum and one for the packet), awaits DTLS's ``_send_data`` (dtls_direct_records:
    seal), which awaits the ICE transport's ``_send`` (tether's IcePath: liveness), which
    awaits the socket protocol's ``send_data`` (batch_sends: queue the datagram).
    ``_send_chunk`` was 17 % of the sending side's samples, sealing 6 % and serialising
    4 % of it; the rest is those layers.

    For a DATA chunk, once DTLS records are sealed by us (dtls_direct_records) and the
    ICE path queues sends synchronously (batch_sends), we build the packet in one pack
    and one checksum (:func:`data_packet`, the same bytes as aiortc's), seal it, count
    it in DTLS's statistics and hand it to ``IcePath.send_now`` (the same liveness
    accounting and cut check as ``IcePath.send``), without a coroutine per layer. Every
    other chunk, and a DATA chunk before those conditions hold (handshake, OpenSSL
    records, TURN relays, no pair), takes aiortc's path. The wire sees the same
    datagrams in the same order. Upstream: aiortc serialises a one-chunk packet
    without the intermediate copies; the layer merge is tether's own (its layers).
    """
    _before_direct.setdefault("send_chunk", RTCSctpTransport._send_chunk)
    RTCSctpTransport._send_chunk = _send_chunk_direct  # type: ignore[method-assign]


# aiortc's _send_chunk (unpatch leaves this patch in place: give_back turns our records
# off, and without them every chunk takes this path).
_before_direct: dict[str, Any] = {}


async def _send_chunk_direct(self: RTCSctpTransport, chunk: Any) -> None:
    if type(chunk) is DataChunk:
        dtls = self._RTCSctpTransport__transport  # type: ignore[attr-defined]
        layer = dtls.__dict__.get("_tether_records")
        if (layer is not None and layer.opened and dtls.__dict__.get("_tether_direct_send")
                and dtls._state is DtlsState.CONNECTED):
            path = dtls.transport.__dict__.get("_tether_path")
            if path is not None:
                self._RTCSctpTransport__log_debug("> %s", chunk)  # type: ignore[attr-defined]
                record = layer.seal(APPLICATION_DATA, data_packet(
                    self._local_port, self._remote_port, self._remote_verification_tag, chunk))
                dtls._RTCDtlsTransport__tx_bytes += len(record)
                dtls._RTCDtlsTransport__tx_packets += 1
                if not path.send_now(record):
                    await path.send(record)
                return
    await _before_direct["send_chunk"](self, chunk)
