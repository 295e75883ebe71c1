"""Open a tether tunnel from Python in a few lines.

::

    import tether

    async with tether.expose("db", signal="ws://relay:8765", token=TOKEN, secret=SECRET,
                             target="127.0.0.1:5432"):
        ...  # answering tubes; every stream dials 127.0.0.1:5432

    async with tether.connect("db", signal="ws://relay:8765", token=TOKEN,
                              secret=SECRET) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)

Both are async context managers (or call :meth:`start` / :meth:`close` yourself). Each
tunnel has its own signaling connection, unless given ``mux=`` (a
:class:`~tether.signaling.mux.SignalingMux`): then tunnels share that one connection (what
``tether up`` does with the tunnels of a config file). The CLI's ``expose`` and ``connect``
commands are these plus a live table.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .allow import AllowList
from .app import ConnectSide, ExposeSide, Side
from .connection_manager import ICERestartPolicy
from .signaling.mux import SignalingMux
from .tunnel import parse_hostport

if TYPE_CHECKING:
    from .netmon import SharedMonitor

logger = logging.getLogger(__name__)

Address = str | tuple[str, int]


def _address(value: Address | None, what: str) -> tuple[str, int] | None:
    if value is None or isinstance(value, tuple):
        return value
    try:
        return parse_hostport(value)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


CORES = ("aiortc", "keeper")


def build_core(core: str, loopback: bool, ice_servers: Sequence[str], turn_user: str | None,
               turn_password: str | None, liveness: Mapping[str, float] | None = None) -> Any:
    """The WebRTC core named ``core`` ("aiortc" or "keeper", the Rust core of
    ``pip install 'tether[keeper]'``); ValueError says what does not fit."""
    if core == "keeper":
        if loopback:
            raise ValueError("the keeper core never gathers 127.0.0.1; drop loopback")
        turn = [url for url in ice_servers if url.startswith(("turn:", "turns:"))]
        if len(turn) != len(ice_servers) or len(turn) > 1:
            raise ValueError("the keeper core takes one turn:/turns: server and no STUN")
        try:
            from .cores.keeper_core import KeeperTubeRegistry
        except ImportError as exc:
            raise ValueError(f"the keeper core is not installed ({exc}): "
                             f"pip install 'tether[keeper]'") from None
        try:
            return KeeperTubeRegistry(turn_url=turn[0] if turn else None,
                                      turn_username=turn_user, turn_password=turn_password)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
    if core != "aiortc":
        raise ValueError(f"unknown core {core!r}: {' or '.join(CORES)}")
    from .cores.aiortc_core import AiortcTubeRegistry
    from .cores.gathering import LOOPBACK

    return AiortcTubeRegistry(host_addresses=LOOPBACK if loopback else None,
                              ice_servers=list(ice_servers), turn_username=turn_user,
                              turn_password=turn_password, liveness=dict(liveness or {}))


def _core(core: Any, loopback: bool, ice_servers: Sequence[str], turn_user: str | None,
          turn_password: str | None, liveness: Mapping[str, float] | None) -> Any:
    """A core by name, or the core object given (it then belongs to the tunnel: closed with
    it)."""
    if not isinstance(core, str):
        return core
    return build_core(core, loopback, ice_servers, turn_user, turn_password, liveness)


class _Tunnel(ABC):
    """What both ends share: a side to start and close, as an async context manager."""

    side: Side

    @abstractmethod
    async def start(self) -> None:
        """Join the relay (and what else the end does before it is useful)."""

    def share_signaling(self, mux: SignalingMux | None) -> None:
        """Before :meth:`start`: carry this tunnel's conversation on ``mux`` (same relay
        URLs and token) instead of a connection of its own."""
        if mux is not None:
            self.side.client = mux.take_over(self.side.client)  # type: ignore[assignment]

    async def close(self) -> None:
        """Tell the peer, close every tube, stream and task. Idempotent."""
        await self.side.close()

    async def __aenter__(self) -> Any:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def snapshot(self) -> list[dict[str, Any]]:
        """Each tube's state and figures (what the live table shows)."""
        return self.side.snapshot()


