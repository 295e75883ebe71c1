"""The seed's Rust core (keeper-pam-webrtc-rs) behind Contract 2, for tether's manager.

``KeeperTubeRegistry`` adapts the package's ``PyTubeRegistry``: every Rust call blocks, so
each runs in this registry's own small thread pool, never on the event loop; the Rust
core's signal callbacks come from its own threads and are handed to the loop with
``call_soon_threadsafe`` only, then delivered in order by one owned task per tube, through
a bounded queue, like the aiortc core's.

TCP forwarding is the package's own tunnel mode: the offering tube (tether's connecting
side) runs in server mode, where the Rust core listens on a local port of its own
(``local_listen_addr``, 127.0.0.1:0), and the answering tube dials a target for every
connection. tether's connecting side keeps its own stable listener, so a replaced tube
never changes the port users connect to. With ``resume`` (the default) every user
connection is a resumable session (tether.tunnel.resume): its carrier goes through the
current tube's Rust listener, the answering Rust tube dials tether's resume gateway
(127.0.0.1) instead of the target, and the gateway dials ``target``; a session outlives
its tube. Without it, :class:`KeeperTunnel` splices each connection to the Rust listener
and the Rust core dials ``target`` itself (a stream dies with its tube).

No vendor cloud: ``krelay_server`` is "" and ``ksm_config`` None (no router, no
credentials fetch); only ``client_version`` is required; and the Rust core's internet
probes (a TCP connection to 8.8.8.8:53) are switched off with its
KEEPER_WEBRTC_DISABLE_CONNECTIVITY_CHECK, so a tunnel sends nothing off the two hosts
(tests/test_core_keeper.py checks it). TURN passes through in the package's own settings
(``turn_url``, ``turn_username``, ``turn_password``, ``turn_only``).

Restarts: the Rust core's own (it starts one after 30 s 'disconnected', on both sides at
once) are folded into the manager's: such an offer is held and handed out by the next
``restart_ice``, so there is one restart at a time, started by tether's manager. The Rust
core's ICE restart renegotiates credentials only; its ICE agent keeps the old session,
so it cannot move a tube off a dead path, and its agent keeps saying 'connected' on a
dead path for up to 30 s. So with ``replace_on_restart`` (the default; the registry's
``restart_replaces_tube``) every restart gives the tube up at once and the side replaces it
with a fresh one (new gathering on the current addresses); resumable sessions move to it.
Without it the Rust core's restart is used when its agent is connected. It sends no signal
when a restart completes: 'connected' is reported once its ICE agent says so.

Closing: the Rust core's ``close_tube`` blocks ~30 s on a dead path or peer and leaves the
connections accepted on its listener open, so tether forgets a tube at once, drops its
carriers, and closes the Rust tube in the background on two threads of its own.

ids: the Rust registry is per process, and both tether peers of one process (tests, the
demo) use the same tube id, so each tube gets its own Rust tube and conversation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import signals
from ..tunnel.resume import ResumeClient, ResumeGateway

logger = logging.getLogger(__name__)

CLIENT_VERSION = "tether-keeper-adapter"
SIGNAL_QUEUE_LIMIT = 1024
READY_POLL = 0.05
CONFIRM_LIMIT = 60.0  # longer than the manager waits for a restart to complete
# A Rust-core restart offer older than this is not handed out: the manager's restart wins.
HELD_OFFER_MAX_AGE = 10.0
STATES = frozenset({"new", "connecting", "connected", "disconnected", "failed", "closed"})
SPLICE_CHUNK = 256 * 1024
CLOSE_WAIT = 5.0  # how long close() waits for the Rust core's own tube closes
HELD_CANDIDATES_LIMIT = 256
NO_PROBES = "KEEPER_WEBRTC_DISABLE_CONNECTIVITY_CHECK"
RESUME_ENV = "TETHER_KEEPER_RESUME"  # "0": plain Rust-core streams (both ends must agree)

SignalCallback = Callable[[signals.Signal], Any]


def _on_daemon_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any],
                      name: str) -> asyncio.Future[Any]:
    """Run a blocking call on a daemon thread of its own; its result comes back through
    ``call_soon_threadsafe``. The Rust core's close takes ~30 s with a dead peer: a pool
    thread would hold the process that long at exit (pool threads are joined), a daemon
    thread does not."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(), None)
        except BaseException as exc:  # handed to the awaiting task
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class TubeReplaced(RuntimeError):
    """restart_ice's answer when the tube is given up and the side makes a new one: the
    manager logs it as the plan it is, not as a failure (``tube_replaced``)."""

    tube_replaced = True


