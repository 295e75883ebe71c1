"""The lab's echo checker: sends a known byte stream through the tunnel and checks the echo.

Run inside the laptop namespace as ``python -m tether.lab.echo_client --port P``. It connects
to ``tether connect``'s listen port, sends :mod:`tether.lab.pattern` at ``--rate`` bytes/s,
verifies every echoed byte in order and reports JSON lines on stdout (one object per line,
``ts`` is ``time.time()`` so it compares with tether's ``--events`` files):

- ``open``: a connection was opened (``conn`` numbers them from 1);
- ``progress`` every ``--interval`` s: ``sent``, ``verified``, ``last_rx`` (time of the
  latest echoed byte);
- ``stall``: nothing came back for ``--gap`` s while bytes were outstanding (``since``);
- ``gap`` when the echo resumes after a silence longer than ``--fine-gap`` s (50 ms; at
  1 MB/s echoes arrive every ~16 ms) while bytes were outstanding: ``start``, ``end``, ``ms``;
- ``done``: ``--total`` bytes were sent and all verified;
- ``closed``: the stream ended; ``how`` is ``eof``, ``reset``, ``error`` or ``mismatch``;
  ``clean`` is true for an EOF with nothing wrong;
  ``retry`` marks a connection that closed before echoing anything (it will be retried);
- ``error``: a byte differed (``offset``) or no connection could be made;
- ``final`` on exit, with every connection's figures.

Commands on stdin, one per line: ``pause`` / ``resume`` (stop and restart sending),
``new`` (open a new connection, retried until one echoes, and send on it instead),
``stop`` (stop sending, drain while bytes still come back, print ``final``, exit). End of
stdin means ``stop``, so the checker never outlives the lab that started it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .pattern import first_mismatch, pattern

READ_SIZE = 65536
DRAIN_CAP = 120.0


def emit(kind: str, **fields: Any) -> None:
    """Write one report line (this module is a program; stdout is its interface)."""
    sys.stdout.write(json.dumps({"type": kind, "ts": time.time(), **fields}) + "\n")
    sys.stdout.flush()


@dataclass(eq=False)
class Conn:
    """One TCP connection through the tunnel and what happened on it."""

    conn: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0
    verified: int = 0
    last_rx: float | None = None
    first_rx: float | None = None  # first arrival since the last progress report
    waiting_since: float | None = None
    stalled: bool = False
    closed: bool = False
    clean: bool | None = None
    reason: str = ""
    how: str = ""
    reported: tuple[int, int] = (-1, -1)
    echoed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def outstanding(self) -> int:
        return self.sent - self.verified

    def summary(self) -> dict[str, Any]:
        return {"conn": self.conn, "sent": self.sent, "verified": self.verified,
                "closed": self.closed, "clean": self.clean, "how": self.how,
                "reason": self.reason}


class EchoChecker:
    """Owns the connections, the sender and the reporter; see the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conns: list[Conn] = []
        self.active: Conn | None = None
        self.sending = asyncio.Event()
        self.sending.set()
        self.stopping = False
        self.next_id = 1
        self.tasks: set[asyncio.Task[Any]] = set()
        self.establishing: asyncio.Task[Any] | None = None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- connections ---------------------------------------------------------------------

    def new_connection(self) -> None:
        if self.establishing is not None and not self.establishing.done():
            return
        self.establishing = self.spawn(self.establish())

    async def establish(self) -> None:
        """Open connections until one echoes or ``--retry-for`` runs out."""
        deadline = time.monotonic() + self.args.retry_for
        while not self.stopping:
            try:
                reader, writer = await asyncio.open_connection(self.args.host, self.args.port)
            except OSError as exc:
                if time.monotonic() > deadline:
                    emit("error", what="connect_failed", detail=str(exc))
                    return
                await asyncio.sleep(0.25)
                continue
            conn = Conn(self.next_id, reader, writer)
            self.next_id += 1
            self.conns.append(conn)
            self.active = conn
            emit("open", conn=conn.conn)
            self.spawn(self.receive(conn))
            self.spawn(self.send(conn))
            echoed = asyncio.ensure_future(conn.echoed.wait())
            ended = asyncio.ensure_future(conn.ended.wait())
            try:
                await asyncio.wait({echoed, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                echoed.cancel()
                ended.cancel()
                await asyncio.gather(echoed, ended, return_exceptions=True)
            if conn.echoed.is_set() or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.25)

    async def send(self, conn: Conn) -> None:
        rate = self.args.rate
        chunk = self.args.chunk
        allowance = 0.0
        last = time.monotonic()
        try:
            while not conn.closed and conn is self.active and not self.stopping:
                if self.args.total and conn.sent >= self.args.total:
                    return
                await self.sending.wait()
                size = chunk
                if self.args.total:
                    size = min(size, self.args.total - conn.sent)
                if rate > 0:
                    now = time.monotonic()
                    # At most 0.1 s of credit: after a stall the sender resumes at the rate.
                    allowance = min(allowance + (now - last) * rate, max(rate * 0.1, size))
                    last = now
                    if allowance < size:
                        await asyncio.sleep((size - allowance) / rate)
                        continue
                    allowance -= size
                if conn.closed or conn is not self.active or self.stopping:
                    return
                conn.writer.write(pattern(conn.conn, conn.sent, size))
                if conn.waiting_since is None:
                    conn.waiting_since = time.time()
                conn.sent += size
                await conn.writer.drain()
        except (ConnectionError, OSError):
            pass

    async def receive(self, conn: Conn) -> None:
        clean = True
        reason = how = "eof"
        try:
            while data := await conn.reader.read(READ_SIZE):
                now = time.time()
                bad = first_mismatch(conn.conn, conn.verified, data)
                if bad is not None or conn.verified + len(data) > conn.sent:
                    offset = bad if bad is not None else conn.sent
                    emit("error", what="mismatch", conn=conn.conn, offset=offset)
                    clean, reason, how = False, f"mismatch at {offset}", "mismatch"
                    break
                if (conn.waiting_since is not None
                        and now - conn.waiting_since > self.args.fine_gap):
                    emit("gap", conn=conn.conn, start=conn.waiting_since, end=now,
                         ms=round((now - conn.waiting_since) * 1000.0, 1))
                conn.stalled = False
                conn.verified += len(data)
                conn.last_rx = now
                if conn.first_rx is None:
                    conn.first_rx = now
                conn.waiting_since = now if conn.outstanding > 0 else None
                if not conn.echoed.is_set():
                    emit("first_echo", conn=conn.conn, at=now)
                    conn.echoed.set()
                if self.args.total and conn.verified >= self.args.total:
                    emit("done", conn=conn.conn, sent=conn.sent, verified=conn.verified)
        except (ConnectionError, OSError) as exc:
            clean, reason = False, f"{type(exc).__name__}: {exc}"
            how = "reset" if isinstance(exc, ConnectionResetError) else "error"
        except asyncio.CancelledError:
            reason = "shutdown"  # the checker is exiting: not an event of the stream
            raise
        finally:
            conn.closed = True
            conn.clean = clean
            conn.reason = reason
            conn.how = how
            conn.writer.close()
            if reason != "shutdown":
                emit("closed", conn=conn.conn, sent=conn.sent, verified=conn.verified,
                     clean=clean, how=how, reason=reason,
                     retry=not conn.echoed.is_set() and not self.stopping)
            conn.ended.set()

    # -- reporting -----------------------------------------------------------------------

    async def report(self) -> None:
        while True:
            await asyncio.sleep(self.args.interval)
            now = time.time()
            for conn in self.conns:
                if conn.closed:
                    continue
                if (conn.waiting_since is not None and not conn.stalled
                        and now - conn.waiting_since > self.args.gap):
                    conn.stalled = True
                    emit("stall", conn=conn.conn, since=conn.waiting_since)
                if (conn.sent, conn.verified) != conn.reported:
                    self.progress(conn)

    @staticmethod
    def progress(conn: Conn) -> None:
        conn.reported = (conn.sent, conn.verified)
        emit("progress", conn=conn.conn, sent=conn.sent, verified=conn.verified,
             last_rx=conn.last_rx, first_rx=conn.first_rx)
        conn.first_rx = None

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=4096)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            word = line.decode(errors="replace").strip()
            if word == "pause":
                self.sending.clear()
            elif word == "resume":
                self.sending.set()
            elif word == "new":
                self.new_connection()
            elif word == "stop":
                return
            elif word:
                emit("error", what="unknown_command", detail=word[:80])

    async def drain(self) -> None:
        """Stop sending; wait until every open connection has echoed all it sent.

        A slow path may hold megabytes in flight, so draining goes on while bytes keep
        coming back; it stops after ``--drain-timeout`` s without any (or DRAIN_CAP s).
        """
        self.stopping = True
        self.sending.set()
        start = last_progress = time.monotonic()
        verified = sum(c.verified for c in self.conns)
        while not all(c.closed or c.outstanding == 0 for c in self.conns):
            now = time.monotonic()
            total = sum(c.verified for c in self.conns)
            if total != verified:
                verified, last_progress = total, now
            if now - last_progress > self.args.drain_timeout or now - start > DRAIN_CAP:
                break
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        reporter = self.spawn(self.report())
        self.new_connection()
        try:
            await self.commands()
            await self.drain()
            reporter.cancel()
            now = time.time()
            for conn in self.conns:
                if not conn.closed:
                    self.progress(conn)
                    if conn.stalled and conn.waiting_since is not None:
                        emit("stall", conn=conn.conn, since=conn.waiting_since, open=True,
                             ms=round((now - conn.waiting_since) * 1000.0, 1))
            emit("final", conns=[c.summary() for c in self.conns])
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for conn in self.conns:
                conn.writer.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="tether lab echo checker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1_000_000.0,
                        help="bytes per second; 0 sends as fast as the stream takes them")
    parser.add_argument("--total", type=int, default=0, help="bytes to send; 0: no end")
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--interval", type=float, default=0.1, help="progress report period")
    parser.add_argument("--gap", type=float, default=0.2, help="silence that counts as a stall")
    parser.add_argument("--fine-gap", type=float, default=0.05,
                        help="shortest silence reported as a gap once it ends")
    parser.add_argument("--retry-for", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.chunk <= 0 or args.rate < 0 or args.total < 0 or args.interval <= 0:
        parser.error("--chunk and --interval must be positive, --rate and --total not negative")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(EchoChecker(args).run())


if __name__ == "__main__":
    main()
