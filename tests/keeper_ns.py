"""A network namespace whose only address is a 10.x/32 on lo, for Rust-core tests.

The Rust core never gathers 127.0.0.1 and gathers nothing on a bare lo; a /32 on lo is a
non-loopback address no packet can leave, so its tubes stay inside the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def need_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (network namespaces)")
    pytest.importorskip("keeper_pam_webrtc_rs")


WATCH = """
table inet watch {
  set out { type ipv4_addr . inet_proto . inet_service; flags dynamic; }
  set out6 { type ipv6_addr . inet_proto . inet_service; flags dynamic; }
  chain out {
    type filter hook output priority 0;
    fib daddr type local accept
    ip daddr 224.0.0.0/4 udp dport 5353 counter accept
    ip6 daddr ff00::/8 udp dport 5353 counter accept
    meta l4proto { tcp, udp } fib daddr type != local add @out { ip daddr . meta l4proto . th dport }
    meta l4proto { tcp, udp } fib daddr type != local add @out6 { ip6 daddr . meta l4proto . th dport }
  }
}
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def outbound(namespace: str) -> list[str]:
    """Every (address, protocol, port) the namespace sent TCP/UDP to, off this host
    (multicast DNS on the local link aside)."""
    found: list[str] = []
    for name in ("out", "out6"):
        listing = subprocess.run(["ip", "netns", "exec", namespace, "nft", "list", "set",
                                  "inet", "watch", name], capture_output=True, text=True,
                                 check=True).stdout
        if "elements" in listing:
            found.append(listing.split("elements = {", 1)[1].split("}", 1)[0].strip())
    return found


@contextmanager
def lo_namespace(watch: bool = False) -> Iterator[tuple[str, str]]:
    """(name, address): a fresh namespace, removed after, also when the test fails.

    ``watch``: also a default route into a black hole (a veth pair inside the namespace,
    with a static neighbour) and an nftables set of every destination off this host, so
    a packet meant for the internet is routed, counted and goes nowhere (see outbound).
    """
    name = f"tk-{secrets.token_hex(3)}"
    address = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/32", "dev", "lo"],
                       check=True, capture_output=True)
        if watch:
            _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
            _ip("-n", name, "link", "set", "v0", "up")
            _ip("-n", name, "link", "set", "v1", "up")
            _ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "v0")
            _ip("-n", name, "neigh", "add", "192.0.2.2", "lladdr", "02:00:00:00:00:02",
                "dev", "v0")
            _ip("-n", name, "route", "add", "default", "via", "192.0.2.2", "dev", "v0")
            subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=WATCH,
                           text=True, check=True, capture_output=True)
        yield name, address
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def run_in(namespace: str, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    """Run ``python args...`` from the repository root inside ``namespace``."""
    return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


def last_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])
