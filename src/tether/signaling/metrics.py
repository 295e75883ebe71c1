"""The relay's Prometheus metrics and its ``/healthz`` / ``/metrics`` HTTP answers.

Each :class:`RelayMetrics` has its own registry (several relays in one process, as in tests,
do not collide). The relay serves both paths on its own port (before authentication: they
carry no secrets) and, with ``--metrics HOST:PORT``, on a separate small HTTP listener
(:mod:`tether.metrics_http`), for scrapers that must not reach the signaling port.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from typing import Any


# prometheus_client is imported when metrics are first rendered: the client side of tether
# imports this module too (via the wire constants) and should not pay for it.

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)


class Histogram:
    """A cumulative-on-export histogram that costs one bisect per observation."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def family(self, name: str, documentation: str) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", self.count))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class RelayMetrics:
    """The relay's numbers: plain counters on the hot path (a frame costs a few integer
    additions, not prometheus_client's locked counters), turned into Prometheus metrics only
    when scraped. Gauges are read from callables the server sets."""

    def __init__(self) -> None:
        self.frames = 0
        self.signals = 0
        self.errors: dict[str, int] = {}
        self.delivery = Histogram()
        self.redis = Histogram()
        self.connections: Callable[[], float] = lambda: 0
        self.conversations: Callable[[], float] = lambda: 0
        self.ready: Callable[[], float] = lambda: 0
        self._registry: Any = None

    def error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("tether_relay_connections", "Open WebSocket connections",
                                value=self.connections())
        yield GaugeMetricFamily(
            "tether_relay_conversations", "Conversations with a peer connected to this relay",
            value=self.conversations(),
        )
        yield GaugeMetricFamily("tether_relay_ready", "1 when the relay accepts joins",
                                value=self.ready())
        yield CounterMetricFamily(
            "tether_relay_signals_relayed", "Signals taken for relaying (delivered or held)",
            value=self.signals,
        )
        yield CounterMetricFamily("tether_relay_frames", "Text frames received",
                                  value=self.frames)
        errors = CounterMetricFamily("tether_relay_errors", "Refusals and errors by kind",
                                     labels=["kind"])
        for kind, n in sorted(self.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        yield self.delivery.family(
            "tether_relay_delivery_seconds",
            "From a frame's arrival to its signals being queued for the recipient",
        )
        yield self.redis.family("tether_relay_redis_seconds", "Redis round trips")

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self)
        return bytes(generate_latest(self._registry))

