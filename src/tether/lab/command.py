"""``tether lab``: run the network lab from the command line (the lead registers ``lab``).

Exit status: 0 when every selected scenario is ok, 1 otherwise, 2 when the lab cannot run
here (not root, no namespaces, a tool missing) or the arguments are wrong.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

# The lab itself (asyncio, processes, namespaces) and rich load when `tether lab` runs:
# `tether --help` imports this module to register the command (startup).
if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

    from .metrics import ScenarioResult
    from .session import LabOptions

logger = logging.getLogger(__name__)

#: The scenarios' names for --help, without importing them (tests/test_startup.py checks
#: that this is exactly tether.lab.scenarios.SCENARIOS, in order).
SCENARIO_NAMES = ("link_cut", "long_outage", "ip_change", "ip_change_expose", "uplink_switch",
                  "both_change", "nat_idle_keepalive", "nat_new_port", "packet_loss",
                  "path_mtu_shrink", "slow_path", "peer_restart", "relay_restart",
                  "turn_only")


AsJson = Annotated[bool, typer.Option("--json", help="End with one JSON line of results.")]
Only = Annotated[str | None, typer.Option(
    metavar="NAMES",
    help=f"Comma-separated scenario names (default: all): {', '.join(SCENARIO_NAMES)}.")]
Runs = Annotated[int, typer.Option(
    min=1, metavar="N", help="Runs of each scenario (min/median/max).")]
Keep = Annotated[bool, typer.Option(help="Keep every run's directory, not only failed ones.")]
GiveUp = Annotated[float, typer.Option(metavar="SECONDS", help="Seconds to wait for a recovery.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show the lab's logs.")]
Core = Annotated[str, typer.Option(
    "--core", metavar="aiortc|keeper",
    help="The peers' WebRTC core: aiortc or keeper (the Rust core).")]


def lab(
    as_json: AsJson = False,
    only: Only = None,
    runs: Runs = 1,
    keep: Keep = False,
    give_up: GiveUp = 60.0,
    verbose: Verbose = False,
    core: Core = "aiortc",
) -> None:
    """Run real tether processes in network namespaces through faults; score each scenario."""
    import asyncio

    from rich.console import Console
    from rich.text import Text

    from .metrics import summarize
    from .netns import LabUnavailable
    from .runner import select
    from .session import LabOptions

    err = Console(stderr=True)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        names = select(only)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if give_up <= 0:
        err.print("[red]--give-up must be positive[/red]")
        raise typer.Exit(2)
    if core not in ("aiortc", "keeper"):
        err.print(f"[red]unknown core {core!r}: aiortc or keeper[/red]")
        raise typer.Exit(2)
    options = LabOptions(give_up_s=give_up, keep=keep, core=core)

    def progress(result: ScenarioResult) -> None:
        err.print(Text.assemble((f"{result.name}: ", "bold"), _verdict(result.ok), " ",
                                _brief(result)))

    try:
        results = asyncio.run(_main(names, runs, options, progress))
    except LabUnavailable as exc:
        err.print(f"[red]the lab cannot run here[/red]: {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("stopped; namespaces and processes removed")
        raise typer.Exit(130) from None
    if as_json:
        doc = {"scenarios": [r.as_dict() for r in results]}
        if runs > 1:
            doc["summary"] = summarize(results)
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()
    else:
        Console().print(table(results, runs))
        kept = [r.extra["run_dir"] for r in results if "run_dir" in r.extra]
        if kept:
            err.print(f"logs of {len(kept)} run(s) kept in {kept[0].rsplit('/', 1)[0]}")
    raise typer.Exit(0 if results and all(r.ok for r in results) else 1)


async def _main(names: Sequence[str], runs: int, options: LabOptions,
                progress: Any) -> list[ScenarioResult]:
    """The lab, with SIGTERM turned into a cancel so every finally block still runs."""
    import asyncio

    from .runner import run_lab

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run_lab(names, runs=runs, options=options, on_result=progress)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _verdict(ok: bool) -> Text:
    from rich.text import Text

    return Text("ok", style="green") if ok else Text("FAIL", style="red")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _target(name: str) -> str:
    from .metrics import TARGETS

    t = TARGETS.get(name)
    if t is None:
        return ""
    parts = []
    if t.recover_ms is not None:
        parts.append(f"rec<={t.recover_ms / 1000:g}s")
    if t.max_gap_ms is not None:
        parts.append(f"gap<={t.max_gap_ms / 1000:g}s")
    if t.old_closed_ms is not None:
        parts.append(f"old closed<={t.old_closed_ms / 1000:g}s")
    if t.quiet:
        parts.append("quiet")
    if t.never_given_up:
        parts.append("kept")
    return ", ".join(parts) or "intact"


NOTE_KEYS = ("throughput_mb_s", "rtt_ms", "max_gap_ms", "old_closed_ms", "turn_relays",
             "detected_by")


def _brief(result: ScenarioResult) -> str:
    bits = [f"detected {_ms(result.detected_ms)} ms", f"recovered {_ms(result.recovered_ms)} ms",
            f"lost {result.bytes_lost:,} B"]
    bits += [f"{k}={result.extra[k]}" for k in NOTE_KEYS if result.extra.get(k) is not None]
    if result.failures:
        bits.append("; ".join(result.failures))
    if "run_dir" in result.extra:
        bits.append(f"logs: {result.extra['run_dir']}")
    return ", ".join(bits)


def _notes(result: ScenarioResult) -> str:
    bits = [f"{k}={result.extra[k]}" for k in NOTE_KEYS if result.extra.get(k) is not None]
    return "; ".join(result.failures + bits)


def table(results: Sequence[ScenarioResult], runs: int = 1) -> Table:
    """One row per run, or per scenario with min/median/max when there are several runs."""
    from rich.table import Table
    from rich.text import Text

    from .metrics import summarize

    t = Table(title="tether lab", title_justify="left")
    if runs <= 1:
        for col in ("scenario", "ok", "detected ms", "recovered ms", "target", "sent MB",
                    "lost B", "notes"):
            t.add_column(col, overflow="fold")
        for r in results:
            t.add_row(r.name, _verdict(r.ok), _ms(r.detected_ms), _ms(r.recovered_ms),
                      _target(r.name), f"{r.bytes_sent / 1e6:.1f}", f"{r.bytes_lost:,}",
                      _notes(r))
        return t
    for col in ("scenario", "ok runs", "detected ms min/med/max", "recovered ms min/med/max",
                "target", "lost B"):
        t.add_column(col, overflow="fold")
    for row in summarize(results):
        ok = row["ok_runs"] == row["runs"]
        t.add_row(row["name"], Text(f"{row['ok_runs']}/{row['runs']}",
                                    style="green" if ok else "red"),
                  _spread(row["detected_ms"]), _spread(row["recovered_ms"]),
                  _target(row["name"]), f"{row['bytes_lost']:,}")
    return t


def _spread(s: dict[str, float | None]) -> str:
    if s["median"] is None:
        return "-"
    return f"{_ms(s['min'])} / {_ms(s['median'])} / {_ms(s['max'])}"


if __name__ == "__main__":
    typer.run(lab)
