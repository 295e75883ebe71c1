"""The signaling client: one conversation on the relay, reconnecting on its own.

``send()`` queues signals; they go out on the current connection, or after the next reconnect.
Each signal is kept until the relay acknowledges it, and every unacknowledged signal is sent
again, in order, after a reconnect. Incoming signals are de-duplicated by
(peer, session, seq) and handed to ``on_signal`` once each, in order. The wire protocol is
described in ``tether.signaling.server``.

::

    client = SignalingClient(url, token, conversation_id, on_signal)
    await client.start()        # connected (or AuthenticationError / ConversationFullError)
    await client.send(signal)   # or a list of signals
    await client.close()
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from tether.signals import ERROR, Signal, SignalError, parse_frame, validate_signal

from .server import (
    ACK,
    CLOSE_CONVERSATION_FULL,
    CLOSE_REPLACED,
    CONTROL,
    DEFAULT_MAX_MESSAGE_BYTES,
    PEER_FIELD,
    SEQ_FIELD,
    SESSION_FIELD,
    WS_SIZE_FACTOR,
    encode,
    frames_of,
)

log = logging.getLogger(__name__)

SignalCallback = Callable[[Signal], Awaitable[None] | None]
StateCallback = Callable[[str], Awaitable[None] | None]

CONNECTED = "connected"
DISCONNECTED = "disconnected"
FAILED = "failed"
CLOSED = "closed"


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
    """Another client connected with this client's peer id and took its place."""


class SignalingClosedError(SignalingError):
    """The client is closed (or has failed) and cannot be used any more."""


class OutboundQueueFullError(SignalingError):
    """send(): too many signals are waiting for the relay's acknowledgement."""


class SignalTooLargeError(SignalingError, ValueError):
    """send(): one signal is larger than max_message_bytes once encoded."""


