"""The lab's processes: started under ``ip netns exec``, logged to files, always stopped.

Each process runs in its own session (its pid is its process group id), so stopping it
reaches whatever it started, and nothing else. stdout/stderr go to ``<name>.log`` in the
run directory; the echo checker's stdout is read instead (:class:`EchoChecker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import netns

logger = logging.getLogger(__name__)

ECHO_RECORDS_LIMIT = 200_000


@dataclass(eq=False)
class Proc:
    name: str
    ns: str
    argv: list[str]
    log: Path
    process: asyncio.subprocess.Process
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None


class Processes:
    """Starts and stops the processes of one scenario run."""

    def __init__(self, run_dir: Path, python: str = sys.executable) -> None:
        self.run_dir = run_dir
        self.python = python
        self.procs: dict[str, Proc] = {}
        self._retired: list[Proc] = []
        # The lab's peers keep their control sockets in the run's directory: a user's
        # `tether status` / `tether stop` on this machine never sees or stops them.
        control = run_dir / "control"
        control.mkdir(mode=0o700, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="160", NO_COLOR="1",
                        TETHER_RUNTIME_DIR=str(control))

    def py(self, *args: str) -> list[str]:
        return [self.python, *args]

    async def start(self, name: str, ns: str, argv: Sequence[str], *,
                    stdin: bool = False, stdout_pipe: bool = False,
                    env: dict[str, str] | None = None) -> Proc:
        """Start ``argv`` in namespace ``ns`` as ``name`` (a running one is replaced)."""
        old = self.procs.pop(name, None)
        if old is not None:
            self._retired.append(old)
        log = self.run_dir / f"{name}.log"
        full = ["ip", "netns", "exec", ns, *argv]
        with open(log, "ab") as out:
            out.write(f"# {time.strftime('%H:%M:%S')} {' '.join(full)}\n".encode())
            out.flush()
            process = await asyncio.create_subprocess_exec(
                *full,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else out,
                stderr=out, env={**self.env, **(env or {})}, start_new_session=True,
            )
        netns.LIVE_GROUPS.add(process.pid)
        proc = Proc(name, ns, list(full), log, process)
        self.procs[name] = proc
        logger.debug("started %s (pid %d) in %s", name, process.pid, ns)
        return proc

    async def signal(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            _killpg(proc.pid, sig)

    async def kill(self, name: str) -> None:
        """SIGKILL ``name``'s process group and reap it."""
        proc = self.procs.get(name)
        if proc is None:
            return
        _killpg(proc.pid, signal.SIGKILL)
        await proc.process.wait()
        netns.LIVE_GROUPS.discard(proc.pid)

    async def stop_all(self, grace: float = 1.0) -> None:
        """SIGTERM every process, SIGKILL what is left after ``grace`` seconds, reap all."""
        procs = [*self.procs.values(), *self._retired]
        for proc in procs:
            if proc.running:
                _killpg(proc.pid, signal.SIGTERM)
        waits = [asyncio.ensure_future(p.process.wait()) for p in procs]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for proc in procs:
                _killpg(proc.pid, signal.SIGKILL)  # the group may hold children
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=5.0)
                for wait in stuck:
                    wait.cancel()
                await asyncio.gather(*stuck, return_exceptions=True)
        for proc in procs:
            netns.LIVE_GROUPS.discard(proc.pid)
        self.procs.clear()
        self._retired.clear()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def listening(ns: str, port: int) -> bool:
    out = await netns.run("ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}",
                          check=False)
    return bool(out.strip())


async def wait_listening(ns: str, port: int, timeout: float, proc: Proc | None = None) -> None:
    """Wait until something listens on TCP ``port`` in ``ns``; RuntimeError if not in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await listening(ns, port):
            return
        if proc is not None and not proc.running:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode} "
                               f"(see {proc.log})")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} in {ns} after {timeout:.0f} s")


@dataclass
class ConnState:
    """What the checker last said about one connection."""

    sent: int = 0
    verified: int = 0
    last_rx: float | None = None
    first_echo: float | None = None
    closed: bool = False
    clean: bool | None = None
    stalled: bool = False


class EchoChecker:
    """The echo checker process in the laptop namespace, and what it reported."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.records: deque[dict[str, Any]] = deque(maxlen=ECHO_RECORDS_LIMIT)
        self.conns: dict[int, ConnState] = {}
        self.errors: deque[dict[str, Any]] = deque(maxlen=1000)
        self.final: dict[str, Any] | None = None
        self._reader = asyncio.create_task(self._read(), name="lab-echo-reader")

    async def _read(self) -> None:
        stdout = self.proc.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)
                self._update(record)

    def _update(self, r: dict[str, Any]) -> None:
        kind = r.get("type")
        if kind == "final":
            self.final = r
            return
        if kind == "error":
            self.errors.append(r)
        if "conn" not in r:
            return
        c = self.conns.setdefault(int(r["conn"]), ConnState())
        if kind == "progress":
            c.sent, c.verified, c.last_rx = r["sent"], r["verified"], r["last_rx"]
            c.stalled = False if c.last_rx and c.last_rx > r["ts"] - 0.2 else c.stalled
        elif kind == "first_echo":
            c.first_echo = r["ts"]
        elif kind == "stall":
            c.stalled = True
        elif kind == "gap":
            c.stalled = False
        elif kind == "closed":
            c.closed, c.clean = True, r.get("clean")
            c.sent, c.verified = r["sent"], r["verified"]

    @property
    def active(self) -> int | None:
        return max(self.conns) if self.conns else None

    def flowing(self, since: float) -> bool:
        """The newest connection echoed something after ``since`` and is not stalled now."""
        cid = self.active
        if cid is None:
            return False
        c = self.conns[cid]
        return (not c.closed and not c.stalled and c.last_rx is not None and c.last_rx >= since
                and c.last_rx >= time.time() - 0.3)

    async def until(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline or self._reader.done():
                return pred()
            await asyncio.sleep(0.05)
        return True

    async def command(self, word: str) -> None:
        stdin = self.proc.process.stdin
        assert stdin is not None
        with contextlib.suppress(ConnectionError):
            stdin.write(word.encode() + b"\n")
            await stdin.drain()

    async def finish(self, timeout: float) -> None:
        """Ask the checker to drain and stop; wait for its final report."""
        await self.command("stop")
        stdin = self.proc.process.stdin
        if stdin is not None:
            stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._reader)
        await self.close()

    async def close(self) -> None:
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    def dump(self, path: Path) -> None:
        with open(path, "w") as out:
            for record in self.records:
                out.write(json.dumps(record) + "\n")


async def cli_flags(python: str = sys.executable) -> set[str]:
    """Which optional flags this tether's CLI has (``--events``, ``--turn-user``, ...)."""
    found: set[str] = set()
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    for command in ("connect", "expose"):
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "tether.cli", command, "--help", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        for flag in ("--events", "--turn-user", "--turn-password", "--ice-server"):
            if flag in text:
                found.add(f"{command} {flag}")
    return found
