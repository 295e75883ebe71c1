"""Which local addresses aioice gathers host candidates on.

aioice skips 127.0.0.1 and ::1 (``aioice.ice.get_host_addresses``), so a host whose only
interface is loopback, or a test that must stay on loopback, gets no candidates. tether
wraps that function once; the wrapper reads a context variable set around gathering, so
each tube chooses its own addresses and nothing else in the process changes.

aioice also shrinks every UDP socket's receive buffer to 256 KiB, which drops datagrams
under load (DESIGN.md: 2-3 % retransmits); a 4 MiB buffer removed the loss.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import aioice.ice
import aioice.turn

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


def install() -> None:
    """Install the wrapper and the larger receive buffer (idempotent)."""
    aioice.ice.get_host_addresses = _get_host_addresses
    aioice.turn.UDP_SOCKET_BUFFER_SIZE = max(
        aioice.turn.UDP_SOCKET_BUFFER_SIZE, UDP_RECEIVE_BUFFER
    )


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
