"""Running commands for the lab, and making sure nothing it creates outlives it.

Every namespace and process the lab makes is registered here; :func:`cleanup_all` (run at
interpreter exit as a last resort, after the normal ``finally`` blocks) kills the processes
by their ids and deletes the namespaces. :func:`preflight` tells, before anything is built,
whether this machine can run the lab, with what to install if not.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterable

LIVE_NAMESPACES: set[str] = set()
LIVE_GROUPS: set[int] = set()  # process group ids (= pids of processes started in a new session)

INSTALL_HINT = ("run `make debian` as root, or `apt-get install -y iproute2 nftables "
                "conntrack coturn`")


class LabUnavailable(RuntimeError):
    """The lab cannot run here (not root, no namespaces, a tool missing); says what to do."""


class CommandError(RuntimeError):
    """A setup or fault command failed."""


async def run(*argv: str, input: bytes | None = None, check: bool = True,
              timeout: float = 15.0) -> str:
    """Run ``argv`` without blocking the loop; its stdout, or CommandError if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: exit {proc.returncode}: "
                           f"{err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


def new_suffix() -> str:
    return secrets.token_hex(3)


async def add_namespace(name: str) -> None:
    LIVE_NAMESPACES.add(name)
    await run("ip", "netns", "add", name)


async def delete_namespace(name: str) -> None:
    """Kill what still runs in ``name`` (only the lab's own processes live there), delete it."""
    pids = await run("ip", "netns", "pids", name, check=False)
    for pid in _ints(pids.split()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    await run("ip", "netns", "delete", name, check=False)
    LIVE_NAMESPACES.discard(name)


def _ints(words: Iterable[str]) -> list[int]:
    return [int(w) for w in words if w.isdigit()]


def cleanup_all() -> None:
    """Synchronous last resort: kill registered process groups, delete namespaces."""
    for pgid in list(LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        LIVE_GROUPS.discard(pgid)
    for name in list(LIVE_NAMESPACES):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False).stdout
        for pid in _ints(pids.split()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        LIVE_NAMESPACES.discard(name)


atexit.register(cleanup_all)


def preflight(need_turn: bool = True, need_tun: bool = True) -> None:
    """Raise LabUnavailable, saying what to do, unless namespaces can be made here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise LabUnavailable("the lab needs root (network namespaces, nftables); "
                             "run it as root, e.g. in CI or a container")
    tools = {"ip": "iproute2", "nft": "nftables", "conntrack": "conntrack"}
    if need_turn:
        tools["turnserver"] = "coturn"
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in tools.items()
               if shutil.which(tool) is None]
    if missing:
        raise LabUnavailable(f"missing {', '.join(missing)}: {INSTALL_HINT}")
    if need_tun and not os.path.exists("/dev/net/tun"):
        raise LabUnavailable("no /dev/net/tun (the slow_path delayer needs the tun driver: "
                             "`modprobe tun`, or skip slow_path with --only)")
    probe = f"tlprobe-{new_suffix()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        raise LabUnavailable(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        nft = subprocess.run(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", "x"],
                             capture_output=True, text=True, check=False)
        if nft.returncode != 0:
            raise LabUnavailable(f"nftables does not work in a namespace: {nft.stderr.strip()}")
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
