"""The signaling relay: a WebSocket server that passes signals between the two peers of a
conversation (docs/architecture.md, "Signals"), holds them while the other peer is away,
forwards the receiving client's acknowledgements back to the sender and tells each peer when
the other one comes and goes. It never waits on one connection while serving another.

Wire protocol
=============

Connecting
----------
``ws://HOST:PORT/?conversation=CONVERSATION_ID&peer=PEER_ID`` (``wss://`` when the relay
has an ``ssl_context``; clients verify its certificate) with the header
``Authorization: Bearer TOKEN`` and, on a reconnect, ``X-Tether-Resume: CREDENTIAL``.
Refusals happen in the HTTP handshake, with a plain-text body saying why (it never names
another peer); 429 and 503 carry ``Retry-After`` (seconds):

=====  ============================================================================
401    missing, malformed or wrong token (compared with ``hmac.compare_digest``)
400    ``conversation`` or ``peer`` missing, repeated, empty, longer than 256
       characters or not printable
404    a path other than ``/``
409    the conversation already has two peers and ``peer`` is not one of them, or
       ``peer`` is connected and the request lacks its resume credential
429    a per-address limit: failed-auth budget spent (checked *before* the token),
       too many connections / conversations from this address, joins too fast
503    ``max_conversations`` or ``max_connections`` reached (or shutting down)
=====  ============================================================================

A peer id identifies one end of the conversation but is not a credential. The first
message of every connection carries a secret ``resume`` credential (``tr1_...``). A
connection with the peer id of a *connected* peer is accepted only with that credential
(header ``X-Tether-Resume``); it then replaces the old connection at once and keeps the
credential. A peer id that is not connected joins afresh (a stale credential, e.g. after a
relay restart, is ignored) and gets a new one. Replacing: the old one is sent close code 4000 and its
TCP connection is closed without waiting for the closing handshake (aborted after
``replace_grace`` seconds if it cannot even be flushed); it is not counted as a third peer,
and the signals still queued for it move to the new connection. (The client uses a random
peer id per process unless told otherwise.)

Frames, client -> relay
-----------------------
A text frame holds one signal or a JSON array of signals (Contract 3). Besides the envelope
``{"tube_id", "conversation_id", "kind", "data"}``, a signal sent by ``SignalingClient``
carries four transport fields:

``peer``     the sender's peer id (the relay overwrites it with the id the connection
             authenticated as, so a peer cannot speak for another one)
``session``  random per client instance: a restarted process never reuses (session, seq)
``seq``      per-session sequence number: 1, 2, 3, ... (integer >= 0)
``prev``     the seq of the previous signal of this session the sender still keeps
             (not yet acknowledged) when it writes this one, 0 if none (integer >= 0)

``seq``, ``session`` and ``prev`` are optional (a minimal peer may omit them; it then gets no
acknowledgements). ``conversation_id`` may be empty (the relay fills in the connection's
conversation); any other value than the connection's conversation is an error. The key
``control`` is reserved: it marks control messages and may not appear in a signal. Every
other key is relayed unchanged, so the envelope can grow (an end-to-end authentication
field later).

A frame may instead hold one control message (a JSON object with a ``control`` key). The only
one a client sends is the end-to-end acknowledgement of signals it received::

    {"control": "ack", "to": "<sender peer id>", "session": "<sender session>",
     "seqs": [5, 6, 7]}

The receiving client sends at most one per received frame (the relay never mixes senders or
sessions in one frame), as soon as it has accepted the frame's signals (before its
application works on them, so a slow application does not hold up the sender), and for
duplicates too (their first ack was evidently lost). It does not acknowledge a signal whose ``prev``
it has not delivered yet: that one is dropped and comes again, in order, with the resend
of the missing one. The relay forwards the ack to peer ``to`` if it is connected and
drops it otherwise (the sender resends; the receiver acknowledges the duplicate).

Frames, relay -> client
-----------------------
- Relayed signals, as a single object or an array (one sender and session per frame), in
  the order their sender sent them.
- Error replies, which are Contract 3 signals of kind ``error`` without a ``peer`` field::

      {"kind": "error", "tube_id": "<the bad item's tube_id, or "">",
       "conversation_id": "<the connection's conversation>",
       "data": "item 2: missing or empty 'tube_id'"}

  A frame with several bad items gets one error per bad item (sent together as one array
  frame; beyond 20, one summary error counts the rest). The good items of the same frame are
  relayed as usual and the connection stays open.
- Control messages (JSON objects with a ``control`` key; never relayed, not signals):

  ``{"control": "ack", "peer": "<acknowledging peer>", "session": S, "seqs": [...]}``
      the other peer's client received these signals of yours (forwarded as sent, with
      ``peer`` set by the relay). Only this makes the sender forget a signal.
  ``{"control": "rejected", "session": S, "seqs": [...], "retry": true | false}``
      the relay did not take these signals (an error reply says why). ``retry: true``:
      its queue for the absent peer is full; keep them and send them again later (when
      the peer joins). ``retry: false``: they are invalid and will never be taken.
  ``{"control": "peer", "event": "present" | "absent"}``
      the first message on every connection: whether the other peer is connected now.
  ``{"control": "peer", "event": "joined" | "left"}``
      the other peer connected (also: replaced its own connection) or went away. On
      ``joined`` a sender resends everything not yet acknowledged: what it wrote to the
      peer's previous connection may be lost.

Multiplexed connections
-----------------------
One process serving several tunnels opens ONE connection for all its conversations:
``ws://HOST:PORT/?mux=1`` (no ``conversation``/``peer``; same token header, same 401/404/
429/503 handshake refusals; ``mux`` with another value than ``1``, or together with
``conversation`` or ``peer``, is 400). On it the client joins and leaves conversations with
control messages, answered in order::

    {"control": "join", "conversation": C, "peer": P, "resume": CRED}  (resume optional)
    -> {"conversation": C, "control": "joined", "peer": P, "resume": NEW,
        "event": "present" | "absent"}
    -> {"conversation": C, "control": "refused", "status": 409, "reason": "...",
        "retry_after": 10.0}                       (retry_after only where waiting helps)
    {"control": "leave", "conversation": C}        (no answer)

``joined`` is the membership's first presence message and carries its resume credential
(the rules are those of the handshake: a connected peer id is replaced only with its
credential). A refusal has the status the handshake would answer, for the same reasons
(400 bad ids, 409 full or peer id taken, 429 address limits or joins too fast, 503 relay
full or store unreachable), plus 409 for a conversation already joined on this connection
and 429 past ``max_conversations_per_connection`` (default 64) conversations on one
connection. A refused join changes nothing else on the connection.

Everything on a multiplexed connection names its conversation: signals by their
``conversation_id`` (required: a frame's signals all belong to its first item's
conversation), control messages by a ``conversation`` key (acks both ways, ``rejected``,
``peer`` presence events, ``joined``/``refused``), error replies by their
``conversation_id``. A frame for a conversation not joined on this connection gets an error
reply and ``rejected`` with ``retry: true``. When a newer connection of the peer (classic or
multiplexed, holding the credential) takes over one conversation, the multiplexed connection
gets ``{"conversation": C, "control": "closed", "code": 4000, "reason": ...}`` and keeps its
other conversations; if that was its last one it is closed with code 4000 as a classic
connection is. Each membership is a peer of its own for the conversation table (in memory or
Redis), so the other peer may be classic or multiplexed, on this relay or another. The
connection has one bounded outgoing queue and one writer for all its conversations; a full
queue drops the whole connection (the client reconnects and joins everything again).

Errors and limits
-----------------
- Binary frames: error reply, nothing relayed.
- A text frame larger than ``max_message_bytes`` (default 64 KiB): error reply, nothing
  relayed, connection stays open. So that such frames can be answered, the WebSocket layer
  accepts messages up to ``4 * max_message_bytes``; only a message beyond that makes
  ``websockets`` close the connection with code 1009 (message too big).
- Held signals (other peer absent): at most ``max_held`` (default 256) per conversation;
  past that, error reply and ``rejected`` with ``retry: true``. A resend of a signal that
  is already held is not held twice.
- Every connection has one bounded outgoing queue (``send_queue_frames`` frames,
  ``send_queue_bytes`` bytes) drained by its own writer task. A connection whose queue is
  full, or whose writer cannot finish one send within ``send_timeout`` seconds, is dropped
  without a closing handshake (its peer reconnects); its signals are held meanwhile.
  Signals held for a joining peer, or carried over from the connection it replaces, are
  queued past the limit (they are bounded by ``max_held`` and the old queue).
- At most ``max_conversations`` (default 10,000) conversations; two peers each.
- Per connection: ``websockets`` ``write_limit`` bounds the socket write buffer and
  ``max_queue`` bounds received frames not yet processed.

Abuse limits (``RelayLimits``, per client address = IPv4 address or IPv6 /64, and in
total; rates are token buckets on the injectable ``clock``): ``max_connections`` 2000 /
``max_connections_per_address`` 32 open WebSockets; ``max_conversations`` 10,000 /
``max_conversations_per_address`` 32 live conversations created; ``join_rate`` 5/s burst
``join_burst`` 20 per address, ``total_join_rate`` 500/s burst 1000; ``failed_auth_rate``
0.2/s burst ``failed_auth_burst`` 5 wrong tokens per address (then 429 until refilled, even
for the right token); held signals ``max_held`` 256 and ``max_held_bytes`` 1 MiB per
conversation, ``max_held_total`` 100,000 and ``max_held_total_bytes`` 64 MiB in total (past
them: error reply and ``rejected`` with ``retry: true``); held signals older than
``held_ttl`` 600 s are dropped (checked every ``expire_interval`` 30 s; senders resend on
``joined``). A conversation with no connected peer is forgotten at once.

Hostile frames: a frame nested deeper than 8 levels is refused before parsing; any parse
failure is an error reply; all signals of a frame must share one ``session`` (others get an
error); at most one error frame and two ``rejected`` notices answer a frame; ``seq`` and
``prev`` must be integers >= 0. The client sends at most one ack per received frame.
Neither side ever lets a frame's content close the connection with 1011. The token and
credentials never reach a log handler (:mod:`tether.signaling.redact`).

Close codes used by the relay: 1001 when the relay shuts down (clients reconnect), 4000 when
a newer connection with the same peer id replaced this one, 4409 / 4503 when a join loses a
race for the last slot after the handshake was accepted (same meaning as HTTP 409 / 503).

Health and metrics
------------------
``GET /healthz`` (200 ``ready`` / 503 ``not ready: why``) and ``GET /metrics`` (Prometheus
text) are answered on the relay's port without a token (:mod:`tether.signaling.metrics`).

Delivery
--------
The relay keeps no durable state; a restart forgets everything (with ``--redis`` the
conversations live in Redis and outlive any one relay process, see ``redis_table.py``). The client keeps every signal
the other peer's client has not acknowledged and sends all of them again, in order, after
each reconnect, when told the peer joined, and (backstop) when acknowledgements stop coming
for a while although the peer is present; the receiving client delivers each (peer, session)
in seq order, once, using ``prev`` to notice a missing predecessor. Together that delivers
each signal to the application exactly once and in order per sender, across half-open
connections, dropped connections and relay restarts.
"""


