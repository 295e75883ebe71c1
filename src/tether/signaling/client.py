"""The signaling client: one conversation on the relay, reconnecting on its own.

``send()`` queues signals; they go out on the current connection, or after the next reconnect.
A signal counts as delivered only when the other peer's *client* acknowledges it (the relay
forwards that ack). Until then it is kept, and every kept signal is sent again, in order,
after a reconnect, when the relay says the other peer (re)joined, and (backstop) when acks
stop coming although the peer is present. Incoming signals are handed to ``on_signal`` once
each, in order per sender (see :mod:`tether.signaling.delivery`). The wire protocol is
described in ``tether.signaling.server``.

What is per conversation (outbox, inbox, acks, resend timer, presence: ``_Conversation``)
is apart from what is per connection (WebSocket, URL rotation, TLS, token, backoff,
``check()``, ``reconnect()``: ``_Connection``). :class:`SignalingClient` is both at once;
:mod:`tether.signaling.mux` puts many conversations on one connection.

At join the relay hands out a secret resume credential; the client presents it (header
``X-Tether-Resume``) on every reconnect, so that its new connection may replace one the relay
still believes alive, and nobody else can. ``wss://`` URLs verify the relay's certificate
(system store, or ``ca_file`` / an ``ssl`` context). The token and the credential never
appear in logs (:mod:`tether.signaling.redact`).

The client never sits on a dead socket longer than the app lets it: ``check()`` pings and
reconnects at once when no pong comes, ``reconnect()`` drops the connection and connects
again at once (after a network change the new connection uses the new source address).

::

    client = SignalingClient(url, token, conversation_id, on_signal, on_peer=on_peer)
    await client.start()        # connected (or AuthenticationError / ConversationFullError)
    await client.send(signal)   # or a list of signals
    ok = await client.check()   # pong within 2 s? if not, it is already reconnecting
    client.reconnect("network changed")
    client.discard(tube_id)     # a closed tube's unacknowledged signals: never resent
    await client.close()
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import secrets
import socket
import ssl as ssl_module
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import CoroutineType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.uri import parse_uri

from tether.signals import ERROR, Signal, SignalError, validate_signal

from . import redact
from .conversations import ABSENT, JOINED, LEFT, PRESENT
from .delivery import DELIVER, GAP, Inbox, Outbox, ResendTimer
from .frames import read_frame
from .redact import RESUME_HEADER, RESUME_PREFIX
from .server import (
    ACK,
    CLOSE_CONVERSATION_FULL,
    CLOSE_REPLACED,
    CONTROL,
    DEFAULT_MAX_MESSAGE_BYTES,
    PEER_EVENT,
    PEER_FIELD,
    PREV_FIELD,
    REJECTED,
    RESUME_FIELD,
    SEQ_FIELD,
    SESSION_FIELD,
    TO_FIELD,
    WS_SIZE_FACTOR,
    encode,
    frames_of,
)
from .ws_fastpath import FastClientConnection

log = logging.getLogger(__name__)

SignalCallback = Callable[[Signal], Awaitable[None] | None]
StateCallback = Callable[[str], Awaitable[None] | None]
PeerCallback = Callable[[str], Awaitable[None] | None]

CONNECTED = "connected"
DISCONNECTED = "disconnected"
FAILED = "failed"
CLOSED = "closed"

PREV_RESERVE = 32
"""Bytes kept free in max_message_bytes for the ``prev`` field added when writing."""
MAX_RETRY_AFTER = 60.0
"""A relay's Retry-After is honoured up to this many seconds."""
WARN_AFTER_FAILURES = 3
"""Failed connection attempts in a row (quietly retried) before one WARNING says why."""
MAX_BURST = 512
"""Signals of frames already received that are acknowledged together, at most."""


class SignalingError(Exception):
    """Base class of the signaling client's errors."""


class AuthenticationError(SignalingError):
    """The relay refused the token (HTTP 401). Not retried."""


class ConversationFullError(SignalingError):
    """The conversation already has two other peers (HTTP 409)."""


class HandshakeRefusedError(SignalingError):
    """The relay refused the connection for a reason retrying cannot fix (400, 404, ...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PeerReplacedError(SignalingError):
    """Another client connected with this client's peer id and took its place.

    The relay allows that only to a client presenting this one's resume credential.
    """


class CertificateError(HandshakeRefusedError):
    """The relay's TLS certificate did not verify (on the first connection). Not retried."""


class SignalingClosedError(SignalingError):
    """The client is closed (or has failed) and cannot be used any more."""


class OutboundQueueFullError(SignalingError):
    """send(): too many signals are waiting for the other peer's acknowledgement."""


class SignalTooLargeError(SignalingError, ValueError):
    """send(): one signal is larger than max_message_bytes once encoded."""


