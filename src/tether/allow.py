"""`--allow`: which targets a connecting peer may name (SOCKS), deny by default.

A rule is ``HOST:PORTS``; rules are separated by commas (and ``--allow`` may be repeated):

- HOST: an IPv4 address or network (``10.0.0.5``, ``10.0.0.0/8``), an IPv6 one in
  brackets (``[::1]``, ``[fd00::/8]``), a domain name (``db.internal``), every name under a
  domain (``*.internal``), or ``*`` (anything: use with care);
- PORTS: one port (``5432``), a range (``8000-8100``) or ``*``.

A name rule matches the name as the peer asked for it (case-insensitive, trailing dot
ignored). An address rule matches the addresses a target resolves to: the exposing side
resolves the name itself (in the resolver's thread pool, never blocking the loop) and
dials only the resolved addresses that a rule permits, so a name cannot smuggle in an
address the list forbids, and the address checked is the address dialed (no second
lookup). A name no rule can permit is refused without being looked up at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from .tunnel.reasons import DENIED, NO_SUCH_HOST, Refusal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: At most this many resolved addresses are considered for one target.
MAX_ADDRESSES = 16

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


@dataclass(frozen=True, slots=True)
class Ports:
    """An inclusive port range; ``*`` is 1..65535."""

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        if (self.low, self.high) == (1, 65535):
            return "*"
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``HOST:PORTS`` rule. Exactly one of ``network``, ``name``, ``suffix`` is set,
    or none for ``*`` (any host)."""

    ports: Ports
    network: Network | None = None
    name: str | None = None
    suffix: str | None = None  # "*.internal" -> ".internal"

    @property
    def any_host(self) -> bool:
        return self.network is None and self.name is None and self.suffix is None

    def matches_name(self, name: str, port: int) -> bool:
        if port not in self.ports:
            return False
        if self.any_host:
            return True
        if self.name is not None:
            return name == self.name
        return self.suffix is not None and name.endswith(self.suffix)

    def matches_address(self, address: Address, port: int) -> bool:
        if port not in self.ports:
            return False
        if self.any_host:
            return True
        if self.network is None:
            return False
        return any(a.version == self.network.version and a in self.network
                   for a in _forms(address))

    def __str__(self) -> str:
        if self.network is not None:
            host = str(self.network)
            if self.network.num_addresses == 1:
                host = str(self.network.network_address)
            if self.network.version == 6:
                host = f"[{host}]"
        elif self.name is not None:
            host = self.name
        elif self.suffix is not None:
            host = "*" + self.suffix
        else:
            host = "*"
        return f"{host}:{self.ports}"


def _forms(address: Address) -> list[Address]:
    """The address, plus the IPv4 address inside an IPv4-mapped IPv6 one."""
    forms: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        if address.scope_id:
            forms.append(ipaddress.IPv6Address(str(address).split("%", 1)[0]))
    return forms


def normalize_name(name: str) -> str:
    """Lowercase, without a trailing dot; ValueError if it is no valid domain name."""
    text = name.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 253:
        raise ValueError(f"{name!r} is not a valid host name")
    if not all(_LABEL.match(label) for label in text.split(".")):
        raise ValueError(f"{name!r} is not a valid host name")
    return text


def parse_ports(text: str, rule: str) -> Ports:
    text = text.strip()
    if text == "*":
        return Ports(1, 65535)
    low_text, dash, high_text = text.partition("-")
    if not low_text.isdigit() or (dash and not high_text.isdigit()):
        raise ValueError(f"{rule!r}: ports {text!r} must be a port, a range like 8000-8100, "
                         "or *")
    low = int(low_text)
    high = int(high_text) if dash else low
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{rule!r}: ports {text!r} must be within 1-65535, low to high")
    return Ports(low, high)


