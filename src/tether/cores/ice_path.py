"""ICE restart and dead-path detection for aiortc, under DTLS and SCTP that stay up.

aiortc ignores new ICE credentials in a re-offer and lets aioice's consent check close the
whole connection about 30 s after a path dies. tether lifts both limits here. An IcePath
takes over the send and receive functions of one RTCIceTransport; behind them sits the
current ICE *generation* (an aioice Connection). An ICE restart builds a new generation
with fresh credentials, gathers, runs its checks and, once it has a nominated pair, becomes
current: DTLS records simply start flowing over the new pair, and no SCTP message is lost.

Liveness replaces aioice's consent check. The timing lives in PathClock (pure, tested with
an injected clock); IcePath is the I/O around it: every datagram that arrives on the
current generation from the far end of its nominated pair is proof of life, STUN probes
go out when the clock asks (answers measure the round trip), 'disconnected' is reported
when the clock declares the path silent for too long and 'connected' as soon as anything
is heard again. A busy path (SCTP
waiting for acknowledgements) is declared dead within ``busy_silence`` (1.5 s by default),
an idle one within about ``misses`` probe intervals; both windows widen with the measured
round trip, so a slow path that works is never declared dead. Nothing is ever closed on
the app's behalf: deciding to restart is the connection manager's job.

When a new generation becomes current, or the old path answers again after an outage,
``on_resume`` runs at once, so the core can resend what SCTP had in flight instead of
waiting for its retransmission timer.

Received datagrams reach DTLS through a bounded queue its receive task reads. With the
``batch_sends`` speed patch, the DTLS datagrams a plain UDP socket sends in one loop turn
leave together at the end of the turn (udp_batch.py; GSO on Linux), below the liveness
accounting and fault injection here; STUN sent on the socket flushes them first.

``cut()`` is a fault-injection hook: it black-holes the current generation's sockets in
both directions inside this process, as a cut cable would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aioice
from aioice import Candidate, stun

from . import gathering, udp_batch

logger = logging.getLogger(__name__)

COMPONENT = 1
MAX_PROBES_IN_FLIGHT = 16
RECEIVE_QUEUE_LIMIT = 8192
RETIRED_UFRAGS = 32
MIN_WAKE = 0.005
CLOSE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Verdict:
    """What PathClock.poll decided: the path's health, whether to probe now, when to ask again."""

    alive: bool
    probe: bool
    wake_at: float


