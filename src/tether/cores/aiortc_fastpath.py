"""The per-datagram receive path of aiortc, pushed instead of pulled (a speed patch).

aiortc receives with a loop: ``RTCDtlsTransport.__run`` awaits ``_recv_next``, which awaits
the ICE transport's ``_recv`` - for tether an asyncio.Queue that IcePath fills from the
socket callback. Every datagram therefore costs a queue put, a future resolved, a loop turn
and a task step through four coroutine frames before DTLS even sees it.

:func:`push_receive` lets the socket callback run DTLS and SCTP directly while the receive
loop is idle: IcePath's ``data_received`` calls :func:`_push` (IcePath.push), which decrypts
the record and runs SCTP's handler to its end right there - it normally never suspends (its
sends are UDP ``sendto`` calls). Order and error handling stay aiortc's:

- the loop arms the push only when it is idle and nothing is queued, so a pushed datagram
  never overtakes a queued one;
- a push whose handler does suspend disarms the push; a task (owned by the DTLS transport)
  finishes it, and the loop, which now gets the following datagrams from the queue, waits
  for that task before handling them;
- an exception in a pushed datagram is handed to the loop (IcePath.wake), which raises it
  where aiortc's ``_recv_next`` would have, so DTLS closes exactly as before;
- the handshake, DTLS stop, and a transport that :func:`tether.cores.aiortc_speed.unpatch`
  gave back to aiortc all stay on the queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from typing import Any

from aiortc.rtcdtlstransport import SSL, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState

from . import aiortc_speed
from .dtls_records import (
    APPLICATION_DATA,
    HEADER_SIZE,
    RecordLayer,
    record_seq,
    split_records,
)

logger = logging.getLogger(__name__)


def push_receive() -> None:
    """aiortc pulls every received datagram through a queue and its receive task
    (``RTCDtlsTransport._recv_next``).

    Once the DTLS handshake is done we push instead: the socket callback decrypts the
    record and runs the SCTP handler synchronously while the receive task is idle (see
    the module docstring for how order and errors are kept). DTLS (RFC 6347) and SCTP
    (RFC 4960) see the same datagrams in the same order; only the asyncio hop per
    datagram is gone. Upstream: aiortc's ICE transport hands datagrams to a DTLS callback
    (``datagram_received`` style) instead of a queue it polls.

    Opt-in (``TETHER_SPEED_PATCHES=all,push_receive``): on uvloop it measured 10-30 %
    *more* CPU per MB than the queue, with the same datagrams, SACKs and retransmissions
    (uvloop reads a burst of datagrams and the queued ones are then handled in one task
    step, which the push gives up); kept, tested, for asyncio's loop and further work.
    """
    RTCDtlsTransport._recv_next = _recv_next_push  # type: ignore[method-assign]


def _path(dtls: RTCDtlsTransport) -> Any:
    """The IcePath behind ``dtls`` (None for a bare aiortc ICE transport)."""
    return getattr(getattr(dtls, "transport", None), "_tether_path", None)


def _quiet() -> bool:
    return "dtls_quiet_receive" in aiortc_speed.active_patches()


def disarm(dtls: RTCDtlsTransport) -> None:
    """Send ``dtls``'s datagrams through the queue again (and stop any pushed handler)."""
    path = _path(dtls)
    if path is not None and path.push is getattr(dtls, "_tether_pusher", None):
        path.push = None
    pending: asyncio.Task[None] | None = getattr(dtls, "_tether_pushed", None)
    if pending is not None and not pending.done():
        pending.cancel()


async def _recv_next_push(self: RTCDtlsTransport) -> None:
    if not self._RTCDtlsTransport__handshake_done:  # type: ignore[attr-defined]
        await aiortc_speed._originals["dtls_recv_next"](self)
        return
    try:
        data = await self.transport._recv()
        pending: asyncio.Task[None] | None = getattr(self, "_tether_pushed", None)
        if pending is not None:
            await pending  # a pushed datagram's handler goes first (it never raises)
            self._tether_pushed = None
        error: BaseException | None = getattr(self, "_tether_push_error", None)
        if error is not None:
            self._tether_push_error = None
            raise error
        if data:  # b"" only wakes us (IcePath.wake)
            await aiortc_speed.receive_datagram(self, data, quiet=_quiet())
    except BaseException:
        disarm(self)
        raise
    path = _path(self)
    if path is not None and not path.queued and self._task is not None:
        pusher = getattr(self, "_tether_pusher", None)
        if pusher is None:
            pusher = self._tether_pusher = functools.partial(_push, self, path)
        path.push = pusher


def _push(dtls: RTCDtlsTransport, path: Any, data: bytes) -> None:
    """IcePath.push: handle one datagram now, on the socket callback."""
    if dtls._task is None or dtls._state != DtlsState.CONNECTED:  # stopping: aiortc's way
        path.push = None
        path.deliver(data)
        return
    coro = aiortc_speed.receive_datagram(dtls, data, quiet=_quiet())
    try:
        waiting = coro.send(None)
    except StopIteration:
        return
    except Exception as exc:
        _fail(dtls, path, exc)
        return
    # The handler suspended: queue what follows until a task has finished it.
    path.push = None
    dtls._tether_pushed = asyncio.ensure_future(_finish(dtls, path, coro, waiting))


async def _finish(dtls: RTCDtlsTransport, path: Any, coro: Coroutine[Any, Any, None],
                  waiting: Any) -> None:
    """Drive a suspended handler to its end, as its own task would have."""
    try:
        while True:
            if waiting is None:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False
                await asyncio.wait((waiting,))
            try:
                waiting = coro.send(None)
            except StopIteration:
                return
    except asyncio.CancelledError:
        coro.close()
        raise
    except Exception as exc:
        _fail(dtls, path, exc)


def _fail(dtls: RTCDtlsTransport, path: Any, exc: BaseException) -> None:
    """Hand a pushed datagram's exception to the receive loop, which raises it."""
    if not isinstance(exc, ConnectionError):
        logger.debug("DTLS receive failed on a pushed datagram", exc_info=exc)
    path.push = None
    dtls._tether_push_error = exc
    path.wake()


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
