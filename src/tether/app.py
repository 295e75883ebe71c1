"""The two ends of a tether tunnel, each wiring tubes, managers, tunnels and signaling.

ConnectSide listens on a local TCP port and offers tubes; ExposeSide answers them and dials
its target for every stream. Both route peer signals through a SignalRouter to the tube's
TunnelConnectionManager, send the core's candidates and the managers' restart offers to the
peer through the signaling client, and give every tube a manager.

What keeps a tunnel alive around the managers lives here too:

- the network monitor's changes go to every manager at once (restart now, no waiting for the
  path to fall silent) and make the signaling client reconnect from the new address;
- while any tube is in trouble the signaling connection is checked every second or two, so a
  restart offer never sits in a socket that died with an old address;
- a tube one side drops is announced to the other (a ``channel_closed`` signal with a
  ``reason``), and a signal for a tube a side does not know is answered the same way at
  once, so after a peer restarts its streams close cleanly and a new tube is offered at once;
- the sides never give up on a tube that worked (``keep_trying``): they go on retrying at
  the longest backoff, while a tube that never connects is replaced after the connect timeout.

With a tunnel ``secret`` every signal to the peer is sealed (``tether.sealing``): the relay
sees a conversation id derived from the secret and the name, and a signal that does not
open (forged, changed, replayed, or from someone with only the relay token) is dropped and
counted, with one clear warning, while the tunnel waits for the real peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import signals
from .connection_manager import (
    PEER_KEY,
    ConnectionState,
    ICERestartPolicy,
    ManagerRegistry,
    TunnelConnectionManager,
)
from .allow import AllowList
from .events import EventLog
from .router import CLOSE_REASON, UNKNOWN_TUBE, SignalRouter
from .sealing import SAME_ROLE, UNAUTHENTIC, UNSEALED, SealError, Sealer
from .signaling import SignalingClient
from .socks import SocksServer
from .signaling.client import SignalingError
from .tunnel import Tunnel, format_hostport, reasons
from .tunnel.reasons import DENIED, Refusal
from .tubestats import SideStats

if TYPE_CHECKING:  # pyroute2 loads with the monitor, off the loop (see Side.start)
    from .netmon import SharedMonitor

logger = logging.getLogger(__name__)

S = ConnectionState
TROUBLE = frozenset({S.DEGRADED, S.RECONNECTING, S.FAILED})
# How often the signaling connection is checked while a tube is in trouble, and how long a
# ping may take before the connection counts as dead.
SIGNALING_CHECK_INTERVAL = 1.0
SIGNALING_CHECK_TIMEOUT = 2.0
# The local listener's accept queue: a burst of connects beyond it is reset by the kernel.
LISTEN_BACKLOG = 1024
# How long close() waits for the peer to acknowledge our goodbyes.
GOODBYE_TIMEOUT = 1.0
# Reasons carried by our channel_closed signals (besides the router's UNKNOWN_TUBE).
CLOSED = "closed"
SHUTDOWN = "shutdown"


def default_policy() -> ICERestartPolicy:
    """The seed's policy, plus: never give up on a tube that connected once."""
    return ICERestartPolicy(keep_trying=True)


@dataclass(eq=False)
class TubeHandle:
    """One tube as the app sees it: its manager, its tunnel once the channel opens."""

    tube_id: str
    manager: TunnelConnectionManager
    created_at: float = field(default_factory=time.monotonic)
    connect_ms: float | None = None
    tunnel: Tunnel | None = None
    attach_task: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""
    closed_by_peer: bool = False