class PathClock:
    """When to probe a path and when it is dead, from what it sent and heard.

    Pure: callers feed events with the current time and poll; nothing here sleeps or does
    I/O. Anything heard proves the path. Dead means silence, measured as elapsed time
    against a window (never by counting misses, so no order of events can skip a verdict):

    - busy (SCTP has unacknowledged data): a working path answers within a round trip,
      so silence of ``max(busy_silence, probe_after + 3 rtt)`` since the later of the last
      datagram heard and the start of the wait is death; probes go out after
      ``probe_after = max(probe_floor, 1.5 rtt)`` of that silence, then every round trip.
    - idle: death after ``misses * interval + rtt`` of silence.
    - always: a probe at least every ``interval``, which keeps the round trip measured.

    ``rtt`` is an upper estimate (smoothed STUN round trip + 4 deviations, or the latest
    sample if larger; ``initial_rtt`` until the first answer), so slow paths get wider
    windows. A dead path keeps being probed (every round trip, at least ``probe_floor``,
    at most ``interval`` apart) and is alive again the moment anything is heard.
    """

    def __init__(
        self,
        now: float,
        *,
        interval: float = 1.0,
        misses: int = 3,
        busy_silence: float = 1.5,
        probe_floor: float = 0.2,
        initial_rtt: float = 0.5,
    ) -> None:
        for label, value in (("interval", interval), ("misses", misses),
                             ("busy_silence", busy_silence), ("probe_floor", probe_floor),
                             ("initial_rtt", initial_rtt)):
            if not value > 0:
                raise ValueError(f"liveness {label} must be positive, not {value!r}")
        self.interval = float(interval)
        self.misses = misses
        self.busy_silence = float(busy_silence)
        self.probe_floor = float(probe_floor)
        self.initial_rtt = float(initial_rtt)
        self.restart(now)

    def restart(self, now: float) -> None:
        """A new path: alive, nothing measured yet, silence counted from ``now``."""
        self.alive = True
        self.heard = now
        self._busy_since: float | None = None
        self._last_probe = -math.inf
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._last_rtt = 0.0
        self._stray_since: float | None = None

    # -- events ---------------------------------------------------------------------------

    def sent(self, now: float, busy: bool) -> bool:
        """Something went out; ``busy``: SCTP now waits for an acknowledgement.
        True when that starts a wait, which may bring the verdict forward: poll now."""
        return self._set_busy(now, busy)

    def received(self, now: float) -> bool:
        """A datagram arrived on the path. True when that revives a path declared dead."""
        self.heard = max(self.heard, now)
        if self.alive:
            return False
        self.alive = True
        return True

    def stray(self, now: float) -> bool:
        """A datagram arrived from an address other than the pair's far end.

        The peer's packets still come, but from elsewhere: a NAT gave it a new port, so
        ours go to a mapping that no longer exists. That is a wait like a busy one: if
        the far end stays silent for ``stray_window``, the path is dead, even when our own
        side has nothing to send. True when that brings the verdict forward: poll now.
        """
        if self._stray_since is None or self._stray_since < self.heard:
            self._stray_since = now
            return True
        return False

    def probe_answered(self, now: float, rtt: float) -> bool:
        """A probe's answer arrived after ``rtt`` seconds (RFC 6298 smoothing)."""
        rtt = max(rtt, 0.0)
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._last_rtt = rtt
        return self.received(now)

    def poll(self, now: float, busy: bool) -> Verdict:
        """Decide: is the path alive, should a probe go out now (it is then counted as
        sent), and when to poll again at the latest."""
        self._set_busy(now, busy)
        if self.alive and now >= self.deadline():
            self.alive = False
        probe = now >= self._next_probe()
        if probe:
            self._last_probe = now
        wake = self._next_probe()
        if self.alive:
            wake = min(wake, self.deadline())
        return Verdict(alive=self.alive, probe=probe, wake_at=wake)

    # -- derived timing -------------------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """The smoothed probe round trip, None before the first answer."""
        return self._srtt

    def rtt_bound(self) -> float:
        """A round trip the path should not exceed while it works."""
        if self._srtt is None:
            return self.initial_rtt
        return max(self._srtt + 4 * self._rttvar, self._last_rtt)

    def probe_timeout(self) -> float:
        """How long a probe's answer is still worth waiting for (to measure slow paths)."""
        return max(1.0, 3 * self.rtt_bound())

    def probe_after(self) -> float:
        return max(self.probe_floor, 1.5 * self.rtt_bound())

    def busy_window(self) -> float:
        return max(self.busy_silence, self.probe_after() + 3 * self.rtt_bound())

    def idle_window(self) -> float:
        return self.misses * self.interval + self.rtt_bound()

    def deadline(self) -> float:
        """When the path is declared dead if nothing is heard before."""
        deadline = self.heard + self.idle_window()
        if self._busy_since is not None:
            start = max(self.heard, self._busy_since)
            deadline = min(deadline, start + self.busy_window())
        if self._stray_since is not None and self._stray_since >= self.heard:
            deadline = min(deadline, self._stray_since + self.stray_window())
        return deadline

    def stray_window(self) -> float:
        """Silence of the far end, while the peer is heard from elsewhere, that is death.
        Shorter than the busy window: the strays already say the path moved; the probes
        sent meanwhile (every round trip) give the old path its chance to answer."""
        return max(self.busy_silence / 2, self.probe_after() + 3 * self.rtt_bound())

    def _next_probe(self) -> float:
        at = self._last_probe + self.interval  # keeps the round trip measured
        if not self.alive:  # notice the return soon
            return self._last_probe + min(self.interval, max(self.probe_floor, self.rtt_bound()))
        waits = [since for since in (self._busy_since, self._stray_since) if since is not None]
        if waits:
            start = max(self.heard, min(waits))
            gap = max(self.probe_floor, self.rtt_bound())
            at = min(at, max(start + self.probe_after(), self._last_probe + gap))
        if self._srtt is None:  # measure the round trip early
            at = min(at, self._last_probe + max(self.probe_floor, 2 * self.initial_rtt))
        return at

    def _set_busy(self, now: float, busy: bool) -> bool:
        if not busy:
            self._busy_since = None
            return False
        if self._busy_since is None:
            self._busy_since = now
            return True
        return False