def parse_rule(text: str) -> Rule:
    """Parse one ``HOST:PORTS`` rule; ValueError with the fix if it is malformed."""
    rule = text.strip()
    if not rule:
        raise ValueError("empty --allow rule: expected HOST:PORTS, e.g. 10.0.0.0/8:22")
    if rule.startswith("["):
        end = rule.find("]")
        if end < 0 or not rule[end + 1:].startswith(":"):
            raise ValueError(f"{rule!r}: expected [IPV6]:PORTS or [IPV6/BITS]:PORTS, "
                             "e.g. [fd00::/8]:443")
        host, port_text = rule[1:end], rule[end + 2:]
        try:
            network: Network = ipaddress.IPv6Network(host, strict=False)
        except ValueError as exc:
            raise ValueError(f"{rule!r}: {exc}") from None
        return Rule(parse_ports(port_text, rule), network=network)
    host, sep, port_text = rule.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{rule!r}: expected HOST:PORTS (PORTS: a port, a range like "
                         "8000-8100, or *), e.g. 10.0.0.0/8:22")
    if ":" in host:
        raise ValueError(f"{rule!r}: put an IPv6 address or network in brackets, "
                         "e.g. [::1]:22")
    ports = parse_ports(port_text, rule)
    if host == "*":
        return Rule(ports)
    if host[0].isdigit() and all(c.isdigit() or c in "./" for c in host):
        try:
            return Rule(ports, network=ipaddress.IPv4Network(host, strict=False))
        except ValueError as exc:
            raise ValueError(f"{rule!r}: {exc}") from None
    if host.startswith("*."):
        return Rule(ports, suffix="." + normalize_name(host[2:]))
    try:
        return Rule(ports, name=normalize_name(host))
    except ValueError as exc:
        raise ValueError(f"{rule!r}: {exc}") from None


class AllowList:
    """The rules; :meth:`resolve` is the tunnel's dial policy (see the module doc)."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)

    @classmethod
    def parse(cls, specs: str | Iterable[str]) -> AllowList:
        """From ``"RULE,RULE"`` or several such strings; ValueError if any rule is bad."""
        if isinstance(specs, str):
            specs = [specs]
        rules = [parse_rule(part) for spec in specs for part in spec.split(",")
                 if part.strip()]
        if not rules:
            raise ValueError("no --allow rules: expected HOST:PORTS[,HOST:PORTS...], "
                             "e.g. 10.0.0.0/8:22,localhost:8000-8100")
        return cls(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.rules) or "(nothing)"

    def permits_name(self, host: str, port: int) -> bool:
        """Whether a name rule permits ``host`` (as asked) on ``port``."""
        try:
            name = normalize_name(host)
        except ValueError:
            return False
        return any(r.matches_name(name, port) for r in self.rules
                   if r.network is None)

    def permits_address(self, address: str | Address, port: int) -> bool:
        """Whether an address rule (or ``*``) permits ``address`` on ``port``."""
        if isinstance(address, str):
            try:
                address = ipaddress.ip_address(address)
            except ValueError:
                return False
        return any(r.matches_address(address, port) for r in self.rules)

    def _address_rules_for(self, port: int) -> bool:
        return any(port in r.ports and (r.network is not None or r.any_host)
                   for r in self.rules)

    async def resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        """The addresses to dial for ``host:port``, each permitted; raise
        :class:`~tether.tunnel.reasons.Refusal` (code ``denied`` or ``no-such-host``)."""
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if self.permits_address(literal, port):
                return [(host, port)]
            raise Refusal("not allowed by the exposing side's --allow list", DENIED)
        by_name = self.permits_name(host, port)
        if not by_name and not self._address_rules_for(port):
            raise Refusal("not allowed by the exposing side's --allow list", DENIED)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise Refusal(f"cannot resolve the name: {exc}", NO_SUCH_HOST) from None
        seen: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = str(sockaddr[0])
            if address not in seen:
                seen.append(address)
        seen = seen[:MAX_ADDRESSES]
        allowed = [a for a in seen if by_name or self.permits_address(a, port)]
        if not allowed:
            raise Refusal(f"not allowed by the exposing side's --allow list (resolves to "
                          f"{', '.join(seen) or 'nothing'})", DENIED)
        return [(a, port) for a in allowed]
