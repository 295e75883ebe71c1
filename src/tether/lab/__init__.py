"""``tether lab``: real tether processes in real network namespaces, faults, and numbers.

A laptop (A) behind a NAT router (R) talks to a server (B) through ``tether connect`` /
``tether serve`` / ``tether expose``; a sequence-checked echo runs through the tunnel while
a scenario cuts links, changes addresses, drops or delays packets or kills processes, and
each scenario is scored: detected_ms, recovered_ms, bytes_lost, ok.

Python API: ``await run_lab(["link_cut", "ip_change"], runs=1)`` -> list of
:class:`ScenarioResult`; the CLI is :func:`tether.lab.command.lab`.
"""

from __future__ import annotations

from .metrics import TARGETS, ScenarioResult, Target, summarize
from .netns import LabUnavailable, preflight
from .runner import run_lab, run_scenario, select
from .scenarios import SCENARIOS
from .session import LabOptions

__all__ = [
    "SCENARIOS", "TARGETS", "LabOptions", "LabUnavailable", "ScenarioResult", "Target",
    "preflight", "run_lab", "run_scenario", "select", "summarize",
]
