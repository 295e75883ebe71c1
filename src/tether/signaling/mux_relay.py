"""The relay's side of a multiplexed connection: many conversations on one WebSocket.

A process serving several tunnels (``tether up``) opens ONE connection, ``/?mux=1``, and
joins each conversation with a control message (the wire protocol is in ``server.py``,
"Multiplexed connections"). Here each membership is a :class:`MuxMember`: a
``conversations.Peer`` of its own (so the in-memory and the Redis table need no change, and
the other peer may be on a classic connection or another relay) whose messages all go
through the connection's one bounded queue and one writer (:class:`MuxConnection`). Every
message a member queues names its conversation; the frame handling of ``server.py`` runs
unchanged with a member in place of a classic connection.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from tether.signals import Signal

from .conversations import ABSENT, PRESENT, JoinRefused, Refusal
from .frames import load, text_of
from .server import (
    CLOSE_REPLACED,
    CONTROL,
    MAX_ID_LENGTH,
    PEER_EVENT,
    PEER_FIELD,
    RESUME_FIELD,
    SESSION_FIELD,
    _Endpoint,
    _json_string,
    _Outgoing,
    _Refused,
    _remote,
    encode,
    error_signal,
)
from .ws_fastpath import FastServerConnection

if TYPE_CHECKING:
    from .server import SignalingServer, _Route

log = logging.getLogger(__name__)

CONVERSATION_FIELD = "conversation"
"""Names the conversation of a control message on a multiplexed connection."""
JOIN = "join"
LEAVE = "leave"
JOINED_REPLY = "joined"
REFUSED_REPLY = "refused"
CLOSED_REPLY = "closed"


class MuxConnection(_Endpoint):
    """The WebSocket of a multiplexed connection: its queue and writer, and its members."""

    __slots__ = ("members",)

    def __init__(self, ws: FastServerConnection, **options: Any) -> None:
        super().__init__(ws, "", "", **options)
        self.members: dict[str, MuxMember] = {}

    def take_undelivered_of(self, conversation_id: str) -> list[Signal]:
        """Remove and return the relayed signals of one conversation still queued."""
        queue = self._queue
        if not queue:
            return []
        taken: list[Signal] = []
        kept: list[_Outgoing] = []
        for item in queue:
            if item.signals and item.signals[0].get("conversation_id") == conversation_id:
                taken.extend(item.signals)
            else:
                kept.append(item)
        if taken:
            self._queue = deque(kept) if kept else None
            self._queued_bytes = sum(len(item.text) for item in kept)
        return taken

    def put_text(self, text: str) -> bool:
        return self._put([_Outgoing(text, None)])

    def evict(self, reason: str) -> None:
        if self.gone:
            return
        log.warning(
            "dropping multiplexed connection from %s (%d conversation(s)): %s",
            _remote(self.ws), len(self.members), reason,
        )
        self._stop(reason)
        self.ws.transport.abort()


class MuxMember:
    """One conversation joined on a :class:`MuxConnection` (a ``conversations.Peer``).

    It also offers what ``SignalingServer._on_frame`` uses of a classic connection
    (``conversation_id``, ``peer_json``, ``gone``, ``reply``, ``evict``).
    """

    __slots__ = ("connection", "conversation_id", "peer_id", "peer_json", "address", "resume",
                 "credential", "_left", "_announced", "_prefix")

    def __init__(self, connection: MuxConnection, conversation_id: str, peer_id: str,
                 resume: str) -> None:
        self.connection = connection
        self.conversation_id = conversation_id
        self.peer_id = peer_id
        self.peer_json = _json_string(peer_id)
        self.address = connection.address
        self.resume = resume
        self.credential = ""
        self._left = False
        self._announced = False
        self._prefix = f'{{"{CONVERSATION_FIELD}":{_json_string(conversation_id)},'
        """Prepended to a control message's text (after its "{") to name the conversation."""

    @property
    def gone(self) -> bool:
        return self._left or self.connection.gone

    def _control(self, message: dict[str, Any]) -> bool:
        if self.gone:
            return False
        return self.connection.put_text(self._prefix + encode(message)[1:])

    # conversations.Peer

    def deliver(self, signals: list[Signal], *, bounded: bool = True) -> bool:
        if self.gone:
            return False
        return self.connection.deliver(signals, bounded=bounded)  # they name the conversation

    def presence(self, event: str) -> bool:
        if event in (PRESENT, ABSENT) and not self._announced:
            self._announced = True
            return self._control({CONTROL: JOINED_REPLY, PEER_FIELD: self.peer_id,
                                  RESUME_FIELD: self.credential, "event": event})
        return self._control({CONTROL: PEER_EVENT, "event": event})

    def forward(self, message: dict[str, Any]) -> bool:
        if self.gone:
            return False
        return self.connection.put_text(self._prefix + text_of(message)[1:])

    def take_undelivered(self) -> list[Signal]:
        return self.connection.take_undelivered_of(self.conversation_id)

    def supersede(self) -> None:
        """A newer connection of this peer took the conversation over: this membership ends
        (the client is told with ``closed`` code 4000); the other conversations stay. A
        connection whose last membership is taken over is closed like a classic one
        (close code 4000)."""
        if self.gone:
            return
        connection = self.connection
        if connection.members.get(self.conversation_id) is self:
            del connection.members[self.conversation_id]
        if not connection.members:
            self._left = True
            connection.supersede()  # close code 4000 says it
            return
        reason = "replaced by a newer connection of this peer"
        self._control({CONTROL: CLOSED_REPLY, "code": CLOSE_REPLACED, "reason": reason})
        self._left = True

    def evict(self, reason: str) -> None:
        """The connection's queue is full (or its store lost state): drop the connection."""
        self._left = True
        self.connection.evict(reason)

    # replies to this member's frames

    def reply(self, message: Any) -> bool:
        if isinstance(message, dict) and CONTROL in message:
            return self._control(message)
        return self.connection.reply(message)  # error signals carry conversation_id


