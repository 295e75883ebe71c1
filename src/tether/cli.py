"""The command line: tether serve | expose | connect | demo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal as os_signal
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler

from . import __version__
from .app import ConnectSide, ExposeSide, Side
from .cores.aiortc_core import AiortcTubeRegistry
from .cores.gathering import LOOPBACK
from .display import demo_line, tube_table
from .events import EventLog
from .lab.command import lab as lab_command
from .sealing import MIN_SECRET_CHARS, new_secret
from .signaling import SignalingServer
from .signaling.client import AuthenticationError, CertificateError, ConversationFullError
from .tunnel import parse_hostport

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="tether keeps WebRTC tunnels alive: TCP forwarding over WebRTC data channels.",
)


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print tether's version and exit.")] = False,
) -> None:
    """tether keeps WebRTC tunnels alive: TCP forwarding over WebRTC data channels."""
console = Console(stderr=True)
out = Console()

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="TETHER_TOKEN", help="Shared secret for the signaling server."),
]
Signal = Annotated[
    str, typer.Option("--signal", help="Signaling server URL, e.g. ws://127.0.0.1:8765.")
]
Loopback = Annotated[
    bool, typer.Option("--loopback", help="Gather ICE candidates on 127.0.0.1 only.")
]
IceServer = Annotated[
    list[str] | None,
    typer.Option("--ice-server", help="STUN/TURN URL (repeatable): stun:HOST:PORT, "
                                      "turn:HOST:PORT, turns:HOST:PORT; none by default."),
]
TurnUser = Annotated[
    str | None, typer.Option("--turn-user", help="User name for the turn:/turns: servers.")
]
TurnPassword = Annotated[
    str | None,
    typer.Option("--turn-password", envvar="TETHER_TURN_PASSWORD",
                 help="Password for the turn:/turns: servers (or TETHER_TURN_PASSWORD)."),
]
Secret = Annotated[
    str | None,
    typer.Option("--secret", envvar="TETHER_SECRET", show_default=False,
                 help="The tunnel secret both peers share; the relay never sees it. Prefer "
                      "TETHER_SECRET or --secret-file: --secret shows in `ps`."),
]
SecretFile = Annotated[
    str | None,
    typer.Option("--secret-file", help="Read the tunnel secret from this file."),
]
CaFile = Annotated[
    str | None,
    typer.Option("--ca", help="CA certificate file to verify a wss:// relay with "
                              "(default: the system's store)."),
]
Events = Annotated[
    str | None,
    typer.Option("--events", help="Append what happens (states, network changes, tubes) "
                                  "to this file as JSON lines."),
]


def _logging(verbose: bool, default: int = logging.INFO) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else default,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    # -v is tether's story; aiortc's SCTP debug alone is ~100k lines per 50 MB.
    for noisy in ("aioice", "aiortc", "websockets"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def _address(value: str, option: str) -> tuple[str, int]:
    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _secret(secret: str | None, secret_file: str | None) -> str | None:
    if secret_file is not None:
        try:
            with open(secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read it: {exc.strerror}",
                                     param_hint="--secret-file") from None
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        raise typer.BadParameter(f"the tunnel secret must have at least {MIN_SECRET_CHARS} "
                                 "characters (`tether expose` makes a strong one for you)",
                                 param_hint="--secret")
    return secret


def _need_token(token: str | None) -> str:
    if not token:
        raise typer.BadParameter("give --token or set TETHER_TOKEN", param_hint="--token")
    return token


async def _stoppable(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main`` until it returns or SIGTERM arrives; SIGTERM ends it like Ctrl-C (its
    finally blocks close everything: the peer is told, so it can re-offer at once)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(os_signal.SIGTERM, on_sigterm)
    try:
        return await main()
    except asyncio.CancelledError:
        if not terminated:
            raise
        console.print("stopped (SIGTERM)")
        return None


def _run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main``; Ctrl-C and SIGTERM end it cleanly (its finally blocks close everything)."""
    try:
        return asyncio.run(_stoppable(main))
    except KeyboardInterrupt:
        console.print("stopped")
        return None
    except AuthenticationError as exc:
        console.print(f"[red]signaling server refused the token[/red]: {exc}. Check --token.")
        raise typer.Exit(2) from None
    except CertificateError as exc:
        console.print(f"[red]cannot verify the relay's certificate[/red]: {exc}. "
                      "Give its CA with --ca FILE.")
        raise typer.Exit(2) from None
    except ConversationFullError as exc:
        console.print(f"[red]conversation is full[/red]: {exc}. Is another peer using this NAME?")
        raise typer.Exit(2) from None
    except OSError as exc:  # a busy or unusable listen address, most often
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


