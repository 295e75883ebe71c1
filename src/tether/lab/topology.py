"""Three network namespaces, laptop (A) - router (R) - server (B), and the faults between them.

::

    A: a1 10.231.1.2/24 ("ethernet", default route) ---- ra1 10.231.1.1 :R
       a2 10.231.2.2/24 ("wifi")                    ---- ra2 10.231.2.1 :R
                                         R: rb 10.231.3.1/24 ---- b0 10.231.3.2/24 :B

R forwards and masquerades A's subnets toward B (``nft`` table ``ip labnat``) and drops
connections B starts toward A, as a home router would, so peers see A only through the
NAT. tether's relay (and coturn) listen on 10.231.3.1. Addresses are private to the
namespaces, whose names carry a random suffix, so runs never clash. IPv6 is off.

R's ``inet lab`` table has hooks the faults fill: ``cut`` chains before everything (drop a
link's packets without touching addresses), ``raw`` (notrack for the slow path), and
``forward`` (loss, UDP blocking, the NAT's inbound rule).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from . import netns

logger = logging.getLogger(__name__)

A_NETS = "{ 10.231.1.0/24, 10.231.2.0/24 }"


@dataclass(frozen=True)
class Plan:
    a1: str = "10.231.1.2"
    a1_new: str = "10.231.1.3"
    ra1: str = "10.231.1.1"
    a2: str = "10.231.2.2"
    ra2: str = "10.231.2.1"
    rb: str = "10.231.3.1"
    b: str = "10.231.3.2"
    b_new: str = "10.231.3.3"


PLAN = Plan()

ROUTER_RULES = f"""
table inet lab {{
    chain cut_in {{ type filter hook prerouting priority -450; policy accept; }}
    chain cut_out {{ type filter hook postrouting priority 450; policy accept; }}
    chain raw {{ type filter hook prerouting priority raw; policy accept; }}
    chain faults {{ type filter hook forward priority -10; policy accept; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "rb" oifname != "rb" ct state new drop
    }}
}}
table ip labnat {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {A_NETS} oifname "rb" masquerade
    }}
}}
"""


class Topology:
    """The namespaces of one scenario run; ``async with`` builds and always removes them."""

    def __init__(self, suffix: str | None = None) -> None:
        self.suffix = suffix or netns.new_suffix()
        self.a = f"tl{self.suffix}-a"
        self.r = f"tl{self.suffix}-r"
        self.b = f"tl{self.suffix}-b"
        self.plan = PLAN
        self.laptop_address = PLAN.a1
        self.server_address = PLAN.b

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.a, self.r, self.b

    async def __aenter__(self) -> Topology:
        try:
            await self.create()
        except BaseException:
            await self.destroy()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

    # -- commands ------------------------------------------------------------------------

    async def ip(self, ns: str, *args: str, check: bool = True) -> str:
        return await netns.run("ip", "-n", ns, *args, check=check)

    async def ip_batch(self, ns: str, lines: list[str]) -> None:
        await netns.run("ip", "-n", ns, "-batch", "-", input="\n".join(lines).encode() + b"\n")

    async def nft(self, script: str) -> None:
        await netns.run("ip", "netns", "exec", self.r, "nft", "-f", "-", input=script.encode())

    async def sysctl(self, ns: str, *settings: str) -> None:
        await netns.run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings)

    # -- build ---------------------------------------------------------------------------

    async def create(self) -> None:
        p = self.plan
        for ns in self.namespaces:
            await netns.add_namespace(ns)
        for ns in self.namespaces:
            # promote_secondaries: deleting the old address keeps the new one, as on a desktop.
            await self.sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1",
                              "net.ipv6.conf.default.disable_ipv6=1",
                              "net.ipv4.conf.all.promote_secondaries=1",
                              "net.ipv4.conf.default.promote_secondaries=1")
        await self.ip(self.a, "link", "add", "a1", "type", "veth", "peer", "name", "ra1",
                      "netns", self.r)
        await self.ip(self.a, "link", "add", "a2", "type", "veth", "peer", "name", "ra2",
                      "netns", self.r)
        await self.ip(self.b, "link", "add", "b0", "type", "veth", "peer", "name", "rb",
                      "netns", self.r)
        await self.ip_batch(self.a, [
            "link set lo up", f"addr add {p.a1}/24 dev a1", f"addr add {p.a2}/24 dev a2",
            "link set a1 up", "link set a2 up", f"route add default via {p.ra1} dev a1",
        ])
        await self.ip_batch(self.r, [
            "link set lo up", f"addr add {p.ra1}/24 dev ra1", f"addr add {p.ra2}/24 dev ra2",
            f"addr add {p.rb}/24 dev rb", "link set ra1 up", "link set ra2 up", "link set rb up",
        ])
        await self.ip_batch(self.b, [
            "link set lo up", f"addr add {p.b}/24 dev b0", "link set b0 up",
            f"route add default via {p.rb} dev b0",
        ])
        await self.sysctl(self.r, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                          "net.ipv4.conf.default.rp_filter=0")
        await self.nft(ROUTER_RULES)
        logger.debug("topology %s up", self.suffix)

    async def destroy(self) -> None:
        await asyncio.gather(*(netns.delete_namespace(ns) for ns in self.namespaces))

    # -- faults --------------------------------------------------------------------------

    async def cut_uplink(self) -> None:
        """A's active uplink drops everything, both ways; addresses and links stay."""
        await self.nft('add rule inet lab cut_in iifname "ra1" drop\n'
                       'add rule inet lab cut_out oifname "ra1" drop\n')

    async def restore_uplink(self) -> None:
        await self.nft("flush chain inet lab cut_in\nflush chain inet lab cut_out\n")

    async def change_laptop_address(self) -> str:
        """Replace A's address on a1 by another in the same subnet (default route kept)."""
        p = self.plan
        new = p.a1_new if self.laptop_address == p.a1 else p.a1
        await self.ip_batch(self.a, [
            f"addr add {new}/24 dev a1", f"addr del {self.laptop_address}/24 dev a1",
            f"route replace default via {p.ra1} dev a1",
        ])
        self.laptop_address = new
        return new

    async def change_server_address(self) -> str:
        p = self.plan
        new = p.b_new if self.server_address == p.b else p.b
        await self.ip_batch(self.b, [
            f"addr add {new}/24 dev b0", f"addr del {self.server_address}/24 dev b0",
            f"route replace default via {p.rb} dev b0",
        ])
        self.server_address = new
        return new

    async def switch_uplink(self) -> None:
        """A's ethernet goes down; the default route moves to the wifi uplink."""
        await self.ip_batch(self.a, [
            "link set a1 down", f"route replace default via {self.plan.ra2} dev a2",
        ])

    async def nat_timeouts(self, seconds: int) -> None:
        """R forgets UDP mappings after ``seconds`` of silence (both the one-way and the
        two-way ("stream") timeout: a tunnel's flow is two-way)."""
        await self.sysctl(self.r, f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
                          f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}")

    async def nat_new_port(self) -> None:
        """Masquerade to random ports from now on and forget every mapping."""
        await self.nft(
            "flush chain ip labnat post\n"
            f"add rule ip labnat post ip saddr {A_NETS} oifname \"rb\" masquerade random\n")
        await netns.run("ip", "netns", "exec", self.r, "conntrack", "-F", check=False)

    async def link_mtu(self, mtu: int, *, beyond_router: bool = False) -> None:
        """Every link's MTU (``beyond_router``: only R - B's, so A's own links keep a
        larger one and learn of the smaller only from R's ICMP "fragmentation needed")."""
        if not beyond_router:
            await self.ip_batch(self.a, [f"link set a1 mtu {mtu}", f"link set a2 mtu {mtu}"])
            await self.ip_batch(self.r, [f"link set ra1 mtu {mtu}", f"link set ra2 mtu {mtu}"])
        await self.ip_batch(self.r, [f"link set rb mtu {mtu}"])
        await self.ip_batch(self.b, [f"link set b0 mtu {mtu}"])

    async def packet_loss(self, percent: int) -> None:
        """Drop ``percent`` % of forwarded packets at random, both ways."""
        await self.nft(f"add rule inet lab faults numgen random mod 100 < {percent} drop\n")

    async def block_forwarded_udp(self) -> None:
        """No UDP between A and B; what reaches R itself (coturn) still passes."""
        await self.nft("add rule inet lab faults meta l4proto udp drop\n")

    async def slow_path(self, device: str) -> None:
        """Route everything R forwards through the TUN ``device`` (a delayer is attached).

        Packets from the links go to table 100 (default route: the TUN); packets the delayer
        writes back come in on the TUN and take the main table. The first pass of A's
        packets, and the second pass of packets toward A, are not tracked, so conntrack (and
        the NAT) sees each packet exactly once.
        """
        await self.sysctl(self.r, f"net.ipv4.conf.{device}.rp_filter=0")
        await self.ip_batch(self.r, [
            f"route add default dev {device} table 100",
            "rule add iif ra1 lookup 100 pref 100",
            "rule add iif ra2 lookup 100 pref 100",
            "rule add iif rb lookup 100 pref 100",
        ])
        await self.nft(
            'add rule inet lab raw iifname { "ra1", "ra2" } notrack\n'
            f'add rule inet lab raw iifname "{device}" ip daddr {A_NETS} notrack\n')

    async def add_tun(self, device: str) -> None:
        await self.ip_batch(self.r, [f"tuntap add dev {device} mode tun", f"link set {device} up"])
