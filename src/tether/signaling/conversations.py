"""The relay's conversation table: who is in which conversation, and what waits for whom.

The WebSocket server (``server.py``) does HTTP, authentication and frame parsing; everything
about membership, held signals, delivery order and presence lives behind the small
:class:`ConversationTable` interface below. :class:`MemoryConversationTable` keeps it in this
process. :class:`~tether.signaling.redis_table.RedisConversationTable` (``tether serve --redis``:
relay processes sharing conversations through Redis) implements the same coroutines; the
server does not change.

Rules every implementation keeps:

- At most two peers per conversation (``MAX_PEERS``). A peer id is not a credential: at
  join the table gives each connection a secret resume credential (``Peer.credential``,
  sent in its first message). A connection claiming a peer id that is connected *replaces*
  the old connection only if it presents that credential (``Peer.resume``); otherwise it
  is refused (409) like a third peer. On replacement ``Peer.supersede()`` is called on the
  old connection (no waiting), the signals still queued on it move to the new connection,
  and the credential stays the same. Refusals never name another peer.
- Limits: conversations in total and per creating address (``Peer.address``); held signals
  per conversation and in total, by count and by bytes; held signals older than
  ``held_ttl`` are dropped (``expire``). Refusals carry ``retry_after`` when waiting helps.
- The table never writes to a socket and never waits for one. Relaying puts signals on the
  recipient's bounded outgoing queue (``Peer.deliver``), which its own writer task drains;
  a recipient whose queue is full is evicted (its peer reconnects) and the signals are held
  as if it were absent. So no connection, however stuck, delays a join or another peer.
- Signals from a sender reach the other peer in the order they were relayed. While the
  other peer is absent they are held in a bounded per-conversation queue (duplicates of a
  held (sender, session, seq) are not held twice) and queued to it when it joins.
- Acknowledgements are end to end: the receiving client acknowledges, the table forwards
  the acknowledgement to the sender (``forward``). The relay itself only *refuses*
  (the server tells the sender, see ``server.py``).
- Presence: a joining peer first learns whether the other peer is there
  (``PRESENT``/``ABSENT``); the other peer learns ``JOINED`` (also when a peer replaced its
  own connection) and ``LEFT``.
- A conversation with no connected peer is forgotten, held signals included. That is safe:
  a sender keeps every signal the other peer has not acknowledged and sends it again when it
  reconnects or the peer joins (the same reason a relay restart loses nothing).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tether.signals import Signal

from .redact import RESUME_PREFIX

log = logging.getLogger(__name__)

MAX_PEERS = 2
"""Peers per conversation: a tube has two ends."""

JOINED = "joined"
LEFT = "left"
PRESENT = "present"
ABSENT = "absent"


@runtime_checkable
class Peer(Protocol):
    """One connected peer, as the table sees it (the server's connection wrapper).

    Every method returns at once: they queue, they never write to a socket.
    """

    peer_id: str
    address: str
    """Who this connection counts as for per-address limits (see ``limits.address_key``)."""
    resume: str
    """The resume credential this connection presented ("" if none)."""
    credential: str
    """Set by the table at join: the credential that lets a later connection replace it."""

    def deliver(self, signals: list[Signal], *, bounded: bool = True) -> bool:
        """Queue ``signals`` (in order) for this peer; False if its queue is full.

        ``bounded=False`` skips the queue's limit (signals that were held or carried over
        from a replaced connection, already bounded elsewhere).
        """

    def presence(self, event: str) -> bool:
        """Queue a presence event about the other peer; False if the queue is full."""

    def forward(self, message: dict[str, Any]) -> bool:
        """Queue a control message from the other peer (an ack); False if full."""

    def take_undelivered(self) -> list[Signal]:
        """Remove and return the relayed signals still queued (not yet being written)."""

    def supersede(self) -> None:
        """A newer connection with the same peer id took over: close this one (no waiting)."""

    def evict(self, reason: str) -> None:
        """Drop this connection now (no closing handshake); its peer will reconnect."""


@dataclass(frozen=True)
class Refusal:
    """Why a peer may not join; ``status`` is the HTTP status the handshake answers with."""

    status: int
    reason: str
    retry_after: float | None = None
    """Seconds after which trying again may succeed (sent as Retry-After)."""


class JoinRefused(Exception):
    """Raised by :meth:`ConversationTable.join`; carries the :class:`Refusal`."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass
