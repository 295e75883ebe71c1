"""What `expose` and `connect` take besides a plain forward: a config file, policy knobs,
--allow, --socks and --run. Option types and the helpers behind them."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal as os_signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import console, run_main

# The config, the state machine, the sides... load when a command runs (startup).
if TYPE_CHECKING:
    from .. import config as config_mod
    from ..allow import AllowList
    from ..app import ConnectSide
    from ..machine import ICERestartPolicy

logger = logging.getLogger(__name__)

ConfigPath = Annotated[str | None, typer.Option(
    "--config", envvar="TETHER_CONFIG", metavar="FILE",
    help="TOML config file (default: ~/.config/tether/config.toml, if it exists): relay, "
         "token, secrets, policy knobs.")]
OptSignal = Annotated[list[str] | None, typer.Option(
    "--signal", metavar="URL",
    help="Signaling relay URL, e.g. ws://127.0.0.1:8765; repeat it for relays that share "
         "a Redis (the next one is tried when one fails). Default: `signal` in the config.")]
OptTarget = Annotated[str | None, typer.Option(
    "--target", metavar="HOST:PORT", help="HOST:PORT to forward every stream to, e.g. "
    "127.0.0.1:22 (optional with --allow).")]
Allow = Annotated[list[str] | None, typer.Option(
    "--allow", metavar="HOST:PORTS,...",
    help="Targets the peer may name itself (SOCKS): HOST:PORTS rules, comma-separated or "
         "repeated; HOST: IP, CIDR, [IPv6/BITS], name, *.domain, *; PORTS: 22, "
         "8000-8100, *. Deny by default.")]
OptListen = Annotated[str | None, typer.Option(
    "--listen", metavar="HOST:PORT",
    help="Local HOST:PORT to listen on (port 0: any). Default with --run: 127.0.0.1:0.")]
Socks = Annotated[str | None, typer.Option(
    "--socks", metavar="HOST:PORT",
    help="Also run a SOCKS5 server here; clients name their targets, the exposing side's "
         "--allow decides. No authentication on loopback only.")]
SocksUsers = Annotated[str | None, typer.Option(
    "--socks-users", metavar="FILE",
    help="user:password lines: SOCKS5 clients must authenticate (required off loopback).")]
Run = Annotated[str | None, typer.Option(
    "--run", metavar="CMD",
    help="Run CMD once the tunnel is up ({port} and $TETHER_PORT: the local port; split "
         "like a shell, no shell: use sh -c '...' for pipes), stop when it exits, and "
         "exit with its code.")]

KeepaliveInterval = Annotated[float | None, typer.Option(
    "--keepalive-interval", metavar="S", show_default=False,
    help="Send a keepalive after this long without traffic (default 300).")]
LivenessInterval = Annotated[float | None, typer.Option(
    "--liveness-interval", metavar="S", show_default=False,
    help="Probe the path this often when idle (default 1).")]
LivenessMisses = Annotated[int | None, typer.Option(
    "--liveness-misses", metavar="N", show_default=False,
    help="An idle path is dead after about N silent intervals (default 3).")]
RestartBase = Annotated[float | None, typer.Option(
    "--restart-base", metavar="S", show_default=False,
    help="First ICE restart backoff (default 5), doubling up to --restart-max.")]
RestartMax = Annotated[float | None, typer.Option(
    "--restart-max", metavar="S", show_default=False, help="Longest backoff (default 60).")]
RestartAttempts = Annotated[int | None, typer.Option(
    "--restart-attempts", metavar="N", show_default=False,
    help="ICE restarts before a tube counts as failed (default 5; a tube that worked "
         "is still retried every --restart-max).")]
ConnectTimeout = Annotated[float | None, typer.Option(
    "--connect-timeout", metavar="S", show_default=False,
    help="Replace a tube that does not connect within this (default 15).")]
AnswerTimeout = Annotated[float | None, typer.Option(
    "--answer-timeout", metavar="S", show_default=False,
    help="How long a restart waits for the peer's answer (default 15).")]


def _empty_config() -> config_mod.Config:
    from .. import config as config_mod

    return config_mod.Config()


@dataclass
class Settings:
    """What a command runs with once flags, the config file and defaults are merged."""

    signal: list[str]
    token: str | None
    ca: str | None
    secret: str | None
    policy: ICERestartPolicy
    liveness: dict[str, float] = field(default_factory=dict)
    config: config_mod.Config = field(default_factory=_empty_config)
    entry: config_mod.TunnelConfig | None = None  # the config's tunnel of this kind and name


def knob_flags(arguments: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The policy-knob flags among a command's arguments (they are named as the config's keys)."""
    from .. import config as config_mod

    return {key: arguments[key] for key in config_mod.KNOBS}


