"""Network monitor: turns address, link and default-route changes into callbacks within 100 ms.

Linux does not reset a TCP connection whose source address was deleted, so without this
tether would wait for WebSocket pings (~40 s) before noticing a move from ethernet to wifi.

On Linux a netlink socket joined to the link/address/route groups is read with
``loop.add_reader``; a relevant message starts a ``settle`` window (fixed, not extended, so
a burst is one change and the callback still runs within ~settle + a few ms), after which
the state is dumped and compared with the previous one. Only a real difference in usable
addresses or the default route is reported, so repeats and noise cost one dump and no
callback. Elsewhere (or if netlink is refused) ``ifaddr`` is polled in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import inspect
import ipaddress
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tether import runloop
from tether.machine import NetworkChangeType

logger = logging.getLogger(__name__)

Addr = tuple[str, str, int]          # (ifname, ip, prefixlen)
Route = tuple[str, str, str]         # (family "IPv4"/"IPv6", gateway or "", ifname)
AddressSource = Callable[[], Iterable[Addr]]

_GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400   # RTMGRP_LINK, IPV4_IFADDR/ROUTE, IPV6_IFADDR/ROUTE
_RTM_LINK, _RTM_ADDR, _RTM_ROUTE = (16, 17), (20, 21), (24, 25)
_IFF_UP, _IFF_LOWER_UP = 0x1, 0x10000
_IFA_F_UNUSABLE = 0x08 | 0x40                  # IFA_F_DADFAILED | IFA_F_TENTATIVE
_RT_TABLE_MAIN, _RTN_UNICAST = 254, 1
_MAX_CALLBACK_TASKS = 32


@dataclass(frozen=True)
class NetworkChange:
    type: NetworkChangeType
    detail: str
    addresses: tuple[str, ...]
    at: float


def usable_ip(ip: str) -> bool:
    """True for an address a peer could reach us on: not loopback, link-local or multicast."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified)


@dataclass(frozen=True)
class Snapshot:
    """What connectivity depends on. ``up`` is None when link state is unknown (polling)."""

    addresses: frozenset[Addr] = frozenset()
    up: frozenset[str] | None = None
    routes: frozenset[Route] = frozenset()

    @property
    def usable(self) -> frozenset[Addr]:
        if self.up is None:
            return self.addresses
        return frozenset(a for a in self.addresses if a[0] in self.up)

    def ips(self) -> tuple[str, ...]:
        return tuple(sorted({ip for _, ip, _ in self.usable}))


def describe(before: Snapshot, after: Snapshot) -> tuple[NetworkChangeType, str] | None:
    """What changed between two snapshots as (type, detail); None if nothing that matters did."""
    added, removed = after.usable - before.usable, before.usable - after.usable
    parts: list[str] = []
    assigned = False
    for if_, ip, plen in sorted(removed):
        if (if_, ip, plen) not in after.addresses:
            assigned = True
            parts.append(f"{ip}/{plen} removed from {if_}")
        else:
            parts.append(f"{if_} down: {ip}/{plen} unusable")
    for if_, ip, plen in sorted(added):
        if (if_, ip, plen) not in before.addresses:
            assigned = True
            parts.append(f"{ip}/{plen} added on {if_}")
        else:
            parts.append(f"{if_} up: {ip}/{plen} usable")
    old = {r[0]: r for r in before.routes}
    new = {r[0]: r for r in after.routes}
    for family in sorted(old.keys() | new.keys()):
        if old.get(family) == new.get(family):
            continue
        name = "default route" if family == "IPv4" else "IPv6 default route"
        if family not in new:
            parts.append(f"{name} removed")
        else:
            _, gw, dev = new[family]
            parts.append(f"{name} now {'via ' + gw + ' ' if gw else ''}dev {dev}")
    if not parts:
        return None
    kind = NetworkChangeType.IP_ADDRESS_CHANGE if assigned else NetworkChangeType.INTERFACE_CHANGE
    return kind, "; ".join(parts)


