"""The signaling relay: a WebSocket server that passes signals between the two peers of a
conversation (DESIGN.md Contract 3), holds them while the other peer is away, and
acknowledges what it has delivered so that clients can resend what it has not.

Wire protocol
=============

Connecting
----------
``ws://HOST:PORT/?conversation=CONVERSATION_ID&peer=PEER_ID`` with the header
``Authorization: Bearer TOKEN``. Refusals happen in the HTTP handshake, with a plain-text body
saying why:

=====  ============================================================================
401    missing, malformed or wrong token (compared with ``hmac.compare_digest``)
400    ``conversation`` or ``peer`` missing, repeated, empty, longer than 256
       characters or not printable
404    a path other than ``/``
409    the conversation already has two peers and ``peer`` is not one of them
503    the relay already holds ``max_conversations`` conversations (or is shutting
       down); retry later
=====  ============================================================================

A peer id identifies one end of the conversation. Connecting with a peer id that is already
connected *replaces* that connection: the old one is closed with code 4000 and is not counted
as a third peer. (The client uses a random peer id per process unless told otherwise.)

Frames, client -> relay
-----------------------
A text frame holds one signal or a JSON array of signals (Contract 3). Besides the envelope
``{"tube_id", "conversation_id", "kind", "data"}``, a signal sent by ``SignalingClient``
carries three transport fields:

``peer``     the sender's peer id (the relay overwrites it with the id the connection
             authenticated as, so a peer cannot speak for another one)
``session``  random per client instance: a restarted process never reuses (session, seq)
``seq``      per-session sequence number: 1, 2, 3, ... (integer >= 0)

``seq`` and ``session`` are optional (a minimal peer may omit them; it then gets no acks).
``conversation_id`` may be empty (the relay fills in the connection's conversation); any other
value than the connection's conversation is an error. The key ``control`` is reserved: it marks
control messages and may not appear in a signal. Every other key is relayed unchanged, so the
envelope can grow (an end-to-end authentication field later).

Frames, relay -> client
-----------------------
- Relayed signals, as a single object or an array, in the order their sender sent them.
- Error replies, which are Contract 3 signals of kind ``error`` without a ``peer`` field::

      {"kind": "error", "tube_id": "<the bad item's tube_id, or "">",
       "conversation_id": "<the connection's conversation>",
       "data": "item 2: missing or empty 'tube_id'"}

  A frame with several bad items gets one error per bad item (sent together as one array
  frame; beyond 20, one summary error counts the rest). The good items of the same frame are
  relayed as usual and the connection stays open.
- Control messages: JSON objects with a ``control`` key. They are never relayed and are not
  Contract 3 signals. The only one today::

      {"control": "ack", "session": "<sender session>", "seqs": [5, 6, 7],
       "status": "delivered" | "rejected"}

  ``delivered``: these signals were written to the other peer's socket. ``rejected``: the relay
  refused them (an error reply says why). Either way the sender stops keeping them. Signals
  held because the other peer is not connected are acknowledged when they are delivered.

Errors and limits
-----------------
- Binary frames: error reply, nothing relayed.
- A text frame larger than ``max_message_bytes`` (default 64 KiB): error reply, nothing
  relayed, connection stays open. So that such frames can be answered, the WebSocket layer
  accepts messages up to ``4 * max_message_bytes``; only a message beyond that makes
  ``websockets`` close the connection with code 1009 (message too big).
- Held signals: at most ``max_held`` (default 256) per conversation; past that, error reply
  and a ``rejected`` ack.
- At most ``max_conversations`` (default 10,000) conversations; two peers each.
- Per connection: ``websockets`` ``write_limit`` bounds the socket write buffer (writers wait
  for it to drain) and ``max_queue`` bounds received frames not yet processed.

Close codes used by the relay: 1001 when the relay shuts down (clients reconnect), 4000 when
a newer connection with the same peer id replaced this one, 4409 / 4503 when a join loses a
race for the last slot after the handshake was accepted (same meaning as HTTP 409 / 503).

Delivery
--------
The relay keeps no durable state; a restart forgets everything. The client keeps every signal
the relay has not acknowledged and sends it again, in order, after each reconnect; the
receiving client drops duplicates by (peer, session, seq). Together that delivers each signal
to the application exactly once across connection drops and relay restarts, in order per
sender.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tether.signals import ERROR, Signal, SignalError, validate_signal

from .conversations import (
    REJECTED,
    ConversationTable,
    JoinRefused,
    MemoryConversationTable,
)

log = logging.getLogger(__name__)

# -- wire constants shared with the client ----------------------------------------------

CONTROL = "control"
"""Key that marks a control message (never relayed, not a Contract 3 signal)."""
ACK = "ack"
PEER_FIELD = "peer"
SESSION_FIELD = "session"
SEQ_FIELD = "seq"

CLOSE_REPLACED = 4000
CLOSE_CONVERSATION_FULL = 4409
CLOSE_RELAY_FULL = 4503

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
WS_SIZE_FACTOR = 4
"""websockets' max_size is this many times max_message_bytes (see "Errors and limits")."""
MAX_ID_LENGTH = 256
MAX_ERRORS_PER_FRAME = 20