class Side:
    """What both ends share: a core, a manager registry, a signaling client, a router."""

    initiator = False
    role = "expose"

    def __init__(
        self,
        name: str,
        *,
        signal_url: str | Sequence[str],
        token: str,
        core: Any = None,
        host_addresses: Sequence[str] | None = None,
        policy: ICERestartPolicy | None = None,
        window: int | None = None,
        events: EventLog | None = None,
        watch_network: bool | SharedMonitor = False,
        secret: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.name = name
        self.sealer = Sealer(secret, name, self.role) if secret is not None else None
        # Signals refused by the sealer, by reason (wrong secret, replayed, unsealed...).
        self.refused: dict[str, int] = {}
        if core is None:
            from .cores.aiortc_core import AiortcTubeRegistry  # aiortc costs ~0.3 s to import

            core = AiortcTubeRegistry(host_addresses=host_addresses)
        self.core = core
        self.policy = policy if policy is not None else default_policy()
        self.window = window
        self.events = events if events is not None else EventLog(None)
        self.managers = ManagerRegistry()
        self.tubes: dict[str, TubeHandle] = {}
        conversation = self.sealer.conversation_id if self.sealer is not None else name
        self.client = SignalingClient(
            signal_url, token, conversation, self._on_peer_signal,
            on_state=self._on_signaling_state, on_peer=self._on_peer_presence,
            ca_file=ca_file,
        )
        self.router = SignalRouter(
            self.managers, reply=self._send, on_unknown_tube=self._on_unknown_tube
        )
        self.monitor: Any = None
        # True: a monitor of our own; a netmon.SharedMonitor: one shared with the process's
        # other tunnels (tether up).
        self._network: Any = watch_network if hasattr(watch_network, "subscribe") else None
        if watch_network and self._network is None:
            from .netmon import NetworkMonitor

            self.monitor = NetworkMonitor(self._on_network_change)
        self._trouble = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.started_at = time.time()
        self.stats = SideStats(self)  # history for status(): rates, idle, restart causes

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        # The network monitor starts while signaling connects: the first offer need not
        # wait for netlink (pyroute2 alone takes ~0.2 s to load).
        watching = (self.monitor.start() if self.monitor is not None
                    else self._network.subscribe(self._on_network_change)
                    if self._network is not None else None)
        monitor = (asyncio.create_task(watching, name="tether-netmon-start")
                   if watching is not None else None)
        try:
            await self.client.start()
        except BaseException:
            if monitor is not None:
                monitor.cancel()
                await asyncio.gather(monitor, return_exceptions=True)
            raise
        if monitor is not None:
            await monitor
        self._spawn(self._watch_signaling())
        self._spawn(self.stats.run())

    async def close(self) -> None:
        """Tell the peer, close every tube, the signaling client and every task; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.monitor is not None:
            await self.monitor.close()
        if self._network is not None:
            await self._network.unsubscribe(self._on_network_change)
        for tube_id in list(self.tubes):
            await self._drop_tube(tube_id, "shutting down", tell=SHUTDOWN)
        if self.client.connected:
            # Our goodbyes let the peer re-offer at once instead of finding out later.
            with contextlib.suppress(TimeoutError, SignalingError):
                async with asyncio.timeout(GOODBYE_TIMEOUT):
                    await self.client.drain()
        await self.client.close()
        if hasattr(self.core, "close"):
            await self.core.close()
        self.events.close()

    async def __aenter__(self) -> "Side":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def snapshot(self) -> list[dict[str, Any]]:
        """Each tube's manager snapshot with its tunnel's figures, for status displays."""
        rows = []
        for handle in self.tubes.values():
            row = dict(handle.manager.snapshot())
            row["connect_ms"] = handle.connect_ms
            row["retrying"] = handle.manager.machine.retrying
            if handle.tunnel is not None:
                row.update(handle.tunnel.stats)
            rows.append(row)
        return rows

    def status(self) -> dict[str, Any]:
        """Everything `tether status` shows: the side, its signaling, every tube (state,
        path, RTT, rates, bytes, streams, restarts and their causes) and recent endings."""
        self.stats.sample()
        path_of = getattr(self.core, "path_info", None)  # a core that can tell the path
        tubes = [self.stats.tube(h, path_of(h.tube_id) if path_of is not None else None)
                 for h in list(self.tubes.values())]
        status: dict[str, Any] = {
            "name": self.name, "role": self.role, "started_at": self.started_at,
            "uptime_seconds": time.time() - self.started_at,
            "signaling": {"connected": self.client.connected},
            "sealed": self.sealer is not None, "refused": dict(self.refused),
            "tubes": tubes, "closed_tubes": list(self.stats.closed),
            "restarts_by_reason": dict(self.stats.restarts),
            "rate_to_peer": sum(t["rate_to_peer"] for t in tubes),
            "rate_from_peer": sum(t["rate_from_peer"] for t in tubes),
        }
        target = getattr(self, "target", None)
        if target is not None:
            status["target"] = f"{target[0]}:{target[1]}"
        allow = getattr(self, "allow", None)
        if allow is not None:
            status["allow"] = str(allow)
        server = getattr(self, "server", None)
        if server is not None and server.sockets:
            host, port = server.sockets[0].getsockname()[:2]
            status["listen"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        socks = getattr(self, "socks", None)
        if socks is not None and socks.listening:
            status["socks"] = format_hostport(*socks.address)
        return status

    async def restart(self) -> list[str]:
        """A manual ICE restart of every tube (allowed even after giving up); returns the
        tubes now restarting."""
        self.stats.manual_restart()
        restarted = []
        for handle in list(self.tubes.values()):
            logger.info("tube %s: manual ICE restart requested", handle.tube_id)
            if await handle.manager.restart(manual=True):
                restarted.append(handle.tube_id)
        return restarted

    # -- signal plumbing -----------------------------------------------------------------

    def _on_peer_signal(self, wire: signals.Signal) -> Awaitable[None] | None:
        """The signaling client's ``on_signal``: a plain call that returns what is left to
        await, if anything (the client awaits it), so a candidate costs no coroutine here."""
        signal = self._open(wire)
        if signal is None:
            return None
        kind = signal.get("kind")
        if kind == signals.CHANNEL_CLOSED:
            return self._peer_closed(signal)
        if self._closed:
            if kind == signals.OFFER:  # a tube offered while we say goodbye: refuse it
                return self._send(signals.make_signal(
                    signal["tube_id"], self.name, signals.CHANNEL_CLOSED,
                    "the peer is shutting down", **{CLOSE_REASON: SHUTDOWN}))
            return None
        return self.router.route_nowait(signal)

    async def _on_unknown_tube(self, signal: signals.Signal) -> bool:
        return False

    async def _on_core_signal(self, signal: signals.Signal) -> None:
        """The seed's signal_from_rust: the core's own events, by kind."""
        if signal["kind"] in (signals.ICE_CANDIDATE, signals.OFFER, signals.ANSWER):
            await self._send(signal)
            return
        manager = self.managers.get(signal["tube_id"])
        if manager is not None:
            await manager.handle_signal(signal, from_peer=False)

    def _open(self, wire: signals.Signal) -> signals.Signal | None:
        """The peer's signal as sent, or None if it must be dropped (see the module doc)."""
        if wire.get("kind") == signals.ERROR and PEER_KEY not in wire:
            logger.debug("the signaling relay reported: %s", wire.get("data"))
            return None
        if self.sealer is None:
            return wire
        try:
            return self.sealer.open(wire)
        except SealError as exc:
            count = self.refused.get(exc.reason, 0) + 1
            self.refused[exc.reason] = count
            if exc.reason == UNAUTHENTIC:
                message = f"a peer with the wrong secret tried to join tunnel {self.name!r}"
            elif exc.reason == SAME_ROLE:
                message = (f"another `tether {self.role} {self.name}` is on this tunnel; "
                           f"a tunnel joins one expose and one connect: stop one of them")
            elif exc.reason == UNSEALED:
                message = (f"a peer without the tunnel secret sent a signal to tunnel "
                           f"{self.name!r}")
            else:
                message = f"a signal for tunnel {self.name!r} was refused: {exc}"
            if count == 1:
                logger.warning("%s; dropped (the tunnel waits for the real peer)", message)
            else:
                logger.debug("%s (%d so far)", message, count)
            self.events.emit("refused", reason=exc.reason, detail=str(exc))
            return None

    async def _send(self, signal: signals.Signal) -> None:
        """Seal and send to the peer; a closed client (we are stopping) is no error."""
        if self.sealer is not None:
            signal = self.sealer.seal(signal)  # queued at once below: counters stay in order
        try:
            await self.client.send(signal)
        except SignalingError as exc:
            logger.debug("tube %s: %s signal not sent: %s", signal.get("tube_id"),
                         signal.get("kind"), exc)

    def _withdraw(self, tube_id: str, kinds: frozenset[str]) -> None:
        dropped = self.client.discard(tube_id, kinds)
        if dropped:
            logger.debug("tube %s: withdrew %d queued signals", tube_id, dropped)

    async def _peer_closed(self, signal: signals.Signal) -> None:
        """The peer says a tube is gone at its end (closed, shut down, or never known)."""
        tube_id = signal["tube_id"]
        if tube_id not in self.tubes:
            return
        reason = signal.get(CLOSE_REASON) or CLOSED
        detail = {UNKNOWN_TUBE: "the peer does not know it (did it restart?)",
                  SHUTDOWN: "the peer is shutting down"}.get(reason, "the peer closed it")
        logger.info("tube %s: %s", tube_id, detail)
        self.tubes[tube_id].closed_by_peer = True
        await self._drop_tube(tube_id, detail, tell=None)

    # -- network and signaling health ----------------------------------------------------

    async def _on_network_change(self, change: Any) -> None:
        """The monitor saw our addresses or routes change: act at once, everywhere."""
        logger.info("network change: %s (%s)", change.type.value, change.detail)
        self.events.emit("network_change", change=change.type.value, detail=change.detail)
        self.stats.network_changed()
        self.client.reconnect(f"network change: {change.detail}")
        for manager in self.managers.list():
            await manager.handle_network_change(change.type, {"detail": change.detail})

    def _on_signaling_state(self, state: str) -> None:
        self.events.emit("signaling", state=state)

    def _on_peer_presence(self, what: str) -> None:
        self.events.emit("peer", what=what)

    async def _watch_signaling(self) -> None:
        """While any tube is in trouble, make sure signaling is not a dead socket."""
        client = self.client
        while True:
            await self._trouble.wait()
            if client.connected:
                await client.check(SIGNALING_CHECK_TIMEOUT)
            await asyncio.sleep(SIGNALING_CHECK_INTERVAL)

    def _update_trouble(self) -> None:
        if any(h.manager.state in TROUBLE for h in self.tubes.values()):
            self._trouble.set()
        else:
            self._trouble.clear()

    # -- tubes ---------------------------------------------------------------------------

    def _new_handle(self, tube_id: str) -> TubeHandle:
        manager = TunnelConnectionManager(
            tube_id, self.name, self.core, self._send, initiator=self.initiator,
            policy=self.policy, signal_withdraw=self._withdraw,
        )
        handle = TubeHandle(tube_id, manager)
        manager.add_state_change_callback(self._on_state_change)
        self.managers.register(manager)
        self.tubes[tube_id] = handle
        return handle

    def _on_state_change(self, tube_id: str, state: ConnectionState) -> None:
        logger.debug("tube %s: %s", tube_id, state.value)
        handle = self.tubes.get(tube_id)
        self.stats.state_changed(tube_id, state, handle.manager.machine if handle else None)
        extra = {}
        if state is S.FAILED and handle is not None:
            extra["retrying"] = handle.manager.machine.retrying  # not given up: trying on
        self.events.emit("state", tube_id=tube_id, state=state.value, **extra)
        self._update_trouble()
        if handle is None or handle.ended.is_set():
            return
        if state is S.FAILED and handle.manager.machine.retrying:
            logger.warning("tube %s: not connected; still trying every %.0f s until stopped",
                           tube_id, self.policy.restart_backoff_max)
        elif state is S.FAILED:
            self._spawn(self._drop_tube(tube_id, "the connection manager gave up"))
        elif state is S.TERMINATED:
            handle.ended.set()
        elif state is S.CONNECTED:
            self._tube_connected(handle)

    def _tube_connected(self, handle: TubeHandle) -> None:
        """Hook: a tube reached CONNECTED (first time or again)."""

    def _attach_tunnel(self, handle: TubeHandle, target: tuple[str, int] | None) -> None:
        if self.tubes.get(handle.tube_id) is not handle:
            return  # dropped while the core was still making it
        handle.attach_task = asyncio.create_task(
            self._run_attach(handle, target), name=f"tether-attach-{handle.tube_id}"
        )

    async def _run_attach(self, handle: TubeHandle, target: tuple[str, int] | None) -> None:
        try:
            channel = await self.core.wait_channel(handle.tube_id)
        except (ConnectionError, KeyError) as exc:  # closed before its channel opened
            logger.info("tube %s: %s", handle.tube_id, exc)
            return
        handle.connect_ms = (time.monotonic() - handle.created_at) * 1000.0
        kwargs: dict[str, Any] = {"name": handle.tube_id, "target": target}
        if self.window is not None:
            kwargs["window"] = self.window
        kwargs.update(self._tunnel_options())

        def failed(reason: str) -> None:  # the peer broke the tunnel protocol: a new tube
            self._spawn(self._drop_tube(handle.tube_id, f"tunnel failed: {reason}"))

        # A core that forwards TCP itself (the Rust core) makes its own tunnel object.
        make_tunnel = getattr(self.core, "make_tunnel", Tunnel)
        tunnel = make_tunnel(channel, on_fail=failed, **kwargs)
        tunnel.start()
        handle.tunnel = tunnel
        logger.info("tube %s: tunnel open after %.0f ms", handle.tube_id, handle.connect_ms)
        self.events.emit("tube", tube_id=handle.tube_id, what="open",
                         detail=f"{handle.connect_ms:.0f} ms")
        self._tunnel_ready(handle)

    def _tunnel_ready(self, handle: TubeHandle) -> None:
        """Hook for the connecting side."""

    def _tunnel_options(self) -> dict[str, Any]:
        """Hook: extra keywords for every Tunnel this side makes."""
        return {}

    async def _drop_tube(self, tube_id: str, reason: str, *, tell: str | None = CLOSED) -> None:
        """Close a tube and its streams; ``tell`` the peer why (None: it already knows)."""
        handle = self.tubes.pop(tube_id, None)
        if handle is None:
            return
        logger.info("tube %s: closing (%s)", tube_id, reason)
        self.events.emit("tube", tube_id=tube_id, what="closed", detail=reason)
        handle.end_reason = reason
        self.stats.tube_closed(tube_id, reason)
        handle.ended.set()
        self._withdraw(tube_id, signals.KINDS)  # nothing queued for it matters any more
        if tell is not None:
            await self._send(signals.make_signal(
                tube_id, self.name, signals.CHANNEL_CLOSED, reason, **{CLOSE_REASON: tell}))
        if handle.attach_task is not None:
            handle.attach_task.cancel()
            await asyncio.gather(handle.attach_task, return_exceptions=True)
        if handle.tunnel is not None:
            await handle.tunnel.close()
        await self.managers.unregister(tube_id)
        await self.core.close_tube(tube_id, reason=reason)
        self._update_trouble()

    def _spawn(self, coro: Any) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: %s failed", self.name, task.get_name(), exc_info=task.exception())


class ExposeSide(Side):
    """Answers tubes offered by the peer and dials ``target`` for each of their streams.

    A connecting peer keeps one tube; when a new one connects, older ones are closed. At
    most ``max_tubes`` exist at once: an offer beyond that replaces the oldest that never
    connected (or else the oldest).
    """

    initiator = False

    def __init__(self, name: str, *, target: tuple[str, int] | None = None,
                 allow: AllowList | None = None, max_tubes: int = 4, **kwargs: Any) -> None:
        if target is None and not allow:
            raise ValueError("give a target (--target HOST:PORT), an allow-list for targets "
                             "the peer names (--allow HOST:PORTS,...), or both")
        super().__init__(name, **kwargs)
        self.target = target
        # Targets the peer may name (SOCKS); None: only the fixed target. Swappable.
        self.allow = allow
        self.max_tubes = max_tubes

    def _tunnel_options(self) -> dict[str, Any]:
        if self.allow is None:
            return {}

        async def policy(host: str, port: int) -> list[tuple[str, int]]:
            allow = self.allow  # read per stream: a reload applies to new streams
            if allow is None:
                raise Refusal("this side no longer takes named targets", DENIED)
            return await allow.resolve(host, port)

        return {"dial_policy": policy}

    async def _on_unknown_tube(self, signal: signals.Signal) -> bool:
        if signal["kind"] != signals.OFFER:
            return False
        tube_id = signal["tube_id"]
        if len(self.tubes) >= self.max_tubes:
            handles = sorted(self.tubes.values(), key=lambda h: (h.connect_ms is not None,
                                                                h.created_at))
            await self._drop_tube(handles[0].tube_id, "too many tubes; replaced by a new one")
        logger.info("tube %s: offer received, answering", tube_id)
        handle = self._new_handle(tube_id)
        try:
            result = await self.core.create_tube(
                self.name, {"target": self.target}, offer=signal["data"], tube_id=tube_id,
                signal_callback=self._on_core_signal,
            )
        except Exception as exc:
            logger.error("tube %s: cannot answer the offer: %s", tube_id, exc)
            await self._drop_tube(tube_id, "bad offer", tell=None)
            await self._send(signals.make_signal(
                tube_id, self.name, signals.ERROR, f"cannot answer the offer: {exc}"))
            return True
        if self.tubes.get(tube_id) is not handle:  # the peer closed it meanwhile
            await self.core.close_tube(tube_id, reason="closed while answering")
            return True
        self.events.emit("tube", tube_id=tube_id, what="answered", detail="")
        await self._send(signals.make_signal(
            tube_id, self.name, signals.ANSWER, result["answer"]))
        self._attach_tunnel(handle, self.target)
        return True

    def _tube_connected(self, handle: TubeHandle) -> None:
        for other in [h for h in self.tubes.values() if h is not handle]:
            if other.created_at < handle.created_at:
                self._spawn(self._drop_tube(other.tube_id, "the peer moved to a newer tube"))


class ConnectSide(Side):
    """Listens on a local port; carries every accepted connection through the current tube.

    There is one current tube. When it ends (the peer closed it or does not know it, or it
    never connected), another is offered: at once if the peer said so, else after a short
    delay that the peer (re)joining the relay cuts short. Connections accepted while no
    tube is up wait up to ``stream_wait`` seconds for the next one.
    """

    initiator = True
    role = "connect"

    def __init__(
        self,
        name: str,
        *,
        listen: tuple[str, int] | None,
        stream_wait: float = 10.0,
        retry_delays: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0),
        socks: tuple[str, int] | None = None,
        socks_users: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if listen is None and socks is None:
            raise ValueError("give a local address to listen on, a SOCKS address, or both")
        # A SOCKS5 server whose clients name their targets (tether.socks); checked first.
        self.socks = (SocksServer(self.carry, *socks, users=socks_users)
                      if socks is not None else None)
        super().__init__(name, **kwargs)
        self.listen = listen
        self.stream_wait = stream_wait
        self.retry_delays = tuple(retry_delays)
        self.server: asyncio.Server | None = None
        self.current: TubeHandle | None = None
        self._ready = asyncio.Event()
        # Set when the peer joins or our signaling is back after a drop: the reasons an
        # offer that failed may now work, so a retry need not wait out its delay.
        self._try_now = asyncio.Event()
        self._streams: set[asyncio.Task[Any]] = set()

    @property
    def listen_address(self) -> tuple[str, int]:
        assert self.server is not None, "start() first"
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        """Bind the listener first (port 0 picks one), then signaling, then the first tube."""
        if self.listen is not None:  # None: streams come only through carry() (SOCKS)
            host, port = self.listen
            # asyncio's default backlog (100) resets clients that connect in a burst.
            self.server = await asyncio.start_server(self._on_client, host, port,
                                                     backlog=LISTEN_BACKLOG)
        if self.socks is not None:
            await self.socks.start()
        await super().start()
        self._spawn(self._keep_a_tube())

    async def close(self) -> None:
        if self.socks is not None:
            await self.socks.close()
        if self.server is not None:
            self.server.close()
        for task in list(self._streams):
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)
        await super().close()
        if self.server is not None:
            await self.server.wait_closed()

    async def wait_ready(self, timeout: float | None = None) -> TubeHandle:
        """Wait until a tube's tunnel is open; return it."""
        async with asyncio.timeout(timeout):
            await self._ready.wait()
        assert self.current is not None
        return self.current

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    target: tuple[str, int] | None = None,
                    on_open: Callable[[str | None], None] | None = None) -> None:
        """Carry one client connection through the current tube (waiting up to
        ``stream_wait`` s for one), to ``target`` if given (the peer's allow-list decides),
        else to the peer's fixed target. ``on_open`` as in :meth:`Tunnel.carry`."""
        try:
            handle = await self.wait_ready(self.stream_wait)
        except TimeoutError:
            reason = (f"no tube to {self.name!r} after {self.stream_wait:.0f} s (is `tether "
                      f"expose {self.name}` running, with the same relay and secret?)")
            logger.error("%s; closing the client connection", reason)
            if on_open is not None:
                on_open(reasons.tag(reason, reasons.NET_UNREACHABLE))
            writer.close()
            return
        assert handle.tunnel is not None
        if target is None and on_open is None:  # a plain listener's client: any core's tunnel
            await handle.tunnel.carry(reader, writer)
        else:  # a SOCKS client names its target (tether's own tunnel)
            await handle.tunnel.carry(reader, writer, target, on_open)

    async def _keep_a_tube(self) -> None:
        """Offer a tube; when it ends, offer another (at once if the peer closed it)."""
        failures = 0
        while not self._closed:
            self._try_now.clear()
            if self.client.peer_present is False:
                # An offer to nobody would time out every connect_timeout with a warning,
                # and go stale: offer when the other end joins.
                logger.info("waiting for the other end of %r to join the relay (`tether "
                            "expose %s`, same relay and secret)", self.name, self.name)
                while self.client.peer_present is False:
                    await self._try_now.wait()
                    self._try_now.clear()
            handle = await self._offer_tube()
            await handle.ended.wait()
            self._ready.clear()
            await self._drop_tube(handle.tube_id, "replacing the tube")
            if handle.connect_ms is not None:
                failures = 0
            # A core whose restart cannot move a path (the Rust core) gives a tube that
            # worked up instead: its replacement is the restart, so no waiting.
            replaced = (handle.connect_ms is not None
                        and getattr(self.core, "restart_replaces_tube", False))
            if handle.closed_by_peer or replaced:
                logger.info("tube %s ended (%s); offering a new tube now",
                            handle.tube_id, handle.end_reason)
                continue
            failures += 1
            delay = self.retry_delays[min(failures - 1, len(self.retry_delays) - 1)]
            logger.info("tube %s ended (%s); offering a new tube in %.0f s, or as soon as "
                        "the peer or our signaling is back", handle.tube_id, handle.end_reason,
                        delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._try_now.wait()

    async def _offer_tube(self) -> TubeHandle:
        tube_id = secrets.token_urlsafe(12)
        handle = self._new_handle(tube_id)
        self.current = handle
        logger.info("tube %s: offering to %r", tube_id, self.name)
        result = await self.core.create_tube(
            self.name, {}, tube_id=tube_id, signal_callback=self._on_core_signal
        )
        self.events.emit("tube", tube_id=tube_id, what="offered", detail="")
        await self._send(signals.make_signal(tube_id, self.name, signals.OFFER, result["offer"]))
        self._attach_tunnel(handle, None)
        return handle

    def _on_signaling_state(self, state: str) -> None:
        super()._on_signaling_state(state)
        if state == "connected":
            # Back after a drop (our network was down?): retry a failed offer now, not at
            # the end of its backoff. The relay's presence message follows at once.
            self._try_now.set()

    def _on_peer_presence(self, what: str) -> None:
        """A peer joined the relay: maybe a restarted one. Ask it about our tube at once."""
        super()._on_peer_presence(what)
        if what != "joined":
            return
        self._try_now.set()
        handle = self.current
        if handle is None or handle.tube_id not in self.tubes:
            return
        if handle.connect_ms is not None:
            # A peer that does not know the tube answers with channel_closed right away.
            self._spawn(self._send(signals.make_signal(
                handle.tube_id, self.name, signals.KEEPALIVE, "")))
        else:
            # Not connected yet: its offer may have gone to a peer that has left since (and
            # acknowledged it). A fresh offer for the peer that is here now costs ~50 ms.
            self._spawn(self._drop_tube(handle.tube_id, "offering again to the peer that "
                                                        "just joined"))

    def _tunnel_ready(self, handle: TubeHandle) -> None:
        if handle is self.current:
            self._ready.set()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await self.carry(reader, writer)
        except asyncio.CancelledError:
            # Shutting down. This task is the root of the connection, owned by close();
            # ending quietly spares asyncio's stream callback from reporting the cancel.
            writer.close()
        finally:
            self._streams.discard(task)
