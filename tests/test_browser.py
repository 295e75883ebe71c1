"""A browser is a peer too: tether's aiortc core against a real headless Chromium.

Chromium runs in a network namespace joined by a veth to a second namespace that this
test's thread enters (tests/browser/chromium.py), so every packet, mDNS included, stays
inside namespaces the test makes and removes. The page (tests/browser/peer.js) creates
the same pre-negotiated channels as the core and echoes every tunnel message; signaling
goes over the DevTools protocol (Runtime.evaluate), with complete SDPs.

One browser per mDNS setting (Chromium's default, hiding host addresses behind
``.local`` names, and hiding turned off); each test gets a fresh peer connection.
Timings are printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from typing import Any

import pytest
import pytest_asyncio

from tether.cores.aiortc_core import AiortcTubeRegistry, decode_sdp, encode_sdp
from tether.cores.ice_path import candidate_ufrag

from .browser.chromium import BROWSER_ADDRESS, TETHER_ADDRESS, Chromium, chromium_path

if chromium_path() is None:
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium)",
                allow_module_level=True)
if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("the browser tests need root and iproute2 to make network namespaces",
                allow_module_level=True)

from .browser.chromium import drop_udp_to, inside, namespaces  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIVENESS = {"interval": 0.5, "misses": 4, "generation_timeout": 10.0}
CONNECT_TIMEOUT = 30.0
RESTARTS = 5
BIG_MESSAGE = 256 * 1024  # Chromium's a=max-message-size
BIG_TOTAL = 4 * 1024 * 1024
MDNS_SETTINGS = {
    "mdns-on": (),  # Chromium's default: host candidates are <uuid>.local names
    "mdns-off": ("--disable-features=WebRtcHideLocalIpsWithMdns",),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(MDNS_SETTINGS))
async def browser(request):
    """One headless Chromium in its namespace; this thread in tether's namespace."""
    with namespaces() as (browser_ns, tether_ns), inside(tether_ns):
        chromium = Chromium(browser_ns, MDNS_SETTINGS[request.param])
        chromium.mdns = request.param == "mdns-on"
        try:
            started = time.monotonic()
            await chromium.start()
            print(f"\n[{request.param}] Chromium up in {time.monotonic() - started:.2f} s")
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def core(browser):
    registry = AiortcTubeRegistry(host_addresses=(TETHER_ADDRESS,), liveness=LIVENESS)
    await browser.call("create")
    yield registry
    await registry.close()
    await browser.call("close")


async def until(predicate, timeout: float = CONNECT_TIMEOUT, what: str = "condition") -> float:
    """Wait for ``predicate()``; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def connect(core: AiortcTubeRegistry, browser: Chromium, tether_offers: bool) -> str:
    """Connect a tube to the page; returns its id once both channels are open both ends."""
    started = time.monotonic()
    name = "c-" + secrets.token_hex(3)
    if tether_offers:
        made = await core.create_tube(name, trickle_ice=False)
        tube_id = made["tube_id"]
        answer = await browser.call("answer", decode_sdp(made["offer"]))
        assert "a=setup:active" in answer or "a=setup:passive" in answer
        await core.set_remote_description(tube_id, encode_sdp(answer), is_answer=True)
    else:
        offer = await browser.call("offer", False)
        made = await core.create_tube(name, trickle_ice=False, offer=encode_sdp(offer))
        tube_id = made["tube_id"]
        assert await browser.call("accept", decode_sdp(made["answer"])) == "stable"
    await asyncio.wait_for(core.wait_channel(tube_id), CONNECT_TIMEOUT)
    await browser.call("opened", int(CONNECT_TIMEOUT * 1000))
    print(f"\n  connect ({'tether' if tether_offers else 'Chromium'} offers): "
          f"{1000 * (time.monotonic() - started):.0f} ms")
    return tube_id


def generation(core: AiortcTubeRegistry, tube_id: str) -> int:
    return core._tubes[tube_id].path.generation


def assert_mdns_resolved(core: AiortcTubeRegistry, browser: Chromium, tube_id: str) -> None:
    """With mDNS hiding on, the current generation holds the page's ``.local`` candidate,
    resolved to the browser's address; with it off, a plain host candidate."""
    gen = core._tubes[tube_id].path.current
    remote = [(c.host, c.type, getattr(c, "_network_host", c.host))
              for c in gen.remote_candidates]
    if browser.mdns:
        resolved = [r for r in remote if r[0].endswith(".local") and r[2] == BROWSER_ADDRESS]
        assert resolved, f"no .local candidate resolved to {BROWSER_ADDRESS}: {remote}"
    else:
        assert any(r[0] == BROWSER_ADDRESS and r[1] == "host" for r in remote), remote


