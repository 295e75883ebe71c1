"""Run every tunnel a config file lists, in one process, and apply a reloaded config.

Each tunnel is a :class:`tether.api.Connection` or :class:`tether.api.Exposure`. Tunnels
with the same relay URLs, token and CA share ONE signaling connection
(:class:`~tether.signaling.mux.SignalingMux`; a second one only for a conversation already
on the first, i.e. both ends of one tunnel in this process). On :meth:`Fleet.reload`,
tunnels no longer listed stop (leaving their conversation; the others on the connection go
on), new ones start, and changed ones (their entry, or the relay, token, ICE or policy
settings they inherit) restart; unchanged ones go on untouched, streams and all. A shared
connection no tunnel uses any more is closed. All tunnels share one network monitor
(:class:`~tether.netmon.SharedMonitor`): a change reaches every tunnel at once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from .api import Connection, Exposure
from .config import Config, TunnelConfig
from .signaling.mux import SignalingMux
from .tunnel import format_hostport

logger = logging.getLogger(__name__)


@dataclass
class Running:
    spec: Any  # what the tunnel was built from; a different one means restart
    tunnel: Connection | Exposure


class Fleet:
    """The running tunnels of one :class:`Config`."""

    def __init__(self, config: Config, *, token: str | None = None,
                 loopback: bool | None = None, watch_network: bool = True) -> None:
        self.config = config
        self.token = token  # overrides the config's (--token / TETHER_TOKEN)
        self.loopback = loopback
        self.watch_network = watch_network
        self.network: Any = None
        """One network monitor for every tunnel (a SharedMonitor), made on first use."""
        self.running: dict[tuple[str, str], Running] = {}
        self.muxes: dict[tuple[Any, ...], list[SignalingMux]] = {}
        """Shared signaling connections by (relay URLs, token, CA)."""

    def _spec(self, config: Config, tunnel: TunnelConfig) -> Any:
        return (tunnel, config.common(), tunnel.policy.over(config.policy), self.token,
                self.loopback)

    def _build(self, config: Config, tunnel: TunnelConfig) -> Connection | Exposure:
        token = self.token or config.token
        if not token:
            raise ValueError("no relay token: set `token_file` in the config, or "
                             "TETHER_TOKEN")
        if not config.signal:
            raise ValueError("no relay: set `signal` in the config")
        policy = tunnel.policy.over(config.policy)
        common: dict[str, Any] = dict(
            signal=list(config.signal), token=token, secret=tunnel.secret, ca=config.ca,
            loopback=config.loopback if self.loopback is None else self.loopback,
            ice_servers=config.ice_servers, turn_user=config.turn_user,
            turn_password=config.turn_password, policy=policy.restart_policy(),
            liveness=policy.liveness(), watch_network=self._network(),
            core=config.core_of(tunnel))
        if tunnel.kind == "expose":
            return Exposure(tunnel.name, target=tunnel.target,
                            allow=list(tunnel.allow) or None, **common)
        return Connection(tunnel.name, listen=tunnel.listen, socks=tunnel.socks,
                          socks_users=tunnel.socks_users, wait=None, **common)

    def _network(self) -> Any:
        if not self.watch_network:
            return False
        if self.network is None:
            from .netmon import SharedMonitor

            self.network = SharedMonitor()
        return self.network

    def _mux_for(self, config: Config, conversation_id: str) -> SignalingMux:
        """The shared connection to this config's relay without that conversation yet."""
        token = self.token or config.token
        assert token is not None
        muxes = self.muxes.setdefault((tuple(config.signal), token, config.ca), [])
        for mux in muxes:
            if conversation_id not in mux.conversations:
                return mux
        mux = SignalingMux(list(config.signal), token, ca_file=config.ca)
        muxes.append(mux)
        return mux

    async def _close_idle_muxes(self) -> None:
        for key, muxes in list(self.muxes.items()):
            for mux in [m for m in muxes if not m.conversations]:
                muxes.remove(mux)
                await mux.close()
            if not muxes:
                del self.muxes[key]

    async def _start(self, config: Config, tunnel: TunnelConfig) -> None:
        built = self._build(config, tunnel)
        built.share_signaling(self._mux_for(config, built.side.client.conversation_id))
        try:
            await built.start()
        except BaseException:
            await built.close()
            raise
        self.running[tunnel.key] = Running(self._spec(config, tunnel), built)
        logger.info("%s", describe(tunnel.key, built))

    async def _stop(self, key: tuple[str, str], why: str) -> None:
        running = self.running.pop(key, None)
        if running is not None:
            logger.info("%s %r: stopping (%s)", key[0], key[1], why)
            await running.tunnel.close()

    async def start(self) -> None:
        """Start every tunnel; if one cannot start, stop the others and raise."""
        try:
            for tunnel in self.config.tunnels:
                await self._start(self.config, tunnel)
        except BaseException:
            await self.close()
            raise

    async def reload(self, config: Config) -> dict[str, list[str]]:
        """Apply ``config``; returns the names ("kind name") added, removed, restarted,
        updated in place (an allow-list change) and failed to start. A tunnel that cannot
        start is logged and left out (another reload tries again)."""
        wanted = {t.key: t for t in config.tunnels}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "restarted": [],
                                         "updated": [], "failed": []}
        for key in list(self.running):
            if key not in wanted:
                await self._stop(key, "no longer in the config")
                changes["removed"].append(" ".join(key))
            elif self.running[key].spec == self._spec(config, wanted[key]):
                continue
            elif self._only_allow_changed(config, wanted[key]):
                self._swap_allow(config, wanted[key])
                changes["updated"].append(" ".join(key))
            else:
                await self._stop(key, "its settings changed")
                changes["restarted"].append(" ".join(key))
        for key, tunnel in wanted.items():
            if key in self.running:
                continue
            try:
                await self._start(config, tunnel)
            except (OSError, ValueError) as exc:
                logger.error("%s %r: cannot start: %s", key[0], key[1], exc)
                changes["failed"].append(" ".join(key))
                continue
            if " ".join(key) not in changes["restarted"]:
                changes["added"].append(" ".join(key))
        self.config = config
        await self._close_idle_muxes()
        return changes

    def _only_allow_changed(self, config: Config, tunnel: TunnelConfig) -> bool:
        """An exposing tunnel whose allow-list alone changed keeps its tubes and streams:
        the new list applies to new streams (with at least one rule left)."""
        running = self.running[tunnel.key]
        if tunnel.kind != "expose" or not tunnel.allow:
            return False
        old = running.spec[0]
        if not old.allow:
            return False  # the tunnel took no named targets: a restart says so clearly
        same = dataclasses.replace(tunnel, allow=old.allow)
        return running.spec == self._spec(config, same)

    def _swap_allow(self, config: Config, tunnel: TunnelConfig) -> None:
        running = self.running[tunnel.key]
        assert isinstance(running.tunnel, Exposure)
        running.tunnel.side.allow = tunnel.allow_list()
        running.spec = self._spec(config, tunnel)
        logger.info("expose %r: allow-list now %s (for new streams)", tunnel.name,
                    running.tunnel.side.allow)

    async def close(self) -> None:
        for key in list(self.running):
            await self._stop(key, "shutting down")
        for muxes in self.muxes.values():
            for mux in muxes:
                await mux.close()
        self.muxes.clear()

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        return {" ".join(key): r.tunnel.snapshot() for key, r in self.running.items()}


def describe(key: tuple[str, str], tunnel: Connection | Exposure) -> str:
    """One line per running tunnel, e.g. "connect web listening on 127.0.0.1:8080"."""
    kind, name = key
    if isinstance(tunnel, Connection):
        parts = []
        if tunnel.side.server is not None:
            parts.append(f"listening on {format_hostport(*tunnel.address)}")
        if (socks := tunnel.socks_address) is not None:
            parts.append(f"SOCKS5 on {format_hostport(*socks)}")
        return f"connect {name} " + ", ".join(parts)
    side = tunnel.side
    what = []
    if side.target is not None:
        what.append(format_hostport(*side.target))
    if side.allow is not None:
        what.append(f"allowed targets {side.allow}")
    return f"expose {name} -> " + " and ".join(what)
