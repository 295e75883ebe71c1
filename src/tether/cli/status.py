"""`tether status | restart | stop`: see and control running tunnels from another shell.

Every running `tether expose`/`connect` serves a control socket (tether.control);
these commands find them by tunnel name. :func:`operate` is the running side's half: the
control socket, the metrics server and what is shown while it runs (a live table on a
terminal, a one-line status every ``--status-interval`` seconds elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal as os_signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import app
from .common import console, out, parse_address

# asyncio, the control socket, rich.live and prometheus_client load when used (startup).
if TYPE_CHECKING:
    from .. import control
    from ..app import Side

logger = logging.getLogger("tether.status")

Name = Annotated[str | None, typer.Argument(
    metavar="[NAME]", help="Tunnel name (default: every running tunnel).",
                                            show_default=False)]


def side_status(side: Side) -> dict[str, Any]:
    """The side's status plus what only the process knows (pid, recent warnings)."""
    from .. import logs

    status = side.status()
    status["pid"] = os.getpid()
    status["last_errors"] = logs.RECENT.matching(limit=5)
    return status


async def operate(side: Side, title: Callable[[], str], *, status_interval: float = 30.0,
                  metrics: str | None = None) -> None:
    """Serve control and metrics for a started ``side`` and show it until cancelled."""
    import asyncio

    from .. import control

    metrics_server = None
    if metrics is not None:
        from ..exporter import MetricsServer

        host, port = parse_address(metrics, "--metrics")
        metrics_server = MetricsServer(side, host, port)

    async def restart() -> dict[str, Any]:
        return {"restarted": await side.restart()}

    def stop() -> dict[str, Any]:
        # Exactly what SIGTERM does: the main task is cancelled, the peer told, all closed.
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), os_signal.SIGTERM)
        return {"stopping": True}

    server = control.ControlServer(side.role, side.name, {
        "status": lambda: {"status": side_status(side)}, "restart": restart, "stop": stop})
    try:
        if metrics_server is not None:
            await metrics_server.start()
        try:
            path = await server.start()
            logger.debug("control socket: %s", path)
        except (OSError, control.ControlError) as exc:
            logger.warning("no control socket (`tether status` will not see this tunnel): %s",
                           exc)
        await show(side, title(), status_interval)
    finally:
        await server.close()
        if metrics_server is not None:
            await metrics_server.close()


async def show(side: Side, title: str, status_interval: float) -> None:
    """A live table on a terminal; elsewhere a status line every ``status_interval`` s."""
    import asyncio

    from ..display import status_line, tube_table

    if console.is_terminal:
        from rich.live import Live

        terminal = console.get()
        with Live(tube_table(title, [], width=terminal.width), console=terminal,
                  refresh_per_second=2) as live:
            while True:
                status = side.status()
                suffix = "" if side.client.connected else " (signaling: reconnecting)"
                live.update(tube_table(title + suffix, status["tubes"],
                                       caption=status_line(status), width=terminal.width))
                await asyncio.sleep(0.5)
    if status_interval <= 0:
        await asyncio.Event().wait()
    while True:
        await asyncio.sleep(status_interval)
        logger.info("status: %s", status_line(side.status()))


# -- the commands ----------------------------------------------------------------------------


def _endpoints(name: str | None) -> list[control.Endpoint]:
    from .. import control

    found = control.find(name)
    if not found:
        where = control.runtime_dir()
        what = f"no running tunnel named {name!r}" if name else "no running tunnel"
        console.print(f"{what} (looked in {where}; tunnels started by another user or with "
                      "another TETHER_RUNTIME_DIR/XDG_RUNTIME_DIR are not seen)",
                      markup=False, highlight=False)
        raise typer.Exit(1)
    return found


async def _ask_all(found: list[control.Endpoint], cmd: str) -> list[tuple[control.Endpoint,
                                                                          dict[str, Any] | str]]:
    import asyncio

    from .. import control

    async def one(endpoint: control.Endpoint) -> dict[str, Any] | str:
        try:
            return await control.request(endpoint.path, cmd)
        except control.ControlError as exc:
            return str(exc)

    answers = await asyncio.gather(*(one(e) for e in found))
    return list(zip(found, answers, strict=True))


@app.command()
def status(
    name: Name = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one object).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every second until Ctrl-C.")
                     ] = False,
) -> None:
    """Show running tunnels: tubes, paths, RTT, rates, bytes, streams, restarts, errors."""
    import asyncio
    import json

    from .. import control
    from ..display import status_report

    def render() -> tuple[str, int]:
        if watch and not control.find(name):  # keep watching: it may start soon
            return f"no running tunnel{f' named {name!r}' if name else ''} (waiting)", 1
        found = _endpoints(name)
        answers = asyncio.run(_ask_all(found, "status"))
        tunnels, errors = [], []
        for endpoint, answer in answers:
            if isinstance(answer, str):
                errors.append({"socket": str(endpoint.path), "error": answer})
            else:
                tunnels.append(answer["status"])
        if as_json:
            return json.dumps({"tunnels": tunnels, "errors": errors}, default=str), 0
        text = "\n\n".join(status_report(t) for t in tunnels)
        for error in errors:
            text += f"\n{error['socket']}: {error['error']}"
        return text, 0 if tunnels else 1

    if not watch:
        text, code = render()
        out.print(text, markup=False, highlight=False)
        raise typer.Exit(code)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            text, _ = render()
            if out.is_terminal:
                out.clear()
            out.print(text, markup=False, highlight=False)
            if not out.is_terminal:
                out.print(f"-- {time.strftime('%H:%M:%S')}", highlight=False)
            time.sleep(1.0)


Role = Annotated[str | None, typer.Option(
    "--role", metavar="expose|connect",
    help="Only the exposing or the connecting end (default: every running end of NAME on "
         "this machine).", show_default=False)]


def _command(name: str, cmd: str, done: Callable[[control.Endpoint, dict[str, Any]], str],
             role: str | None = None) -> None:
    import asyncio

    if role not in (None, "expose", "connect"):
        raise typer.BadParameter(f"{role!r}: give expose or connect", param_hint="--role")
    found = [e for e in _endpoints(name) if role is None or e.role == role]
    if not found:
        console.print(f"no running {role} end of tunnel {name!r}", markup=False,
                      highlight=False)
        raise typer.Exit(1)
    failed = False
    for endpoint, answer in asyncio.run(_ask_all(found, cmd)):
        if isinstance(answer, str):
            failed = True
            console.print(f"{endpoint.role} {endpoint.name}: {answer}", markup=False,
                          highlight=False)
        else:
            out.print(done(endpoint, answer), markup=False, highlight=False)
    raise typer.Exit(1 if failed else 0)


@app.command()
def restart(name: Annotated[str, typer.Argument(metavar="NAME", help="Tunnel name.")],
            role: Role = None) -> None:
    """Restart ICE now on every tube of tunnel NAME (a manual restart)."""
    _command(name, "restart", lambda e, a: f"{e.role} {e.name}: restarting "
             f"{len(a.get('restarted', []))} tube(s)", role)


@app.command()
def stop(name: Annotated[str, typer.Argument(metavar="NAME", help="Tunnel name.")],
         role: Role = None) -> None:
    """Stop tunnel NAME gracefully (as SIGTERM does: the peer is told)."""
    _command(name, "stop", lambda e, a: f"{e.role} {e.name}: stopping", role)


__all__ = ["operate", "side_status", "show"]
