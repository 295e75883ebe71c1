"""Real tubes on loopback: a busy path cut, detected, replaced or back; data resumes at once.

Faults are injected at the datagram level inside the process (drop_traffic, and a delay
for the slow path), on real aiortc peers, real UDP sockets on 127.0.0.1. Latencies are
printed; assertions on them are loose (the targets are 2 s detection on a busy path and
100 ms from nomination to data flowing again).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiortc.utils import uint32_gt

from tether.cores.aiortc_core import AiortcTubeRegistry

from .tube_pair import Wire, connect_tubes, until




def states(wire: Wire, side: str) -> list[str]:
    return [s["data"] for s in wire.seen[side] if s["kind"] == "connection_state_changed"]


class Stream:
    """Numbered messages from a to b as fast as SCTP takes them (a bounded send buffer);
    b checks they arrive complete and in order."""

    def __init__(self, sender, receiver) -> None:
        self.sender = sender
        self.got: list[int] = []
        self.sent = 0
        receiver.on("message", lambda m: self.got.append(int(m[:12])))
        self._task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        pad = b"." * 200
        while True:
            if self.sender.bufferedAmount < 32_000:
                self.sender.send(b"%012d" % self.sent + pad)
                self.sent += 1
            await asyncio.sleep(0.002)

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self) -> None:
        await until(lambda: len(self.got) >= self.sent, timeout=15)
        assert self.got == list(range(self.sent))


class SackWatch:
    """When the sender's SCTP saw its cumulative acknowledgement move forward."""

    def __init__(self, core: AiortcTubeRegistry, tube_id: str) -> None:
        self.sctp = core._tubes[tube_id].pc.sctp
        self.advances: list[float] = []
        loop = asyncio.get_running_loop()
        original = self.sctp._receive_sack_chunk

        async def watching(chunk) -> None:
            before = self.sctp._last_sacked_tsn
            await original(chunk)
            if uint32_gt(self.sctp._last_sacked_tsn, before):
                self.advances.append(loop.time())

        self.sctp._receive_sack_chunk = watching

    def first_after(self, moment: float) -> float | None:
        return next((t for t in self.advances if t >= moment), None)


async def restart(a, b, tube_id: str) -> None:
    offer = await a.restart_ice(tube_id)
    answer = await b.set_remote_description(tube_id, offer)
    await a.set_remote_description(tube_id, answer, is_answer=True)


async def streaming(cores):
    """Two connected tubes with liveness on, and a checked stream running from a to b."""
    a, b = cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    await until(lambda: a._tubes[tube_id].path.watching and b._tubes[tube_id].path.watching)
    stream = Stream(a.channel(tube_id), b.channel(tube_id))
    sacks = SackWatch(a, tube_id)
    stream.start()
    return a, b, wire, tube_id, stream, sacks


async def test_busy_path_cut_detected_then_new_path_resumes_at_once(cores):
    a, b, wire, tube_id, stream, sacks = await streaming(cores)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(0.5)
        assert stream.got, "nothing flowed before the cut"
        cut_at = loop.time()
        a.drop_traffic(tube_id, True)
        await until(lambda: "disconnected" in states(wire, "a"), timeout=10)
        detected = loop.time() - cut_at
        before_restart = len(stream.got)
        await restart(a, b, tube_id)
        pa, pb = a._tubes[tube_id].path, b._tubes[tube_id].path
        await until(lambda: pa.generation == 2 and pb.generation == 2)
        await until(lambda: sacks.first_after(pa.switched_at) is not None, timeout=5)
        nominated = min(pa.switched_at, pb.switched_at)
        resumed = sacks.first_after(nominated) - nominated
        await until(lambda: len(stream.got) > before_restart + 100, timeout=5)
    finally:
        await stream.stop()
    await stream.check()
    print(f"\nbusy path cut: 'disconnected' after {detected * 1000:.0f} ms (target < 2000); "
          f"new DATA acknowledged {resumed * 1000:.1f} ms after nomination (target < 100); "
          f"nominated a {pa.switched_at - nominated:.3f} s / b {pb.switched_at - nominated:.3f} s; "
          f"{stream.sent} messages in order")
    assert detected < 3.0
    assert a._tubes[tube_id].chunks_resent_at_once > 0
    assert resumed < 0.2  # SCTP alone waits for its timer: up to 1 s
    assert states(wire, "a")[-1] == "connected" and states(wire, "b")[-1] == "connected"


