"""``tether bench``: measure every figure, interleaved, and show min / median / max.

Progress goes to stderr; the table to stdout; with ``--json`` one JSON object is the last
line of stdout. Exit status 0 when every selected figure got at least one sample, 1 when
some failed, 2 for bad arguments. Skipped figures (cannot run here) do not fail the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..cli import app
from ..cli.common import Verbose, console, out, run_main, setup_logging

if TYPE_CHECKING:  # rich's table loads only when a bench prints one (fast `tether --help`)
    from rich.table import Table

def _unit(key: str) -> str:
    if "_ms_per_mb" in key:  # CPU (or its kernel part) per MiB
        return "ms/MiB"
    for suffix, unit in (("_mb_s", "MiB/s"), ("_per_s", "/s"), ("_ms", "ms"), ("_us", "us")):
        if key.endswith(suffix):
            return unit
    for part, unit in (("_us_per_", "us"), ("_pct", "% CPU"), ("bytes", "bytes"),
                       ("_per_tube", "bytes"), ("_vs_", "x")):
        if part in key:
            return unit
    return ""


NOT_SELECTED = "not measured in this run"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def title(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (f"tether bench, {m['date_utc']} UTC, {m['cpus']} CPUs, Python {m['python']}, "
             f"load {m['loadavg_1m']:.2f} -> {result['loadavg_1m_end']:.2f}"
             + (" (quick)" if result["quick"] else ""))


def table(result: dict[str, Any]) -> Table:
    from rich.table import Table

    t = Table()
    for name, justify in (("figure", "left"), ("min", "right"), ("median", "right"),
                          ("max", "right"), ("n", "right"), ("unit", "left"),
                          ("note", "left")):
        t.add_column(name, justify=justify, overflow="fold", no_wrap=name != "note")
    spread = result["spread"]
    keys = [k for k in result if k in spread or k + "_why" in result]
    keys += [k for k in spread if k not in keys]
    for key in keys:
        if key in spread:
            lo, mid, hi, n = spread[key]
            t.add_row(key, _fmt(lo), _fmt(mid), _fmt(hi), str(n), _unit(key), "")
        elif result.get(key) is not None:  # derived (a ratio of medians)
            t.add_row(key, "", _fmt(result[key]), "", "", _unit(key), "ratio of medians")
        elif NOT_SELECTED not in str(result.get(key + "_why", "")):
            t.add_row(key, "-", "-", "-", "0", _unit(key),
                      str(result.get(key + "_why", ""))[:160])
    return t


def bench(
    quick: Annotated[bool, typer.Option(
        "--quick", help="Small transfers; slow figures once (about 2 minutes).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="End with one JSON object (every figure, null + reason if missing).")
    ] = False,
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="FIGURES", help="Figures to measure (repeat or comma-separate): tcp, aiortc, cli, "
                       "floor, demo, keeper, keeper_tether, loss, ip_change, handler, relay, "
                       "manager.")] = None,
    runs: Annotated[int | None, typer.Option(
        "--runs", min=1, metavar="N", help="Rounds (default 3; with --quick the slow figures run once).")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Measure tether against TCP, bare aiortc and the Rust core, interleaved (min/median/max)."""
    from .runner import run, select

    setup_logging(verbose, default=logging.ERROR)
    try:
        figures = select(only)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None

    def progress(figure: Any, index: int, result: dict[str, Any] | str) -> None:
        if isinstance(result, str):
            console.print(f"  {figure.name} [{index}]: {result}", markup=False,
                          highlight=False)
            return
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in result.items()
                          if isinstance(v, (int, float)))
        console.print(f"  {figure.name} [{index}]: {shown}", markup=False, highlight=False)

    async def main() -> dict[str, Any]:
        return await run(figures, quick=quick, runs=runs, on_sample=progress)

    result = run_main(main)
    if result is None:
        raise typer.Exit(130)
    # Piped (not a terminal), rich would assume 80 columns: give the table room instead.
    out.print(title(result), highlight=False)
    from rich.console import Console

    Console(width=None if out.is_terminal else 160).print(table(result))
    if as_json:
        with contextlib.suppress(BrokenPipeError):
            out.print(json.dumps(result), highlight=False, soft_wrap=True)
    measured = {k for k in result["spread"]}
    failed = [f.name for f in figures
              if not any(k in measured for k in f.keys)
              and not str(result.get(f.keys[0] + "_why", "")).startswith("skipped")]
    if failed:
        raise typer.Exit(1)


app.command("bench")(bench)
