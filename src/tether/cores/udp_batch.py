"""The datagrams one ICE socket sends in a loop turn, sent with as few system calls as possible.

SCTP sends a burst of packets per SACK (and a receiver a SACK per second packet of a
burst); each went out as its own ``sendto``, a system call plus two transport layers per
1200-byte datagram. A :class:`SendBatch` collects the datagrams of one loop turn for one
socket and sends them at the end of the turn (``call_soon``):

- on Linux with UDP GSO (``UDP_SEGMENT``, kernel 4.18+), a run of datagrams of equal size
  to the same address (the last may be shorter) is one ``sendmsg``; the kernel cuts it
  into the same datagrams, in order;
- elsewhere, after the socket refused GSO once (EINVAL, EIO, ENOPROTOOPT, EOPNOTSUPP),
  and for SPREAD_AFTER_LOSS after the path lost a packet (:meth:`SendBatch.lost`), each
  datagram goes through the transport's own ``sendto`` as before.

Order is kept with everything else written on the socket: the owner flushes before any
other write (STUN), and when the transport has a backlog (its buffer is not empty) or
``sendmsg`` would block, the rest goes through ``transport.sendto``, which queues behind
that backlog. Nothing blocks: the socket is non-blocking and a refused run falls back to
the transport. Every batch is bounded (``MAX_PENDING``: flushed at once when reached).

The socket is a duplicate of the transport's descriptor (uvloop's and asyncio's socket
wrappers have no ``sendmsg``). Datagrams handed over before the transport was closed (a
DTLS close_notify, an SCTP ABORT on the way out) still leave through it; it is closed with
the transport (``close``, or by the first flush that finds the transport closing), so it
never outlives the transport's port.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import sys
from typing import Any

from aioice.turn import TurnTransport

logger = logging.getLogger(__name__)

UDP_SEGMENT = 103  # linux/udp.h: the segment size of a GSO send (level SOL_UDP)
MAX_SEGMENTS = 32  # the kernel takes 64 (UDP_MAX_SEGMENTS); a burst is rarely longer
MAX_BYTES = 60000  # below the 65507 a UDP datagram (and so a GSO send) may carry
MAX_PENDING = 256  # datagrams held in one turn before a flush is forced
# After the path lost a packet, sends are spread (one datagram per sendto) this long: a
# Linux router or firewall on the way (containers, VMs, the lab's namespaces) sees a GSO
# send before it is cut into datagrams and drops it whole, and SCTP recovers from a
# burst of lost packets much more slowly than from the same number spread out.
SPREAD_AFTER_LOSS = 2.0
GSO_REFUSED = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})

# Don't Fragment (linux/in.h, linux/in6.h): "don't" lets routers cut a datagram larger
# than their link; "probe" sets DF whatever MTU the kernel has learned for the route.
MTU_DISCOVER = {socket.AF_INET: (socket.IPPROTO_IP, 10),
                socket.AF_INET6: (socket.IPPROTO_IPV6, 23)}
PMTUDISC_DONT, PMTUDISC_PROBE = 0, 3

Addr = tuple[Any, ...]

_enabled = False


def enable(on: bool = True) -> None:
    """Batch the sends of ICE paths wrapped from now on (the ``batch_sends`` speed patch)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def gso_supported(sock: socket.socket) -> bool:
    """Whether ``sock`` takes UDP_SEGMENT (asked once per socket)."""
    if not sys.platform.startswith("linux") or sock.type != socket.SOCK_DGRAM:
        return False
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


