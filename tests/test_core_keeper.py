"""The Rust core (keeper-pam-webrtc-rs) under tether's manager, real everything.

Unit parts run here on the loop (settings, idempotent close, the signal bridge); the
connection tests run two tether sides on the Rust core in a namespace with only a 10.x/32
on lo (tests/keeper_peers.py): connect, bytes through the Rust core's tunnel as resumable
streams, a restart started by either side (each replaces the tube) while one echo stream
runs across both, bytes again.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from tether import signals

from .keeper_ns import last_json, lo_namespace, need_namespaces, outbound, run_in

keeper = pytest.importorskip("tether.cores.keeper_core")
pytest.importorskip("keeper_pam_webrtc_rs")


def test_settings_for_offer_answer_and_turn() -> None:
    core = keeper.KeeperTubeRegistry(turn_url="turn:10.0.0.1:3478", turn_username="u",
                                      turn_password="p")
    offer = core._rust_settings({}, answering=False)
    assert offer["conversationType"] == "tunnel"
    assert offer["local_listen_addr"] == "127.0.0.1:0"
    assert offer["turn_url"] == "turn:10.0.0.1:3478" and offer["turn_username"] == "u"
    answer = core._rust_settings({"target": ("127.0.0.1", 22)}, answering=True)
    assert (answer["target_host"], answer["target_port"]) == ("127.0.0.1", "22")
    with pytest.raises(ValueError, match="target"):
        core._rust_settings({}, answering=True)
    with pytest.raises(ValueError, match="turn_username"):
        keeper.KeeperTubeRegistry(turn_url="turn:10.0.0.1:3478")


async def test_offer_then_close_twice_and_unknown_tubes() -> None:
    core = keeper.KeeperTubeRegistry()
    seen: list[signals.Signal] = []
    try:
        made = await core.create_tube("conv", {}, signal_callback=seen.append, tube_id="t1")
        assert made["tube_id"] == "t1" and made["offer"]
        assert core.get_connection_state("t1") == "new"
        with pytest.raises(ValueError, match="already exists"):
            await core.create_tube("conv", {}, tube_id="t1")
        await core.close_tube("t1", reason="test")
        await core.close_tube("t1")  # idempotent: the Rust core would say "Tube not found"
        with pytest.raises(KeyError):
            core.get_connection_state("t1")
        with pytest.raises(KeyError):
            await core.restart_ice("t1")
    finally:
        await core.close()
    assert seen and seen[-1]["kind"] == signals.CONNECTION_STATE_CHANGED
    assert seen[-1]["data"] == "closed" and seen[-1]["conversation_id"] == "conv"


async def test_a_restart_gives_the_tube_up_so_the_side_replaces_it(monkeypatch) -> None:
    """The Rust core's restart cannot move a path: restart_ice says channel_closed and
    raises, and the registry declares it (the app then offers a new tube at once)."""
    core = keeper.KeeperTubeRegistry()
    seen: list[signals.Signal] = []
    try:
        assert core.restart_replaces_tube and core.resume
        await core.create_tube("conv", {}, signal_callback=seen.append, tube_id="t3")
        with pytest.raises(RuntimeError, match="replacing the tube"):
            await core.restart_ice("t3")
        async with asyncio.timeout(10):
            while signals.CHANNEL_CLOSED not in [s["kind"] for s in seen]:
                await asyncio.sleep(0.01)
    finally:
        await core.close()
    old = keeper.KeeperTubeRegistry(replace_on_restart=False, resume=False)
    try:
        assert not old.restart_replaces_tube and not old.resume
    finally:
        await old.close()
    monkeypatch.setenv(keeper.RESUME_ENV, "0")
    off = keeper.KeeperTubeRegistry()
    try:
        assert not off.resume
    finally:
        await off.close()


async def test_the_answering_side_points_the_rust_core_at_a_local_gateway() -> None:
    core = keeper.KeeperTubeRegistry()
    try:
        gateway = await core._gateway(("127.0.0.1", 9))
        assert gateway.address[0] == "127.0.0.1" and gateway.target == ("127.0.0.1", 9)
        assert await core._gateway(("127.0.0.1", 9)) is gateway  # one per target
    finally:
        await core.close()
    assert gateway.server is not None and not gateway.server.is_serving()


async def test_rust_thread_signals_reach_the_loop_in_order_and_mapped() -> None:
    core = keeper.KeeperTubeRegistry()
    got: list[signals.Signal] = []
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def callback(signal: signals.Signal) -> None:
        threads.append(threading.get_ident())
        got.append(signal)

    try:
        await core.create_tube("conv", {}, signal_callback=callback, tube_id="t2")
        rust_id = core._tube("t2").rust_id
        raw = [
            {"tube_id": rust_id, "kind": "icecandidate", "data": "candidate:1 1 udp 1 10.0.0.1 9 typ host"},
            {"tube_id": rust_id, "kind": "connection_state_changed", "data": "Connected"},
            {"tube_id": rust_id, "kind": "ice_restart_offer", "data": "T0ZGRVI="},
            {"tube_id": rust_id, "kind": "channel_closed", "data": "{}"},
            {"tube_id": "someone-else", "kind": "icecandidate", "data": "x"},
        ]
        feeder = threading.Thread(target=lambda: [core._on_rust_signal(r) for r in raw])
        feeder.start()
        await asyncio.to_thread(feeder.join)
        async with asyncio.timeout(20):  # ours end with channel_closed
            while signals.CHANNEL_CLOSED not in [s["kind"] for s in got]:
                await asyncio.sleep(0.01)
        # The real core's own gathering and states may come before and between ours: ours
        # (the one candidate we fed, then the rest) must come in order among them.
        kinds = iter(s["kind"] for s in got
                     if s["kind"] != signals.ICE_CANDIDATE or "10.0.0.1 9 typ host" in s["data"])
        expected = [signals.ICE_CANDIDATE, signals.CONNECTION_STATE_CHANGED,
                    signals.NETWORK_CHANGE_DETECTED, signals.CHANNEL_CLOSED]
        assert all(any(kind == want for kind in kinds) for want in expected), got
        assert all(s["tube_id"] == "t2" and s["conversation_id"] == "conv" for s in got)
        assert set(threads) == {loop_thread}
        # The Rust core's own restart offer is held for the manager's next restart_ice.
        assert core._tube("t2").held_offer == "T0ZGRVI="
    finally:
        await core.close()


@pytest.mark.netns
def test_rust_core_restarts_replace_the_tube_and_a_running_stream_survives_both(
) -> None:
    """A restart from either side replaces the tube (the Rust core's own cannot move a
    path); one echo stream runs across both replacements and comes back byte for byte."""
    need_namespaces()
    with lo_namespace() as (namespace, address):
        result = last_json(run_in(namespace, "-m", "tests.keeper_peers", "keeper", address))
    print(result)
    assert result["ok"], result
    assert result["mb_s"] > 0 and result["mb_s_after"] > 0
    for key in ("restart_by_connect", "restart_by_expose"):
        assert result[key]["state"] == result[key]["peer_state"] == "connected"
        assert not result[key]["same_tube"]
    assert result["stream"]["intact"] and result["stream"]["echoed"] == 6 << 20, result
    assert result["resumes"] >= 2
    assert result["tube_kept"]


@pytest.mark.netns
def test_demo_with_the_rust_core_verifies_every_byte() -> None:
    need_namespaces()
    with lo_namespace() as (namespace, _):
        done = run_in(namespace, "-m", "tether.cli", "demo", "--core", "keeper", "--json",
                      "--mb", "8", "--streams", "2")
    result = last_json(done)
    print(result)
    assert done.returncode == 0, done.stderr[-2000:]
    assert result["bytes_verified"] == result["bytes_sent"] == 8 * 1024 * 1024
    assert result["tube_state"] == "connected"


@pytest.mark.netns
def test_no_outbound_connection_without_the_vendor_cloud() -> None:
    """krelay_server "", ksm_config None and no connectivity probes: in a namespace whose
    default route leads into a black hole, a whole tunnel makes no TCP/UDP packet to any
    address off the host (the Rust core's probe of 8.8.8.8:53 is what this catches)."""
    need_namespaces()
    with lo_namespace(watch=True) as (namespace, address):
        result = last_json(run_in(namespace, "-m", "tests.keeper_peers", "keeper", address))
        sent = outbound(namespace)
    print(result, sent)
    assert result["ok"], result
    assert sent == []