class UnknownTubeError(KeyError):
    """No tube with this id lives in the registry."""

    def __str__(self) -> str:
        return f"unknown tube {self.args[0]!r}"


def load_registry() -> Any:
    """The package's PyTubeRegistry; a clear error if the extra is not installed.

    TETHER_KEEPER_LOG=debug (or info, warning) forwards the Rust core's own logs to
    Python logging (logger ``keeper_pam_webrtc_rs``), for diagnosing the core itself.
    """
    try:
        import keeper_pam_webrtc_rs
    except ImportError:
        raise RuntimeError("--core keeper needs keeper-pam-webrtc-rs: "
                           "pip install 'tether[keeper]'") from None
    # Its network monitor probes the internet (a TCP connection to 8.8.8.8:53, measured in
    # a namespace with no route out); tether watches the network itself, so no probes.
    os.environ.setdefault(NO_PROBES, "1")
    level = os.environ.get("TETHER_KEEPER_LOG", "").upper()
    if level:
        with contextlib.suppress(Exception):  # already initialized in this process
            keeper_pam_webrtc_rs.initialize_logger("tether", False,
                                                   logging.getLevelName(level))
    return keeper_pam_webrtc_rs.PyTubeRegistry()


@dataclass(frozen=True)
class KeeperChannel:
    """What a tube's tunnel needs once the Rust core's data channel is open."""

    tube_id: str
    listen: tuple[str, int] | None  # the Rust core's listener (offering side), else None


@dataclass(eq=False)
class _Tube:
    tube_id: str
    conversation_id: str
    rust_id: str
    rust_conversation: str
    signal_callback: SignalCallback | None
    listen: tuple[str, int] | None = None
    state: str = "new"
    closing: bool = False
    held_offer: str | None = None
    held_at: float = 0.0
    restarting: bool = False  # our restart offer is out, its answer not yet applied
    confirm: asyncio.Task[None] | None = None
    early_candidates: list[str] = field(default_factory=list)
    outbox: asyncio.Queue[signals.Signal | None] = field(
        default_factory=lambda: asyncio.Queue(SIGNAL_QUEUE_LIMIT))
    pump: asyncio.Task[None] | None = None
    signals_dropped: int = 0