def settings(kind: str, name: str, *, config_path: str | None, signal: list[str] | None,
             token: str | None, ca: str | None, secret: str | None,
             knobs: Mapping[str, float | int | None]) -> Settings:
    """Flags first, then the config file (the tunnel's own entry, then its top level)."""
    from .. import config as config_mod

    given = {k: v for k, v in knobs.items() if v is not None}
    for key, value in given.items():
        if value <= 0:
            raise typer.BadParameter(f"must be positive, got {value}",
                                     param_hint="--" + key.replace("_", "-"))
    try:
        cfg = config_mod.load(config_path, required=config_path is not None)
        flags = config_mod.parse_policy(given, "flags")
    except config_mod.ConfigError as exc:
        hint = "--config" if not str(exc).startswith("flags") else "policy flags"
        raise typer.BadParameter(str(exc).removeprefix("flags: "), param_hint=hint) from None
    entry = cfg.find(kind, name)
    policy = cfg.policy
    if entry is not None:
        policy = entry.policy.over(policy)
        secret = secret if secret is not None else entry.secret
    policy = flags.over(policy)
    try:
        restart = policy.restart_policy()
    except config_mod.ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="policy flags") from None
    url = list(signal or cfg.signal)
    if not url:
        raise typer.BadParameter("give the relay's URL, e.g. --signal ws://HOST:8765 (or "
                                 "`signal` in the config file)", param_hint="--signal")
    return Settings(url, token or cfg.token, ca or cfg.ca, secret, restart, policy.liveness(),
                    cfg, entry)


def expose_defaults(merged: Settings, target: str | None,
                    allow: list[str] | None) -> tuple[str | None, list[str] | None]:
    """--target and --allow, else the config's entry for this tunnel (both, or neither)."""
    from ..tunnel import format_hostport

    entry = merged.entry
    if target is not None or allow or entry is None:
        return target, allow
    return (format_hostport(*entry.target) if entry.target else None,
            list(entry.allow) or None)


def connect_defaults(merged: Settings, listen: str | None, socks: str | None,
                     run: str | None) -> tuple[str | None, str | None, dict[str, str] | None]:
    """--listen and --socks, else the config's entry for this tunnel; and its SOCKS users."""
    from ..tunnel import format_hostport

    entry = merged.entry
    if listen is not None or socks is not None or run is not None or entry is None:
        return listen, socks, None
    return (format_hostport(*entry.listen) if entry.listen else None,
            format_hostport(*entry.socks) if entry.socks else None,
            dict(entry.socks_users) if entry.socks_users else None)


def parse_allow(rules: list[str] | None) -> AllowList | None:
    if not rules:
        return None
    from ..allow import AllowList

    try:
        return AllowList.parse(rules)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--allow") from None


def socks_users(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    from ..socks import read_users

    try:
        return read_users(path)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}",
                                 param_hint="--socks-users") from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--socks-users") from None


def split_command(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise typer.BadParameter(f"cannot split {command!r}: {exc}", param_hint="--run") from None
    if not argv:
        raise typer.BadParameter("the command is empty", param_hint="--run")
    return argv


def apply_liveness(core: Any, liveness: Mapping[str, float]) -> None:
    """The core reads its liveness settings for each new tube."""
    if liveness:
        core.liveness = {**getattr(core, "liveness", {}), **liveness}


def _terminal_delivers_sigint() -> bool:
    """Ctrl-C on our terminal already reaches the command (same foreground group)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


#: How long --run waits for the tunnel before starting the command anyway.
RUN_WAIT = 30.0


async def run_command(side: ConnectSide, argv: list[str], *,
                      wait: float = RUN_WAIT,
                      announce: Callable[[str], None] | None = None) -> int:
    """Start ``side``, run ``argv`` with the local port, stop when it exits; its exit code
    (128+N if a signal N ended it). SIGTERM and SIGHUP are forwarded to the command, and
    SIGINT too unless the terminal delivered it to the command already; a third signal
    kills it."""
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        await side.start()
        host, port = side.listen_address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if announce is not None:
            announce(shown)
        try:
            await side.wait_ready(wait)
        except TimeoutError:
            logger.warning("no tube to %r after %.0f s; starting the command anyway (its "
                           "connections wait for the tube)", side.name, wait)
        command = [a.replace("{port}", str(port)).replace("{host}", host) for a in argv]
        env = {**os.environ, "TETHER_PORT": str(port), "TETHER_HOST": host}
        try:
            process = await asyncio.create_subprocess_exec(*command, env=env)
        except OSError as exc:
            console.print(f"error: cannot run {command[0]!r}: {exc.strerror}", markup=False,
                          highlight=False)
            return 127
        logger.info("running %s (pid %d) with TETHER_PORT=%d", shlex.join(command),
                    process.pid, port)
        signals_seen = 0
        skip_sigint = _terminal_delivers_sigint()

        def forward(sig: int) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if process.returncode is not None:
                return
            if signals_seen >= 3:
                logger.warning("third signal: killing the command")
                process.kill()
            elif not (sig == os_signal.SIGINT and skip_sigint):
                process.send_signal(sig)

        handled = (os_signal.SIGINT, os_signal.SIGTERM, os_signal.SIGHUP)
        for sig in handled:
            loop.add_signal_handler(sig, forward, sig)
        try:
            code = await process.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            if process.returncode is None:
                process.kill()
                with contextlib.suppress(ProcessLookupError):
                    await process.wait()
        logger.info("the command exited with %d; stopping the tunnel", code)
        return code if code >= 0 else 128 - code
    finally:
        await side.close()


def run_with_command(side: ConnectSide, argv: list[str]) -> None:
    """The CLI's --run: exit with the command's code."""

    def announce(shown: str) -> None:
        # stderr: CMD's own output on stdout may be redirected (`--run 'pg_dump ...' > f`).
        console.print(f"listening on {shown}", highlight=False)

    code = run_main(lambda: run_command(side, argv, announce=announce))
    raise typer.Exit(code if isinstance(code, int) else 1)
