"""Prometheus metrics for one running side, on ``--metrics HOST:PORT`` (GET /metrics).

Each side gets its own CollectorRegistry (never the global one, so two sides in one process
do not clash) with one collector that reads ``side.status()`` at scrape time. The HTTP
server is a small asyncio one, not prometheus_client's thread: the side's objects live on
the event loop and no thread may touch them. Requests are bounded (head size, time,
concurrent connections).

Metrics (labels ``tunnel``, ``role``, and ``tube`` where per tube):
``tether_tube_state`` (1 for the tube's current state, label ``state``), ``tether_tube_rtt_seconds``,
``tether_tube_bytes_sent_total`` / ``_received_total``, ``tether_tube_streams``,
``tether_tube_streams_opened_total``, ``tether_restarts_total`` (label ``reason``),
``tether_recovery_seconds`` (histogram: outage to connected again), ``tether_signaling_connected``,
``tether_tubes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .connection_manager import ConnectionState
from .tubestats import REASONS

if TYPE_CHECKING:
    from .app import Side

logger = logging.getLogger(__name__)

MAX_HEAD = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 16
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


class MetricsServer:
    """GET /metrics over plain HTTP/1.0-style responses, on the event loop."""

    def __init__(self, side: Side, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SideCollector(side))
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_HEAD)
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        logger.info("metrics on http://%s:%d/metrics", shown, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                parts = head.split(b"\r\n", 1)[0].split()
                if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                    await _respond(writer, 405, b"only GET\n", "text/plain")
                elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
                    await _respond(writer, 404, b"try /metrics\n", "text/plain")
                else:
                    body = self.render()
                    await _respond(writer, 200, b"" if parts[0] == b"HEAD" else body,
                                   CONTENT_TYPE_LATEST, length=len(body))
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()


async def _respond(writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str,
                   length: int | None = None) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[code]
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n").encode()
    writer.write(head + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