class KeeperTubeRegistry:
    """Tubes on keeper-pam-webrtc-rs (Contract 2); see the module docstring.

    ``turn_url``/``turn_username``/``turn_password`` (and ``turn_only``) go to every tube
    unless its settings give their own. ``registry`` is for tests (a PyTubeRegistry).
    ``resume``: TCP streams as resumable sessions (both ends must agree; default on, or
    TETHER_KEEPER_RESUME=0 for off). ``replace_on_restart``:
    a restart replaces the tube (see the module docstring).
    """

    def __init__(
        self,
        *,
        turn_url: str | None = None,
        turn_username: str | None = None,
        turn_password: str | None = None,
        turn_only: bool = False,
        client_version: str = CLIENT_VERSION,
        workers: int = 4,
        registry: Any = None,
        resume: bool | None = None,
        replace_on_restart: bool = True,
    ) -> None:
        if turn_url and not (turn_username and turn_password):
            raise ValueError(f"TURN server {turn_url!r} needs turn_username and turn_password")
        if turn_only and not turn_url:
            raise ValueError("turn_only needs a TURN server (turn_url)")
        self.turn = {"turn_url": turn_url, "turn_username": turn_username,
                     "turn_password": turn_password}
        self.turn_only = turn_only
        self.client_version = client_version
        self._rust = registry if registry is not None else load_registry()
        self._executor = ThreadPoolExecutor(max_workers=workers,
                                            thread_name_prefix="tether-keeper")
        self._closers: set[asyncio.Task[None]] = set()
        self._by_id: dict[str, _Tube] = {}
        self._by_rust: dict[str, _Tube] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.resume = (resume if resume is not None
                       else os.environ.get(RESUME_ENV, "1").strip() not in ("0", "off", "no"))
        self.replace_on_restart = replace_on_restart
        self.resume_client: ResumeClient | None = None
        self.gateways: dict[tuple[str, int], ResumeGateway] = {}
        self._gateway_lock = asyncio.Lock()
        self._carrier: _Tube | None = None  # the offering tube new carriers go through
        self._carrier_up = asyncio.Event()

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
        """Without ``offer``: offer a tube whose Rust listener carries TCP (server mode).
        With one: answer it, dialing ``settings["target"]`` (host, port) per connection."""
        if self._closed:
            raise RuntimeError("the keeper registry is closed")
        self._loop = asyncio.get_running_loop()
        settings = dict(settings or {})
        tube_id = tube_id or uuid.uuid4().hex
        if tube_id in self._by_id:
            raise ValueError(f"tube {tube_id!r} already exists")
        if offer is not None and self.resume and settings.get("target") is not None:
            host, port = settings["target"]
            settings["target"] = (await self._gateway((str(host), int(port)))).address
        rust_settings = self._rust_settings(settings, answering=offer is not None)
        tube = _Tube(tube_id, conversation_id, rust_id=str(uuid.uuid4()),
                     rust_conversation=f"tether-{uuid.uuid4().hex}",
                     signal_callback=signal_callback)
        self._by_id[tube_id] = tube
        self._by_rust[tube.rust_id] = tube
        tube.pump = asyncio.create_task(self._pump(tube), name=f"tether-keeper-{tube_id}")
        try:
            result = await self._run(
                self._rust.create_tube, tube.rust_conversation, rust_settings, trickle_ice,
                "tether", "", self.client_version, None, offer, self._on_rust_signal,
                tube.rust_id)
        except BaseException:
            await self._forget(tube)
            raise
        listen = result.get("actual_local_listen_addr")
        if listen:
            host, _, port = listen.rpartition(":")
            tube.listen = (host.strip("[]"), int(port))
        key = "answer" if offer is not None else "offer"
        logger.debug("tube %s: Rust tube %s created (%s)", tube_id, tube.rust_id, key)
        return {"tube_id": tube_id, key: result[key]}

    async def set_remote_description(
        self, tube_id: str, sdp: str, is_answer: bool = False
    ) -> str | None:
        """Apply the peer's SDP (base64); an offer (an ICE restart's too) returns our answer."""
        tube = self._tube(tube_id)
        if not is_answer:
            tube.held_offer = None  # the peer's restart wins over one we hold
        restarting = tube.state != "new" and (not is_answer or tube.restarting)
        if restarting and not is_answer:
            self._set_state(tube, "connecting")
        answer = await self._run(self._rust.set_remote_description, tube.rust_id, sdp,
                                 is_answer)
        if restarting:
            tube.restarting = False
            early, tube.early_candidates = tube.early_candidates, []
            for candidate in early:
                await self._run(self._rust.add_ice_candidate, tube.rust_id, candidate)
            self._confirm(tube)
        return answer or None

    async def add_ice_candidate(self, tube_id: str, candidate: str) -> None:
        """Add a remote candidate ('' ends them); tether's ' ufrag X' tag is understood."""
        tube = self._tube(tube_id)
        if tube.restarting:
            # Our restart offer is out: the answer's candidates can overtake the answer,
            # and the Rust core would give them to the old generation. Held until it is in.
            if len(tube.early_candidates) >= HELD_CANDIDATES_LIMIT:
                raise ValueError(f"tube {tube_id}: too many candidates before the answer")
            tube.early_candidates.append(candidate)
            return
        await self._run(self._rust.add_ice_candidate, tube.rust_id, candidate)

    async def restart_ice(self, tube_id: str) -> str:
        """A new offer with fresh ICE credentials (the Rust core's own, if it just made one).

        The Rust core's ICE restart renegotiates credentials but its ICE agent keeps the
        old session, candidates and pair (measured: no new checks, no new candidates), so
        it cannot move a tube whose path died. Then the tube is given up (a
        ``channel_closed`` signal) and the side replaces it with a fresh one at once:
        always with ``replace_on_restart``, else when the Rust ICE agent is not connected.
        """
        tube = self._tube(tube_id)
        if self.replace_on_restart:
            why = ("the Rust core's ICE restart cannot move a tube to a new path; "
                   "replacing the tube")
            logger.info("tube %s: %s", tube_id, why)
            self._emit(tube, signals.CHANNEL_CLOSED, why)
            raise TubeReplaced(why)
        state = str(await self._run(self._rust.get_connection_state, tube.rust_id)).lower()
        if state != "connected":
            why = (f"the Rust core's ICE is {state}: its restart cannot move the tube to a "
                   "new path; replacing the tube")
            logger.info("tube %s: %s", tube_id, why)
            self._emit(tube, signals.CHANNEL_CLOSED, why)
            raise TubeReplaced(why)
        held, tube.held_offer = tube.held_offer, None
        if held is not None and time.monotonic() - tube.held_at < HELD_OFFER_MAX_AGE:
            logger.info("tube %s: ICE restart with the Rust core's own offer", tube_id)
            offer = held
        else:
            offer = await self._run(self._rust.restart_ice, tube.rust_id)
            logger.info("tube %s: ICE restart offer", tube_id)
        tube.restarting = True
        self._set_state(tube, "connecting")  # 'connected' again once the answer is in
        return offer

    def get_connection_state(self, tube_id: str) -> str:
        """The last state the Rust core reported ('new' ... 'closed'); no Rust call."""
        return self._tube(tube_id).state

    async def get_connection_stats(self, tube_id: str) -> dict[str, Any]:
        """Bytes from the Rust core's live stats (its connection stats stay at 0), RTT, loss."""
        tube = self._tube(tube_id)
        stats: dict[str, Any] = {"bytes_sent": 0, "bytes_received": 0,
                                 "packet_loss_rate": 0.0, "rtt_ms": None}
        try:
            live = await self._run(self._rust.get_live_stats, tube.rust_conversation)
        except Exception as exc:  # no live stats yet (not connected)
            logger.debug("tube %s: no live stats: %r", tube_id, exc)
            return stats
        if isinstance(live, dict):
            stats["bytes_sent"] = int(live.get("total_bytes_sent") or 0)
            stats["bytes_received"] = int(live.get("total_bytes_received") or 0)
            webrtc = live.get("webrtc_stats") or {}
            stats["packet_loss_rate"] = float(webrtc.get("packet_loss_rate") or 0.0)
            rtt = webrtc.get("rtt_ms")
            stats["rtt_ms"] = float(rtt) if rtt else None
        return stats

    async def close_tube(self, tube_id: str, reason: str | None = None) -> None:
        """Close the tube and forget it. Idempotent: closing an unknown tube, or one the
        Rust core already closed (it closes both ends when one closes), does nothing.

        Returns once tether has forgotten it; the Rust core's own close goes on in the
        background (its own threads): with a dead peer it takes ~30 s (measured in the
        lab's peer_restart), and the caller may be the signal path."""
        tube = self._by_id.get(tube_id)
        if tube is None or tube.closing:
            return
        tube.closing = True
        logger.debug("tube %s: closing (%s)", tube_id, reason or "no reason given")
        if tube.listen is not None and self.resume_client is not None:
            self.resume_client.path_closed(tube.listen)
        self._set_state(tube, "closed")
        await self._forget(tube)
        task = asyncio.create_task(self._close_rust(tube),
                                   name=f"tether-keeper-close-{tube_id}")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _close_rust(self, tube: _Tube) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        rust, rust_id = self._rust, tube.rust_id

        def close() -> None:
            if rust.tube_found(rust_id):
                rust.close_tube(rust_id, None)

        try:
            await _on_daemon_thread(loop, close, f"tether-keeper-close-{tube.tube_id}")
        except RuntimeError as exc:
            if "not found" not in str(exc).lower():
                logger.warning("tube %s: the Rust core could not close it: %s",
                               tube.tube_id, exc)
            return
        took = time.monotonic() - started
        if took > 1.0:
            logger.info("tube %s: the Rust core took %.1f s to close it", tube.tube_id, took)

    # -- tether's additions --------------------------------------------------------------

    blocking_calls = False  # every Rust call above already runs in our own threads

    @property
    def restart_replaces_tube(self) -> bool:
        """The side should offer a new tube at once when one is given up on a restart."""
        return self.replace_on_restart

    @property
    def tube_ids(self) -> list[str]:
        return list(self._by_id)

    async def wait_channel(self, tube_id: str) -> KeeperChannel:
        """Wait until the Rust core's data channel is open ('ready')."""
        while True:
            tube = self._by_id.get(tube_id)
            if tube is None or tube.closing:
                raise ConnectionError(f"tube {tube_id}: closed before its channel opened")
            try:
                status = await self._run(self._rust.get_tube_status, tube.rust_id)
            except RuntimeError as exc:
                raise ConnectionError(f"tube {tube_id}: {exc}") from None
            if status == "ready":
                if tube.listen is not None:  # the newest offering tube carries from now on
                    self._carrier = tube
                    self._carrier_up.set()
                    if self.resume_client is not None:
                        self.resume_client.path_changed()
                return KeeperChannel(tube_id, tube.listen)
            if status in ("failed", "closing", "closed"):
                raise ConnectionError(f"tube {tube_id}: channel {status}")
            await asyncio.sleep(READY_POLL)

    def make_tunnel(self, channel: KeeperChannel, **kwargs: Any) -> KeeperTunnel:
        """The side's tunnel for this tube (see KeeperTunnel)."""
        resume = None
        if self.resume and channel.listen is not None:
            if self.resume_client is None:
                self.resume_client = ResumeClient(self._carrier_address,
                                                  on_silent=self._carriers_silent)
            resume = self.resume_client
        return KeeperTunnel(channel, resume=resume, **kwargs)

    async def close(self) -> None:
        """End every resumable session, close every tube, then the thread pool."""
        if self.resume_client is not None:
            await self.resume_client.close()
        for gateway in list(self.gateways.values()):
            await gateway.close()
        for tube_id in list(self._by_id):
            await self.close_tube(tube_id, reason="registry closed")
        self._closed = True
        if self._closers:
            _, late = await asyncio.wait(set(self._closers), timeout=CLOSE_WAIT)
            if late:
                logger.info("%d Rust tube(s) still closing after %.0f s (a dead peer?); "
                            "not waiting", len(late), CLOSE_WAIT)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # -- internals -----------------------------------------------------------------------

    async def _gateway(self, target: tuple[str, int]) -> ResumeGateway:
        """The resume gateway for ``target`` (one per target, made on first use)."""
        async with self._gateway_lock:
            gateway = self.gateways.get(target)
            if gateway is None:
                gateway = ResumeGateway(target)
                await gateway.start()
                self.gateways[target] = gateway
            return gateway

    async def _carrier_address(self) -> tuple[str, int]:
        """The current offering tube's Rust listener; waits until a tube is ready."""
        while True:
            tube = self._carrier
            if tube is not None and not tube.closing and tube.listen is not None:
                return tube.listen
            if self._closed:
                raise ConnectionError("the keeper registry is closed")
            self._carrier_up.clear()
            await self._carrier_up.wait()

    def _carriers_silent(self, address: tuple[str, int]) -> None:
        """A carrier through the current tube went silent: its path is dead though the
        Rust core says nothing yet."""
        tube = self._carrier
        if (tube is not None and not tube.closing and tube.listen == address
                and self.replace_on_restart):
            logger.info("tube %s: resumable-stream carriers went silent; replacing the tube",
                        tube.tube_id)
            self._emit(tube, signals.CHANNEL_CLOSED, "carriers went silent (a dead path)")

    def _tube(self, tube_id: str) -> _Tube:
        tube = self._by_id.get(tube_id)
        if tube is None:
            raise UnknownTubeError(tube_id)
        return tube

    def _rust_settings(self, settings: dict[str, Any], answering: bool) -> dict[str, Any]:
        rust: dict[str, Any] = {"conversationType": "tunnel"}
        if answering:
            target = settings.get("target")
            if target is None:
                raise ValueError("the Rust core answers a tube by dialing a target: "
                                 "settings need 'target' (host, port)")
            host, port = target
            rust["target_host"] = str(host)
            rust["target_port"] = str(int(port))
        else:
            rust["local_listen_addr"] = settings.get("local_listen_addr", "127.0.0.1:0")
        turn_url = settings.get("turn_url", self.turn["turn_url"])
        if turn_url:
            user = settings.get("turn_username", self.turn["turn_username"])
            password = settings.get("turn_password", self.turn["turn_password"])
            if not (user and password):
                raise ValueError(f"TURN server {turn_url!r} needs turn_username and "
                                 "turn_password")
            rust.update(turn_url=turn_url, turn_username=user, turn_password=password)
            if settings.get("turn_only", self.turn_only):
                rust["turn_only"] = True
        return rust

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _on_rust_signal(self, raw: Any) -> None:
        """Called on a Rust thread: copy the signal and hand it to the loop, nothing more."""
        loop = self._loop
        if loop is None:
            return
        try:
            item = dict(raw)
        except (TypeError, ValueError):
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            loop.call_soon_threadsafe(self._deliver, item)

    def _deliver(self, raw: dict[str, Any]) -> None:
        """On the loop: translate a Rust signal into tether's and queue it for its tube."""
        tube = self._by_rust.get(str(raw.get("tube_id", "")))
        if tube is None:
            return
        kind = raw.get("kind")
        data = raw.get("data", "")
        data = data if isinstance(data, str) else str(data)
        if kind == "icecandidate":
            self._emit(tube, signals.ICE_CANDIDATE, data)
        elif kind == "connection_state_changed":
            state = data.lower()
            if state in STATES:
                self._set_state(tube, state)
        elif kind == "ice_restart_offer":
            # The Rust core restarts on its own after a disconnect; the manager decides
            # when a restart happens, so the offer waits for its restart_ice.
            tube.held_offer, tube.held_at = data, time.monotonic()
            logger.info("tube %s: the Rust core started an ICE restart; held for the manager",
                        tube.tube_id)
            self._emit(tube, signals.NETWORK_CHANGE_DETECTED, "ice_restart_needed")
        elif kind == "channel_closed":
            self._emit(tube, signals.CHANNEL_CLOSED, data)
        else:
            logger.debug("tube %s: Rust signal %r ignored", tube.tube_id, kind)

    def _confirm(self, tube: _Tube) -> None:
        """After a restart's offer/answer exchange: report 'connected' once the Rust ICE
        agent is connected (it sends no signal when a restart completes)."""
        if tube.confirm is not None and not tube.confirm.done():
            tube.confirm.cancel()
        tube.confirm = asyncio.create_task(self._run_confirm(tube),
                                           name=f"tether-keeper-confirm-{tube.tube_id}")

    async def _run_confirm(self, tube: _Tube) -> None:
        deadline = time.monotonic() + CONFIRM_LIMIT
        while not tube.closing and time.monotonic() < deadline:
            try:
                state = await self._run(self._rust.get_connection_state, tube.rust_id)
            except RuntimeError:
                return  # gone: its closing signals say so
            if str(state).lower() == "connected":
                self._set_state(tube, "connected")
                return
            if str(state).lower() in ("failed", "closed"):
                self._set_state(tube, str(state).lower())
                return
            await asyncio.sleep(READY_POLL)

    def _set_state(self, tube: _Tube, state: str) -> None:
        if state == tube.state or tube.state == "closed":
            return
        logger.debug("tube %s: %s -> %s", tube.tube_id, tube.state, state)
        tube.state = state
        self._emit(tube, signals.CONNECTION_STATE_CHANGED, state)

    def _emit(self, tube: _Tube, kind: str, data: str) -> None:
        if tube.signal_callback is None or tube.pump is None:
            return
        signal = signals.make_signal(tube.tube_id, tube.conversation_id, kind, data)
        try:
            tube.outbox.put_nowait(signal)
        except asyncio.QueueFull:
            tube.signals_dropped += 1
            logger.error("tube %s: signal queue full, %s signal not delivered",
                         tube.tube_id, kind)

    async def _pump(self, tube: _Tube) -> None:
        """Deliver this tube's signals in order; the callback may be sync or async."""
        while (signal := await tube.outbox.get()) is not None:
            try:
                result = tube.signal_callback(signal) if tube.signal_callback else None
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("tube %s: signal callback failed on %s", tube.tube_id,
                                 signal["kind"])

    async def _forget(self, tube: _Tube) -> None:
        """Drop the tube; let its queued signals (the last states) out, then end its pump."""
        self._by_id.pop(tube.tube_id, None)
        self._by_rust.pop(tube.rust_id, None)
        if self._carrier is tube:
            self._carrier = None
        if tube.listen is not None and self.resume_client is not None:
            self.resume_client.path_closed(tube.listen)
        if tube.confirm is not None:
            tube.confirm.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tube.confirm
        pump, tube.pump = tube.pump, None
        if pump is None or pump is asyncio.current_task():
            return
        try:
            tube.outbox.put_nowait(None)
            async with asyncio.timeout(2.0):
                await asyncio.shield(pump)
        except (asyncio.QueueFull, TimeoutError):
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


