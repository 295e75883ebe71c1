"""ICE restart and dead-path detection for aiortc, under DTLS and SCTP that stay up.

aiortc ignores new ICE credentials in a re-offer and lets aioice's consent check close the
whole connection about 30 s after a path dies. tether lifts both limits here. An IcePath
takes over the send and receive functions of one RTCIceTransport; behind them sits the
current ICE *generation* (an aioice Connection). An ICE restart builds a new generation
with fresh credentials, gathers, runs its checks and, once it has a nominated pair, becomes
current: DTLS records simply start flowing over the new pair, and no SCTP message is lost.

Liveness replaces aioice's consent check: a STUN binding request every ``interval`` seconds
on the current pair; ``misses`` unanswered in a row report 'disconnected' (within seconds,
not 30 s), an answer again reports 'connected'. Nothing is ever closed on the app's behalf:
deciding to restart is the connection manager's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import aioice
from aioice import Candidate, stun

from . import gathering

logger = logging.getLogger(__name__)

COMPONENT = 1


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
        generation_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self._transport = ice_transport
        self._on_state = on_state
        self._host_addresses = host_addresses
        self.interval = interval
        self.misses = misses
        self.generation_timeout = generation_timeout
        self.current: aioice.Connection = ice_transport._connection  # type: ignore[attr-defined]
        self.pending: aioice.Connection | None = None
        self.generation = 1
        self.alive = True
        self._first_remote_ufrag: str | None = None
        self._received: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closed = False
        self._liveness: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._hook(self.current)
        ice_transport._recv = self.recv  # type: ignore[attr-defined]
        ice_transport._send = self.send  # type: ignore[attr-defined]

    # -- the data path DTLS uses ---------------------------------------------------------

    async def recv(self) -> bytes:
        data = await self._received.get()
        if data is None:
            raise ConnectionError("ICE path closed")
        return data

    async def send(self, data: bytes) -> None:
        pair = self.current._nominated.get(COMPONENT)
        if pair is not None:
            await pair.protocol.send_data(data, pair.remote_addr)
        # No pair: the datagram is lost like any on a dead path; SCTP retransmits it.

    def _hook(self, connection: aioice.Connection) -> None:
        """Every generation's datagrams feed the one queue DTLS reads."""

        def data_received(data: bytes, component: int) -> None:
            self._received.put_nowait(data)

        connection.data_received = data_received  # type: ignore[method-assign]

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether liveness checks (not aiortc) now report this path's health."""
        return self._liveness is not None

    def connected(self) -> None:
        """aiortc finished the first generation: take over consent with liveness checks."""
        self._stop_consent(self.current)
        if self._liveness is None and not self._closed:
            self._liveness = asyncio.create_task(self._watch(), name=f"tether-liveness-{self.name}")

    async def close(self) -> None:
        """Stop liveness and any pending generation; wake DTLS's pending receive."""
        if self._closed:
            return
        self._closed = True
        for task in (self._liveness, self._connecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.pending is not None:
            await self.pending.close()
            self.pending = None
        if self.generation > 1:
            await self.current.close()
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
        )
        self._hook(gen)
        with gathering.host_addresses(self._host_addresses):
            await gen.gather_candidates()
        await self._drop_pending()
        self.pending = gen
        logger.debug("tube %s: ICE generation %d gathered %d candidates",
                     self.name, self.generation + 1, len(gen.local_candidates))
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
        pair = gen._nominated[COMPONENT]
        logger.info("tube %s: ICE generation %d connected via %s -> %s",
                    self.name, self.generation, pair.local_addr, pair.remote_addr)
        await self._retire(old)
        self.alive = True
        self._on_state("connected")

    async def _drop_pending(self) -> None:
        gen, self.pending = self.pending, None
        if gen is not None:
            await gen.close()

    async def _retire(self, old: aioice.Connection) -> None:
        """Close an old generation's sockets. The first one belongs to aiortc's transport,
        whose own close() would report failure, so only its sockets are closed."""
        if old is self._transport._connection:  # type: ignore[attr-defined]
            old._nominated.clear()
            for protocol in list(old._protocols):
                await protocol.close()
            old._protocols.clear()
        else:
            await old.close()

    @staticmethod
    def _stop_consent(gen: aioice.Connection) -> None:
        task = gen._query_consent_task
        if task is not None and not task.done():
            task.cancel()

    # -- liveness ------------------------------------------------------------------------

    async def _watch(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.interval)
            if await self._probe():
                failures = 0
                if not self.alive:
                    self.alive = True
                    logger.info("tube %s: path answers again", self.name)
                    self._on_state("connected")
            else:
                failures += 1
                if failures == self.misses and self.alive:
                    self.alive = False
                    logger.info("tube %s: path silent for %d checks", self.name, failures)
                    self._on_state("disconnected")

    async def _probe(self) -> bool:
        gen = self.current
        pair = gen._nominated.get(COMPONENT)
        if pair is None or gen.remote_password is None:
            return False
        request = gen.build_request(pair, nominate=False)
        try:
            await pair.protocol.request(
                request, pair.remote_addr,
                integrity_key=gen.remote_password.encode("utf8"), retransmissions=0,
            )
        except (stun.TransactionError, OSError, ConnectionError):
            return False
        except Exception:  # a socket torn down under aioice: the path is not answering
            logger.debug("tube %s: liveness probe failed", self.name, exc_info=True)
            return False
        return True


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