async def serve_mux(server: SignalingServer, ws: FastServerConnection, route: _Route) -> None:
    """Run one multiplexed connection until it ends; then leave every conversation."""
    connection = MuxConnection(ws, address=route.address, **server._endpoint_options)
    connection.start()
    log.info("multiplexed connection from %s", _remote(ws))
    try:
        try:
            await _read(server, connection, ws)
        except ConnectionClosed:
            pass
        finally:
            members = list(connection.members.values())
            connection.members.clear()
            for member in members:
                member._left = True
                await server.table.leave(member.conversation_id, member)
            log.info("multiplexed connection from %s closed (code %s; left %d conversation(s))",
                     _remote(ws), ws.close_code, len(members))
    finally:
        await connection.finish()


async def _read(server: SignalingServer, connection: MuxConnection,
                ws: FastServerConnection) -> None:
    """Route the connection's frames in order until it closes or must stop being read."""
    while True:
        for message in await ws.recv_batch():
            if connection.gone or not await _on_frame(server, connection, message):
                return


async def _on_frame(server: SignalingServer, connection: MuxConnection,
                    message: str | bytes) -> bool:
    """Route one frame to its conversation's member; False to stop reading."""
    conversation_id: Any = None
    payload: Any = None
    parsed: tuple[Any, str | None] | None = None
    if isinstance(message, str):
        parsed = load(message)  # (parsed once: handed on to the frame handling)
        payload = parsed[0]
    if type(payload) is dict:
        control = payload.get(CONTROL)
        if control == JOIN:
            server.metrics.frames += 1
            return await _join(server, connection, payload)
        if control == LEAVE:
            server.metrics.frames += 1
            return await _leave(server, connection, payload)
        conversation_id = payload.get(CONVERSATION_FIELD if control is not None
                                      else "conversation_id")
    elif type(payload) is list and payload and type(payload[0]) is dict:
        conversation_id = payload[0].get("conversation_id")
    member = connection.members.get(conversation_id) if isinstance(conversation_id, str) else None
    if member is None:
        server.metrics.frames += 1
        return _not_joined(server, connection, conversation_id, payload)
    await server._on_message(member, message, parsed)  # type: ignore[arg-type]
    return not connection.gone


def _not_joined(server: SignalingServer, connection: MuxConnection, conversation_id: Any,
                payload: Any) -> bool:
    """A frame for no conversation joined here: an error, and ``rejected`` (retry) for
    its signals so the client keeps them for after its join."""
    if isinstance(conversation_id, str) and conversation_id:
        named = conversation_id[:MAX_ID_LENGTH]
        why = (f"conversation {named!r} is not joined on this connection; send "
               f'{{"control":"join","conversation":...,"peer":...}} first')
    else:
        named = ""
        why = ("on a multiplexed connection every frame names its conversation (signals: "
               "'conversation_id', control messages: 'conversation')")
    server.metrics.error("error_reply")
    ok = connection.reply(error_signal(named, why))
    refused = _Refused()
    for item in payload if isinstance(payload, list) else [payload]:
        if isinstance(item, dict) and CONTROL not in item:
            refused.add(item, retry=True)
    for (session, retry), seqs in refused.seqs.items():
        ok = connection.reply({CONTROL: "rejected", CONVERSATION_FIELD: named,
                               SESSION_FIELD: session, "seqs": seqs, "retry": retry}) and ok
    if not ok:
        connection.evict("its outgoing queue is full (it does not read its replies)")
    return ok


