"""One TCP connection carried as one stream of frames inside a tunnel.

A stream has two directions, each with its own loop:

- uplink: TCP reader -> DATA frames. It sends only while it holds credit (the peer's
  window minus bytes sent and not yet acknowledged by a WINDOW frame), and only while the
  channel is under its high-water mark. TCP EOF -> FIN.
- downlink: DATA frames -> TCP writer. Incoming DATA is queued, written, and drained
  (``await writer.drain()``); only then is the credit handed back to the peer with a
  WINDOW frame. A TCP peer that stops reading therefore stops the far sender, and the
  queue never holds more than our window. FIN -> ``writer.write_eof()``.

The stream ends cleanly when both directions are done, or at once on a RESET (either
side), a TCP error, a protocol violation, the channel closing or the tunnel closing.

The peer's OPEN_OK must announce a window in MIN_WINDOW..MAX_WINDOW: a zero window would
leave the stream waiting for credit forever, so any other is refused with a RESET saying
why. RESETs that answer the peer's own protocol violations are optional control frames
(see :meth:`Tunnel._send_control`): dropped, never queued without bound, if the peer is
not reading.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import frames, reasons
from .reasons import Refusal

if TYPE_CHECKING:
    from .tunnel import Tunnel

logger = logging.getLogger("tether.tunnel")

#: How long a finished stream waits for its TCP socket to flush before aborting it.
CLOSE_LINGER = 10.0


class StreamState(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    ENDED = "ended"


class StreamEnded(Exception):
    """Raised inside a stream's loops when it has ended (reset, channel gone)."""


