"""The two ends of a tether tunnel, each wiring tubes, managers, tunnels and signaling.

ConnectSide listens on a local TCP port and offers tubes; ExposeSide answers them and dials
its target for every stream. Both route peer signals through a SignalRouter to the tube's
TunnelConnectionManager, send the core's candidates and the managers' restart offers to the
peer through the signaling client, and give every tube a manager. A tube the manager gives
up on is closed; the connecting side then offers a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import signals
from .connection_manager import (
    ConnectionState,
    ICERestartPolicy,
    ManagerRegistry,
    TunnelConnectionManager,
)
from .cores.aiortc_core import AiortcTubeRegistry
from .router import SignalRouter
from .signaling import SignalingClient
from .tunnel import Tunnel

logger = logging.getLogger(__name__)

ENDED = frozenset({ConnectionState.FAILED, ConnectionState.TERMINATED})


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


class Side:
    """What both ends share: a core, a manager registry, a signaling client, a router."""

    initiator = False

    def __init__(
        self,
        name: str,
        *,
        signal_url: str,
        token: str,
        core: Any = None,
        host_addresses: Sequence[str] | None = None,
        policy: ICERestartPolicy | None = None,
        window: int | None = None,
    ) -> None:
        self.name = name
        self.core = core if core is not None else AiortcTubeRegistry(host_addresses=host_addresses)
        self.policy = policy
        self.window = window
        self.managers = ManagerRegistry()
        self.tubes: dict[str, TubeHandle] = {}
        self.client = SignalingClient(signal_url, token, name, self._on_peer_signal)
        self.router = SignalRouter(
            self.managers, reply=self.client.send, on_unknown_tube=self._on_unknown_tube
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        """Close every tube, the signaling client and every task; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for tube_id in list(self.tubes):
            await self._drop_tube(tube_id, "shutting down")
        await self.client.close()
        if hasattr(self.core, "close"):
            await self.core.close()

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
            if handle.tunnel is not None:
                row.update(handle.tunnel.stats)
            rows.append(row)
        return rows

    # -- signal plumbing -----------------------------------------------------------------

    async def _on_peer_signal(self, signal: signals.Signal) -> None:
        await self.router.route(signal)

    async def _on_unknown_tube(self, signal: signals.Signal) -> bool:
        return False

    async def _on_core_signal(self, signal: signals.Signal) -> None:
        """The seed's signal_from_rust: the core's own events, by kind."""
        if signal["kind"] in (signals.ICE_CANDIDATE, signals.OFFER, signals.ANSWER):
            await self.client.send(signal)
            return
        manager = self.managers.get(signal["tube_id"])
        if manager is not None:
            await manager.handle_signal(signal)

    # -- tubes ---------------------------------------------------------------------------

    def _new_handle(self, tube_id: str) -> TubeHandle:
        kwargs: dict[str, Any] = {"initiator": self.initiator}
        if self.policy is not None:
            kwargs["policy"] = self.policy
        manager = TunnelConnectionManager(
            tube_id, self.name, self.core, self.client.send, **kwargs
        )
        handle = TubeHandle(tube_id, manager)
        manager.add_state_change_callback(self._on_state_change)
        self.managers.register(manager)
        self.tubes[tube_id] = handle
        return handle

    def _on_state_change(self, tube_id: str, state: ConnectionState) -> None:
        logger.debug("tube %s: %s", tube_id, state.value)
        handle = self.tubes.get(tube_id)
        if handle is not None and state in ENDED and not handle.ended.is_set():
            handle.ended.set()
            if state is ConnectionState.FAILED:
                self._spawn(self._drop_tube(tube_id, "the connection manager gave up"))

    def _attach_tunnel(self, handle: TubeHandle, target: tuple[str, int] | None) -> None:
        handle.attach_task = asyncio.create_task(
            self._run_attach(handle, target), name=f"tether-attach-{handle.tube_id}"
        )

    async def _run_attach(self, handle: TubeHandle, target: tuple[str, int] | None) -> None:
        channel = await self.core.wait_channel(handle.tube_id)
        handle.connect_ms = (time.monotonic() - handle.created_at) * 1000.0
        kwargs: dict[str, Any] = {"name": handle.tube_id, "target": target}
        if self.window is not None:
            kwargs["window"] = self.window
        tunnel = Tunnel(channel, **kwargs)
        tunnel.start()
        handle.tunnel = tunnel
        logger.info("tube %s: tunnel open after %.0f ms", handle.tube_id, handle.connect_ms)
        self._tunnel_ready(handle)

    def _tunnel_ready(self, handle: TubeHandle) -> None:
        """Hook for the connecting side."""

    async def _drop_tube(self, tube_id: str, reason: str) -> None:
        handle = self.tubes.pop(tube_id, None)
        if handle is None:
            return
        logger.info("tube %s: closing (%s)", tube_id, reason)
        handle.ended.set()
        if handle.attach_task is not None:
            handle.attach_task.cancel()
            await asyncio.gather(handle.attach_task, return_exceptions=True)
        if handle.tunnel is not None:
            await handle.tunnel.close()
        await self.managers.unregister(tube_id)
        await self.core.close_tube(tube_id, reason=reason)

    def _spawn(self, coro: Any) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class ExposeSide(Side):
    """Answers tubes offered by the peer and dials ``target`` for each of their streams."""

    initiator = False

    def __init__(self, name: str, *, target: tuple[str, int], **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.target = target

    async def _on_unknown_tube(self, signal: signals.Signal) -> bool:
        if signal["kind"] != signals.OFFER:
            return False
        tube_id = signal["tube_id"]
        logger.info("tube %s: offer received, answering", tube_id)
        handle = self._new_handle(tube_id)
        try:
            result = await self.core.create_tube(
                self.name, {}, offer=signal["data"], tube_id=tube_id,
                signal_callback=self._on_core_signal,
            )
        except Exception as exc:
            logger.error("tube %s: cannot answer the offer: %s", tube_id, exc)
            await self._drop_tube(tube_id, "bad offer")
            await self.client.send(signals.make_signal(
                tube_id, self.name, signals.ERROR, f"cannot answer the offer: {exc}"))
            return True
        await self.client.send(signals.make_signal(
            tube_id, self.name, signals.ANSWER, result["answer"]))
        self._attach_tunnel(handle, self.target)
        return True


class ConnectSide(Side):
    """Listens on a local port; carries every accepted connection through the current tube."""

    initiator = True

    def __init__(
        self,
        name: str,
        *,
        listen: tuple[str, int],
        stream_wait: float = 30.0,
        retry_delays: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self.listen = listen
        self.stream_wait = stream_wait
        self.retry_delays = tuple(retry_delays)
        self.server: asyncio.Server | None = None
        self.current: TubeHandle | None = None
        self._ready = asyncio.Event()
        self._streams: set[asyncio.Task[Any]] = set()

    @property
    def listen_address(self) -> tuple[str, int]:
        assert self.server is not None, "start() first"
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        """Bind the listener first (port 0 picks one), then signaling, then the first tube."""
        host, port = self.listen
        self.server = await asyncio.start_server(self._on_client, host, port)
        await super().start()
        self._spawn(self._keep_a_tube())

    async def close(self) -> None:
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
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.current is not None
        return self.current

    async def _keep_a_tube(self) -> None:
        """Offer a tube; when it ends for good, offer another after a short delay."""
        failures = 0
        while not self._closed:
            handle = await self._offer_tube()
            await handle.ended.wait()
            self._ready.clear()
            await self._drop_tube(handle.tube_id, "replacing the tube")
            failures = 0 if handle.connect_ms is not None else failures + 1
            delay = self.retry_delays[min(failures, len(self.retry_delays) - 1)]
            logger.info("tube %s ended; offering a new tube in %.0f s", handle.tube_id, delay)
            await asyncio.sleep(delay)

    async def _offer_tube(self) -> TubeHandle:
        tube_id = secrets.token_urlsafe(12)
        handle = self._new_handle(tube_id)
        self.current = handle
        logger.info("tube %s: offering to %r", tube_id, self.name)
        result = await self.core.create_tube(
            self.name, {}, tube_id=tube_id, signal_callback=self._on_core_signal
        )
        await self.client.send(signals.make_signal(tube_id, self.name, signals.OFFER, result["offer"]))
        self._attach_tunnel(handle, None)
        return handle

    def _tunnel_ready(self, handle: TubeHandle) -> None:
        if handle is self.current:
            self._ready.set()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            try:
                handle = await self.wait_ready(self.stream_wait)
            except TimeoutError:
                logger.error("no tube to %r after %.0f s; closing the client connection "
                             "(is `tether expose %s` running?)", self.name, self.stream_wait,
                             self.name)
                writer.close()
                return
            assert handle.tunnel is not None
            await handle.tunnel.carry(reader, writer)
        except asyncio.CancelledError:
            # Shutting down. This task is the root of the connection, owned by close();
            # ending quietly spares asyncio's stream callback from reporting the cancel.
            writer.close()
        finally:
            self._streams.discard(task)
