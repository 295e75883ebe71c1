"""`tether bench`: the real pieces in their quickest form, and the pure summary code.

Nothing here asserts a speed: figures must be positive numbers, or null with a reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from tether.bench import aiortc_dc, checked, floor, sctp_receive, signaling
from tether.bench.procstat import cpu_seconds
from tether.cores import aiortc_speed
from tether.bench.stats import REQUIRED_KEYS, Collected, Spread, summary


def check_shape(result: dict) -> None:
    for key in REQUIRED_KEYS:
        assert key in result, key
        value = result[key]
        if value is None:
            assert isinstance(result.get(key + "_why"), str) and result[key + "_why"], key
        else:
            assert isinstance(value, (int, float)), (key, value)
            # Idle CPU may truly be zero; everything else measured is a positive number.
            assert value >= 0 if key == "manager_idle_cpu_pct_10k" else value > 0, (key, value)


def test_cli_bench_json_shape() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "bench", "--quick", "--only", "tcp,manager", "--runs", "1",
         "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    check_shape(result)
    assert result["tcp_mb_s"] > 0
    assert result["manager_bytes_per_tube"] > 0
    assert result["manager_idle_cpu_pct_10k"] is not None
    assert result["spread"]["tcp_mb_s"][3] == 1
    assert "not measured" in result["tunnel_mb_s_why"]
    assert "tcp_mb_s" in proc.stdout  # the table


def test_cli_bench_rejects_unknown_figure() -> None:
    proc = subprocess.run([sys.executable, "-m", "tether.cli", "bench", "--only", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown figure" in proc.stdout + proc.stderr


def test_summary_null_with_reason_and_ratios() -> None:
    c = Collected()
    for v in (10.0, 30.0, 20.0):
        c.add({"tunnel_mb_s": v, "aiortc_dc_mb_s": 10.0})
    c.add({"keeper_mb_s": None, "keeper_mb_s_why": "skipped: not root"})
    c.add({"flag": True, "nan": float("nan")})
    c.fail(["loss5_mb_s"], "failed: boom")
    out = summary(c)
    check_shape(out)
    assert out["tunnel_mb_s"] == 20.0
    assert out["spread"]["tunnel_mb_s"] == [10.0, 20.0, 30.0, 3]
    assert out["tunnel_vs_aiortc"] == 2.0
    assert out["tunnel_vs_keeper"] is None
    assert "skipped: not root" in out["tunnel_vs_keeper_why"]
    assert out["keeper_mb_s_why"] == "skipped: not root"
    assert out["loss5_mb_s_why"] == "failed: boom"
    assert "flag" not in out["spread"] and "nan" not in out["spread"]
    assert "tunnel_cpu_vs_floor" not in out  # the floor was not measured: no such ratio
    c.add({"cpu_ms_per_mb_base_packet": 50.0, "floor_cpu_ms_per_mb_busier": 20.0})
    assert summary(c)["tunnel_cpu_vs_floor"] == 2.5  # like for like: aiortc's packet size
    assert "path_mtu_gain" not in summary(c)
    c.add({"tunnel_base_packet_mb_s": 5.0})
    assert summary(c)["path_mtu_gain"] == 4.0  # tunnel_mb_s median 20 over 5
    c.add({"handler_signals_per_cpu_s": 200_000.0, "handler_floor_signals_per_s": 700_000.0})
    assert summary(c)["handler_cpu_vs_floor"] == 3.5  # CPU per signal, in floors
    assert Spread.of([]) is None
    assert Spread.of([3, 1, 2]) == Spread(1.0, 2.0, 3.0, 3)


async def test_checked_push_and_pull_verify_every_byte() -> None:
    payload = checked.Payload.make(3 * 1024 * 1024 + 7, seed=11)
    sink = await checked.start_sink()
    source = await checked.start_source(payload)
    try:
        assert await checked.push(sink.sockets[0].getsockname()[:2], payload) > 0
        assert await checked.pull(source.sockets[0].getsockname()[:2], payload) > 0
        # A source that sends other bytes (one flipped) is caught.
        bad = checked.Payload(payload.data[:-1] + bytes([payload.data[-1] ^ 1]), payload.digest)
        liar = await checked.start_source(bad)
        try:
            with pytest.raises(checked.DataMismatch):
                await checked.pull(liar.sockets[0].getsockname()[:2], payload)
        finally:
            liar.close()
            await liar.wait_closed()
    finally:
        for server in (sink, source):
            server.close()
            await server.wait_closed()


def test_cpu_seconds_of_this_process() -> None:
    before = cpu_seconds(os.getpid())
    assert before is not None
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    after = cpu_seconds(os.getpid())
    assert after is not None and after > before
    assert cpu_seconds(2**22 + 12345) is None  # no such process


async def test_handler_path_counts_every_signal() -> None:
    result = await signaling.measure_handler(2_000)
    assert result["handler_signals_per_s"] > 0 and result["handler_signals_per_cpu_s"] > 0
    assert result["handler_sealed_signals_per_s"] > 0
    assert 0 < result["handler_ack_frames_per_frame"] <= 1  # coalesced: at most 1 per frame
    assert result["router_signals_per_s"] > 0
    assert result["handler_floor_signals_per_s"] > 0


async def test_sctp_receive_step_both_ways_same_sacks() -> None:
    """The receive step's A/B: both ways handle the same packets and send the same SACKs
    (one per 4 packets: bursts of 8 on a short path), and the patch is left as it was."""
    aiortc_speed.install()
    before = aiortc_speed._in_order[0]
    result = await sctp_receive.measure(messages=20)
    assert aiortc_speed._in_order[0] == before
    assert result["sctp_rx_packets"] == 20 * sctp_receive.FRAGMENTS
    assert result["sctp_rx_sacks"] == result["sctp_rx_packets"] // 4
    assert result["sctp_rx_us_per_packet_before"] > 0 and result["sctp_rx_us_per_packet_in_order"] > 0
    assert result["sctp_rx_in_order_vs_before"] > 0


def test_floor_cuts_chunks_as_aiortc_does() -> None:
    from aiortc.rtcsctptransport import USERDATA_MAX_LENGTH

    assert floor.CHUNK == USERDATA_MAX_LENGTH == sctp_receive.CHUNK


async def test_floor_moves_every_byte_between_two_processes() -> None:
    result = await asyncio.wait_for(floor.measure(2), 90)
    assert result["floor_mb_s"] > 0 and result["floor_cpu_ms_per_mb_busier"] > 0
    assert result["floor_cpu_ms_per_mb_busier"] == max(result["floor_cpu_ms_per_mb_send"],
                                                        result["floor_cpu_ms_per_mb_receive"])
    assert 0 <= result["floor_sys_ms_per_mb_receive"] <= result["floor_cpu_ms_per_mb_receive"]


def test_floor_records_and_packets_refuse_what_was_changed() -> None:
    """The floor does the checks a real path does: a changed byte fails the AEAD tag, a
    changed chunk fails the CRC32c."""
    chunk = floor.DATA_HEADER.pack(0, floor.FLAG_BEGIN, 16 + 5, 1, 0, 0, 51) + b"hello"
    packet = floor._packet(chunk)
    assert floor._check(packet) == chunk
    with pytest.raises(ValueError, match="CRC32c"):
        floor._check(packet[:-1] + b"!")
    record = floor._layer(is_client=True).seal(floor.APPLICATION_DATA, packet)
    assert floor._layer(is_client=False).open(record) == packet
    # tether's record layer drops what does not authenticate (None), as DTLS requires
    assert floor._layer(is_client=False).open(record[:-1] + bytes([record[-1] ^ 1])) is None
    assert floor._layer(is_client=True).open(record) is None  # the other direction's key


async def test_bare_aiortc_two_processes() -> None:
    result = await asyncio.wait_for(aiortc_dc.measure(1), 90)
    assert result["aiortc_dc_mb_s"] > 0
    assert result["aiortc_connect_ms"] > 0


def test_bare_aiortc_peer_does_not_import_tether() -> None:
    """The bench runs the peer as a script with -P: its imports load nothing of tether."""
    proc = subprocess.run(
        [sys.executable, "-P", "-c",
         f"import sys; sys.path.insert(0, {str(aiortc_dc.PEER.parent)!r});"
         "import aiortc_peer; print(sorted(m for m in sys.modules if m.startswith('tether')))"],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


async def test_runner_interleaves_and_records_skips_and_failures() -> None:
    from tether.bench.runner import Figure, run

    calls: list[str] = []

    def figure(name: str, key: str, value: float | None, **kw: object) -> Figure:
        async def measure(quick: bool) -> dict:
            calls.append(name)
            if value is None:
                raise RuntimeError("boom")
            return {key: value}

        return Figure(name, name, (key,), measure, **kw)

    out = await run([figure("a", "tcp_mb_s", 5.0), figure("b", "loss5_mb_s", None),
                     figure("c", "keeper_mb_s", 1.0, unavailable=lambda: "no namespaces")],
                    quick=False, runs=2)
    assert calls == ["a", "b", "a", "b"]  # round by round; the unavailable one never runs
    assert out["spread"]["tcp_mb_s"] == [5.0, 5.0, 5.0, 2]
    assert out["loss5_mb_s"] is None and "boom" in out["loss5_mb_s_why"]
    assert out["keeper_mb_s"] is None and out["keeper_mb_s_why"] == "skipped: no namespaces"
    assert len(out["errors"]) == 2
    check_shape(out)


def _bench_namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.startswith("tbk-")}


@pytest.mark.netns
async def test_rust_core_in_a_namespace_then_removed() -> None:
    from tether.bench import keeper

    why = keeper.unavailable()
    if why:
        pytest.skip(why)
    before = _bench_namespaces()
    result = await asyncio.wait_for(keeper.measure(2), 120)
    assert result["keeper_mb_s"] > 0 and result["keeper_connect_ms"] > 0
    assert _bench_namespaces() == before
