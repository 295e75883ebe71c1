"""One peer of the bare aiortc benchmark, run as a script (``python -P aiortc_peer.py``).

It imports aiortc and the standard library only, never tether, so that the aiortc measured
here is aiortc as shipped, without tether's patches. The only change: host candidates are
gathered on 127.0.0.1 (aioice skips loopback), so nothing leaves the machine.

Talks JSON lines with the bench on stdin/stdout. ``offer SIZE SEED``: prints its offer,
reads the answer, opens a data channel, sends SIZE seeded random bytes in 16 KiB messages
(paced by bufferedAmount, as tether's tunnel is), waits for the SHA-256 the answerer sends
back and prints the result. ``answer``: reads the offer, prints the answer, hashes what
arrives and sends the digest back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import resource
import sys
import time

import aioice.ice
from aiortc import RTCPeerConnection, RTCSessionDescription

MESSAGE = 16 * 1024
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024



def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """Host candidates on 127.0.0.1 only (aioice skips loopback): nothing leaves the machine."""
    return ["127.0.0.1"]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def read_line() -> dict:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("the bench closed stdin")
    return json.loads(line)


async def offer(size: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    digest = hashlib.sha256(data).hexdigest()
    pc = RTCPeerConnection()
    t0 = time.perf_counter()
    channel = pc.createDataChannel("bench")
    opened = asyncio.Event()
    answered: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    low = asyncio.Event()
    channel.bufferedAmountLowThreshold = LOW_WATER
    channel.on("open", opened.set)
    channel.on("bufferedamountlow", low.set)
    channel.on("message", lambda m: answered.done() or answered.set_result(m))
    await pc.setLocalDescription(await pc.createOffer())
    emit({"sdp": pc.localDescription.sdp, "type": "offer"})
    answer = await read_line()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
    async with asyncio.timeout(30):
        await opened.wait()
    connect_ms = (time.perf_counter() - t0) * 1000.0
    cpu0, t1 = cpu(), time.perf_counter()
    view = memoryview(data)
    for start in range(0, size, MESSAGE):
        if channel.bufferedAmount > HIGH_WATER:
            low.clear()
            await low.wait()
        channel.send(bytes(view[start:start + MESSAGE]))
    async with asyncio.timeout(300):
        got = await answered
    seconds = time.perf_counter() - t1
    emit({"ok": got == digest, "seconds": seconds, "connect_ms": connect_ms,
          "cpu_s": cpu() - cpu0})
    await pc.close()


async def answer() -> None:
    pc = RTCPeerConnection()
    done = asyncio.Event()
    state = {"cpu0": None}

    @pc.on("datachannel")
    def on_channel(channel) -> None:  # noqa: ANN001
        digest = hashlib.sha256()
        expected = state["size"]
        got = 0

        @channel.on("message")
        def on_message(message: bytes) -> None:
            nonlocal got
            if state["cpu0"] is None:
                state["cpu0"] = cpu()
            digest.update(message)
            got += len(message)
            if got >= expected:
                channel.send(digest.hexdigest())
                state["cpu_s"] = cpu() - state["cpu0"]
                done.set()

    remote = await read_line()
    state["size"] = remote["size"]
    await pc.setRemoteDescription(RTCSessionDescription(remote["sdp"], "offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    emit({"sdp": pc.localDescription.sdp, "type": "answer"})
    async with asyncio.timeout(300):
        await done.wait()
    await asyncio.sleep(0.5)  # let the digest leave before closing
    emit({"cpu_s": state["cpu_s"]})
    await pc.close()


if __name__ == "__main__":
    aioice.ice.get_host_addresses = loopback_only
    if sys.argv[1] == "offer":
        asyncio.run(offer(int(sys.argv[2]), int(sys.argv[3])))
    else:
        asyncio.run(answer())