class Connection(_Tunnel):
    """The connecting end: local connections (``listen``) and SOCKS clients (``socks``)
    are carried through the tunnel. See :func:`connect`."""

    def __init__(self, name: str, *, signal: str | Sequence[str], token: str, secret: str,
                 listen: Address | None = "127.0.0.1:0", socks: Address | None = None,
                 socks_users: Mapping[str, str] | None = None, wait: float | None = 30.0,
                 loopback: bool = False, ice_servers: Sequence[str] = (),
                 turn_user: str | None = None, turn_password: str | None = None,
                 ca: str | None = None, policy: ICERestartPolicy | None = None,
                 liveness: Mapping[str, float] | None = None, events: Any = None,
                 watch_network: bool | SharedMonitor = False, mux: SignalingMux | None = None,
                 core: Any = "aiortc") -> None:
        listen_at = _address(listen, "listen")
        socks_at = _address(socks, "socks")
        if listen_at is None and socks_at is None:
            raise ValueError("give listen, socks, or both")
        self.name = name
        self.wait = wait
        kwargs: dict[str, Any] = {}
        if events is not None:
            kwargs["events"] = events
        self.side: ConnectSide = ConnectSide(
            name, listen=listen_at, socks=socks_at, socks_users=socks_users,
            signal_url=signal, token=token, secret=secret,
            core=_core(core, loopback, ice_servers, turn_user, turn_password, liveness),
            policy=policy, ca_file=ca, watch_network=watch_network, **kwargs)
        self.share_signaling(mux)

    async def start(self) -> None:
        """Listen, join the relay, offer a tube; with ``wait``, return once it is open
        (TimeoutError after ``wait`` seconds: is the exposing side running?)."""
        await self.side.start()
        if self.wait is not None:
            await self.side.wait_ready(self.wait)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until a tube's tunnel is open."""
        await self.side.wait_ready(timeout)

    @property
    def address(self) -> tuple[str, int]:
        """Where local clients connect: (host, port)."""
        return self.side.listen_address

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        """The local port (the one picked, for port 0)."""
        return self.address[1]

    @property
    def socks_address(self) -> tuple[str, int] | None:
        """Where SOCKS5 clients connect: (host, port); None without ``socks=``."""
        if self.side.socks is None:
            return None
        return self.side.socks.address


class Exposure(_Tunnel):
    """The exposing end: answers tubes, dials ``target`` (or, for targets the peer names,
    what ``allow`` permits) for every stream. See :func:`expose`."""

    def __init__(self, name: str, *, signal: str | Sequence[str], token: str, secret: str,
                 target: Address | None = None, allow: str | Sequence[str] | None = None,
                 loopback: bool = False, ice_servers: Sequence[str] = (),
                 turn_user: str | None = None, turn_password: str | None = None,
                 ca: str | None = None, policy: ICERestartPolicy | None = None,
                 liveness: Mapping[str, float] | None = None, events: Any = None,
                 watch_network: bool | SharedMonitor = False, mux: SignalingMux | None = None,
                 core: Any = "aiortc") -> None:
        allow_list = AllowList.parse(allow) if allow else None
        kwargs: dict[str, Any] = {}
        if events is not None:
            kwargs["events"] = events
        self.name = name
        self.side: ExposeSide = ExposeSide(
            name, target=_address(target, "target"), allow=allow_list, signal_url=signal,
            token=token, secret=secret,
            core=_core(core, loopback, ice_servers, turn_user, turn_password, liveness),
            policy=policy, ca_file=ca, watch_network=watch_network, **kwargs)
        self.share_signaling(mux)

    async def start(self) -> None:
        """Join the relay and answer tubes as they are offered."""
        await self.side.start()


def connect(name: str, *, signal: str | Sequence[str], token: str, secret: str,
            listen: Address | None = "127.0.0.1:0", **options: Any) -> Connection:
    """The connecting end of tunnel ``name``, to use as ``async with ... as t``.

    ``listen``: local "HOST:PORT" or (host, port) to carry connections from (port 0:
    any free one, then read ``t.port``); ``socks``: also (or, with listen=None, only)
    a SOCKS5 server there (``socks_users``: {user: password}, required off loopback);
    ``wait``: seconds ``async with`` waits for the tunnel to open (None: do not wait).
    Further options: ``loopback``, ``ice_servers``, ``turn_user``, ``turn_password``,
    ``ca``, ``policy`` (an :class:`ICERestartPolicy`), ``liveness``, ``watch_network``
    (True, or a :class:`tether.netmon.SharedMonitor` shared with other tunnels),
    ``mux`` (a shared :class:`SignalingMux` for the same relay URLs and token), ``core``
    ("aiortc", the default, or "keeper"; or a core object).
    """
    return Connection(name, signal=signal, token=token, secret=secret, listen=listen,
                      **options)


def expose(name: str, *, signal: str | Sequence[str], token: str, secret: str,
           target: Address | None = None,
           allow: str | Sequence[str] | None = None, **options: Any) -> Exposure:
    """The exposing end of tunnel ``name``, to use as ``async with ...``.

    ``target``: "HOST:PORT" dialed for every stream; ``allow``: rules ("10.0.0.0/8:22,
    localhost:8000-8100", see tether.allow) for targets the peer names (SOCKS); at least
    one of them. Further options as for :func:`connect`.
    """
    return Exposure(name, signal=signal, token=token, secret=secret, target=target,
                    allow=allow, **options)


__all__ = ["CORES", "Connection", "Exposure", "build_core", "connect", "expose"]