from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from tether import web as web_page
from tether.signals import ERROR, KINDS, Signal, SignalError, validate_signal

from . import redact
from .conversations import (
    ABSENT,
    PRESENT,
    ConversationTable,
    JoinRefused,
    MemoryConversationTable,
)
from .frames import load, text_of, with_text
from .limits import BucketTable, RelayLimits, address_key, retry_after
from ..metrics_http import CONTENT_TYPE
from .metrics import RelayMetrics
from .redact import RESUME_HEADER
from .ws_fastpath import FastServerConnection

log = logging.getLogger(__name__)

# -- wire constants shared with the client ----------------------------------------------

CONTROL = "control"
"""Key that marks a control message (never relayed, not a Contract 3 signal)."""
ACK = "ack"
REJECTED = "rejected"
PEER_EVENT = "peer"
PEER_FIELD = "peer"
SESSION_FIELD = "session"
SEQ_FIELD = "seq"
PREV_FIELD = "prev"
TO_FIELD = "to"
RESUME_FIELD = "resume"
"""Key of the resume credential in the first presence message."""

CLOSE_REPLACED = 4000
CLOSE_CONVERSATION_FULL = 4409
CLOSE_RELAY_FULL = 4503

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
WS_SIZE_FACTOR = 4
"""websockets' max_size is this many times max_message_bytes (see "Errors and limits")."""
MAX_ID_LENGTH = 256
MAX_ERRORS_PER_FRAME = 20
WRITE_BATCH_BYTES = 64 * 1024
"""At most this much (whole frames) goes into one socket write."""


def error_signal(conversation_id: str, data: str, tube_id: str = "") -> Signal:
    return {"kind": ERROR, "tube_id": tube_id, "conversation_id": conversation_id, "data": data}


