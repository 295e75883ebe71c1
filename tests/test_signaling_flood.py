"""One client address floods a real relay process; a legitimate tunnel keeps working.

Three processes, as in life: the relay with its default limits; the attacker (source address
127.0.0.2, holding the token), which opens as many connections and conversations as it can,
fills them with held 60 KB signals and tries wrong tokens; and this test, where a
SignalingClient pair on 127.0.0.1 keeps exchanging signals and a real tunnel (two sealed
sides on aiortc) keeps echoing and restarts ICE through the relay mid-flood. Prints the
relay's RSS and what the attacker got (run with -s); asserts memory stays under RSS_BOUND,
the legitimate signals all arrive and the tunnel loses no byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time

from tether.app import ConnectSide, ExposeSide
from tether.connection_manager import ConnectionState, NetworkChangeType
from tether.cores.gathering import LOOPBACK
from tether.echo import start_echo_server
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
# The attacker: prints "filled" once its conversations hold what it could put there, then
# (on "go") hammers wrong tokens, prints its tallies as JSON and holds on until "stop".
ATTACK = """
import asyncio, collections, json, os, secrets, sys
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

PORT, TOKEN, SOURCE = int(sys.argv[1]), os.environ["RELAY_TOKEN"], sys.argv[2]

async def attempt(conversation, token, statuses):
    try:
        ws = await connect(
            f"ws://127.0.0.1:{PORT}/?conversation={conversation}&peer=x",
            additional_headers={"Authorization": f"Bearer {token}"},
            proxy=None, local_addr=(SOURCE, 0), ping_interval=None, open_timeout=5)
    except InvalidStatus as exc:
        statuses[exc.response.status_code] += 1
        return None
    statuses[101] += 1
    return ws

async def line():
    return await asyncio.to_thread(sys.stdin.readline)

async def main():
    held, conns, auth = [], collections.Counter(), collections.Counter()
    for round_ in range(2):  # as many connections and conversations as it can get
        got = await asyncio.gather(*(attempt(f"atk{round_}-{i}", TOKEN, conns)
                                     for i in range(200)))
        held += [ws for ws in got if ws is not None]
        if round_ == 0:
            await asyncio.sleep(4)
    blob = secrets.token_hex(30_000)  # 60 KB signals, held: nobody else joins
    for index, ws in enumerate(held):
        for seq in range(1, 41):
            await ws.send(json.dumps({"tube_id": "t", "kind": "offer", "data": blob,
                                      "session": f"s{index}", "seq": seq}))
    print("filled", flush=True)
    await line()
    for _ in range(4):  # idle connections beyond the limit and wrong tokens, fast
        await asyncio.gather(*(attempt("w", f"wrong-{i}", auth) for i in range(50)))
    print(json.dumps({"held": len(held), "conns": conns, "auth": auth}), flush=True)
    await line()
    for ws in held:
        ws.transport.abort()

asyncio.run(main())
"""


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def read_line(process: subprocess.Popen, timeout: float = 60.0) -> str:
    return (await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout)).strip()


async def test_one_address_cannot_exhaust_the_relay():
    env = {**os.environ, "RELAY_TOKEN": TOKEN}
    relay = subprocess.Popen([sys.executable, "-c", RELAY], stdout=subprocess.PIPE, env=env,
                             text=True)
    attacker = None
    a = b = expose = connect_side = echo_server = writer = None
    try:
        port = int(await read_line(relay, 20))
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

        # a real tunnel through the same relay, echoing all along
        echo_server = await start_echo_server("127.0.0.1", 0)
        common = {"signal_url": url, "token": TOKEN, "host_addresses": LOOPBACK,
                  "secret": secrets.token_urlsafe(24)}
        expose = ExposeSide("flooded", target=echo_server.sockets[0].getsockname()[:2], **common)
        connect_side = ConnectSide("flooded", listen=("127.0.0.1", 0), **common)
        await expose.start()
        await connect_side.start()
        tube = await connect_side.wait_ready(timeout=20)
        reader, writer = await asyncio.open_connection(*connect_side.listen_address)
        echoed = bytearray()
        pushed = bytearray()

        async def tunnel_echo() -> None:
            while flooding:
                chunk = secrets.token_bytes(4096)
                pushed.extend(chunk)
                writer.write(chunk)
                await writer.drain()
                echoed.extend(await asyncio.wait_for(reader.readexactly(len(chunk)), 20))
                await asyncio.sleep(0.02)

        legit_task = asyncio.create_task(legit())
        echo_task = asyncio.create_task(tunnel_echo())
        started = time.monotonic()
        attacker = subprocess.Popen([sys.executable, "-c", ATTACK, str(port), ATTACKER],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                    text=True)
        assert await read_line(attacker) == "filled"
        peak = rss(relay.pid)
        # the tunnel restarts ICE through the flooded relay
        await tube.manager.handle_network_change(NetworkChangeType.IP_ADDRESS_CHANGE)
        attacker.stdin.write("go\n")
        attacker.stdin.flush()
        tally = json.loads(await read_line(attacker))
        flood_time = time.monotonic() - started
        peak = max(peak, rss(relay.pid))
        flooding = False
        await legit_task
        await echo_task
        await asyncio.wait_for(a.drain(), 10)  # every legitimate signal acknowledged
        for _ in range(200):
            if tube.manager.state is ConnectionState.CONNECTED:
                break
            await asyncio.sleep(0.05)

        latencies = sorted(got[d] - sent[d] for d in sent if d in got)
        conns, auth = tally["conns"], tally["auth"]
        print(
            f"\n[flood] {flood_time:.1f} s of flooding from {ATTACKER}: connections "
            f"{conns} (101 = accepted), wrong tokens {auth}; "
            f"{tally['held']} conversations x 40 x 60 KB signals offered"
            f"\n[flood] relay RSS {base / 2**20:.0f} MB -> peak {peak / 2**20:.0f} MB "
            f"(bound {RSS_BOUND / 2**20:.0f} MB)"
            f"\n[flood] legitimate signals: {len(got)}/{len(sent)} delivered, latency "
            f"median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
            f"max {latencies[-1] * 1000:.0f} ms"
            f"\n[flood] tunnel: {len(echoed):,} bytes echoed intact, "
            f"{tube.manager.metrics.restarts_succeeded} ICE restart through the relay"
        )
        assert tally["held"] <= 32  # the per-address connection limit (default)
        assert conns.get("429", 0) > 0 and auth.get("429", 0) > 0
        assert auth.get("401", 0) <= 5
        assert peak < RSS_BOUND
        assert set(got) == set(sent) and len(sent) > 20
        assert echoed == pushed and len(echoed) > 100_000
        assert tube.manager.state is ConnectionState.CONNECTED
        assert tube.manager.metrics.restarts_succeeded == 1
    finally:
        if attacker is not None:
            pipe = attacker.stdin
            try:
                pipe.write("stop\n")
                pipe.close()
            except OSError:
                pass
            try:
                attacker.wait(10)
            except subprocess.TimeoutExpired:
                attacker.kill()
                attacker.wait()
            attacker.stdout.close()
        for client in (a, b):
            if client is not None:
                await client.close()
        if writer is not None:
            writer.close()
        for side in (connect_side, expose):
            if side is not None:
                await side.close()
        if echo_server is not None:
            echo_server.close()
            await echo_server.wait_closed()
        relay.terminate()
        try:
            relay.wait(5)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()
        relay.stdout.close()
