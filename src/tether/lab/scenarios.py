"""The lab's scenarios: what each one does to a fresh tunnel, and when.

A scenario may ``prepare`` the world before the processes start (a NAT timeout, packet
loss, coturn) and then ``act`` on a running tunnel with an echo flowing, writing the moments
it acted at into the :class:`~tether.lab.metrics.Observation` that is scored afterwards.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import netns
from .metrics import Observation
from .session import LabOptions, LabSession

Act = Callable[[LabSession, Observation], Awaitable[None]]
Prepare = Callable[[LabSession], Awaitable[None]]

# After a fault, the echo must have been seen stalled or flowing for this long before the
# lab believes "it flows": in-flight bytes can still arrive just after an instant change.
MIN_OBSERVE = 1.5


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    act: Act
    prepare: Prepare | None = None
    rate: float | None = None              # echo rate; None: the lab's --rate
    total: Callable[[LabOptions], int] | None = None  # bytes the checker sends; None: no end


# -- helpers -------------------------------------------------------------------------------


async def baseline(s: LabSession) -> None:
    await asyncio.sleep(s.options.baseline_s)


async def observe(s: LabSession, since: float) -> bool:
    """Wait until the echo flows again after ``since`` (or give up); keep it running a bit."""
    echo = s.echo
    assert echo is not None
    cid = echo.active

    def flowing() -> bool:
        return time.time() >= since + MIN_OBSERVE and echo.flowing(since)

    def closed() -> bool:
        return cid is not None and echo.conns[cid].closed

    await echo.until(lambda: flowing() or closed(), s.options.give_up_s + MIN_OBSERVE)
    if flowing():
        await asyncio.sleep(s.options.settle_s)
        return True
    return False


async def instant(s: LabSession, obs: Observation, change: Callable[[], Awaitable[object]]) -> None:
    """An instant change: recovery is possible as soon as it is applied."""
    await baseline(s)
    obs.fault = time.time()
    await change()
    obs.recover = time.time()
    await observe(s, obs.recover)


async def outage(s: LabSession, obs: Observation, seconds: float) -> None:
    await baseline(s)
    obs.fault = time.time()
    await s.topo.cut_uplink()
    await asyncio.sleep(seconds)
    await s.topo.restore_uplink()
    obs.recover = time.time()
    obs.extra["outage_s"] = round(obs.recover - obs.fault, 2)
    await observe(s, obs.recover)


# -- scenarios -----------------------------------------------------------------------------


async def link_cut(s: LabSession, obs: Observation) -> None:
    await outage(s, obs, s.options.cut_s)


async def long_outage(s: LabSession, obs: Observation) -> None:
    await outage(s, obs, s.options.outage_s)


async def ip_change(s: LabSession, obs: Observation) -> None:
    await instant(s, obs, s.topo.change_laptop_address)


async def ip_change_expose(s: LabSession, obs: Observation) -> None:
    await instant(s, obs, s.topo.change_server_address)


async def uplink_switch(s: LabSession, obs: Observation) -> None:
    await instant(s, obs, s.topo.switch_uplink)


async def both_change(s: LabSession, obs: Observation) -> None:
    async def both() -> None:
        await asyncio.gather(s.topo.change_laptop_address(), s.topo.change_server_address())

    await instant(s, obs, both)


async def nat_idle_prepare(s: LabSession) -> None:
    await s.topo.nat_timeouts(s.options.nat_timeout_s)


async def nat_idle_keepalive(s: LabSession, obs: Observation) -> None:
    echo = s.echo
    assert echo is not None
    await baseline(s)
    await echo.command("pause")
    cid = echo.active
    assert cid is not None
    drained = await echo.until(
        lambda: echo.conns[cid].closed or echo.conns[cid].sent == echo.conns[cid].verified, 5.0)
    if not drained:
        obs.error = "the echo did not drain before the idle period"
    obs.fault = obs.quiet_since = time.time()
    await asyncio.sleep(s.options.idle_s)
    await echo.command("resume")
    obs.recover = time.time()
    obs.extra["idle_s"] = round(obs.recover - obs.fault, 2)
    await observe(s, obs.recover)


async def nat_new_port(s: LabSession, obs: Observation) -> None:
    await instant(s, obs, s.topo.nat_new_port)


async def packet_loss_prepare(s: LabSession) -> None:
    await s.topo.packet_loss(s.options.loss_percent)


async def packet_loss(s: LabSession, obs: Observation) -> None:
    echo = s.echo
    assert echo is not None
    total = s.options.loss_bytes
    cid = echo.active
    assert cid is not None
    c = echo.conns[cid]
    obs.extra["loss_percent"] = s.options.loss_percent
    await echo.until(lambda: c.closed or c.verified >= total, s.options.loss_timeout_s)
    done = next((r for r in echo.records if r.get("type") == "done"), None)
    if done is None or c.first_echo is None:
        obs.error = (f"only {c.verified:,} of {total:,} bytes echoed in "
                     f"{s.options.loss_timeout_s:.0f} s")
        return
    seconds = done["ts"] - c.first_echo
    obs.extra["throughput_mb_s"] = round(total / seconds / 1e6, 3) if seconds > 0 else None
    obs.extra["transfer_s"] = round(seconds, 2)


JUMBO_MTU = 9000


async def path_mtu_prepare(s: LabSession) -> None:
    await s.topo.link_mtu(JUMBO_MTU)


PACKET_LOGGED = re.compile(r"path MTU: (\d+)-byte SCTP packets")


def packets_logged(s: LabSession) -> dict[str, int | None]:
    """Each peer's SCTP packet size, as its last path MTU log line says."""
    sizes: dict[str, int | None] = {}
    for side in ("connect", "expose"):
        path = s.run_dir / f"{side}.log"
        found = PACKET_LOGGED.findall(path.read_text(errors="replace")) if path.exists() else []
        sizes[side] = int(found[-1]) if found else None
    return sizes