class Echo:
    """Numbered messages through the page and back; every one must come back, in order."""

    def __init__(self, core: AiortcTubeRegistry, tube_id: str) -> None:
        self.channel = core.channel(tube_id)
        self.sent = 0
        self.got: list[int] = []
        self.channel.on("message", self._on_message)
        self._task: asyncio.Task[None] | None = None

    def _on_message(self, message: Any) -> None:
        if isinstance(message, str) and message.startswith("seq "):
            self.got.append(int(message[4:]))

    async def _pump(self, interval: float) -> None:
        while True:
            if self.channel.readyState == "open" and self.channel.bufferedAmount < 1 << 20:
                self.channel.send(f"seq {self.sent}")
                self.sent += 1
            await asyncio.sleep(interval)

    def start(self, interval: float = 0.005) -> None:
        self._task = asyncio.create_task(self._pump(interval))

    async def stop(self) -> None:
        """Stop sending; wait until everything sent came back, and check the order."""
        if self._task is not None:
            self._task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self._task
        await until(lambda: len(self.got) >= self.sent, what=f"{self.sent} echoes "
                    f"(got {len(self.got)})")
        assert self.got == list(range(self.sent)), "echoes lost, repeated or reordered"


async def restart(core: AiortcTubeRegistry, browser: Chromium, tube_id: str,
                  by_tether: bool) -> float:
    """One ICE restart started by tether or by the page; seconds until tether's new
    generation carries the tube (the page's signaling state is checked too)."""
    before = generation(core, tube_id)
    started = time.monotonic()
    if by_tether:
        offer = decode_sdp(await core.restart_ice(tube_id))
        assert "a=setup:actpass" in offer and "a=ice-options:trickle" in offer
        answer = await browser.call("answer", offer)
        await core.set_remote_description(tube_id, encode_sdp(answer), is_answer=True)
    else:
        offer = await browser.call("offer", True)
        answer = decode_sdp(await core.set_remote_description(tube_id, encode_sdp(offer)))
        assert "a=setup:actpass" not in answer
        assert await browser.call("accept", answer) == "stable"
    took = await until(lambda: generation(core, tube_id) > before
                       and core.get_connection_state(tube_id) == "connected",
                       what="the new ICE generation")
    took = time.monotonic() - started
    state = await browser.call("state")
    assert state["signaling"] == "stable", state
    return took


# -- the tests --------------------------------------------------------------------------


