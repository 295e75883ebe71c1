"""What every command shares: consoles, option types, logging, running a main coroutine
with clean Ctrl-C/SIGTERM handling, and turning setting errors into usage errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal as os_signal
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from ..app import Side
from ..cores.aiortc_core import AiortcTubeRegistry
from ..cores.gathering import LOOPBACK
from ..events import EventLog
from ..sealing import MIN_SECRET_CHARS
from ..signaling.client import AuthenticationError, CertificateError, ConversationFullError
from ..tunnel import parse_hostport

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


def setup_logging(verbose: bool, default: int = logging.INFO) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else default,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    # -v is tether's story; aiortc's SCTP debug alone is ~100k lines per 50 MB.
    for noisy in ("aioice", "aiortc", "websockets"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def parse_address(value: str, option: str) -> tuple[str, int]:
    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def read_secret(secret: str | None, secret_file: str | None) -> str | None:
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


def need_token(token: str | None) -> str:
    if not token:
        raise typer.BadParameter("give --token or set TETHER_TOKEN", param_hint="--token")
    return token


async def stoppable(main: Callable[[], Awaitable[Any]]) -> Any:
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


def run_main(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main``; Ctrl-C and SIGTERM end it cleanly (its finally blocks close everything)."""
    try:
        return asyncio.run(stoppable(main))
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


def make_side(kind: type[Side], name: str, *, events: str | None, **kwargs: Any) -> Side:
    """Make a side that watches the network and records ``events``; a setting it refuses
    (a --signal that is no WebSocket URL...) is a usage error with its message, not a
    traceback."""
    try:
        return kind(name, events=EventLog(events), watch_network=True, **kwargs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def make_core(loopback: bool, ice_servers: list[str] | None, turn_user: str | None,
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