class SignalingClient:
    """A reconnecting client for one conversation on a :class:`SignalingServer`."""

    def __init__(
        self,
        url: str,
        token: str,
        conversation_id: str,
        on_signal: SignalCallback,
        peer_id: str | None = None,
        reconnect_base: float = 0.2,
        reconnect_max: float = 5.0,
        *,
        on_state: StateCallback | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_outbound: int = 1024,
        open_timeout: float | None = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float | None = 2.0,
        proxy: str | bool | None = True,
    ) -> None:
        if not conversation_id:
            raise ValueError("conversation_id must not be empty")
        if reconnect_base <= 0 or reconnect_max < reconnect_base:
            raise ValueError("need 0 < reconnect_base <= reconnect_max")
        if max_outbound < 1:
            raise ValueError("max_outbound must be at least 1")
        self.conversation_id = conversation_id
        self.peer_id = peer_id or secrets.token_hex(8)
        self.session = secrets.token_hex(8)
        self.reconnect_base = reconnect_base
        self.reconnect_max = reconnect_max
        self.max_message_bytes = max_message_bytes
        self.max_outbound = max_outbound
        self._on_signal = on_signal
        self._on_state = on_state
        self._url = _with_query(url, conversation=conversation_id, peer=self.peer_id)
        try:
            parse_uri(self._url)
        except (InvalidURI, ValueError) as exc:
            raise ValueError(f"not a WebSocket URL: {url!r} ({exc})") from exc
        self._connect_options: dict[str, Any] = dict(
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            max_size=WS_SIZE_FACTOR * max_message_bytes,
            proxy=proxy,
        )

        self._next_seq = 1
        # seq -> encoded signal, for every signal not yet acknowledged by the relay.
        self._outbox: OrderedDict[int, str] = OrderedDict()
        self._sent_upto = 0  # highest seq written on the current connection
        self._wake = asyncio.Event()  # the writer has something to send
        # (peer, session) -> highest seq delivered to on_signal; bounded LRU.
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._seen_limit = 1024

        self._task: asyncio.Task[None] | None = None
        self._io_tasks: set[asyncio.Task[Any]] = set()
        self._connected = False
        self._closing = False
        self._closed = False
        self._ever_connected = False
        self.error: BaseException | None = None
        """The fatal error that stopped the client, if any."""
        self._changed = asyncio.Event()

    # -- public API ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def unacked(self) -> int:
        """Signals queued or sent but not yet acknowledged by the relay."""
        return len(self._outbox)

    async def start(self) -> None:
        """Connect, retrying with backoff, until connected, a fatal refusal, or close().

        Raises AuthenticationError (401), ConversationFullError (409) or
        HandshakeRefusedError; the client is then failed. Returns quietly if close() is
        called first.
        """
        if self._closed or self._closing:
            raise SignalingClosedError("this SignalingClient is closed")
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"signaling-client-{self.conversation_id}-{self.peer_id}"
            )
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

    async def send(self, signal: Signal | Iterable[Signal]) -> None:
        """Queue one signal or a list of them; returns once queued (not once delivered).

        Raises SignalError for an invalid signal, SignalTooLargeError,
        OutboundQueueFullError when ``max_outbound`` signals already wait for the relay's
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
                f"outbound queue full: {len(self._outbox)} signals wait for the relay's "
                f"acknowledgement (max_outbound={self.max_outbound}); "
                f"cannot queue {len(signals)} more"
            )
        encoded: list[str] = []
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
            out = dict(item)
            out["conversation_id"] = conversation_id
            out[PEER_FIELD] = self.peer_id
            out[SESSION_FIELD] = self.session
            out[SEQ_FIELD] = self._next_seq + index
            text = encode(out)
            if len(text) > self.max_message_bytes:
                raise SignalTooLargeError(
                    f"{where}signal of {len(text)} bytes exceeds max_message_bytes="
                    f"{self.max_message_bytes}"
                )
            encoded.append(text)
        for text in encoded:
            self._outbox[self._next_seq] = text
            self._next_seq += 1
        self._wake.set()

    async def drain(self) -> None:
        """Wait until the relay has acknowledged every queued signal."""
        while self._outbox:
            if self.error is not None or self._closed or self._closing:
                raise SignalingClosedError("the signaling client is closed")
            await self._wait_change()

    async def close(self) -> None:
        """Close the connection and end the reconnect loop. Idempotent.

        Unacknowledged signals are dropped. Called from inside on_signal/on_state, it
        cancels the client but cannot wait for its own task to end.
        """
        if self._closed:
            return
        self._closing = True
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

    async def __aenter__(self) -> SignalingClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------

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

    async def _emit(self, state: str) -> None:
        """Call on_state (sync, or async and awaited: keep it quick); never raise."""
        if self._on_state is None:
            return
        try:
            result = self._on_state(state)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("signaling %s: on_state failed for %r", self._name(), state)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.reconnect_max, self.reconnect_base * (2**attempt))
        return delay / 2 + random.uniform(0, delay / 2)

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                try:
                    ws = await connect(self._url, **self._connect_options)
                except InvalidStatus as exc:
                    fatal = self._refusal(exc)
                    if fatal is not None:
                        raise fatal from None
                    log.warning(
                        "signaling %s: relay refused the connection (HTTP %s: %s); retrying",
                        self._name(),
                        exc.response.status_code,
                        _body(exc),
                    )
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    log.info("signaling %s: cannot connect: %s", self._name(), exc or type(exc))
                else:
                    attempt = 0
                    close_code, close_reason = await self._serve(ws)
                    if close_code == CLOSE_REPLACED:
                        raise PeerReplacedError(
                            f"another client connected as peer {self.peer_id!r} in "
                            f"conversation {self.conversation_id!r} and replaced this one"
                        )
                    if close_code == CLOSE_CONVERSATION_FULL and not self._ever_connected:
                        raise ConversationFullError(close_reason or "conversation full")
                    if self._closing:
                        break
                    log.warning(
                        "signaling %s: disconnected (code %s%s); reconnecting",
                        self._name(),
                        close_code,
                        f", {close_reason}" if close_reason else "",
                    )
                delay = self._backoff(attempt)
                attempt += 1
                log.debug("signaling %s: next attempt in %.2fs", self._name(), delay)
                await asyncio.sleep(delay)
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

    async def _serve(self, ws: ClientConnection) -> tuple[int | None, str | None]:
        """Run one connection until it ends; return its close code and reason."""
        self._sent_upto = 0  # everything unacknowledged goes out again, in order
        self._wake.set()
        reader = asyncio.create_task(self._reader(ws), name="signaling-client-reader")
        writer = asyncio.create_task(self._writer(ws), name="signaling-client-writer")
        self._io_tasks.update((reader, writer))
        self._connected = True
        self._ever_connected = True
        log.info(
            "signaling %s: connected to %s", self._name(), self._url.split("?", 1)[0]
        )
        self._notify()
        try:
            await self._emit(CONNECTED)
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._connected = False
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                try:
                    await task
                except (asyncio.CancelledError, ConnectionClosed):
                    pass
                except Exception:
                    log.exception("signaling %s: connection task failed", self._name())
                self._io_tasks.discard(task)
            try:
                await ws.close()
            except Exception:
                pass
            finally:
                self._notify()
                await self._emit(DISCONNECTED)
        return ws.close_code, ws.close_reason

    async def _writer(self, ws: ClientConnection) -> None:
        while True:
            batch = [text for seq, text in self._outbox.items() if seq > self._sent_upto]
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            last = next(reversed(self._outbox))
            for frame in frames_of(batch, self.max_message_bytes):
                await ws.send(frame)
            self._sent_upto = max(self._sent_upto, last)

    async def _reader(self, ws: ClientConnection) -> None:
        async for message in ws:
            if isinstance(message, bytes):
                log.warning("signaling %s: ignored a binary frame", self._name())
                continue
            try:
                payload = json.loads(message)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and CONTROL in payload:
                self._on_control(payload)
                continue
            signals, errors = parse_frame(message)
            for error in errors:
                log.warning(
                    "signaling %s: dropped a malformed incoming item: %s", self._name(), error
                )
            for signal in signals:
                if self._is_duplicate(signal):
                    continue
                if signal.get("kind") == ERROR and PEER_FIELD not in signal:
                    log.warning(
                        "signaling %s: relay reported an error: %s",
                        self._name(),
                        signal.get("data"),
                    )
                await self._deliver(signal)

    def _on_control(self, message: dict[str, Any]) -> None:
        if message.get(CONTROL) != ACK:
            log.debug("signaling %s: ignored control message %r", self._name(), message)
            return
        if message.get(SESSION_FIELD) not in (self.session, None):
            return  # an ack meant for an earlier process with the same peer id
        seqs = message.get("seqs")
        if not isinstance(seqs, list):
            log.warning("signaling %s: malformed ack %r", self._name(), message)
            return
        for seq in seqs:
            if isinstance(seq, int) and not isinstance(seq, bool):
                self._outbox.pop(seq, None)
        if message.get("status") == "rejected":
            log.warning("signaling %s: the relay rejected signals %s", self._name(), seqs)
        self._notify()

    def _is_duplicate(self, signal: Signal) -> bool:
        peer = signal.get(PEER_FIELD)
        session = signal.get(SESSION_FIELD)
        seq = signal.get(SEQ_FIELD)
        if not (
            isinstance(peer, str)
            and isinstance(session, str)
            and isinstance(seq, int)
            and not isinstance(seq, bool)
        ):
            return False
        key = (peer, session)
        last = self._seen.get(key)
        if last is not None and seq <= last:
            log.debug("signaling %s: dropped duplicate %s/%s", self._name(), key, seq)
            return True
        self._seen[key] = seq
        self._seen.move_to_end(key)
        while len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)
        return False

    async def _deliver(self, signal: Signal) -> None:
        try:
            result = self._on_signal(signal)
            if inspect.isawaitable(result):
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

    def _name(self) -> str:
        return f"{self.conversation_id}/{self.peer_id}"


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(path=parts.path or "/", query=urlencode(query)))


def _body(exc: InvalidStatus) -> str:
    body = exc.response.body or b""
    return body.decode("utf-8", "replace").strip() or exc.response.reason_phrase
