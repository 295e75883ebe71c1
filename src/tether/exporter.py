"""Prometheus metrics for one running side, on ``--metrics HOST:PORT`` (GET /metrics).

Each side gets its own CollectorRegistry (never the global one, so two sides in one process
do not clash) with one collector that reads ``side.status()`` at scrape time. The HTTP
server is :mod:`tether.metrics_http`'s, on the event loop.

Metrics (labels ``tunnel``, ``role``, and ``tube`` where per tube):
``tether_tube_state`` (1 for the tube's current state, label ``state``),
``tether_tube_rtt_seconds``,
``tether_tube_bytes_sent_total`` / ``_received_total``, ``tether_tube_streams``,
``tether_tube_streams_opened_total``, ``tether_restarts_total`` (label ``reason``),
``tether_recovery_seconds`` (histogram: outage to connected again), ``tether_signaling_connected``,
``tether_tubes``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .connection_manager import ConnectionState
from .metrics_http import MetricsHTTPServer
from .tubestats import REASONS

if TYPE_CHECKING:
    from .app import Side

logger = logging.getLogger(__name__)

STATES = [s.value for s in ConnectionState]


class SideCollector(Collector):
    """Reads one side's status at every scrape."""

    def __init__(self, side: Side) -> None:
        self.side = side

    def collect(self) -> Iterator[Metric]:
        status = self.side.status()
        base = [status["name"], status["role"]]
        keys = ["tunnel", "role"]
        tube_keys = [*keys, "tube"]
        state = GaugeMetricFamily("tether_tube_state", "1 for the tube's current state",
                                  labels=[*tube_keys, "state"])
        rtt = GaugeMetricFamily("tether_tube_rtt_seconds",
                                "Smoothed round trip of the tube's path", labels=tube_keys)
        sent = CounterMetricFamily("tether_tube_bytes_sent", "Tunnel bytes sent to the peer",
                                   labels=tube_keys)
        received = CounterMetricFamily("tether_tube_bytes_received",
                                       "Tunnel bytes received from the peer", labels=tube_keys)
        streams = GaugeMetricFamily("tether_tube_streams", "Open streams", labels=tube_keys)
        streams_total = CounterMetricFamily("tether_tube_streams_opened", "Streams opened",
                                            labels=tube_keys)
        for tube in status["tubes"]:
            labels = [*base, tube["tube_id"]]
            for name in STATES:
                state.add_metric([*labels, name], 1.0 if tube["state"] == name else 0.0)
            if tube.get("rtt_ms") is not None:
                rtt.add_metric(labels, tube["rtt_ms"] / 1000.0)
            sent.add_metric(labels, tube.get("bytes_to_peer", 0))
            received.add_metric(labels, tube.get("bytes_from_peer", 0))
            streams.add_metric(labels, tube.get("streams_open", 0))
            streams_total.add_metric(labels, tube.get("streams_total", 0))
        yield from (state, rtt, sent, received, streams, streams_total)

        tubes = GaugeMetricFamily("tether_tubes", "Tubes this side holds", labels=keys)
        tubes.add_metric(base, len(status["tubes"]))
        yield tubes
        signaling = GaugeMetricFamily("tether_signaling_connected",
                                      "1 while connected to the signaling relay", labels=keys)
        signaling.add_metric(base, 1.0 if status["signaling"]["connected"] else 0.0)
        yield signaling
        restarts = CounterMetricFamily("tether_restarts", "ICE restarts by cause",
                                       labels=[*keys, "reason"])
        by_reason = status["restarts_by_reason"]
        for reason in REASONS:
            restarts.add_metric([*base, reason], by_reason.get(reason, 0))
        yield restarts
        hist = self.side.stats.recovery
        recovery = HistogramMetricFamily(
            "tether_recovery_seconds", "Time from a tube's outage to connected again",
            labels=keys)
        recovery.add_metric(base, hist.cumulative(), hist.total)
        yield recovery


class MetricsServer(MetricsHTTPServer):
    """One side's metrics on ``--metrics HOST:PORT``, from its own registry."""

    def __init__(self, side: Side, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SideCollector(side))
        super().__init__(host, port, lambda: generate_latest(self.registry))
