"""The relay's abuse limits: what one client address, and everyone together, may use.

Pure bookkeeping with an injected clock (tests never sleep): :class:`TokenBucket` for rates,
:class:`BucketTable` for one bucket per address (bounded: least recently used addresses are
forgotten, which at worst gives them a fresh budget), :func:`address_key` to group
addresses (an IPv6 client controls a whole /64, so that is one "address").
:class:`RelayLimits` holds every limit of :class:`~tether.signaling.server.SignalingServer`
with its default; the server docstring explains each.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class RelayLimits:
    """Every abuse limit of the relay (per client address and in total)."""

    max_connections: int = 2_000
    max_connections_per_address: int = 32
    max_conversations: int = 10_000
    max_conversations_per_address: int = 32
    max_conversations_per_connection: int = 64
    """Conversations one multiplexed connection (``/?mux=1``) may join at once."""
    max_held: int = 256
    """Held signals per conversation (the other peer is absent)."""
    max_held_bytes: int = 1024 * 1024
    """Held bytes per conversation."""
    max_held_total: int = 100_000
    max_held_total_bytes: int = 64 * 1024 * 1024
    held_ttl: float = 600.0
    """Held signals older than this are dropped (their sender resends when the peer joins)."""
    join_rate: float = 5.0
    """Accepted handshakes per second per address (token bucket refill) ..."""
    join_burst: int = 20
    """... and its bucket size."""
    total_join_rate: float = 500.0
    total_join_burst: int = 1_000
    failed_auth_rate: float = 0.2
    """Wrong-token attempts per second per address, after a burst of ``failed_auth_burst``."""
    failed_auth_burst: int = 5
    connection_retry_after: float = 10.0
    """Retry-After sent when a connection limit is reached (no rate to derive it from)."""
    tracked_addresses: int = 65_536
    """Addresses remembered per bucket table (bounded memory)."""
    expire_interval: float = 30.0
    """How often the relay drops expired held signals."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"RelayLimits.{name} must be a positive number, not {value!r}")


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a take that finds none is refused."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0: one is available now). Takes nothing."""
        self._refill(now)
        if self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Take a token: 0.0 if taken, else the seconds to wait (nothing taken)."""
        delay = self.wait(now)
        if delay == 0.0:
            self.tokens -= 1
        return delay

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class BucketTable:
    """One :class:`TokenBucket` per key, at most ``max_keys`` of them (LRU)."""

    def __init__(self, rate: float, burst: float, clock: Clock, max_keys: int = 65_536) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.clock())
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may go on (0.0: now); takes nothing."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.wait(self.clock())

    def take(self, key: str) -> float:
        return self._bucket(key).take(self.clock())


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def address_key(host: str) -> str:
    """Who a remote address counts as: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)
