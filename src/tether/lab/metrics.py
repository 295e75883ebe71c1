"""What a lab scenario scores, computed from what was recorded (pure: no I/O, no clock).

Inputs are the echo checker's JSON reports (:mod:`tether.lab.echo_client`), the events the
tether processes appended to their ``--events`` files, and an :class:`Observation`: the
moments the scenario acted at. All times are ``time.time()`` values from one machine.

- ``detected_ms``: fault -> the first sign in the events files (network_change, a state
  degraded/reconnecting/failed, a tube closed, signaling disconnected). Without events files
  the checker's first stall stands in (``detected_by: "echo_stall"``).
- ``recovered_ms``: the moment recovery became possible -> the first byte echoed again: the
  end of the echo gap around that moment, or the first echo after it when the echo never
  stopped for longer than the checker's gap threshold; for a restarted peer, the first echo
  on a new connection.
- ``bytes_lost``: sent - verified, after draining, over the streams that should survive.
  Streams whose far end was killed must instead have been closed cleanly: ended by an EOF
  or a reset (not left hanging), nothing corrupt.

The targets live in :data:`TARGETS`, one table; ``ok`` is no byte lost and no corrupt byte,
the scenario's functional criteria, and recovery within its target.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# The gap a fault causes starts before, or just after, the moment recovery is possible (the
# last bytes in flight); one that starts later belongs to something else.
GAP_GRACE = 0.1

DETECTING_STATES = frozenset({"degraded", "reconnecting", "failed"})


@dataclass(frozen=True)
class Target:
    """What a scenario must show to be ok (ms values are upper bounds)."""

    recover_ms: float | None = None    # recovered_ms at most this (and not None)
    old_closed_ms: float | None = None  # killed peer's streams closed this soon after detection
    max_gap_ms: float | None = None    # no echo gap longer than this in the window
    quiet: bool = False                # no degraded/reconnecting/failed, no tube closed/offered
    never_given_up: bool = False       # no failed state, no tube closed
    new_connection: bool = False       # recovery is a new connection echoing


TARGETS: dict[str, Target] = {
    "link_cut": Target(recover_ms=1000),
    "long_outage": Target(recover_ms=3000, never_given_up=True),
    "ip_change": Target(recover_ms=2000),
    "ip_change_expose": Target(recover_ms=2000),
    "uplink_switch": Target(recover_ms=2000),
    "both_change": Target(recover_ms=2000),
    "nat_idle_keepalive": Target(recover_ms=1000, quiet=True),
    "nat_new_port": Target(recover_ms=2000),
    "packet_loss": Target(),
    "slow_path": Target(quiet=True),
    "peer_restart": Target(recover_ms=3000, old_closed_ms=3000, new_connection=True),
    "relay_restart": Target(max_gap_ms=1000),
    "turn_only": Target(recover_ms=2000),
}


@dataclass
class Observation:
    """What a scenario did and when; filled in by the scenario as it runs."""

    name: str
    fault: float | None = None      # fault applied
    recover: float | None = None    # recovery possible from here
    end: float | None = None        # observation over
    killed: frozenset[int] = frozenset()  # connections whose far end was killed
    quiet_since: float | None = None  # events must be quiet from here on
    gap_window: tuple[float, float] | None = None  # where max_gap_ms is measured
    events_available: bool = True
    error: str | None = None        # the scenario could not run as planned
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScenarioResult:
    name: str
    detected_ms: float | None
    recovered_ms: float | None
    bytes_sent: int
    bytes_lost: int
    ok: bool
    failures: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        out.update({k: v for k, v in extra.items() if k not in out})
        return out


# -- parsing -------------------------------------------------------------------------------


def parse_lines(lines: Iterable[str], **tag: Any) -> list[dict[str, Any]]:
    """JSON objects from ``lines``, each tagged with ``tag``; other lines are skipped."""
    out = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(obj, dict):
            obj.update(tag)
            out.append(obj)
    return out


def _ts(record: dict[str, Any]) -> float:
    value = record.get("ts")
    return float(value) if isinstance(value, (int, float)) else float("nan")


# -- events --------------------------------------------------------------------------------


def is_detection(event: dict[str, Any]) -> bool:
    kind = event.get("event")
    if kind == "network_change":
        return True
    if kind == "state":
        return event.get("state") in DETECTING_STATES
    if kind == "tube":
        return event.get("what") == "closed"
    if kind == "signaling":
        return event.get("state") == "disconnected"
    return False


def is_disturbance(event: dict[str, Any]) -> bool:
    """A sign the tunnel was not left alone: a bad state or a tube replaced."""
    kind = event.get("event")
    if kind == "state":
        return event.get("state") in DETECTING_STATES
    if kind == "tube":
        return event.get("what") in ("closed", "offered")
    return False


def is_give_up(event: dict[str, Any]) -> bool:
    """A tube closed, or failed for good. 'failed' with ``retrying`` keeps the tube and its
    streams and tries again at the longest backoff: that is not giving up."""
    kind = event.get("event")
    return (kind == "state" and event.get("state") == "failed"
            and not event.get("retrying")) or (kind == "tube" and event.get("what") == "closed")


Record = dict[str, Any]


def first_after(records: Iterable[Record], since: float, pred: Any) -> Record | None:
    hits = [r for r in records if _ts(r) >= since and pred(r)]
    return min(hits, key=_ts) if hits else None


# -- echo ----------------------------------------------------------------------------------


@dataclass
class ConnSummary:
    conn: int
    sent: int = 0
    verified: int = 0
    opened: float | None = None
    first_echo: float | None = None
    closed: float | None = None
    clean: bool | None = None
    how: str | None = None
    retry: bool = False
    mismatch: int | None = None


def connections(echo: Sequence[dict[str, Any]]) -> dict[int, ConnSummary]:
    """Each connection's last known figures from the checker's reports."""
    conns: dict[int, ConnSummary] = {}

    def get(record: dict[str, Any]) -> ConnSummary:
        cid = int(record["conn"])
        return conns.setdefault(cid, ConnSummary(cid))

    for r in echo:
        kind = r.get("type")
        if kind == "final":
            for c in r.get("conns", []):
                s = conns.setdefault(int(c["conn"]), ConnSummary(int(c["conn"])))
                s.sent, s.verified = int(c["sent"]), int(c["verified"])
            continue
        if "conn" not in r:
            continue
        s = get(r)
        if kind == "open":
            s.opened = _ts(r)
        elif kind in ("progress", "done"):
            s.sent = max(s.sent, int(r["sent"]))
            s.verified = max(s.verified, int(r["verified"]))
            first = r.get("first_rx")
            if first is not None and s.first_echo is None:
                s.first_echo = float(first)
        elif kind == "first_echo":
            s.first_echo = _ts(r) if s.first_echo is None else min(s.first_echo, _ts(r))
        elif kind == "closed":
            s.closed = _ts(r)
            s.clean = bool(r.get("clean"))
            s.how = r.get("how") or ("eof" if s.clean else "error")
            s.retry = bool(r.get("retry"))
            s.sent = max(s.sent, int(r["sent"]))
            s.verified = max(s.verified, int(r["verified"]))
        elif kind == "error" and r.get("what") == "mismatch":
            s.mismatch = int(r.get("offset", -1))
    return conns


def gaps(echo: Sequence[Record], conn: int | None = None) -> list[tuple[float, float | None]]:
    """Echo gaps as (start, end); end None for a stall that never ended."""
    out: list[tuple[float, float | None]] = []
    ended: set[tuple[int, float]] = set()
    for r in echo:
        if r.get("type") == "gap" and (conn is None or r.get("conn") == conn):
            out.append((float(r["start"]), float(r["end"])))
            ended.add((int(r["conn"]), float(r["start"])))
    for r in echo:
        if (r.get("type") == "stall" and r.get("open") and (conn is None or r.get("conn") == conn)
                and (int(r["conn"]), float(r["since"])) not in ended):
            out.append((float(r["since"]), None))
    return sorted(out, key=lambda g: g[0])


def first_echo_after(echo: Sequence[Record], since: float, conn: int | None = None) -> float | None:
    """The earliest echo arrival at or after ``since`` (progress reports carry ``first_rx``)."""
    best = None
    for r in echo:
        if r.get("type") != "progress" or (conn is not None and r.get("conn") != conn):
            continue
        for key in ("first_rx", "last_rx"):
            value = r.get(key)
            if value is not None and float(value) >= since:
                best = float(value) if best is None else min(best, float(value))
    return best


def recovery_ms(echo: Sequence[Record], recover: float, conn: int | None = None) -> float | None:
    """Recovery moment -> first echo again; None if the echo never came back."""
    for start, end in gaps(echo, conn):
        if start > recover + GAP_GRACE:
            break
        if end is None:
            return None
        if end > recover:
            return (end - recover) * 1000.0
    first = first_echo_after(echo, recover, conn)
    return None if first is None else (first - recover) * 1000.0


def max_gap_ms(echo: Sequence[dict[str, Any]], window: tuple[float, float], end: float) -> float:
    """The longest echo gap overlapping ``window``; an open stall counts up to ``end``."""
    lo, hi = window
    longest = 0.0
    for start, stop in gaps(echo):
        stop_at = end if stop is None else stop
        if stop_at >= lo and start <= hi:
            longest = max(longest, (stop_at - start) * 1000.0)
    return longest


# -- scoring -------------------------------------------------------------------------------


def score(obs: Observation, echo: Sequence[dict[str, Any]],
          events: Sequence[dict[str, Any]], target: Target | None = None) -> ScenarioResult:
    """Compute a scenario's metrics and ``ok`` from what was recorded."""
    target = target if target is not None else TARGETS.get(obs.name, Target())
    failures: list[str] = []
    extra: dict[str, Any] = dict(obs.extra)
    conns = connections(echo)
    end = obs.end if obs.end is not None else max((_ts(r) for r in echo), default=float("inf"))
    # What the peers did while shutting down after the observation is not the scenario's.
    events = [e for e in events if _ts(e) <= end]

    # detection
    detected_ms = None
    detected_at = None
    if obs.fault is not None:
        hit = first_after(events, obs.fault, is_detection)
        if hit is not None:
            detected_at = _ts(hit)
            extra["detected_by"] = f"{hit.get('side', '?')}:{hit.get('event')}"
        elif not obs.events_available:
            stall = first_after(echo, obs.fault, lambda r: r.get("type") == "stall")
            if stall is not None:
                detected_at = _ts(stall)
                extra["detected_by"] = "echo_stall"
        if detected_at is not None:
            detected_ms = round((detected_at - obs.fault) * 1000.0, 1)

    # streams
    survivors = [c for c in conns.values() if c.conn not in obs.killed and not c.retry]
    bytes_sent = sum(c.sent for c in conns.values())
    bytes_lost = sum(max(0, c.sent - c.verified) for c in survivors)
    for c in conns.values():
        if c.mismatch is not None:
            failures.append(f"connection {c.conn}: corrupt byte at offset {c.mismatch}")
    if not target.new_connection:
        for c in survivors:
            if c.closed is not None:
                failures.append(f"connection {c.conn} was closed (it should have survived)")
    if bytes_lost:
        failures.append(f"{bytes_lost} bytes lost")
    for cid in sorted(obs.killed):
        # Bytes in flight to a killed peer are gone; its stream must end, not hang, by an
        # EOF or a reset (tether resets streams whose data may be lost), nothing corrupt.
        c = conns.get(cid)
        if c is None or c.closed is None:
            failures.append(f"connection {cid} to the killed peer was never closed")
            continue
        extra["old_close"] = c.how
        if c.how not in ("eof", "reset"):
            failures.append(f"connection {cid} to the killed peer ended badly ({c.how})")
        else:
            base = detected_at if detected_at is not None else obs.fault
            if base is not None:
                extra["old_closed_ms"] = round((c.closed - base) * 1000.0, 1)

    # recovery
    recovered_ms = None
    if obs.recover is not None:
        if target.new_connection:
            fresh = [c.first_echo for c in conns.values()
                     if c.conn not in obs.killed and c.first_echo is not None
                     and c.opened is not None and c.opened >= obs.recover - 0.5]
            if fresh:
                recovered_ms = (min(fresh) - obs.recover) * 1000.0
        else:
            main = _main_connection(conns, obs)
            recovered_ms = recovery_ms(echo, obs.recover, main)
        if recovered_ms is not None:
            recovered_ms = round(max(0.0, recovered_ms), 1)
    if target.recover_ms is not None:
        if recovered_ms is None:
            failures.append("never recovered")
        elif recovered_ms > target.recover_ms:
            failures.append(f"recovered in {recovered_ms:.0f} ms > {target.recover_ms:.0f} ms")
    if target.old_closed_ms is not None:
        closed_ms = extra.get("old_closed_ms")
        if closed_ms is not None and closed_ms > target.old_closed_ms:
            failures.append(f"old stream closed {closed_ms:.0f} ms after detection "
                            f"> {target.old_closed_ms:.0f} ms")
    if obs.gap_window is not None:
        gap = round(max_gap_ms(echo, obs.gap_window, end), 1)
        extra["max_gap_ms"] = gap
        if target.max_gap_ms is not None and gap > target.max_gap_ms:
            failures.append(f"echo gap of {gap:.0f} ms > {target.max_gap_ms:.0f} ms")

    # events criteria
    since = obs.quiet_since if obs.quiet_since is not None else obs.fault
    if since is not None and obs.events_available:
        if target.quiet:
            bad = [e for e in events if _ts(e) >= since and is_disturbance(e)]
            if bad:
                first = min(bad, key=_ts)
                failures.append(f"tunnel disturbed: {first.get('side', '?')} "
                                f"{_describe(first)} at +{(_ts(first) - since):.1f} s")
        if target.never_given_up:
            bad = [e for e in events if _ts(e) >= since and is_give_up(e)]
            if bad:
                failures.append(f"tunnel given up: {_describe(min(bad, key=_ts))}")
    if not obs.events_available:
        extra["events"] = False

    if obs.error:
        failures.insert(0, obs.error)
    return ScenarioResult(
        name=obs.name, detected_ms=detected_ms, recovered_ms=recovered_ms,
        bytes_sent=bytes_sent, bytes_lost=bytes_lost, ok=not failures,
        failures=failures, extra=extra,
    )


