"""`tether demo`: a whole tunnel in one process, every byte checked."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Annotated, Any

import typer

from . import app
from .common import CoreName, Verbose, console, out, run_main, setup_logging


@app.command()
def demo(
    mb: Annotated[float, typer.Option(
        metavar="MB", help="Megabytes to push through the tunnel.")] = 32,
    streams: Annotated[int, typer.Option(metavar="N", help="Concurrent TCP connections.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    break_path: Annotated[bool, typer.Option(
        "--break-path/--no-break-path",
        help="Kill the tube's path halfway and show it heal.")] = True,
    core: CoreName = "aiortc",
    verbose: Verbose = False,
) -> None:
    """Run a whole tunnel in this process and check every byte (nothing to configure).

    Halfway, the tube's path is killed (as when an address disappears): tether detects it,
    restarts ICE onto a new path and the streams go on. Both peers share this one process,
    so throughput is about a third of two tether processes on two cores.
    """
    from rich.live import Live

    from ..demo import DataMismatch, ensure_file_limit, run_demo
    from ..display import demo_line

    setup_logging(verbose, default=logging.ERROR)
    if mb <= 0 or streams <= 0:
        raise typer.BadParameter("--mb and --streams must be positive")
    try:
        ensure_file_limit(streams)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--streams") from None
    console.print("both peers run in this one process (and share one core), so throughput "
                  "here is about a third of two `tether` processes", highlight=False)

    async def main() -> Any:
        with Live(console=console.get(), refresh_per_second=8, transient=False) as live:
            return await run_demo(mb=mb, streams=streams, break_path=break_path, core=core,
                                  on_tick=lambda p: live.update(demo_line(p)))

    try:
        result = run_main(main)
    except DataMismatch as exc:
        console.print(f"[red]data check failed[/red]: {exc}")
        raise typer.Exit(1) from None
    if result is None:
        raise typer.Exit(130)
    console.line()
    console.print(
        f"[green]ok[/green]: tube {result.tube_id} connected in {result.connect_ms:.0f} ms; "
        f"{result.mb:g} MB over {result.streams} stream{'' if result.streams == 1 else 's'} "
        f"in {result.seconds:.2f} s = "
        f"[bold]{result.throughput_mb_s:.2f} MB/s[/bold]; "
        f"{result.bytes_verified:,} of {result.bytes_sent:,} bytes verified"
    )
    if result.path_broken:
        detected = "-" if result.detected_ms is None else f"{result.detected_ms:.0f} ms"
        recovered = "-" if result.recovered_ms is None else f"{result.recovered_ms:.0f} ms"
        console.print(
            f"path killed halfway: detected after {detected}, data flowing again after "
            f"{recovered} ({result.restarts} ICE restart), {result.bytes_lost:,} bytes lost"
        )
    if as_json:
        with contextlib.suppress(BrokenPipeError):
            out.print(json.dumps(result.as_dict()), highlight=False, soft_wrap=True)
