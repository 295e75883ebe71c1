"""What a running side has done, tube by tube, for `tether status`, the live table and metrics.

The tunnels and managers count bytes and restarts; what they do not keep is history: how
fast the bytes move (rates need two samples), when a byte last moved (the idle time during
a transfer), when a stream was first seen, why each restart began, how long each outage
lasted. :class:`SideStats` keeps that, bounded: a few seconds of samples per tube, the last
few closed tubes, fixed histogram buckets. A 1 s sampler (owned by the side) and every
status request take a sample; the clock is injectable so the arithmetic is tested without
sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .connection_manager import ConnectionState

if TYPE_CHECKING:
    from .app import Side, TubeHandle

S = ConnectionState
SAMPLE_INTERVAL = 1.0
RATE_WINDOW = 3.0  # seconds of samples a rate is computed over
MAX_SAMPLES = 64
CLOSED_KEPT = 8
MAX_STREAMS_SHOWN = 256
# How long after a network change or a manual request a restart counts as caused by it.
CAUSE_WINDOW = 3.0
#: Bounded label set for restart causes (metrics labels must not grow without bound).
REASONS = ("manual", "network_change", "ice_failure", "disconnected", "timeout", "retry",
           "peer", "other")
#: Upper bounds (seconds) of the recovery time histogram's buckets.
RECOVERY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
_DOWN = frozenset({S.DEGRADED, S.RECONNECTING, S.FAILED})


def classify(reason: str) -> str:
    """The machine's free-text restart reason as one of :data:`REASONS`."""
    text = reason.lower()
    for key, words in (("disconnected", ("disconnected",)), ("retry", ("retry",)),
                       ("timeout", ("timeout", "silent", "no answer")),
                       ("ice_failure", ("ice_failure", "failed", "failure")),
                       ("network_change", ("ip_change", "interface", "network", "route"))):
        if any(word in text for word in words):
            return key
    return "other"


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus style), fixed buckets."""

    bounds: tuple[float, ...] = RECOVERY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(RECOVERY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, count)] with every bucket cumulative, ending with +Inf."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class TubeTrack:
    """History of one tube."""

    created: float
    samples: collections.deque[tuple[float, int, int]] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    moved_at: float | None = None
    last_bytes: tuple[int, int] = (0, 0)
    down_at: float | None = None
    reason: str = ""
    restarts: collections.Counter[str] = field(default_factory=collections.Counter)
    recoveries: list[float] = field(default_factory=list)
    streams_seen: dict[int, tuple[Any, float]] = field(default_factory=dict)

    def sample(self, now: float, sent: int, received: int) -> None:
        if (sent, received) != self.last_bytes:
            self.moved_at = now
            self.last_bytes = (sent, received)
        if not self.samples or now - self.samples[-1][0] >= 0.2:
            self.samples.append((now, sent, received))
        else:
            self.samples[-1] = (self.samples[-1][0], sent, received)

    def rates(self, now: float) -> tuple[float, float]:
        """Bytes per second to and from the peer over the last RATE_WINDOW seconds."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        t1, s1, r1 = self.samples[-1]
        base = self.samples[0]
        for sample in self.samples:
            if sample[0] >= t1 - RATE_WINDOW:
                base = sample
                break
        t0, s0, r0 = base
        if t1 - t0 < 0.2:
            return 0.0, 0.0
        # No sample for a while (nobody asked, sampler stopped): the traffic has stopped.
        span = max(t1 - t0, now - t0) if now - t1 > RATE_WINDOW else t1 - t0
        return (s1 - s0) / span, (r1 - r0) / span


