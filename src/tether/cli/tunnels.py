"""`tether expose` and `tether connect`: the two ends of a tunnel, with a live table."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

import typer
from rich.live import Live

from ..app import ConnectSide, ExposeSide, Side
from ..display import tube_table
from ..sealing import new_secret
from . import app
from .common import (
    CaFile, Events, IceServer, Loopback, Secret, SecretFile, Signal, Token, TurnPassword,
    TurnUser, Verbose, console, make_core, make_side, need_token, out, parse_address,
    read_secret, run_main, setup_logging,
)


async def _show(side: Side, title: str) -> None:
    """Keep a live table of the side's tubes until cancelled."""
    with Live(tube_table(title, side.snapshot()), console=console, refresh_per_second=2) as live:
        while True:
            await asyncio.sleep(0.5)
            status = "" if side.client.connected else " (signaling: reconnecting)"
            live.update(tube_table(title + status, side.snapshot()))


@app.command()
def expose(
    name: Annotated[str, typer.Argument(help="Tunnel name, shared with the connecting side.")],
    target: Annotated[str, typer.Option(help="HOST:PORT to forward to, e.g. 127.0.0.1:22.")],
    signal: Signal,
    token: Token = None,
    loopback: Loopback = False,
    ice_server: IceServer = None,
    turn_user: TurnUser = None,
    turn_password: TurnPassword = None,
    secret: Secret = None,
    secret_file: SecretFile = None,
    ca: CaFile = None,
    events: Events = None,
    verbose: Verbose = False,
) -> None:
    """Expose TARGET as tunnel NAME: answer tubes and dial TARGET for each stream.

    Only a peer with the tunnel secret can connect; without --secret a strong one is made
    and the exact `tether connect` line to use is printed.
    """
    setup_logging(verbose)
    address = parse_address(target, "--target")
    token = need_token(token)
    secret = read_secret(secret, secret_file)
    if secret is None:
        secret = new_secret()
        console.print("no tunnel secret given; made one. On the connecting machine run:")
        out.print(f"  TETHER_SECRET={secret} tether connect {name} --signal {signal} "
                  f"--listen 127.0.0.1:0", highlight=False, soft_wrap=True)

    side = make_side(ExposeSide, name, target=address, signal_url=signal, token=token,
                 core=make_core(loopback, ice_server, turn_user, turn_password), events=events,
                 secret=secret, ca_file=ca)
    console.print(f"exposing {target} as {name!r} via {signal}")
    run_side(side, lambda: f"expose {name} -> {target}")


@app.command()
def connect(
    name: Annotated[str, typer.Argument(help="Tunnel name, as given to `tether expose`.")],
    listen: Annotated[str, typer.Option(help="Local HOST:PORT to listen on (port 0: any).")],
    signal: Signal,
    token: Token = None,
    loopback: Loopback = False,
    ice_server: IceServer = None,
    turn_user: TurnUser = None,
    turn_password: TurnPassword = None,
    secret: Secret = None,
    secret_file: SecretFile = None,
    ca: CaFile = None,
    events: Events = None,
    verbose: Verbose = False,
) -> None:
    """Listen on LISTEN and carry every connection through tunnel NAME."""
    setup_logging(verbose)
    address = parse_address(listen, "--listen")
    token = need_token(token)
    secret = read_secret(secret, secret_file)
    if secret is None:
        raise typer.BadParameter("give the tunnel secret that `tether expose` printed "
                                 "(TETHER_SECRET, --secret-file or --secret)",
                                 param_hint="--secret")

    side = make_side(ConnectSide, name, listen=address, signal_url=signal, token=token,
                 core=make_core(loopback, ice_server, turn_user, turn_password), events=events,
                 secret=secret, ca_file=ca)

    def title() -> str:
        host, port = side.listen_address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.print(f"listening on {shown}", highlight=False)
        return f"connect {name} on {shown}"

    run_side(side, title)


def run_side(side: Side, title: Callable[[], str]) -> None:
    """Start ``side``, then show its live table (``title()`` once started) until Ctrl-C."""

    async def main() -> None:
        try:
            await side.start()
            await _show(side, title())
        finally:
            await side.close()

    run_main(main)