@pytest.mark.parametrize("tether_offers", [True, False], ids=["tether-offers", "chromium-offers"])
async def test_connect_and_echo_4_mib(core, browser, tether_offers):
    tube_id = await connect(core, browser, tether_offers)
    assert_mdns_resolved(core, browser, tube_id)
    channel = core.channel(tube_id)
    received: list[bytes] = []
    channel.on("message", lambda m: received.append(m) if isinstance(m, bytes) else None)
    payload = [os.urandom(BIG_MESSAGE) for _ in range(BIG_TOTAL // BIG_MESSAGE)]
    started = time.monotonic()
    for block in payload:
        channel.send(block)
    await until(lambda: len(received) == len(payload), timeout=60, what="the 4 MiB echo")
    took = time.monotonic() - started
    assert received == payload
    print(f"  4 MiB echo in {len(payload)} messages: {took:.2f} s "
          f"({2 * BIG_TOTAL / took / 1e6:.1f} MB/s both ways)")
    state = await browser.call("state")
    assert state["echoedBytes"] == BIG_TOTAL and not state["errors"], state


def set_tie_breaker(core: AiortcTubeRegistry, tube_id: str, tie: str) -> None:
    """Decide who wins ICE role conflicts (RFC 8445 section 7.3.1.1): Chromium takes the
    controlling role when it offers a restart, so each restart it starts is a conflict;
    a random tie-breaker would test one outcome or the other by chance."""
    core._tubes[tube_id].path.current._tie_breaker = 0 if tie == "low" else 2**64 - 1


@pytest.mark.parametrize("tie", ["low", "high"], ids=["tether-loses", "tether-wins"])
@pytest.mark.parametrize("tether_offers", [True, False], ids=["tether-offers", "chromium-offers"])
async def test_restarts_both_sides_lose_nothing(core, browser, tether_offers, tie):
    """Five restarts started by tether, then five by Chromium, while messages flow."""
    tube_id = await connect(core, browser, tether_offers)
    set_tie_breaker(core, tube_id, tie)
    echo = Echo(core, tube_id)
    echo.start()
    timings: dict[str, list[float]] = {"tether": [], "chromium": []}
    for by_tether in (True, False):
        for _ in range(RESTARTS):
            took = await restart(core, browser, tube_id, by_tether)
            timings["tether" if by_tether else "chromium"].append(took)
            await asyncio.sleep(0.1)  # a few echoes on each generation
    await echo.stop()
    assert_mdns_resolved(core, browser, tube_id)
    assert generation(core, tube_id) == 1 + 2 * RESTARTS
    for who, values in timings.items():
        print(f"  {RESTARTS} restarts started by {who}: "
              + ", ".join(f"{1000 * v:.0f}" for v in values) + " ms")
    print(f"  {echo.sent} messages echoed in order, none lost")
    state = await browser.call("state")
    assert state["connection"] == "connected" and not state["errors"], state



async def test_generation_retried_while_old_path_answers(browser):
    """Chromium restarts, but its new sockets receive nothing for a while (an nftables
    rule in its namespace): tether's generation times out once while the old path still
    answers, is checked again instead of being reported 'failed', and connects once the
    datagrams pass again."""
    states: list[str] = []

    def on_signal(signal: dict[str, Any]) -> None:
        if signal["kind"] == "connection_state_changed":
            states.append(signal["data"])

    timeout = 2.0
    core = AiortcTubeRegistry(host_addresses=(TETHER_ADDRESS,),
                              liveness={**LIVENESS, "generation_timeout": timeout})
    await browser.call("create")
    try:
        made = await core.create_tube("retry", trickle_ice=False, signal_callback=on_signal)
        tube_id = made["tube_id"]
        answer = await browser.call("answer", decode_sdp(made["offer"]))
        await core.set_remote_description(tube_id, encode_sdp(answer), is_answer=True)
        await asyncio.wait_for(core.wait_channel(tube_id), CONNECT_TIMEOUT)
        set_tie_breaker(core, tube_id, "high")  # tether stays controlling: it nominates
        echo = Echo(core, tube_id)
        echo.start()
        offer = await browser.call("offer", True)
        ports = sorted({int(line.split()[5]) for line in offer.splitlines()
                        if line.startswith("a=candidate:")})
        await drop_udp_to(browser.namespace, ports, True)
        try:
            answer = decode_sdp(await core.set_remote_description(tube_id, encode_sdp(offer)))
            assert await browser.call("accept", answer) == "stable"
            await asyncio.sleep(timeout + 1.0)  # the first try times out meanwhile
            assert generation(core, tube_id) == 1 and core._tubes[tube_id].path.pending
        finally:
            await drop_udp_to(browser.namespace, ports, False)
        took = await until(lambda: generation(core, tube_id) == 2, what="the retried generation")
        print(f"\n  retried generation connected {took:.2f} s after the datagrams passed again")
        await echo.stop()
        assert "failed" not in states, states
        assert core.get_connection_state(tube_id) == "connected"
    finally:
        await core.close()
        await browser.call("close")


class Trickle:
    """Carries trickled candidates both ways: tether's signals to the page (held there
    until their description is applied), the page's to tether (held by the core)."""

    def __init__(self, core: AiortcTubeRegistry, browser: Chromium) -> None:
        self.core, self.browser = core, browser
        self.tube_id: str | None = None
        self.ours: list[str] = []
        self.carried = {"to page": 0, "to tether": 0}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def on_signal(self, signal: dict[str, Any]) -> None:
        if signal["kind"] == "icecandidate" and signal["data"]:
            self.ours.append(signal["data"])

    def start(self, tube_id: str) -> None:
        self.tube_id = tube_id
        self._task = asyncio.create_task(self._carry())

    async def _carry(self) -> None:
        while not self._stopping:
            while self.ours:
                line = self.ours.pop(0)
                await self.browser.call("addCandidate", line, candidate_ufrag(line))
                self.carried["to page"] += 1
            for line in await self.browser.call("takeCandidates"):
                await self.core.add_ice_candidate(self.tube_id, line)
                self.carried["to tether"] += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop after the current call (a flag: Python 3.11's wait_for can swallow a
        cancellation that races with its result)."""
        if self._task is not None:
            self._stopping = True
            await asyncio.wait({self._task}, timeout=CONNECT_TIMEOUT)
            assert self._task.done(), "the candidate carrier did not stop"
            if not self._task.cancelled() and self._task.exception() is not None:
                raise self._task.exception()


@pytest.mark.parametrize("tether_offers", [True, False], ids=["tether-offers", "chromium-offers"])
async def test_trickled_candidates_connect_and_restart(core, browser, tether_offers):
    """Candidates trickled both ways (as a web page would get them over signaling): the
    first connection, then a restart started by each side."""
    trickle = Trickle(core, browser)
    started = time.monotonic()
    if tether_offers:
        made = await core.create_tube("trickle", signal_callback=trickle.on_signal)
        tube_id = made["tube_id"]
        trickle.start(tube_id)
        answer = await browser.call("answer", decode_sdp(made["offer"]), True)
        await core.set_remote_description(tube_id, encode_sdp(answer), is_answer=True)
    else:
        offer = await browser.call("offer", False, True)
        made = await core.create_tube("trickle", offer=encode_sdp(offer),
                                      signal_callback=trickle.on_signal)
        tube_id = made["tube_id"]
        trickle.start(tube_id)
        assert await browser.call("accept", decode_sdp(made["answer"])) == "stable"
    try:
        await asyncio.wait_for(core.wait_channel(tube_id), CONNECT_TIMEOUT)
        await browser.call("opened", int(CONNECT_TIMEOUT * 1000))
        print(f"\n  trickled connect: {1000 * (time.monotonic() - started):.0f} ms")
        echo = Echo(core, tube_id)
        echo.start()
        for by_tether in (True, False):
            before = generation(core, tube_id)
            started = time.monotonic()
            if by_tether:
                offer = decode_sdp(await core.restart_ice(tube_id))
                assert "a=candidate" not in offer
                answer = await browser.call("answer", offer, True)
                await core.set_remote_description(tube_id, encode_sdp(answer), is_answer=True)
            else:
                offer = await browser.call("offer", True, True)
                answer = await core.set_remote_description(tube_id, encode_sdp(offer))
                assert await browser.call("accept", decode_sdp(answer)) == "stable"
            await until(lambda: generation(core, tube_id) > before
                        and core.get_connection_state(tube_id) == "connected",
                        what="the new ICE generation")
            print(f"  trickled restart by {'tether' if by_tether else 'Chromium'}: "
                  f"{1000 * (time.monotonic() - started):.0f} ms")
        await echo.stop()
        assert_mdns_resolved(core, browser, tube_id)
        assert trickle.carried["to page"] and trickle.carried["to tether"], trickle.carried
    finally:
        await trickle.stop()

