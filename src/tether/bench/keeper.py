"""The seed's Rust core (keeper-pam-webrtc-rs) in its own tunnel mode, one process per peer.

It gathers no 127.0.0.1 candidates, so the bench makes a network namespace with a
10.x.y.z/32 address on its loopback device, runs both peers and the checked transfer there
(``python -m tether.bench.keeper MB SEED`` inside the namespace), and deletes the namespace
afterwards, whatever happened. Skipped, with the reason, where that cannot be done (not
root, no ``ip``, the package missing).

Figures: ``keeper_mb_s`` (push through the offering peer's listener to a hashing sink),
``keeper_connect_ms`` (creating the offering tube to its status "ready"),
``keeper_cpu_ms_per_mb`` (the busier peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from . import checked
from .checked import Payload
from .procstat import cpu_seconds

PEER = Path(__file__).with_name("keeper_peer.py")


class Skip(RuntimeError):
    """This figure cannot be measured here; the message says why."""


def unavailable() -> str | None:
    """Why the Rust core cannot be measured here, or None."""
    if importlib.util.find_spec("keeper_pam_webrtc_rs") is None:
        return "keeper-pam-webrtc-rs is not installed (pip install -e '.[test]')"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for a network namespace (the Rust core gathers no 127.0.0.1 candidates)"
    if shutil.which("ip") is None:
        return "needs `ip` (iproute2) for a network namespace"
    return None


async def measure(mb: float, seed: int = 7, timeout: float | None = None) -> dict[str, Any]:
    return await in_lo_namespace("tbk", "tether.bench.keeper", mb, seed,
                                 timeout or 120.0 + 4.0 * mb, "Rust core run")


async def in_lo_namespace(prefix: str, module: str, mb: float, seed: int, timeout: float,
                          what: str) -> dict[str, Any]:
    """``python -m MODULE MB SEED`` in a fresh namespace whose lo has a 10.x.y.z/32 (the Rust
    core gathers no 127.0.0.1); its last JSON line is the result. The namespace is removed
    after, whatever happened."""
    from ..lab import netns

    why = unavailable()
    if why:
        raise Skip(why)
    suffix = netns.new_suffix()
    ns = f"{prefix}-{suffix}"
    address = f"10.{int(suffix[:2], 16)}.{int(suffix[2:4], 16)}.{max(1, int(suffix[4:], 16))}"
    try:
        try:
            await netns.add_namespace(ns)
        except netns.CommandError as exc:
            raise Skip(f"cannot make a network namespace: {exc}") from None
        await netns.run("ip", "-n", ns, "link", "set", "lo", "up")
        await netns.run("ip", "-n", ns, "addr", "add", f"{address}/32", "dev", "lo")
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-m", module,
            str(mb), str(seed), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        lines = [x for x in out.decode(errors="replace").splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{what} failed ({proc.returncode}): "
                               f"{err.decode(errors='replace')[-400:]}")
        return json.loads(lines[-1])
    finally:
        await netns.delete_namespace(ns)


# -- inside the namespace ----------------------------------------------------------------


class _Peer:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def send(self, record: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(record) + "\n").encode())
        await self.proc.stdin.drain()


async def _start(*args: str) -> _Peer:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", str(PEER), *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    return _Peer(proc)


async def _pump(source: _Peer, other: asyncio.Future[_Peer], own: asyncio.Queue) -> None:
    """Forward ``source``'s candidates to the other peer (once it exists); the rest to ``own``."""
    assert source.proc.stdout is not None
    while line := await source.proc.stdout.readline():
        record = json.loads(line)
        if "candidate" in record:
            await (await other).send(record)
        else:
            await own.put(record)
    await own.put({"error": f"peer exited ({await source.proc.wait()})"})


async def _expect(queue: asyncio.Queue, key: str, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        record = await queue.get()
    if key not in record:
        raise RuntimeError(f"Rust core peer: expected {key!r}, got {record}")
    return record


async def _run_inside(mb: float, seed: int) -> dict[str, Any]:
    payload = Payload.make(int(mb * checked.MB), seed)
    sink = await checked.start_sink()
    target_port = sink.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    offerer_f: asyncio.Future[_Peer] = loop.create_future()
    answerer_f: asyncio.Future[_Peer] = loop.create_future()
    # Both processes start (and import) before the clock does: the answerer's candidates
    # go to the offerer at once, the offerer's only after the answerer has the offer.
    offerer = await _start("offer")
    answerer = await _start("answer", str(target_port))
    offerer_f.set_result(offerer)
    offers: asyncio.Queue = asyncio.Queue(maxsize=256)
    answers: asyncio.Queue = asyncio.Queue(maxsize=256)
    pumps = [asyncio.create_task(_pump(offerer, answerer_f, offers)),
             asyncio.create_task(_pump(answerer, offerer_f, answers))]
    try:
        await _expect(offers, "waiting", 60)
        await _expect(answers, "waiting", 60)
        await offerer.send({"go": True})
        offer = await _expect(offers, "offer", 30)
        await answerer.send({"offer": offer["offer"]})
        answerer_f.set_result(answerer)
        await offerer.send({"answer": (await _expect(answers, "answer", 30))["answer"]})
        ready = await _expect(offers, "ready", 40)
        host, port = offer["listen"].rsplit(":", 1)
        pids = (offerer.proc.pid, answerer.proc.pid)
        cpu0 = [cpu_seconds(pid) for pid in pids]
        seconds = await checked.push((host, int(port)), payload)
        cpu1 = [cpu_seconds(pid) for pid in pids]
        cpu = [(b - a) * 1000.0 / payload.mb for a, b in zip(cpu0, cpu1)
               if a is not None and b is not None]
        return {"keeper_mb_s": payload.mb / seconds, "keeper_connect_ms": ready["ready"],
                **({"keeper_cpu_ms_per_mb": max(cpu)} if cpu else {})}
    finally:
        for peer in (offerer, answerer):
            if peer is not None and peer.proc.returncode is None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await peer.send({"quit": True})
        for peer in (offerer, answerer):
            if peer is not None:
                try:
                    async with asyncio.timeout(5):
                        await peer.proc.wait()
                except TimeoutError:
                    peer.proc.kill()
                    await peer.proc.wait()
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        sink.close()
        await sink.wait_closed()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_run_inside(float(sys.argv[1]), int(sys.argv[2])))))
