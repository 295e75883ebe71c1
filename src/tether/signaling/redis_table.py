"""A :class:`~tether.signaling.conversations.ConversationTable` in Redis, shared by relays.

Any number of relay processes (``tether serve --redis redis://HOST:PORT/DB``) serve one set of
conversations: the two peers of a conversation may sit on different relays. Membership,
credentials (as SHA-1 digests), held signals and the conversation counts live in Redis (see
:mod:`tether.signaling.redis_scripts` for the keys); every change is one Lua script, so the
rules of ``conversations.py`` hold across relays exactly as in one process.

Signals to a peer on another relay go through **pub/sub**, one channel per relay process, not
streams. Why: delivery is already end to end (a sender keeps every signal until the other
peer's client acknowledges it and resends after reconnects, on ``joined`` and on a backstop
timer), so the relay needs a fast, ordered pipe, not a durable log. Pub/sub is one PUBLISH per
frame from inside the relaying script (no extra round trip, no consumer groups, no trimming,
nothing left behind by a dead relay), and it keeps the order of one publisher connection.
What pub/sub can lose (a relay that dies or a subscriber that reconnects) the clients'
resend recovers; streams would buy durability the protocol does not need at the price of
trimming and acknowledging a log per relay.

Liveness: each relay refreshes ``node:ID`` (expiring after ``node_ttl``). A relay whose key
expired is dead: its peer entries no longer count, and the other relays' reaper removes them
and tells the peers left behind (``left``); those peers reconnect to another relay and join
again. A relay that finds its own key gone (Redis restarted, or it stalled past the TTL)
drops its connections so that their clients join again and rebuild the state. While Redis is
unreachable the relay refuses joins (503 with a clear reason and Retry-After) and refuses
signals with ``retry`` (the sender keeps them); it recovers by itself.

Limits: conversations in total and per creating address, peers per conversation and held
signals per conversation (count, bytes, TTL) hold across relays (they are in Redis).
Connections, join and auth rates are per process (they protect the process; put the relays
behind a load balancer that hashes client addresses to make the per-address ones global).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from tether.signals import Signal

from . import redis_scripts
from .frames import text_of
from .redis_subscriber import subscribe
from .conversations import (
    ABSENT,
    JOINED,
    LEFT,
    PRESENT,
    JoinRefused,
    Peer,
    Refusal,
    RelayResult,
    new_credential,
)

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_AFTER = 2.0
PENDING_LIMIT = 1024
REDIS_CONNECTIONS = 32
BATCHED = frozenset({"RELAY", "FORWARD"})
"""Scripts sent in pipelined batches (the per-signal ones)."""
BATCH_MAX = 512
POOL_WAIT = 10.0
"""Seconds a script may wait for a free connection (under load) before it counts as down."""
"""Connections to Redis per relay process (scripts in flight at once, plus pub/sub)."""
PENDING_LEAVES = 10_000
"""Leaves that could not be recorded while Redis was away, retried when it is back."""
"""Pub/sub messages buffered for a connection whose join is still being answered."""


class StoreUnavailable(Exception):
    """Redis could not be reached (the message says why)."""


def _digest(credential: str) -> str:
    return hashlib.sha1(credential.encode()).hexdigest() if credential else ""


def _held_key(sender_id: str, signal: Signal) -> str:
    session, seq = signal.get("session"), signal.get("seq")
    if isinstance(session, str) and isinstance(seq, int) and not isinstance(seq, bool):
        return f"{sender_id}\n{session}\n{seq}"
    return ""


class _Local:
    """A connection of this relay as the table knows it."""

    __slots__ = ("peer", "conversation_id", "conn", "ready", "pending")

    def __init__(self, peer: Peer, conversation_id: str, conn: str) -> None:
        self.peer = peer
        self.conversation_id = conversation_id
        self.conn = conn
        self.ready = False
        self.pending: list[tuple[str, str]] = []


class RedisConversationTable:
    """Conversations in Redis; ``await start()`` before use, ``await close()`` after.

    ``observe_redis(seconds)`` and ``observe_delivery(seconds)`` (optional callables) receive
    Redis round trips and relay-to-relay delivery times, for metrics.
    """

    def __init__(
        self,
        url: str,
        *,
        max_conversations: int = 10_000,
        max_held: int = 256,
        max_held_bytes: int = 1024 * 1024,
        max_conversations_per_address: int | None = None,
        held_ttl: float = 600.0,
        prefix: str = "tether:",
        node_ttl: float = 6.0,
        heartbeat: float = 1.0,
        socket_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        observe_redis: Callable[[float], None] | None = None,
        observe_delivery: Callable[[float], None] | None = None,
    ) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"not a Redis URL: {url!r}; expected redis://HOST:PORT/DB "
                f"(or rediss:// for TLS, unix:///path/to/socket)"
            )
        if max_conversations < 1 or max_held < 1 or max_held_bytes < 1 or held_ttl <= 0:
            raise ValueError("limits must be positive")
        if heartbeat <= 0 or node_ttl <= 2 * heartbeat:
            raise ValueError("need 0 < 2 * heartbeat < node_ttl")
        self.url = url
        self.max_conversations = max_conversations
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.max_conversations_per_address = max_conversations_per_address or max_conversations
        self.held_ttl = held_ttl
        self.prefix = prefix
        self.node_ttl = node_ttl
        self.heartbeat = heartbeat
        self.clock = clock
        self.node = secrets.token_hex(8)
        self.socket_timeout = socket_timeout
        self.observe_redis = observe_redis
        self.observe_delivery = observe_delivery
        # A blocking pool: a burst of relays waits (up to socket_timeout) for one of its
        # connections rather than failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            max_connections=REDIS_CONNECTIONS,
            timeout=POOL_WAIT,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._scripts = {
            name: self._redis.register_script(getattr(redis_scripts, name))
            for name in ("JOIN", "LEAVE", "RELAY", "HOLD", "FORWARD", "REAP")
        }
        self._local: dict[str, _Local] = {}  # conn id -> connection
        self._conn_of: dict[int, str] = {}  # id(peer) -> conn id
        self._conversations: dict[str, int] = {}  # local connections per conversation
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = False
        self._subscribed = False
        self._last_ok = 0.0
        self.problem = "not started"
        """Why the table is not ready ("" when it is)."""
        self._closed = False
        self._failed = False
        self._pending_leaves: deque[tuple[str, str, str]] = deque(maxlen=PENDING_LEAVES)
        self._batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._batch_ready = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start heartbeat, subscriber and reaper; waits until Redis answered once (or 10 s)."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._batch_loop(), name="relay-redis-batches"),
            asyncio.create_task(self._heartbeat_loop(), name="relay-redis-heartbeat"),
            asyncio.create_task(self._subscriber_loop(), name="relay-redis-subscriber"),
        ]
        deadline = time.monotonic() + 10.0
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self.ready:
            log.warning("relay: Redis at %s not ready yet: %s", self._where(), self.problem)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        # Leave politely: forget this relay's peers now rather than after node_ttl.
        try:
            await self._redis.delete(self._key("node:" + self.node))
            await self._scripts["REAP"](args=[self.prefix, self.node])
        except (RedisError, OSError) as exc:
            log.debug("relay: could not clean up in Redis on close: %s", exc)
        self._local.clear()
        self._conn_of.clear()
        self._conversations.clear()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    @property
    def ready(self) -> bool:
        return (
            not self._closed
            and self._registered
            and self._subscribed
            and time.monotonic() - self._last_ok < self.node_ttl
        )

    def __len__(self) -> int:
        """Conversations this relay has connections in (the cluster total is in Redis)."""
        return len(self._conversations)

    async def total_conversations(self) -> int:
        return int(await self._redis.scard(self._key("convs")))

    # -- interface -----------------------------------------------------------------------

    async def admit(
        self, conversation_id: str, peer_id: str, *, resume: str = "", address: str = ""
    ) -> Refusal | None:
        try:
            self._check_ready()
            reply = await self._call(
                "JOIN",
                conversation_id, peer_id, "", self.node, "", _digest(resume), address,
                self.max_conversations, self.max_conversations_per_address,
                self._now_ms(), int(self.held_ttl * 1000), "1",
            )
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        return self._refusal(reply, conversation_id, peer_id)

    async def join(self, conversation_id: str, peer: Peer) -> bool:
        conn = secrets.token_hex(6)
        local = _Local(peer, conversation_id, conn)
        # Registered before the script runs: a signal published right after it must wait
        # in ``pending`` rather than find no connection.
        self._local[conn] = local
        self._conn_of[id(peer)] = conn
        credential = new_credential()
        try:
            self._check_ready()
            reply = await self._call(
                "JOIN",
                conversation_id, peer.peer_id, conn, self.node, _digest(credential),
                _digest(peer.resume), peer.address,
                self.max_conversations, self.max_conversations_per_address,
                self._now_ms(), int(self.held_ttl * 1000), "0",
            )
        except StoreUnavailable as exc:
            self._forget(conn, peer)
            raise JoinRefused(self._unavailable(exc)) from None
        except BaseException:
            self._forget(conn, peer)
            raise
        refusal = self._refusal(reply, conversation_id, peer.peer_id)
        if refusal is not None:
            self._forget(conn, peer)
            raise JoinRefused(refusal)
        present, replaced = reply[1] == "1", reply[2] == "1"
        peer.credential = peer.resume if replaced else credential
        self._conversations[conversation_id] = self._conversations.get(conversation_id, 0) + 1
        ok = peer.presence(PRESENT if present else ABSENT)
        held = [json.loads(text) for text in reply[3:]]
        if held:
            ok = peer.deliver(held, bounded=False) and ok
        local.ready = True
        pending, local.pending = local.pending, []
        for kind, rest in pending:
            self._dispatch(local, kind, rest)
        if not ok:
            await self._evict(local, "its outgoing queue is full")
        return replaced

    async def leave(self, conversation_id: str, peer: Peer) -> None:
        conn = self._conn_of.get(id(peer))
        local = self._local.get(conn) if conn else None
        if local is None or local.peer is not peer:
            return
        self._forget(conn, peer)
        try:
            await self._call("LEAVE", conversation_id, peer.peer_id, conn, self.node)
        except StoreUnavailable as exc:
            # Retried by the heartbeat once Redis answers again (bounded: past that, a stale
            # entry waits for its peer's reconnect or this relay's restart).
            log.info("relay: could not record yet that peer %r left: %s", peer.peer_id, exc)
            self._pending_leaves.append((conversation_id, peer.peer_id, conn))

    async def relay(
        self, conversation_id: str, sender: Peer, signals: list[Signal]
    ) -> RelayResult:
        conn = self._conn_of.get(id(sender))
        if conn is None or conn not in self._local:
            return RelayResult(superseded=True)
        stamp = f"{self.clock():.6f}"
        payload = "[" + ",".join(map(text_of, signals)) + "]"
        try:
            sent = await self._call("RELAY", conversation_id, sender.peer_id, conn, stamp,
                                    payload)
            if sent == -1:
                return RelayResult(superseded=True)
            if sent > 0:
                return RelayResult()
            return await self._hold(conversation_id, sender, conn, signals, stamp, payload)
        except StoreUnavailable as exc:
            reason = f"the relay cannot reach its store ({exc}); signal not relayed, retry later"
            return RelayResult(rejected=[(s, reason) for s in signals])

    async def forward(
        self, conversation_id: str, sender: Peer, to: str, message: dict[str, Any]
    ) -> bool:
        conn = self._conn_of.get(id(sender))
        if conn is None:
            return False
        try:
            return bool(
                await self._call(
                    "FORWARD", conversation_id, sender.peer_id, conn, to,
                    text_of(message),
                )
            )
        except StoreUnavailable:
            return False  # the sender resends; the receiver acknowledges the duplicate

    async def expire(self) -> int:
        """Held signals expire in Redis (PEXPIRE, and their age is checked at hand-over)."""
        return 0

    # -- internals -----------------------------------------------------------------------

    async def _hold(
        self, conversation_id: str, sender: Peer, conn: str, signals: list[Signal],
        stamp: str, payload: str,
    ) -> RelayResult:
        now = self._now_ms()
        args: list[Any] = [
            conversation_id, sender.peer_id, conn, stamp, payload, now,
            int(self.held_ttl * 1000), self.max_held, self.max_held_bytes,
        ]
        for signal in signals:
            text = text_of(signal)
            key = _held_key(sender.peer_id, signal)
            entry = json.dumps([sender.peer_id, now, len(text), key, text], separators=(",", ":"))
            args.extend((key, len(text), entry))
        reply = await self._call("HOLD", *args)
        if reply == -1:
            return RelayResult(superseded=True)
        result = RelayResult()
        if isinstance(reply, list):
            for index, why in reply:
                full = (
                    f"{self.max_held} signals waiting for the other peer"
                    if why == "count"
                    else f"{self.max_held_bytes} bytes waiting for the other peer"
                )
                result.rejected.append(
                    (
                        signals[int(index)],
                        f"the relay's queue for this conversation is full ({full}); "
                        f"signal not relayed, retry when the peer joins",
                    )
                )
        return result

    async def _call(self, script: str, *args: Any) -> Any:
        if script in BATCHED:
            # Hot path: every relay/forward made while a batch is on its way goes out in the
            # next one, as one pipeline (one round trip for many signals).
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._batch.append((script, args, future))
            self._batch_ready.set()
            return await future
        started = time.perf_counter()
        try:
            reply = await self._scripts[script](args=[self.prefix, *args])
        except (RedisError, OSError) as exc:
            self._note_failure(exc)
            raise StoreUnavailable(self._describe(exc)) from None
        if self.observe_redis is not None:
            self.observe_redis(time.perf_counter() - started)
        return reply

    async def _batch_loop(self) -> None:
        while True:
            await self._batch_ready.wait()
            self._batch_ready.clear()
            while self._batch:
                batch, self._batch = self._batch[:BATCH_MAX], self._batch[BATCH_MAX:]
                await self._send_batch(batch)

    async def _send_batch(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]
                          ) -> None:
        started = time.perf_counter()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for script, args, _ in batch:
                    pipe.evalsha(self._scripts[script].sha, 0, self.prefix, *args)
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._note_failure(exc)
            problem = StoreUnavailable(self._describe(exc))
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(problem)
            return
        except BaseException:
            for _, _, future in batch:
                if not future.done():
                    future.cancel()
            raise
        if self.observe_redis is not None:
            self.observe_redis(time.perf_counter() - started)
        for (script, args, future), reply in zip(batch, replies):
            if isinstance(reply, NoScriptError):  # Redis restarted: load it, run it again
                try:
                    reply = await self._scripts[script](args=[self.prefix, *args])
                except (RedisError, OSError) as exc:
                    reply = StoreUnavailable(self._describe(exc))
            elif isinstance(reply, Exception):
                reply = StoreUnavailable(self._describe(reply))
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _check_ready(self) -> None:
        if not self.ready:
            raise StoreUnavailable(self.problem or "Redis is not reachable")

    def _unavailable(self, exc: StoreUnavailable) -> Refusal:
        return Refusal(
            503,
            f"the relay cannot reach its conversation store (Redis at {self._where()}): "
            f"{exc}; try again shortly or use another relay",
            retry_after=UNAVAILABLE_RETRY_AFTER,
        )

    def _refusal(self, reply: Any, conversation_id: str, peer_id: str) -> Refusal | None:
        status = reply[0]
        if status == "ok":
            return None
        if status == "full":
            return Refusal(
                503,
                f"the relays are full: {self.max_conversations} conversations are open; "
                f"try again later",
                retry_after=10.0,
            )
        if status == "address":
            return Refusal(
                429,
                f"too many conversations from your address "
                f"({self.max_conversations_per_address} open); close some first",
                retry_after=10.0,
            )
        if status == "taken":
            return Refusal(
                409,
                f"peer id {peer_id!r} is already connected to conversation "
                f"{conversation_id!r}; only the holder of its resume credential can "
                f"replace that connection",
            )
        return Refusal(
            409,
            f"conversation {conversation_id!r} already has 2 peers; a third peer cannot join",
        )

    def _forget(self, conn: str | None, peer: Peer) -> None:
        if conn is None:
            return
        local = self._local.pop(conn, None)
        if self._conn_of.get(id(peer)) == conn:
            del self._conn_of[id(peer)]
        if local is not None and local.ready:
            left = self._conversations.get(local.conversation_id, 0) - 1
            if left > 0:
                self._conversations[local.conversation_id] = left
            else:
                self._conversations.pop(local.conversation_id, None)

    async def _evict(self, local: _Local, reason: str) -> None:
        if self._local.get(local.conn) is not local:
            return
        log.warning(
            "conversation %s: dropping peer %r: %s",
            local.conversation_id,
            local.peer.peer_id,
            reason,
        )
        local.peer.evict(reason)
        await self.leave(local.conversation_id, local.peer)

    def _evict_soon(self, local: _Local, reason: str) -> None:
        # Called from the subscriber: evict now (synchronously), record the leave later.
        if self._local.get(local.conn) is not local:
            return
        log.warning(
            "conversation %s: dropping peer %r: %s",
            local.conversation_id,
            local.peer.peer_id,
            reason,
        )
        local.peer.evict(reason)
        # The server's handler for that connection calls leave() when its reader ends.

    def _on_message(self, data: str) -> None:
        try:
            kind, _cid, _peer, conn, rest = data.split("\n", 4)
        except ValueError:
            log.warning("relay: malformed message on the Redis channel: %.80r", data)
            return
        local = self._local.get(conn)
        if local is None:
            return  # that connection is gone: the sender resends when told
        if not local.ready:
            if len(local.pending) < PENDING_LIMIT:
                local.pending.append((kind, rest))
            return
        self._dispatch(local, kind, rest)

    def _dispatch(self, local: _Local, kind: str, rest: str) -> None:
        peer = local.peer
        if kind == "S":
            stamp, _, payload = rest.partition("\n")
            if not peer.deliver(json.loads(payload)):
                self._evict_soon(local, "its outgoing queue is full")
                return
            if self.observe_delivery is not None:
                try:
                    self.observe_delivery(max(0.0, self.clock() - float(stamp)))
                except ValueError:
                    pass
        elif kind == "F":
            if not peer.forward(json.loads(rest)):
                self._evict_soon(local, "its outgoing queue is full")
        elif kind == "P":
            if rest not in (JOINED, LEFT):
                return
            if not peer.presence(rest):
                self._evict_soon(local, "its outgoing queue is full")
        elif kind == "X":
            # A newer connection of this peer (on this or another relay) took over: move what
            # is still queued here to it, then close this one.
            new_node, _, new_conn = rest.partition("\n")
            carried = peer.take_undelivered()
            self._forget(local.conn, peer)
            peer.supersede()
            if carried:
                target = self._local.get(new_conn) if new_node == self.node else None
                if target is not None and target.ready:
                    target.peer.deliver(carried, bounded=False)
                # else: lost here; the other peer resends on ``joined``

    async def _heartbeat_loop(self) -> None:
        node_key = self._key("node:" + self.node)
        ttl_ms = int(self.node_ttl * 1000)
        beats = 0
        while True:
            try:
                started = time.perf_counter()
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(node_key, "1", px=ttl_ms, get=True)
                    pipe.sadd(self._key("nodes"), self.node)
                    previous, _ = await pipe.execute()
                if self.observe_redis is not None:
                    self.observe_redis(time.perf_counter() - started)
                if previous is None and self._registered:
                    self._pending_leaves.clear()  # nothing left to leave
                    self._lost_state("its Redis heartbeat had expired (Redis restarted, or "
                                     "this relay stalled)")
                self._registered = True
                self._last_ok = time.monotonic()
                if self.problem and self._subscribed and self._failed:
                    log.warning("relay: Redis at %s is reachable again", self._where())
                    self._failed = False
                self.problem = "" if self._subscribed else "not subscribed yet"
                beats += 1
                while self._pending_leaves:
                    cid, peer_id, conn = self._pending_leaves[0]
                    await self._scripts["LEAVE"](args=[self.prefix, cid, peer_id, conn,
                                                       self.node])
                    self._pending_leaves.popleft()
                if beats % 3 == 1:
                    await self._reap()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._note_failure(exc)
            await asyncio.sleep(self.heartbeat)

    async def _reap(self) -> None:
        nodes = await self._redis.smembers(self._key("nodes"))
        for node in nodes:
            if node == self.node:
                continue
            if not await self._redis.exists(self._key("node:" + node)):
                owned = await self._scripts["REAP"](args=[self.prefix, node])
                if owned:
                    log.info("relay: relay %s is gone; forgot its %d peer(s)", node, owned)

    async def _subscriber_loop(self) -> None:
        channel = self._key("ch:" + self.node)
        delay = 0.1
        kwargs = self._redis.connection_pool.connection_kwargs
        lean = self.url.startswith("redis://") and "host" in kwargs
        while True:
            if lean:
                try:
                    await self._lean_subscription(channel, kwargs)
                except asyncio.CancelledError:
                    raise
                except (OSError, TimeoutError) as exc:
                    self._note_failure(exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self._subscribed = True
                delay = 0.1
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message.get("type") == "message":
                        try:
                            self._on_message(message["data"])
                        except Exception:
                            log.exception("relay: failed to handle a message from Redis")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                was = self._subscribed
                self._subscribed = False
                self._note_failure(exc)
                if was:
                    # Messages published meanwhile are lost; the connections stay (their
                    # clients resend what is not acknowledged).
                    log.warning("relay: lost the Redis subscription: %s", self._describe(exc))
            finally:
                self._subscribed = False
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _lean_subscription(self, channel: str, kwargs: dict[str, Any]) -> None:
        """Subscribe with :mod:`redis_subscriber` and stay until the connection ends."""
        protocol = await subscribe(
            kwargs["host"], int(kwargs.get("port") or 6379), channel, self._on_message,
            username=kwargs.get("username"), password=kwargs.get("password"),
            timeout=self.socket_timeout,
        )
        self._subscribed = True
        try:
            why = await protocol.lost
        finally:
            self._subscribed = False
            if protocol.transport is not None:
                protocol.transport.abort()
        log.warning("relay: lost the Redis subscription: %s", why)
        raise ConnectionError(why)

    def _lost_state(self, why: str) -> None:
        """Redis forgot this relay: drop every connection so its client joins again."""
        locals_ = list(self._local.values())
        if locals_:
            log.warning("relay: %s; dropping %d connection(s) so they join again", why,
                        len(locals_))
        for local in locals_:
            self._forget(local.conn, local.peer)
            local.peer.evict("the relay's conversation store lost its state; join again")

    def _note_failure(self, exc: BaseException) -> None:
        """One WARNING when Redis becomes unreachable (and one when it is back), not one
        per failed call."""
        problem = self._describe(exc)
        if not self._failed:
            log.warning("relay: Redis at %s: %s; refusing joins until it is back",
                        self._where(), problem)
        else:
            log.debug("relay: Redis at %s: %s", self._where(), problem)
        self._failed = True
        self.problem = problem

    @staticmethod
    def _describe(exc: BaseException) -> str:
        text = str(exc).strip().rstrip(".") or type(exc).__name__
        return text[:200]

    @property
    def where(self) -> str:
        """HOST:PORT/DB (or the socket path) of the Redis in use, for messages."""
        return self._where()

    def _where(self) -> str:
        pool = self._redis.connection_pool.connection_kwargs
        if "path" in pool:
            return str(pool["path"])
        return f"{pool.get('host', '?')}:{pool.get('port', '?')}/{pool.get('db', 0)}"

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)
