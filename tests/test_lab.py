"""The network lab: its pure parts (pattern, delay line, scoring), the echo checker on real
loopback sockets, and every scenario once with real processes in real namespaces.

The namespace tests need root, ``ip netns``, nftables, conntrack and coturn (``make
debian``); they skip with the reason otherwise. Run them alone with
``pytest -q tests/test_lab.py -m netns -s`` to see the table.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from tether.lab import SCENARIOS, LabOptions, LabUnavailable, preflight, run_scenario
from tether.lab.command import lab, table
from tether.lab.delayer import DelayLine
from tether.lab.metrics import Observation, ScenarioResult, Target, score, summarize
from tether.lab.pattern import first_mismatch, pattern
from tether.lab.procs import cli_flags
from tether.lab.runner import select

# -- the pattern ---------------------------------------------------------------------------


@given(conn=st.integers(1, 1000), offset=st.integers(0, 10_000), length=st.integers(0, 3000))
def test_pattern_slices_agree_with_the_whole(conn: int, offset: int, length: int) -> None:
    assert pattern(conn, offset, length) == pattern(conn, 0, offset + length)[offset:]


def test_pattern_words_are_unique_across_offsets_and_connections() -> None:
    words = set()
    for conn in (1, 2):
        data = pattern(conn, 0, 8 * 5000)
        words |= {data[i:i + 8] for i in range(0, len(data), 8)}
    assert len(words) == 10_000


def test_first_mismatch_names_the_offset() -> None:
    good = pattern(3, 1000, 64)
    assert first_mismatch(3, 1000, good) is None
    bad = bytearray(good)
    bad[17] ^= 1
    assert first_mismatch(3, 1000, bytes(bad)) == 1017
    assert first_mismatch(4, 1000, good) is not None  # another connection's bytes


# -- the delay line ------------------------------------------------------------------------


def test_delay_line_releases_each_packet_after_the_delay_in_order() -> None:
    line = DelayLine(0.3)
    assert line.next_due() is None
    line.push(b"a", now=10.0)
    line.push(b"b", now=10.1)
    assert line.next_due() == pytest.approx(10.3)
    assert line.pop_due(10.29) == []
    assert line.pop_due(10.3) == [b"a"]
    assert line.next_due() == pytest.approx(10.4)
    line.push(b"c", now=10.35)
    assert line.pop_due(11.0) == [b"b", b"c"]
    assert len(line) == 0 and line.accepted == 3 and line.dropped == 0


def test_a_changed_delay_applies_to_new_packets_and_never_reorders() -> None:
    line = DelayLine(0.0)
    line.push(b"fast", now=1.0)
    line.set_delay(0.3)
    line.push(b"slow", now=1.0)
    assert line.pop_due(1.0) == [b"fast"]
    line.set_delay(0.0)
    line.push(b"behind", now=1.1)  # due at 1.1, but waits for the packet ahead (1.3)
    assert line.pop_due(1.2) == []
    assert line.pop_due(1.3) == [b"slow", b"behind"]


def test_delay_line_is_bounded_by_packets_and_bytes() -> None:
    line = DelayLine(1.0, max_packets=2, max_bytes=10)
    assert line.push(b"1234", 0.0) and line.push(b"5678", 0.0)
    assert not line.push(b"9", 0.0)  # third packet
    assert line.pop_due(1.0) == [b"1234", b"5678"]
    assert line.push(b"123456", 2.0)
    assert not line.push(b"12345", 2.0)  # 11 bytes > 10
    assert line.dropped == 2
    with pytest.raises(ValueError):
        DelayLine(-1.0)


# -- scoring -------------------------------------------------------------------------------

T0 = 1_000_000.0


def progress(conn: int, ts: float, sent: int, verified: int, first_rx: float | None = None,
             last_rx: float | None = None) -> dict[str, Any]:
    return {"type": "progress", "ts": ts, "conn": conn, "sent": sent, "verified": verified,
            "first_rx": first_rx, "last_rx": last_rx if last_rx is not None else first_rx}


def opened(conn: int, ts: float) -> list[dict[str, Any]]:
    return [{"type": "open", "ts": ts, "conn": conn},
            {"type": "first_echo", "ts": ts + 0.01, "conn": conn}]


def final(*conns: tuple[int, int, int]) -> dict[str, Any]:
    return {"type": "final", "ts": T0 + 100,
            "conns": [{"conn": c, "sent": s, "verified": v} for c, s, v in conns]}


def test_link_cut_scores_detection_recovery_and_no_loss() -> None:
    obs = Observation("link_cut", fault=T0 + 2, recover=T0 + 5, end=T0 + 8)
    echo = [*opened(1, T0), progress(1, T0 + 1, 1000, 1000, T0 + 0.9),
            {"type": "stall", "ts": T0 + 2.25, "conn": 1, "since": T0 + 2.0},
            {"type": "gap", "ts": T0 + 5.4, "conn": 1, "start": T0 + 2.0, "end": T0 + 5.4},
            progress(1, T0 + 5.5, 9000, 8000, T0 + 5.4), final((1, 9000, 9000))]
    events = [{"ts": T0 + 1.0, "event": "state", "state": "connected", "side": "connect"},
              {"ts": T0 + 3.5, "event": "state", "state": "degraded", "side": "connect"},
              {"ts": T0 + 9.0, "event": "tube", "what": "closed", "side": "connect"}]  # shutdown
    r = score(obs, echo, events)
    assert r.detected_ms == pytest.approx(1500, abs=0.1)
    assert r.recovered_ms == pytest.approx(400, abs=0.1)
    assert (r.bytes_sent, r.bytes_lost, r.ok) == (9000, 0, True)
    assert r.extra["detected_by"] == "connect:state"


def test_slow_recovery_and_loss_fail_with_reasons() -> None:
    obs = Observation("ip_change", fault=T0 + 2, recover=T0 + 2, end=T0 + 40)
    echo = [*opened(1, T0),
            {"type": "gap", "ts": T0 + 33, "conn": 1, "start": T0 + 2.0, "end": T0 + 33.0},
            final((1, 5000, 4000))]
    r = score(obs, echo, [])
    assert r.recovered_ms == pytest.approx(31000)
    assert not r.ok
    assert "1000 bytes lost" in r.failures
    assert any("recovered in 31000 ms > 2000 ms" in f for f in r.failures)
    assert r.detected_ms is None  # events exist (none fired): no echo fallback


def test_an_echo_that_never_comes_back_is_not_recovered() -> None:
    obs = Observation("link_cut", fault=T0 + 2, recover=T0 + 5, end=T0 + 70)
    echo = [*opened(1, T0), {"type": "stall", "ts": T0 + 70, "conn": 1, "since": T0 + 2.0,
                             "open": True}, final((1, 5000, 3000))]
    r = score(obs, echo, [])
    assert r.recovered_ms is None and not r.ok and "never recovered" in r.failures


def test_without_events_detection_falls_back_to_the_echo_stall() -> None:
    obs = Observation("ip_change", fault=T0 + 2, recover=T0 + 2, end=T0 + 5,
                      events_available=False)
    echo = [*opened(1, T0), {"type": "stall", "ts": T0 + 2.3, "conn": 1, "since": T0 + 2.0},
            {"type": "gap", "ts": T0 + 3, "conn": 1, "start": T0 + 2.0, "end": T0 + 3.0},
            final((1, 10, 10))]
    r = score(obs, echo, [])
    assert r.detected_ms == pytest.approx(300) and r.extra["detected_by"] == "echo_stall"
    assert r.recovered_ms == pytest.approx(1000) and r.ok and r.extra["events"] is False


def test_an_uninterrupted_echo_recovers_at_its_next_byte() -> None:
    obs = Observation("nat_idle_keepalive", fault=T0 + 2, quiet_since=T0 + 2, recover=T0 + 22,
                      end=T0 + 25)
    echo = [*opened(1, T0), progress(1, T0 + 22.1, 50, 40, T0 + 22.03, T0 + 22.09),
            final((1, 50, 50))]
    r = score(obs, echo, [])
    assert r.recovered_ms == pytest.approx(30, abs=0.1)
    assert r.detected_ms is None and r.ok


def test_a_disturbed_idle_tunnel_is_not_quiet() -> None:
    obs = Observation("nat_idle_keepalive", fault=T0 + 2, quiet_since=T0 + 2, recover=T0 + 22,
                      end=T0 + 25)
    echo = [*opened(1, T0), progress(1, T0 + 22.1, 50, 50, T0 + 22.05), final((1, 50, 50))]
    events = [{"ts": T0 + 10, "event": "state", "state": "reconnecting", "side": "expose"}]
    r = score(obs, echo, events)
    assert not r.ok and r.detected_ms == pytest.approx(8000)
    assert any("disturbed" in f and "reconnecting" in f for f in r.failures)


def test_peer_restart_needs_the_old_stream_closed_cleanly_and_a_new_one() -> None:
    obs = Observation("peer_restart", fault=T0 + 2, recover=T0 + 2.1, end=T0 + 10,
                      killed=frozenset({1}))
    echo = [*opened(1, T0),
            {"type": "closed", "ts": T0 + 4.0, "conn": 1, "sent": 900, "verified": 500,
             "clean": True},
            *opened(2, T0 + 4.1), final((1, 900, 500), (2, 300, 300))]
    events = [{"ts": T0 + 3.0, "event": "tube", "what": "closed", "side": "connect"}]
    r = score(obs, echo, events)
    assert r.ok, r.failures
    assert r.extra["old_closed_ms"] == pytest.approx(1000)
    assert r.recovered_ms == pytest.approx(2010, abs=0.1)
    assert r.bytes_lost == 0  # the killed peer's stream is judged by its clean close

    reset = [dict(e, clean=False, how="reset") if e.get("type") == "closed" else e for e in echo]
    r = score(obs, reset, events)
    assert r.ok and r.extra["old_close"] == "reset"  # tether resets streams that lost data

    bad = [dict(e, clean=False, how="mismatch") if e.get("type") == "closed" else e for e in echo]
    assert not score(obs, bad, events).ok

    hung = [e for e in echo if e.get("type") != "closed"]
    r = score(obs, hung, events)
    assert not r.ok and "connection 1 to the killed peer was never closed" in r.failures


def test_relay_restart_scores_the_longest_gap_in_the_window() -> None:
    obs = Observation("relay_restart", fault=T0 + 2, recover=T0 + 2.1, end=T0 + 10,
                      gap_window=(T0 + 2, T0 + 10))
    echo = [*opened(1, T0),
            {"type": "gap", "ts": T0 + 4, "conn": 1, "start": T0 + 2.5, "end": T0 + 4.0},
            final((1, 10, 10))]
    r = score(obs, echo, [])
    assert r.extra["max_gap_ms"] == pytest.approx(1500)
    assert not r.ok and any("gap of 1500 ms" in f for f in r.failures)


def test_a_corrupt_byte_fails_and_a_closed_survivor_fails() -> None:
    obs = Observation("packet_loss", end=T0 + 10)
    echo = [*opened(1, T0), {"type": "error", "ts": T0 + 1, "conn": 1, "what": "mismatch",
                             "offset": 77},
            {"type": "closed", "ts": T0 + 1, "conn": 1, "sent": 100, "verified": 77,
             "clean": False}]
    r = score(obs, echo, [], Target())
    assert not r.ok
    assert "connection 1: corrupt byte at offset 77" in r.failures
    assert any("should have survived" in f for f in r.failures)


def test_failed_but_still_trying_is_not_giving_up() -> None:
    from tether.lab.metrics import is_give_up

    assert is_give_up({"event": "state", "state": "failed"})
    assert is_give_up({"event": "state", "state": "failed", "retrying": False})
    assert not is_give_up({"event": "state", "state": "failed", "retrying": True})
    assert is_give_up({"event": "tube", "what": "closed"})
    assert not is_give_up({"event": "state", "state": "reconnecting"})


def test_summaries_and_tables() -> None:
    results = [ScenarioResult("ip_change", 70.0, v, 10, 0, v < 2000)
               for v in (150.0, 3000.0, 200.0)]
    (row,) = summarize(results)
    assert row["runs"] == 3 and row["ok_runs"] == 2
    assert row["recovered_ms"] == {"min": 150.0, "median": 200.0, "max": 3000.0}
    console = Console(record=True, width=200)
    console.print(table(results, runs=3))
    console.print(table(results[:1], runs=1))
    text = console.export_text()
    assert "150 / 200 / 3000" in text and "2/3" in text and "rec<=2s" in text
    assert json.loads(json.dumps(results[0].as_dict()))["recovered_ms"] == 150.0


def test_scenario_selection_and_bad_names() -> None:
    assert select(None) == list(SCENARIOS)
    assert select("ip_change, link_cut") == ["ip_change", "link_cut"]
    with pytest.raises(ValueError, match="unknown scenario"):
        select("ip_change,warp_drive")
    result = CliRunner().invoke(_app(), ["--only", "warp_drive"])
    assert result.exit_code == 2 and "warp_drive" in result.output


def _app() -> Any:
    import typer

    app = typer.Typer()
    app.command()(lab)
    return app


# -- the echo checker on real loopback sockets ---------------------------------------------


async def _checker(port: int, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tether.lab.echo_client", "--port", str(port), "--interval",
        "0.05", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)


async def _reports(proc: asyncio.subprocess.Process, after: float,
                   command: bytes = b"stop\n") -> list[dict[str, Any]]:
    await asyncio.sleep(after)
    assert proc.stdin is not None
    proc.stdin.write(command)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return [json.loads(line) for line in out.decode().splitlines()]


async def _server(handler: Any) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_checker_verifies_an_honest_echo_and_reports_a_paused_one_as_a_gap() -> None:
    paused = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = time.monotonic()
        while data := await reader.read(65536):
            if not paused.is_set() and time.monotonic() - start > 0.3:
                paused.set()
                await asyncio.sleep(0.4)  # the echo stalls once
            writer.write(data)
            await writer.drain()
        writer.close()

    server, port = await _server(echo)
    async with server:
        proc = await _checker(port, "--rate", "2000000")
        reports = await _reports(proc, 1.2)
    kinds = [r["type"] for r in reports]
    assert "open" in kinds and "first_echo" in kinds and "error" not in kinds
    (fin,) = [r for r in reports if r["type"] == "final"]
    (conn,) = fin["conns"]
    assert conn["sent"] == conn["verified"] > 500_000
    gaps = [r for r in reports if r["type"] == "gap" and r["ms"] >= 200]
    assert len(gaps) == 1 and 350 <= gaps[0]["ms"] < 1500
    assert any(r["type"] == "stall" for r in reports)


async def test_checker_reports_a_corrupted_byte_at_its_offset() -> None:
    async def corrupt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = 0
        while data := await reader.read(65536):
            buf = bytearray(data)
            if seen <= 100_000 < seen + len(buf):
                buf[100_000 - seen] ^= 0xFF
            seen += len(buf)
            writer.write(bytes(buf))
            await writer.drain()
        writer.close()

    server, port = await _server(corrupt)
    async with server:
        proc = await _checker(port, "--rate", "0", "--total", "300000")
        reports = await _reports(proc, 0.5)
    (err,) = [r for r in reports if r["type"] == "error"]
    assert err["what"] == "mismatch" and err["offset"] == 100_000
    (closed,) = [r for r in reports if r["type"] == "closed"]
    assert closed["clean"] is False


async def test_checker_sees_a_clean_close_and_opens_a_new_connection_on_request() -> None:
    count = 0

    async def first_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        mine = count
        start = time.monotonic()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            if mine == 1 and time.monotonic() - start > 0.2:
                break
        writer.close()

    server, port = await _server(first_closes)
    async with server:
        proc = await _checker(port, "--rate", "500000")
        await asyncio.sleep(0.5)
        assert proc.stdin is not None
        proc.stdin.write(b"new\n")
        reports = await _reports(proc, 0.5)
    closed = [r for r in reports if r["type"] == "closed"]
    assert closed and closed[0]["conn"] == 1 and closed[0]["clean"] is True
    assert {r["conn"] for r in reports if r["type"] == "first_echo"} == {1, 2}
    (fin,) = [r for r in reports if r["type"] == "final"]
    second = [c for c in fin["conns"] if c["conn"] == 2][0]
    assert second["sent"] == second["verified"] > 0


# -- what the lab leaves behind ------------------------------------------------------------


def _namespaces() -> set[str]:
    import subprocess

    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.netns
async def test_a_failing_session_removes_its_namespaces_and_processes(
        lab_flags: set[str], tmp_path: Any) -> None:
    from tether.lab.session import LabSession

    pids: list[int] = []
    with pytest.raises(RuntimeError, match="scenario blew up"):
        async with LabSession("cleanup", LabOptions(), lab_flags, tmp_path) as session:
            names = set(session.topo.namespaces)
            assert names <= _namespaces()
            await session.start_serve()
            await session.start_echo_server()
            pids = [p.pid for p in session.procs.procs.values()]
            raise RuntimeError("scenario blew up")
    assert len(pids) == 2
    assert not names & _namespaces()
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.netns
def test_the_command_exits_2_with_advice_when_not_root(lab_flags: set[str]) -> None:
    import shutil
    import subprocess

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run the command as another user")
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "tether.lab.command", "--only", "link_cut"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "needs root" in done.stderr


# -- every scenario, real processes in real namespaces -------------------------------------

# Targets are 1-3 s; waiting 20 s still measures slow recoveries while the suite stays
# well under 15 minutes even when everything fails.
SUITE_OPTIONS = LabOptions(give_up_s=20.0)
_results: list[ScenarioResult] = []


@pytest.fixture(scope="module")
def lab_flags() -> set[str]:
    try:
        preflight()
    except LabUnavailable as exc:
        pytest.skip(f"the network lab cannot run here: {exc}")
    return asyncio.run(cli_flags())


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("lab")
    yield root
    if _results:
        console = Console(width=180)
        console.print()
        console.print(table(_results))


@pytest.mark.netns
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario(name: str, lab_flags: set[str], lab_root: Any) -> None:
    result = await run_scenario(name, SUITE_OPTIONS, lab_flags, lab_root)
    _results.append(result)
    print(json.dumps(result.as_dict()))
    assert result.ok, f"{name}: {'; '.join(result.failures)} (logs: {result.extra.get('run_dir')})"