def error_signal(conversation_id: str, data: str, tube_id: str = "") -> Signal:
    return {"kind": ERROR, "tube_id": tube_id, "conversation_id": conversation_id, "data": data}


def encode(obj: Any) -> str:
    """Compact JSON, ASCII only (so len() is the size in bytes)."""
    return json.dumps(obj, separators=(",", ":"))


def frames_of(encoded: list[str], max_bytes: int) -> list[str]:
    """Pack encoded signals into frames of at most ``max_bytes`` (one signal may exceed it)."""
    frames: list[str] = []
    batch: list[str] = []
    size = 2
    for item in encoded:
        if batch and size + len(item) + 1 > max_bytes:
            frames.append(batch[0] if len(batch) == 1 else "[" + ",".join(batch) + "]")
            batch, size = [], 2
        batch.append(item)
        size += len(item) + 1
    if batch:
        frames.append(batch[0] if len(batch) == 1 else "[" + ",".join(batch) + "]")
    return frames


# -- one connection as the conversation table sees it -----------------------------------


class _Endpoint:
    """A connected peer: implements ``conversations.Peer`` over a ServerConnection."""

    def __init__(
        self, ws: ServerConnection, conversation_id: str, peer_id: str, max_frame_bytes: int
    ) -> None:
        self.ws = ws
        self.conversation_id = conversation_id
        self.peer_id = peer_id
        self.max_frame_bytes = max_frame_bytes
        self._close_task: asyncio.Task[None] | None = None

    async def deliver(self, signals: list[Signal]) -> None:
        for frame in frames_of([encode(s) for s in signals], self.max_frame_bytes):
            await self.ws.send(frame)

    async def acknowledge(self, session: str | None, seqs: list[int], status: str) -> None:
        await self.ws.send(
            encode({CONTROL: ACK, SESSION_FIELD: session, "seqs": seqs, "status": status})
        )

    def supersede(self) -> None:
        # Don't wait for the closing handshake here: the old connection is often half-open
        # (that is why its peer reconnected). Its own handler awaits this task.
        if self._close_task is None:
            self._close_task = asyncio.create_task(
                self.ws.close(CLOSE_REPLACED, "replaced by a newer connection of this peer")
            )

    async def finish(self) -> None:
        if self._close_task is not None:
            await self._close_task


class _Route:
    __slots__ = ("conversation_id", "peer_id")

    def __init__(self, conversation_id: str, peer_id: str) -> None:
        self.conversation_id = conversation_id
        self.peer_id = peer_id


# -- the server ----------------------------------------------------------------------------


