"""`tether serve`: the signaling relay (alone, or one of several sharing a Redis)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from . import app
from .common import Verbose, console, parse_address, run_main, setup_logging

# The relay (asyncio, websockets) loads when `serve` runs, not to register it (startup).
if TYPE_CHECKING:
    from ..signaling.limits import RelayLimits


def _limits(items: list[str]) -> RelayLimits:
    """RelayLimits with NAME=VALUE overrides (a usage error names a bad one)."""
    from ..signaling.limits import RelayLimits

    fields = vars(RelayLimits())
    overrides: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in fields:
            raise typer.BadParameter(f"unknown limit {name!r}; known: {', '.join(fields)}",
                                     param_hint="--limit")
        try:
            number = type(fields[name])(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r}: {name} needs a number", param_hint="--limit"
                                     ) from None
        overrides[name] = number
    try:
        return RelayLimits(**{**fields, **overrides})
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--limit") from None


@app.command()
def serve(
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        min=0, max=65535, metavar="PORT", help="Port to listen on (0: any free port).")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="TETHER_TOKEN", metavar="TOKEN",
            help="Shared secret (or set TETHER_TOKEN). On the command line it shows in `ps`: "
                 "prefer --token-file or TETHER_TOKEN.",
        ),
    ] = None,
    token_file: Annotated[
        str | None,
        typer.Option("--token-file", metavar="FILE",
                     help="Read the shared secret from this file (first line)."),
    ] = None,
    cert: Annotated[
        str | None,
        typer.Option("--cert", metavar="FILE",
                     help="TLS certificate chain (PEM): serve wss:// (needs --key)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", metavar="FILE", help="TLS private key (PEM) for --cert.")
    ] = None,
    redis: Annotated[
        str | None,
        typer.Option("--redis", envvar="TETHER_REDIS", metavar="URL",
                     help="Keep conversations in Redis (redis://HOST:PORT/DB) so that several "
                          "relays serve one set of tunnels; default: in this process."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option("--metrics", metavar="HOST:PORT",
                     help="Also answer GET /healthz and /metrics on HOST:PORT (they are "
                          "always on the relay's own port too)."),
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option("--limit", metavar="NAME=VALUE",
                     help="Override a relay limit, NAME=VALUE (repeatable), e.g. "
                          "max_connections=20000; names as in RelayLimits."),
    ] = None,
    web: Annotated[
        bool,
        typer.Option("--web", help="Also serve the browser peer's demo page at /web/ (a web "
                                   "page as the connecting side; needs https or localhost)."),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Run the signaling relay that peers meet through."""
    import asyncio
    import secrets
    import ssl
    from pathlib import Path

    from .. import runloop
    from ..metrics_http import MetricsHTTPServer
    from ..signaling import SignalingServer

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
    limits = _limits(limit or [])
    metrics_address = parse_address(metrics, "--metrics") if metrics else None
    if redis is not None and not redis.startswith(("redis://", "rediss://", "unix://")):
        raise typer.BadParameter(f"{redis!r} is not a Redis URL; expected redis://HOST:PORT/DB",
                                 param_hint="--redis")
    if not token:
        token = secrets.token_urlsafe(16)
        console.print(f"no token given; peers must use [bold]--token {token}[/bold] "
                      "(or TETHER_TOKEN)")

    async def main() -> None:
        table = None
        if redis is not None:
            from ..signaling.redis_table import RedisConversationTable

            table = RedisConversationTable(
                redis, max_conversations=limits.max_conversations, max_held=limits.max_held,
                max_held_bytes=limits.max_held_bytes, held_ttl=limits.held_ttl,
                max_conversations_per_address=limits.max_conversations_per_address,
            )
            await table.start()
        runloop.collect_less_often()  # the relay is what this process is for
        server = SignalingServer(host=host, port=port, token=token, ssl_context=context,
                                 limits=limits, table=table, web=web)
        side = None
        try:
            await server.start()
            if metrics_address is not None:
                side = MetricsHTTPServer(*metrics_address, server.metrics.render, server.health)
                await side.start()
            scheme = "wss" if context is not None else "ws"
            shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
            store = f", conversations in Redis {table.where}" if table is not None else ""
            console.print(f"signaling server on {scheme}://{shown}:{server.port}{store} "
                          f"(Ctrl-C to stop)", highlight=False)
            if web:
                page = "https" if context is not None else "http"
                console.print(f"demo page on {page}://{shown}:{server.port}/web/",
                              highlight=False)
            if side is not None:
                where = side.address
                console.print(f"health and metrics on http://{where[0]}:{where[1]}/healthz "
                              "and /metrics", highlight=False)
            await asyncio.Event().wait()
        finally:
            if side is not None:
                await side.close()
            await server.close()
            if table is not None:
                await table.close()

    run_main(main)