async def _show(side: Side, title: str) -> None:
    """Keep a live table of the side's tubes until cancelled."""
    with Live(tube_table(title, side.snapshot()), console=console, refresh_per_second=2) as live:
        while True:
            await asyncio.sleep(0.5)
            status = "" if side.client.connected else " (signaling: reconnecting)"
            live.update(tube_table(title + status, side.snapshot()))


@app.command()
def version() -> None:
    """Print tether's version."""
    out.print(__version__)


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

    _logging(verbose)
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

    _run(main)


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
    _logging(verbose)
    address = _address(target, "--target")
    token = _need_token(token)
    secret = _secret(secret, secret_file)
    if secret is None:
        secret = new_secret()
        console.print("no tunnel secret given; made one. On the connecting machine run:")
        out.print(f"  TETHER_SECRET={secret} tether connect {name} --signal {signal} "
                  f"--listen 127.0.0.1:0", highlight=False, soft_wrap=True)

    side = _side(ExposeSide, name, target=address, signal_url=signal, token=token,
                 core=_core(loopback, ice_server, turn_user, turn_password), events=events,
                 secret=secret, ca_file=ca)
    console.print(f"exposing {target} as {name!r} via {signal}")
    _run_side(side, lambda: f"expose {name} -> {target}")


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
    _logging(verbose)
    address = _address(listen, "--listen")
    token = _need_token(token)
    secret = _secret(secret, secret_file)
    if secret is None:
        raise typer.BadParameter("give the tunnel secret that `tether expose` printed "
                                 "(TETHER_SECRET, --secret-file or --secret)",
                                 param_hint="--secret")

    side = _side(ConnectSide, name, listen=address, signal_url=signal, token=token,
                 core=_core(loopback, ice_server, turn_user, turn_password), events=events,
                 secret=secret, ca_file=ca)

    def title() -> str:
        host, port = side.listen_address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.print(f"listening on {shown}", highlight=False)
        return f"connect {name} on {shown}"

    _run_side(side, title)


def _side(kind: type[Side], name: str, *, events: str | None, **kwargs: Any) -> Side:
    """Make a side that watches the network and records ``events``; a setting it refuses
    (a --signal that is no WebSocket URL...) is a usage error with its message, not a
    traceback."""
    try:
        return kind(name, events=EventLog(events), watch_network=True, **kwargs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _core(loopback: bool, ice_servers: list[str] | None, turn_user: str | None,
          turn_password: str | None) -> AiortcTubeRegistry:
    servers = ice_servers or []
    if any(url.startswith(("turn:", "turns:")) for url in servers) and not (
            turn_user and turn_password):
        raise typer.BadParameter("a turn:/turns: server needs --turn-user and --turn-password "
                                 "(or TETHER_TURN_PASSWORD)", param_hint="--ice-server")
    try:
        return AiortcTubeRegistry(
            host_addresses=LOOPBACK if loopback else None, ice_servers=servers,
            turn_username=turn_user, turn_password=turn_password,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ice-server") from None


def _run_side(side: Side, title: Callable[[], str]) -> None:
    """Start ``side``, then show its live table (``title()`` once started) until Ctrl-C."""

    async def main() -> None:
        try:
            await side.start()
            await _show(side, title())
        finally:
            await side.close()

    _run(main)


@app.command()
def demo(
    mb: Annotated[float, typer.Option(help="Megabytes to push through the tunnel.")] = 32,
    streams: Annotated[int, typer.Option(help="Concurrent TCP connections.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line.")] = False,
    break_path: Annotated[bool, typer.Option(
        "--break-path/--no-break-path",
        help="Kill the tube's path halfway and show it heal.")] = True,
    verbose: Verbose = False,
) -> None:
    """Run a whole tunnel in this process and check every byte (nothing to configure).

    Halfway, the tube's path is killed (as when an address disappears): tether detects it,
    restarts ICE onto a new path and the streams go on. Both peers share this one process,
    so throughput is about a third of two tether processes on two cores.
    """
    from .demo import DataMismatch, run_demo

    _logging(verbose, default=logging.ERROR)
    if mb <= 0 or streams <= 0:
        raise typer.BadParameter("--mb and --streams must be positive")

    async def main() -> Any:
        with Live(console=console, refresh_per_second=8, transient=False) as live:
            return await run_demo(mb=mb, streams=streams, break_path=break_path,
                                  on_tick=lambda p: live.update(demo_line(p)))

    try:
        result = _run(main)
    except DataMismatch as exc:
        console.print(f"[red]data check failed[/red]: {exc}")
        raise typer.Exit(1) from None
    if result is None:
        raise typer.Exit(130)
    console.line()
    console.print(
        f"[green]ok[/green]: tube {result.tube_id} connected in {result.connect_ms:.0f} ms; "
        f"{result.mb:g} MB over {result.streams} streams in {result.seconds:.2f} s = "
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


app.command("lab")(lab_command)


if __name__ == "__main__":
    app()