def encode(obj: Any) -> str:
    """Compact JSON, ASCII only (so len() is the size in bytes)."""
    return json.dumps(obj, separators=(",", ":"))


def frames_of(encoded: list[str], max_bytes: int) -> list[str]:
    """Pack encoded signals into frames of at most ``max_bytes`` (one signal may exceed it)."""
    return [frame for frame, _ in _packed(encoded, max_bytes)]


def _packed(encoded: list[str], max_bytes: int) -> list[tuple[str, range]]:
    """(frame, indexes of the signals in it) for encoded signals packed up to max_bytes."""
    out: list[tuple[str, range]] = []
    start, size = 0, 2
    for index, item in enumerate(encoded):
        if index > start and size + len(item) + 1 > max_bytes:
            out.append((_frame(encoded[start:index]), range(start, index)))
            start, size = index, 2
        size += len(item) + 1
    if start < len(encoded):
        out.append((_frame(encoded[start:]), range(start, len(encoded))))
    return out


def _frame(batch: list[str]) -> str:
    return batch[0] if len(batch) == 1 else "[" + ",".join(batch) + "]"


def pack_signals(signals: list[Signal], max_bytes: int) -> list[tuple[str, list[Signal]]]:
    """Frames for ``signals``: in order, one (peer, session) per frame, within max_bytes."""
    out: list[tuple[str, list[Signal]]] = []
    run: list[Signal] = []
    run_key: tuple[Any, Any] | None = None

    def flush() -> None:
        encoded = [text_of(s) for s in run]
        for frame, indexes in _packed(encoded, max_bytes):
            out.append((frame, [run[i] for i in indexes]))

    for signal in signals:
        key = (signal.get(PEER_FIELD), signal.get(SESSION_FIELD))
        if run and key != run_key:
            flush()
            run = []
        run_key = key
        run.append(signal)
    if run:
        flush()
    return out


# -- one connection as the conversation table sees it -----------------------------------


@dataclass
class _Outgoing:
    text: str
    signals: list[Signal] | None
    """The relayed signals in this frame (they move to a newer connection of the peer)."""


class _Endpoint:
    """A connected peer: implements ``conversations.Peer`` over a ServerConnection.

    Everything sent to the peer goes through one bounded queue, so a stuck socket only
    ever stalls itself. The queue is flushed once per event-loop turn by a callback
    (``_flush``): every frame queued during the turn goes out in one socket write, with no
    task woken per frame. Only when the socket's buffer is past ``write_limit`` does a writer
    task exist, to wait (at most ``send_timeout``) for it to drain. An idle peer holds no
    queue, callback or task (they exist only while frames wait): thousands of idle peers
    are what a relay mostly serves, and each empty deque alone costs ~760 bytes.
    """

    __slots__ = (
        "ws", "conversation_id", "peer_id", "address", "resume", "credential",
        "max_frame_bytes", "queue_frames", "queue_bytes", "send_timeout", "replace_grace",
        "gone", "peer_json", "_queue", "_queued_bytes", "_writer", "_flush_handle",
        "_started", "_abort_handle",
    )

    def __init__(
        self,
        ws: FastServerConnection,
        conversation_id: str,
        peer_id: str,
        *,
        address: str = "",
        resume: str = "",
        max_frame_bytes: int,
        queue_frames: int,
        queue_bytes: int,
        send_timeout: float | None,
        replace_grace: float,
    ) -> None:
        self.ws = ws
        self.conversation_id = conversation_id
        self.peer_id = peer_id
        self.address = address
        self.resume = resume
        self.credential = ""
        self.max_frame_bytes = max_frame_bytes
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        self.send_timeout = send_timeout
        self.replace_grace = replace_grace
        self.gone = False
        """Superseded or evicted: nothing more is queued or written."""
        self.peer_json = _json_string(peer_id)
        self._queue: deque[_Outgoing] | None = None
        """Frames for the writer; None while there are none (created on the first frame)."""
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        """Exists only while the socket's buffer is full (it waits for it to drain)."""
        self._flush_handle: asyncio.Handle | None = None
        """The flush scheduled for the end of this loop turn, if frames wait."""
        self._started = False
        self._abort_handle: asyncio.TimerHandle | None = None

    # lifecycle (the connection handler owns it)

    def start(self) -> None:
        self._started = True
        if self._queue:
            self._schedule_flush()

    async def finish(self) -> None:
        self._started = False
        self._cancel_flush()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            await asyncio.wait({writer})
            if not writer.cancelled() and writer.exception() is not None:
                log.error("relay writer failed", exc_info=writer.exception())
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None

    @property
    def queued(self) -> int:
        """Frames waiting for the writer (for tests and status)."""
        return len(self._queue) if self._queue else 0

    # conversations.Peer

    def deliver(self, signals: list[Signal], *, bounded: bool = True) -> bool:
        if len(signals) == 1:
            return self._put([_Outgoing(text_of(signals[0]), signals)], bounded)
        items = [
            _Outgoing(frame, batch)
            for frame, batch in pack_signals(signals, self.max_frame_bytes)
        ]
        return self._put(items, bounded)

    def presence(self, event: str) -> bool:
        message: dict[str, Any] = {CONTROL: PEER_EVENT, "event": event}
        if event in (PRESENT, ABSENT) and self.credential:
            message[RESUME_FIELD] = self.credential  # the first message of the connection
        return self._put([_Outgoing(encode(message), None)])

    def forward(self, message: dict[str, Any]) -> bool:
        return self._put([_Outgoing(text_of(message), None)])

    def take_undelivered(self) -> list[Signal]:
        taken: list[Signal] = []
        if not self._queue:
            return taken
        for item in self._queue:
            if item.signals:
                taken.extend(item.signals)
        kept = [item for item in self._queue if not item.signals]
        self._queue = deque(kept) if kept else None
        self._queued_bytes = sum(len(item.text) for item in kept)
        return taken

    def supersede(self) -> None:
        # Don't wait for the closing handshake: the old connection is often half-open
        # (that is why its peer reconnected). Send code 4000 so a live duplicate client
        # learns it was replaced, flush without waiting, abort if flushing stalls.
        if self.gone:
            return
        self._stop("replaced by a newer connection of this peer")
        transport = self.ws.transport
        try:
            if self.ws.protocol.state is State.OPEN:
                self.ws.protocol.send_close(
                    CLOSE_REPLACED, "replaced by a newer connection of this peer"
                )
                self.ws.send_data()
            transport.close()
        except Exception as exc:  # the transport is already broken
            log.debug("closing a replaced connection failed: %r", exc)
            transport.abort()
            return
        self._abort_handle = asyncio.get_running_loop().call_later(
            self.replace_grace, transport.abort
        )

    def evict(self, reason: str) -> None:
        if self.gone:
            return
        log.warning(
            "dropping peer %r of conversation %r from %s: %s",
            self.peer_id,
            self.conversation_id,
            _remote(self.ws),
            reason,
        )
        self._stop(reason)
        self.ws.transport.abort()

    # replies to this peer's own frames

    def reply(self, message: Any) -> bool:
        return self._put([_Outgoing(encode(message), None)])

    # internals

    def _stop(self, reason: str) -> None:
        self.gone = True
        self._queue = None
        self._queued_bytes = 0
        self._cancel_flush()
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    def _put(self, items: list[_Outgoing], bounded: bool = True) -> bool:
        if self.gone:
            return False
        if not items:
            return True
        size = len(items[0].text) if len(items) == 1 else sum(len(i.text) for i in items)
        if (
            bounded
            and self._queue
            and (
                len(self._queue) + len(items) > self.queue_frames
                or self._queued_bytes + size > self.queue_bytes
            )
        ):
            return False
        if self._queue is None:
            self._queue = deque(items)
        else:
            self._queue.extend(items)
        self._queued_bytes += size
        if self._flush_handle is None and self._writer is None and self._started:
            self._schedule_flush()
        return True

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._writer is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _flush(self) -> None:
        """Write what waits (a loop callback: the frames of this whole turn in one write);
        hand over to a writer task if the socket's buffer fills up."""
        self._flush_handle = None
        if self.gone or self._writer is not None:
            return
        try:
            if not self._write_batch():
                if not self._queue:
                    self._queue = None  # (emptied by take_undelivered)
                return
        except (ConnectionClosed, OSError, RuntimeError) as exc:
            log.debug("relay write to peer %r failed: %r", self.peer_id, exc)
            return
        if self.ws.paused:  # past write_limit: wait for the peer to read, boundedly
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        elif self._queue:
            self._schedule_flush()  # more than one batch: let the readers run first
        else:
            self._queue = None  # an idle peer keeps no deque

    def _write_batch(self) -> bool:
        """One socket write of the queued frames (up to ``WRITE_BATCH_BYTES``), framed by
        the connection (``FastServerConnection.write_texts``; ping/pong and closing stay
        websockets' business). False if nothing could be written."""
        queue = self._queue  # (take_undelivered() replaces it, never mid-batch)
        if not queue or self.ws.protocol.state is not State.OPEN:
            return False
        size = 0
        texts = []
        while queue and size < WRITE_BATCH_BYTES:
            text = queue.popleft().text
            size += len(text)
            texts.append(text)
        self._queued_bytes -= size
        self.ws.write_texts(texts)
        return True

    async def _write_loop(self) -> None:
        """Wait (at most ``send_timeout``) for the socket's buffer to drain, write more,
        until the queue is empty; the peer is dropped if it does not read."""
        ws = self.ws
        try:
            while True:
                if ws.paused:
                    try:
                        async with asyncio.timeout(self.send_timeout):
                            await ws.drain()
                    except TimeoutError:
                        self.evict(
                            f"a send did not finish within {self.send_timeout:g}s "
                            f"(the peer does not read)"
                        )
                        return
                elif self._queue:
                    await asyncio.sleep(0)  # let the readers run between large batches
                if not self._write_batch():
                    return
        except (ConnectionClosed, OSError, RuntimeError):
            return
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None
                if not self._queue:
                    self._queue = None