async def test_old_path_back_after_an_outage_resumes_at_once(cores):
    a, b, wire, tube_id, stream, sacks = await streaming(cores)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(0.3)
        a.drop_traffic(tube_id, True)
        await until(lambda: "disconnected" in states(wire, "a"), timeout=10)
        # Long enough for SCTP's timer to fire and shrink its window at least once.
        await asyncio.sleep(1.2)
        restored_at = loop.time()
        a.drop_traffic(tube_id, False)
        await until(lambda: states(wire, "a")[-1] == "connected", timeout=5)
        back = loop.time() - restored_at
        await until(lambda: sacks.first_after(restored_at) is not None, timeout=5)
        resumed = sacks.first_after(restored_at) - restored_at
        before = len(stream.got)
        await until(lambda: len(stream.got) > before + 100, timeout=5)
    finally:
        await stream.stop()
    await stream.check()
    path = a._tubes[tube_id].path
    print(f"\npath back: 'connected' {back * 1000:.0f} ms after the cable returned, new DATA "
          f"acknowledged after {resumed * 1000:.0f} ms; resumes {path.resumes}")
    assert path.generation == 1  # no restart: the same path came back
    assert a._tubes[tube_id].chunks_resent_at_once > 0
    assert resumed < 0.5  # SCTP alone waits for its timer: up to 1 s


def delay_path(core: AiortcTubeRegistry, tube_id: str, seconds: float) -> None:
    """Every datagram this side sends on its current path leaves ``seconds`` late."""
    loop = asyncio.get_running_loop()
    for protocol in core._tubes[tube_id].path.current._protocols:
        transport = protocol.transport
        send = transport.sendto

        def late(data, addr=None, send=send):
            loop.call_later(seconds, send, data, addr)

        transport.sendto = late


async def test_a_working_600ms_path_is_never_declared_dead(cores):
    a, b = cores
    wire = Wire(a, b)
    tube_id = await connect_tubes(a, b, wire)
    await until(lambda: a._tubes[tube_id].path.watching and b._tubes[tube_id].path.watching)
    await asyncio.sleep(0.3)  # the clocks measured the loopback round trip
    delay_path(a, tube_id, 0.3)
    delay_path(b, tube_id, 0.3)
    stream = Stream(a.channel(tube_id), b.channel(tube_id))
    stream.start()
    try:
        await asyncio.sleep(3.0)  # busy
    finally:
        await stream.stop()
    await stream.check()
    await asyncio.sleep(4.0)  # idle
    got = asyncio.get_running_loop().create_future()
    b.channel(tube_id).on("message", lambda m: got.done() or got.set_result(m))
    a.channel(tube_id).send(b"000000000000 still here")
    assert await asyncio.wait_for(got, 5) == b"000000000000 still here"
    clock = a._tubes[tube_id].path.clock
    print(f"\n600 ms path: probe rtt {clock.rtt * 1000:.0f} ms, busy window "
          f"{clock.busy_window():.2f} s, idle window {clock.idle_window():.2f} s, "
          f"SCTP srtt {a.get_connection_stats(tube_id)['rtt_ms']} ms, states a {states(wire, 'a')} "
          f"b {states(wire, 'b')}")
    assert "disconnected" not in states(wire, "a") + states(wire, "b")
    assert 0.55 < clock.rtt_bound() < 2.0  # the latest round trips, 600 ms