class RelayResult:
    """What :meth:`ConversationTable.relay` did not take.

    ``rejected`` lists (signal, reason) for signals that were not taken (the held-signal
    queue was full; the sender may retry later). ``superseded`` is True when the sender is
    no longer the current connection of its peer id: nothing was taken, and the caller
    should stop reading it.
    """

    rejected: list[tuple[Signal, str]] = field(default_factory=list)
    superseded: bool = False


class ConversationTable(Protocol):
    """The interface the server uses. All of it is async so a networked table fits."""

    async def admit(
        self, conversation_id: str, peer_id: str, *, resume: str = "", address: str = ""
    ) -> Refusal | None:
        """Pre-check during the HTTP handshake: would ``join`` refuse this peer now?"""

    async def join(self, conversation_id: str, peer: Peer) -> bool:
        """Add ``peer``; return True if it replaced an older connection of the same peer id.

        Raises :class:`JoinRefused` (conversation full, too many conversations). Queues the
        presence event and the signals held for ``peer`` before returning.
        """

    async def leave(self, conversation_id: str, peer: Peer) -> None:
        """Remove ``peer`` if it is still the current connection of its peer id."""

    async def relay(
        self, conversation_id: str, sender: Peer, signals: list[Signal]
    ) -> RelayResult:
        """Queue ``signals`` from ``sender`` for the other peer, or hold them."""

    async def forward(
        self, conversation_id: str, sender: Peer, to: str, message: dict[str, Any]
    ) -> bool:
        """Queue a control ``message`` for peer ``to``; False if it is not connected."""

    async def expire(self) -> int:
        """Drop held signals older than the table's ``held_ttl``; return how many."""

    async def close(self) -> None:
        """Forget everything."""

    def __len__(self) -> int:
        """Number of conversations."""


@dataclass
class _Held:
    sender_id: str
    signal: Signal
    key: tuple[str, str, int] | None
    size: int
    at: float


class _Conversation:
    __slots__ = ("conversation_id", "peers", "held", "held_keys", "held_bytes", "creator")

    def __init__(self, conversation_id: str, creator: str) -> None:
        self.conversation_id = conversation_id
        self.creator = creator
        self.peers: dict[str, Peer] = {}
        # Signals waiting for an absent recipient, in relay order (all senders).
        self.held: deque[_Held] = deque()
        self.held_keys: set[tuple[str, str, int]] = set()
        self.held_bytes = 0


def new_credential() -> str:
    return RESUME_PREFIX + secrets.token_urlsafe(24)


def _held_key(sender_id: str, signal: Signal) -> tuple[str, str, int] | None:
    session, seq = signal.get("session"), signal.get("seq")
    if isinstance(session, str) and isinstance(seq, int) and not isinstance(seq, bool):
        return (sender_id, session, seq)
    return None


