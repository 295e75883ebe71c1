"""Many conversations on ONE signaling connection (``tether up`` with several tunnels).

:class:`SignalingMux` is the connection: one WebSocket to ``/?mux=1`` (token, TLS, URL
rotation, backoff, ``check()``, ``reconnect()``: all of ``client._Connection``).
:class:`MuxConversation` is one conversation on it, with exactly the API of a
:class:`~tether.signaling.client.SignalingClient` (``start/send/check/reconnect/discard/
drain/close``, ``on_signal``, ``on_peer``, ``on_state``) and the same per-conversation
machinery (outbox, acks, resend timer, inbox, presence), so the app cannot tell them apart.

Each conversation joins with a control message (``server.py``, "Multiplexed connections")
and presents its resume credential on every rejoin; when the shared socket drops, the mux
reconnects and every conversation joins again and resends what is not acknowledged. A
refused join (409, 429, 503) concerns that conversation only. The relay's frames are read
by the mux's one reader and handed to their conversation; every conversation's writer
sends on the shared socket.

::

    mux = SignalingMux(url, token)
    a = mux.conversation("conv-a", on_signal_a)
    b = mux.conversation("conv-b", on_signal_b)
    await a.start(); await b.start()    # one WebSocket, two conversations
    ...
    await a.close(); await b.close(); await mux.close()
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import time
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .client import (
    CONNECTED,
    DISCONNECTED,
    AuthenticationError,
    ConversationFullError,
    HandshakeRefusedError,
    PeerCallback,
    PeerReplacedError,
    SignalCallback,
    SignalingClient,
    SignalingClosedError,
    SignalingError,
    StateCallback,
    _Connection,
    _Conversation,
    backoff,
)
from .frames import read_frame
from .mux_relay import CLOSED_REPLY, CONVERSATION_FIELD, JOIN, JOINED_REPLY, LEAVE, \
    REFUSED_REPLY
from .server import CLOSE_REPLACED, CONTROL, DEFAULT_MAX_MESSAGE_BYTES, PEER_EVENT, \
    PEER_FIELD, RESUME_FIELD, _json_string, encode

log = logging.getLogger(__name__)

RECONNECT_DEBOUNCE = 1.0
"""reconnect() calls within this many seconds of one not yet connected are one (the
tunnels of a process all ask at once after a network change)."""
_CONTROL_PREFIX = f'{{"{CONTROL}"'


class _Pipe:
    """One live WebSocket of a mux: its joins in flight and its joined conversations."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.joining: dict[str, tuple[MuxConversation, asyncio.Future[dict[str, Any] | None]]] \
            = {}
        self.joined: dict[str, MuxConversation] = {}
        self.ended: dict[str, asyncio.Future[int | None]] = {}
        """Per joined conversation: done when its membership ends (the relay's close code,
        or None when the socket went)."""

    async def join(self, conversation: MuxConversation) -> dict[str, Any] | None:
        """Ask to join; the relay's answer (``joined`` / ``refused``), None if the socket
        ended first."""
        cid = conversation.conversation_id
        answer: asyncio.Future[dict[str, Any] | None] = (
            asyncio.get_running_loop().create_future())
        self.joining[cid] = (conversation, answer)
        message: dict[str, Any] = {CONTROL: JOIN, CONVERSATION_FIELD: cid,
                                   PEER_FIELD: conversation.peer_id}
        if conversation.resume:
            message[RESUME_FIELD] = conversation.resume
        try:
            await self.ws.send(encode(message))
            await asyncio.wait({answer, self.closed}, return_when=asyncio.FIRST_COMPLETED)
        except ConnectionClosed:
            pass
        finally:
            if self.joining.get(cid, (None, None))[1] is answer:
                del self.joining[cid]
        return answer.result() if answer.done() else None

    def has(self, conversation: MuxConversation) -> bool:
        """Joined here, or joining."""
        cid = conversation.conversation_id
        return self.joined.get(cid) is conversation or (
            self.joining.get(cid, (None, None))[0] is conversation)

    async def leave(self, conversation: MuxConversation) -> None:
        self.forget(conversation)
        self.joining.pop(conversation.conversation_id, None)
        if self.closed.done():
            return
        try:
            await self.ws.send(encode({CONTROL: LEAVE,
                                       CONVERSATION_FIELD: conversation.conversation_id}))
        except ConnectionClosed:
            pass

    def forget(self, conversation: MuxConversation) -> None:
        cid = conversation.conversation_id
        if self.joined.get(cid) is conversation:
            del self.joined[cid]
            ended = self.ended.pop(cid, None)
            if ended is not None and not ended.done():
                ended.set_result(None)

    def end(self) -> None:
        """The socket is gone: every join in flight and every membership ends."""
        if not self.closed.done():
            self.closed.set_result(None)
        for _, answer in self.joining.values():
            if not answer.done():
                answer.set_result(None)
        for ended in self.ended.values():
            if not ended.done():
                ended.set_result(None)
        self.joining.clear()
        self.joined.clear()
        self.ended.clear()


