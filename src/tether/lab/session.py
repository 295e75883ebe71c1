"""One scenario run's world: the topology, the tether processes, the echo checker.

Start order (``start``): relay in R -> echo server and ``tether expose`` in B -> ``tether
connect`` in A -> the echo checker in A, then wait until an echo works. ``async with``
always stops every process and removes the namespaces, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import metrics, netns
from .echo_client import DRAIN_CAP
from .procs import EchoChecker, Processes, wait_listening
from .topology import Topology

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
TUNNEL = "lab"
SERVE_PORT = 8765
ECHO_PORT = 7000
LISTEN_PORT = 7001
TURN_PORT = 3478
TURN_MIN_PORT = 49152
TURN_MAX_PORT = 49999
TURN_USER = "lab"
TURN_PASSWORD = "lab-secret"
TUN_DEVICE = "tdly"


@dataclass
class LabOptions:
    """Knobs of a lab run; the defaults are the issue's numbers."""

    rate: float = 1_000_000.0       # echo bytes per second
    give_up_s: float = 60.0         # longest wait for a recovery before scoring it as none
    baseline_s: float = 2.0         # echo running before the fault
    settle_s: float = 1.0           # echo kept running after the recovery
    cut_s: float = 3.0              # link_cut
    outage_s: float = 150.0         # long_outage
    idle_s: float = 20.0            # nat_idle_keepalive
    nat_timeout_s: int = 3
    loss_percent: int = 5
    loss_bytes: int = 50 * MiB
    loss_timeout_s: float = 300.0
    slow_s: float = 15.0
    delay_s: float = 0.3            # each way: 0.6 s round trip
    relay_watch_s: float = 8.0
    start_timeout_s: float = 45.0   # first echo after the processes start
    drain_s: float = 5.0
    keep: bool = False
    core: str = "aiortc"            # the peers' WebRTC core: aiortc or keeper (the Rust core)


