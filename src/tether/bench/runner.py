"""The sitting: every selected figure measured round after round, interleaved, so that a
machine that gets busier or quieter affects all figures alike.

A figure that raises gets its reason recorded (``<key>_why``) and is tried again next round;
one that cannot run here (:class:`Skip`, or its ``unavailable()`` reason) is not tried again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import (aiortc_dc, cli_tunnel, demo, floor, keeper, keeper_tether, lab, managers,
               signaling, tcp)
from .stats import Collected, summary

logger = logging.getLogger(__name__)

Measure = Callable[[bool], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Figure:
    name: str
    about: str
    keys: tuple[str, ...]          # the JSON keys it fills (reasons go on these when it fails)
    measure: Measure               # one measurement; the argument is ``quick``
    every_round: bool = True       # False: measured once in --quick (slow, or not noisy)
    unavailable: Callable[[], str | None] | None = None


def _sizes(quick: bool) -> dict[str, float]:
    """MiB per transfer."""
    if quick:
        return {"tcp": 16, "aiortc": 8, "cli": 8, "demo": 4, "keeper": 8, "loss": 2, "floor": 8}
    return {"tcp": 64, "aiortc": 32, "cli": 64, "demo": 32, "keeper": 64, "loss": 8, "floor": 64}


def timeout(quick: bool) -> float:
    """Longest one measurement may take before it counts as failed (and is cancelled)."""
    return 240.0 if quick else 900.0


async def _relay(quick: bool) -> dict[str, Any]:
    """The relay's own benchmark (``tether.bench.relay``, issue 8) when it is there and
    works; else this package's smaller measurement of the relay, with a note saying why."""
    try:
        from . import relay  # async def measure(quick: bool) -> dict
    except ImportError as exc:
        note = f"tether.bench.relay cannot be imported ({exc})"
    else:
        budget = timeout(quick) * 0.75
        try:
            async with asyncio.timeout(budget):
                return await relay.measure(quick)
        except TimeoutError:
            note = f"tether.bench.relay did not finish in {budget:.0f} s"
        except Exception as exc:  # its failure must not hide the relay figure
            note = f"tether.bench.relay failed ({type(exc).__name__}: {exc})"[:300]
    logger.warning("%s; measuring the relay with tether.bench.signaling", note)
    result = await signaling.measure_relay(quick)
    result["relay_note"] = note + "; measured by tether.bench.signaling.measure_relay instead"
    return result


FIGURES: dict[str, Figure] = {f.name: f for f in [
    Figure("tcp", "direct TCP on loopback, one process", ("tcp_mb_s",),
           lambda q: tcp.measure(_sizes(q)["tcp"])),
    Figure("aiortc", "bare aiortc data channel (as shipped), one process per peer",
           ("aiortc_dc_mb_s", "aiortc_connect_ms"),
           lambda q: aiortc_dc.measure(_sizes(q)["aiortc"])),
    Figure("cli", "tether serve + expose + connect (loopback): push, pull, CPU, connect",
           ("tunnel_mb_s", "tunnel_pull_mb_s", "cpu_ms_per_mb", "connect_ms"),
           lambda q: cli_tunnel.measure(_sizes(q)["cli"])),
    Figure("cli_base", "the same CLI push with aiortc's 1,189-byte packets (path_mtu "
           "off): the per-packet path, as on a path that carries no more",
           ("tunnel_base_packet_mb_s", "cpu_ms_per_mb_base_packet"),
           lambda q: cli_tunnel.measure_base_packet(_sizes(q)["cli"])),
    Figure("floor", "the least Python a packet path can do: AEAD records, SCTP-shaped "
           "DATA and SACKs, GSO sends, one process per side; CPU per MB",
           ("floor_mb_s", "floor_cpu_ms_per_mb_send", "floor_cpu_ms_per_mb_receive"),
           lambda q: floor.measure(_sizes(q)["floor"])),
    Figure("demo", "tether demo --json (one process, echo)", ("demo_mb_s",),
           lambda q: demo.measure(_sizes(q)["demo"])),
    Figure("keeper", "Rust core, its own tunnel mode, one process per peer (netns)",
           ("keeper_mb_s", "keeper_connect_ms"),
           lambda q: keeper.measure(_sizes(q)["keeper"]), unavailable=keeper.unavailable),
    Figure("keeper_tether", "Rust core through tether's CLI (--core keeper, resumable "
           "streams): push, CPU, connect (netns)",
           ("keeper_tether_mb_s", "keeper_tether_connect_ms", "keeper_tether_cpu_ms_per_mb"),
           lambda q: keeper_tether.measure(_sizes(q)["keeper"]),
           unavailable=keeper_tether.unavailable),
    Figure("loss", "lab packet_loss: 5 % loss both ways, echo", ("loss5_mb_s",),
           lambda q: lab.loss5(_sizes(q)["loss"]), every_round=False,
           unavailable=lab.unavailable),
    Figure("ip_change", "lab ip_change: recovery after the address changes",
           ("recover_ip_change_ms",), lambda q: lab.ip_change(), every_round=False,
           unavailable=lab.unavailable),
    Figure("handler", "client signal path: frames -> SignalingClient -> router",
           ("handler_signals_per_s",),
           lambda q: signaling.measure_handler(20_000 if q else 100_000), every_round=False),
    Figure("relay", "relay: signals/s one per frame, p50/p99 at 1,000/s",
           ("relay_signals_per_s", "relay_p99_ms"), _relay, every_round=False),
    Figure("manager", "10k connection managers: bytes each, idle CPU",
           ("manager_bytes_per_tube", "manager_idle_cpu_pct_10k"), managers.measure,
           every_round=False),
]}


