"""``tether lab``: real tether processes in real network namespaces, faults, and numbers.

A laptop (A) behind a NAT router (R) talks to a server (B) through ``tether connect`` /
``tether serve`` / ``tether expose``; a sequence-checked echo runs through the tunnel while
a scenario cuts links, changes addresses, drops or delays packets or kills processes, and
each scenario is scored: detected_ms, recovered_ms, bytes_lost, ok.

Python API: ``await run_lab(["link_cut", "ip_change"], runs=1)`` -> list of
:class:`ScenarioResult`; the CLI is :func:`tether.lab.command.lab`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import TARGETS, ScenarioResult, Target, summarize
    from .netns import LabUnavailable, preflight
    from .runner import run_lab, run_scenario, select
    from .scenarios import SCENARIOS
    from .session import LabOptions

# Loaded on first use (PEP 562): `tether --help` imports tether.lab.command to register
# `tether lab`, which must not pull in the lab's asyncio, processes and namespaces.
_LAZY = {
    **dict.fromkeys(("TARGETS", "ScenarioResult", "Target", "summarize"), ".metrics"),
    **dict.fromkeys(("LabUnavailable", "preflight"), ".netns"),
    **dict.fromkeys(("run_lab", "run_scenario", "select"), ".runner"),
    "SCENARIOS": ".scenarios",
    "LabOptions": ".session",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tether.lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "SCENARIOS", "TARGETS", "LabOptions", "LabUnavailable", "ScenarioResult", "Target",
    "preflight", "run_lab", "run_scenario", "select", "summarize",
]
