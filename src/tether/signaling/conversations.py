"""The relay's conversation table: who is in which conversation, and what waits for whom.

The WebSocket server (``server.py``) does HTTP, authentication and frame parsing; everything
about membership, held signals, delivery order and acknowledgements lives behind the small
:class:`ConversationTable` interface below. :class:`MemoryConversationTable` keeps it in this
process. A Redis-backed table (relay instances sharing conversations over pub/sub, see
DESIGN.md "Coming later") implements the same five coroutines; the server does not change.

Rules every implementation keeps:

- At most two peers per conversation (``MAX_PEERS``). A peer joining with a peer id that is
  already present *replaces* the old connection (``Peer.supersede()`` is called on it).
- Signals from a sender are delivered to the other peer in the order they were relayed. While
  the other peer is absent they are held in a bounded per-conversation queue and delivered
  when it joins.
- Once a signal carrying an integer ``seq`` has been written to the other peer's connection,
  the sender's current connection gets ``acknowledge(session, [seq, ...], "delivered")``.
- A conversation with no connected peer is forgotten, held signals included. That is safe:
  a sender keeps every signal the relay has not acknowledged and sends it again when it
  reconnects (the same reason a relay restart loses nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tether.signals import Signal

log = logging.getLogger(__name__)

MAX_PEERS = 2
"""Peers per conversation: a tube has two ends."""

DELIVERED = "delivered"
REJECTED = "rejected"


@runtime_checkable
class Peer(Protocol):
    """One connected peer, as the table sees it (the server's connection wrapper)."""

    peer_id: str

    async def deliver(self, signals: list[Signal]) -> None:
        """Write ``signals`` (in order) to this peer's socket; raise if that fails."""

    async def acknowledge(self, session: str | None, seqs: list[int], status: str) -> None:
        """Tell this peer the relay is done with its signals ``seqs`` of ``session``."""

    def supersede(self) -> None:
        """A newer connection with the same peer id took over: close this one (no waiting)."""


@dataclass(frozen=True)
class Refusal:
    """Why a peer may not join; ``status`` is the HTTP status the handshake answers with."""

    status: int
    reason: str


class JoinRefused(Exception):
    """Raised by :meth:`ConversationTable.join`; carries the :class:`Refusal`."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass
class RelayResult:
    """What :meth:`ConversationTable.relay` did not take.

    ``rejected`` lists (signal, reason) for signals that were not queued (the held-signal
    queue was full). ``superseded`` is True when the sender is no longer the current
    connection of its peer id: nothing was taken, and the caller should stop reading it.
    """

    rejected: list[tuple[Signal, str]] = field(default_factory=list)
    superseded: bool = False


class ConversationTable(Protocol):
    """The interface the server uses. All of it is async so a networked table fits."""

    async def admit(self, conversation_id: str, peer_id: str) -> Refusal | None:
        """Pre-check during the HTTP handshake: would ``join`` refuse this peer now?"""

    async def join(self, conversation_id: str, peer: Peer) -> bool:
        """Add ``peer``; return True if it replaced an older connection of the same peer id.

        Raises :class:`JoinRefused` (conversation full, too many conversations). Delivers
        the signals held for ``peer`` before returning.
        """

    async def leave(self, conversation_id: str, peer: Peer) -> None:
        """Remove ``peer`` if it is still the current connection of its peer id."""

    async def relay(
        self, conversation_id: str, sender: Peer, signals: list[Signal]
    ) -> RelayResult:
        """Queue ``signals`` from ``sender`` for the other peer and deliver what can be."""

    async def close(self) -> None:
        """Forget everything."""

    def __len__(self) -> int:
        """Number of conversations."""


@dataclass
class _Held:
    sender_id: str
    signal: Signal


class _Conversation:
    __slots__ = ("conversation_id", "peers", "held", "lock")

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.peers: dict[str, Peer] = {}
        # Signals not yet written to their recipient, in relay order (all senders).
        self.held: deque[_Held] = deque()
        # Serialises writes of relayed signals so that order is kept.
        self.lock = asyncio.Lock()


class MemoryConversationTable:
    """The in-process :class:`ConversationTable`.

    Membership changes are synchronous (no await between check and update), so two joins
    cannot both take the last slot; only writes to sockets happen under a per-conversation
    lock, which is what keeps relay order.
    """

    def __init__(self, *, max_conversations: int = 10_000, max_held: int = 256) -> None:
        if max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        if max_held < 1:
            raise ValueError("max_held must be at least 1")
        self.max_conversations = max_conversations
        self.max_held = max_held
        self._conversations: dict[str, _Conversation] = {}

    def __len__(self) -> int:
        return len(self._conversations)

    def peers(self, conversation_id: str) -> list[str]:
        """Peer ids connected to a conversation (for status displays and tests)."""
        conversation = self._conversations.get(conversation_id)
        return list(conversation.peers) if conversation else []

    def held_count(self, conversation_id: str) -> int:
        conversation = self._conversations.get(conversation_id)
        return len(conversation.held) if conversation else 0

    # -- interface ---------------------------------------------------------------------

    async def admit(self, conversation_id: str, peer_id: str) -> Refusal | None:
        return self._refusal(conversation_id, peer_id)

    async def join(self, conversation_id: str, peer: Peer) -> bool:
        refusal = self._refusal(conversation_id, peer.peer_id)
        if refusal is not None:
            raise JoinRefused(refusal)
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            conversation = self._conversations[conversation_id] = _Conversation(
                conversation_id
            )
        old = conversation.peers.get(peer.peer_id)
        conversation.peers[peer.peer_id] = peer
        if old is not None and old is not peer:
            old.supersede()
        await self._flush(conversation)
        return old is not None and old is not peer

    async def leave(self, conversation_id: str, peer: Peer) -> None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.peers.get(peer.peer_id) is not peer:
            return
        del conversation.peers[peer.peer_id]
        if not conversation.peers:
            if conversation.held:
                log.debug(
                    "conversation %s: last peer left, dropping %d held signals "
                    "(their senders resend them)",
                    conversation_id,
                    len(conversation.held),
                )
            del self._conversations[conversation_id]

    async def relay(
        self, conversation_id: str, sender: Peer, signals: list[Signal]
    ) -> RelayResult:
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.peers.get(sender.peer_id) is not sender:
            return RelayResult(superseded=True)
        result = RelayResult()
        for signal in signals:
            if len(conversation.held) >= self.max_held:
                result.rejected.append(
                    (
                        signal,
                        f"the relay's queue for this conversation is full "
                        f"({self.max_held} signals waiting for the other peer); "
                        f"signal not relayed",
                    )
                )
            else:
                conversation.held.append(_Held(sender.peer_id, signal))
        await self._flush(conversation)
        return result

    async def close(self) -> None:
        self._conversations.clear()

    # -- internals ---------------------------------------------------------------------

    def _refusal(self, conversation_id: str, peer_id: str) -> Refusal | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            if len(self._conversations) >= self.max_conversations:
                return Refusal(
                    503,
                    f"the relay is full: {self.max_conversations} conversations "
                    f"are open; try again later",
                )
            return None
        if peer_id not in conversation.peers and len(conversation.peers) >= MAX_PEERS:
            return Refusal(
                409,
                f"conversation {conversation_id!r} already has {MAX_PEERS} peers "
                f"({', '.join(sorted(conversation.peers))}); a third peer cannot join",
            )
        return None

    async def _flush(self, conversation: _Conversation) -> None:
        """Write every held signal whose recipient is connected, in order; then ack."""
        acks: dict[tuple[str, str | None], list[int]] = {}
        async with conversation.lock:
            failed: set[str] = set()
            while True:
                progressed = False
                for recipient in list(conversation.peers.values()):
                    if (
                        recipient.peer_id in failed
                        or conversation.peers.get(recipient.peer_id) is not recipient
                    ):
                        continue  # failed already, or replaced while we were writing
                    batch = [
                        held
                        for held in conversation.held
                        if held.sender_id != recipient.peer_id
                    ]
                    if not batch:
                        continue
                    try:
                        await recipient.deliver([held.signal for held in batch])
                    except Exception as exc:  # the recipient's connection is gone
                        log.debug(
                            "conversation %s: delivery to %s failed: %r",
                            conversation.conversation_id,
                            recipient.peer_id,
                            exc,
                        )
                        failed.add(recipient.peer_id)
                        continue
                    delivered = {id(held) for held in batch}
                    conversation.held = deque(
                        held for held in conversation.held if id(held) not in delivered
                    )
                    progressed = True
                    for held in batch:
                        seq = held.signal.get("seq")
                        if isinstance(seq, int) and not isinstance(seq, bool):
                            key = (held.sender_id, held.signal.get("session"))
                            acks.setdefault(key, []).append(seq)
                if not progressed:
                    break
        # Acks go out after the lock is released: a slow sender must not stall delivery.
        for (sender_id, session), seqs in acks.items():
            sender = conversation.peers.get(sender_id)
            if sender is None:
                continue  # it resends after reconnecting; the receiver drops duplicates
            try:
                await sender.acknowledge(session, seqs, DELIVERED)
            except Exception as exc:
                log.debug("ack to %s failed: %r", sender_id, exc)