def _id_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH \
            or not value.isprintable():
        return f"join: {what!r} must be 1 to {MAX_ID_LENGTH} printable characters"
    return None


async def _join(server: SignalingServer, connection: MuxConnection,
                message: dict[str, Any]) -> bool:
    conversation_id = message.get(CONVERSATION_FIELD)
    peer_id = message.get(PEER_FIELD)
    resume = message.get(RESUME_FIELD)
    resume = resume.strip() if isinstance(resume, str) and len(resume) <= MAX_ID_LENGTH else ""
    named = conversation_id[:MAX_ID_LENGTH] if isinstance(conversation_id, str) else ""
    problem = _id_problem(conversation_id, CONVERSATION_FIELD) or _id_problem(peer_id,
                                                                              PEER_FIELD)
    if problem is not None:
        return _refuse(server, connection, named, peer_id, Refusal(400, problem))
    assert isinstance(conversation_id, str) and isinstance(peer_id, str)
    if conversation_id in connection.members:
        return _refuse(server, connection, named, peer_id, Refusal(
            409, f"conversation {named!r} is already joined on this connection"))
    cap = server.limits.max_conversations_per_connection
    if len(connection.members) >= cap:
        return _refuse(server, connection, named, peer_id, Refusal(
            429, f"too many conversations on one connection ({cap}); leave one first or "
                 f"open another connection", retry_after=10.0))
    wait = max(server._all_joins.wait("*"), server._joins.take(connection.address))
    if wait == 0:
        wait = server._all_joins.take("*")
    if wait > 0:
        return _refuse(server, connection, named, peer_id,
                       Refusal(429, "too many joins; slow down", retry_after=wait))
    member = MuxMember(connection, conversation_id, peer_id, resume)
    connection.members[conversation_id] = member
    try:
        replaced = await server.table.join(conversation_id, member)
    except JoinRefused as exc:
        if connection.members.get(conversation_id) is member:
            del connection.members[conversation_id]
        member._left = True
        return _refuse(server, connection, named, peer_id, exc.refusal)
    except BaseException:
        if connection.members.get(conversation_id) is member:
            del connection.members[conversation_id]
        member._left = True
        raise
    log.info("peer %r joined conversation %r on a multiplexed connection from %s%s",
             peer_id, conversation_id, _remote(connection.ws),
             " (replacing its previous connection)" if replaced else "")
    return not connection.gone


async def _leave(server: SignalingServer, connection: MuxConnection,
                 message: dict[str, Any]) -> bool:
    conversation_id = message.get(CONVERSATION_FIELD)
    member = connection.members.pop(conversation_id, None) \
        if isinstance(conversation_id, str) else None
    if member is None:
        return True  # not joined (any more): nothing to do
    member._left = True
    connection.take_undelivered_of(conversation_id)  # nobody reads them now
    await server.table.leave(conversation_id, member)
    log.info("peer %r left conversation %r (multiplexed connection from %s)",
             member.peer_id, conversation_id, _remote(connection.ws))
    return not connection.gone


def _refuse(server: SignalingServer, connection: MuxConnection, conversation_id: str,
            peer_id: Any, refusal: Refusal) -> bool:
    log.info("refused join of peer=%r conversation=%r from %s: %d %s",
             peer_id if isinstance(peer_id, str) else None, conversation_id,
             _remote(connection.ws), refusal.status, refusal.reason)
    server.metrics.error(f"refused_{refusal.status}")
    reply: dict[str, Any] = {CONTROL: REFUSED_REPLY, CONVERSATION_FIELD: conversation_id,
                             "status": refusal.status, "reason": refusal.reason}
    if refusal.retry_after is not None:
        reply["retry_after"] = refusal.retry_after
    if not connection.reply(reply):
        connection.evict("its outgoing queue is full (it does not read its replies)")
        return False
    return True


__all__ = ["CONVERSATION_FIELD", "MuxConnection", "MuxMember", "serve_mux"]