class _Lifecycle(ABC):
    """What every signaling object shares: its owned task, close(), state callbacks and the
    change notification its waiters use (a conversation, a connection, or both at once)."""

    def _init_lifecycle(self, on_state: StateCallback | None) -> None:
        self._on_state = on_state
        self._task: asyncio.Task[None] | None = None
        self._io_tasks: set[asyncio.Task[Any]] = set()
        self._check_task: asyncio.Task[bool] | None = None
        self._connected = False
        self._closing = False
        self._closed = False
        self._ever_connected = False
        self.error: BaseException | None = None
        """The fatal error that stopped it, if any."""
        self._changed = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        """Connect, retrying with backoff, until connected, a fatal refusal, or close().

        Raises AuthenticationError (401), ConversationFullError (409) or
        HandshakeRefusedError; the client is then failed. Returns quietly if close() is
        called first.
        """
        if self._closed or self._closing:
            raise SignalingClosedError(f"this {type(self).__name__} is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"signaling-{self._name()}")
        while not self._connected:
            if self.error is not None:
                raise self.error
            if self._closing or self._task.done():
                return  # closed before it connected
            await self._wait_change()

    async def wait_connected(self) -> None:
        """Wait until connected; raise the fatal error, or SignalingClosedError if closed."""
        while not self._connected:
            if self.error is not None:
                raise self.error
            if self._closed or self._closing or (self._task is not None and self._task.done()):
                raise SignalingClosedError("the signaling client is closed")
            await self._wait_change()

    async def close(self) -> None:
        """Close the connection and end the reconnect loop. Idempotent.

        Unacknowledged signals are dropped. Called from inside on_signal/on_state/on_peer,
        it cancels the client but cannot wait for its own task to end.
        """
        if self._closed:
            return
        self._closing = True
        check = self._check_task
        if check is not None and not check.done():
            check.cancel()
            await asyncio.wait({check})
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            current = asyncio.current_task()
            if current is task or current in self._io_tasks:
                return  # _run's own cleanup finishes the job
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:  # already logged by _run
                pass
        await self._mark_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @abstractmethod
    async def _run(self) -> None:
        """The object's loop, run under :meth:`_supervise`."""

    @abstractmethod
    def _name(self) -> str:
        """How logs name this object."""

    async def _supervise(self, body: Callable[[], Awaitable[None]]) -> None:
        """Run the object's loop: a SignalingError fails it (``error``, state "failed"),
        close() ends it quietly, anything else is a bug, logged and reported as failure."""
        try:
            await body()
        except SignalingError as exc:
            log.error("signaling %s: %s", self._name(), exc)
            self.error = exc
            self._notify()
            await self._emit(FAILED)
        except asyncio.CancelledError:
            pass  # close()
        except Exception as exc:  # a bug: report it, don't hide it
            log.exception("signaling %s: client loop crashed", self._name())
            self.error = exc
            self._notify()
            await self._emit(FAILED)
        finally:
            if self._closing:
                await self._mark_closed()
            self._notify()

    # -- internals: lifecycle ---------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def _mark_closed(self) -> None:
        if not self._closed:
            self._closed = True
            self._notify()
            await self._emit(CLOSED)

    async def _call(self, callback: Callable[[Any], Any] | None, arg: Any, what: str) -> None:
        """Call a user callback (sync, or async and awaited); never raise."""
        if callback is None:
            return
        try:
            result = callback(arg)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("signaling %s: %s failed for %r", self._name(), what, arg)

    async def _emit(self, state: str) -> None:
        await self._call(self._on_state, state, "on_state")


class _Conversation(_Lifecycle):
    """One conversation's side of signaling, whatever connection carries it: the outbox of
    unacknowledged signals and its resend timer, the inbox (order, duplicates), presence,
    acknowledgements, and the application's callbacks."""

    def _init_conversation(
        self,
        conversation_id: str,
        on_signal: SignalCallback,
        peer_id: str | None,
        *,
        on_state: StateCallback | None,
        on_peer: PeerCallback | None,
        max_message_bytes: int,
        max_outbound: int,
        resend_after: float | None,
        resend_max: float,
    ) -> None:
        if not conversation_id:
            raise ValueError("conversation_id must not be empty")
        if max_outbound < 1:
            raise ValueError("max_outbound must be at least 1")
        self._init_lifecycle(on_state)
        self.conversation_id = conversation_id
        self.peer_id = peer_id or secrets.token_hex(8)
        self.session = secrets.token_hex(8)
        self.max_message_bytes = max_message_bytes
        self.max_outbound = max_outbound
        self.resend_after = resend_after
        self._on_signal = on_signal
        self._on_peer = on_peer
        self.resume = ""
        """The relay's resume credential for this peer id ("" until the first join)."""
        self._outbox = Outbox()
        self._inbox = Inbox()
        # Accepted and acknowledged but not yet handed to on_signal (at most two bursts):
        # what a cancelled reader leaves is handed over first by the next one.
        self._undelivered: deque[Signal] = deque()
        self._timer = ResendTimer(resend_after or 1.0, max(resend_max, resend_after or 1.0))
        self._wake = asyncio.Event()  # the writer has something to do
        self._peer_present: bool | None = None
        self._ws: Any = None  # what the writer sends on (a connection, or a mux's pipe)

    @property
    def unacked(self) -> int:
        """Signals queued or sent but not yet acknowledged by the other peer's client."""
        return len(self._outbox)

    @property
    def peer_present(self) -> bool | None:
        """Whether the relay last said the other peer is connected (None: not told yet)."""
        return self._peer_present

    async def send(self, signal: Signal | Iterable[Signal]) -> None:
        """Queue one signal or a list of them; returns once queued (not once delivered).

        Raises SignalError for an invalid signal, SignalTooLargeError,
        OutboundQueueFullError when ``max_outbound`` signals already wait for the peer's
        acknowledgement (nothing of this call is queued then), SignalingClosedError after
        close() or a fatal error.
        """
        if self._closing or self._closed or self.error is not None:
            raise SignalingClosedError(
                f"the signaling client is closed{f' ({self.error})' if self.error else ''}"
            )
        signals = [signal] if isinstance(signal, dict) else list(signal)
        if len(self._outbox) + len(signals) > self.max_outbound:
            raise OutboundQueueFullError(
                f"outbound queue full: {len(self._outbox)} signals wait for the peer's "
                f"acknowledgement (max_outbound={self.max_outbound}); "
                f"cannot queue {len(signals)} more"
            )
        encoded: list[tuple[str, str, str]] = []
        first = self._outbox.next_seq
        for index, item in enumerate(signals):
            where = f"signal {index}: " if len(signals) > 1 else ""
            try:
                validate_signal(item)
            except SignalError as exc:
                raise SignalError(f"{where}{exc}") from None
            if CONTROL in item:
                raise SignalError(f"{where}the key {CONTROL!r} is reserved")
            conversation_id = item.get("conversation_id") or self.conversation_id
            if conversation_id != self.conversation_id:
                raise SignalError(
                    f"{where}conversation_id {conversation_id!r} is not this client's "
                    f"conversation {self.conversation_id!r}"
                )
            out = {k: v for k, v in item.items() if k != PREV_FIELD}
            out["conversation_id"] = conversation_id
            out[PEER_FIELD] = self.peer_id
            out[SESSION_FIELD] = self.session
            out[SEQ_FIELD] = first + index
            text = encode(out)
            if len(text) + PREV_RESERVE > self.max_message_bytes:
                raise SignalTooLargeError(
                    f"{where}signal of {len(text)} bytes exceeds max_message_bytes="
                    f"{self.max_message_bytes} (minus {PREV_RESERVE} for transport fields)"
                )
            encoded.append((item["tube_id"], item["kind"], text))
        for index, (tube_id, kind, text) in enumerate(encoded):
            self._outbox.add(first + index, tube_id, text, kind)
        self._wake.set()

    def discard(self, tube_id: str, kinds: Iterable[str] | None = None) -> int:
        """Forget unacknowledged signals of ``tube_id`` (of ``kinds`` only, if given).

        For a tube the app closed, or an abandoned attempt whose signals no longer matter
        (they are not sent again; a copy already on its way may still arrive). Returns how
        many were dropped.
        """
        dropped = self._outbox.discard(tube_id, kinds)
        if dropped:
            log.debug(
                "signaling %s: discarded %d unacknowledged signal(s) of tube %r",
                self._name(),
                dropped,
                tube_id,
            )
            self._timer.acked(time.monotonic(), self._outbox.outstanding)
            self._wake.set()
            self._notify()
        return dropped

    async def drain(self) -> None:
        """Wait until the other peer has acknowledged every queued signal."""
        while self._outbox:
            if self.error is not None or self._closed or self._closing:
                raise SignalingClosedError("the signaling client is closed")
            await self._wait_change()

    async def _converse(self, ws: Any, tasks: list[asyncio.Task[Any]],
                        ended: asyncio.Future[Any] | None = None) -> None:
        """Carry this conversation over ``ws`` (sending with ``ws.send``) until one of
        ``tasks`` (its reader, if it has its own) or the writer ends, or ``ended`` is done.

        Everything unacknowledged goes out again, in order.
        """
        self._ws = ws
        self._outbox.rewind()  # everything unacknowledged goes out again, in order
        self._timer.reset(time.monotonic(), outstanding=False)
        self._wake.set()
        writer = asyncio.create_task(self._writer(ws), name="signaling-client-writer")
        tasks = [*tasks, writer]
        self._io_tasks.update(tasks)
        self._connected = True
        self._ever_connected = True
        self._notify()
        try:
            await self._emit(CONNECTED)
            waiting: set[asyncio.Future[Any]] = set(tasks)
            if ended is not None:
                waiting.add(ended)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._connected = False
            self._ws = None
            for task in tasks:
                task.cancel()
            for task in tasks:
                try:
                    await task
                except (asyncio.CancelledError, ConnectionClosed):
                    pass
                except Exception:
                    log.exception("signaling %s: connection task failed", self._name())
                self._io_tasks.discard(task)

    # -- internals: one connection ------------------------------------------------------------

    async def _writer(self, ws: ClientConnection) -> None:
        while True:
            unsent = self._outbox.unsent()
            if unsent:
                epoch = self._outbox.epoch
                for frame in frames_of([text for _, text in unsent], self.max_message_bytes):
                    await ws.send(frame)
                self._outbox.mark_sent(unsent[-1][0], epoch)
                self._timer.wrote(time.monotonic())
                continue
            self._wake.clear()
            deadline = None
            if self.resend_after and self._peer_present and self._outbox.outstanding:
                deadline = self._timer.deadline
            if deadline is None:
                await self._wake.wait()
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            log.info(
                "signaling %s: no acknowledgement for %.1fs although the peer is present; "
                "resending %d signal(s)",
                self._name(),
                self._timer.interval,
                len(self._outbox),
            )
            self._outbox.rewind()
            self._timer.fired(time.monotonic())

    def _on_frame(self, message: str | bytes, burst: list[list[Signal]]) -> dict[str, Any] | None:
        """Parse one frame from the relay: its control message, or its valid signals are
        added to ``burst``. Whatever it holds, nothing escapes."""
        control, signals, errors = read_frame(message)
        if control is not None:
            return control
        for error in errors[:5]:
            log.warning(
                "signaling %s: dropped a malformed incoming item: %s", self._name(), error
            )
        if signals:
            burst.append(signals)
        return None

    async def _flush(self, ws: ClientConnection, burst: list[list[Signal]]) -> None:
        """Accept the signals of a burst of frames, acknowledge them, hand them over (after
        any an earlier, cancelled reader accepted but did not hand over)."""
        if not burst:
            if self._undelivered:
                await self._hand_over()
            return
        frames = burst[:]
        burst.clear()
        classify, classify_run = self._inbox.classify, self._inbox.classify_run
        acks: dict[tuple[str, str], list[int]] = {}
        accepted: list[Signal] = []
        for signals in frames:
            run = _run_of(signals)
            if run is not None and classify_run(*run):
                # The usual frame: the next signals of one sender, in order, decided once.
                acks.setdefault((run[0], run[1]), []).extend(run[3])
                accepted += signals
                continue
            key: tuple[str, str] | None = None  # the one (peer, session) of this frame
            seqs: list[int] = []
            for signal in signals:
                peer = signal.get(PEER_FIELD)
                session = signal.get(SESSION_FIELD)
                seq = signal.get(SEQ_FIELD)
                if (type(peer) is str and type(session) is str
                        and type(seq) is int and seq >= 0):
                    if key is None:
                        key = (peer, session)
                        seqs = acks.setdefault(key, [])
                    elif key[0] != peer or key[1] != session:
                        # The relay never mixes senders or sessions in a frame; answering
                        # each would turn one frame into many acks. Not acknowledged: if
                        # genuine, it comes again.
                        log.warning(
                            "signaling %s: dropped a signal of another sender/session in "
                            "the same frame",
                            self._name(),
                        )
                        continue
                    prev = signal.get(PREV_FIELD)
                    if type(prev) is not int or prev < 0:
                        prev = None
                    verdict = classify(peer, session, seq, prev)
                    if verdict != DELIVER:
                        if verdict == GAP:
                            log.debug(
                                "signaling %s: %s/%s seq %s arrived before seq %s; dropped "
                                "(it comes again)",
                                self._name(), peer, session, seq, prev,
                            )
                            continue
                        seqs.append(seq)
                        log.debug(
                            "signaling %s: dropped duplicate %s/%s seq %s",
                            self._name(), peer, session, seq,
                        )
                        continue
                    seqs.append(seq)
                elif signal.get("kind") == ERROR and PEER_FIELD not in signal:
                    log.warning(
                        "signaling %s: relay reported an error: %s",
                        self._name(),
                        str(signal.get("data"))[:300],
                    )
                accepted.append(signal)
        # At most one ack per received frame (usually one for the whole burst).
        for (peer, session), seqs in acks.items():
            if seqs:
                try:
                    await ws.send(
                        f'{{"{CONTROL}":"{ACK}","{TO_FIELD}":{_json_string(peer)},'
                        f'"{SESSION_FIELD}":{_json_string(session)},'
                        f'"seqs":[{",".join(map(str, seqs))}]}}'
                    )
                except ConnectionClosed:
                    # Lost like an ack in flight (the sender resends, the duplicate is
                    # acknowledged); the inbox already took these signals: hand them over.
                    pass
        self._undelivered.extend(accepted)
        await self._hand_over()

    async def _hand_over(self) -> None:
        undelivered = self._undelivered
        on_signal = self._on_signal
        while undelivered:
            signal = undelivered.popleft()
            try:
                result = on_signal(signal)
                if result is not None and (
                        type(result) is CoroutineType or inspect.isawaitable(result)):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "signaling %s: on_signal failed for a %r signal (tube %r)",
                    self._name(),
                    signal.get("kind"),
                    signal.get("tube_id"),
                )

    async def _on_control(self, message: dict[str, Any]) -> None:
        kind = message.get(CONTROL)
        if kind == PEER_EVENT:
            resume = message.get(RESUME_FIELD)
            if (
                isinstance(resume, str)
                and resume.startswith(RESUME_PREFIX)
                and len(resume) <= 256
                and resume.isprintable()
            ):
                self.resume = resume  # presented on every reconnect from now on
            await self._on_presence(message.get("event"))
            return
        if kind not in (ACK, REJECTED):
            log.debug(
                "signaling %s: ignored control message %.200r", self._name(), message
            )
            return
        if message.get(SESSION_FIELD) not in (self.session, None):
            return  # meant for an earlier process with the same peer id
        seqs = message.get("seqs")
        if not isinstance(seqs, list):
            log.warning(
                "signaling %s: malformed %s %.200r", self._name(), str(kind)[:20], message
            )
            return
        seqs = [seq for seq in seqs if _is_count(seq)]
        if kind == ACK:
            if self._outbox.ack(seqs):
                self._timer.acked(time.monotonic(), self._outbox.outstanding)
                self._notify()
            return
        if message.get("retry") is True:
            log.warning(
                "signaling %s: the relay's queue for the absent peer is full; keeping "
                "%d signal(s) to send again when the peer joins",
                self._name(),
                len(seqs),
            )
            return
        dropped = self._outbox.ack(seqs)
        log.warning(
            "signaling %s: the relay refused %d signal(s) as invalid; dropped them",
            self._name(),
            dropped,
        )
        if dropped:
            self._timer.acked(time.monotonic(), self._outbox.outstanding)
            self._notify()

    async def _on_presence(self, event: Any) -> None:
        was = self._peer_present
        tell: str | None = None
        if event == JOINED:
            self._peer_present = True
            tell = JOINED
            if self._outbox:
                log.info(
                    "signaling %s: the other peer joined; resending %d unacknowledged "
                    "signal(s)",
                    self._name(),
                    len(self._outbox),
                )
                self._outbox.rewind()
            self._timer.reset(time.monotonic(), outstanding=False)
        elif event == LEFT:
            self._peer_present = False
            tell = LEFT
        elif event == PRESENT:
            self._peer_present = True
            tell = JOINED if was is not True else None
        elif event == ABSENT:
            self._peer_present = False
            tell = LEFT if was is True else None
        else:
            log.debug("signaling %s: ignored presence event %r", self._name(), event)
            return
        log.info("signaling %s: relay says the other peer %s", self._name(),
                 event if event in (JOINED, LEFT) else f"is {event}")
        self._wake.set()
        self._notify()
        if tell is not None:
            await self._call(self._on_peer, tell, "on_peer")

    def _name(self) -> str:
        return f"{self.conversation_id}/{self.peer_id}"