def select(only: Sequence[str] | None) -> list[Figure]:
    """Figures by name (comma-separated strings allowed); ValueError names unknown ones."""
    if not only:
        return list(FIGURES.values())
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(FIGURES)}")
    return [FIGURES[n] for n in dict.fromkeys(names)]


def machine() -> dict[str, Any]:
    from .. import runloop

    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "bench_loop": runloop.loop_name(),
            "platform": platform.platform(terse=True), "loadavg_1m": load[0],
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


async def run(figures: Sequence[Figure], *, quick: bool, runs: int | None,
              on_sample: Callable[[Figure, int, dict[str, Any] | str], None] | None = None,
              ) -> dict[str, Any]:
    """Measure ``figures`` interleaved; the summary dict (see :func:`stats.summary`)."""
    collected = Collected()
    errors: list[str] = []
    rounds = runs if runs is not None else 3
    skipped: set[str] = set()
    started = machine()
    t0 = time.perf_counter()
    for figure in figures:
        why = None
        if figure.unavailable is not None:  # may run commands (the lab's preflight)
            why = await asyncio.to_thread(figure.unavailable)
        if why:
            collected.fail(figure.keys, f"skipped: {why}")
            skipped.add(figure.name)
            if on_sample is not None:
                on_sample(figure, 0, f"skipped: {why}")
    for index in range(rounds):
        for figure in figures:
            if figure.name in skipped:
                continue
            if index > 0 and quick and runs is None and not figure.every_round:
                continue
            try:
                async with asyncio.timeout(timeout(quick)):
                    result = await figure.measure(quick)
            except keeper.Skip as exc:
                collected.fail(figure.keys, f"skipped: {exc}")
                skipped.add(figure.name)
                result_or_error: dict[str, Any] | str = f"skipped: {exc}"
            except Exception as exc:  # one figure failing must not end the sitting
                if isinstance(exc, TimeoutError) and not str(exc):
                    problem = f"timed out after {timeout(quick):.0f} s"
                else:
                    problem = f"{type(exc).__name__}: {exc}"
                logger.warning("%s, round %d: %s", figure.name, index + 1, problem)
                result_or_error = f"failed: {problem}"[:400]
                collected.fail(figure.keys, result_or_error)
                errors.append(f"{figure.name} round {index + 1}: {result_or_error}")
            else:
                collected.add(result)
                errors.extend(f"{figure.name} round {index + 1}: {k}: {v}"[:400]
                              for k, v in result.items()
                              if k.endswith(("_note", "_error")) and isinstance(v, str) and v)
                result_or_error = result
            if on_sample is not None:
                on_sample(figure, index + 1, result_or_error)
    out = summary(collected, sorted(collected.samples))
    out["quick"] = quick
    out["rounds"] = rounds
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["machine"] = started
    out["loadavg_1m_end"] = machine()["loadavg_1m"]
    out["errors"] = errors
    return out