class KeeperTunnel:
    """A tube's tunnel when the Rust core forwards TCP itself.

    On the connecting side, ``carry`` hands one accepted connection to the registry's
    ResumeClient (``resume``: the session outlives this tube, and closing the tunnel does
    not end it), or else splices it to the Rust core's listener for this tube; on the
    exposing side the Rust core dials the gateway or target itself and this object only
    reports. Same surface as tether's Tunnel for the app: start, carry, close, closed, stats.
    """

    def __init__(self, channel: KeeperChannel, name: str = "tube",
                 target: tuple[str, int] | None = None, window: int | None = None,
                 on_fail: Callable[[str], None] | None = None,
                 resume: ResumeClient | None = None) -> None:
        self.channel = channel
        self.name = name
        self.target = target
        self.on_fail = on_fail
        self.resume = resume
        self._sessions: set[Any] = set()  # resumable sessions started through this tube
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._streams_total = 0
        self._bytes_to_peer = 0
        self._bytes_from_peer = 0
        self._open_failures = 0

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def streams(self) -> dict[int, Any]:
        """Per-stream details live in the Rust core; none are shown."""
        return {}

    @property
    def stats(self) -> dict[str, Any]:
        sessions = list(self._sessions)
        return {
            "streams_open": len(self._streams) + sum(not s.ended.is_set() for s in sessions),
            "streams_total": self._streams_total,
            "open_failures": self._open_failures,
            "bytes_to_peer": self._bytes_to_peer + sum(s.send.next for s in sessions),
            "bytes_from_peer": self._bytes_from_peer + sum(s.recv.offset for s in sessions),
            "failure": None,
        }

    def start(self) -> None:
        logger.debug("tube %s: Rust-core tunnel (%s side)", self.name,
                     "exposing" if self.target else "connecting")

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry one accepted connection through the Rust core; return when it has ended."""
        if self._closing or self.channel.listen is None:
            writer.close()
            return
        if self.resume is not None:
            self._streams_total += 1
            try:
                await self.resume.carry(reader, writer, on_start=self._sessions.add)
            finally:
                for session in list(self._sessions):
                    if session.ended.is_set():
                        self._sessions.discard(session)
                        self._bytes_to_peer += session.send.next
                        self._bytes_from_peer += session.recv.offset
            return
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        self._streams_total += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.channel.listen)
            except OSError as exc:
                self._open_failures += 1
                logger.warning("tube %s: Rust listener refused the stream: %s", self.name, exc)
                return
            try:
                await asyncio.gather(self._pipe(reader, up_writer, True),
                                     self._pipe(up_reader, writer, False))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._streams.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    to_peer: bool) -> None:
        try:
            while data := await src.read(SPLICE_CHUNK):
                dst.write(data)
                await dst.drain()
                if to_peer:
                    self._bytes_to_peer += len(data)
                else:
                    self._bytes_from_peer += len(data)
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            dst.close()

    async def close(self) -> None:
        """End every stream. Idempotent."""
        self._closing = True
        streams = [t for t in self._streams if t is not asyncio.current_task()]
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