class _Connection(_Lifecycle):
    """One reconnecting WebSocket to the relay: URL rotation, TLS, token, backoff,
    ``check()`` (ping) and ``reconnect()``. What it carries is a subclass's business
    (``_serve``): one conversation (:class:`SignalingClient`) or many
    (:class:`tether.signaling.mux.SignalingMux`)."""

    def _init_connection(
        self,
        url: str | Sequence[str],
        token: str,
        query: dict[str, str],
        *,
        reconnect_base: float,
        reconnect_max: float,
        max_message_bytes: int,
        open_timeout: float | None,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float | None,
        proxy: str | bool | None,
        ca_file: str | None,
        ssl: ssl_module.SSLContext | None,
    ) -> None:
        if reconnect_base <= 0 or reconnect_max < reconnect_base:
            raise ValueError("need 0 < reconnect_base <= reconnect_max")
        self.reconnect_base = reconnect_base
        self.reconnect_max = reconnect_max
        given = [url] if isinstance(url, str) else list(url)
        if not given:
            raise ValueError("give at least one signaling relay URL")
        # Several URLs: relays sharing their conversations (``tether serve --redis``); the
        # client moves to the next one whenever a connection fails or ends.
        self._urls: list[str] = []
        secure_any = False
        for one in given:
            full = _with_query(one, **query)
            try:
                secure_any = parse_uri(full).secure or secure_any
            except (InvalidURI, ValueError) as exc:
                raise ValueError(
                    f"not a WebSocket URL: {one!r} ({exc}); expected ws://HOST:PORT or "
                    f"wss://HOST:PORT"
                ) from exc
            self._urls.append(full)
        self._url_index = 0
        if ca_file is not None and ssl is not None:
            raise ValueError("give ca_file or ssl, not both")
        if (ca_file is not None or ssl is not None) and not secure_any:
            raise ValueError(f"ca_file/ssl given but {url!r} is not a wss:// URL")
        redact.install(token)
        self._token = token
        self._retry_after = 0.0
        self._tls: ssl_module.SSLContext | None = None
        if secure_any:
            # Certificates are always verified: the system store, or the given CA file.
            self._tls = ssl or ssl_module.create_default_context(cafile=ca_file)
        self._failures = 0  # connection attempts failed in a row (for the one WARNING)
        self._warned: set[str] = set()  # misconfiguration reasons already logged once
        self._connect_options: dict[str, Any] = dict(
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            max_size=WS_SIZE_FACTOR * max_message_bytes,
            proxy=proxy,
            # No permessage-deflate: signals are small (sealed ones hardly compress), and
            # deflating every frame cost both ends (and the relay) more than the bytes saved.
            compression=None,
            create_connection=FastClientConnection,  # plain frames without the generators
        )
        self._link: ClientConnection | None = None
        self._connecting: asyncio.Task[ClientConnection] | None = None
        self._connect_started = 0.0
        self._dropping = False  # reconnect(): do not keep a connection made meanwhile
        self._skip = asyncio.Event()  # skip (or cut short) the backoff sleep

    @property
    def _url(self) -> str:
        """The relay URL the next (or current) connection uses."""
        return self._urls[self._url_index]

    @property
    def url(self) -> str:
        """The current relay URL, without the query."""
        return self._url.split("?", 1)[0]

    def _rotate(self) -> None:
        if len(self._urls) > 1:
            self._url_index = (self._url_index + 1) % len(self._urls)

    def reconnect(self, reason: str) -> None:
        """Drop the connection now (no closing handshake) and connect again at once.

        No backoff. When not connected: abandon a connection attempt in progress and cut
        the backoff sleep short. For network changes: the next connection uses the new
        source address. Does nothing once closed or failed.
        """
        if self._closing or self._closed or self._task is None or self._task.done():
            return
        log.info("signaling %s: reconnecting now: %s", self._name(), reason)
        self._dropping = True
        self._skip.set()
        ws = self._link
        if ws is not None:
            ws.transport.abort()
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            connecting.cancel()

    async def check(self, timeout: float = 2.0) -> bool:
        """Ping the relay; True if it answered within ``timeout``.

        If it did not (or there is no connection), the connection is dropped and a new one
        is made at once, without backoff (a connection attempt younger than ``timeout`` is
        left to finish). Concurrent calls share one check.
        """
        if self._closing or self._closed or self._task is None or self._task.done():
            return False
        task = self._check_task
        if task is None or task.done():
            task = self._check_task = asyncio.create_task(
                self._check(timeout), name=f"signaling-check-{self._name()}"
            )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                return False  # close() ended the check
            raise

    @abstractmethod
    async def _serve(self, ws: ClientConnection) -> tuple[int | None, str | None]:
        """Run one connection until it ends; return its close code and reason."""

    def _ended(self, close_code: int | None, close_reason: str | None) -> None:
        """A connection ended with this close code: raise a SignalingError if fatal."""

    async def _hang_up(self, ws: ClientConnection) -> None:
        """After serving ``ws``: close it (at once if reconnect() asked), tell the waiters."""
        try:
            if self._dropping:
                ws.transport.abort()
            await ws.close()
        except Exception:
            pass
        finally:
            self._notify()
            await self._emit(DISCONNECTED)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def _connected_to(self) -> None:
        """Log the new connection (once per connection, with the failures before it)."""
        log.info(
            "signaling %s: connected to %s%s",
            self._name(),
            self.url,
            f" after {self._failures} failed attempts" if self._failures else "",
        )
        self._failures = 0

    def _backoff(self, attempt: int) -> float:
        wait, self._retry_after = self._retry_after, 0.0  # the relay said when (429, 503)
        return backoff(self.reconnect_base, self.reconnect_max, attempt, wait)

    async def _run(self) -> None:
        await self._supervise(self._reconnect_loop)

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while not self._closing:
            self._dropping = False
            self._skip.clear()
            ws = await self._attempt()
            if ws is not None and self._dropping:
                ws.transport.abort()  # made before reconnect() asked for a fresh one
                await ws.close()
            elif ws is not None:
                attempt = 0
                self._link = ws
                try:
                    close_code, close_reason = await self._serve(ws)
                finally:
                    self._link = None
                self._ended(close_code, close_reason)
                if self._closing:
                    break
                self._rotate()  # that relay may be going away: try the next one
                if not self._skip.is_set():
                    log.warning(
                        "signaling %s: disconnected (code %s%s); reconnecting",
                        self._name(),
                        close_code,
                        f", {close_reason}" if close_reason else "",
                    )
            if self._skip.is_set():
                continue  # reconnect() / check(): no backoff
            delay = self._backoff(attempt)
            attempt += 1
            log.debug("signaling %s: next attempt in %.2fs", self._name(), delay)
            try:
                async with asyncio.timeout(delay):
                    await self._skip.wait()
            except TimeoutError:
                pass

    async def _attempt(self) -> ClientConnection | None:
        """One connection attempt: the connection, or None (failed or abandoned)."""
        task = asyncio.create_task(self._open(), name=f"signaling-connect-{self._name()}")
        self._connecting = task
        self._connect_started = time.monotonic()
        try:
            return await task
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().transport.abort()  # connected just as we were cancelled
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            log.debug("signaling %s: connection attempt abandoned", self._name())
            return None
        except InvalidStatus as exc:
            fatal = self._refusal(exc)
            if fatal is not None:
                raise fatal from None
            self._retry_after = _retry_after(exc)
            status = exc.response.status_code
            if status < 400:
                self._failed(
                    f"the server at {self.url} answered plain HTTP ({status} "
                    f"{exc.response.reason_phrase}), not a WebSocket upgrade: give --signal "
                    f"the address `tether serve` printed",
                    misconfigured=True,
                )
            else:
                self._failed(
                    f"the relay at {self.url} refused the connection (HTTP {status}: "
                    f"{_body(exc)})"
                )
        except ssl_module.SSLCertVerificationError as exc:
            if not self._ever_connected:
                raise CertificateError(
                    f"the signaling relay's TLS certificate did not verify: {exc.verify_message}"
                    " (give the CA that signed it)"
                ) from None
            self._failed(f"the TLS certificate of {self.url} did not verify: {exc}")
        except ssl_module.SSLError as exc:
            self._failed(
                f"the relay at {self.url} does not speak TLS ({exc.reason or exc}): use "
                f"ws:// instead of wss://, or give the relay --cert and --key",
                misconfigured=True,
            )
        except InvalidMessage as exc:
            if parse_uri(self._url).secure:
                why = f"did not answer with a WebSocket handshake ({exc})"
            else:
                why = (
                    "did not answer with HTTP: if it serves TLS (tether serve --cert), use "
                    "wss:// instead of ws://"
                )
            self._failed(f"the server at {self.url} {why}", misconfigured=True)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            if isinstance(exc, ConnectionRefusedError):
                reason = "connection refused (nothing listens there: is the relay running?)"
            elif isinstance(exc, socket.gaierror):
                reason = f"cannot resolve its host name ({exc.strerror})"
            else:
                reason = str(exc) or type(exc).__name__
            if isinstance(exc, (TimeoutError, ConnectionResetError, EOFError)) and parse_uri(
                self._url
            ).secure:
                reason = (
                    f"{reason} during the TLS handshake: if the relay does not serve TLS, "
                    f"use ws:// instead of wss://"
                )
            self._failed(f"cannot reach the signaling relay at {self.url}: {reason}")
        finally:
            self._connecting = None
        self._rotate()
        return None

    def _failed(self, reason: str, *, misconfigured: bool = False) -> None:
        """A failed attempt: quiet at first, then ONE warning with the reason.

        A misconfiguration (plain HTTP, TLS mismatch) is logged once at WARNING right away:
        retrying will not fix it, but the relay may be fixed while we keep trying.
        """
        self._failures += 1
        if misconfigured:
            if reason not in self._warned and len(self._warned) < 16:
                self._warned.add(reason)
                log.warning("signaling %s: %s; still trying", self._name(), reason)
                return
        elif self._failures == WARN_AFTER_FAILURES:
            log.warning(
                "signaling %s: %s; still trying (%d attempts failed so far)",
                self._name(),
                reason,
                self._failures,
            )
            return
        log.debug("signaling %s: attempt %d failed: %s", self._name(), self._failures, reason)

    async def _open(self) -> ClientConnection:
        url = self._url
        options = self._connect_options
        if parse_uri(url).secure:
            options = {**options, "ssl": self._tls}
        return await connect(url, additional_headers=self._headers(), **options)

    def _refusal(self, exc: InvalidStatus) -> SignalingError | None:
        status = exc.response.status_code
        body = _body(exc)
        if status == 401:
            return AuthenticationError(
                f"the signaling relay refused the token (HTTP 401): {body}"
            )
        if status == 409:
            if self._ever_connected:
                return None  # a slot may free up; keep trying
            return ConversationFullError(f"conversation full (HTTP 409): {body}")
        if status in (400, 403, 404, 405, 426):
            return HandshakeRefusedError(
                f"the signaling relay refused the connection (HTTP {status}): {body}", status
            )
        return None  # 5xx and the like: transient

    async def _check(self, timeout: float) -> bool:
        ws = self._link
        if ws is None or not self._connected:
            # Not connected: hurry the reconnect loop along.
            self._skip.set()
            connecting = self._connecting
            if (
                connecting is not None
                and not connecting.done()
                and time.monotonic() - self._connect_started > timeout
            ):
                log.info(
                    "signaling %s: check: connection attempt older than %gs; starting over",
                    self._name(),
                    timeout,
                )
                connecting.cancel()
            return False
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                pong = await ws.ping()
                await pong
        except TimeoutError:
            if self._link is ws:
                self.reconnect(f"check: no pong within {timeout:g}s")
            return False
        except ConnectionClosed:
            if self._link is ws:
                self.reconnect("check: the connection is closed")
            return False
        log.debug(
            "signaling %s: check: pong after %.1f ms",
            self._name(),
            (time.monotonic() - started) * 1000,
        )
        return True


