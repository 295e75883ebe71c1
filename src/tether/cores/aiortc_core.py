"""The default WebRTC core: tubes on aiortc, behind Contract 2 (the seed's TubeRegistry).

One tube is one RTCPeerConnection with two pre-negotiated data channels: id 0 carries the
tunnel, id 1 carries tether's own control messages (keepalives). Negotiated channels exist
on both sides before the SDP exchange, so the tunnel never waits for an in-band open.

aiortc gathers every candidate inside setLocalDescription and puts them in the SDP; with
trickle_ice (the default) the core strips them from the SDP and hands them to
signal_callback one by one as ``icecandidate`` signals, then ``''`` for the end, exactly as
the seed's Rust core does. SDP travels base64-encoded.

Below it, each tube's IcePath (ice_path.py) detects dead paths and runs ICE restarts. When a
path comes back or a new one is nominated, the core resends at once what SCTP had in flight
(``resend_in_flight``), since the datagrams sent to the old sockets are gone and aiortc would
otherwise wait at least its 1 s retransmission timeout. STUN and TURN servers come from
``ice_servers``; TURN URLs get ``turn_username``/``turn_password``, and ``relay_only`` keeps
only relayed candidates (every restart generation gathers from the same TURN server).

Restart descriptions follow sdp.py's rules (a=setup per role, a growing o= version, the
current default address, a=ice-options:trickle), and SessionPath adds what browsers need
from ICE restarts (docs/browser.md), so a browser's RTCPeerConnection can be the peer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSctpTransport,
    RTCSessionDescription,
)
from aiortc.rtcicetransport import parse_stun_turn_uri
from aiortc.rtcsctptransport import SCTP_RTO_MIN, USERDATA_MAX_LENGTH

from .. import signals
from . import aiortc_speed, gathering, path_mtu
from . import sdp as sdp_rules
from .ice_path import IcePath, candidate_ufrag, parse_candidate

logger = logging.getLogger(__name__)

TUNNEL_CHANNEL_ID = 0
CONTROL_CHANNEL_ID = 1
KEEPALIVE_MESSAGE = b"tether:keepalive"
SIGNAL_QUEUE_LIMIT = 1024
# Tunnel-channel messages held between the channel opening and the tunnel attaching: the
# peer's streams are bounded by their windows long before this.
EARLY_MESSAGE_LIMIT = 4096
HELD_CANDIDATES_LIMIT = 256
LIVENESS_KEYS = frozenset({"interval", "misses", "busy_silence", "generation_timeout"})
# Answering a restart, our checks wait this long at most for the peer's first one: enough
# for our answer to reach a browser over signaling, short enough that behind a NAT (whose
# filter drops the peer's checks until ours go out) a restart is not held up for long.
ANSWER_CHECKS_WAIT = 0.3
# A restart generation that times out while the old path answers is checked again this often.
GENERATION_RETRIES = 2
# aiortc's initial congestion window: a resumed path starts at least from there.
SCTP_INITIAL_CWND = 3 * USERDATA_MAX_LENGTH

SignalCallback = Callable[[signals.Signal], Any]


class UnknownTubeError(KeyError):
    """No tube with this id lives in the registry."""

    def __str__(self) -> str:
        return f"unknown tube {self.args[0]!r}"


def encode_sdp(sdp: str) -> str:
    return base64.b64encode(sdp.encode()).decode("ascii")


def decode_sdp(data: str) -> str:
    try:
        return base64.b64decode(data.encode("ascii"), validate=True).decode()
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"SDP is not valid base64 text: {exc}") from None


def sdp_credentials(sdp: str) -> tuple[str, str]:
    """The ICE ufrag and password an SDP carries."""
    ufrag = pwd = None
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            ufrag = line.split(":", 1)[1].strip()
        elif line.startswith("a=ice-pwd:"):
            pwd = line.split(":", 1)[1].strip()
    if not ufrag or not pwd:
        raise ValueError("SDP has no ICE credentials (a=ice-ufrag / a=ice-pwd)")
    return ufrag, pwd


def ice_configuration(
    urls: Sequence[str],
    turn_username: str | None = None,
    turn_password: str | None = None,
    relay_only: bool = False,
) -> RTCConfiguration:
    """An RTCConfiguration for ``urls`` (stun:, stuns:, turn:, turns:); TURN URLs carry the
    credentials. ``relay_only`` gathers and uses relayed candidates only."""
    servers: list[RTCIceServer] = []
    has_turn = False
    for url in urls:
        try:
            scheme = parse_stun_turn_uri(url)["scheme"]
        except ValueError as exc:
            raise ValueError(f"bad ICE server URL {url!r}: {exc}") from None
        if scheme in ("turn", "turns"):
            if turn_username is None or turn_password is None:
                raise ValueError(f"TURN server {url!r} needs turn_username and turn_password")
            has_turn = True
            servers.append(RTCIceServer(urls=url, username=turn_username,
                                        credential=turn_password))
        else:
            servers.append(RTCIceServer(urls=url))
    if relay_only and not has_turn:
        raise ValueError("relay_only needs a TURN server (turn: or turns: URL) in ice_servers")
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


async def resend_in_flight(sctp: RTCSctpTransport) -> int:
    """Resend now what SCTP has in flight, and acknowledge what it received: the path those
    datagrams took is gone. Returns how many chunks were marked for retransmission.

    Like a T3 expiry, but at once and without collapsing the congestion window to one
    packet: it only goes back up to the initial window if an outage had shrunk it, and the
    losses were the outage's, not congestion's, so the slow-start threshold goes back up
    to the receive window (where aiortc peers start) and slow start probes the path
    afresh. The retransmission timeout restarts from its minimum.
    """
    if sctp._association_state != RTCSctpTransport.State.ESTABLISHED:
        return 0
    marked = 0
    for chunk in list(sctp._sent_queue):
        if chunk._acked or chunk._abandoned or sctp._maybe_abandon(chunk):
            continue
        chunk._retransmit = True
        sctp._flight_size_decrease(chunk)
        marked += 1
    aiortc_speed.request_rescan(sctp)  # the patched _transmit must look at the sent queue
    sctp._update_advanced_peer_ack_point()
    sctp._fast_recovery_exit = None
    sctp._fast_recovery_transmit = False
    sctp._cwnd = max(sctp._cwnd, SCTP_INITIAL_CWND)
    sctp._ssthresh = max(sctp._ssthresh, sctp._advertised_rwnd)
    sctp._rto = SCTP_RTO_MIN
    if sctp._last_received_tsn is not None:
        await sctp._send_sack()  # the peer learns at once what got through
    if marked:
        sctp._t3_cancel()
    await sctp._transmit()
    if sctp._sent_queue and sctp._t3_handle is None:
        sctp._t3_start()
    return marked


def split_candidates(sdp: str) -> tuple[str, list[str]]:
    """Remove candidate lines from ``sdp``; return it and the candidates ('candidate:...')."""
    kept: list[str] = []
    found: list[str] = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            found.append(line[2:])
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", found


@dataclass
class _Held:
    """A remote candidate waiting for the description of its generation."""

    candidate: str
    parsed: Any  # the aioice Candidate, None for end-of-candidates
    ufrag: str | None
    at: float


@dataclass(eq=False)
class _Tube:
    """Everything the core holds for one tube."""

    tube_id: str
    conversation_id: str
    pc: RTCPeerConnection
    tunnel_channel: RTCDataChannel
    control_channel: RTCDataChannel
    trickle: bool
    signal_callback: SignalCallback | None
    host_addresses: Sequence[str] | None = None
    path: IcePath | None = None
    state: str = "new"
    held: list[_Held] = field(default_factory=list)
    candidates_dropped: int = 0
    outbox: asyncio.Queue[signals.Signal | None] = field(
        default_factory=lambda: asyncio.Queue(SIGNAL_QUEUE_LIMIT)
    )
    pump: asyncio.Task[None] | None = None
    closing: bool = False
    created_at: float = field(default_factory=time.monotonic)
    chunks_sent: int = 0
    chunks_resent: int = 0
    chunks_resent_at_once: int = 0
    sdp_version: int | None = None  # the o= session version we last sent
    last_answer: str | None = None  # our answer to the current restart offer (a repeat gets it)
    # Tunnel-channel messages that arrive before anyone listens (see _hold_early_messages).
    early: list[bytes | str] = field(default_factory=list)

    @property
    def has_remote_description(self) -> bool:
        return self.pc.remoteDescription is not None

    @property
    def pending_candidates(self) -> list[str]:
        """The held candidates, oldest first."""
        return [item.candidate for item in self.held]


class AiortcTubeRegistry:
    """Tubes on aiortc.

    ``host_addresses`` picks the local addresses to gather on (None: every interface but
    loopback, aioice's choice; ``gathering.LOOPBACK`` for a loopback-only host or tests).
    ``ice_servers`` is a list of STUN/TURN URLs; empty by default, so no public server is
    ever contacted unless configured. TURN URLs use ``turn_username``/``turn_password``;
    ``relay_only`` restricts every tube to relayed candidates. Each of these, and
    ``host_addresses``, can also be given per tube in create_tube's ``settings``.
    ``liveness`` tunes dead-path detection (IcePath's interval, misses, busy_silence and
    generation_timeout).
    """

    def __init__(
        self,
        *,
        host_addresses: Sequence[str] | None = None,
        ice_servers: Sequence[str] = (),
        turn_username: str | None = None,
        turn_password: str | None = None,
        relay_only: bool = False,
        liveness: dict[str, float] | None = None,
    ) -> None:
        self.host_addresses = tuple(host_addresses) if host_addresses is not None else None
        self.ice_servers = list(ice_servers)
        self.turn_username = turn_username
        self.turn_password = turn_password
        self.relay_only = relay_only
        ice_configuration(self.ice_servers, turn_username, turn_password, relay_only)
        self.liveness = dict(liveness or {})
        unknown = set(self.liveness) - LIVENESS_KEYS
        if unknown:
            raise ValueError(f"unknown liveness settings {sorted(unknown)}; "
                             f"known: {sorted(LIVENESS_KEYS)}")
        self._tubes: dict[str, _Tube] = {}
        gathering.install()
        aiortc_speed.install()

    # -- Contract 2 ---------------------------------------------------------------------

    async def create_tube(
        self,
        conversation_id: str,
        settings: dict[str, Any] | None = None,
        trickle_ice: bool = True,
        offer: str | None = None,
        signal_callback: SignalCallback | None = None,
        tube_id: str | None = None,
    ) -> dict[str, str]:
        """Without ``offer``: make an offer. With one: answer it. Returns tube_id and the SDP."""
        settings = settings or {}
        if tube_id is None:
            tube_id = _new_tube_id()
        if tube_id in self._tubes:
            raise ValueError(f"tube {tube_id!r} already exists")
        configuration = ice_configuration(
            settings.get("ice_servers", self.ice_servers),
            settings.get("turn_username", self.turn_username),
            settings.get("turn_password", self.turn_password),
            settings.get("relay_only", self.relay_only),
        )
        addresses = settings.get("host_addresses", self.host_addresses)
        pc = RTCPeerConnection(configuration)
        tube = _Tube(
            tube_id=tube_id,
            conversation_id=conversation_id,
            pc=pc,
            tunnel_channel=pc.createDataChannel(
                "tether", negotiated=True, id=TUNNEL_CHANNEL_ID
            ),
            control_channel=pc.createDataChannel(
                "tether-control", negotiated=True, id=CONTROL_CHANNEL_ID
            ),
            trickle=trickle_ice,
            signal_callback=signal_callback,
            host_addresses=addresses,
        )
        self._tubes[tube_id] = tube
        self._hold_early_messages(tube)
        tube.pump = asyncio.create_task(self._pump(tube), name=f"tether-signals-{tube_id}")
        tube.path = SessionPath(
            tube_id, pc.sctp.transport.transport,
            on_state=lambda state: self._set_state(tube, state),
            host_addresses=addresses, **self.liveness,
            busy=lambda: _sctp_busy(tube),
            on_resume=lambda why: self._resume(tube, why),
        )
        self._watch(tube)
        try:
            with gathering.host_addresses(addresses):
                if offer is None:
                    await pc.setLocalDescription(await pc.createOffer())
                else:
                    await self._apply_remote(tube, decode_sdp(offer), "offer")
                    await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            await self.close_tube(tube_id, reason="setup failed")
            raise
        sdp = self._outgoing_sdp(tube)
        logger.debug("tube %s: created (%s)", tube_id, "answer" if offer else "offer")
        key = "answer" if offer is not None else "offer"
        return {"tube_id": tube_id, key: encode_sdp(sdp)}

    async def set_remote_description(
        self, tube_id: str, sdp: str, is_answer: bool = False
    ) -> str | None:
        """Apply the peer's SDP. An offer (first, or an ICE restart) returns our answer."""
        tube = self._tube(tube_id)
        text = decode_sdp(sdp)
        if not tube.has_remote_description:
            if is_answer:
                await self._apply_remote(tube, text, "answer")
                return None
            with gathering.host_addresses(tube.host_addresses):
                await self._apply_remote(tube, text, "offer")
                await tube.pc.setLocalDescription(await tube.pc.createAnswer())
            return encode_sdp(self._outgoing_sdp(tube))
        return await self._restart_description(tube, text, is_answer)

    async def add_ice_candidate(self, tube_id: str, candidate: str) -> None:
        """Add a remote candidate ('' ends them).

        A candidate that arrives before the description it belongs to (the first one, or
        an ICE restart's, named by its 'ufrag' extension) is held and applied with it. One
        for a generation that is gone, or held longer than a generation may take to
        connect, is dropped (counted in the tube's ``candidates_dropped``).
        """
        tube = self._tube(tube_id)
        parsed = None
        if candidate:
            try:
                parsed = parse_candidate(candidate)
            except ValueError as exc:
                raise ValueError(f"tube {tube_id}: {exc}") from None
        ufrag = candidate_ufrag(candidate) if candidate else None
        if ufrag is not None and tube.path.superseded(ufrag):
            self._drop_candidate(tube, candidate, "its ICE generation is gone")
            return
        gen = tube.path.generation_for(ufrag) if tube.has_remote_description else None
        if gen is None:
            self._hold(tube, _Held(candidate, parsed, ufrag, time.monotonic()))
            return
        await self._add_to(tube, gen, parsed)

    async def _add_to(self, tube: _Tube, gen: Any, parsed: Any) -> None:
        if gen._remote_candidates_end:
            logger.debug("tube %s: candidate after end-of-candidates ignored", tube.tube_id)
            return
        # aioice logs and skips a candidate it cannot use (e.g. an unknown type).
        await gen.add_remote_candidate(parsed)  # None: end of candidates

    async def restart_ice(self, tube_id: str) -> str:
        """Start an ICE restart: a new offer with fresh credentials; candidates trickle."""
        tube = self._tube(tube_id)
        if not tube.has_remote_description:
            raise RuntimeError(f"tube {tube_id}: cannot restart ICE before the first answer")
        candidates = await tube.path.start_offer()
        self._set_state(tube, "connecting")  # 'connected' again once the new path works
        ufrag, pwd = tube.path.local_credentials
        sdp = self._restart_sdp(tube, offer=True, ufrag=ufrag, pwd=pwd, candidates=candidates)
        logger.info("tube %s: ICE restart offer (ufrag %s)", tube_id, ufrag)
        return encode_sdp(self._send_candidates(tube, sdp, candidates, ufrag))

    def drop_traffic(self, tube_id: str, drop: bool) -> None:
        """Fault injection (tests, the demo): black-hole (True) or restore (False) this tube's
        current path in both directions, at the datagram level inside this process, as a
        cut cable would. Liveness then reports it dead; an ICE restart moves to a new path,
        which is not cut."""
        tube = self._tube(tube_id)
        tube.path.cut(drop)

    def get_connection_state(self, tube_id: str) -> str:
        """'new', 'connecting', 'connected', 'disconnected', 'failed' or 'closed'."""
        return self._tube(tube_id).state

    def get_connection_stats(self, tube_id: str) -> dict[str, float]:
        """Bytes on the wire (DTLS records), SCTP smoothed RTT and retransmission rate."""
        tube = self._tube(tube_id)
        stats = {
            "bytes_sent": 0,
            "bytes_received": 0,
            "packet_loss_rate": 0.0,
            "rtt_ms": None,
        }
        sctp = tube.pc.sctp
        if sctp is None:
            return stats
        for report in sctp.transport._get_stats().values():
            stats["bytes_sent"] = report.bytesSent
            stats["bytes_received"] = report.bytesReceived
        srtt = sctp._srtt
        stats["rtt_ms"] = round(srtt * 1000.0, 3) if srtt is not None else None
        if tube.chunks_sent:
            stats["packet_loss_rate"] = tube.chunks_resent / tube.chunks_sent
        return stats

    async def close_tube(self, tube_id: str, reason: str | None = None) -> None:
        """Close the tube and forget it; closing an unknown or closed tube does nothing."""
        tube = self._tubes.get(tube_id)
        if tube is None or tube.closing:
            return
        tube.closing = True
        logger.debug("tube %s: closing (%s)", tube_id, reason or "no reason given")
        try:
            await tube.pc.close()
            if tube.path is not None:
                await tube.path.close()
        finally:
            self._set_state(tube, "closed")
            self._tubes.pop(tube_id, None)
            await self._stop_pump(tube)

    # -- tether's additions --------------------------------------------------------------

    @property
    def tube_ids(self) -> list[str]:
        return list(self._tubes)

    def path_info(self, tube_id: str) -> dict[str, Any] | None:
        """The tube's selected pair and round trips, for status (see :func:`path_info`)."""
        return path_info(self, tube_id)

    def channel(self, tube_id: str) -> RTCDataChannel:
        """The tube's tunnel data channel (open once the tube connects)."""
        return self._tube(tube_id).tunnel_channel

    def _hold_early_messages(self, tube: _Tube) -> None:
        """Keep what the peer sends on the tunnel channel before anyone listens to it.

        The peer's tunnel starts the moment its channel opens and may send at once; ours
        attaches a loop turn later (``wait_channel`` resumes a task), and pyee drops a
        message nobody listens to. So the core holds them (bounded) and hands them, in
        order, to the first "message" listener as it is added: pyee announces a listener
        (``new_listener``) just before adding it, so nothing can slip in between."""
        channel = tube.tunnel_channel

        def hold(message: bytes | str) -> None:
            if len(tube.early) >= EARLY_MESSAGE_LIMIT:
                logger.error("tube %s: %d messages before the tunnel attached; closing it",
                             tube.tube_id, len(tube.early))
                stop()
                channel.close()  # the app sees it close and replaces the tube
                return
            tube.early.append(message)

        def stop() -> None:
            channel.remove_listener("message", hold)
            channel.remove_listener("new_listener", on_listener)
            tube.early.clear()

        def on_listener(event: str, listener: Any) -> None:
            if event != "message" or listener is hold:
                return
            held = list(tube.early)
            stop()
            for message in held:
                listener(message)

        channel.on("message", hold)
        channel.on("new_listener", on_listener)

    async def wait_channel(self, tube_id: str) -> RTCDataChannel:
        """Return the tunnel channel once it is open."""
        channel = self.channel(tube_id)
        if channel.readyState != "open":
            opened = asyncio.get_running_loop().create_future()

            def on_open() -> None:
                if not opened.done():
                    opened.set_result(None)

            def on_close() -> None:
                if not opened.done():
                    opened.set_exception(ConnectionError(f"tube {tube_id}: channel closed"))

            channel.once("open", on_open)
            channel.once("close", on_close)
            if channel.readyState == "open":
                on_open()
            await opened
        return channel

    def send_keepalive(self, tube_id: str) -> None:
        """Send a keepalive over the tube, refreshing every NAT mapping on the path."""
        channel = self._tube(tube_id).control_channel
        if channel.readyState == "open":
            channel.send(KEEPALIVE_MESSAGE)

    async def close(self) -> None:
        """Close every tube."""
        for tube_id in list(self._tubes):
            await self.close_tube(tube_id, reason="registry closed")

    # -- internals -----------------------------------------------------------------------

    def _tube(self, tube_id: str) -> _Tube:
        try:
            return self._tubes[tube_id]
        except KeyError:
            raise UnknownTubeError(tube_id) from None

    def _outgoing_sdp(self, tube: _Tube) -> str:
        sdp = sdp_rules.with_ice_option(tube.pc.localDescription.sdp, "trickle")
        sdp = path_mtu.announce(sdp)
        tube.sdp_version = sdp_rules.origin_version(sdp)
        if not tube.trickle:
            return sdp
        stripped, candidates = split_candidates(sdp)
        ufrag, _ = sdp_credentials(sdp)
        return self._send_candidates(tube, stripped, candidates, ufrag)

    def _send_candidates(
        self, tube: _Tube, sdp: str, candidates: list[str], ufrag: str
    ) -> str:
        """Trickle ``candidates`` tagged with their ufrag, or put them in the SDP.

        End-of-candidates ('') is only sent for the first generation: a bare '' cannot say
        which generation it ends, and a restart generation is bounded by its own timeout.
        """
        if not tube.trickle:
            lines = sdp.rstrip("\r\n").split("\r\n")
            lines += [f"a={c}" for c in candidates] + ["a=end-of-candidates"]
            return "\r\n".join(lines) + "\r\n"
        for candidate in candidates:
            self._emit(tube, signals.ICE_CANDIDATE, f"{candidate} ufrag {ufrag}")
        if tube.path.generation == 1 and tube.path.pending is None:
            self._emit(tube, signals.ICE_CANDIDATE, "")
        return sdp

    async def _apply_remote(self, tube: _Tube, sdp: str, kind: str) -> None:
        tube.path.first_answer(sdp_credentials(sdp)[0])
        await tube.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        tube.pc.sctp._tether_peer_reads = path_mtu.peer_reads(sdp)  # how far to probe
        await self._apply_held(tube)

    async def _apply_held(self, tube: _Tube) -> None:
        """Apply the held candidates whose generation is now known; keep the others."""
        self._prune_held(tube)
        held, tube.held = tube.held, []
        for item in held:
            gen = (tube.path.generation_for(item.ufrag)
                   if tube.has_remote_description else None)
            if gen is None:
                tube.held.append(item)
                continue
            await self._add_to(tube, gen, item.parsed)

    def _hold(self, tube: _Tube, item: _Held) -> None:
        self._prune_held(tube)
        if len(tube.held) >= HELD_CANDIDATES_LIMIT:
            raise ValueError(f"tube {tube.tube_id}: too many candidates held "
                             f"({HELD_CANDIDATES_LIMIT}) waiting for their description")
        tube.held.append(item)

    def _prune_held(self, tube: _Tube) -> None:
        """Drop held candidates that can never be applied: their generation is gone, or
        they waited longer than a generation may take (once the first description is in:
        before it, every candidate is the first generation's)."""
        if not tube.held:
            return
        now = time.monotonic()
        path = tube.path
        keep: list[_Held] = []
        for item in tube.held:
            if item.ufrag is not None and path.superseded(item.ufrag):
                self._drop_candidate(tube, item.candidate, "its ICE generation is gone")
            elif (item.ufrag is not None and tube.has_remote_description
                  and now - item.at > path.generation_timeout
                  and path.generation_for(item.ufrag) is None):
                self._drop_candidate(tube, item.candidate,
                                     f"no generation took it in {path.generation_timeout:g} s")
            else:
                keep.append(item)
        tube.held = keep

    @staticmethod
    def _drop_candidate(tube: _Tube, candidate: str, why: str) -> None:
        tube.candidates_dropped += 1
        logger.debug("tube %s: remote candidate dropped (%s): %s", tube.tube_id, why, candidate)

    async def _resume(self, tube: _Tube, why: str) -> None:
        """The path changed or came back: resend what SCTP had in flight right away."""
        sctp = tube.pc.sctp
        if sctp is None or tube.closing:
            return
        path_mtu.path_changed(sctp)  # a new path may carry less: base size until probed
        marked = await resend_in_flight(sctp)
        tube.chunks_resent_at_once += marked
        logger.debug("tube %s: %s, %d SCTP chunks resent at once", tube.tube_id, why, marked)

    async def _restart_description(self, tube: _Tube, sdp: str, is_answer: bool) -> str | None:
        """The peer's side of an ICE restart (an offer), or its answer to ours."""
        ufrag, pwd = sdp_credentials(sdp)
        _, candidates = split_candidates(sdp)
        path = tube.path
        if is_answer:
            if path.pending is None:
                if ufrag == path.remote_ufrag(path.current):
                    return None  # the answer we already have
                raise ValueError(f"tube {tube.tube_id}: ICE restart answer without a restart")
            path.accept_answer(ufrag, pwd, candidates)
            await self._apply_held(tube)
            return None
        if ufrag == path.remote_ufrag(path.current) and path.pending is None:
            if tube.last_answer is not None:  # the same offer again: the same answer
                return tube.last_answer
            local_ufrag, local_pwd = path.local_credentials
            return encode_sdp(self._restart_sdp(tube, offer=False, ufrag=local_ufrag,
                                                pwd=local_pwd, candidates=[]))
        logger.info("tube %s: answering ICE restart (remote ufrag %s)", tube.tube_id, ufrag)
        self._set_state(tube, "connecting")
        local = await path.accept_offer(ufrag, pwd, candidates)
        await self._apply_held(tube)
        local_ufrag, local_pwd = path.local_credentials
        answer = self._restart_sdp(tube, offer=False, ufrag=local_ufrag, pwd=local_pwd,
                                   candidates=local)
        tube.last_answer = encode_sdp(self._send_candidates(tube, answer, local, local_ufrag))
        return tube.last_answer

    @staticmethod
    def _restart_sdp(tube: _Tube, *, offer: bool, ufrag: str, pwd: str,
                     candidates: list[str]) -> str:
        """A restart description any standard peer accepts (sdp.py), without candidates."""
        base, _ = split_candidates(tube.pc.localDescription.sdp)
        previous = tube.sdp_version if tube.sdp_version is not None else -1
        tube.sdp_version = max(previous, sdp_rules.origin_version(base)) + 1
        return sdp_rules.restart_description(
            base, offer=offer, ufrag=ufrag, pwd=pwd, version=tube.sdp_version,
            candidates=candidates, dtls_role=tube.pc.sctp.transport._role,
        )

    def _set_state(self, tube: _Tube, state: str) -> None:
        if state == tube.state or tube.state == "closed":
            return
        logger.debug("tube %s: %s -> %s", tube.tube_id, tube.state, state)
        tube.state = state
        self._emit(tube, signals.CONNECTION_STATE_CHANGED, state)

    def _watch(self, tube: _Tube) -> None:
        """Turn aiortc events into signals and count SCTP retransmissions for loss."""
        pc = tube.pc

        @pc.on("connectionstatechange")
        def on_state() -> None:
            # Once connected, the IcePath reports the path's health; aiortc then only
            # still speaks for the end of the connection.
            state = pc.connectionState
            if tube.path.watching and state not in ("failed", "closed"):
                return
            if state == "connected":
                tube.path.connected()
                self._count_retransmissions(tube)
            self._set_state(tube, state)

        @tube.control_channel.on("message")
        def on_control(message: bytes | str) -> None:
            if message == KEEPALIVE_MESSAGE:
                self._emit(tube, signals.KEEPALIVE, "")

        @tube.tunnel_channel.on("close")
        def on_close() -> None:
            self._emit(tube, signals.CHANNEL_CLOSED, "tunnel channel closed")

    @staticmethod
    def _count_retransmissions(tube: _Tube) -> None:
        sctp = tube.pc.sctp
        if sctp is None or "_send_chunk" in vars(sctp):
            return
        send_chunk = sctp._send_chunk

        def counting_send_chunk(chunk: Any) -> Awaitable[None]:
            # Not a coroutine: it hands back send_chunk's, one frame less per chunk sent.
            tube.chunks_sent += 1
            if getattr(chunk, "_sent_count", 1) > 1:
                tube.chunks_resent += 1
            return send_chunk(chunk)

        sctp._send_chunk = counting_send_chunk

    def _emit(self, tube: _Tube, kind: str, data: str) -> None:
        if tube.signal_callback is None:
            return
        signal = signals.make_signal(tube.tube_id, tube.conversation_id, kind, data)
        try:
            tube.outbox.put_nowait(signal)
        except asyncio.QueueFull:
            logger.error("tube %s: signal queue full, %s signal not delivered", tube.tube_id, kind)

    async def _pump(self, tube: _Tube) -> None:
        """Deliver this tube's signals in order; the callback may be sync or async."""
        while (signal := await tube.outbox.get()) is not None:
            try:
                result = tube.signal_callback(signal) if tube.signal_callback else None
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("tube %s: signal callback failed on %s", tube.tube_id, signal["kind"])

    @staticmethod
    async def _stop_pump(tube: _Tube) -> None:
        """Let queued signals (the final state changes) go out, then end the pump."""
        if tube.pump is None or tube.pump is asyncio.current_task():
            return
        try:
            tube.outbox.put_nowait(None)
            async with asyncio.timeout(2.0):
                await asyncio.shield(tube.pump)
        except (asyncio.QueueFull, TimeoutError):
            tube.pump.cancel()
        try:
            await tube.pump
        except asyncio.CancelledError:
            if not tube.pump.cancelled():
                raise


class SessionPath(IcePath):
    """IcePath with what standard peers (browsers) need from ICE restarts.

    - The session's tie-breaker is kept: RFC 8445 section 9 keeps the roles across a
      restart, and a role conflict (a browser takes the controlling role when it offers
      a restart) is settled by the tie-breakers (section 7.3.1.1); aioice drew a new one
      per generation, so each restart could settle it the other way.
    - Answering a restart, our checks wait (at most ANSWER_CHECKS_WAIT) for the peer's
      first check, which proves it has our answer: a check that arrives before it makes
      Chromium create a peer-reflexive pair it then never checks itself, and, when it
      controls, never nominates.
    - While controlling, the nomination is repeated on the liveness probes.
    - A generation that times out while the old path answers is checked again.
    """

    _answering = False  # set while accept_offer builds the generation that answers

    async def _new_generation(self) -> Any:
        gen = await super()._new_generation()
        gen._tie_breaker = self.current._tie_breaker
        _repeat_nomination(gen)
        return gen

    def _hook(self, connection: Any) -> None:
        super()._hook(connection)
        _repeat_nomination(connection)

    async def accept_offer(self, ufrag: str, pwd: str, candidates: Sequence[str]) -> list[str]:
        self._answering = True
        try:
            return await super().accept_offer(ufrag, pwd, candidates)
        finally:
            self._answering = False

    def _start_checks(self, gen: Any, ufrag: str, pwd: str, candidates: Sequence[str]) -> None:
        gen._tether_answering = self._answering
        super()._start_checks(gen, ufrag, pwd, candidates)

    async def _connect(self, gen: Any, candidates: list[str]) -> None:
        """IcePath's, but answering waits for the peer's first check, and a generation
        that times out while the old path still answers gets its checks sent again
        (GENERATION_RETRIES times) instead of being reported 'failed'."""
        if gen._tether_answering:
            await _first_check(gen, ANSWER_CHECKS_WAIT)
        per_try = self.generation_timeout
        connect = gen.connect

        async def connect_with_retries() -> None:
            task = asyncio.ensure_future(connect())
            try:
                for attempt in range(GENERATION_RETRIES + 1):
                    done, _ = await asyncio.wait({task}, timeout=per_try)
                    if done:
                        return task.result()
                    if attempt == GENERATION_RETRIES or not self.alive:
                        break
                    logger.info("tube %s: ICE generation %d not connected after %g s while "
                                "the old path answers: checking again", self.name,
                                self.generation + 1, per_try * (attempt + 1))
                    _check_again(gen)
                raise TimeoutError
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        gen.connect = connect_with_retries
        self.generation_timeout = per_try * (GENERATION_RETRIES + 1) + 1.0  # the outer bound
        try:
            await super()._connect(gen, candidates)
        finally:
            self.generation_timeout = per_try


async def _first_check(gen: Any, limit: float) -> None:
    """Wait until the peer's first connectivity check reaches ``gen`` (at most ``limit``
    seconds): proof that the peer has our answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not gen._early_checks and loop.time() < deadline:
        await asyncio.sleep(0.01)


def _check_again(gen: Any) -> None:
    """Send a new connectivity check on every pair of ``gen`` whose check has ended."""
    for pair in gen._check_list:
        if pair.task is None or pair.task.done():
            pair.task = None
            gen.check_start_task(pair)


def _repeat_nomination(gen: Any) -> None:
    """While controlling, every liveness probe on the nominated pair carries USE-CANDIDATE.

    aioice nominates aggressively, once, in its first successful check. Chromium ignores
    that flag when the same request made it give up the controlling role (a restart it
    offered, RFC 8445 section 7.3.1.1), and then keeps sending on its old pair. Repeating
    the nomination of the same pair is allowed (section 8.1.1 forbids nominating another
    one), and the first probe goes out as soon as the generation is current."""
    if getattr(gen, "_tether_nominates", False):
        return
    build_request = gen.build_request

    def build(pair: Any, nominate: bool) -> Any:
        again = gen.ice_controlling and not gen.remote_is_lite  # lite peers: regular only
        return build_request(pair, nominate=nominate or again)

    gen.build_request = build
    gen._tether_nominates = True


def _sctp_busy(tube: _Tube) -> bool:
    """Whether SCTP waits for acknowledgements: a working path then answers within an RTT."""
    sctp = tube.pc.sctp
    return sctp is not None and bool(sctp._sent_queue)


def _new_tube_id() -> str:
    return secrets.token_urlsafe(12)


def path_info(registry: AiortcTubeRegistry, tube_id: str) -> dict[str, Any] | None:
    """The tube's selected candidate pair and round trips, for status displays.

    ``local``/``remote`` are "host:port (type)"; ``via`` is "relay" when either end is a
    TURN relay candidate, else "direct"; ``rtt_ms`` is the smoothed STUN round trip of the
    liveness probes (``sctp_rtt_ms`` SCTP's); ``sctp_packet`` is the size of the SCTP packets
    sent (path_mtu raises it from 1,189 to what the path carries). None for a tube the
    registry does not know.
    """
    tube = registry._tubes.get(tube_id)
    if tube is None:
        return None
    info: dict[str, Any] = {"local": None, "remote": None, "local_type": None,
                            "remote_type": None, "via": None, "generation": None,
                            "rtt_ms": None, "sctp_rtt_ms": None, "sctp_packet": None}
    path = tube.path
    if path is not None:
        info["generation"] = path.generation
        rtt = path.clock.rtt
        info["rtt_ms"] = round(rtt * 1000.0, 3) if rtt is not None else None
        pair = path.current._nominated.get(1)
        if pair is not None:
            local, remote = pair.local_candidate, pair.remote_candidate
            info["local"] = _endpoint(local.host, local.port)
            info["remote"] = _endpoint(remote.host, remote.port)
            info["local_type"], info["remote_type"] = local.type, remote.type
            info["via"] = "relay" if "relay" in (local.type, remote.type) else "direct"
    sctp = tube.pc.sctp
    srtt = getattr(sctp, "_srtt", None) if sctp is not None else None
    info["sctp_rtt_ms"] = round(srtt * 1000.0, 3) if srtt is not None else None
    if sctp is not None:
        found = path_mtu.prober(sctp)
        info["sctp_packet"] = found.packet if found is not None else path_mtu.BASE_PACKET
    return info


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
