"""TURN: tubes that may only use relayed candidates, through a real coturn on 127.0.0.1,
connect, carry data and survive an ICE restart still relayed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from aioice import stun

from tether.cores.aiortc_core import AiortcTubeRegistry, ice_configuration
from tether.cores.gathering import LOOPBACK

from .tube_pair import Wire, connect_tubes, until

TURN_USER, TURN_PASSWORD = "tether", "s3cret"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def turn_answers(port: int) -> bool:
    """A STUN binding request to the server gets an answer."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    loop = asyncio.get_running_loop()
    answered = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not answered.done():
                answered.set_result(True)

    transport, _ = await loop.create_datagram_endpoint(Probe, remote_addr=("127.0.0.1", port))
    try:
        for _ in range(40):
            transport.sendto(bytes(request))
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(answered), 0.1)
        return False
    finally:
        transport.close()


class Turn:
    def __init__(self, url: str, process: subprocess.Popen) -> None:
        self.url, self.process = url, process


@pytest.fixture
async def turn():
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("coturn's turnserver is not installed "
                    "(make debian, or apt-get install -y coturn)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tether-turn-") as run_dir:
        log = open(Path(run_dir) / "turnserver.log", "wb")
        process = subprocess.Popen(
            [binary, "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}",
             "--relay-ip=127.0.0.1", f"--user={TURN_USER}:{TURN_PASSWORD}", "--realm=tether",
             "--lt-cred-mech", "--fingerprint", "--no-tls", "--no-dtls", "--no-cli",
             "--allow-loopback-peers", "--min-port=40000", "--max-port=60000",
             f"--pidfile={run_dir}/turnserver.pid", f"--db={run_dir}/turndb",
             "--log-file=stdout", "--simple-log"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            if not await turn_answers(port):
                log_text = (Path(run_dir) / "turnserver.log").read_text()
                pytest.fail(f"turnserver did not start: {log_text}")
            yield Turn(f"turn:127.0.0.1:{port}", process)
        finally:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def relay_core(url: str, **extra) -> AiortcTubeRegistry:
    return AiortcTubeRegistry(
        host_addresses=LOOPBACK, ice_servers=[url], turn_username=TURN_USER,
        turn_password=TURN_PASSWORD, liveness={"interval": 0.5, "generation_timeout": 10.0},
        **extra,
    )


def nominated_type(core: AiortcTubeRegistry, tube_id: str) -> str:
    return core._tubes[tube_id].path.current._nominated[1].local_candidate.type


async def echo(a, b, tube_id: str, payload: bytes) -> None:
    got = asyncio.get_running_loop().create_future()
    b.channel(tube_id).on("message", lambda m: got.done() or got.set_result(m))
    a.channel(tube_id).send(payload)
    assert await asyncio.wait_for(got, 10) == payload


def states(wire: Wire, side: str) -> list[str]:
    return [s["data"] for s in wire.seen[side] if s["kind"] == "connection_state_changed"]


async def test_relay_only_tubes_connect_carry_data_and_restart_over_turn(turn):
    a, b = relay_core(turn.url, relay_only=True), relay_core(turn.url, relay_only=True)
    try:
        wire = Wire(a, b)
        tube_id = await connect_tubes(a, b, wire)
        candidates = [s["data"] for side in "ab" for s in wire.seen[side]
                      if s["kind"] == "icecandidate" and s["data"]]
        assert candidates and all(" typ relay " in c for c in candidates)
        assert nominated_type(a, tube_id) == nominated_type(b, tube_id) == "relay"
        await echo(a, b, tube_id, b"over turn")

        offer = await a.restart_ice(tube_id)
        answer = await b.set_remote_description(tube_id, offer)
        await a.set_remote_description(tube_id, answer, is_answer=True)
        await until(lambda: a._tubes[tube_id].path.generation == 2
                    and b._tubes[tube_id].path.generation == 2, timeout=15)
        for core in (a, b):
            gen = core._tubes[tube_id].path.current
            assert gen.local_candidates and {c.type for c in gen.local_candidates} == {"relay"}
            assert nominated_type(core, tube_id) == "relay"
        await echo(b, a, tube_id, b"still over turn after the restart")
        assert a.get_connection_state(tube_id) == "connected"
    finally:
        await a.close()
        await b.close()


async def test_the_relayed_path_runs_through_the_server(turn):
    """Freezing coturn (SIGSTOP) kills the path; thawing it brings the same path back."""
    a, b = relay_core(turn.url, relay_only=True), relay_core(turn.url, relay_only=True)
    try:
        wire = Wire(a, b)
        tube_id = await connect_tubes(a, b, wire)
        await echo(a, b, tube_id, b"before")
        turn.process.send_signal(signal.SIGSTOP)
        try:
            await until(lambda: "disconnected" in states(wire, "a")
                        and "disconnected" in states(wire, "b"), timeout=10)
        finally:
            turn.process.send_signal(signal.SIGCONT)
        await until(lambda: states(wire, "a")[-1] == "connected"
                    and states(wire, "b")[-1] == "connected", timeout=10)
        assert a._tubes[tube_id].path.generation == 1
        await echo(a, b, tube_id, b"after the server thawed")
    finally:
        await a.close()
        await b.close()


async def test_every_restart_generation_gathers_a_relay_candidate_again(turn):
    a, b = relay_core(turn.url), relay_core(turn.url)
    try:
        tube_id = await connect_tubes(a, b, Wire(a, b))
        first = {c.type for c in a._tubes[tube_id].path.current.local_candidates}
        assert first == {"host", "relay"}
        for generation in (2, 3):
            offer = await a.restart_ice(tube_id)
            answer = await b.set_remote_description(tube_id, offer)
            await a.set_remote_description(tube_id, answer, is_answer=True)
            await until(lambda: a._tubes[tube_id].path.generation == generation
                        and b._tubes[tube_id].path.generation == generation, timeout=15)
            gen = a._tubes[tube_id].path.current
            assert {c.type for c in gen.local_candidates} == {"host", "relay"}
            assert gen.turn_username == TURN_USER
        await echo(a, b, tube_id, b"three generations")
    finally:
        await a.close()
        await b.close()


def test_turn_settings_are_checked():
    with pytest.raises(ValueError, match="needs turn_username and turn_password"):
        AiortcTubeRegistry(ice_servers=["turn:127.0.0.1:3478"])
    with pytest.raises(ValueError, match="bad ICE server URL"):
        AiortcTubeRegistry(ice_servers=["http://example.invalid"])
    with pytest.raises(ValueError, match="relay_only needs a TURN server"):
        AiortcTubeRegistry(ice_servers=["stun:127.0.0.1:3478"], relay_only=True)
    with pytest.raises(ValueError, match="unknown liveness"):
        AiortcTubeRegistry(liveness={"intervall": 1.0})
    config = ice_configuration(["stun:127.0.0.1:3478", "turns:127.0.0.1:5349"], "u", "p")
    stun_server, turn = config.iceServers
    assert stun_server.username is None
    assert (turn.username, turn.credential) == ("u", "p")


async def test_per_tube_settings_override_the_registry(turn):
    core = AiortcTubeRegistry(host_addresses=LOOPBACK)
    try:
        with pytest.raises(ValueError, match="needs turn_username"):
            await core.create_tube("conv", {"ice_servers": [turn.url]})
        assert core.tube_ids == []
        result = await core.create_tube("conv", {
            "ice_servers": [turn.url], "turn_username": TURN_USER,
            "turn_password": TURN_PASSWORD, "relay_only": True,
        })
        gen = core._tubes[result["tube_id"]].path.current
        assert {c.type for c in gen.local_candidates} == {"relay"}
    finally:
        await core.close()