class _Probe:
    """One liveness check in flight, registered as an aioice transaction so its answer
    reaches IcePath whatever the timeout aioice would have used."""

    __slots__ = ("path", "gen", "protocol", "transaction_id", "key", "sent_at")

    def __init__(self, path: IcePath, gen: aioice.Connection, protocol: Any,
                 transaction_id: bytes, key: bytes, sent_at: float) -> None:
        self.path = path
        self.gen = gen
        self.protocol = protocol
        self.transaction_id = transaction_id
        self.key = key
        self.sent_at = sent_at

    def response_received(self, message: stun.Message, addr: tuple[str, int]) -> None:
        if message.message_class != stun.Class.RESPONSE:
            return
        if not message.check_message_integrity(self.key):
            return
        self.path._probe_answered(self)

    def forget(self) -> None:
        self.protocol.transactions.pop(self.transaction_id, None)


class IcePath:
    """The replaceable ICE layer of one tube."""

    def __init__(
        self,
        name: str,
        ice_transport: object,
        on_state: Callable[[str], None],
        *,
        host_addresses: Sequence[str] | None = None,
        interval: float = 1.0,
        misses: int = 3,
        busy_silence: float = 1.5,
        generation_timeout: float = 10.0,
        busy: Callable[[], bool] | None = None,
        on_resume: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self._transport = ice_transport
        self._on_state = on_state
        self._host_addresses = host_addresses
        self.generation_timeout = generation_timeout
        self._loop = asyncio.get_running_loop()
        self.clock = PathClock(self._loop.time(), interval=interval, misses=misses,
                               busy_silence=busy_silence)
        self._busy = busy or (lambda: False)
        self._on_resume = on_resume
        self.current: aioice.Connection = ice_transport._connection  # type: ignore[attr-defined]
        self.pending: aioice.Connection | None = None
        self.generation = 1
        self.switched_at: float | None = None
        self.resumes = 0
        self.datagrams_dropped = 0
        self.retired_ufrags: collections.deque[str] = collections.deque(maxlen=RETIRED_UFRAGS)
        self._reported_alive = True
        self._first_remote_ufrag: str | None = None
        self._received: asyncio.Queue[bytes | None] = asyncio.Queue(RECEIVE_QUEUE_LIMIT)
        self._closed = False
        self._cut: aioice.Connection | None = None
        self._probes: dict[bytes, _Probe] = {}
        self._kick = asyncio.Event()
        self._liveness: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._hook(self.current)
        ice_transport._recv = self.recv  # type: ignore[attr-defined]
        ice_transport._send = self.send  # type: ignore[attr-defined]
        ice_transport._tether_path = self  # type: ignore[attr-defined]

    # -- the data path DTLS uses ---------------------------------------------------------

    async def recv(self) -> bytes:
        data = await self._received.get()
        if data is None:
            raise ConnectionError("ICE path closed")
        return data

    def recv_nowait(self) -> bytes | None:
        """The next queued datagram without waiting (None: none is queued)."""
        try:
            data = self._received.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if data is None:
            raise ConnectionError("ICE path closed")
        return data

    def deliver(self, data: bytes) -> None:
        """Queue a datagram for DTLS's receive loop (dropped, and counted, when it is full)."""
        try:
            self._received.put_nowait(data)
        except asyncio.QueueFull:  # DTLS is behind: lost like an overflowing socket
            self.datagrams_dropped += 1

    async def send(self, data: bytes) -> None:
        if self._liveness is not None and self.clock.sent(self._loop.time(), self._busy()):
            self._kick.set()
        pair = self.current._nominated.get(COMPONENT)
        if pair is not None:
            await pair.protocol.send_data(data, pair.remote_addr)
        # No pair: the datagram is lost like any on a dead path; SCTP retransmits it.

    def send_now(self, data: bytes) -> bool:
        """``send`` without a coroutine, when the pair's socket batches its sends
        (batch_sends); False, having done nothing, when ``send`` must do it."""
        pair = self.current._nominated.get(COMPONENT)
        if pair is None:
            return False
        hooks = pair.protocol.__dict__
        add = hooks.get("_tether_add")
        if add is None or hooks.get("send_data") is not add[0]:
            return False  # no batch, or someone wrapped send_data since: go through it
        if self._liveness is not None and self.clock.sent(self._loop.time(), self._busy()):
            self._kick.set()
        add[1](data, pair.remote_addr)
        return True

    def probe_batch(self) -> tuple[Any, tuple[str, int]] | None:
        """(the current pair's SendBatch, the far end's address) when path MTU probes
        can be sent on it (udp_batch.SendBatch.send_probe); None otherwise (no pair, a
        TURN relay, no batching, a cut path)."""
        pair = self.current._nominated.get(COMPONENT)
        if pair is None or self._cut is self.current:
            return None
        batch = pair.protocol.__dict__.get("_tether_batch")
        if batch is None or not batch.probes_possible():
            return None
        return batch, pair.remote_addr

    def lost(self) -> None:
        """SCTP saw a packet lost on the path: its batched sends spread out for a while
        (udp_batch.SPREAD_AFTER_LOSS)."""
        pair = self.current._nominated.get(COMPONENT)
        batch = pair.protocol.__dict__.get("_tether_batch") if pair is not None else None
        if batch is not None:
            batch.lost()

    def _hook(self, connection: aioice.Connection) -> None:
        """Every generation's datagrams feed the one queue DTLS reads."""

        def data_received(data: bytes, component: int) -> None:
            if not self._closed:
                self.deliver(data)

        connection.data_received = data_received  # type: ignore[method-assign]

    def _hook_protocols(self, gen: aioice.Connection) -> None:
        """Watch (and let cut() stop) every datagram on ``gen``'s sockets, STUN included."""
        for protocol in gen._protocols:
            if getattr(protocol, "_tether_path", None) is self:
                continue
            protocol._tether_path = self
            self._wrap_protocol(protocol, gen)

    def _wrap_protocol(self, protocol: Any, gen: aioice.Connection) -> None:
        receive, send_data, send_stun = (
            protocol.datagram_received, protocol.send_data, protocol.send_stun
        )
        # DTLS datagrams of one loop turn leave together (udp_batch, the batch_sends
        # speed patch); only a plain UDP socket's: a TURN relay's protocol is left alone.
        batch = udp_batch.SendBatch.for_transport(protocol.transport) if (
            udp_batch.enabled() and type(protocol) is aioice.ice.StunProtocol) else None

        def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
            if self._cut is gen:
                return
            if gen is self.current and self._liveness is not None:
                now = self._loop.time()
                if _from_pair(gen, addr):
                    if self.clock.received(now):
                        self._kick.set()
                elif not _ice_at_work(gen, data, addr) and self.clock.stray(now):
                    self._kick.set()
            receive(data, addr)

        async def cut_send_data(data: bytes, addr: tuple[str, int]) -> None:
            if self._cut is not gen:
                await send_data(data, addr)

        def cut_send_stun(message: stun.Message, addr: tuple[str, int]) -> None:
            if self._cut is not gen:
                send_stun(message, addr)

        protocol.datagram_received = datagram_received
        protocol.send_data = cut_send_data
        protocol.send_stun = cut_send_stun
        if batch is None:
            return

        def batch_add(data: bytes, addr: tuple[str, int]) -> None:
            if self._cut is not gen:
                batch.add(data, addr)

        async def batch_send_data(data: bytes, addr: tuple[str, int]) -> None:
            batch_add(data, addr)

        def batch_send_stun(message: stun.Message, addr: tuple[str, int]) -> None:
            batch.flush()  # in order with the DTLS datagrams before it
            cut_send_stun(message, addr)

        connection_lost, close = protocol.connection_lost, protocol.close

        def batch_connection_lost(exc: Exception | None) -> None:
            batch.close()
            connection_lost(exc)

        async def batch_close() -> None:
            batch.flush()  # what DTLS and SCTP said last (close_notify, ABORT) leaves first
            await close()

        protocol._tether_batch = batch
        protocol._tether_add = (batch_send_data, batch_add)
        protocol.send_data = batch_send_data
        protocol.send_stun = batch_send_stun
        protocol.connection_lost = batch_connection_lost
        protocol.close = batch_close

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether liveness checks (not aiortc) now report this path's health."""
        return self._liveness is not None

    @property
    def alive(self) -> bool:
        return self.clock.alive

    def connected(self) -> None:
        """aiortc finished the first generation: take over consent with liveness checks."""
        self._stop_consent(self.current)
        if self._liveness is None and not self._closed:
            self._hook_protocols(self.current)
            self.clock.restart(self._loop.time())
            self._liveness = asyncio.create_task(self._watch(), name=f"tether-liveness-{self.name}")
            self._liveness.add_done_callback(self._watch_ended)

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("tube %s: liveness checks stopped", self.name, exc_info=task.exception())

    def cut(self, drop: bool) -> None:
        """Fault injection: black-hole (True) or restore (False) the current generation's
        sockets in both directions. A later generation is not affected."""
        if drop:
            self._hook_protocols(self.current)
            self._cut = self.current
        else:
            self._cut = None
        logger.info("tube %s: path %s (fault injection)", self.name,
                    "cut" if drop else "restored")

    async def close(self) -> None:
        """Stop liveness and any pending generation; wake DTLS's pending receive."""
        if self._closed:
            return
        self._closed = True
        for task in (self._liveness, self._connecting, *self._retiring):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for probe in self._probes.values():
            probe.forget()
        self._probes.clear()
        gens = [g for g in (self.pending, self.current if self.generation > 1 else None) if g]
        for gen in gens:
            _close_sockets(gen._protocols)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                for gen in gens:
                    await gen.close()
        except TimeoutError:  # a TURN allocation whose server no longer answers
            logger.debug("tube %s: ICE sockets closed without waiting", self.name)
        self.pending = None
        while not self._received.empty():
            self._received.get_nowait()
        self._received.put_nowait(None)

    # -- restart -------------------------------------------------------------------------

    @property
    def local_credentials(self) -> tuple[str, str]:
        gen = self.pending or self.current
        return gen.local_username, gen.local_password

    async def start_offer(self) -> list[str]:
        """Begin a restart as the offerer: a new generation, gathered; returns its candidates."""
        gen = await self._new_generation()
        return [_candidate_line(c) for c in gen.local_candidates]

    def accept_answer(self, ufrag: str, pwd: str, candidates: Sequence[str]) -> None:
        """The peer answered our restart offer: run the new generation's checks."""
        gen = self.pending
        if gen is None:
            raise ValueError(f"tube {self.name}: an ICE restart answer, but no restart is pending")
        self._start_checks(gen, ufrag, pwd, candidates)

    async def accept_offer(self, ufrag: str, pwd: str, candidates: Sequence[str]) -> list[str]:
        """The peer restarts: a new generation answering it; returns its candidates."""
        gen = await self._new_generation()
        self._start_checks(gen, ufrag, pwd, candidates)
        return [_candidate_line(c) for c in gen.local_candidates]

    def first_answer(self, ufrag: str) -> None:
        """Note the remote ufrag of the first generation, which aiortc only sets later."""
        self._first_remote_ufrag = ufrag

    def remote_ufrag(self, gen: aioice.Connection) -> str | None:
        if gen.remote_username is None and gen is self._transport._connection:  # type: ignore[attr-defined]
            return self._first_remote_ufrag
        return gen.remote_username

    def generation_for(self, ufrag: str | None) -> aioice.Connection | None:
        """The generation whose remote ufrag is ``ufrag`` (None: the newest one whose
        remote ufrag is known)."""
        for gen in (self.pending, self.current):
            known = self.remote_ufrag(gen) if gen is not None else None
            if known is not None and (ufrag is None or known == ufrag):
                return gen
        return None

    def superseded(self, ufrag: str) -> bool:
        """Whether ``ufrag`` named a generation that is gone (retired or abandoned)."""
        return ufrag in self.retired_ufrags and self.generation_for(ufrag) is None

    async def _new_generation(self) -> aioice.Connection:
        old = self.current
        gen = aioice.Connection(
            ice_controlling=old.ice_controlling,
            stun_server=old.stun_server,
            turn_server=old.turn_server,
            turn_username=old.turn_username,
            turn_password=old.turn_password,
            turn_ssl=old.turn_ssl,
            turn_transport=old.turn_transport,
            use_ipv4=old._use_ipv4,
            use_ipv6=old._use_ipv6,
            transport_policy=old._transport_policy,
        )
        self._hook(gen)
        try:
            with gathering.host_addresses(self._host_addresses):
                await gen.gather_candidates()
        except BaseException:
            await gen.close()
            raise
        self._hook_protocols(gen)
        await self._drop_pending()
        self.pending = gen
        logger.debug("tube %s: ICE generation %d gathered %s", self.name, self.generation + 1,
                     ", ".join(f"{c.type} {c.host}:{c.port}" for c in gen.local_candidates))
        return gen

    def _start_checks(
        self, gen: aioice.Connection, ufrag: str, pwd: str, candidates: Sequence[str]
    ) -> None:
        gen.remote_username = ufrag
        gen.remote_password = pwd
        if self._connecting is not None:
            self._connecting.cancel()
        self._connecting = asyncio.create_task(
            self._connect(gen, list(candidates)), name=f"tether-ice-restart-{self.name}"
        )

    async def _connect(self, gen: aioice.Connection, candidates: list[str]) -> None:
        try:
            for line in candidates:
                await gen.add_remote_candidate(parse_candidate(line))
            async with asyncio.timeout(self.generation_timeout):
                await gen.connect()
        except (ConnectionError, TimeoutError, ValueError) as exc:
            logger.info("tube %s: ICE restart failed: %s", self.name, exc or "timed out")
            if self.pending is gen:
                await self._drop_pending()
            self._on_state("failed")
            return
        old, self.current, self.pending = self.current, gen, None
        self.generation += 1
        self._stop_consent(gen)
        now = self._loop.time()
        self.switched_at = now
        self.clock.restart(now)
        self._reported_alive = True
        pair = gen._nominated[COMPONENT]
        logger.info("tube %s: ICE generation %d connected via %s %s -> %s", self.name,
                    self.generation, pair.local_candidate.type, pair.local_addr, pair.remote_addr)
        self._retire_later(old)
        self._kick.set()
        self._on_state("connected")
        await self._resume("new path")

    async def _resume(self, why: str) -> None:
        """Let the core resend at once what was in flight on a path that was gone."""
        if self._on_resume is None:
            return
        self.resumes += 1
        try:
            await self._on_resume(why)
        except Exception:
            logger.warning("tube %s: resuming after %s failed", self.name, why, exc_info=True)

    async def _drop_pending(self) -> None:
        gen, self.pending = self.pending, None
        if gen is not None:
            if gen.remote_username is not None:
                self.retired_ufrags.append(gen.remote_username)
            await gen.close()

    def _retire_later(self, old: aioice.Connection) -> None:
        ufrag = self.remote_ufrag(old)
        if ufrag is not None:
            self.retired_ufrags.append(ufrag)
        for tid, probe in list(self._probes.items()):
            if probe.gen is old:
                probe.forget()
                del self._probes[tid]
        if self._cut is old:
            self._cut = None
        task = asyncio.create_task(self._retire(old), name=f"tether-ice-retire-{self.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: aioice.Connection) -> None:
        """Close an old generation's sockets (in the background: deleting a TURN allocation
        takes a round trip, or long retries if its server is gone). The first generation
        belongs to aiortc's transport, whose own close() would report failure, so only its
        sockets are closed."""
        first = old is self._transport._connection  # type: ignore[attr-defined]
        protocols = list(old._protocols)
        if first:
            old._nominated.clear()
            old._protocols = []
        _close_sockets(protocols)  # at once: even if this task is cancelled, none stays open
        try:
            if first:
                for protocol in protocols:
                    await protocol.close()
            else:
                await old.close()
        except Exception:
            logger.debug("tube %s: closing an old ICE generation failed", self.name, exc_info=True)

    @staticmethod
    def _stop_consent(gen: aioice.Connection) -> None:
        task = gen._query_consent_task
        if task is not None and not task.done():
            task.cancel()

    # -- liveness ------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            self._kick.clear()
            now = self._loop.time()
            self._expire_probes(now)
            verdict = self.clock.poll(now, self._busy())
            if verdict.probe:
                self._send_probe(now)
            if verdict.alive != self._reported_alive:
                self._reported_alive = verdict.alive
                if verdict.alive:
                    logger.info("tube %s: path answers again", self.name)
                    self._on_state("connected")
                    await self._resume("path back")
                else:
                    logger.info("tube %s: nothing heard on the path for %.2f s",
                                self.name, now - self.clock.heard)
                    self._on_state("disconnected")
                continue
            delay = max(MIN_WAKE, verdict.wake_at - self._loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()

    def _send_probe(self, now: float) -> None:
        gen = self.current
        pair = gen._nominated.get(COMPONENT)
        if pair is None or gen.remote_password is None:
            return
        while len(self._probes) >= MAX_PROBES_IN_FLIGHT:
            oldest = next(iter(self._probes))
            self._probes.pop(oldest).forget()
        request = gen.build_request(pair, nominate=False)
        key = gen.remote_password.encode("utf8")
        request.add_message_integrity(key)
        probe = _Probe(self, gen, pair.protocol, request.transaction_id, key, now)
        pair.protocol.transactions[probe.transaction_id] = probe
        self._probes[probe.transaction_id] = probe
        try:
            pair.protocol.send_stun(request, pair.remote_addr)
        except Exception:  # a socket torn down under aioice: the path is not answering
            logger.debug("tube %s: liveness probe not sent", self.name, exc_info=True)

    def _probe_answered(self, probe: _Probe) -> None:
        self._probes.pop(probe.transaction_id, None)
        probe.forget()
        if probe.gen is not self.current:
            return
        now = self._loop.time()
        if self.clock.probe_answered(now, now - probe.sent_at):
            self._kick.set()

    def _expire_probes(self, now: float) -> None:
        timeout = self.clock.probe_timeout()
        for tid, probe in list(self._probes.items()):
            if now - probe.sent_at >= timeout:
                del self._probes[tid]
                probe.forget()


def _close_sockets(protocols: Sequence[Any]) -> None:
    for protocol in protocols:
        batch = getattr(protocol, "_tether_batch", None)
        if batch is not None:
            batch.flush()
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.close()


def _from_pair(gen: aioice.Connection, addr: tuple[Any, ...]) -> bool:
    """Whether a datagram came from the far end of ``gen``'s nominated pair.

    Only that proves the path: after a NAT rebinding the peer's packets still arrive, but
    from a new port, while ours go to the old one and are lost. Counting those would keep
    a half-dead path 'alive' on this side forever; they count as strays instead
    (PathClock.stray), which gets the path declared dead and restarted within seconds.
    """
    pair = gen._nominated.get(COMPONENT)
    return pair is None or tuple(addr[:2]) == tuple(pair.remote_addr[:2])


def _ice_at_work(gen: aioice.Connection, data: bytes, addr: tuple[Any, ...]) -> bool:
    """Whether a datagram from outside the nominated pair is ICE checking another pair.

    After the nomination, checks still run on other pairs for a while (a check the peer
    started just before, our triggered check in answer, their retransmissions up to
    seconds later), from the peer's other candidates. Those are not the path moving:
    counted as strays, one of them plus a round trip that grew at that moment (the
    lab's slow_path turns 5 ms into 600 ms) declared a working path dead. So a STUN
    message (first byte 0-3, RFC 7983) from the far end of a pair in the check list is
    ICE at work; DTLS from anywhere else, and STUN from an address ICE has not seen (a
    NAT's new port: aioice learns it as a peer-reflexive pair only after this first
    datagram), are strays.
    """
    if not data or data[0] > 3:
        return False
    where = tuple(addr[:2])
    return any(tuple(pair.remote_addr[:2]) == where for pair in gen._check_list)


def _candidate_line(candidate: Candidate) -> str:
    return "candidate:" + candidate.to_sdp()


def parse_candidate(line: str) -> Candidate:
    """'candidate:...' (with or without the prefix) to an aioice Candidate."""
    text = line[len("candidate:"):] if line.startswith("candidate:") else line
    try:
        return Candidate.from_sdp(text)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"bad ICE candidate {line!r}") from exc


def candidate_ufrag(line: str) -> str | None:
    """The 'ufrag X' extension of a candidate line (RFC 8840), if present."""
    bits = line.split()
    for i in range(8, len(bits) - 1):
        if bits[i] == "ufrag":
            return bits[i + 1]
    return None
