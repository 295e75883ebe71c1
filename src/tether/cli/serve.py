"""`tether serve`: the signaling relay."""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

import typer

from ..signaling import SignalingServer
from . import app
from .common import Verbose, console, run_main, setup_logging


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="TETHER_TOKEN",
            help="Shared secret (or set TETHER_TOKEN). On the command line it shows in `ps`: "
                 "prefer --token-file or TETHER_TOKEN.",
        ),
    ] = None,
    token_file: Annotated[
        str | None,
        typer.Option("--token-file", help="Read the shared secret from this file (first line)."),
    ] = None,
    cert: Annotated[
        str | None,
        typer.Option("--cert", help="TLS certificate chain (PEM): serve wss:// (needs --key)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="TLS private key (PEM) for --cert.")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Run the signaling relay that peers meet through."""
    import ssl
    from pathlib import Path

    setup_logging(verbose)
    if token_file is not None:
        if token:
            raise typer.BadParameter("give --token-file or --token/TETHER_TOKEN, not both",
                                     param_hint="--token-file")
        try:
            lines = Path(token_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise typer.BadParameter(f"cannot read {token_file}: {exc}",
                                     param_hint="--token-file") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise typer.BadParameter(f"{token_file} holds no token", param_hint="--token-file")
    if (cert is None) != (key is None):
        raise typer.BadParameter("give both --cert and --key", param_hint="--cert/--key")
    context = None
    if cert is not None and key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise typer.BadParameter(f"cannot load {cert} / {key}: {exc}",
                                     param_hint="--cert/--key") from None
    if not token:
        token = secrets.token_urlsafe(16)
        console.print(f"no token given; peers must use [bold]--token {token}[/bold] "
                      "(or TETHER_TOKEN)")

    async def main() -> None:
        server = SignalingServer(host=host, port=port, token=token, ssl_context=context)
        await server.start()
        scheme = "wss" if context is not None else "ws"
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
        console.print(f"signaling server on {scheme}://{shown}:{server.port} (Ctrl-C to stop)",
                      highlight=False)
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()

    run_main(main)
