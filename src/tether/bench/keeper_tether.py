"""The Rust core through tether's CLI: ``serve`` + ``expose`` + ``connect`` with ``--core keeper``.

The figure next to ``keeper`` (the Rust core alone, its own tunnel mode): the same core
under tether's manager, signaling and sealing, every TCP stream a resumable session
(tether.tunnel.resume). The Rust core gathers no 127.0.0.1 candidates, so, like
tether.bench.keeper, this makes a network namespace with a 10.x.y.z/32 on its loopback,
runs the three CLI processes and the checked push there (``python -m
tether.bench.keeper_tether MB SEED`` inside it), and deletes the namespace afterwards.

Figures: ``keeper_tether_mb_s`` (push through ``connect --listen`` to a hashing sink),
``keeper_tether_connect_ms`` (the connecting side's offer to its open tunnel, from its
events file), ``keeper_tether_cpu_ms_per_mb`` (the busier side).
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
from pathlib import Path
from typing import Any

from . import checked
from .checked import Payload
from .cli_tunnel import _connect_ms, _open_event
from .keeper import Skip, unavailable
from .procstat import cpu_seconds
from .signaling import free_port, stop, wait_port

OPEN_TIMEOUT = 60.0

__all__ = ["Skip", "measure", "unavailable"]


async def measure(mb: float, seed: int = 5, timeout: float | None = None) -> dict[str, Any]:
    """Run the measurement in a fresh namespace (removed after, whatever happened)."""
    from ..lab import netns

    why = unavailable()
    if why:
        raise Skip(why)
    suffix = netns.new_suffix()
    ns = f"tbt-{suffix}"
    address = f"10.{int(suffix[:2], 16)}.{int(suffix[2:4], 16)}.{max(1, int(suffix[4:], 16))}"
    try:
        try:
            await netns.add_namespace(ns)
        except netns.CommandError as exc:
            raise Skip(f"cannot make a network namespace: {exc}") from None
        await netns.run("ip", "-n", ns, "link", "set", "lo", "up")
        await netns.run("ip", "-n", ns, "addr", "add", f"{address}/32", "dev", "lo")
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-m", "tether.bench.keeper_tether",
            str(mb), str(seed), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout or 150.0 + 4.0 * mb):
                out, err = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"tether --core keeper run failed ({proc.returncode}): "
                               f"{err.decode(errors='replace')[-400:]}")
        return json.loads(lines[-1])
    finally:
        await netns.delete_namespace(ns)


# -- inside the namespace ----------------------------------------------------------------


async def _run_inside(mb: float, seed: int) -> dict[str, Any]:
    payload = Payload.make(int(mb * checked.MB), seed)
    sink = await checked.start_sink()
    target_port = sink.sockets[0].getsockname()[1]
    serve_port, listen_port = free_port(), free_port()
    env = {**os.environ, "TETHER_TOKEN": secrets.token_urlsafe(16),
           "TETHER_SECRET": secrets.token_urlsafe(32)}
    signal = f"ws://127.0.0.1:{serve_port}"
    procs: dict[str, asyncio.subprocess.Process] = {}
    with tempfile.TemporaryDirectory(prefix="tether-bench-keeper-") as tmp:
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
                                 "--signal", signal, "--core", "keeper")
            connect = await start("connect", "bench", "--listen",
                                  f"127.0.0.1:{listen_port}", "--signal", signal,
                                  "--core", "keeper", "--events", str(events))
            deadline = time.monotonic() + OPEN_TIMEOUT
            while (record := _open_event(events)) is None:
                for name, proc in procs.items():
                    if proc.returncode is not None:
                        log = (Path(tmp) / f"{name}.log").read_text(errors="replace")[-500:]
                        raise RuntimeError(f"tether {name} exited ({proc.returncode}): {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no tunnel open after {OPEN_TIMEOUT:.0f} s")
                await asyncio.sleep(0.02)
            cpu0 = [cpu_seconds(expose.pid), cpu_seconds(connect.pid)]
            seconds = await checked.push(("127.0.0.1", listen_port), payload)
            cpu1 = [cpu_seconds(expose.pid), cpu_seconds(connect.pid)]
            out: dict[str, Any] = {"keeper_tether_mb_s": payload.mb / seconds,
                                   "keeper_tether_connect_ms": _connect_ms(events, record)}
            cpu = [(b - a) * 1000.0 / payload.mb for a, b in zip(cpu0, cpu1)
                   if a is not None and b is not None]
            if cpu:
                out["keeper_tether_cpu_ms_per_mb"] = max(cpu)
            return out
        finally:
            for proc in reversed(list(procs.values())):
                await stop(proc)
            sink.close()
            await sink.wait_closed()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_run_inside(float(sys.argv[1]), int(sys.argv[2])))),
          flush=True)