class _View:
    """What a conversation's writer and acks send on: the mux's socket, with the
    conversation named in each control message (signals name it themselves)."""

    __slots__ = ("ws", "_prefix")

    def __init__(self, ws: ClientConnection, conversation_id: str) -> None:
        self.ws = ws
        self._prefix = f'{{"{CONVERSATION_FIELD}":{_json_string(conversation_id)},'

    async def send(self, text: str) -> None:
        if not text.startswith(_CONTROL_PREFIX):
            await self.ws.send(text)  # signals (the writer: a closed socket ends it)
            return
        try:
            await self.ws.send(self._prefix + text[1:])
        except ConnectionClosed:
            # An ack on a closing socket: lost like one in flight (the sender resends, the
            # duplicate is acknowledged). Raising here would also lose the signals it
            # acknowledges, already taken by the inbox but not yet handed over.
            pass


class SignalingMux(_Connection):
    """One reconnecting signaling connection carrying many :class:`MuxConversation`.

    ``on_state(state)`` gets the connection's "connected", "disconnected", "failed",
    "closed". Close its conversations first, then the mux.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str,
        *,
        reconnect_base: float = 0.2,
        reconnect_max: float = 5.0,
        on_state: StateCallback | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        open_timeout: float | None = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float | None = 2.0,
        proxy: str | bool | None = True,
        ca_file: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self._init_lifecycle(on_state)
        self._init_connection(
            url, token, {"mux": "1"}, reconnect_base=reconnect_base,
            reconnect_max=reconnect_max, max_message_bytes=max_message_bytes,
            open_timeout=open_timeout, ping_interval=ping_interval, ping_timeout=ping_timeout,
            close_timeout=close_timeout, proxy=proxy, ca_file=ca_file, ssl=ssl,
        )
        self.max_message_bytes = max_message_bytes
        self.conversations: dict[str, MuxConversation] = {}
        self._pipe: _Pipe | None = None
        self._reconnected_at = -RECONNECT_DEBOUNCE

    # -- public API ---------------------------------------------------------------------

    def conversation(self, conversation_id: str, on_signal: SignalCallback,
                     peer_id: str | None = None, **options: Any) -> MuxConversation:
        """A new conversation on this connection (``start()`` it). One per conversation id.

        ``options``: those of :class:`MuxConversation` (``on_state``, ``on_peer``,
        ``max_outbound``, ``resend_after``, ``resend_max``).
        """
        if self._closing or self._closed:
            raise SignalingClosedError("this SignalingMux is closed")
        if conversation_id in self.conversations:
            raise ValueError(f"conversation {conversation_id!r} is already on this connection")
        conversation = MuxConversation(self, conversation_id, on_signal, peer_id, **options)
        self.conversations[conversation_id] = conversation
        return conversation

    def take_over(self, client: SignalingClient) -> MuxConversation:
        """The conversation of a (never started) ``client`` on this connection instead: same
        conversation, peer id and callbacks. The client itself is not used any more."""
        if client._task is not None:
            raise ValueError("take_over() needs a SignalingClient that was never started")
        return self.conversation(
            client.conversation_id, client._on_signal, client.peer_id,
            on_state=client._on_state, on_peer=client._on_peer,
            max_outbound=client.max_outbound, resend_after=client.resend_after,
            resend_max=client._timer.maximum,
        )

    def reconnect(self, reason: str) -> None:
        """As :meth:`SignalingClient.reconnect`; calls right after one (while not yet
        connected again) are one: every tunnel of the process asks after a network change."""
        now = time.monotonic()
        if self._link is None and now - self._reconnected_at < RECONNECT_DEBOUNCE:
            return
        self._reconnected_at = now
        super().reconnect(reason)

    # -- internals ----------------------------------------------------------------------

    def _name(self) -> str:
        return "mux"

    def _ensure_running(self) -> None:
        if self._closing or self._closed:
            raise SignalingClosedError("the shared signaling connection is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="signaling-mux")

    async def _wait_pipe(self) -> _Pipe:
        """The live socket, once there is one (raises the mux's fatal error)."""
        while True:
            if self.error is not None:
                error = self.error
                if isinstance(error, HandshakeRefusedError):
                    raise type(error)(str(error), error.status)
                if isinstance(error, SignalingError):
                    raise type(error)(str(error))  # one exception object per conversation
                raise SignalingClosedError(f"the shared signaling connection failed: {error}")
            if self._closing or self._closed or (self._task is not None and self._task.done()):
                raise SignalingClosedError("the shared signaling connection is closed")
            pipe = self._pipe
            if pipe is not None and not pipe.closed.done():
                return pipe
            await self._wait_change()

    async def _serve(self, ws: ClientConnection) -> tuple[int | None, str | None]:
        pipe = self._pipe = _Pipe(ws)
        self._connected = True
        self._ever_connected = True
        self._connected_to()
        self._notify()
        try:
            await self._emit(CONNECTED)
            async for message in ws:
                await self._dispatch(pipe, message)
        except ConnectionClosed:
            pass
        finally:
            self._connected = False
            self._pipe = None
            pipe.end()
            await self._hang_up(ws)
        return ws.close_code, ws.close_reason

    async def _dispatch(self, pipe: _Pipe, message: str | bytes) -> None:
        """One frame from the relay, to the conversation it names."""
        control, signals, errors = read_frame(message)
        if control is not None:
            await self._on_mux_control(pipe, control)
            return
        for error in errors[:5]:
            log.warning("signaling mux: dropped a malformed incoming item: %s", error)
        if not signals:
            return
        cid = signals[0].get("conversation_id")
        conversation = pipe.joined.get(cid) if isinstance(cid, str) else None
        if conversation is None:
            first = signals[0]
            if first.get("kind") == "error" and PEER_FIELD not in first:
                log.warning("signaling mux: relay reported an error: %s",
                            str(first.get("data"))[:300])
            else:
                log.debug("signaling mux: %d signal(s) for conversation %.80r, not joined",
                          len(signals), cid)
            return
        await conversation._flush(_View(pipe.ws, cid), [signals])

    async def _on_mux_control(self, pipe: _Pipe, control: dict[str, Any]) -> None:
        cid = control.get(CONVERSATION_FIELD)
        kind = control.get(CONTROL)
        if not isinstance(cid, str):
            log.debug("signaling mux: ignored control message %.200r", control)
            return
        if kind in (JOINED_REPLY, REFUSED_REPLY):
            conversation, answer = pipe.joining.pop(cid, (None, None))
            if conversation is None or answer is None or answer.done():
                return  # nobody waits (closed meanwhile)
            if kind == JOINED_REPLY:
                pipe.joined[cid] = conversation
                pipe.ended[cid] = asyncio.get_running_loop().create_future()
                answer.set_result(control)
                # The first presence message of the membership, with its credential.
                await conversation._on_control({CONTROL: PEER_EVENT,
                                                "event": control.get("event"),
                                                RESUME_FIELD: control.get(RESUME_FIELD)})
            else:
                answer.set_result(control)
            return
        if kind == CLOSED_REPLY:
            ended = pipe.ended.pop(cid, None)
            pipe.joined.pop(cid, None)
            if ended is not None and not ended.done():
                code = control.get("code")
                ended.set_result(code if isinstance(code, int) else None)
            return
        conversation = pipe.joined.get(cid)
        if conversation is not None:
            await conversation._on_control(control)


class MuxConversation(_Conversation):
    """One conversation on a :class:`SignalingMux`; the API of a ``SignalingClient``.

    ``check()`` and ``reconnect()`` act on the shared connection.
    """

    def __init__(
        self,
        mux: SignalingMux,
        conversation_id: str,
        on_signal: SignalCallback,
        peer_id: str | None = None,
        *,
        on_state: StateCallback | None = None,
        on_peer: PeerCallback | None = None,
        max_outbound: int = 1024,
        resend_after: float | None = 5.0,
        resend_max: float = 60.0,
    ) -> None:
        self._init_conversation(
            conversation_id, on_signal, peer_id, on_state=on_state, on_peer=on_peer,
            max_message_bytes=mux.max_message_bytes, max_outbound=max_outbound,
            resend_after=resend_after, resend_max=resend_max,
        )
        self.mux = mux

    @property
    def url(self) -> str:
        return self.mux.url

    async def start(self) -> None:
        self.mux._ensure_running()
        await super().start()

    async def check(self, timeout: float = 2.0) -> bool:
        """Ping the relay over the shared connection (see SignalingClient.check)."""
        if self._closing or self._closed or self._task is None or self._task.done():
            return False
        return await self.mux.check(timeout)

    def reconnect(self, reason: str) -> None:
        """Reconnect the shared connection (every conversation on it joins again)."""
        if self._closing or self._closed or self._task is None or self._task.done():
            return
        self.mux.reconnect(f"{self._name()}: {reason}")

    async def close(self) -> None:
        """Leave the conversation (the others on the connection go on). Idempotent."""
        if self._closed:
            return
        pipe = self.mux._pipe
        member = pipe is not None and pipe.has(self)
        await super().close()
        if member and pipe is not None:
            await pipe.leave(self)
        if self.mux.conversations.get(self.conversation_id) is self:
            del self.mux.conversations[self.conversation_id]

    async def _run(self) -> None:
        await self._supervise(self._join_loop)

    async def _join_loop(self) -> None:
        attempt = 0
        while not self._closing:
            pipe = await self.mux._wait_pipe()
            reply = await pipe.join(self)
            if reply is None:
                await pipe.closed  # the socket is going: wait for the next one
                continue
            if reply.get(CONTROL) == JOINED_REPLY:
                attempt = 0
                await self._member(pipe)
                continue
            status = reply.get("status")
            reason = str(reply.get("reason"))[:300]
            if status == 401:
                raise AuthenticationError(f"the signaling relay refused the token: {reason}")
            if status == 409 and not self._ever_connected:
                raise ConversationFullError(f"conversation full (409): {reason}")
            if status == 400:
                raise HandshakeRefusedError(f"the relay refused the join (400): {reason}", 400)
            retry_after = reply.get("retry_after")
            delay = backoff(self.mux.reconnect_base, self.mux.reconnect_max, attempt,
                            float(retry_after) if isinstance(retry_after, (int, float)) else 0.0)
            attempt += 1
            (log.warning if attempt == 3 else log.debug)(
                "signaling %s: the relay refused the join (%s: %s); trying again in %.1fs",
                self._name(), status, reason, delay)
            await asyncio.sleep(delay)

    async def _member(self, pipe: _Pipe) -> None:
        """Serve one membership until the socket goes or the relay ends it."""
        cid = self.conversation_id
        ended = pipe.ended[cid]
        log.info("signaling %s: joined on the shared connection to %s", self._name(),
                 self.mux.url)
        try:
            await self._converse(_View(pipe.ws, cid), [], ended)
            code = ended.result() if ended.done() else None
            writer_ended = not ended.done()
        finally:
            pipe.forget(self)
            self._notify()
            await self._emit(DISCONNECTED)
        if code == CLOSE_REPLACED:
            raise PeerReplacedError(
                f"another client connected as peer {self.peer_id!r} in conversation "
                f"{cid!r} and replaced this one")
        if writer_ended:
            await pipe.closed  # the writer ended: the socket is going


__all__ = ["MuxConversation", "SignalingMux"]
