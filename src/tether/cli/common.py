"""What every command shares: consoles, option types, logging, running a main coroutine
with clean Ctrl-C/SIGTERM handling, and turning setting errors into usage errors."""

from __future__ import annotations

import contextlib
import logging
import os
import signal as os_signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

logger = logging.getLogger(__name__)

# Importing this module (every command does, for --help and --version too) must stay light:
# asyncio, rich, websockets, cryptography, aiortc... load inside the functions that use them
# (docs/startup.md; tests/test_startup.py checks it).
if TYPE_CHECKING:
    import asyncio

    from rich.console import Console

    from ..app import Side


class LazyConsole:
    """A rich Console made on first use: importing rich.console costs ~50 ms, which
    `tether --version`, `--help` and `status` need not pay. Attribute reads go to the
    console; :meth:`get` gives the Console itself (for rich.live.Live)."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


# soft_wrap: never wrap at 80 columns when not on a terminal (services, pipes, grep).
console = LazyConsole(stderr=True, soft_wrap=True)
out = LazyConsole(soft_wrap=True)

Verbose = Annotated[int, typer.Option(
    "--verbose", "-v", count=True, show_default=False,
    help="-v: tether's debug logs and tracebacks; -vv: also aiortc, aioice, websockets.")]
LogFormat = Annotated[str, typer.Option(
    "--log-format", envvar="TETHER_LOG_FORMAT", metavar="text|json",
    help="Log lines as text or JSON objects (or TETHER_LOG_FORMAT).")]
StatusInterval = Annotated[float, typer.Option(
    "--status-interval", min=0.0, metavar="SECONDS",
    help="When not on a terminal, log a one-line status this often (0: never).")]
def _check_metrics(value: str | None) -> str | None:
    if value is not None:
        parse_address(value, "--metrics")
    return value


Metrics = Annotated[str | None, typer.Option(
    "--metrics", metavar="HOST:PORT", callback=_check_metrics,
    help="Serve Prometheus metrics on http://HOST:PORT/metrics.")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="TETHER_TOKEN", metavar="TOKEN",
                 help="The relay's token (required: this or TETHER_TOKEN)."),
]
Signal = Annotated[
    list[str],
    typer.Option("--signal", help="Signaling relay URL, e.g. ws://127.0.0.1:8765; repeat it "
                                  "for relays that share a Redis (the next one is tried when "
                                  "one fails)."),
]
Loopback = Annotated[
    bool, typer.Option("--loopback", help="Gather ICE candidates on 127.0.0.1 only.")
]
IceServer = Annotated[
    list[str] | None,
    typer.Option("--ice-server", metavar="URL",
                 help="STUN/TURN URL (repeatable): stun:HOST:PORT, turn:HOST:PORT, "
                      "turns:HOST:PORT; none by default."),
]
TurnUser = Annotated[
    str | None,
    typer.Option("--turn-user", metavar="USER", help="User name for the turn:/turns: servers."),
]
TurnPassword = Annotated[
    str | None,
    typer.Option("--turn-password", envvar="TETHER_TURN_PASSWORD", metavar="PASSWORD",
                 help="Password for the turn:/turns: servers (or TETHER_TURN_PASSWORD)."),
]
Secret = Annotated[
    str | None,
    typer.Option("--secret", envvar="TETHER_SECRET", show_default=False, metavar="SECRET",
                 help="The tunnel secret both peers share; the relay never sees it. Prefer "
                      "TETHER_SECRET or --secret-file: --secret shows in `ps`."),
]
SecretFile = Annotated[
    str | None,
    typer.Option("--secret-file", metavar="FILE", help="Read the tunnel secret from this file."),
]
CaFile = Annotated[
    str | None,
    typer.Option("--ca", metavar="FILE", help="CA certificate file to verify a wss:// relay with "
                              "(default: the system's store)."),
]
Events = Annotated[
    str | None,
    typer.Option("--events", metavar="FILE",
                 help="Append what happens (states, network changes, tubes) "
                      "to this file as JSON lines."),
]


def setup_logging(verbose: int, default: int = logging.INFO, log_format: str | None = None) -> None:
    """One line per event, timestamped, secrets redacted (tether.logs); -v, -vv."""
    from .. import logs

    fmt = log_format or os.environ.get("TETHER_LOG_FORMAT") or "text"
    if fmt not in logs.FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not a log format: use text or json",
                                 param_hint="--log-format")
    logs.setup(int(verbose), fmt, console=console, default=default)


def parse_address(value: str, option: str) -> tuple[str, int]:
    from ..tunnel import parse_hostport

    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def read_secret(secret: str | None, secret_file: str | None) -> str | None:
    from ..sealing import MIN_SECRET_CHARS

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
    finally blocks close everything: the peer is told, so it can re-offer at once).

    ``main`` runs as its own task and is cancelled from here, again every few seconds
    until it has ended: a cancellation that lands while some code swallows one must not
    leave a stopped tunnel running (seen: 1 `tether stop` in 3 under load). Python 3.11's
    ``asyncio.wait_for`` is such code: it loses a cancellation that arrives as its inner
    future completes (cpython#86296, fixed in 3.12), so tether itself waits with
    ``asyncio.timeout``; libraries under it may still use ``wait_for``."""
    import asyncio

    loop = asyncio.get_running_loop()
    terminated = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(os_signal.SIGTERM, terminated.set)
    work = asyncio.ensure_future(main())
    signalled = asyncio.ensure_future(terminated.wait())
    try:
        await asyncio.wait({work, signalled}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # Ctrl-C: end main the same way, then stop
        await _end(work)
        raise
    finally:
        signalled.cancel()
    if not work.done():
        await _end(work)
        logger.info("stopped")
        return None
    return work.result()


async def _end(work: asyncio.Future[Any]) -> None:
    """Cancel ``work`` until it is done (its cleanup gets RECANCEL_AFTER seconds a try)."""
    import asyncio

    tries = 0
    while not work.done():
        if tries:
            logger.warning("still running %.0f s after it was stopped; cancelling again",
                           tries * RECANCEL_AFTER)
        work.cancel()
        await asyncio.wait({work}, timeout=RECANCEL_AFTER)
        tries += 1
    if not work.cancelled() and work.exception() is not None:
        logger.debug("stopping: %r", work.exception())


# How long a cancelled main may take to close before it is cancelled again.
RECANCEL_AFTER = 5.0


def run_main(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main``; Ctrl-C and SIGTERM end it cleanly (its finally blocks close everything)."""
    from .. import logs, runloop
    from ..signaling.client import AuthenticationError, CertificateError, ConversationFullError
    from .errors import explain_os_error

    try:
        return runloop.run(stoppable(main))
    except KeyboardInterrupt:
        console.print("stopped")
        return None
    except AuthenticationError as exc:
        # The exception already says the relay refused the token: don't say it twice.
        console.print(f"error: {exc}. Check --token (or TETHER_TOKEN).", markup=False,
                      highlight=False)
        raise typer.Exit(2) from None
    except CertificateError as exc:
        # The exception says what did not verify: add only where the CA goes.
        why = str(exc).removesuffix(" (give the CA that signed it)")
        console.print(f"error: {why}. Give the CA that signed it with --ca FILE.",
                      markup=False, highlight=False)
        raise typer.Exit(2) from None
    except ConversationFullError as exc:
        console.print(f"[red]conversation is full[/red]: {exc}. Is another peer using this NAME?")
        raise typer.Exit(2) from None
    except OSError as exc:  # a busy or unusable listen address, most often
        if logs.verbosity() >= 1:
            raise
        console.print(f"error: {explain_os_error(exc)}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    except OverflowError as exc:  # a port beyond 65535 (`serve --port 70000`)
        console.print(f"error: {exc}. A port is a number from 0 to 65535 (0: any free one).",
                      markup=False, highlight=False)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, typer.BadParameter, typer.exceptions.TyperException):
        raise  # usage errors and exits keep their own messages and codes
    except Exception as exc:  # a bug or an unforeseen failure: one line, details with -v
        if logs.verbosity() >= 1 or getattr(exc, "passthrough", False):
            raise
        console.print(f"error: {type(exc).__name__}: {exc} (run again with -v for the "
                      "traceback)", markup=False, highlight=False)
        raise typer.Exit(1) from None


def make_side(kind: type[Side], name: str, *, events: str | None, **kwargs: Any) -> Side:
    """Make a side that watches the network and records ``events``; a setting it refuses
    (a --signal that is no WebSocket URL...) is a usage error with its message, not a
    traceback."""
    from .. import logs
    from ..events import EventLog

    logs.add_secret(kwargs.get("token"), kwargs.get("secret"))  # never in any log line
    urls = kwargs.get("signal_url")
    for url in [urls] if isinstance(urls, str) else list(urls or []):
        if not url.lower().startswith(("ws://", "wss://")):
            raise typer.BadParameter(
                f"{url!r} is not a WebSocket URL: expected ws://HOST:PORT or wss://HOST:PORT "
                "(the address `tether serve` prints)", param_hint="--signal")
    try:
        return kind(name, events=EventLog(events), watch_network=True, **kwargs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def make_core(loopback: bool, ice_servers: list[str] | None, turn_user: str | None,
              turn_password: str | None, core: str = "aiortc") -> Any:
    """The named core (tether.api.build_core), its complaints as usage errors."""
    from ..api import CORES, build_core

    servers = ice_servers or []
    if any(url.startswith(("turn:", "turns:")) for url in servers) and not (
            turn_user and turn_password):
        raise typer.BadParameter("a turn:/turns: server needs --turn-user and --turn-password "
                                 "(or TETHER_TURN_PASSWORD)", param_hint="--ice-server")
    if core not in CORES:
        raise typer.BadParameter(f"unknown core {core!r}: {' or '.join(CORES)}",
                                 param_hint="--core")
    try:
        return build_core(core, loopback, servers, turn_user, turn_password)
    except ValueError as exc:
        hint = "--ice-server" if "server" in str(exc) else "--core"
        raise typer.BadParameter(str(exc), param_hint=hint) from None


CoreName = Annotated[str, typer.Option(
    "--core", metavar="aiortc|keeper",
    help="WebRTC core: aiortc (default) or keeper (the Rust core, "
         "pip install 'tether[keeper]').")]