async def path_mtu_shrink(s: LabSession, obs: Observation) -> None:
    """The tunnel found 9,000-byte links (its packets grew to them); then the link beyond
    the router becomes 1,500-byte Ethernet while the echo flows. Larger packets arrive cut
    by R (or by B's own stack) until each side's next probe of its size goes unanswered;
    then they must shrink to fit, with no byte lost. (aiortc's core: the Rust core keeps
    its own packet size.)"""
    import socket

    from ..cores import path_mtu  # aiortc's: only this scenario needs it

    if s.options.core != "aiortc":
        obs.error = f"path MTU discovery is the aiortc core's; not the {s.options.core} core's"
        return
    ethernet = 1500
    await instant(s, obs, lambda: s.topo.link_mtu(ethernet, beyond_router=True))
    obs.extra["packets_before"] = before = packets_logged(s)
    fits = max(path_mtu.packet_sizes(ethernet, socket.AF_INET))

    def shrunk() -> bool:
        return all(size is not None and size <= fits for size in packets_logged(s).values())

    deadline = time.time() + path_mtu.CONFIRM_EVERY + 10.0
    while not shrunk() and time.time() < deadline:
        await asyncio.sleep(0.2)
    obs.extra["packets_after"] = after = packets_logged(s)
    if not all(size is not None and size > fits for size in before.values()):
        obs.error = f"packets did not grow on the {JUMBO_MTU}-byte links: {before}"
    elif not shrunk():
        obs.error = f"packets did not shrink to {fits} bytes or less: {after}"
    elif not await observe(s, time.time()):
        obs.error = "the echo stopped after the packets shrank"


async def slow_path_prepare(s: LabSession) -> None:
    await s.start_delayer()


async def slow_path(s: LabSession, obs: Observation) -> None:
    echo = s.echo
    assert echo is not None
    await baseline(s)
    cid = echo.active
    assert cid is not None
    obs.extra["rtt_before_ms"] = await measure_rtt(s)
    before = echo.conns[cid].verified
    obs.fault = obs.quiet_since = time.time()
    await s.set_delay(s.options.delay_s)
    obs.extra["rtt_ms"] = await measure_rtt(s)
    await asyncio.sleep(s.options.slow_s)
    c = echo.conns[cid]
    during = c.verified - before
    obs.extra["slow_s"] = round(time.time() - obs.fault, 1)
    obs.extra["throughput_mb_s"] = round(during / (time.time() - obs.fault) / 1e6, 3)
    if c.closed or during <= 0 or c.last_rx is None or c.last_rx < time.time() - 2.0:
        obs.error = "the echo did not keep working over the slow path"


