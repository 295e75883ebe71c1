"""tether's real CLI processes on loopback: ``serve`` + ``expose`` + ``connect``.

Each measurement starts the three processes afresh (``--loopback``, events files on),
waits for the connecting side's tunnel to open (``connect_ms``: its events file says how
long from the offer to the open tunnel), then pushes the payload through the tunnel to a
hashing sink and pulls it from a source, both checked byte for byte. CPU per side comes
from /proc/PID/stat before and after each transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checked
from .checked import Payload
from .procstat import cpu_seconds
from .signaling import free_port, stop, wait_port

OPEN_TIMEOUT = 60.0


class _Target:
    """The exposed target: a sink (push) or a source (pull), switched between transfers."""

    def __init__(self, payload: Payload) -> None:
        self.mode = "push"
        self._source = checked.source_handler(payload)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "push":
            await checked.sink_handler(reader, writer)
        else:
            await self._source(reader, writer)


def _open_event(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "tube" and record.get("what") == "open":
                    return record
    return None


def _connect_ms(path: Path, record: dict[str, Any]) -> float | None:
    detail = str(record.get("detail", ""))
    with contextlib.suppress(ValueError):
        return float(detail.removesuffix("ms").strip())
    offered = None
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("event") == "tube" and r.get("what") == "offered":
                    offered = r["ts"]
    return None if offered is None else (record["ts"] - offered) * 1000.0


@dataclass
class Running:
    """A tunnel of real CLI processes, open: where to connect, and who to measure."""

    address: tuple[str, int]
    expose_pid: int
    connect_pid: int
    connect_ms: float | None
    start_to_open_ms: float

    def cpu(self) -> list[float | None]:
        return [cpu_seconds(self.expose_pid), cpu_seconds(self.connect_pid)]


@contextlib.asynccontextmanager
async def cli_tunnel(target_port: int, flags: Sequence[str],
                     env_extra: dict[str, str] | None = None) -> AsyncIterator[Running]:
    """``serve`` + ``expose`` (to ``target_port``) + ``connect`` as real processes with
    ``flags`` on both tunnel ends (and ``env_extra`` in their environment); yields once the
    connecting side's tunnel is open, stops them all after."""
    serve_port, listen_port = free_port(), free_port()
    env = {**os.environ, "TETHER_TOKEN": secrets.token_urlsafe(16),
           "TETHER_SECRET": secrets.token_urlsafe(32), **(env_extra or {})}
    signal = f"ws://127.0.0.1:{serve_port}"
    procs: dict[str, asyncio.subprocess.Process] = {}
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        events = Path(tmp) / "connect.events.jsonl"

        async def start(*args: str) -> asyncio.subprocess.Process:
            with open(Path(tmp) / f"{args[0]}.log", "wb") as log:  # the child keeps its copy
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tether.cli", *args, env=env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=log)
            procs[args[0]] = proc
            return proc

        try:
            serve = await start("serve", "--host", "127.0.0.1", "--port", str(serve_port))
            await wait_port(serve_port, serve)
            expose = await start("expose", "bench", "--target", f"127.0.0.1:{target_port}",
                                 "--signal", signal, *flags)
            t_start = time.perf_counter()
            connect = await start("connect", "bench", "--listen", f"127.0.0.1:{listen_port}",
                                  "--signal", signal, *flags, "--events", str(events))
            deadline = time.monotonic() + OPEN_TIMEOUT
            while (record := _open_event(events)) is None:
                for name, proc in procs.items():
                    if proc.returncode is not None:
                        log = (Path(tmp) / f"{name}.log").read_text(errors="replace")[-500:]
                        raise RuntimeError(f"tether {name} exited ({proc.returncode}): {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no tunnel open after {OPEN_TIMEOUT:.0f} s")
                await asyncio.sleep(0.02)
            yield Running(("127.0.0.1", listen_port), expose.pid, connect.pid,
                          _connect_ms(events, record),
                          (time.perf_counter() - t_start) * 1000.0)
        finally:
            for proc in reversed(list(procs.values())):
                await stop(proc)


def cpu_ms_per_mb(before: list[float | None], after: list[float | None],
                  mb: float) -> dict[str, float]:
    """CPU ms per MB of each side ("expose", "connect") that /proc could read."""
    return {side: (b - a) * 1000.0 / mb
            for side, a, b in zip(("expose", "connect"), before, after)
            if a is not None and b is not None}


async def timed_push(run: Running, payload: Payload) -> tuple[float, float | None]:
    """A checked push through ``run``: (MiB/s, the busier side's CPU ms per MiB, None
    where it could not be read)."""
    cpu0 = run.cpu()
    seconds = await checked.push(run.address, payload)
    per_side = cpu_ms_per_mb(cpu0, run.cpu(), payload.mb)
    return payload.mb / seconds, max(per_side.values()) if per_side else None


def base_packet_env() -> dict[str, str]:
    """Every speed patch but path_mtu: aiortc's 1,189-byte packets on any path."""
    from ..cores import aiortc_speed

    names = [name for name in aiortc_speed.PATCHES if name != "path_mtu"]
    return {aiortc_speed.PATCHES_ENV: ",".join(names)}


async def measure_base_packet(mb: float, seed: int = 4) -> dict[str, Any]:
    """A push with aiortc's packet size: what the path MTU search adds on loopback, and
    tether's CPU per packet as it is on a path that carries no more than that."""
    payload = Payload.make(int(mb * checked.MB), seed)
    target = _Target(payload)
    target.mode = "push"
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    try:
        async with cli_tunnel(server.sockets[0].getsockname()[1], ["--loopback"],
                              base_packet_env()) as run:
            mb_s, busier = await timed_push(run, payload)
            out: dict[str, Any] = {"tunnel_base_packet_mb_s": mb_s}
            if busier is not None:
                out["cpu_ms_per_mb_base_packet"] = busier
            return out
    finally:
        server.close()
        await server.wait_closed()


async def measure(mb: float, seed: int = 3) -> dict[str, Any]:
    payload = Payload.make(int(mb * checked.MB), seed)
    target = _Target(payload)
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    try:
        async with cli_tunnel(server.sockets[0].getsockname()[1], ["--loopback"]) as run:
            out: dict[str, Any] = {"connect_ms": run.connect_ms,
                                   "cli_start_to_open_ms": run.start_to_open_ms}
            for mode in ("push", "pull"):
                target.mode = mode
                cpu0 = run.cpu()
                if mode == "push":
                    seconds = await checked.push(run.address, payload)
                else:
                    seconds = await checked.pull(run.address, payload)
                per_side = cpu_ms_per_mb(cpu0, run.cpu(), payload.mb)
                key = "tunnel_mb_s" if mode == "push" else "tunnel_pull_mb_s"
                out[key] = payload.mb / seconds
                for side, value in per_side.items():
                    out[f"cpu_ms_per_mb_{mode}_{side}"] = value
                if mode == "push" and per_side:
                    out["cpu_ms_per_mb"] = max(per_side.values())
            return out
    finally:
        server.close()
        await server.wait_closed()
