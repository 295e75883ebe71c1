"""`tether expose` and `tether connect`: the two ends of a tunnel, with a live table."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from . import app, modes
from .status import operate
from .common import (
    CaFile, CoreName, Events, IceServer, LogFormat, Loopback, Metrics, Secret, SecretFile,
    StatusInterval, Token, TurnPassword, TurnUser, Verbose, console, make_core, make_side,
    need_token, out, parse_address, read_secret, run_main, setup_logging,
)

# The sides (asyncio, signaling, the tunnel) load when a command runs, not to register it.
if TYPE_CHECKING:
    from ..app import Side


@app.command()
def expose(
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="Tunnel name, shared with the connecting side.")],
    target: modes.OptTarget = None,
    signal: modes.OptSignal = None,
    allow: modes.Allow = None,
    config: modes.ConfigPath = None,
    keepalive_interval: modes.KeepaliveInterval = None,
    liveness_interval: modes.LivenessInterval = None,
    liveness_misses: modes.LivenessMisses = None,
    restart_base: modes.RestartBase = None,
    restart_max: modes.RestartMax = None,
    restart_attempts: modes.RestartAttempts = None,
    connect_timeout: modes.ConnectTimeout = None,
    answer_timeout: modes.AnswerTimeout = None,
    token: Token = None,
    loopback: Loopback = False,
    ice_server: IceServer = None,
    turn_user: TurnUser = None,
    turn_password: TurnPassword = None,
    secret: Secret = None,
    secret_file: SecretFile = None,
    ca: CaFile = None,
    events: Events = None,
    core: CoreName = "aiortc",
    verbose: Verbose = False,
    log_format: LogFormat = "text",
    status_interval: StatusInterval = 30.0,
    metrics: Metrics = None,
) -> None:
    """Expose TARGET as tunnel NAME: answer tubes and dial TARGET for each stream.

    Only a peer with the tunnel secret can connect; without --secret a strong one is made
    and the exact `tether connect` line to use is printed.
    """
    from ..app import ExposeSide
    from ..sealing import new_secret

    setup_logging(verbose, log_format=log_format)
    merged = modes.settings(
        "expose", name, config_path=config, signal=signal, token=token, ca=ca,
        secret=read_secret(secret, secret_file), knobs=modes.knob_flags(locals()))
    signal, token, ca, secret = merged.signal, merged.token, merged.ca, merged.secret
    target, allow = modes.expose_defaults(merged, target, allow)
    address = parse_address(target, "--target") if target is not None else None
    allow_list = modes.parse_allow(allow)
    if address is None and allow_list is None:
        raise typer.BadParameter("give --target HOST:PORT, --allow HOST:PORTS,... (targets "
                                 "the peer names), or both", param_hint="--target")
    target = target or f"targets allowed by --allow {allow_list}"
    token = need_token(token)
    if secret is None:
        secret = new_secret()
        console.print("no tunnel secret given; made one. On the connecting machine run:")
        # Everything the other end must match (its own TURN credentials aside).
        flags = [f"--signal {url}" for url in signal]
        flags += [f"--ice-server {url}" for url in ice_server or []]
        flags += ["--loopback"] * loopback + [f"--core {core}"] * (core != "aiortc")
        flags += [f"--ca {ca}"] * bool(ca)
        flags.append("--listen 127.0.0.1:0" if address is not None
                     else "--socks 127.0.0.1:1080")
        out.print(f"  TETHER_SECRET={secret} tether connect {name} {' '.join(flags)}",
                  highlight=False, soft_wrap=True)

    tube_core = make_core(loopback, ice_server, turn_user, turn_password, core)
    modes.apply_liveness(tube_core, merged.liveness)
    side = make_side(ExposeSide, name, target=address, allow=allow_list, signal_url=signal,
                 token=token, core=tube_core, events=events, secret=secret, ca_file=ca,
                 policy=merged.policy)
    console.print(f"exposing {target} as {name!r} via {', '.join(signal)}")
    run_side(side, lambda: f"expose {name} -> {target}", status_interval=status_interval,
             metrics=metrics)


@app.command()
def connect(
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="Tunnel name, as given to `tether expose`.")],
    listen: modes.OptListen = None,
    signal: modes.OptSignal = None,
    socks: modes.Socks = None,
    socks_users: modes.SocksUsers = None,
    run: modes.Run = None,
    config: modes.ConfigPath = None,
    keepalive_interval: modes.KeepaliveInterval = None,
    liveness_interval: modes.LivenessInterval = None,
    liveness_misses: modes.LivenessMisses = None,
    restart_base: modes.RestartBase = None,
    restart_max: modes.RestartMax = None,
    restart_attempts: modes.RestartAttempts = None,
    connect_timeout: modes.ConnectTimeout = None,
    answer_timeout: modes.AnswerTimeout = None,
    token: Token = None,
    loopback: Loopback = False,
    ice_server: IceServer = None,
    turn_user: TurnUser = None,
    turn_password: TurnPassword = None,
    secret: Secret = None,
    secret_file: SecretFile = None,
    ca: CaFile = None,
    events: Events = None,
    core: CoreName = "aiortc",
    verbose: Verbose = False,
    log_format: LogFormat = "text",
    status_interval: StatusInterval = 30.0,
    metrics: Metrics = None,
) -> None:
    """Listen on LISTEN and carry every connection through tunnel NAME.

    With --socks, also (or only) a SOCKS5 server; with --run CMD, run CMD against a free
    local port and exit with its exit code.
    """
    from ..app import ConnectSide
    from ..tunnel import format_hostport

    setup_logging(verbose, log_format=log_format)
    merged = modes.settings(
        "connect", name, config_path=config, signal=signal, token=token, ca=ca,
        secret=read_secret(secret, secret_file), knobs=modes.knob_flags(locals()))
    signal, token, ca, secret = merged.signal, merged.token, merged.ca, merged.secret
    listen, socks, users = modes.connect_defaults(merged, listen, socks, run)
    if listen is None and run is not None:
        listen = "127.0.0.1:0"
    if listen is None and socks is None:
        raise typer.BadParameter("give --listen HOST:PORT, --socks HOST:PORT, --run CMD, or "
                                 "a combination", param_hint="--listen")
    address = parse_address(listen, "--listen") if listen is not None else None
    socks_address = parse_address(socks, "--socks") if socks is not None else None
    users = modes.socks_users(socks_users) if socks_users is not None else users
    argv = modes.split_command(run) if run is not None else None
    token = need_token(token)
    if secret is None:
        raise typer.BadParameter("give the tunnel secret that `tether expose` printed "
                                 "(TETHER_SECRET, --secret-file or --secret)",
                                 param_hint="--secret")

    tube_core = make_core(loopback, ice_server, turn_user, turn_password, core)
    modes.apply_liveness(tube_core, merged.liveness)
    side = make_side(ConnectSide, name, listen=address, socks=socks_address,
                 socks_users=users, signal_url=signal, token=token, core=tube_core,
                 events=events, secret=secret, ca_file=ca, policy=merged.policy)
    if argv is not None:
        assert isinstance(side, ConnectSide)
        modes.run_with_command(side, argv)

    def title() -> str:
        shown = "(no local listener)"
        if side.server is not None:
            host, port = side.listen_address
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            out.print(f"listening on {shown}", highlight=False)
        if side.socks is not None:
            where = format_hostport(*side.socks.address)
            out.print(f"SOCKS5 on {where}", highlight=False)
            shown += f", SOCKS5 on {where}"
        return f"connect {name} on {shown}"

    run_side(side, title, status_interval=status_interval, metrics=metrics)


def run_side(side: Side, title: Callable[[], str], *, status_interval: float = 30.0,
             metrics: str | None = None) -> None:
    """Start ``side``, then serve its control socket (and ``metrics``) and show it
    (``title()`` once started) until Ctrl-C, SIGTERM or `tether stop`."""

    async def main() -> None:
        try:
            await side.start()
            await operate(side, title, status_interval=status_interval, metrics=metrics)
        finally:
            await side.close()

    run_main(main)