RTT_PROBE = """
import socket, sys, time
t = time.perf_counter()
try:
    socket.create_connection((sys.argv[1], 9), timeout=5).close()
except OSError:
    pass
print(round((time.perf_counter() - t) * 1000, 1))
"""


async def measure_rtt(s: LabSession) -> float | None:
    """A TCP connect from A to a closed port on B: one round trip until the RST."""
    out = await netns.run("ip", "netns", "exec", s.topo.a, sys.executable, "-c", RTT_PROBE,
                          s.topo.server_address, check=False)
    try:
        return float(out.strip())
    except ValueError:
        return None


async def peer_restart(s: LabSession, obs: Observation) -> None:
    echo = s.echo
    assert echo is not None
    await baseline(s)
    old = echo.active
    assert old is not None
    obs.killed = frozenset({old})
    obs.fault = time.time()
    obs.recover = await s.restart("expose")

    def new_echoed() -> bool:
        return any(cid > old and c.first_echo for cid, c in echo.conns.items())

    # As a user would: once the old connection is closed, open a new one (and retry it
    # until it echoes). If the old one never closes, try a new one anyway, briefly.
    closed = await echo.until(lambda: echo.conns[old].closed, s.options.give_up_s)
    obs.extra["old_closed"] = closed
    await echo.command("new")
    wait = s.options.give_up_s if closed else min(s.options.give_up_s, 10.0)
    await echo.until(new_echoed, wait)
    await asyncio.sleep(s.options.settle_s)


async def relay_restart(s: LabSession, obs: Observation) -> None:
    await baseline(s)
    obs.fault = time.time()
    obs.recover = await s.restart("serve")
    await asyncio.sleep(s.options.relay_watch_s)
    obs.gap_window = (obs.fault, time.time())
    events = await asyncio.to_thread(s.events)
    for side in ("connect", "expose"):
        back = [e["ts"] for e in events if e.get("side") == side and e.get("event") == "signaling"
                and e.get("state") == "connected" and e.get("ts", 0) >= obs.recover]
        if back:
            obs.extra[f"{side}_signaling_ms"] = round((min(back) - obs.recover) * 1000.0, 1)


async def turn_prepare(s: LabSession) -> None:
    if not s.turn_creds:
        raise RuntimeError("this tether CLI has no --turn-user/--turn-password; "
                           "turn_only cannot authenticate to coturn")
    await s.topo.block_forwarded_udp()
    await s.start_turn()


async def turn_only(s: LabSession, obs: Observation) -> None:
    relays = await s.turn_relays()
    obs.extra["turn_relays"] = relays
    if relays == 0:
        obs.error = "coturn holds no relay allocation: the tunnel does not go through TURN"
    await instant(s, obs, s.topo.change_laptop_address)


SCENARIOS: dict[str, Scenario] = {sc.name: sc for sc in [
    Scenario("link_cut", "A's uplink drops everything for 3 s", link_cut),
    Scenario("long_outage", "A's uplink drops everything for 150 s", long_outage),
    Scenario("ip_change", "A's address replaced by another in its subnet", ip_change),
    Scenario("ip_change_expose", "B's address replaced", ip_change_expose),
    Scenario("uplink_switch", "A's ethernet down, default route via wifi", uplink_switch),
    Scenario("both_change", "A's and B's addresses replaced at once", both_change),
    Scenario("nat_idle_keepalive", "NAT UDP timeout 3 s, tunnel idle 20 s",
             nat_idle_keepalive, prepare=nat_idle_prepare),
    Scenario("nat_new_port", "conntrack flushed, masquerade to random ports", nat_new_port),
    Scenario("packet_loss", "5 % loss both ways, 50 MiB echoed", packet_loss,
             prepare=packet_loss_prepare, rate=0.0, total=lambda o: o.loss_bytes),
    Scenario("path_mtu_shrink", "9,000-byte links, then 1,500 beyond the router",
             path_mtu_shrink, prepare=path_mtu_prepare),
    Scenario("slow_path", "600 ms round trip via a user-space delay line", slow_path,
             prepare=slow_path_prepare),
    Scenario("peer_restart", "expose SIGKILLed and started again", peer_restart),
    Scenario("relay_restart", "relay SIGKILLed and started again mid-stream", relay_restart),
    Scenario("turn_only", "UDP only via coturn; then A's address changes", turn_only,
             prepare=turn_prepare),
]}
