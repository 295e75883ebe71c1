"""Running scenarios: each from a fresh topology and fresh processes, scored, cleaned up.

Each run gets a directory (process logs, events files, the checker's reports,
``result.json``); it is deleted when the run is ok and kept otherwise (or with ``keep``),
and its path is in the result as ``run_dir``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import metrics, netns
from .metrics import Observation, ScenarioResult
from .procs import cli_flags
from .scenarios import SCENARIOS
from .session import LabOptions, LabSession

logger = logging.getLogger(__name__)


def select(only: str | Sequence[str] | None) -> list[str]:
    """Scenario names from a comma-separated string or a list; ValueError names unknown ones."""
    if only is None:
        return list(SCENARIOS)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SCENARIOS)}")
    if not names:
        raise ValueError("no scenario selected")
    return names


async def run_scenario(name: str, options: LabOptions, flags: set[str], root: Path,
                       index: int = 1) -> ScenarioResult:
    """One run of scenario ``name`` from nothing to a scored result; cleans up after itself."""
    scenario = SCENARIOS[name]
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-{index}-", dir=root))
    session = LabSession(name, options, flags, run_dir)
    obs = Observation(name, events_available=session.events_on)
    started = time.time()
    echo_records: list[dict[str, Any]] = []
    try:
        async with session:
            try:
                if scenario.prepare is not None:
                    await scenario.prepare(session)
                total = scenario.total(options) if scenario.total is not None else 0
                await session.start(rate=scenario.rate, total=total)
                await scenario.act(session, obs)
            except (netns.CommandError, RuntimeError, OSError) as exc:
                obs.error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: %s", name, obs.error)
            obs.end = time.time()
            await session.finish()
            if session.echo is not None:
                echo_records = list(session.echo.records)
                await asyncio.to_thread(session.echo.dump, run_dir / "echo_client.jsonl")
    except (netns.CommandError, RuntimeError, OSError) as exc:
        obs.error = obs.error or f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        logger.warning("%s interrupted; its logs are kept in %s", name, run_dir)
        raise
    events = await asyncio.to_thread(session.events)
    result = metrics.score(obs, echo_records, events)
    result.extra["seconds"] = round(time.time() - started, 1)
    if not session.events_on:
        result.extra["events"] = False
    keep = options.keep or not result.ok
    if keep:
        result.extra["run_dir"] = str(run_dir)
        await asyncio.to_thread(_write_json, run_dir / "result.json", result.as_dict())
    else:
        await asyncio.to_thread(shutil.rmtree, run_dir, True)
    return result


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


async def run_lab(
    names: Sequence[str] | None = None,
    *,
    runs: int = 1,
    options: LabOptions | None = None,
    on_result: Callable[[ScenarioResult], Any] | None = None,
) -> list[ScenarioResult]:
    """Run the selected scenarios ``runs`` times each, in order; every result, scored.

    Raises :class:`~tether.lab.netns.LabUnavailable` (before building anything) when
    namespaces cannot be made here.
    """
    selected = select(list(names) if names is not None else None)
    if runs < 1:
        raise ValueError("runs must be at least 1")
    options = options or LabOptions()
    await asyncio.to_thread(netns.preflight, "turn_only" in selected, "slow_path" in selected)
    flags = await cli_flags()
    if not {"connect --events", "expose --events"} <= flags:
        logger.warning("this tether CLI has no --events: detection falls back to echo stalls")
    root = Path(tempfile.mkdtemp(prefix="tether-lab-"))
    results: list[ScenarioResult] = []
    try:
        for name in selected:
            for index in range(1, runs + 1):
                result = await run_scenario(name, options, flags, root, index)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    finally:
        await asyncio.to_thread(_remove_if_empty, root)
    return results


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # runs kept for inspection live there