class SendBatch:
    """The datagrams of one loop turn for one datagram transport (see the module docstring)."""

    def __init__(self, transport: asyncio.DatagramTransport, sock: socket.socket | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._sock = sock
        self._loop = loop
        self._pending: list[tuple[bytes, Addr]] = []
        self._scheduled = False
        self.gso = sock is not None and gso_supported(sock)
        self.spread_until = 0.0  # loop time: no GSO before it (see SPREAD_AFTER_LOSS)
        self.datagrams = 0  # sent through this batch
        self.gso_sends = 0  # sendmsg calls that carried more than one datagram
        self.gso_datagrams = 0

    @classmethod
    def for_transport(cls, transport: Any) -> SendBatch | None:
        """A batch for a plain UDP transport; None for anything else (a TURN relay's
        transport, a stream, a closing transport)."""
        if (isinstance(transport, TurnTransport)  # its socket leads to the TURN server
                or not callable(getattr(transport, "get_write_buffer_size", None))
                or transport.is_closing()):
            return None
        raw = transport.get_extra_info("socket")
        if raw is None or raw.type != socket.SOCK_DGRAM:
            return None
        sock: socket.socket | None = None
        try:
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
        except OSError as exc:
            logger.debug("no own descriptor for %s: %s", raw, exc)
            if sock is not None:
                sock.close()
            sock = None
        return cls(transport, sock, asyncio.get_running_loop())

    def add(self, data: bytes, addr: Addr) -> None:
        """Send ``data`` to ``addr`` at the end of this loop turn (dropped, as the transport
        would drop it, once the transport is closing)."""
        if self._transport.is_closing():
            return
        pending = self._pending
        pending.append((data, addr))
        if len(pending) >= MAX_PENDING:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def probes_possible(self) -> bool:
        """Whether :meth:`send_probe` can work here (Linux, our own descriptor)."""
        return (self._sock is not None and sys.platform.startswith("linux")
                and self._sock.family in MTU_DISCOVER)

    def let_routers_fragment(self) -> bool:
        """No Don't Fragment bit on this socket's datagrams from now on (path_mtu): a
        datagram cut for a larger path than the one it meets still arrives, in pieces,
        instead of being dropped where no "fragmentation needed" comes back."""
        if not self.probes_possible():
            return False
        assert self._sock is not None
        level, name = MTU_DISCOVER[self._sock.family]
        try:
            self._sock.setsockopt(level, name, PMTUDISC_DONT)
        except OSError as exc:
            logger.debug("cannot clear Don't Fragment: %s", exc)
            return False
        return True

    def send_probe(self, data: bytes, addr: Addr) -> bool:
        """Send ``data`` now, alone and with Don't Fragment, whatever the kernel knows of
        the route: a router on a smaller link drops it, so its answer proves the size
        fits. After what this turn collected (it may overtake datagrams queued behind a
        full socket buffer: harmless for a probe); False if it could not leave (larger
        than the local link, a full buffer)."""
        if not self.probes_possible() or self._transport.is_closing():
            return False
        self.flush()
        sock = self._sock
        assert sock is not None
        level, name = MTU_DISCOVER[sock.family]
        try:
            before = sock.getsockopt(level, name)
            sock.setsockopt(level, name, PMTUDISC_PROBE)
            try:
                sock.sendto(data, addr)
            finally:
                sock.setsockopt(level, name, before)
        except OSError as exc:
            logger.debug("probe of %d bytes not sent: %s", len(data), exc)
            return False
        return True

    def lost(self) -> None:
        """The path lost a packet: spread sends for SPREAD_AFTER_LOSS."""
        self.spread_until = self._loop.time() + SPREAD_AFTER_LOSS

    def flush(self) -> None:
        """Send what this turn collected, in order."""
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        transport = self._transport
        if transport.is_closing():
            self._send_closing(pending)
            return
        self.datagrams += len(pending)
        count = len(pending)
        # One sendto each: no GSO, a backlog to queue behind, or a sendto replaced on the
        # transport (a delay hook) that every datagram must go through.
        if (not self.gso or count == 1 or transport.get_write_buffer_size()
                or self._loop.time() < self.spread_until
                or "sendto" in getattr(transport, "__dict__", ())):
            for data, addr in pending:
                transport.sendto(data, addr)
            return
        i = 0
        while i < count:
            data, addr = pending[i]
            size = total = len(data)
            j = i + 1
            while j < count and j - i < MAX_SEGMENTS:
                more, to = pending[j]
                if to != addr or len(more) > size or total + len(more) > MAX_BYTES:
                    break
                total += len(more)
                j += 1
                if len(more) < size:  # a shorter datagram ends a run
                    break
            if j - i == 1:
                transport.sendto(data, addr)
            elif not self._send_run([d for d, _ in pending[i:j]], size, addr):
                for data, addr in pending[i:]:  # queued behind the transport's backlog
                    transport.sendto(data, addr)
                return
            i = j

    def _send_run(self, run: list[bytes], size: int, addr: Addr) -> bool:
        """One GSO sendmsg; False when it must go through the transport instead."""
        assert self._sock is not None
        try:
            self._sock.sendmsg(run, [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", size))],
                               0, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in GSO_REFUSED:
                logger.debug("UDP GSO refused (%s): one sendto per datagram from now on", exc)
                self.gso = False
            return False  # any other error: the transport reports it as it always did
        self.gso_sends += 1
        self.gso_datagrams += len(run)
        return True

    def _send_closing(self, pending: list[tuple[bytes, Addr]]) -> None:
        """The transport was closed after these datagrams were handed over (a DTLS
        close_notify, an SCTP ABORT): they leave through our descriptor, as they would
        have left before the close without batching; then it is closed too."""
        sock = self._sock
        if sock is not None:
            for data, addr in pending:
                try:
                    sock.sendto(data, addr)
                except OSError:
                    break
        self.close()

    def close(self) -> None:
        """Drop what is pending and close the duplicate descriptor (the transport closes)."""
        self._pending = []
        self.gso = False
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
