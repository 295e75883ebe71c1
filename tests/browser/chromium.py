"""Headless Chromium in its own network namespace, driven over the DevTools protocol.

Two namespaces joined by a veth pair: Chromium runs in one (default route over the veth),
the test's own thread enters the other while the browser tests run, so tether's sockets,
Chromium's and every mDNS query stay inside namespaces the test made and removes. The
DevTools protocol goes over a pipe (``--remote-debugging-pipe``: fds 3 and 4), which works
across namespaces without any listening port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2 import netns as pyroute_netns

PAGE = Path(__file__).with_name("peer.html")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe", "--allow-file-access-from-files",
)
TETHER_ADDRESS = "10.213.7.1"
BROWSER_ADDRESS = "10.213.7.2"
MESSAGE_LIMIT = 64 * 1024 * 1024


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    """Make the browser's and tether's namespaces, joined by a veth; remove them after.
    Yields (browser namespace, tether namespace)."""
    suffix = secrets.token_hex(3)
    browser, tether = f"tb-chr-{suffix}", f"tb-tth-{suffix}"
    made: list[str] = []
    try:
        for name in (browser, tether):
            _ip("netns", "add", name)
            made.append(name)
        _ip("-n", tether, "link", "add", "tth0", "type", "veth", "peer", "name", "chr0",
            "netns", browser)
        for ns, dev, addr, peer in ((tether, "tth0", TETHER_ADDRESS, BROWSER_ADDRESS),
                                    (browser, "chr0", BROWSER_ADDRESS, TETHER_ADDRESS)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "route", "add", "default", "via", peer, "dev", dev)
        yield browser, tether
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run this thread inside ``namespace`` (sockets made meanwhile stay there)."""
    pyroute_netns.pushns(namespace)
    try:
        yield
    finally:
        pyroute_netns.popns()


async def drop_udp_to(namespace: str, ports: list[int], drop: bool) -> None:
    """Drop (or stop dropping) UDP datagrams arriving in ``namespace`` for ``ports``."""
    if drop:
        rules = ["add table inet tether_test",
                 "add chain inet tether_test input { type filter hook input priority 0 ; }"]
        rules += [f"add rule inet tether_test input udp dport {p} drop" for p in ports]
    else:
        rules = ["delete table inet tether_test"]
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", namespace, "nft", "-f", "-", stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await proc.communicate("\n".join(rules).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {namespace}: {err.decode().strip()}")


class CdpError(RuntimeError):
    """A DevTools command failed, or the page threw."""


class Chromium:
    """One headless Chromium with one page (peer.html), driven over the DevTools pipe."""

    def __init__(self, namespace: str, extra_flags: tuple[str, ...] = ()) -> None:
        self.namespace = namespace
        self.extra_flags = extra_flags
        self.proc: asyncio.subprocess.Process | None = None
        self.profile = tempfile.mkdtemp(prefix="tether-chromium-")
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: Any = None
        self._pump: asyncio.Task[None] | None = None
        self.session: str | None = None
        self.console: list[str] = []
        self.log_path = os.path.join(self.profile, "chromium.log")
        self._log: Any = None

    async def start(self) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        exe = chromium_path()
        flags = " ".join([*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                          *self.extra_flags, "about:blank"])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        script = f"exec {exe} {flags} 3<&{to_browser_r} 4>&{from_browser_w}"
        try:
            self.proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", self.namespace, "bash", "-c", script,
                pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        loop = asyncio.get_running_loop()
        self._reader = asyncio.StreamReader(limit=MESSAGE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self._reader),
                                     os.fdopen(from_browser_r, "rb", buffering=0))
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(to_browser_w, "wb", buffering=0))
        self._writer = asyncio.StreamWriter(transport, protocol, None, loop)
        self._pump = asyncio.create_task(self._read(), name="chromium-cdp")
        targets = await self.send("Target.getTargets", timeout=30)
        page = next(t for t in targets["targetInfos"] if t["type"] == "page")
        attached = await self.send("Target.attachToTarget", targetId=page["targetId"],
                                   flatten=True)
        self.session = attached["sessionId"]
        await self.send("Runtime.enable", session=True)
        await self.send("Page.enable", session=True)
        await self.send("Page.navigate", session=True, url=PAGE.as_uri())
        for _ in range(200):
            with contextlib.suppress(CdpError):
                if await self.evaluate("typeof window.peer === 'object'"):
                    return
            await asyncio.sleep(0.05)
        raise CdpError(f"the page did not load: {self.console[-5:]}")

    async def _read(self) -> None:
        assert self._reader is not None
        while True:
            try:
                raw = await self._reader.readuntil(b"\0")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                break
            message = json.loads(raw[:-1])
            if "id" in message:
                future = self._waiting.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description")))
                                             for a in args))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(CdpError("Chromium closed the DevTools pipe"))

    async def send(self, method: str, *, session: bool = False, timeout: float = 60,
                   **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        future = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self._writer.write(json.dumps(message).encode() + b"\0")
        try:
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(ident, None)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """Evaluate ``expression`` in the page (awaiting a promise); its JSON value."""
        result = await self.send("Runtime.evaluate", session=True, timeout=timeout,
                                 expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"page: {text}")
        return result["result"].get("value")

    async def call(self, function: str, *args: Any, timeout: float = 60) -> Any:
        """Call ``peer.<function>(*args)`` in the page."""
        encoded = ", ".join(json.dumps(a) for a in args)
        return await self.evaluate(f"peer.{function}({encoded})", timeout=timeout)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(CdpError, TimeoutError, ConnectionError):
                await self.send("Browser.close", timeout=5)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                await self.proc.wait()
        if self._writer is not None:
            self._writer.close()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
