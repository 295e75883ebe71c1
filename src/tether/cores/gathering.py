"""Which local addresses aioice gathers host candidates on.

aioice skips 127.0.0.1 and ::1 (``aioice.ice.get_host_addresses``), so a host whose only
interface is loopback, or a test that must stay on loopback, gets no candidates. tether
wraps that function once; the wrapper reads a context variable set around gathering, so
each tube chooses its own addresses and nothing else in the process changes.

aioice also shrinks every UDP socket's receive buffer to 256 KiB, which drops datagrams
under load (measured: 2-3 % retransmits); a 4 MiB buffer removed the loss.

And aioice's mDNS resolver drops every answer dnspython cannot parse, which includes
Chromium's (see mdns.py), so a browser's ``.local`` host candidates never resolved. The
installed receive handler reads the A/AAAA records of responses with mdns.py and hands
queries to aioice as before; the addresses are cached for their TTL, since a responder
answers the same name at most once a second and every ICE restart asks again.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import aioice.ice
import aioice.mdns
import aioice.turn
import dns.exception
import dns.name

from . import mdns

logger = logging.getLogger(__name__)

UDP_RECEIVE_BUFFER = 4 * 1024 * 1024

# None: aioice's own choice. A tuple: exactly these addresses.
_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "tether_host_addresses", default=None
)

_aioice_get_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _host_addresses.get()
    if chosen is None:
        return _aioice_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


_aioice_mdns_received = aioice.mdns.MDnsProtocol.datagram_received


_aioice_mdns_resolve = aioice.mdns.MDnsProtocol.resolve
# Every address seen in an mDNS answer, for its TTL (one process, one event loop at a time).
MDNS_CACHE = mdns.AddressCache()


def _mdns_received(protocol: aioice.mdns.MDnsProtocol, data: bytes, addr: tuple[Any, ...]) -> None:
    """aioice's mDNS receive handler, with responses read by mdns.parse_addresses."""
    if not mdns.is_response(data):
        _aioice_mdns_received(protocol, data, addr)
        return
    try:
        records = mdns.parse_addresses(data)
    except mdns.MdnsFormatError as exc:
        logger.debug("mDNS answer from %s not readable: %s", addr, exc)
        return
    now = time.monotonic()
    for record in records:
        MDNS_CACHE.learn(record, now)
        if record.ttl <= 0 or ipaddress.ip_address(record.address).is_unspecified:
            continue
        try:
            key = dns.name.from_text(record.name)
        except dns.exception.DNSException:
            continue
        for future in protocol.queries.pop(key, ()):
            if not future.done():
                future.set_result(record.address)


async def _mdns_resolve(protocol: aioice.mdns.MDnsProtocol, hostname: str,
                        timeout: float | None = 1.0) -> str | None:
    """aioice's resolve, answered from MDNS_CACHE when the name was seen recently."""
    cached = MDNS_CACHE.lookup(hostname, time.monotonic())
    if cached is not None:
        return cached
    return await _aioice_mdns_resolve(protocol, hostname, timeout)


def install() -> None:
    """Install the wrapper, the larger receive buffer and the mDNS answer reader
    (idempotent)."""
    aioice.ice.get_host_addresses = _get_host_addresses
    aioice.turn.UDP_SOCKET_BUFFER_SIZE = max(
        aioice.turn.UDP_SOCKET_BUFFER_SIZE, UDP_RECEIVE_BUFFER
    )
    aioice.mdns.MDnsProtocol.datagram_received = _mdns_received  # type: ignore[method-assign]
    aioice.mdns.MDnsProtocol.resolve = _mdns_resolve  # type: ignore[method-assign]


@contextlib.contextmanager
def host_addresses(addresses: Sequence[str] | None) -> Iterator[None]:
    """Gather host candidates on ``addresses`` (None: every interface, as aioice does)."""
    install()
    token = _host_addresses.set(tuple(addresses) if addresses is not None else None)
    try:
        yield
    finally:
        _host_addresses.reset(token)


LOOPBACK = ("127.0.0.1",)