def _is_relevant(msg: Any) -> bool:
    """Cheap pre-filter of one netlink event: could it change a Snapshot?"""
    kind = msg["header"]["type"]
    if kind in _RTM_LINK:
        return True
    if kind in _RTM_ADDR:
        return usable_ip(str(msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS") or ""))
    if kind in _RTM_ROUTE:
        return msg.get("RTA_TABLE", msg["table"]) == _RT_TABLE_MAIN and msg["dst_len"] == 0
    return False


def _dump_snapshot() -> Snapshot:
    """Dump the state from a worker thread, on a private selector loop: pyroute2's asyncio
    socket needs a loop that accepts netlink transports, which uvloop (tether's loop) does
    not. Only the event socket, a plain fd, lives on the caller's loop. Blocks: run it in
    a thread."""
    from pyroute2 import AsyncIPRoute

    async def dump() -> Snapshot:
        ipr = AsyncIPRoute()
        try:
            return await _netlink_snapshot(ipr)
        finally:
            ipr.close()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(dump())


async def _netlink_snapshot(ipr: Any) -> Snapshot:
    """Dump links, addresses and main-table default routes over pyroute2's asyncio socket."""
    names: dict[int, str] = {}
    up: set[str] = set()
    async for link in await ipr.link("dump"):
        name = names[link["index"]] = str(link.get("IFLA_IFNAME"))
        if link["flags"] & _IFF_UP and link["flags"] & _IFF_LOWER_UP:
            up.add(name)
    addresses: set[Addr] = set()
    async for msg in await ipr.addr("dump"):
        ip = str(msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS") or "")
        flags = msg.get("IFA_FLAGS") or msg["flags"]
        if usable_ip(ip) and not flags & _IFA_F_UNUSABLE and msg["index"] in names:
            addresses.add((names[msg["index"]], ip, int(msg["prefixlen"])))
    best: dict[str, tuple[int, Route]] = {}
    async for rt in await ipr.route("dump", family=0):
        if (not _is_relevant(rt) or rt["type"] != _RTN_UNICAST
                or rt["family"] not in (socket.AF_INET, socket.AF_INET6)):
            continue
        hops = [(rt.get("RTA_GATEWAY"), rt.get("RTA_OIF"))]
        hops += [(nh.get("RTA_GATEWAY"), nh["oif"]) for nh in rt.get("RTA_MULTIPATH") or ()]
        for gw, oif in hops:
            dev = names.get(oif or -1)
            if dev in up:
                family = "IPv4" if rt["family"] == socket.AF_INET else "IPv6"
                prio = rt.get("RTA_PRIORITY") or 0
                if family not in best or prio < best[family][0]:
                    best[family] = (prio, (family, str(gw or ""), dev))
                break
    return Snapshot(frozenset(addresses), frozenset(up), frozenset(r for _, r in best.values()))


def ifaddr_addresses() -> list[Addr]:
    """All addresses from ``ifaddr`` (blocking: call it in a worker thread)."""
    import ifaddr

    out: list[Addr] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            out.append((adapter.name, text, int(ip.network_prefix)))
    return out


class NetworkMonitor:
    """Watches the host's addresses and default routes; calls ``on_change`` on a real change."""

    def __init__(self, on_change: Callable[[NetworkChange], Any], *, settle: float = 0.05,
                 poll_interval: float = 2.0, use_netlink: bool | None = None,
                 address_source: AddressSource | None = None) -> None:
        if not 0 <= settle <= 1:
            raise ValueError("settle must be between 0 and 1 second")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._on_change = on_change
        self._settle = settle
        self._poll_interval = poll_interval
        self._use_netlink = use_netlink if use_netlink is not None else sys.platform == "linux"
        self._source = address_source or ifaddr_addresses
        self._mode = "polling"
        self._snapshot = Snapshot()
        self._sock: socket.socket | None = None
        self._marshal: Any = None
        self._wake = asyncio.Event()
        self._first_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def addresses(self) -> tuple[str, ...]:
        """Usable addresses as of the last snapshot."""
        return self._snapshot.ips()

    async def start(self) -> None:
        if self._task is not None or self._closed:
            raise RuntimeError("NetworkMonitor.start() may be called once, before close()")
        if self._use_netlink and await self._start_netlink():
            self._mode = "netlink"
            self._task = asyncio.create_task(self._run_netlink(), name="netmon-netlink")
        else:
            try:
                self._snapshot = await asyncio.to_thread(self._poll_snapshot)
            except Exception:
                logger.exception("netmon: first address poll failed; starting from empty")
            self._task = asyncio.create_task(self._run_polling(), name="netmon-poll")
        logger.info("netmon: watching in %s mode, addresses %s", self._mode, self.addresses)

    async def _start_netlink(self) -> bool:
        try:
            # pyroute2 takes ~0.2 s to import: off the loop, which may be connecting already.
            marshal_class = await asyncio.to_thread(_marshal_class)
            kind = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            sock = self._sock = socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, _GROUPS))
            self._marshal = marshal_class()
            # Subscribe before the dump, so nothing between the two is missed.
            asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)
            self._snapshot = await asyncio.to_thread(_dump_snapshot)
            return True
        except Exception as exc:  # no pyroute2, no AF_NETLINK, socket refused, dump failed
            logger.warning("netmon: netlink unavailable (%s); polling every %.1f s",
                           exc, self._poll_interval)
            self._close_netlink()
            return False

    def _on_readable(self) -> None:
        sock = self._sock
        assert sock is not None
        relevant = False
        for _ in range(64):  # bounded drain; the loop calls us again if more is queued
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: the kernel dropped events, so resync by dumping
                relevant = True
                if exc.errno != errno.ENOBUFS:
                    logger.error("netmon: netlink socket failed (%s); no more events", exc)
                    asyncio.get_running_loop().remove_reader(sock.fileno())
                    break
                continue
            try:
                # A message pyroute2 cannot decode might matter: count it, the dump decides.
                relevant |= any(m["header"].get("error") is not None or _is_relevant(m)
                                for m in self._marshal.parse(data))
            except Exception:
                logger.exception("netmon: unparseable netlink message; resyncing")
                relevant = True
        if relevant:
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._wake.set()

    async def _run_netlink(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._settle)
            at, self._first_at = self._first_at or time.monotonic(), None
            self._wake.clear()
            try:
                self._update(await asyncio.to_thread(_dump_snapshot), at)
            except Exception:
                logger.exception("netmon: netlink dump failed; will retry on the next event")

    def _poll_snapshot(self) -> Snapshot:
        addresses = set()
        for ifname, ip, plen in self._source():
            if not isinstance(ip, str) or not isinstance(plen, int):
                raise ValueError(f"address source gave a bad entry {(ifname, ip, plen)!r}")
            if usable_ip(ip):
                addresses.add((str(ifname), ip, plen))
        return Snapshot(frozenset(addresses))

    async def _run_polling(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            at = time.monotonic()
            try:
                self._update(await asyncio.to_thread(self._poll_snapshot), at)
            except Exception:
                logger.exception("netmon: address poll failed; keeping the previous state")

    def _update(self, snapshot: Snapshot, at: float) -> None:
        found = describe(self._snapshot, snapshot)
        self._snapshot = snapshot
        if found is None:
            logger.debug("netmon: events without a connectivity change")
            return
        change = NetworkChange(found[0], found[1], snapshot.ips(), at)
        logger.info("netmon: %s: %s", change.type, change.detail)
        try:
            result = self._on_change(change)
        except Exception:
            logger.exception("netmon: on_change raised")
            return
        if inspect.isawaitable(result):
            if len(self._callbacks) >= _MAX_CALLBACK_TASKS:
                logger.error("netmon: %d on_change calls still running; skipping this one "
                             "(the next change carries the full state)", len(self._callbacks))
                if inspect.iscoroutine(result):
                    result.close()
                return
            task = asyncio.get_running_loop().create_task(self._guard(result))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    @staticmethod
    async def _guard(awaitable: Any) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("netmon: async on_change raised")

    def _close_netlink(self) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except (RuntimeError, ValueError):
                pass
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._task, *self._callbacks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close_netlink()


class SharedMonitor:
    """One :class:`NetworkMonitor` for every tunnel of a process (``tether up``): it starts
    with the first subscriber and closes with the last; each change goes to all of them."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._subscribers: list[Callable[[NetworkChange], Any]] = []
        self._monitor: NetworkMonitor | None = None
        self._lock = asyncio.Lock()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, on_change: Callable[[NetworkChange], Any]) -> None:
        async with self._lock:
            self._subscribers.append(on_change)
            if self._monitor is None:
                monitor = NetworkMonitor(self._fan_out, **self._options)
                await monitor.start()
                self._monitor = monitor

    async def unsubscribe(self, on_change: Callable[[NetworkChange], Any]) -> None:
        async with self._lock:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(on_change)
            if not self._subscribers and self._monitor is not None:
                monitor, self._monitor = self._monitor, None
                await monitor.close()

    async def _fan_out(self, change: NetworkChange) -> None:
        """Every subscriber at once: one tunnel's restart must not wait for another's."""

        async def tell(on_change: Callable[[NetworkChange], Any]) -> None:
            try:
                result = on_change(change)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("netmon: a subscriber's on_change raised")

        await asyncio.gather(*(tell(on_change) for on_change in list(self._subscribers)))


def _marshal_class() -> type:
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    return MarshalRtnl


async def _watch(args: argparse.Namespace) -> None:
    def emit(change: NetworkChange) -> None:
        line = {"type": change.type.value, "detail": change.detail,
                "addresses": list(change.addresses), "at": change.at}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        monitor = NetworkMonitor(emit, settle=args.settle, poll_interval=args.poll_interval,
                                 use_netlink=False if args.poll else None)
    except ValueError as exc:
        raise SystemExit(f"netmon: {exc}") from None
    await monitor.start()
    try:
        ready = {"ready": monitor.mode, "loop": runloop.loop_name(),
                 "addresses": list(monitor.addresses)}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await monitor.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.netmon",
                                     description="Print network changes as JSON lines.")
    parser.add_argument("--settle", type=float, default=0.05, help="coalescing window, seconds")
    parser.add_argument("--poll", action="store_true", help="poll ifaddr instead of netlink")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.verbose:
        logger.setLevel(logging.DEBUG)
    runloop.run(_watch(args))  # the loop the CLI runs on (uvloop where it exists)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so logger names and classes are tether.netmon's own.
    from tether.netmon import main as _main

    sys.exit(_main())
