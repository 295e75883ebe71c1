"""Many TCP streams multiplexed over one WebRTC data channel.

The connecting side listens on a local port and turns every accepted TCP connection into a
stream (it allocates the stream ids, 1, 2, 3 ...). The exposing side dials its target for
every OPEN it receives: its fixed ``target``, or the target the OPEN names if its
``dial_policy`` (tether.allow) permits it; a refusal is an OPEN_FAIL with a coded reason
(tether.tunnel.reasons) that the opener's ``on_open`` callback receives. Frames are described in :mod:`tether.tunnel.frames`; one stream's
two loops in :mod:`tether.tunnel.stream`.

Memory is bounded at every hop:

- per stream and direction, at most ``window`` bytes are in flight between the sender's
  TCP read and the receiver's drained TCP write (credit-based, like HTTP/2 or SSH), plus at
  most one DATA payload (MAX_DATA, or up to MAX_DATA_LARGE once the peer's SETTINGS
  allow it) in the sender's hands;
- the channel: aiortc's ``RTCDataChannel.send`` queues without limit, so DATA is sent only
  while ``channel.bufferedAmount`` is below ``high_water``, waiting for the
  "bufferedamountlow" event (threshold ``low_water``) otherwise. Control frames (OPEN,
  OPEN_OK, OPEN_FAIL, WINDOW, FIN, RESET) are never held back (holding them would reorder
  them against DATA) but are bounded too: the channel's queue is the control queue, and
  a control frame is sent only while the queue stays within :attr:`Tunnel.bound`
  (``high_water + MAX_FRAME + control_limit``). Past that the peer is not reading: an
  optional frame (a reply to something the peer did: OPEN_FAIL, OPEN_OK, a RESET for its
  violation, our own OPEN) is dropped and counted (``control_dropped``), and a frame that
  streams cannot do without (WINDOW, FIN, a RESET of ours) fails the tunnel.
  ``stats["max_buffered"]`` is the largest bufferedAmount seen right after any send.

What the peer can make this side do is limited (all configurable on :class:`Tunnel`):

- at most ``max_streams`` streams at once (default 256): each of the peer's streams is a
  TCP connection to the target; OPENs beyond it get OPEN_FAIL ("stream limit ...");
- at most ``open_rate`` OPENs a second, ``open_burst`` at once (defaults 64/s, 128; a
  token bucket on ``clock``); OPENs beyond it get OPEN_FAIL ("OPEN rate limit ...");
- every OPEN that cannot be accepted, malformed ones included (oversized or non-UTF-8
  target, bad host:port, unknown flags, a window outside MIN_WINDOW..MAX_WINDOW), is
  answered with OPEN_FAIL at once, so the opener never waits for its timeout;
- an unparseable message (too short, text, unknown type) is logged (throttled), counted
  and ignored; only ``MAX_BAD_FRAMES_IN_A_ROW`` of them with no valid frame between
  means the peer does not speak this protocol, and the tunnel fails.

A failed tunnel (:attr:`failure` says why, ``on_fail(reason)`` is called once) ends every
stream, stops listening and refuses new streams, as if closed; its owner should replace
the tube and call :meth:`close`. The tunnel never closes the channel itself (the tube owns
it) and never gives up on transient trouble: an ICE restart keeps the channel and its
SCTP association, so streams go on. When the channel closes, every stream ends and the
loops stop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # aiortc is heavy to import; the tunnel only needs a channel's methods
    from aiortc import RTCDataChannel

from . import frames
from .frames import FrameError, FrameType
from . import reasons
from .limits import LogThrottle, TokenBucket
from .stream import Stream, StreamEnded, StreamState, format_hostport

logger = logging.getLogger("tether.tunnel")

DEFAULT_WINDOW = 256 * 1024
DEFAULT_HIGH_WATER = 1024 * 1024
DEFAULT_DIAL_TIMEOUT = 10.0
DEFAULT_OPEN_TIMEOUT = 30.0
#: Streams the peer may have open at once (each is a TCP connection to the target).
DEFAULT_MAX_STREAMS = 256
#: OPENs the peer may send a second, and at once.
DEFAULT_OPEN_RATE = 64.0
DEFAULT_OPEN_BURST = 128
#: Bytes of control frames the channel may hold beyond the data high-water mark.
DEFAULT_CONTROL_LIMIT = 256 * 1024
#: Unparseable messages in a row (no valid frame between) after which the tunnel fails.
MAX_BAD_FRAMES_IN_A_ROW = 64
ACTIVITY_INTERVAL = 1.0

#: Decides whether a named target may be dialed: (host, port) -> the addresses to dial, in
#: order; raises :class:`~tether.tunnel.reasons.Refusal` to refuse (see tether.allow).
DialPolicy = Callable[[str, int], Awaitable[list[tuple[str, int]]]]
#: Told how an OPEN of ours ended: None once the peer accepted it, else its reason.
OpenCallback = Callable[[str | None], None]


def parse_hostport(value: str) -> tuple[str, int]:
    """Parse "HOST:PORT" or "[IPV6]:PORT" into (host, port); raise ValueError if bad.

    >>> parse_hostport("127.0.0.1:5432")
    ('127.0.0.1', 5432)
    >>> parse_hostport("[::1]:5432")
    ('::1', 5432)
    """
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    text = value.strip()
    if not text:
        raise ValueError("empty address: expected HOST:PORT, e.g. 127.0.0.1:5432")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{value!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':PORT' after ']', e.g. [::1]:5432")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise ValueError(
                f"{value!r}: put an IPv6 address in brackets, e.g. [::1]:5432")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r}: missing ':PORT', e.g. 127.0.0.1:5432")
        if not host:
            raise ValueError(f"{value!r}: missing host before ':', e.g. 127.0.0.1:5432")
        if any(c.isspace() or c in "/@[]" for c in host):
            raise ValueError(f"{value!r}: {host!r} is not a host name or address")
    if not port_text.isdigit():
        raise ValueError(f"{value!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} out of range 0-65535")
    return host, port


class Tunnel:
    """TCP streams over one open RTCDataChannel; see the module docstring.

    Limits on the peer (keywords): ``max_streams`` streams at once (256); ``open_rate``
    OPENs a second (64.0; None: no rate limit), ``open_burst`` at once (128), timed by
    ``clock`` (time.monotonic); ``control_limit`` bytes of control frames past the data
    high-water mark (256 KiB). ``window`` must be in MIN_WINDOW..MAX_WINDOW. ``on_fail``
    is called once, with the reason, if the tunnel fails (:attr:`failure`).
    """

    def __init__(
        self,
        channel: RTCDataChannel,
        name: str = "tube",
        target: tuple[str, int] | None = None,
        window: int = DEFAULT_WINDOW,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        dial_timeout: float = DEFAULT_DIAL_TIMEOUT,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        on_activity: Callable[[], None] | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        open_rate: float | None = DEFAULT_OPEN_RATE,
        open_burst: int = DEFAULT_OPEN_BURST,
        control_limit: int = DEFAULT_CONTROL_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        on_fail: Callable[[str], None] | None = None,
        dial_policy: DialPolicy | None = None,
    ) -> None:
        problem = frames.window_problem(window)
        if problem is not None:
            raise ValueError(f"window: {problem}")
        if high_water < 1:
            raise ValueError(f"high_water {high_water} must be positive")
        if max_streams < 1:
            raise ValueError(f"max_streams {max_streams} must be at least 1")
        if open_rate is not None and not open_rate > 0:
            raise ValueError(f"open_rate {open_rate} must be positive (or None: no limit)")
        if open_burst < 1:
            raise ValueError(f"open_burst {open_burst} must be at least 1")
        if control_limit < frames.HEADER_SIZE + frames.MAX_REASON:
            raise ValueError(f"control_limit {control_limit} must hold at least one RESET "
                             f"({frames.HEADER_SIZE + frames.MAX_REASON} bytes)")
        self.channel = channel
        self.name = name
        self.target = target
        self.dial_policy = dial_policy
        self.window = window
        self.high_water = high_water
        self.low_water = high_water // 4 if low_water is None else low_water
        if not 0 <= self.low_water < high_water:
            raise ValueError(f"low_water {self.low_water} must be in 0..high_water-1")
        self.dial_timeout = dial_timeout
        self.open_timeout = open_timeout
        self.on_activity = on_activity
        self.max_streams = max_streams
        self.open_rate = open_rate
        self.open_burst = open_burst
        self.control_limit = control_limit
        self.on_fail = on_fail
        self._open_bucket = (TokenBucket(open_rate, open_burst, clock)
                             if open_rate is not None else None)
        # Floods of bad frames must not flood the log: a few lines a second, then counts.
        self._refusal_log = LogThrottle(clock=clock)
        self._bad_frame_log = LogThrottle(clock=clock)
        self._drop_log = LogThrottle(clock=clock)
        # The largest DATA payload the peer accepts: the protocol's base until its SETTINGS.
        self.peer_max_data = frames.MAX_DATA
        self._announced = False  # our SETTINGS sent (with our first frame)
        self._largest_data_sent = 0

        self._streams: dict[int, Stream] = {}
        self._next_id = 1
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._writable = asyncio.Event()
        self._writable.set()
        self._started = False
        self._channel_closed = False
        self._closing = False
        self._closed_future: asyncio.Future[None] | None = None
        self._failure: str | None = None
        self._bad_in_a_row = 0
        self._last_activity = 0.0
        # Counters.
        self._streams_total = 0
        self._open_failures = 0
        self._streams_reset = 0
        self._bytes_to_peer = 0
        self._bytes_from_peer = 0
        self._frames_malformed = 0
        self._max_buffered = 0
        self._buffered_waits = 0
        self._opens_refused = 0
        self._opens_refused_limit = 0
        self._opens_refused_rate = 0
        self._opens_refused_malformed = 0
        self._windows_refused = 0
        self._control_dropped = 0
        self._opens_refused_denied = 0

    # ------------------------------------------------------------------ public API

    @property
    def data_bound(self) -> int:
        """Largest bufferedAmount the channel can reach from DATA alone."""
        return self.high_water + frames.MAX_FRAME

    @property
    def bound(self) -> int:
        """Largest bufferedAmount the channel can reach: DATA, then control frames."""
        return self.high_water + frames.MAX_FRAME + self.control_limit

    @property
    def accepts_streams(self) -> bool:
        """The exposing side: it has a fixed target, a dial policy for named ones, or both."""
        return self.target is not None or self.dial_policy is not None

    @property
    def closed(self) -> bool:
        return self._closing or self._channel_closed

    @property
    def failure(self) -> str | None:
        """Why the tunnel failed (the peer broke the protocol or stopped reading), if it did."""
        return self._failure

    @property
    def streams(self) -> dict[int, Stream]:
        return self._streams

    @property
    def stats(self) -> dict[str, Any]:
        streams = self._streams.values()
        return {
            "streams_open": len(self._streams),
            "streams_total": self._streams_total,
            "streams_reset": self._streams_reset,
            "open_failures": self._open_failures,
            "bytes_to_peer": self._bytes_to_peer,
            "bytes_from_peer": self._bytes_from_peer,
            "frames_malformed": self._frames_malformed,
            "opens_refused": self._opens_refused,
            "opens_refused_limit": self._opens_refused_limit,
            "opens_refused_rate": self._opens_refused_rate,
            "opens_refused_malformed": self._opens_refused_malformed,
            "opens_refused_denied": self._opens_refused_denied,
            "windows_refused": self._windows_refused,
            "control_dropped": self._control_dropped,
            "max_streams": self.max_streams,
            "failure": self._failure,
            "buffered": self._buffered_amount(),
            "max_buffered": self._max_buffered,
            "buffered_waits": self._buffered_waits,
            "high_water": self.high_water,
            "window": self.window,
            "peer_max_data": self.peer_max_data,
            "largest_data_sent": self._largest_data_sent,
            "outstanding": sum(s.outstanding for s in streams),
            "queued": sum(s.queued for s in streams),
        }

    def stream_stats(self) -> list[dict[str, Any]]:
        """One snapshot per open stream: credit, outstanding, queued bytes and counters."""
        return [s.snapshot() for s in self._streams.values()]

    def start(self) -> None:
        """Hook the channel's events; the channel must already be open."""
        if self._started:
            return
        self._started = True
        self.channel.bufferedAmountLowThreshold = self.low_water
        self.channel.on("message", self._on_message)
        self.channel.on("close", self._on_channel_close)
        self.channel.on("bufferedamountlow", self._on_buffered_low)
        if self.channel.readyState != "open":
            logger.warning("tube %s: tunnel started on a channel that is %s",
                           self.name, self.channel.readyState)
            if self.channel.readyState == "closed":
                self._on_channel_close()
        logger.debug("tube %s: tunnel started (%s side, window %d, high water %d)",
                     self.name, "exposing" if self.accepts_streams else "connecting",
                     self.window, self.high_water)

    def _on_settings(self, max_data: int) -> None:
        if max_data:
            self.peer_max_data = max(frames.MAX_DATA, min(max_data, frames.MAX_DATA_LARGE))
            logger.debug("tube %s: the peer accepts DATA of up to %d bytes; sending up to %d",
                         self.name, max_data, self.peer_max_data)

    async def listen(self, host: str, port: int) -> asyncio.Server:
        """Connecting side: listen on (host, port) and carry every accepted connection."""
        if self.closed:
            raise RuntimeError(f"tube {self.name}: the tunnel is closed")
        server = await asyncio.start_server(self._on_client, host, port)
        self._servers.append(server)
        where = ", ".join(format_hostport(*s.getsockname()[:2]) for s in server.sockets)
        logger.info("tube %s: listening on %s", self.name, where)
        return server

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    target: tuple[str, int] | None = None,
                    on_open: OpenCallback | None = None) -> None:
        """Carry one accepted TCP connection as a new stream; return when it has ended.

        ``target``: ask the peer to dial this (host, port) instead of its fixed target (its
        dial policy decides). ``on_open(None)`` is called once the peer has opened the
        stream, before any of its data is written to ``writer``; ``on_open(reason)`` if it
        could not (the reason may end with a code, see :mod:`tether.tunnel.reasons`).
        """
        task = self._open_stream(reader, writer, target, on_open)
        if task is None:
            return
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise

    async def close(self) -> None:
        """Close listeners and streams, cancel and await every task. Idempotent."""
        if self._closed_future is not None:
            await asyncio.shield(self._closed_future)
            return
        loop = asyncio.get_running_loop()
        self._closed_future = loop.create_future()
        try:
            self._closing = True
            for server in self._servers:
                server.close()
            if self._streams:
                logger.info("tube %s: tunnel closing, ending %d streams",
                            self.name, len(self._streams))
            for stream in list(self._streams.values()):
                stream.reset("the tunnel closed", send=self._can_send(), level=logging.DEBUG,
                             optional=True)
            self._writable.set()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._unhook()
            for server in self._servers:
                await server.wait_closed()
        finally:
            self._closed_future.set_result(None)

    # ------------------------------------------------------------------ streams

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine): asyncio makes no task for it; ours is owned.
        self._open_stream(reader, writer)

    def _open_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        target: tuple[str, int] | None = None, on_open: OpenCallback | None = None,
    ) -> asyncio.Task[None] | None:
        peer = writer.get_extra_info("peername")
        if self.closed:
            logger.warning("tube %s: tunnel closed; refusing the connection from %s",
                           self.name, _peer(peer))
            if on_open is not None:
                _call(on_open, reasons.tag("the tunnel is closed", reasons.FAILED))
            writer.close()
            return None
        if self.accepts_streams:
            logger.warning("tube %s: carry() on the exposing side", self.name)
        stream_id = self._allocate_id()
        stream = Stream(self, stream_id, outbound=True, reader=reader, writer=writer,
                        target=target, on_open=on_open)
        self._add(stream)
        logger.info("tube %s stream %d: carrying the connection from %s%s",
                    self.name, stream_id, _peer(peer),
                    f" to {format_hostport(*target)}" if target is not None else "")
        return self._spawn(stream.run(), f"stream-{stream_id}")

    def _allocate_id(self) -> int:
        sid = self._next_id
        while sid == 0 or sid in self._streams:
            sid = (sid + 1) & frames.MAX_STREAM_ID
        self._next_id = (sid + 1) & frames.MAX_STREAM_ID
        return sid

    def _add(self, stream: Stream) -> None:
        self._streams[stream.id] = stream
        self._streams_total += 1

    def _forget(self, stream: Stream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            if stream.reason is not None and not stream.open_failed:
                self._streams_reset += 1
            logger.debug("tube %s stream %d: ended (%d bytes to peer, %d from peer)%s",
                         self.name, stream.id, stream.bytes_sent, stream.bytes_received,
                         f": {stream.reason}" if stream.reason else "")

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"tether-tunnel-{self.name}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("tube %s: task %s failed: %r", self.name, task.get_name(),
                         task.exception())

    # ------------------------------------------------------------------ sending

    def _can_send(self) -> bool:
        return not self._channel_closed and self.channel.readyState == "open"

    def _buffered_amount(self) -> int:
        try:
            return self.channel.bufferedAmount
        except Exception:
            return 0

    def _sent(self) -> None:
        buffered = self.channel.bufferedAmount
        if buffered > self._max_buffered:
            self._max_buffered = buffered

    def _send_control(self, frame: bytes, *, optional: bool = False) -> bool:
        """Send a control frame now, if the channel's queue stays within :attr:`bound`.

        Past the bound the peer is not reading: an ``optional`` frame is dropped (counted),
        any other fails the tunnel. Returns whether the frame was sent.
        """
        if not self._can_send():
            logger.debug("tube %s: channel not open, dropping a control frame", self.name)
            return False
        settings = b"" if self._announced else _OUR_SETTINGS
        buffered = self._buffered_amount()
        if buffered + len(settings) + len(frame) > self.bound:
            if optional:
                self._control_dropped += 1
                self._throttled(self._drop_log, logging.WARNING,
                                "tube %s: the peer is not reading (%d bytes queued in the "
                                "data channel, limit %d); dropping a %s frame",
                                self.name, buffered, self.bound, _frame_name(frame))
            else:
                self._fail(f"the peer is not reading: {buffered} bytes are queued in the "
                           f"data channel and a {_frame_name(frame)} frame would pass the "
                           f"limit of {self.bound} (high water {self.high_water} + control "
                           f"limit {self.control_limit})")
            return False
        try:
            if settings:
                self.channel.send(settings)
                self._announced = True
            self.channel.send(frame)
        except Exception as exc:  # InvalidStateError during close, ValueError, ...
            logger.debug("tube %s: cannot send a control frame: %r", self.name, exc)
            return False
        self._sent()
        return True

    def _throttled(self, throttle: LogThrottle, level: int, msg: str, *args: Any) -> None:
        skipped = throttle.admit()
        if skipped is None:
            return
        if skipped:
            msg += " (%d similar messages suppressed)"
            args = (*args, skipped)
        logger.log(level, msg, *args)

    def _send_data(self, frame: bytes, size: int) -> None:
        if not self._can_send():
            raise StreamEnded("the data channel is not open")
        try:
            self.channel.send(frame)
        except Exception as exc:
            raise StreamEnded(f"cannot send on the data channel: {exc!r}") from exc
        self._sent()
        self._bytes_to_peer += size
        if size > self._largest_data_sent:
            self._largest_data_sent = size
        self._activity()

    async def _wait_writable(self) -> None:
        """Wait while the channel's queue is at or above the high-water mark."""
        channel = self.channel
        while channel.bufferedAmount >= self.high_water:
            if self.closed:
                raise StreamEnded("the tunnel is closed")
            self._buffered_waits += 1
            self._writable.clear()
            await self._writable.wait()
        if self.closed:
            raise StreamEnded("the tunnel is closed")

    def _on_buffered_low(self) -> None:
        self._writable.set()

    def _activity(self) -> None:
        if self.on_activity is None:
            return
        now = time.monotonic()
        if now - self._last_activity >= ACTIVITY_INTERVAL:
            self._last_activity = now
            try:
                self.on_activity()
            except Exception:
                logger.exception("tube %s: on_activity callback failed", self.name)

    # ------------------------------------------------------------------ receiving

    def _on_message(self, message: bytes | str) -> None:
        # Called synchronously from aiortc's receive path: cheap, and never raises.
        try:
            self._dispatch(message)
        except Exception:
            logger.exception("tube %s: error handling a frame from the peer", self.name)

    def _dispatch(self, message: bytes | str) -> None:
        if self._failure is not None:
            return
        if isinstance(message, str):
            self._bad_frame(f"a text message ({len(message)} chars); tunnel frames are binary")
            return
        try:
            frame = frames.decode(message)
        except FrameError as exc:
            self._on_malformed(exc)
            return
        self._bad_in_a_row = 0
        ftype = frame.type
        if ftype is FrameType.DATA:
            stream = self._streams.get(frame.stream_id)
            self._bytes_from_peer += len(frame.data)
            self._activity()
            if stream is not None:
                stream.on_data(frame.data)
            else:
                logger.debug("tube %s stream %d: DATA for a stream that is gone",
                             self.name, frame.stream_id)
            return
        if ftype is FrameType.OPEN:
            self._on_open(frame)
            return
        if ftype is FrameType.SETTINGS:
            self._on_settings(frame.value)
            return
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            logger.debug("tube %s stream %d: %s for a stream that is gone",
                         self.name, frame.stream_id, ftype.name)
            return
        if ftype is FrameType.WINDOW:
            stream.on_window(frame.value)
        elif ftype is FrameType.FIN:
            stream.on_fin()
        elif ftype is FrameType.RESET:
            stream.on_reset(frame.text)
        elif ftype is FrameType.OPEN_OK or ftype is FrameType.OPEN_FAIL:
            if stream.outbound and stream.state is StreamState.OPENING:
                stream.on_reply(frame)
            else:
                self._throttled(self._bad_frame_log, logging.WARNING,
                                "tube %s stream %d: ignoring an unexpected %s",
                                self.name, stream.id, ftype.name)

    def _on_malformed(self, exc: FrameError) -> None:
        sid, ftype = exc.stream_id, exc.frame_type
        if ftype is None:  # no header, or a type we do not know: nothing to answer
            self._bad_frame(str(exc))
            return
        self._frames_malformed += 1
        self._bad_in_a_row = 0  # a known frame type: the peer speaks the protocol
        if ftype is FrameType.OPEN:
            assert sid is not None
            self._opens_refused_malformed += 1
            self._refuse_open(sid, f"malformed OPEN: {exc}")
            return
        stream = self._streams.get(sid) if sid is not None else None
        if stream is not None:
            self._throttled(self._bad_frame_log, logging.WARNING,
                            "tube %s stream %d: malformed frame from the peer: %s",
                            self.name, stream.id, exc)
            stream.reset(f"malformed frame: {exc}", optional=True)
        else:
            self._throttled(self._bad_frame_log, logging.WARNING,
                            "tube %s: ignoring a malformed frame from the peer: %s",
                            self.name, exc)

    def _bad_frame(self, what: str) -> None:
        """A message that is not a frame of this protocol at all: count, log, ignore."""
        self._frames_malformed += 1
        self._bad_in_a_row += 1
        self._throttled(self._bad_frame_log, logging.WARNING,
                        "tube %s: ignoring a malformed frame from the peer: %s", self.name, what)
        if self._bad_in_a_row >= MAX_BAD_FRAMES_IN_A_ROW:
            self._fail(f"the peer does not speak the tunnel protocol: {self._bad_in_a_row} "
                       f"unparseable messages in a row (the last: {what})")

    def _on_open(self, frame: frames.Frame) -> None:
        sid = frame.stream_id
        if not self.accepts_streams:
            self._refuse_open(sid, "this side does not accept streams (it is the connecting side)")
            return
        if self.closed:
            self._refuse_open(sid, "the tunnel is closing")
            return
        if sid == 0:
            self._refuse_open(sid, "stream id 0 is reserved")
            return
        if sid in self._streams:
            self._refuse_open(sid, f"stream id {sid} is already in use")
            return
        target: tuple[str, int] | None = None
        if frame.text:
            try:
                target = parse_hostport(frame.text)
            except ValueError as exc:
                self._opens_refused_malformed += 1
                self._refuse_open(sid, reasons.tag(f"malformed OPEN: bad target: {exc}",
                                                   reasons.BAD_TARGET))
                return
            if self.dial_policy is None:
                self._opens_refused_denied += 1
                self._refuse_open(sid, reasons.tag(
                    f"dynamic targets are not supported here (asked for {frame.text!r}; "
                    f"the exposing side has no allow-list)", reasons.DENIED))
                return
        elif self.target is None:
            self._opens_refused_malformed += 1
            self._refuse_open(sid, reasons.tag("this side has no fixed target: the OPEN must "
                                               "name one (host:port)", reasons.BAD_TARGET))
            return
        problem = frames.window_problem(frame.value)
        if problem is not None:
            self._windows_refused += 1
            self._refuse_open(sid, f"OPEN with {problem}")
            return
        if len(self._streams) >= self.max_streams:
            self._opens_refused_limit += 1
            self._refuse_open(sid, f"stream limit reached: {len(self._streams)} streams "
                                   f"are open, at most {self.max_streams} (max_streams)")
            return
        if self._open_bucket is not None and not self._open_bucket.take():
            self._opens_refused_rate += 1
            self._refuse_open(sid, f"OPEN rate limit: at most {self.open_rate:g} OPENs a "
                                   f"second, {self.open_burst} at once (open_rate, open_burst)")
            return
        stream = Stream(self, sid, outbound=False, peer_window=frame.value, target=target)
        stream._set_peer_window(frame.value)
        self._add(stream)
        dialing = target if target is not None else self.target
        assert dialing is not None
        logger.info("tube %s stream %d: opening, dialing %s%s", self.name, sid,
                    format_hostport(*dialing), " (named by the peer)" if target else "")
        self._spawn(stream.run(), f"stream-{sid}")

    def _refuse_open(self, sid: int, reason: str) -> None:
        self._open_failures += 1
        self._opens_refused += 1
        self._throttled(self._refusal_log, logging.WARNING,
                        "tube %s stream %d: refusing the peer's OPEN: %s", self.name, sid, reason)
        self._send_control(frames.encode_open_fail(sid, reason), optional=True)

    def _fail(self, reason: str) -> None:
        """The protocol cannot go on: end every stream, refuse new ones, tell the owner."""
        if self._failure is not None or self._closing or self._channel_closed:
            return
        self._failure = reason
        self._closing = True
        logger.error("tube %s: the tunnel fails: %s; ending %d streams",
                     self.name, reason, len(self._streams))
        self._writable.set()
        for server in self._servers:
            server.close()
        for stream in list(self._streams.values()):
            stream.reset(f"the tunnel failed: {reason}", optional=True)
        if self.on_fail is not None:
            try:
                self.on_fail(reason)
            except Exception:
                logger.exception("tube %s: on_fail callback failed", self.name)

    def _on_channel_close(self) -> None:
        if self._channel_closed:
            return
        self._channel_closed = True
        logger.info("tube %s: data channel closed; ending %d streams",
                    self.name, len(self._streams))
        self._writable.set()
        for server in self._servers:
            server.close()
        for stream in list(self._streams.values()):
            stream.reset("the data channel closed", send=False, level=logging.DEBUG)

    def _unhook(self) -> None:
        for event, handler in (("message", self._on_message),
                               ("close", self._on_channel_close),
                               ("bufferedamountlow", self._on_buffered_low)):
            try:
                self.channel.remove_listener(event, handler)
            except Exception:  # already removed (aiortc drops all listeners on close)
                pass


#: What we accept (the larger DATA frames), for the peer: sent just before our first frame,
#: so it precedes every OPEN and OPEN_OK (and so every DATA) of ours; a tunnel that never
#: carries a stream sends nothing. An older peer ignores it.
_OUR_SETTINGS = frames.encode_settings(frames.MAX_DATA_LARGE)


def _frame_name(frame: bytes) -> str:
    try:
        return FrameType(frame[0]).name
    except (ValueError, IndexError):
        return "control"


def _call(callback: OpenCallback, reason: str | None) -> None:
    try:
        callback(reason)
    except Exception:
        logger.exception("an on_open callback failed")


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_hostport(str(peer[0]), int(peer[1]))
    return str(peer)
