"""What a person sees: tube tables and demo progress, drawn with rich."""

from __future__ import annotations

from typing import Any

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


def tube_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """One line per tube: state, activity, restarts, streams and traffic."""
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("tube", "state", "idle", "restarts", "next restart", "streams",
                   "sent MB", "received MB"):
        table.add_column(column)
    if not rows:
        table.add_row("-", Text("waiting for a tube", style="yellow"), *["-"] * 6)
    for row in rows:
        state = str(row.get("state", "?"))
        shown = "failed, still trying" if row.get("retrying") else state
        table.add_row(
            str(row.get("tube_id", "?")),
            Text(shown, style=STATE_STYLES.get(state, "")),
            _seconds(row.get("idle_seconds")),
            str(row.get("restart_attempts", 0)),
            _seconds(row.get("next_restart_in")),
            str(row.get("streams_open", "-")),
            f"{row.get('bytes_to_peer', 0) / MB:.1f}",
            f"{row.get('bytes_from_peer', 0) / MB:.1f}",
        )
    return table


def demo_line(progress: Any) -> Text:
    """One status line for the demo: phase, tube state, MB done and MB/s."""
    done = progress.bytes_verified / MB
    total = progress.bytes_total / MB
    state = progress.tube_state
    text = Text()
    text.append(f"{progress.phase:<12}")
    text.append("tube ")
    text.append(f"{state:<13}", style=STATE_STYLES.get(state, ""))
    text.append(f"{done:7.1f} / {total:.1f} MB verified   {progress.mb_s:6.2f} MB/s")
    return text