class _Route:
    __slots__ = ("conversation_id", "peer_id", "address", "resume", "mux")

    def __init__(self, conversation_id: str, peer_id: str, address: str, resume: str,
                 mux: bool = False) -> None:
        self.conversation_id = conversation_id
        self.peer_id = peer_id
        self.address = address
        self.resume = resume
        self.mux = mux
        """A multiplexed connection (``/?mux=1``): conversations are joined on it later."""


# -- the server ----------------------------------------------------------------------------


class SignalingServer:
    """The relay. ``await start()`` binds (``port=0`` picks a free port, see ``.port``).

    ``limits`` (:class:`~tether.signaling.limits.RelayLimits`) sets every abuse limit;
    ``max_conversations`` and ``max_held``, if given, override the matching fields.
    ``ssl_context`` makes it a ``wss://`` relay. ``clock`` drives the rate limits and the
    expiry of held signals (inject a fake one in tests).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        max_conversations: int | None = None,
        max_held: int | None = None,
        limits: RelayLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
        table: ConversationTable | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 5.0,
        write_limit: int = 64 * 1024,
        max_queue: int = 16,
        send_queue_frames: int = 256,
        send_queue_bytes: int = 1024 * 1024,
        send_timeout: float | None = 5.0,
        replace_grace: float = 1.0,
        metrics: RelayMetrics | None = None,
        web: bool = False,
        max_conversations_per_connection: int | None = None,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("SignalingServer needs a non-empty token")
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if send_queue_frames < 1 or send_queue_bytes < 1:
            raise ValueError("send_queue_frames and send_queue_bytes must be positive")
        if send_timeout is not None and send_timeout <= 0:
            raise ValueError("send_timeout must be positive (or None)")
        if replace_grace <= 0:
            raise ValueError("replace_grace must be positive")
        limits = limits or RelayLimits()
        overrides: dict[str, int] = {}
        if max_conversations is not None:
            overrides["max_conversations"] = max_conversations
        if max_held is not None:
            overrides["max_held"] = max_held
        if max_conversations_per_connection is not None:
            overrides["max_conversations_per_connection"] = max_conversations_per_connection
        if overrides:
            limits = RelayLimits(**{**vars(limits), **overrides})
        self.limits = limits
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.ssl_context = ssl_context
        self.clock = clock
        # (not "table or ...": an empty table is falsy, it has a __len__)
        self.table: ConversationTable = table if table is not None else MemoryConversationTable(
            max_conversations=limits.max_conversations,
            max_held=limits.max_held,
            max_held_bytes=limits.max_held_bytes,
            max_held_total=limits.max_held_total,
            max_held_total_bytes=limits.max_held_total_bytes,
            max_conversations_per_address=limits.max_conversations_per_address,
            held_ttl=limits.held_ttl,
            clock=clock,
        )
        self._token = token.encode()
        # A browser offers the token as a subprotocol (tether.web): keep that form out of logs.
        redact.install(token, web_page.token_subprotocol(token))
        self.web = web
        self._failed_auth = BucketTable(
            limits.failed_auth_rate, limits.failed_auth_burst, clock, limits.tracked_addresses
        )
        self._joins = BucketTable(
            limits.join_rate, limits.join_burst, clock, limits.tracked_addresses
        )
        self._all_joins = BucketTable(limits.total_join_rate, limits.total_join_burst, clock, 1)
        self._connections: dict[str, int] = {}  # address -> open WebSocket connections
        # Accepted handshake -> its route, until the handler takes it. Not an attribute of
        # the connection: a new attribute un-shares its __dict__'s keys (~1.6 KB per peer).
        self._routes: weakref.WeakKeyDictionary[ServerConnection, _Route] = (
            weakref.WeakKeyDictionary()
        )
        self.connection_count = 0
        self._endpoint_options = dict(
            max_frame_bytes=max_message_bytes,
            queue_frames=send_queue_frames,
            queue_bytes=send_queue_bytes,
            send_timeout=send_timeout,
            replace_grace=replace_grace,
        )
        self._ws_options = dict(
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            write_limit=write_limit,
            max_queue=max_queue,
            max_size=WS_SIZE_FACTOR * max_message_bytes,
            # Browsers: answer "tether.v1" when offered (a page's offer with no answer fails).
            select_subprotocol=web_page.select_subprotocol,
            create_connection=FastServerConnection,  # plain frames without the generators
        )
        self._server: Server | None = None
        self._expirer: asyncio.Task[None] | None = None
        self._closed = False
        self.metrics = metrics or RelayMetrics()
        self.metrics.connections = lambda: self.connection_count
        self.metrics.conversations = lambda: len(self.table)
        self.metrics.ready = lambda: 1.0 if self.health()[0] else 0.0
        if getattr(self.table, "observe_redis", "absent") is None:
            self.table.observe_redis = self.metrics.redis.observe  # type: ignore[attr-defined]
        # A networked table times delivery where the signal arrives; else it is the relay call.
        self._time_relay = not hasattr(self.table, "observe_delivery")
        # The in-memory table's coroutine-free path for a signal a present peer takes.
        self._relay_now = getattr(self.table, "relay_now", None)
        if getattr(self.table, "observe_delivery", "absent") is None:
            self.table.observe_delivery = (  # type: ignore[attr-defined]
                self.metrics.delivery.observe
            )

    # lifecycle

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("this SignalingServer was closed; make a new one")
        if self._server is not None:
            return
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            ssl=self.ssl_context,
            **self._ws_options,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._expirer = asyncio.create_task(self._expire_loop(), name="relay-expire")
        log.info("signaling relay listening on %s", self.url)

    async def close(self) -> None:
        """Stop listening, close every connection (code 1001), wait for their handlers."""
        if self._closed:
            return
        self._closed = True
        expirer, self._expirer = self._expirer, None
        if expirer is not None:
            expirer.cancel()
            await asyncio.wait({expirer})
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.table.close()
        log.info("signaling relay on port %s closed", self.port)

    async def __aenter__(self) -> SignalingServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        host = self.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{host}:{self.port}/"

    @property
    def conversation_count(self) -> int:
        return len(self.table)

    def health(self) -> tuple[bool, str]:
        """(ready, why): what ``GET /healthz`` answers (load balancers send joins only when
        ready)."""
        if self._closed:
            return False, "not ready: shutting down"
        if self._server is None:
            return False, "not ready: not listening yet"
        if not getattr(self.table, "ready", True):
            problem = getattr(self.table, "problem", "") or "its store is not reachable"
            return False, f"not ready: {problem}"
        return True, "ready"

    def _http(self, ws: ServerConnection, path: str) -> Response:
        """``/healthz`` and ``/metrics``: plain HTTP GETs, answered before authentication."""
        if path == "/healthz":
            ok, why = self.health()
            return ws.respond(200 if ok else 503, why + "\n")
        response = ws.respond(200, self.metrics.render().decode())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.expire_interval)
            try:
                dropped = await self.table.expire()
            except Exception:
                log.exception("expiring held signals failed")
                continue
            if dropped:
                log.info("dropped %d held signal(s) older than %gs", dropped, self.limits.held_ttl)

    # handshake

    def _refuse(
        self,
        ws: ServerConnection,
        status: int,
        reason: str,
        route: str,
        wait: float | None = None,
    ) -> Response:
        log.info("refused %s from %s: %d %s", route, _remote(ws), status, reason)
        self.metrics.error(f"refused_{status}")
        response = ws.respond(status, reason + "\n")
        if status == http.HTTPStatus.UNAUTHORIZED:
            response.headers["WWW-Authenticate"] = 'Bearer realm="tether"'
        if wait is not None:
            response.headers["Retry-After"] = retry_after(wait)
        return response

    async def _process_request(
        self, ws: ServerConnection, request: Request
    ) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path in ("/healthz", "/metrics") and "Upgrade" not in request.headers:
            return self._http(ws, parts.path)
        if self.web and "Upgrade" not in request.headers:
            page = web_page.http_response(ws, parts.path)  # the demo page under /web/
            if page is not None:
                return page
        query = parse_qs(parts.query, keep_blank_values=True)
        names = {
            key: (query.get(key) or [""])[0][:MAX_ID_LENGTH] for key in ("conversation", "peer")
        }
        route = f"peer={names['peer']!r} conversation={names['conversation']!r}"
        address = _address_of(ws)

        # Wrong tokens get slower: once an address used up its failed-auth budget it is
        # refused before its token is even looked at, so guessing costs real time.
        wait = self._failed_auth.wait(address)
        if wait > 0:
            return self._refuse(
                ws, 429, "too many failed authentication attempts from your address", route, wait
            )
        authorization = request.headers.get_all("Authorization")
        # A browser cannot set headers: its token (and resume credential) come as subprotocols.
        offered_token, offered_resume = web_page.credentials_from_subprotocols(
            request.headers.get_all("Sec-WebSocket-Protocol"))
        if not authorization and offered_token is not None:
            authorization = [f"Bearer {offered_token}"]
        problem = None
        if len(authorization) != 1:
            problem = "missing token: send the header 'Authorization: Bearer <token>'"
        else:
            scheme, _, given = authorization[0].strip().partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                problem = "malformed Authorization header: expected 'Bearer <token>'"
            elif not hmac.compare_digest(given.strip().encode(), self._token):
                problem = "invalid token"
        if problem is not None:
            self._failed_auth.take(address)
            return self._refuse(ws, 401, problem, route)

        if parts.path not in ("", "/"):
            return self._refuse(ws, 404, f"unknown path {parts.path!r}; connect to '/'", route)
        if "mux" in query:
            return self._admit_mux(ws, query, address)
        values: dict[str, str] = {}
        for key in ("conversation", "peer"):
            given_values = query.get(key, [])
            if len(given_values) != 1:
                what = "missing" if not given_values else "repeated"
                return self._refuse(
                    ws,
                    400,
                    f"{what} query parameter {key!r}: connect to "
                    f"/?conversation=<id>&peer=<id>",
                    route,
                )
            value = given_values[0]
            if not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
                return self._refuse(
                    ws,
                    400,
                    f"query parameter {key!r} must be 1 to {MAX_ID_LENGTH} printable characters",
                    route,
                )
            values[key] = value
        resumes = request.headers.get_all(RESUME_HEADER) or (
            [offered_resume] if offered_resume is not None else [])
        resume = resumes[0].strip() if len(resumes) == 1 else ""
        if len(resume) > MAX_ID_LENGTH:
            resume = ""

        connection_refusal = self._connection_refusal(ws, address, route)
        if connection_refusal is not None:
            return connection_refusal

        refusal = await self.table.admit(
            values["conversation"], values["peer"], resume=resume, address=address
        )
        if refusal is not None:
            return self._refuse(ws, refusal.status, refusal.reason, route, refusal.retry_after)
        self._count_connection(ws, address)
        self._routes[ws] = _Route(values["conversation"], values["peer"], address, resume)
        return None

    def _connection_refusal(
        self, ws: ServerConnection, address: str, route: str
    ) -> Response | None:
        """The per-process connection limits and join rates a new WebSocket must pass."""
        if self.connection_count >= self.limits.max_connections:
            return self._refuse(
                ws, 503, "the relay has too many open connections; try again later", route,
                self.limits.connection_retry_after,
            )
        if self._connections.get(address, 0) >= self.limits.max_connections_per_address:
            return self._refuse(
                ws,
                429,
                f"too many open connections from your address "
                f"({self.limits.max_connections_per_address})",
                route,
                self.limits.connection_retry_after,
            )
        wait = max(self._all_joins.wait("*"), self._joins.take(address))
        if wait == 0:
            wait = self._all_joins.take("*")
        if wait > 0:
            return self._refuse(ws, 429, "too many connection attempts; slow down", route, wait)
        return None

    def _admit_mux(
        self, ws: ServerConnection, query: dict[str, list[str]], address: str
    ) -> Response | None:
        """Handshake of a multiplexed connection (authenticated already): no conversation
        yet, so only the connection limits apply; each join is checked when it comes."""
        route = "multiplexed connection"
        if query.get("mux") != ["1"] or "conversation" in query or "peer" in query:
            return self._refuse(
                ws, 400, "a multiplexed connection is /?mux=1 (conversations are joined on "
                "it with control messages)", route,
            )
        refusal = self._connection_refusal(ws, address, route)
        if refusal is not None:
            return refusal
        self._count_connection(ws, address)
        self._routes[ws] = _Route("", "", address, "", mux=True)
        return None

    def _count_connection(self, ws: ServerConnection, address: str) -> None:
        """Count an accepted connection until its TCP connection is gone (whatever happens)."""
        self.connection_count += 1
        self._connections[address] = self._connections.get(address, 0) + 1

        def release(_: object) -> None:
            self.connection_count -= 1
            left = self._connections.get(address, 0) - 1
            if left > 0:
                self._connections[address] = left
            else:
                self._connections.pop(address, None)

        ws.connection_lost_waiter.add_done_callback(release)

    # connection

    async def _handle(self, ws: FastServerConnection) -> None:
        route = self._routes.pop(ws)
        _forget_handshake_headers(ws)
        if route.mux:
            from .mux_relay import serve_mux  # (it builds on this module)

            await serve_mux(self, ws, route)
            return
        endpoint = _Endpoint(
            ws,
            route.conversation_id,
            route.peer_id,
            address=route.address,
            resume=route.resume,
            **self._endpoint_options,
        )
        endpoint.start()
        try:
            try:
                replaced = await self.table.join(route.conversation_id, endpoint)
            except JoinRefused as exc:
                status = exc.refusal.status
                log.info(
                    "refused peer=%r conversation=%r from %s: %d %s",
                    route.peer_id,
                    route.conversation_id,
                    _remote(ws),
                    status,
                    exc.refusal.reason,
                )
                code = CLOSE_CONVERSATION_FULL if status == 409 else CLOSE_RELAY_FULL
                await endpoint.finish()
                await ws.close(code, exc.refusal.reason[:120])
                return
            log.info(
                "peer %r joined conversation %r from %s%s",
                route.peer_id,
                route.conversation_id,
                _remote(ws),
                " (replacing its previous connection)" if replaced else "",
            )
            try:
                await self._read(ws, endpoint)
            except ConnectionClosed:
                pass
            finally:
                await self.table.leave(route.conversation_id, endpoint)
                log.info(
                    "peer %r left conversation %r (close code %s%s)",
                    route.peer_id,
                    route.conversation_id,
                    ws.close_code,
                    f", {ws.close_reason}" if ws.close_reason else "",
                )
        finally:
            await endpoint.finish()

    async def _read(self, ws: FastServerConnection, endpoint: _Endpoint) -> None:
        """Handle the peer's frames in order until it closes or must stop being read
        (the messages that arrived together are taken in one ``recv_batch``)."""
        while True:
            for message in await ws.recv_batch():
                if not await self._on_message(endpoint, message):
                    return

    async def _on_message(
        self,
        endpoint: _Endpoint,
        message: str | bytes,
        parsed: tuple[Any, str | None] | None = None,
    ) -> bool:
        """Handle one frame; return False when this connection should stop reading.

        ``parsed``: ``load(message)``, if the caller already did it (the multiplexed
        connection reads the conversation from the frame first). Whatever the frame holds,
        the answer is at most an error reply and ``rejected`` notices: a hostile frame
        never closes the connection with 1011.

        The common frames are handled right here (no coroutine of their own): one valid
        signal the relay passes on exactly as it arrived (ASCII, already carrying this
        connection's peer id and conversation, its transport fields well-formed), and acks.
        """
        if endpoint.gone:
            return False
        metrics = self.metrics
        metrics.frames += 1
        try:
            if (type(message) is str and len(message) <= self.max_message_bytes
                    and message.isascii()):
                if parsed is None:
                    parsed = load(message)
                payload = parsed[0]
                if type(payload) is dict and CONTROL in payload:
                    return await self._on_control(endpoint, payload)  # an ack
                if (type(payload) is dict
                        and _plain(payload, endpoint.peer_id, endpoint.conversation_id)):
                    started = time.perf_counter()
                    signals = [with_text(payload, message)]
                    relay_now = self._relay_now
                    rejected = None
                    if relay_now is None or not relay_now(
                            endpoint.conversation_id, endpoint, signals):
                        result = await self.table.relay(
                            endpoint.conversation_id, endpoint, signals)
                        if result.superseded:
                            return False  # a newer connection of this peer took over
                        rejected = result.rejected
                    if self._time_relay:
                        metrics.delivery.observe(time.perf_counter() - started)
                    if not rejected:
                        metrics.signals += 1
                        return True
                    return self._rejected(endpoint, rejected)
            return await self._on_frame(endpoint, message, parsed)
        except Exception as exc:
            log.warning(
                "peer %r conversation %r: failed to handle a frame (%s: %s)",
                endpoint.peer_id,
                endpoint.conversation_id,
                type(exc).__name__,
                str(exc)[:200],
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return self._reply(
                endpoint,
                [error_signal(endpoint.conversation_id, "the relay failed to handle this frame")],
                _Refused(),
            )

    async def _on_frame(
        self,
        endpoint: _Endpoint,
        message: str | bytes,
        parsed: tuple[Any, str | None] | None = None,
    ) -> bool:
        conversation_id = endpoint.conversation_id
        errors: list[Signal] = []
        refused: _Refused = _Refused()

        if isinstance(message, bytes):
            errors.append(
                error_signal(
                    conversation_id,
                    f"binary frames are not accepted ({len(message)} bytes); "
                    "send signals as JSON text frames",
                )
            )
            return self._reply(endpoint, errors, refused)

        size = len(message) if message.isascii() else len(message.encode("utf-8"))
        if size > self.max_message_bytes:
            tube_id = ""
            payload, _ = load(message)
            for item in payload if isinstance(payload, list) else [payload]:
                refused.add(item, retry=False)
            if isinstance(payload, dict) and isinstance(payload.get("tube_id"), str):
                tube_id = payload["tube_id"][:MAX_ID_LENGTH]
            errors.append(
                error_signal(
                    conversation_id,
                    f"frame of {size} bytes exceeds the relay's limit of "
                    f"{self.max_message_bytes} bytes; nothing in it was relayed",
                    tube_id,
                )
            )
            return self._reply(endpoint, errors, refused)

        payload, problem = parsed if parsed is not None else load(message)
        if problem is not None:
            errors.append(error_signal(conversation_id, f"{problem}; nothing was relayed"))
            return self._reply(endpoint, errors, refused)
        if type(payload) is dict:
            if CONTROL in payload:
                return await self._on_control(endpoint, payload)
            # Relayed as it arrived (not encoded again) when the relay would not change it.
            if (
                size == len(message)
                and payload.get(PEER_FIELD) == endpoint.peer_id
                and payload.get("conversation_id") == conversation_id
            ):
                return await self._on_plain_signal(endpoint, payload, message)

        good: list[Signal] = []
        index_of: dict[int, str] = {}
        session: Any = _UNSET
        for label, item, problem in _split(payload):
            if problem is None:
                problem = self._check_item(endpoint, item)
            if problem is None:
                if session is _UNSET:
                    session = item.get(SESSION_FIELD)
                elif item.get(SESSION_FIELD) != session:
                    problem = (
                        f"all signals of a frame must have the same {SESSION_FIELD!r} "
                        f"(or none)"
                    )
            if problem is None:
                item[PEER_FIELD] = endpoint.peer_id
                good.append(item)
                index_of[id(item)] = label
            else:
                tube_id = item.get("tube_id") if isinstance(item, dict) else None
                errors.append(
                    error_signal(
                        conversation_id,
                        f"{label}: {problem}" if label else problem,
                        tube_id[:MAX_ID_LENGTH] if isinstance(tube_id, str) else "",
                    )
                )
                refused.add(item, retry=False)

        if good:
            started = time.perf_counter()
            result = await self.table.relay(conversation_id, endpoint, good)
            if result.superseded:
                return False  # a newer connection of this peer took over
            metrics = self.metrics
            if self._time_relay:
                metrics.delivery.observe(time.perf_counter() - started)
            metrics.signals += len(good) - len(result.rejected)
            if result.rejected:
                metrics.error("rejected_signal", len(result.rejected))
            for signal, reason in result.rejected:
                label = index_of.get(id(signal), "")
                errors.append(
                    error_signal(
                        conversation_id,
                        f"{label}: {reason}" if label else reason,
                        signal["tube_id"],
                    )
                )
                refused.add(signal, retry=True)
        if errors:
            self.metrics.error("error_reply", len(errors))
            log.debug(
                "peer %r conversation %r: %d bad item(s): %s",
                endpoint.peer_id,
                conversation_id,
                len(errors),
                errors[0]["data"],
            )
        return self._reply(endpoint, errors, refused)

    async def _on_plain_signal(
        self, endpoint: _Endpoint, payload: dict[str, Any], message: str
    ) -> bool:
        """The common frame, fast: one signal the relay passes on exactly as it arrived
        (ASCII, already carrying this connection's peer id and conversation)."""
        conversation_id = endpoint.conversation_id
        try:
            validate_signal(payload)
            problem = self._check_item(endpoint, payload)
        except SignalError as exc:
            problem = str(exc)[:300]
        refused = _Refused()
        if problem is not None:
            refused.add(payload, retry=False)
            tube_id = payload.get("tube_id")
            tube_id = tube_id[:MAX_ID_LENGTH] if isinstance(tube_id, str) else ""
            error = error_signal(conversation_id, problem, tube_id)
            self.metrics.error("error_reply")
            return self._reply(endpoint, [error], refused)
        started = time.perf_counter()
        result = await self.table.relay(conversation_id, endpoint, [with_text(payload, message)])
        if result.superseded:
            return False  # a newer connection of this peer took over
        metrics = self.metrics
        if self._time_relay:
            metrics.delivery.observe(time.perf_counter() - started)
        if not result.rejected:
            metrics.signals += 1
            return True
        return self._rejected(endpoint, result.rejected)

    def _rejected(self, endpoint: _Endpoint, rejected: list[tuple[Signal, str]]) -> bool:
        """Answer a one-signal frame the table did not take (its queue is full)."""
        self.metrics.error("rejected_signal")
        refused = _Refused()
        errors = []
        for signal, reason in rejected:
            errors.append(error_signal(endpoint.conversation_id, reason, signal["tube_id"]))
            refused.add(signal, retry=True)
        return self._reply(endpoint, errors, refused)

    async def _on_control(self, endpoint: _Endpoint, message: dict[str, Any]) -> bool:
        problem = _check_ack(message)
        if problem is not None:
            return self._reply(
                endpoint, [error_signal(endpoint.conversation_id, problem)], _Refused()
            )
        session, seqs = message[SESSION_FIELD], message["seqs"]
        forwarded = {CONTROL: ACK, PEER_FIELD: endpoint.peer_id, SESSION_FIELD: session,
                     "seqs": seqs}
        await self.table.forward(
            endpoint.conversation_id,
            endpoint,
            message[TO_FIELD],
            with_text(
                forwarded,
                f'{{"{CONTROL}":"{ACK}","{PEER_FIELD}":{endpoint.peer_json},'
                f'"{SESSION_FIELD}":{_json_string(session)},'
                f'"seqs":[{",".join(map(str, seqs))}]}}',
            ),
        )
        return not endpoint.gone

    def _check_item(self, endpoint: _Endpoint, item: Signal) -> str | None:
        if CONTROL in item:
            return f"the key {CONTROL!r} is reserved for control messages"
        conversation_id = item.get("conversation_id", "")
        if not conversation_id:
            item["conversation_id"] = endpoint.conversation_id
        elif conversation_id != endpoint.conversation_id:
            return (
                f"conversation_id {conversation_id[:MAX_ID_LENGTH]!r} does not match this "
                f"connection's conversation {endpoint.conversation_id!r}"
            )
        for key in (SEQ_FIELD, PREV_FIELD):
            if key in item and not _is_count(item[key]):
                return f"{key!r} must be an integer >= 0"
        if SESSION_FIELD in item and not isinstance(item[SESSION_FIELD], str):
            return f"{SESSION_FIELD!r} must be a string"
        return None

    def _reply(self, endpoint: _Endpoint, errors: list[Signal], refused: _Refused) -> bool:
        """Queue error replies and ``rejected`` notices; False if the queue overflowed."""
        if len(errors) > MAX_ERRORS_PER_FRAME:
            extra = len(errors) - MAX_ERRORS_PER_FRAME
            errors = errors[:MAX_ERRORS_PER_FRAME] + [
                error_signal(
                    endpoint.conversation_id,
                    f"... and {extra} more bad item(s) in the same frame",
                )
            ]
        replies: list[Any] = []
        if errors:
            replies.append(errors[0] if len(errors) == 1 else errors)
        for (session, retry), seqs in refused.seqs.items():
            replies.append(
                {CONTROL: REJECTED, SESSION_FIELD: session, "seqs": seqs, "retry": retry}
            )
        for reply in replies:
            if not endpoint.reply(reply):
                endpoint.evict("its outgoing queue is full (it does not read its replies)")
                return False
        return True


_UNSET = object()


class _Refused:
    """(session, retry) -> seqs of refused items, for the ``rejected`` notices.

    Only the first session seen in a frame is reported (a frame holds one session; a
    frame that mixes them must not make the relay answer with one notice per session).
    """

    def __init__(self) -> None:
        self.seqs: dict[tuple[str | None, bool], list[int]] = {}
        self._session: Any = _UNSET

    def add(self, item: Any, *, retry: bool) -> None:
        if not isinstance(item, dict):
            return
        seq = item.get(SEQ_FIELD)
        session = item.get(SESSION_FIELD)
        if not (_is_count(seq) and (session is None or isinstance(session, str))):
            return
        if self._session is _UNSET:
            self._session = session
        elif session != self._session:
            return
        self.seqs.setdefault((session, retry), []).append(seq)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain(item: dict[str, Any], peer_id: str, conversation_id: str) -> bool:
    """True for a signal the relay passes on unchanged: valid (``validate_signal``), of
    this peer and conversation, with well-formed transport fields (``_check_item``), and
    no ``control`` key (the caller checks). Anything else takes the full path, which
    also words the error."""
    tube_id = item.get("tube_id")
    kind = item.get("kind")
    seq = item.get(SEQ_FIELD, 0)
    prev = item.get(PREV_FIELD, 0)
    return (
        item.get(PEER_FIELD) == peer_id
        and item.get("conversation_id") == conversation_id
        and type(tube_id) is str and tube_id != ""
        and type(kind) is str and kind in KINDS
        and type(item.get("data", "")) is str
        and type(seq) is int and seq >= 0
        and type(prev) is int and prev >= 0
        and type(item.get(SESSION_FIELD, "")) is str
    )


_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _check_ack(message: dict[str, Any]) -> str | None:
    """Why a client's control message is not a valid ack (None if it is)."""
    if message.get(CONTROL) != ACK:
        return f"unknown control message {str(message.get(CONTROL))[:40]!r}; expected 'ack'"
    to = message.get(TO_FIELD)
    if not isinstance(to, str) or not to or len(to) > MAX_ID_LENGTH:
        return f"ack: {TO_FIELD!r} must be the sender's peer id"
    if not isinstance(message.get(SESSION_FIELD), str):
        return f"ack: {SESSION_FIELD!r} must be a string"
    seqs = message.get("seqs")
    if not isinstance(seqs, list) or not seqs or not all(_is_count(s) for s in seqs):
        return "ack: 'seqs' must be a non-empty list of integers >= 0"
    return None


def _split(payload: Any) -> list[tuple[str, Any, str | None]]:
    """(label, item, problem) per item of a parsed frame; problem None means a valid signal.

    The same rules and messages as ``tether.signals.parse_frame``, keeping each bad item
    so that the error reply can name its tube_id.
    """
    if isinstance(payload, dict):
        items, single = [payload], True
    elif isinstance(payload, list):
        items, single = payload, False
    else:
        return [
            ("", payload, f"frame must be a JSON object or array, not {type(payload).__name__}")
        ]
    out: list[tuple[str, Any, str | None]] = []
    for index, item in enumerate(items):
        label = "" if single else f"item {index}"
        try:
            validate_signal(item)
        except SignalError as exc:
            out.append((label, item, str(exc)[:300]))
        else:
            out.append((label, item, None))
    return out


def _forget_handshake_headers(ws: ServerConnection) -> None:
    """Empty the opening handshake's headers, kept by websockets for the connection's life.

    Once the route is read nothing looks at them again, and they are ~3.5 KB of an idle
    peer's cost (a dict, a list and two strings per header). Cleared in place: the
    protocol's parser also keeps the request. Path, method and status stay.
    """
    if ws.request is not None:
        ws.request.headers.clear()
    if ws.response is not None:
        ws.response.headers.clear()


def _address_of(ws: ServerConnection) -> str:
    try:
        return address_key(str(ws.remote_address[0]))
    except Exception:
        return "?"


def _remote(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"