class Stream:
    """One TCP connection <-> the frames of one stream id."""

    def __init__(
        self,
        tunnel: Tunnel,
        stream_id: int,
        *,
        outbound: bool,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
        peer_window: int = 0,
        target: tuple[str, int] | None = None,
        on_open: Callable[[str | None], None] | None = None,
    ) -> None:
        self.tunnel = tunnel
        # Outbound: the target we ask the peer to dial (None: its fixed one). Inbound: the
        # target the peer named (checked by the tunnel's dial policy before dialing).
        self.target = target
        self._on_open = on_open
        self.id = stream_id
        self.outbound = outbound  # True: we sent OPEN (connecting side)
        self.reader = reader
        self.writer = writer
        self.state = StreamState.OPENING
        self.window = tunnel.window  # our receive window, announced to the peer
        # Sending direction.
        self.peer_window = peer_window  # the peer's receive window
        self.credit = 0  # bytes we may still send
        self.bytes_sent = 0
        self.fin_sent = False
        self.max_outstanding = 0
        self._credit_event = asyncio.Event()
        # Receiving direction.
        self.bytes_received = 0
        self.fin_received = False
        self._inbound: deque[bytes] = deque()
        self._unacked = 0  # received and not yet granted back: queued + being written
        self._pending_grant = 0  # written and drained, not yet granted
        self._grant_threshold = max(1, min(self.window // 4, 64 * 1024))
        self.max_unacked = 0
        self._inbound_event = asyncio.Event()
        # Lifecycle.
        self.reason: str | None = None  # why it ended early (reset, failure), if it did
        self.open_failed = False
        self._reply: asyncio.Future[frames.Frame] | None = None
        self._subtasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ views

    @property
    def outstanding(self) -> int:
        """DATA bytes sent and not yet acknowledged by the peer (never above its window)."""
        return self.peer_window - self.credit if self.state is StreamState.OPEN else 0

    @property
    def queued(self) -> int:
        """DATA bytes received and not yet written to TCP and drained (never above window)."""
        return self._unacked - self._pending_grant

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "target": format_hostport(*self.target) if self.target is not None else None,
            "outbound": self.outbound,
            "credit": self.credit,
            "outstanding": self.outstanding,
            "queued": self.queued,
            "max_outstanding": self.max_outstanding,
            "max_queued": self.max_unacked,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "fin_sent": self.fin_sent,
            "fin_received": self.fin_received,
        }

    def _log(self, level: int, msg: str, *args: Any) -> None:
        logger.log(level, "tube %s stream %d: " + msg, self.tunnel.name, self.id, *args)

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """The stream's whole life; runs as a task owned by the tunnel."""
        try:
            try:
                opened = await self._sub(self._open() if self.outbound else self._dial())
                if opened:
                    self.state = StreamState.OPEN
                    await self._run_open()
            except StreamEnded:
                pass
            except (ConnectionError, OSError) as exc:
                self.reset(f"TCP connection error: {_describe(exc)}")
            except Exception as exc:  # a bug: end this stream, never the tunnel
                self._log(logging.ERROR, "failed: %r", exc, exc_info=True)
                self.reset(f"internal error: {exc!r}")
        except asyncio.CancelledError:
            self.reset("the stream was closed locally", level=logging.DEBUG)
            raise
        finally:
            await self._finish()

    async def _run_open(self) -> None:
        up = self._spawn(self._uplink(), "up")
        down = self._spawn(self._downlink(), "down")
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    raise StreamEnded
                exc = task.exception()
                if exc is not None:
                    raise exc

    async def _finish(self) -> None:
        abort = self.reason is not None and not self.open_failed
        self.state = StreamState.ENDED
        cancelled = False
        # Every subtask is cancelled and awaited, even if this task is cancelled meanwhile.
        while self._subtasks:
            pending = set(self._subtasks)
            for task in pending:
                task.cancel()
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError:
                cancelled = True
        self._inbound.clear()
        self.tunnel._forget(self)
        writer = self.writer
        if writer is not None and (abort or cancelled):
            writer.transport.abort()  # a reset travels on as a TCP reset
        if cancelled:
            raise asyncio.CancelledError
        if writer is None or abort:
            return
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_LINGER):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    # ------------------------------------------------------------------ opening

    def _opened(self, reason: str | None) -> None:
        """Tell the owner of an outbound stream how its OPEN ended (once)."""
        callback, self._on_open = self._on_open, None
        if callback is None:
            return
        try:
            callback(reason)
        except Exception:
            self._log(logging.ERROR, "on_open callback failed", exc_info=True)

    async def _open(self) -> bool:
        """Connecting side: send OPEN, wait for OPEN_OK or OPEN_FAIL."""
        try:
            opened = await self._open_once()
        finally:
            if self._on_open is not None:  # failed, reset or cancelled before a reply
                self._opened(self.reason or "the stream ended before the peer answered")
        return opened

    async def _open_once(self) -> bool:
        self._reply = asyncio.get_running_loop().create_future()
        target = format_hostport(*self.target) if self.target is not None else ""
        if not self.tunnel._send_control(frames.encode_open(self.id, self.window, target),
                                         optional=True):
            self.open_failed = True
            self.reason = reasons.tag("cannot send the OPEN: the data channel is closed or "
                                      "full", reasons.FAILED)
            self.tunnel._open_failures += 1
            self._log(logging.WARNING, "%s; closing the client connection", self.reason)
            return False
        timeout = self.tunnel.open_timeout
        try:
            async with asyncio.timeout(timeout):
                reply = await self._reply
        except TimeoutError:
            self.open_failed = True
            self.tunnel._open_failures += 1
            self.reset(reasons.tag(f"the peer did not answer the stream's OPEN within "
                                   f"{timeout:g} s", reasons.TIMEOUT))
            return False
        if reply.type is frames.FrameType.OPEN_FAIL:
            self.open_failed = True
            self.reason = reply.text or "no reason given"
            self.tunnel._open_failures += 1
            self._log(logging.WARNING, "the peer could not open the stream: %s; "
                      "closing the client connection", self.reason)
            self._opened(self.reason)
            return False
        problem = frames.window_problem(reply.value)
        if problem is not None:
            self.open_failed = True
            self.tunnel._open_failures += 1
            self.tunnel._windows_refused += 1
            self.reset(f"protocol error: the peer's OPEN_OK announced {problem}", optional=True)
            return False
        self._set_peer_window(reply.value)
        self._log(logging.DEBUG, "open")
        self._opened(None)
        return True

    async def _dial(self) -> bool:
        """Exposing side: check and dial the target, answer OPEN_OK or OPEN_FAIL."""
        tunnel = self.tunnel
        timeout = tunnel.dial_timeout
        reason = code = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.target is not None:  # named by the peer: the dial policy decides
            where = format_hostport(*self.target)
            assert tunnel.dial_policy is not None
            try:
                async with asyncio.timeout(timeout):
                    addresses = await tunnel.dial_policy(*self.target)
            except Refusal as exc:
                reason, code = f"target {where}: {exc}", exc.code
                if exc.code == reasons.DENIED:
                    tunnel._opens_refused_denied += 1
            except TimeoutError:
                reason = f"target {where}: checking it took longer than {timeout:g} s"
                code = reasons.TIMEOUT
        else:
            assert tunnel.target is not None
            where = format_hostport(*tunnel.target)
            addresses = [tunnel.target]
        if reason is None:
            reason, code = await self._connect(where, addresses, deadline, timeout)
        if reason is not None:
            assert code is not None
            self.open_failed = True
            self.reason = reason
            tunnel._open_failures += 1
            self._log(logging.WARNING, "%s", reason)
            tunnel._send_control(frames.encode_open_fail(self.id, reasons.tag(reason, code)),
                                 optional=True)
            return False
        if not self.tunnel._send_control(frames.encode_open_ok(self.id, self.window),
                                         optional=True):
            # The peer is not reading its frames: drop this stream, not the whole tunnel.
            self.open_failed = True
            self.reason = "cannot send OPEN_OK: the data channel is closed or full"
            self.tunnel._open_failures += 1
            self._log(logging.WARNING, "%s; closing the connection to %s", self.reason, where)
            return False
        self._log(logging.DEBUG, "connected to %s", where)
        return True

    async def _connect(self, where: str, addresses: list[tuple[str, int]], deadline: float,
                       timeout: float) -> tuple[str | None, str | None]:
        """Dial ``addresses`` in order until one answers; (None, None) or (reason, code)."""
        loop = asyncio.get_running_loop()
        last: tuple[str, str] = (f"target {where} has no address to dial", reasons.NO_SUCH_HOST)
        for host, port in addresses:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    self.reader, self.writer = await asyncio.open_connection(host, port)
                return None, None
            except TimeoutError:
                last = (f"target {where} did not answer within {timeout:g} s", reasons.TIMEOUT)
                break
            except OSError as exc:
                if _is_refused(exc):
                    last = (f"target {where} refused the connection", reasons.REFUSED)
                else:
                    last = (f"target {where} cannot be reached: {_describe(exc)}",
                            reasons.for_os_error(exc))
        else:
            return last
        if last[1] != reasons.TIMEOUT:  # the deadline passed between addresses
            last = (f"target {where} did not answer within {timeout:g} s", reasons.TIMEOUT)
        return last

    def _set_peer_window(self, window: int) -> None:
        self.peer_window = window
        self.credit = window
        self._credit_event.set()

    # ------------------------------------------------------------------ uplink

    async def _uplink(self) -> None:
        reader = self.reader
        assert reader is not None
        tunnel = self.tunnel
        sid = self.id
        encode_data = frames.encode_data
        while True:
            while self.credit <= 0:
                self._credit_event.clear()
                await self._credit_event.wait()
            await tunnel._wait_writable()
            # The peer's largest DATA frame (16 KiB, or 60 KiB once its SETTINGS said so).
            data = await reader.read(min(self.credit, tunnel.peer_max_data))
            if not data:
                break
            # Reading may have taken a while; other streams may have filled the channel.
            await tunnel._wait_writable()
            tunnel._send_data(encode_data(sid, data), len(data))
            self.credit -= len(data)
            self.bytes_sent += len(data)
            out = self.peer_window - self.credit
            if out > self.max_outstanding:
                self.max_outstanding = out
        tunnel._send_control(frames.encode_fin(sid))
        self.fin_sent = True
        self._log(logging.DEBUG, "sent FIN after %d bytes", self.bytes_sent)

    # ------------------------------------------------------------------ downlink

    async def _downlink(self) -> None:
        writer = self.writer
        assert writer is not None
        inbound = self._inbound
        while True:
            while not inbound and not self.fin_received:
                self._inbound_event.clear()
                await self._inbound_event.wait()
            if inbound:
                # What arrived since the last turn in one call: one system call (uvloop
                # and asyncio write a list with one sendmsg/writev), not one per message.
                chunks = list(inbound)
                inbound.clear()
                n = sum(map(len, chunks))
                writer.writelines(chunks)
                await writer.drain()
                self._grant(n)
            else:  # FIN and nothing left to write
                if writer.can_write_eof():
                    writer.write_eof()
                self._log(logging.DEBUG, "received FIN after %d bytes", self.bytes_received)
                return

    def _grant(self, n: int) -> None:
        # Credit goes back in batches of a quarter window (at most 64 KiB) to save frames.
        # No stall: a sender out of credit has a whole window unacknowledged here, and once
        # that is drained the batch threshold is reached.
        self._pending_grant += n
        if self._pending_grant >= self._grant_threshold:
            grant = self._pending_grant
            self._pending_grant = 0
            self._unacked -= grant
            if self.state is StreamState.OPEN and not self.fin_received:
                self.tunnel._send_control(frames.encode_window(self.id, grant))

    # ------------------------------------------------------------------ frames from the peer

    def on_reply(self, frame: frames.Frame) -> None:
        """OPEN_OK / OPEN_FAIL."""
        if self._reply is None or self._reply.done():
            tunnel = self.tunnel
            tunnel._throttled(tunnel._bad_frame_log, logging.WARNING,
                              "tube %s stream %d: ignoring an unexpected %s from the peer",
                              tunnel.name, self.id, frame.type.name)
            return
        self._reply.set_result(frame)

    def on_data(self, data: bytes) -> None:
        if self.state is StreamState.ENDED:
            return
        if self.fin_received:
            self.reset("protocol error: DATA after FIN", optional=True)
            return
        n = len(data)
        if self._unacked + n > self.window:
            self.reset(f"flow control violation: {self._unacked + n} bytes unacknowledged, "
                       f"window is {self.window}", optional=True)
            return
        self._unacked += n
        if self._unacked > self.max_unacked:
            self.max_unacked = self._unacked
        self.bytes_received += n
        self._inbound.append(data)
        self._inbound_event.set()

    def on_window(self, increment: int) -> None:
        if self.state is StreamState.ENDED:
            return
        self.credit += increment
        if self.credit > self.peer_window:
            self.reset(f"protocol error: WINDOW credit {self.credit} exceeds the peer's "
                       f"window {self.peer_window}", optional=True)
            return
        self._credit_event.set()

    def on_fin(self) -> None:
        if self.state is StreamState.ENDED or self.fin_received:
            return
        self.fin_received = True
        self._inbound_event.set()

    def on_reset(self, reason: str) -> None:
        """The peer reset the stream: end it, answer nothing."""
        if self.state is StreamState.ENDED or self.reason is not None:
            return
        self.reason = f"reset by the peer: {reason or 'no reason given'}"
        self._log(logging.INFO, "%s", self.reason)
        self._stop()

    # ------------------------------------------------------------------ ending

    def reset(self, reason: str, *, send: bool = True, level: int = logging.WARNING,
              optional: bool = False) -> None:
        """End the stream now: tell the peer (RESET) unless ``send`` is false.

        ``optional``: the RESET answers the peer's own violation (or the tunnel is ending),
        so it is dropped rather than failing the tunnel when the control limit is reached.
        """
        if self.state is StreamState.ENDED or self.reason is not None:
            return
        self.reason = reason
        self._log(level, "reset: %s", reason)
        if send:
            self.tunnel._send_control(frames.encode_reset(self.id, reason), optional=optional)
        self._stop()

    def _stop(self) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.cancel()
        current = asyncio.current_task()
        for task in self._subtasks:
            if task is not current:
                task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"tether-tunnel-{self.tunnel.name}-{self.id}-{what}")
        self._subtasks.add(task)
        task.add_done_callback(self._subtasks.discard)
        return task

    async def _sub(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` as a subtask that a reset can cancel; raise StreamEnded if it was."""
        task = self._spawn(coro, "open")
        await asyncio.wait({task})
        if task.cancelled():
            raise StreamEnded
        return task.result()


def _is_refused(exc: OSError) -> bool:
    if isinstance(exc, ConnectionRefusedError):
        return True
    # Several addresses tried (e.g. "localhost"), all refused: Python 3.11 folds them
    # into one OSError("Multiple exceptions: ...").
    text = str(exc)
    return text.startswith("Multiple exceptions") and text.count(
        f"[Errno {errno.ECONNREFUSED}]") == text.count("[Errno ")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