class SignalingServer:
    """The relay. ``await start()`` binds (``port=0`` picks a free port, see ``.port``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        max_conversations: int = 10_000,
        max_held: int = 256,
        table: ConversationTable | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 5.0,
        write_limit: int = 64 * 1024,
        max_queue: int = 16,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("SignalingServer needs a non-empty token")
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.table: ConversationTable = table or MemoryConversationTable(
            max_conversations=max_conversations, max_held=max_held
        )
        self._token = token.encode()
        self._ws_options = dict(
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            write_limit=write_limit,
            max_queue=max_queue,
            max_size=WS_SIZE_FACTOR * max_message_bytes,
        )
        self._server: Server | None = None
        self._closed = False

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
            **self._ws_options,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("signaling relay listening on %s", self.url)

    async def close(self) -> None:
        """Stop listening, close every connection (code 1001), wait for their handlers."""
        if self._closed:
            return
        self._closed = True
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
        return f"ws://{host}:{self.port}/"

    @property
    def conversation_count(self) -> int:
        return len(self.table)

    # handshake

    def _refuse(
        self, ws: ServerConnection, status: int, reason: str, route: str
    ) -> Response:
        log.info("refused %s from %s: %d %s", route, _remote(ws), status, reason)
        response = ws.respond(status, reason + "\n")
        if status == http.HTTPStatus.UNAUTHORIZED:
            response.headers["WWW-Authenticate"] = 'Bearer realm="tether"'
        return response

    async def _process_request(
        self, ws: ServerConnection, request: Request
    ) -> Response | None:
        parts = urlsplit(request.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        names = {
            key: (query.get(key) or [""])[0][:MAX_ID_LENGTH] for key in ("conversation", "peer")
        }
        route = f"peer={names['peer']!r} conversation={names['conversation']!r}"

        authorization = request.headers.get_all("Authorization")
        if len(authorization) != 1:
            return self._refuse(
                ws, 401, "missing token: send the header 'Authorization: Bearer <token>'", route
            )
        scheme, _, given = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return self._refuse(
                ws, 401, "malformed Authorization header: expected 'Bearer <token>'", route
            )
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return self._refuse(ws, 401, "invalid token", route)

        if parts.path not in ("", "/"):
            return self._refuse(ws, 404, f"unknown path {parts.path!r}; connect to '/'", route)
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

        refusal = await self.table.admit(values["conversation"], values["peer"])
        if refusal is not None:
            return self._refuse(ws, refusal.status, refusal.reason, route)
        ws.tether_route = _Route(values["conversation"], values["peer"])  # type: ignore[attr-defined]
        return None

    # connection

    async def _handle(self, ws: ServerConnection) -> None:
        route: _Route = ws.tether_route  # type: ignore[attr-defined]
        endpoint = _Endpoint(ws, route.conversation_id, route.peer_id, self.max_message_bytes)
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
            async for message in ws:
                if not await self._on_message(endpoint, message):
                    break
        except ConnectionClosed:
            pass
        finally:
            await self.table.leave(route.conversation_id, endpoint)
            await endpoint.finish()
            log.info(
                "peer %r left conversation %r (close code %s%s)",
                route.peer_id,
                route.conversation_id,
                ws.close_code,
                f", {ws.close_reason}" if ws.close_reason else "",
            )

    async def _on_message(self, endpoint: _Endpoint, message: str | bytes) -> bool:
        """Handle one frame; return False when this connection should stop reading."""
        conversation_id = endpoint.conversation_id
        errors: list[Signal] = []
        rejected_seqs: dict[str | None, list[int]] = {}

        if isinstance(message, bytes):
            errors.append(
                error_signal(
                    conversation_id,
                    f"binary frames are not accepted ({len(message)} bytes); "
                    "send signals as JSON text frames",
                )
            )
            await self._reply(endpoint, errors, rejected_seqs)
            return True

        size = len(message) if message.isascii() else len(message.encode("utf-8"))
        if size > self.max_message_bytes:
            tube_id = ""
            try:
                payload = json.loads(message)
            except ValueError:
                payload = None
            for item in payload if isinstance(payload, list) else [payload]:
                _collect_seq(item, rejected_seqs)
            if isinstance(payload, dict) and isinstance(payload.get("tube_id"), str):
                tube_id = payload["tube_id"]
            errors.append(
                error_signal(
                    conversation_id,
                    f"frame of {size} bytes exceeds the relay's limit of "
                    f"{self.max_message_bytes} bytes; nothing in it was relayed",
                    tube_id,
                )
            )
            await self._reply(endpoint, errors, rejected_seqs)
            return True

        good: list[Signal] = []
        index_of: dict[int, str] = {}
        for label, item, problem in _split(message):
            if problem is None:
                problem = self._check_item(endpoint, item)
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
                        tube_id if isinstance(tube_id, str) else "",
                    )
                )
                _collect_seq(item, rejected_seqs)

        if good:
            result = await self.table.relay(conversation_id, endpoint, good)
            if result.superseded:
                return False  # a newer connection of this peer took over
            for signal, reason in result.rejected:
                label = index_of.get(id(signal), "")
                errors.append(
                    error_signal(
                        conversation_id,
                        f"{label}: {reason}" if label else reason,
                        signal["tube_id"],
                    )
                )
                _collect_seq(signal, rejected_seqs)
        if errors:
            log.debug(
                "peer %r conversation %r: %d bad item(s): %s",
                endpoint.peer_id,
                conversation_id,
                len(errors),
                errors[0]["data"],
            )
        await self._reply(endpoint, errors, rejected_seqs)
        return True

    def _check_item(self, endpoint: _Endpoint, item: Signal) -> str | None:
        if CONTROL in item:
            return f"the key {CONTROL!r} is reserved for control messages"
        conversation_id = item.get("conversation_id", "")
        if not conversation_id:
            item["conversation_id"] = endpoint.conversation_id
        elif conversation_id != endpoint.conversation_id:
            return (
                f"conversation_id {conversation_id!r} does not match this connection's "
                f"conversation {endpoint.conversation_id!r}"
            )
        if SEQ_FIELD in item:
            seq = item[SEQ_FIELD]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                return f"{SEQ_FIELD!r} must be an integer >= 0"
        if SESSION_FIELD in item and not isinstance(item[SESSION_FIELD], str):
            return f"{SESSION_FIELD!r} must be a string"
        return None

    async def _reply(
        self,
        endpoint: _Endpoint,
        errors: list[Signal],
        rejected_seqs: dict[str | None, list[int]],
    ) -> None:
        if len(errors) > MAX_ERRORS_PER_FRAME:
            extra = len(errors) - MAX_ERRORS_PER_FRAME
            errors = errors[:MAX_ERRORS_PER_FRAME] + [
                error_signal(
                    endpoint.conversation_id,
                    f"... and {extra} more bad item(s) in the same frame",
                )
            ]
        try:
            if errors:
                await endpoint.ws.send(encode(errors[0] if len(errors) == 1 else errors))
            for session, seqs in rejected_seqs.items():
                await endpoint.acknowledge(session, seqs, REJECTED)
        except ConnectionClosed:
            pass


def _split(message: str) -> list[tuple[str, Any, str | None]]:
    """(label, item, problem) per item of a frame; problem None means a valid signal.

    The same rules and messages as ``tether.signals.parse_frame``, keeping each bad item
    so that the error reply can name its tube_id.
    """
    try:
        payload = json.loads(message)
    except ValueError as exc:
        return [("", None, f"frame is not valid JSON: {exc}")]
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
            out.append((label, item, str(exc)))
        else:
            out.append((label, item, None))
    return out


def _collect_seq(item: Any, into: dict[str | None, list[int]]) -> None:
    """Note the (session, seq) of a rejected item so the sender stops resending it."""
    if not isinstance(item, dict):
        return
    seq = item.get(SEQ_FIELD)
    session = item.get(SESSION_FIELD)
    if isinstance(seq, int) and not isinstance(seq, bool) and (
        session is None or isinstance(session, str)
    ):
        into.setdefault(session, []).append(seq)


def _remote(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"