class SideStats:
    """History for one side; see the module docstring."""

    def __init__(self, side: Side, clock: Callable[[], float] = time.monotonic) -> None:
        self.side = side
        self.clock = clock
        self.started = clock()
        self.tracks: dict[str, TubeTrack] = {}
        self.closed: collections.deque[dict[str, Any]] = collections.deque(maxlen=CLOSED_KEPT)
        self.restarts: collections.Counter[str] = collections.Counter()
        self.recovery = Histogram()
        self.tubes_opened = 0
        self._network_at: float | None = None
        self._manual_at: float | None = None

    # -- events from the side --------------------------------------------------------

    def network_changed(self) -> None:
        self._network_at = self.clock()

    def manual_restart(self) -> None:
        self._manual_at = self.clock()

    def state_changed(self, tube_id: str, state: ConnectionState, machine: Any = None) -> None:
        now = self.clock()
        track = self._track(tube_id, now)
        ever = track.moved_at is not None or getattr(machine, "_ever_connected", False)
        if state in _DOWN and track.down_at is None and ever:
            track.down_at = now  # an outage of a tube that worked: recovery counts from here
        if state is S.RECONNECTING:
            reason = self._cause(now, machine)
            track.reason = reason
            track.restarts[reason] += 1
            self.restarts[reason] += 1
        elif state is S.CONNECTED:
            if track.down_at is not None:
                took = now - track.down_at
                track.recoveries.append(took)
                del track.recoveries[:-16]
                self.recovery.observe(took)
            track.down_at = None

    def tube_closed(self, tube_id: str, reason: str) -> None:
        track = self.tracks.pop(tube_id, None)
        self.closed.append({"tube_id": tube_id, "reason": reason, "ts": time.time(),
                            "restarts": dict(track.restarts) if track else {}})

    def _cause(self, now: float, machine: Any) -> str:
        if self._manual_at is not None and now - self._manual_at <= CAUSE_WINDOW:
            return "manual"
        if self._network_at is not None and now - self._network_at <= CAUSE_WINDOW:
            return "network_change"
        attempt = getattr(machine, "_attempt", None)
        if attempt is not None and not getattr(attempt, "own", True):
            return "peer"
        return classify(str(getattr(machine, "_pending_reason", "")))

    def _track(self, tube_id: str, now: float) -> TubeTrack:
        track = self.tracks.get(tube_id)
        if track is None:
            track = self.tracks[tube_id] = TubeTrack(created=now)
        return track

    # -- sampling ----------------------------------------------------------------------

    def sample(self) -> None:
        """Record every tube's byte counters and streams now."""
        now = self.clock()
        for tube_id, handle in list(self.side.tubes.items()):
            track = self._track(tube_id, now)
            tunnel = handle.tunnel
            if tunnel is None:
                continue
            if track.moved_at is None:
                track.moved_at = now  # the tunnel just opened: idle counts from here
                self.tubes_opened += 1
            stats = tunnel.stats  # another core's tunnel may count less: default to 0
            track.sample(now, stats.get("bytes_to_peer", 0), stats.get("bytes_from_peer", 0))
            streams = getattr(tunnel, "streams", None) or {}
            seen = track.streams_seen
            for sid, stream in streams.items():
                known = seen.get(sid)
                if known is None or known[0] is not stream:
                    seen[sid] = (stream, now)
            for sid in [sid for sid in seen if sid not in streams]:
                del seen[sid]

    async def run(self) -> None:
        """Sample every SAMPLE_INTERVAL until cancelled (owned by the side)."""
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    # -- views ---------------------------------------------------------------------------

    def tube(self, handle: TubeHandle, path: dict[str, Any] | None) -> dict[str, Any]:
        """One tube's status: the manager's snapshot, path, rates, streams, restarts."""
        now = self.clock()
        track = self._track(handle.tube_id, now)
        row = dict(handle.manager.snapshot())
        metrics = handle.manager.metrics
        row["retrying"] = handle.manager.machine.retrying
        row["connect_ms"] = handle.connect_ms
        row["age_seconds"] = now - track.created
        row["path"] = path
        row["rtt_ms"] = None if path is None else (path.get("rtt_ms") or path.get("sctp_rtt_ms"))
        tunnel = handle.tunnel
        up, down = track.rates(now)
        row["rate_to_peer"], row["rate_from_peer"] = up, down
        row["idle_seconds"] = None if track.moved_at is None else max(now - track.moved_at, 0.0)
        row["restarts"] = {
            "started": metrics.restarts_started, "succeeded": metrics.restarts_succeeded,
            "failed": metrics.restarts_failed, "answered": metrics.restarts_answered,
            # Ours that ended otherwise: yielded to the peer's crossing offer (glare), replaced
            # by a fresh one after a network change, or not needed (the old path answered).
            "yielded": metrics.restarts_abandoned, "superseded": metrics.restarts_superseded,
            "unneeded": metrics.restarts_unneeded,
            "by_reason": dict(track.restarts), "last_reason": track.reason or None,
            "recoveries_seconds": [round(r, 3) for r in track.recoveries],
            "down_seconds": None if track.down_at is None else now - track.down_at,
        }
        row["streams"] = []
        if tunnel is not None:
            row.update(tunnel.stats)
            streams = getattr(tunnel, "streams", None) or {}
            for sid, stream in list(streams.items())[:MAX_STREAMS_SHOWN]:
                first = track.streams_seen.get(sid)
                age = now - first[1] if first is not None and first[0] is stream else 0.0
                row["streams"].append(_stream_row(stream, age))
        return row


def _stream_row(stream: Any, age: float) -> dict[str, Any]:
    writer = getattr(stream, "writer", None)
    peer = None
    if writer is not None:
        address = writer.get_extra_info("peername")
        if isinstance(address, tuple) and len(address) >= 2:
            host, port = address[0], address[1]
            peer = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return {
        "id": stream.id,
        # The connecting side accepted the client; the exposing side dialled the target.
        "client" if stream.outbound else "target": peer,
        "state": stream.state.value,
        "age_seconds": round(age, 1),
        "bytes_sent": stream.bytes_sent,
        "bytes_received": stream.bytes_received,
    }
