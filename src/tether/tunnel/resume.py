"""Resumable TCP streams: a user's connection outlives the carrier (and tube) it rides on.

The Rust core ends every TCP connection of a tube whose path died, and its ICE restart
cannot move a path (docs/keeper.md). So tether runs its own thin stream layer above it:

- connecting side: :class:`ResumeClient` turns each accepted connection into a
  :class:`Session` (128-bit random id) and dials a *carrier*, a TCP connection to the
  current tube's Rust listener, to carry it; when a carrier ends without the session
  ending (a lost carrier), it dials again through whatever tube is current, with a
  resume hello, for up to ``detach_limit`` seconds;
- exposing side: the Rust core dials :class:`ResumeGateway` (listening on 127.0.0.1
  only) instead of the target; the gateway reads the hello, dials the real target once
  per new session, and hands a resumed session its new carrier.

On every new carrier both sides report what they received and send again from there, so
no byte is lost or duplicated (tether.tunnel.resume_frames has the protocol). A user's
EOF is a FIN frame (a half-close); a RESET ends the session and aborts the user's
connection on the other end, as does a session id the gateway does not know (it
restarted).

Trust: the gateway takes carriers from any local process, as a local listener must (the
Rust core dials it); anyone on the exposing host can already reach its target. A
session can only be resumed with its 128-bit id, which only the two tether ends know.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .resume_frames import (
    HEADER,
    SESSION_ID_BYTES,
    Ack,
    Data,
    Fin,
    Frame,
    Hello,
    ProtocolError,
    ReceiveState,
    Reset,
    SendBuffer,
    check_header,
    decode_body,
    encode,
)

logger = logging.getLogger(__name__)

BUFFER_LIMIT = 4 * 1024 * 1024   # unacknowledged bytes per direction per session
READ_CHUNK = 64 * 1024
ACK_BYTES = 128 * 1024           # ack at least this often while data flows
ACK_INTERVAL = 1.0               # and every second anyway (the carrier's heartbeat)
CARRIER_SILENCE = 10.0           # a carrier silent this long is lost
HELLO_TIMEOUT = 5.0
DETACH_LIMIT = 300.0             # a session waits this long for a new carrier (an outage of
                                 # minutes, as aiortc-core streams survive; MAX_DETACHED bounds it)
MAX_DETACHED = 256               # the oldest detached session beyond this is ended
MAX_SESSIONS = 4096
DIAL_TIMEOUT = 10.0
REDIAL_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame; None at a clean end between frames. Raises ProtocolError,
    asyncio.IncompleteReadError (cut inside a frame) or ConnectionError."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    kind, length = HEADER.unpack(header)
    check_header(kind, length)
    body = await reader.readexactly(length) if length else b""
    return decode_body(kind, body)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()


class Session:
    """One user connection, carried by one carrier at a time (see the module docstring).

    The owner attaches carriers (:meth:`attach`) and waits on :attr:`changed`; the
    session ends itself (``ended``) when both directions are done and acknowledged, on a
    RESET, on a broken protocol, or when :meth:`end` is called.
    """

    def __init__(self, session_id: bytes, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, limit: int = BUFFER_LIMIT,
                 silence: float = CARRIER_SILENCE, ack_interval: float = ACK_INTERVAL,
                 name: str = "") -> None:
        self.id = session_id
        self.name = name or session_id.hex()[:8]
        self.reader = reader
        self.writer = writer
        self.send = SendBuffer(limit)
        self.recv = ReceiveState()
        self.silence = silence
        self.ack_interval = ack_interval
        self.carrier: asyncio.StreamWriter | None = None
        self.path: Any = None           # where the carrier was dialed (the owner's label)
        self.carriers = 0               # how many carriers it has had
        self.dials = 0                  # the client's carrier number (HELLO), or the last seen
        self.detached_at: float | None = time.monotonic()
        self.lost_by_silence = False    # the last carrier went silent (not closed)
        self.ended = asyncio.Event()
        self.changed = asyncio.Event()  # attached, detached or ended
        self.outcome = ""
        self._space = asyncio.Event()
        self._space.set()
        self._acked_at = 0              # recv.received last reported to the peer
        self._pump: asyncio.Task[None] | None = None
        self._carrier_task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # -- owner's side -------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the user's connection (kept until acknowledged)."""
        self._pump = asyncio.create_task(self._run_pump(), name=f"resume-pump-{self.name}")
        self._ticker = asyncio.create_task(self._run_ticker(), name=f"resume-tick-{self.name}")

    def drop_carrier(self) -> None:
        """Its path is gone though the carrier has not said so: lose it now."""
        _abort(self.carrier)

    async def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer_received: int, *, hello: bool, path: Any = None) -> None:
        """Carry on over this carrier from ``peer_received`` (the peer's hello); with
        ``hello`` first answer with our own (the gateway's side)."""
        await self._stop_carrier()
        if self.ended.is_set():
            _abort(writer)
            return
        try:
            frames = self.send.resend(peer_received)
        except ProtocolError as exc:
            writer.write(encode(Reset(f"cannot resume: {exc}")))
            self.end(f"cannot resume: {exc}")
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()
            return
        if hello:
            writer.write(encode(Hello(self.id, True, self.recv.received, self.dials)))
        for frame in frames:  # no await in between: new data goes after these
            writer.write(encode(frame))
        self._acked_at = self.recv.received
        self.carrier = writer
        self.path = path
        self.carriers += 1
        self.detached_at = None
        self.lost_by_silence = False
        self._space.set()
        self._carrier_task = asyncio.create_task(self._run_carrier(reader, writer),
                                                 name=f"resume-carrier-{self.name}")
        self.changed.set()
        if self.carriers > 1:
            logger.info("session %s: resumed on carrier %d (%d bytes sent again)", self.name,
                        self.carriers, self.send.pending)
        self._check_complete()  # the hello may acknowledge our FIN, the last thing missing

    def end(self, why: str, *, reset: str | None = None, complete: bool = False) -> None:
        """End the session: tell the peer (``reset``), close the user's connection
        (gracefully when ``complete``, else abort), drop the carrier."""
        if self.ended.is_set():
            return
        self.outcome = why
        logger.log(logging.DEBUG if complete else logging.INFO, "session %s: %s",
                   self.name, why)
        carrier, self.carrier = self.carrier, None
        if carrier is not None:
            if reset is not None:
                carrier.write(encode(Reset(reset)))
            if complete or reset is not None:
                carrier.close()  # flushes our last ACK / RESET first
            else:
                _abort(carrier)
        if complete:
            self.writer.close()
        else:
            _abort(self.writer)
        self.ended.set()
        self.changed.set()
        current = asyncio.current_task()
        for task in (self._pump, self._carrier_task, self._ticker):
            if task is not None and task is not current:
                task.cancel()

    async def close(self) -> None:
        """End (if not yet) and await every task of the session."""
        self.end("closed")
        current = asyncio.current_task()
        tasks = [t for t in (self._pump, self._carrier_task, self._ticker)
                 if t is not None and t is not current]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------

    async def _stop_carrier(self) -> None:
        task, self._carrier_task = self._carrier_task, None
        carrier, self.carrier = self.carrier, None
        _abort(carrier)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _detach(self, why: str, *, silent: bool = False) -> None:
        """The carrier ended without the session ending: wait for another."""
        carrier, self.carrier = self.carrier, None
        _abort(carrier)
        if self.ended.is_set():
            return
        self.detached_at = time.monotonic()
        self.lost_by_silence = silent
        self._carrier_task = None
        logger.info("session %s: carrier lost (%s); %d bytes unacknowledged", self.name,
                    why, self.send.pending)
        self.changed.set()

    def _write(self, frame: Frame) -> None:
        if self.carrier is not None and not self.carrier.is_closing():
            self.carrier.write(encode(frame))

    def _ack(self) -> None:
        self._acked_at = self.recv.received
        self._write(Ack(self._acked_at))

    def _check_complete(self) -> None:
        if self.send.fin_acked and self.recv.eof:
            self.end("complete", complete=True)

    async def _run_pump(self) -> None:
        """The user's bytes: keep each until acknowledged, send it if a carrier is up."""
        try:
            while True:
                while self.send.space <= 0:
                    self._space.clear()
                    await self._space.wait()
                data = await self.reader.read(min(READ_CHUNK, self.send.space))
                if not data:
                    break
                offset = self.send.push(data)
                carrier = self.carrier
                if carrier is not None:
                    self._write(Data(offset, data))
                    with contextlib.suppress(ConnectionError, OSError):
                        await carrier.drain()
        except (ConnectionError, OSError) as exc:
            self.end(f"the user's connection failed: {exc!r}", reset="the peer's user "
                     "connection was reset")
            return
        self._write(Fin(self.send.close()))
        self._check_complete()

    async def _run_ticker(self) -> None:
        """Every ack_interval: an ACK on the carrier, its heartbeat."""
        while True:
            await asyncio.sleep(self.ack_interval)
            if self.carrier is not None:
                self._ack()

    async def _run_carrier(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(self.silence):
                    frame = await read_frame(reader)
                if frame is None:
                    self._detach("the carrier closed")
                    return
                if not await self._on_frame(frame):
                    return
        except TimeoutError:
            self._detach(f"no frame for {self.silence:g} s", silent=True)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._detach(f"the carrier broke: {exc!r}")
        except ProtocolError as exc:
            self.end(f"protocol error on the carrier: {exc}", reset=f"protocol error: {exc}")

    async def _on_frame(self, frame: Frame) -> bool:
        """Handle one frame; False when the session ended."""
        if isinstance(frame, Data):
            fresh = self.recv.data(frame)
            if fresh:
                self.writer.write(fresh)
                if self.recv.received - self._acked_at >= ACK_BYTES:
                    self._ack()
                try:
                    await self.writer.drain()
                except (ConnectionError, OSError) as exc:
                    self.end(f"the user's connection failed: {exc!r}",
                             reset="the peer's user connection was reset")
                    return False
        elif isinstance(frame, Ack):
            self.send.ack(frame.received)
            self._space.set()
            self._check_complete()
        elif isinstance(frame, Fin):
            if self.recv.fin(frame):
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                self._ack()
                self._check_complete()
        elif isinstance(frame, Reset):
            self.end(f"reset by the peer: {frame.reason}")
        else:
            raise ProtocolError("HELLO on an established carrier")
        return not self.ended.is_set()


class ResumeClient:
    """The connecting side: sessions for accepted connections, carriers dialed through
    ``address()`` (the current tube's Rust listener; it waits until there is one).

    ``path_changed()`` (a new tube is ready) cuts short a dial waiting on the old one;
    ``path_closed(address)`` (that tube is closing) drops the carriers dialed to it, since
    the Rust core does not always end them; ``on_silent(address)`` is told when a carrier
    went silent (a dead path the core has not seen).
    """

    def __init__(self, address: Callable[[], Awaitable[tuple[str, int]]], *,
                 limit: int = BUFFER_LIMIT, detach_limit: float = DETACH_LIMIT,
                 first_limit: float = DIAL_TIMEOUT, hello_timeout: float = HELLO_TIMEOUT,
                 silence: float = CARRIER_SILENCE, max_sessions: int = MAX_SESSIONS,
                 on_silent: Callable[[tuple[str, int]], None] | None = None) -> None:
        self.address = address
        self.limit = limit
        self.detach_limit = detach_limit
        self.first_limit = first_limit
        self.hello_timeout = hello_timeout
        self.silence = silence
        self.max_sessions = max_sessions
        self.on_silent = on_silent
        self.sessions: dict[bytes, Session] = {}
        self.resumes = 0
        self.outcomes: dict[str, int] = {}
        self._path = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def path_changed(self) -> None:
        """A new carrier path is up: dials waiting on the old one try the new one."""
        self._path.set()
        self._path = asyncio.Event()

    def path_closed(self, address: tuple[str, int]) -> None:
        """The tube behind ``address`` is closing: its carriers are lost, re-dial now."""
        for session in list(self.sessions.values()):
            if session.carrier is not None and session.path == address:
                session.drop_carrier()

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    on_start: Callable[[Session], None] | None = None) -> str:
        """Carry one user connection until its session ends; the outcome.

        Cancelling this call does not end the session (it lives in this client's own
        task, ended by close()); the user's connection closing does. ``on_start`` gets
        the session (for figures: ``send.next`` bytes read, ``recv.offset`` delivered).
        """
        if self._closed or len(self.sessions) >= self.max_sessions:
            logger.warning("resumable streams: %s; connection refused",
                           "closed" if self._closed else f"{self.max_sessions} sessions open")
            _abort(writer)
            return "refused"
        session = Session(secrets.token_bytes(SESSION_ID_BYTES), reader, writer,
                          limit=self.limit, silence=self.silence)
        self.sessions[session.id] = session
        if on_start is not None:
            on_start(session)
        task = asyncio.create_task(self._drive(session), name=f"resume-{session.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.wait({task})  # our cancel does not reach the session's task
        return session.outcome

    async def close(self) -> None:
        self._closed = True
        for session in list(self.sessions.values()):
            session.end("shutting down", reset="the peer is shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drive(self, session: Session) -> None:
        try:
            session.start()
            await self._keep_carried(session)
        except Exception as exc:  # noqa: BLE001 - the session ends, the client goes on
            logger.exception("session %s: failed", session.name)
            session.end(f"failed: {exc!r}", reset="the peer failed")
        finally:
            await session.close()
            self.sessions.pop(session.id, None)
            key = session.outcome.split(":")[0]
            self.outcomes[key] = self.outcomes.get(key, 0) + 1

    async def _keep_carried(self, session: Session) -> None:
        failures = 0
        while not session.ended.is_set():
            if session.carrier is not None:
                path = session.path
                session.changed.clear()
                await session.changed.wait()
                if session.carrier is None and session.lost_by_silence and self.on_silent:
                    self.on_silent(path)
                continue
            assert session.detached_at is not None
            limit = self.detach_limit if session.carriers else self.first_limit
            left = session.detached_at + limit - time.monotonic()
            if left <= 0:
                session.end(f"no carrier for {limit:g} s")
                return
            try:
                async with asyncio.timeout(left):
                    attached, path = await self._dial(session)
            except TimeoutError:
                continue  # the limit check above ends it
            if attached:
                failures = 0
                if session.carriers > 1:
                    self.resumes += 1
                continue
            if path.is_set():
                continue  # a new path: try it at once
            delay = REDIAL_DELAYS[min(failures, len(REDIAL_DELAYS) - 1)]
            failures += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await path.wait()

    async def _dial(self, session: Session) -> tuple[bool, asyncio.Event]:
        """One carrier attempt: (attached or the session ended, the path event it used)."""
        address = await self.address()
        path = self._path  # a later path_changed() means a newer tube than this address
        session.dials += 1
        try:
            async with asyncio.timeout(self.hello_timeout):
                reader, writer = await asyncio.open_connection(*address)
        except (OSError, TimeoutError) as exc:
            logger.debug("session %s: carrier dial to %s failed: %r", session.name, address,
                         exc)
            return False, path
        try:
            writer.write(encode(Hello(session.id, session.carriers > 0,
                                      session.recv.received, session.dials)))
            reply_task = asyncio.ensure_future(read_frame(reader))
            path_task = asyncio.ensure_future(path.wait())
            try:
                done, _ = await asyncio.wait({reply_task, path_task},
                                             timeout=self.hello_timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reply_task, path_task):
                    task.cancel()
                await asyncio.gather(reply_task, path_task, return_exceptions=True)
            if reply_task not in done or reply_task.cancelled() or reply_task.exception():
                why = ("a new path" if path_task in done else
                       f"no hello within {self.hello_timeout:g} s" if not done else
                       repr(reply_task.exception()) if not reply_task.cancelled() else "?")
                logger.debug("session %s: carrier attempt dropped: %s", session.name, why)
                _abort(writer)
                return False, path
            reply = reply_task.result()
            if isinstance(reply, Reset):
                _abort(writer)
                session.end(f"the peer refused the session: {reply.reason}")
                return True, path
            if not isinstance(reply, Hello) or reply.session_id != session.id:
                logger.debug("session %s: bad carrier reply %r", session.name, reply)
                _abort(writer)
                return False, path
            await session.attach(reader, writer, reply.received, hello=False, path=address)
            return True, path
        except BaseException:
            if session.carrier is not writer:
                _abort(writer)
            raise


class ResumeGateway:
    """The exposing side's end of the carriers: 127.0.0.1 only, one per target."""

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1",
                 limit: int = BUFFER_LIMIT, detach_limit: float = DETACH_LIMIT,
                 hello_timeout: float = HELLO_TIMEOUT, silence: float = CARRIER_SILENCE,
                 max_sessions: int = MAX_SESSIONS, max_detached: int = MAX_DETACHED,
                 dial_timeout: float = DIAL_TIMEOUT) -> None:
        self.target = target
        self.host = host
        self.limit = limit
        self.detach_limit = detach_limit
        self.hello_timeout = hello_timeout
        self.silence = silence
        self.max_sessions = max_sessions
        self.max_detached = max_detached
        self.dial_timeout = dial_timeout
        self.sessions: dict[bytes, Session] = {}
        self.resumes = 0
        self.refused: dict[str, int] = {}
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None, "start() first"
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_carrier, self.host, 0)
        logger.debug("resume gateway for %s:%s on %s:%s", *self.target, *self.address)

    async def close(self) -> None:
        self._closed = True
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions.values()):
            session.end("shutting down", reset="the peer is shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    def _own(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, writer: asyncio.StreamWriter, why: str) -> None:
        key = why.split(":")[0]
        self.refused[key] = self.refused.get(key, 0) + 1
        logger.info("resume gateway: carrier refused: %s", why)
        writer.write(encode(Reset(why)))
        writer.close()

    async def _on_carrier(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closed:
            _abort(writer)
            return
        self._own(task)
        try:
            await self._accept(reader, writer)
        except asyncio.CancelledError:
            _abort(writer)  # shutting down: no traceback from asyncio's stream callback
        except Exception:
            logger.exception("resume gateway: carrier failed")
            _abort(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.hello_timeout):
                hello = await read_frame(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            logger.debug("resume gateway: no hello: %r", exc)
            _abort(writer)
            return
        except ProtocolError as exc:
            self._refuse(writer, f"bad hello: {exc}")
            return
        if not isinstance(hello, Hello):
            self._refuse(writer, "bad hello: the first frame must be HELLO")
            return
        session = self.sessions.get(hello.session_id)
        if session is None:
            if hello.resume:
                self._refuse(writer, "unknown session (did the peer restart?)")
                return
            if len(self.sessions) >= self.max_sessions:
                self._refuse(writer, f"too many sessions: {self.max_sessions} open")
                return
            try:
                async with asyncio.timeout(self.dial_timeout):
                    up_reader, up_writer = await asyncio.open_connection(*self.target)
            except (OSError, TimeoutError) as exc:
                self._refuse(writer, f"target refused: {self.target[0]}:{self.target[1]}: "
                                     f"{exc!r}")
                return
            session = self.sessions.get(hello.session_id)  # a duplicate hello raced us
            if session is not None:
                up_writer.close()
            else:
                session = Session(hello.session_id, up_reader, up_writer, limit=self.limit,
                                  silence=self.silence)
                self.sessions[session.id] = session
                session.start()
                self._own(asyncio.create_task(self._watch(session),
                                              name=f"resume-gw-{session.name}"))
        elif hello.carrier < session.dials:
            # A stale dial that the Rust core delivered after a newer one: drop it.
            logger.debug("session %s: stale carrier %d (now %d) dropped", session.name,
                         hello.carrier, session.dials)
            _abort(writer)
            return
        elif session.carriers:
            self.resumes += 1
        session.dials = hello.carrier
        await session.attach(reader, writer, hello.received, hello=True)

    async def _watch(self, session: Session) -> None:
        """End a session left without a carrier too long; forget it when it ends."""
        try:
            while not session.ended.is_set():
                session.changed.clear()
                if session.carrier is None and session.detached_at is not None:
                    self._limit_detached()
                    left = session.detached_at + self.detach_limit - time.monotonic()
                    if left <= 0:
                        session.end(f"no carrier for {self.detach_limit:g} s")
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await session.changed.wait()
                else:
                    await session.changed.wait()
        finally:
            await session.close()
            if self.sessions.get(session.id) is session:
                del self.sessions[session.id]

    def _limit_detached(self) -> None:
        detached = [s for s in self.sessions.values()
                    if s.carrier is None and s.detached_at is not None and not s.ended.is_set()]
        if len(detached) <= self.max_detached:
            return
        detached.sort(key=lambda s: s.detached_at or 0.0)
        for session in detached[:len(detached) - self.max_detached]:
            session.end(f"more than {self.max_detached} sessions without a carrier")