class LabSession:
    """Topology + processes + checker for one scenario run."""

    def __init__(self, name: str, options: LabOptions, flags: set[str], run_dir: Path) -> None:
        self.name = name
        self.options = options
        self.flags = flags
        self.run_dir = run_dir
        self.topo = Topology()
        self.procs = Processes(run_dir)
        self.token = secrets.token_urlsafe(12)
        # The tunnel secret both peers share, passed in the environment (not in `ps`).
        self.peer_env = {"TETHER_SECRET": secrets.token_urlsafe(32)}
        self.echo: EchoChecker | None = None
        self.turn = False
        self.events_on = {"connect --events", "expose --events"} <= flags
        self.turn_creds = {"connect --turn-user", "expose --turn-user"} <= flags
        self.finished = False

    @property
    def signal_url(self) -> str:
        return f"ws://{self.topo.plan.rb}:{SERVE_PORT}"

    def events_file(self, side: str) -> Path:
        return self.run_dir / f"{side}.events.jsonl"

    async def __aenter__(self) -> LabSession:
        await self.topo.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.echo is not None and not self.finished:
                await self.finish()
        finally:
            try:
                await self.procs.stop_all()
            finally:
                await self.topo.destroy()

    # -- processes -----------------------------------------------------------------------

    def _tether(self, *args: str) -> list[str]:
        return self.procs.py("-m", "tether.cli", *args)

    def _peer_args(self, side: str) -> list[str]:
        # The tunnel secret travels in the environment (peer_env), out of `ps` and the logs.
        args = ["--signal", self.signal_url, "--token", self.token]
        if self.events_on:
            args += ["--events", str(self.events_file(side))]
        if self.options.core != "aiortc":
            args += ["--core", self.options.core]
        if self.turn:
            args += ["--ice-server", f"turn:{self.topo.plan.rb}:{TURN_PORT}"]
            if self.turn_creds:
                args += ["--turn-user", TURN_USER, "--turn-password", TURN_PASSWORD]
        return args

    async def start_serve(self, wait: bool = True) -> None:
        proc = await self.procs.start("serve", self.topo.r, self._tether(
            "serve", "--host", self.topo.plan.rb, "--port", str(SERVE_PORT),
            "--token", self.token))
        if wait:
            await wait_listening(self.topo.r, SERVE_PORT, 20.0, proc)

    async def start_echo_server(self) -> None:
        proc = await self.procs.start("echo_server", self.topo.b, self.procs.py(
            "-m", "tether.lab.echo_server", "--port", str(ECHO_PORT)))
        await wait_listening(self.topo.b, ECHO_PORT, 20.0, proc)

    async def start_expose(self) -> None:
        await self.procs.start("expose", self.topo.b, self._tether(
            "expose", TUNNEL, "--target", f"127.0.0.1:{ECHO_PORT}", *self._peer_args("expose")),
            env=self.peer_env)

    async def start_connect(self) -> None:
        proc = await self.procs.start("connect", self.topo.a, self._tether(
            "connect", TUNNEL, "--listen", f"127.0.0.1:{LISTEN_PORT}",
            *self._peer_args("connect")), env=self.peer_env)
        await wait_listening(self.topo.a, LISTEN_PORT, 20.0, proc)

    async def start_turn(self) -> None:
        """coturn in R with a static user; both peers then get it as their ICE server."""
        p = self.topo.plan
        proc = await self.procs.start("turnserver", self.topo.r, [
            "turnserver", "-n", f"--listening-ip={p.rb}", f"--relay-ip={p.rb}",
            f"--listening-port={TURN_PORT}", f"--min-port={TURN_MIN_PORT}",
            f"--max-port={TURN_MAX_PORT}",
            f"--user={TURN_USER}:{TURN_PASSWORD}", "--realm=tether.lab", "--lt-cred-mech",
            "--fingerprint", "--no-tls", "--no-dtls", "--no-cli", "--log-file=stdout",
            "--simple-log", f"--pidfile={self.run_dir / 'turnserver.pid'}",
        ])
        await wait_listening(self.topo.r, TURN_PORT, 20.0, proc)
        self.turn = True

    async def turn_relays(self) -> int:
        """How many relay sockets coturn holds in R (its relay port range)."""
        out = await netns.run("ip", "netns", "exec", self.topo.r, "ss", "-Huan",
                              f"sport >= :{TURN_MIN_PORT} and sport <= :{TURN_MAX_PORT}",
                              check=False)
        return len(out.strip().splitlines())

    async def start_delayer(self) -> None:
        """The TUN and its delay line in R, with everything R forwards routed through it,
        at no delay yet (:meth:`set_delay` is the fault)."""
        await self.topo.add_tun(TUN_DEVICE)
        proc = await self.procs.start("delayer", self.topo.r, self.procs.py(
            "-m", "tether.lab.delayer", "--device", TUN_DEVICE, "--delay", "0"), stdin=True)
        deadline = time.monotonic() + 20.0
        while b'"ready"' not in await asyncio.to_thread(proc.log.read_bytes):
            if not proc.running or time.monotonic() > deadline:
                raise RuntimeError(f"the delayer did not start (see {proc.log})")
            await asyncio.sleep(0.1)
        await self.topo.slow_path(TUN_DEVICE)

    async def set_delay(self, seconds: float) -> None:
        proc = self.procs.procs.get("delayer")
        if proc is None or not proc.running or proc.process.stdin is None:
            raise RuntimeError("the delayer is not running")
        proc.process.stdin.write(f"delay {seconds}\n".encode())
        await proc.process.stdin.drain()

    async def start_checker(self, rate: float | None = None, total: int = 0) -> EchoChecker:
        rate = self.options.rate if rate is None else rate
        proc = await self.procs.start("echo_client", self.topo.a, self.procs.py(
            "-m", "tether.lab.echo_client", "--port", str(LISTEN_PORT), "--rate", str(rate),
            "--total", str(total), "--drain-timeout", str(self.options.drain_s),
            "--retry-for", str(self.options.give_up_s)), stdin=True, stdout_pipe=True)
        self.echo = EchoChecker(proc)
        return self.echo

    async def start(self, rate: float | None = None, total: int = 0) -> EchoChecker:
        """Everything, in order; returns once the first byte came back through the tunnel."""
        await self.start_serve()
        await self.start_echo_server()
        await self.start_expose()
        await self.start_connect()
        echo = await self.start_checker(rate, total)
        t0 = time.monotonic()
        if not await echo.until(lambda: any(c.first_echo for c in echo.conns.values()),
                                self.options.start_timeout_s):
            raise RuntimeError(f"no echo through a fresh tunnel after "
                               f"{self.options.start_timeout_s:.0f} s")
        logger.info("%s: first echo %.1f s after the checker started", self.name,
                    time.monotonic() - t0)
        return echo

    async def restart(self, name: str) -> float:
        """SIGKILL ``name`` and start it again at once; the time it was started again."""
        await self.procs.kill(name)
        if name == "expose":
            await self.start_expose()
        elif name == "serve":
            await self.start_serve(wait=False)
        else:
            raise ValueError(f"cannot restart {name!r}")
        return time.time()

    # -- results -------------------------------------------------------------------------

    async def finish(self) -> None:
        """Drain and stop the checker (its ``final`` report is the last word on bytes)."""
        self.finished = True
        if self.echo is not None:
            await self.echo.finish(DRAIN_CAP + self.options.drain_s + 5.0)

    def events(self) -> list[dict[str, Any]]:
        """Both peers' events (blocking file reads: call via ``asyncio.to_thread``)."""
        out: list[dict[str, Any]] = []
        for side in ("connect", "expose"):
            path = self.events_file(side)
            with contextlib.suppress(FileNotFoundError):
                with open(path, errors="replace") as f:
                    out += metrics.parse_lines(f, side=side)
        return out