def _main_connection(conns: dict[int, ConnSummary], obs: Observation) -> int | None:
    """The stream a survive-the-fault scenario watches: the first one that echoed."""
    echoed = [c.conn for c in conns.values()
              if c.first_echo is not None and c.conn not in obs.killed]
    return min(echoed) if echoed else None


def _describe(event: dict[str, Any]) -> str:
    kind = event.get("event")
    if kind == "state":
        return f"state {event.get('state')}"
    if kind == "tube":
        return f"tube {event.get('what')}"
    return str(kind)


# -- several runs --------------------------------------------------------------------------


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """min / median / max of the values that exist."""
    real = [v for v in values if v is not None]
    if not real:
        return {"min": None, "median": None, "max": None}
    return {"min": min(real), "median": statistics.median(real), "max": max(real)}


def summarize(results: Sequence[ScenarioResult]) -> list[dict[str, Any]]:
    """Per scenario name (in first-seen order): runs, ok count, spreads of the timings."""
    names: list[str] = []
    for r in results:
        if r.name not in names:
            names.append(r.name)
    out = []
    for name in names:
        runs = [r for r in results if r.name == name]
        out.append({
            "name": name,
            "runs": len(runs),
            "ok_runs": sum(r.ok for r in runs),
            "detected_ms": spread([r.detected_ms for r in runs]),
            "recovered_ms": spread([r.recovered_ms for r in runs]),
            "bytes_lost": sum(r.bytes_lost for r in runs),
        })
    return out
