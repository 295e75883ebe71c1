"""What a person sees: tube tables and demo progress, drawn with rich."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# rich.table and rich.text load when a table is drawn: `tether status` prints plain text
# (status_report) and should not pay for them.
if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

STATE_STYLES = {
    "initializing": "dim",
    "connecting": "yellow",
    "connected": "green",
    "reconnecting": "yellow",
    "degraded": "magenta",
    "failed": "red",
    "terminated": "dim",
}

MB = 1024 * 1024


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _rate(value: Any) -> str:
    if not value:
        return "0"
    if value >= MB:
        return f"{value / MB:.1f} MB/s"
    return f"{value / 1024:.0f} kB/s" if value >= 1024 else f"{value:.0f} B/s"


def _bytes(value: Any) -> str:
    value = value or 0
    if value >= MB:
        return f"{value / MB:.1f} MB"
    return f"{value / 1024:.1f} kB" if value >= 1024 else f"{value} B"


def _path(row: dict[str, Any]) -> str:
    path = row.get("path") or {}
    if not path.get("remote"):
        return "-"
    return f"{path.get('via')} {path.get('local')} -> {path.get('remote')}"


def _rtt(row: dict[str, Any]) -> str:
    rtt = row.get("rtt_ms")
    return "-" if rtt is None else f"{rtt:.1f} ms" if rtt < 10 else f"{rtt:.0f} ms"


# Columns and how much they matter (0: always shown); a narrow terminal drops the rest
# rather than wrapping every cell ("connec…").
COLUMNS = (("tube", 0), ("state", 0), ("path", 0), ("rtt", 0), ("idle", 1),
           ("restarts", 2), ("next restart", 3), ("streams", 1), ("rate up", 1),
           ("rate down", 2), ("sent MB", 3), ("received MB", 3))
WIDE = 185  # every column fits


def _importance_shown(width: int | None) -> int:
    if width is None or width >= WIDE:
        return 3
    return 2 if width >= 140 else 1 if width >= 110 else 0


def tube_table(title: str, rows: list[dict[str, Any]], caption: str | None = None,
               width: int | None = None) -> Table:
    """One line per tube: state, path, RTT, idle (since a byte last moved), rates, traffic.

    ``width`` (the terminal's): below WIDE, the least needed columns go, tube ids are
    shortened and the path shows only where it leads."""
    from rich.table import Table
    from rich.text import Text

    shown_up_to = _importance_shown(width)
    narrow = shown_up_to < 3
    table = Table(title=title, title_justify="left", expand=False, caption=caption,
                  caption_justify="left")
    names = [name for name, importance in COLUMNS if importance <= shown_up_to]
    for name in names:
        table.add_column(name, no_wrap=True)
    if not rows:
        table.add_row("-", Text("waiting for a tube", style="yellow"), *["-"] * (len(names) - 2))
    for row in rows:
        state = str(row.get("state", "?"))
        shown = "failed, still trying" if row.get("retrying") else state
        restarts = row.get("restarts")
        count = (restarts.get("started", 0) if isinstance(restarts, dict)
                 else row.get("restart_attempts", 0))
        tube = str(row.get("tube_id", "?"))
        path = row.get("path") or {}
        cells = {
            "tube": tube[:8] if narrow else tube,
            "state": Text(shown, style=STATE_STYLES.get(state, "")),
            "path": (f"{path.get('via')} {path.get('remote')}" if narrow and path.get("remote")
                     else _path(row)),
            "rtt": _rtt(row),
            "idle": _seconds(row.get("idle_seconds")),
            "restarts": str(count),
            "next restart": _seconds(row.get("next_restart_in")),
            "streams": str(row.get("streams_open", "-")),
            "rate up": _rate(row.get("rate_to_peer")),
            "rate down": _rate(row.get("rate_from_peer")),
            "sent MB": f"{row.get('bytes_to_peer', 0) / MB:.1f}",
            "received MB": f"{row.get('bytes_from_peer', 0) / MB:.1f}",
        }
        table.add_row(*(cells[name] for name in names))
    return table


def status_line(status: dict[str, Any]) -> str:
    """The whole side in one line, for logs (services) and the live table's caption."""
    tubes = status.get("tubes", [])
    where = status.get("listen") or status.get("target") or ""
    parts = [f"{status.get('role')} {status.get('name')}" + (f" ({where})" if where else "")]
    if not status.get("signaling", {}).get("connected"):
        parts.append("signaling reconnecting")
    if not tubes:
        parts.append("no tube")
    for row in tubes:
        state = "failed, still trying" if row.get("retrying") else row.get("state")
        path = row.get("path") or {}
        bits = [f"tube {row.get('tube_id')} {state}"]
        if path.get("via"):
            bits.append(f"{path['via']} to {path.get('remote')}")
        if row.get("rtt_ms") is not None:
            bits.append(f"rtt {_rtt(row)}")
        parts.append(" ".join(bits))
    parts.append(f"{sum(t.get('streams_open', 0) for t in tubes)} streams")
    parts.append(f"up {_rate(status.get('rate_to_peer'))} down "
                 f"{_rate(status.get('rate_from_peer'))}")
    parts.append(f"sent {_bytes(sum(t.get('bytes_to_peer', 0) for t in tubes))} received "
                 f"{_bytes(sum(t.get('bytes_from_peer', 0) for t in tubes))}")
    restarts = sum((status.get("restarts_by_reason") or {}).values())
    if restarts:
        parts.append(f"{restarts} restarts")
    return ", ".join(parts)


def status_report(status: dict[str, Any]) -> str:
    """`tether status` for a person: the side, then every tube and its streams."""
    lines = [f"{status.get('role')} {status.get('name')}  pid {status.get('pid', '?')}  up "
             f"{_seconds(status.get('uptime_seconds'))}  "
             + ("signaling connected" if status.get("signaling", {}).get("connected")
                else "signaling RECONNECTING")
             + "".join(f"  {key} {status[key]}" for key in ("listen", "socks", "target",
                                                                "allow") if status.get(key))]
    if not status.get("tubes"):
        lines.append("  no tube (waiting for the peer)")
    for row in status.get("tubes", []):
        state = "failed, still trying" if row.get("retrying") else row.get("state")
        lines.append(f"  tube {row.get('tube_id')}: {state}, path {_path(row)}, rtt {_rtt(row)}, "
                     f"idle {_seconds(row.get('idle_seconds'))}")
        lines.append(f"    traffic: up {_rate(row.get('rate_to_peer'))}, down "
                     f"{_rate(row.get('rate_from_peer'))}; sent {_bytes(row.get('bytes_to_peer'))}"
                     f", received {_bytes(row.get('bytes_from_peer'))}; streams "
                     f"{row.get('streams_open', 0)} open, {row.get('streams_total', 0)} total")
        restarts = row.get("restarts") or {}
        if restarts.get("started") or restarts.get("answered"):
            reasons = ", ".join(f"{k} {v}" for k, v in (restarts.get("by_reason") or {}).items())
            others = ", ".join(f"{restarts[k]} {k}" for k in ("yielded", "superseded",
                                                             "unneeded") if restarts.get(k))
            lines.append(f"    restarts: {restarts.get('started', 0)} started, "
                         f"{restarts.get('succeeded', 0)} succeeded, {restarts.get('failed', 0)}"
                         f" failed, {restarts.get('answered', 0)} answered"
                         + (f", {others}" if others else "")
                         + (f" (causes: {reasons})" if reasons else ""))
        for stream in row.get("streams", []):
            who = stream.get("client") or stream.get("target") or "?"
            lines.append(f"    stream {stream['id']}: {who}, {stream['state']}, age "
                         f"{_seconds(stream.get('age_seconds'))}, sent "
                         f"{_bytes(stream.get('bytes_sent'))}, received "
                         f"{_bytes(stream.get('bytes_received'))}")
    for closed in status.get("closed_tubes", [])[-3:]:
        lines.append(f"  closed tube {closed['tube_id']}: {closed['reason']}")
    for error in status.get("last_errors", [])[-3:]:
        lines.append(f"  last {error['level'].lower()}: {error['message']}")
    return "\n".join(lines)


def demo_line(progress: Any) -> Text:
    """One status line for the demo: phase, tube state, MB done and MB/s."""
    from rich.text import Text

    done = progress.bytes_verified / MB
    total = progress.bytes_total / MB
    state = progress.tube_state
    text = Text()
    text.append(f"{progress.phase:<12}")
    text.append("tube ")
    text.append(f"{state:<13}", style=STATE_STYLES.get(state, ""))
    text.append(f"{done:7.1f} / {total:.1f} MB verified   {progress.mb_s:6.2f} MB/s")
    return text