class MemoryConversationTable:
    """The in-process :class:`ConversationTable`.

    Nothing in it awaits: membership changes and queueing happen in one step, so two joins
    cannot both take the last slot and relay order is the order of the calls.
    """

    def __init__(
        self,
        *,
        max_conversations: int = 10_000,
        max_held: int = 256,
        max_held_bytes: int = 1024 * 1024,
        max_held_total: int = 100_000,
        max_held_total_bytes: int = 64 * 1024 * 1024,
        max_conversations_per_address: int | None = None,
        held_ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        if max_held < 1 or max_held_bytes < 1 or max_held_total < 1 or max_held_total_bytes < 1:
            raise ValueError("held-signal limits must be at least 1")
        if held_ttl <= 0:
            raise ValueError("held_ttl must be positive")
        self.max_conversations = max_conversations
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.max_held_total = max_held_total
        self.max_held_total_bytes = max_held_total_bytes
        self.max_conversations_per_address = max_conversations_per_address or max_conversations
        self.held_ttl = held_ttl
        self.clock = clock
        self._conversations: dict[str, _Conversation] = {}
        self._created_by: dict[str, int] = {}  # address -> live conversations it created
        self.held_total = 0
        self.held_total_bytes = 0

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

    async def admit(
        self, conversation_id: str, peer_id: str, *, resume: str = "", address: str = ""
    ) -> Refusal | None:
        return self._refusal(conversation_id, peer_id, resume, address)

    async def join(self, conversation_id: str, peer: Peer) -> bool:
        address = getattr(peer, "address", "")
        refusal = self._refusal(
            conversation_id, peer.peer_id, getattr(peer, "resume", ""), address
        )
        if refusal is not None:
            raise JoinRefused(refusal)
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            conversation = self._conversations[conversation_id] = _Conversation(
                conversation_id, address
            )
            self._created_by[address] = self._created_by.get(address, 0) + 1
        old = conversation.peers.get(peer.peer_id)
        replaced = old is not None and old is not peer
        peer.credential = old.credential if replaced and old is not None else new_credential()
        conversation.peers[peer.peer_id] = peer
        others = [p for pid, p in conversation.peers.items() if pid != peer.peer_id]

        ok = peer.presence(PRESENT if others else ABSENT)
        if replaced:
            assert old is not None
            carried = old.take_undelivered()
            old.supersede()
            if carried:
                ok = peer.deliver(carried, bounded=False) and ok
        self._expire(conversation, self.clock())
        held = [h for h in conversation.held if h.sender_id != peer.peer_id]
        if held:
            kept = deque(h for h in conversation.held if h.sender_id == peer.peer_id)
            self._unhold(conversation, held)
            conversation.held = kept
            ok = peer.deliver([h.signal for h in held], bounded=False) and ok
        if not ok:  # cannot happen with a fresh queue, but never leave it half-served
            self._evict(conversation, peer, "its outgoing queue is full")
            return replaced
        for other in others:
            if conversation.peers.get(other.peer_id) is other and not other.presence(JOINED):
                self._evict(conversation, other, "its outgoing queue is full")
        return replaced

    async def leave(self, conversation_id: str, peer: Peer) -> None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.peers.get(peer.peer_id) is not peer:
            return
        self._remove(conversation, peer)

    def relay_now(self, conversation_id: str, sender: Peer, signals: list[Signal]) -> bool:
        """:meth:`relay` in its common case, without a coroutine or a result object: True when
        the sender is current and the first other peer took ``signals``; False when nothing
        was done (``deliver`` refuses without side effects), and :meth:`relay` decides
        (superseded, evicting a peer that cannot keep up, holding)."""
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            return False
        peers = conversation.peers
        me = sender.peer_id
        if peers.get(me) is not sender:
            return False
        for peer_id, peer in peers.items():
            if peer_id != me:
                return peer.deliver(signals)
        return False

    async def relay(
        self, conversation_id: str, sender: Peer, signals: list[Signal]
    ) -> RelayResult:
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.peers.get(sender.peer_id) is not sender:
            return RelayResult(superseded=True)
        result = RelayResult()
        recipients = [p for pid, p in conversation.peers.items() if pid != sender.peer_id]
        for recipient in recipients:
            if recipient.deliver(signals):
                return result
            # A recipient that cannot keep up is dropped (it reconnects and the sender
            # resends when told it joined); meanwhile its signals are held.
            self._evict(conversation, recipient, "its outgoing queue is full")
        if conversation.peers.get(sender.peer_id) is not sender:
            # Telling the sender that the recipient left overflowed its own queue.
            return RelayResult(superseded=True)
        now = self.clock()
        self._expire(conversation, now)
        for signal in signals:
            key = _held_key(sender.peer_id, signal)
            if key is not None and key in conversation.held_keys:
                continue  # a resend of a signal already held
            size = len(json.dumps(signal, separators=(",", ":")))
            full = self._held_full(conversation, size)
            if full is not None:
                result.rejected.append(
                    (
                        signal,
                        f"the relay's queue for this conversation is full ({full}); "
                        f"signal not relayed, retry when the peer joins",
                    )
                )
                continue
            conversation.held.append(_Held(sender.peer_id, signal, key, size, now))
            conversation.held_bytes += size
            self.held_total += 1
            self.held_total_bytes += size
            if key is not None:
                conversation.held_keys.add(key)
        return result

    async def forward(
        self, conversation_id: str, sender: Peer, to: str, message: dict[str, Any]
    ) -> bool:
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.peers.get(sender.peer_id) is not sender:
            return False
        target = conversation.peers.get(to)
        if target is None or target is sender:
            return False
        if not target.forward(message):
            self._evict(conversation, target, "its outgoing queue is full")
            return False
        return True

    async def expire(self) -> int:
        now = self.clock()
        return sum(self._expire(c, now) for c in list(self._conversations.values()))

    async def close(self) -> None:
        self._conversations.clear()
        self._created_by.clear()
        self.held_total = self.held_total_bytes = 0

    # -- internals ---------------------------------------------------------------------

    def _held_full(self, conversation: _Conversation, size: int) -> str | None:
        if len(conversation.held) >= self.max_held:
            return f"{self.max_held} signals waiting for the other peer"
        if conversation.held_bytes + size > self.max_held_bytes:
            return f"{self.max_held_bytes} bytes waiting for the other peer"
        if self.held_total >= self.max_held_total:
            return f"the relay holds {self.max_held_total} signals in total"
        if self.held_total_bytes + size > self.max_held_total_bytes:
            return f"the relay holds {self.max_held_total_bytes} bytes in total"
        return None

    def _unhold(self, conversation: _Conversation, gone: list[_Held]) -> None:
        for h in gone:
            if h.key is not None:
                conversation.held_keys.discard(h.key)
            conversation.held_bytes -= h.size
            self.held_total -= 1
            self.held_total_bytes -= h.size

    def _expire(self, conversation: _Conversation, now: float) -> int:
        """Drop this conversation's held signals older than ``held_ttl`` (oldest first)."""
        old: list[_Held] = []
        while conversation.held and now - conversation.held[0].at >= self.held_ttl:
            old.append(conversation.held.popleft())
        if old:
            self._unhold(conversation, old)
            log.debug(
                "conversation %s: dropped %d held signal(s) older than %gs "
                "(their senders resend them when the peer joins)",
                conversation.conversation_id,
                len(old),
                self.held_ttl,
            )
        return len(old)

    def _evict(self, conversation: _Conversation, peer: Peer, reason: str) -> None:
        if conversation.peers.get(peer.peer_id) is not peer:
            return
        log.warning(
            "conversation %s: dropping peer %r: %s",
            conversation.conversation_id,
            peer.peer_id,
            reason,
        )
        peer.evict(reason)
        self._remove(conversation, peer)

    def _remove(self, conversation: _Conversation, peer: Peer) -> None:
        del conversation.peers[peer.peer_id]
        if not conversation.peers:
            if conversation.held:
                log.debug(
                    "conversation %s: last peer left, dropping %d held signals "
                    "(their senders resend them)",
                    conversation.conversation_id,
                    len(conversation.held),
                )
                self._unhold(conversation, list(conversation.held))
                conversation.held.clear()
            if self._conversations.get(conversation.conversation_id) is conversation:
                del self._conversations[conversation.conversation_id]
                count = self._created_by.get(conversation.creator, 0) - 1
                if count > 0:
                    self._created_by[conversation.creator] = count
                else:
                    self._created_by.pop(conversation.creator, None)
            return
        for other in list(conversation.peers.values()):
            if conversation.peers.get(other.peer_id) is other and not other.presence(LEFT):
                self._evict(conversation, other, "its outgoing queue is full")

    def _refusal(
        self, conversation_id: str, peer_id: str, resume: str = "", address: str = ""
    ) -> Refusal | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            if len(self._conversations) >= self.max_conversations:
                return Refusal(
                    503,
                    f"the relay is full: {self.max_conversations} conversations "
                    f"are open; try again later",
                    retry_after=10.0,
                )
            if self._created_by.get(address, 0) >= self.max_conversations_per_address:
                return Refusal(
                    429,
                    f"too many conversations from your address "
                    f"({self.max_conversations_per_address} open); close some first",
                    retry_after=10.0,
                )
            return None
        current = conversation.peers.get(peer_id)
        if current is not None:
            if resume and hmac.compare_digest(resume.encode(), current.credential.encode()):
                return None
            return Refusal(
                409,
                f"peer id {peer_id!r} is already connected to conversation "
                f"{conversation_id!r}; only the holder of its resume credential can "
                f"replace that connection",
            )
        if len(conversation.peers) >= MAX_PEERS:
            return Refusal(
                409,
                f"conversation {conversation_id!r} already has {MAX_PEERS} peers; "
                f"a third peer cannot join",
            )
        return None
