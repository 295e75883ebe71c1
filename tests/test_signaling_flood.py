"""One client address floods a real relay process; a legitimate conversation keeps working.

The relay runs in its own process with its default limits; the attacker (source address
127.0.0.2, holding the token) opens as many connections and conversations as it can, fills
them with held 60 KB signals, and tries wrong tokens, while a SignalingClient pair on
127.0.0.1 keeps exchanging signals. Prints the relay's RSS and what the attacker got
(run with -s); asserts memory stays under RSS_BOUND and the legitimate signals all arrive.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import subprocess
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tether.signaling import SignalingClient

TOKEN = secrets.token_urlsafe(16)
RSS_BOUND = 200 * 1024 * 1024
ATTACKER = "127.0.0.2"
RELAY = """
import asyncio, os
from tether.signaling import SignalingServer

async def main():
    async with SignalingServer(port=0, token=os.environ["RELAY_TOKEN"]) as relay:
        print(relay.port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def attempt(port: int, conversation: str, peer: str, token: str, statuses: collections.Counter):
    try:
        ws = await connect(
            f"ws://127.0.0.1:{port}/?conversation={conversation}&peer={peer}",
            additional_headers={"Authorization": f"Bearer {token}"},
            proxy=None, local_addr=(ATTACKER, 0), ping_interval=None, open_timeout=5,
        )
    except InvalidStatus as exc:
        statuses[exc.response.status_code] += 1
        return None
    statuses[101] += 1
    return ws


async def test_one_address_cannot_exhaust_the_relay():
    env = {**os.environ, "RELAY_TOKEN": TOKEN}
    relay = subprocess.Popen([sys.executable, "-c", RELAY], stdout=subprocess.PIPE, env=env)
    held: list = []
    a = b = None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(relay.stdout.readline), 20)
        port = int(line)
        base = rss(relay.pid)
        url = f"ws://127.0.0.1:{port}/"

        # the legitimate conversation, from another address
        got: dict[str, float] = {}
        a = SignalingClient(url, TOKEN, "legit", lambda s: None, peer_id="a", proxy=None)
        b = SignalingClient(url, TOKEN, "legit", lambda s: got.setdefault(s["data"], time.monotonic()),
                            peer_id="b", proxy=None)
        await a.start()
        await b.start()
        sent: dict[str, float] = {}
        flooding = True

        async def legit() -> None:
            i = 0
            while flooding:
                data = f"legit-{i}"
                sent[data] = time.monotonic()
                await a.send({"tube_id": "t", "conversation_id": "", "kind": "icecandidate",
                              "data": data})
                i += 1
                await asyncio.sleep(0.05)

        legit_task = asyncio.create_task(legit())
        started = time.monotonic()
        conns: collections.Counter = collections.Counter()
        # 1. as many connections / conversations as it can get (two rounds, 4 s apart)
        for round_ in range(2):
            results = await asyncio.gather(*(
                attempt(port, f"atk{round_}-{i}", "x", TOKEN, conns) for i in range(200)))
            held.extend(ws for ws in results if ws is not None)
            if round_ == 0:
                await asyncio.sleep(4)
        # 2. fill every conversation it got with held 60 KB signals (nobody else joins)
        blob = secrets.token_hex(30_000)
        for index, ws in enumerate(held):
            for seq in range(1, 41):
                await ws.send(json.dumps({"tube_id": "t", "kind": "offer", "data": blob,
                                          "session": f"s{index}", "seq": seq}))
        peak = rss(relay.pid)
        # 3. idle connections beyond the limit and wrong tokens, fast
        auth: collections.Counter = collections.Counter()
        for _ in range(4):
            await asyncio.gather(*(attempt(port, "w", "x", "wrong-" + str(i), auth) for i in range(50)))
        flood_time = time.monotonic() - started
        flooding = False
        await legit_task
        await asyncio.wait_for(a.drain(), 10)  # every legitimate signal acknowledged
        peak = max(peak, rss(relay.pid))

        latencies = sorted(got[d] - sent[d] for d in sent if d in got)
        print(
            f"\n[flood] {flood_time:.1f} s of flooding from {ATTACKER}: connections "
            f"{dict(conns)} (101 = accepted), wrong tokens {dict(auth)}; "
            f"{len(held)} conversations x 40 x 60 KB signals offered"
            f"\n[flood] relay RSS {base / 2**20:.0f} MB -> peak {peak / 2**20:.0f} MB "
            f"(bound {RSS_BOUND / 2**20:.0f} MB)"
            f"\n[flood] legitimate signals: {len(got)}/{len(sent)} delivered, latency "
            f"median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
            f"max {latencies[-1] * 1000:.0f} ms"
        )
        assert len(held) <= 32  # the per-address connection limit (default)
        assert conns[429] > 0 and auth[429] > 0 and auth[401] <= 5
        assert peak < RSS_BOUND
        assert set(got) == set(sent) and len(sent) > 20
    finally:
        for ws in held:
            ws.transport.abort()
        for client in (a, b):
            if client is not None:
                await client.close()
        relay.terminate()
        try:
            relay.wait(5)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()
        relay.stdout.close()