class SignalingClient(_Conversation, _Connection):
    """A reconnecting client for one conversation on a :class:`SignalingServer`, on a
    connection of its own (for many conversations on one connection see
    :class:`tether.signaling.mux.SignalingMux`).

    ``on_signal(signal)``: each incoming signal, once, in order per sender.
    ``on_state(state)``: "connected", "disconnected", "failed", "closed".
    ``on_peer(event)``: "joined" when the other peer is there (it joined, replaced its
    connection, or was found present after this client (re)connected while believed
    absent); "left" when it went away. Callbacks may be sync or async (awaited: keep them
    quick) and must not raise (exceptions are logged).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str,
        conversation_id: str,
        on_signal: SignalCallback,
        peer_id: str | None = None,
        reconnect_base: float = 0.2,
        reconnect_max: float = 5.0,
        *,
        on_state: StateCallback | None = None,
        on_peer: PeerCallback | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_outbound: int = 1024,
        resend_after: float | None = 5.0,
        resend_max: float = 60.0,
        open_timeout: float | None = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float | None = 2.0,
        proxy: str | bool | None = True,
        ca_file: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self._init_conversation(
            conversation_id, on_signal, peer_id, on_state=on_state, on_peer=on_peer,
            max_message_bytes=max_message_bytes, max_outbound=max_outbound,
            resend_after=resend_after, resend_max=resend_max,
        )
        self._init_connection(
            url, token, {"conversation": conversation_id, "peer": self.peer_id},
            reconnect_base=reconnect_base, reconnect_max=reconnect_max,
            max_message_bytes=max_message_bytes, open_timeout=open_timeout,
            ping_interval=ping_interval, ping_timeout=ping_timeout,
            close_timeout=close_timeout, proxy=proxy, ca_file=ca_file, ssl=ssl,
        )

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        if self.resume:
            headers[RESUME_HEADER] = self.resume
        return headers

    async def _serve(self, ws: ClientConnection) -> tuple[int | None, str | None]:
        """Run one connection until it ends; return its close code and reason."""
        reader = asyncio.create_task(self._reader(ws), name="signaling-client-reader")
        self._connected_to()
        try:
            await self._converse(ws, [reader])
        finally:
            await self._hang_up(ws)
        return ws.close_code, ws.close_reason

    def _ended(self, close_code: int | None, close_reason: str | None) -> None:
        if close_code == CLOSE_REPLACED:
            raise PeerReplacedError(
                f"another client connected as peer {self.peer_id!r} in "
                f"conversation {self.conversation_id!r} and replaced this one"
            )
        if close_code == CLOSE_CONVERSATION_FULL and not self._ever_connected:
            raise ConversationFullError(close_reason or "conversation full")

    async def _reader(self, ws: ClientConnection) -> None:
        # Frames already waiting in the connection are read as one burst (up to MAX_BURST
        # signals) and answered together: one ack per sender and session, before the
        # application works on any of them (so a slow on_signal does not hold up the
        # sender), then every signal handed over in order. A control frame ends a burst.
        # The whole frames that arrived together come in one recv_batch (one wake-up).
        await self._flush(ws, [])  # what a cancelled reader left, first
        waiting = _waiting_frames(ws)
        recv_batch = getattr(ws, "recv_batch", None)
        burst: list[list[Signal]] = []
        size = 0
        while True:
            try:
                messages = await recv_batch() if recv_batch is not None else [await ws.recv()]
            except ConnectionClosedOK:
                return  # as ``async for`` ends; other closes raise to _serve
            for message in messages:
                frames = len(burst)
                control = self._on_frame(message, burst)
                if control is not None:
                    await self._flush(ws, burst)
                    size = 0
                    await self._on_control(control)
                    continue
                if len(burst) > frames:
                    size += len(burst[-1])
                if size >= MAX_BURST:
                    await self._flush(ws, burst)
                    size = 0
            if not waiting():
                await self._flush(ws, burst)
                size = 0


def backoff(base: float, maximum: float, attempt: int, retry_after: float = 0.0) -> float:
    """Seconds before retry number ``attempt`` (jittered exponential, at least the relay's
    Retry-After up to ``MAX_RETRY_AFTER``)."""
    delay = min(maximum, base * (2**attempt))
    delay = delay / 2 + random.uniform(0, delay / 2)
    return max(delay, min(retry_after, MAX_RETRY_AFTER))


def _run_of(signals: list[Signal]) -> tuple[str, str, int, list[int]] | None:
    """(peer, session, prev, seqs) when a frame is one sender's run: each signal of the same
    peer and session, with an int seq above the one before, naming it as ``prev``. None
    otherwise (then each signal is looked at on its own)."""
    first = signals[0]
    peer, session, prev = first.get(PEER_FIELD), first.get(SESSION_FIELD), first.get(PREV_FIELD)
    if type(peer) is not str or type(session) is not str or type(prev) is not int or prev < 0:
        return None
    start = prev
    seqs = []
    for signal in signals:
        seq = signal.get(SEQ_FIELD)
        if (type(seq) is not int or seq <= prev or signal.get(PREV_FIELD) != prev
                or signal.get(PEER_FIELD) != peer or signal.get(SESSION_FIELD) != session):
            return None
        seqs.append(seq)
        prev = seq
    return peer, session, start, seqs


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _waiting_frames(ws: ClientConnection) -> Callable[[], int]:
    """How many received frames wait in ``ws`` (websockets' own queue; 0 if unknown)."""
    queue = getattr(getattr(getattr(ws, "recv_messages", None), "frames", None), "queue", None)
    if queue is None:
        return lambda: 0
    return queue.__len__


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(path=parts.path or "/", query=urlencode(query)))


def _retry_after(exc: InvalidStatus) -> float:
    """The relay's Retry-After (seconds) on a refusal, 0 if absent or not a number."""
    try:
        return max(0.0, float(exc.response.headers.get("Retry-After", "0")))
    except (ValueError, OverflowError):
        return 0.0


def _body(exc: InvalidStatus) -> str:
    body = exc.response.body or b""
    return body.decode("utf-8", "replace").strip() or exc.response.reason_phrase
