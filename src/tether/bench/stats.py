"""Samples -> min / median / max, and the one JSON object ``tether bench --json`` ends with.

Pure: no I/O, no clock. A figure that could not be measured is ``None`` with a reason in
``<key>_why`` beside it, never a made-up number.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The keys the JSON object always has (issue 9), in the order the table shows them.
REQUIRED_KEYS: tuple[str, ...] = (
    "tcp_mb_s",
    "aiortc_dc_mb_s",
    "tunnel_mb_s",
    "tunnel_pull_mb_s",
    "demo_mb_s",
    "keeper_mb_s",
    "tunnel_vs_aiortc",
    "tunnel_vs_keeper",
    "cpu_ms_per_mb",
    "loss5_mb_s",
    "connect_ms",
    "aiortc_connect_ms",
    "keeper_connect_ms",
    "recover_ip_change_ms",
    "manager_bytes_per_tube",
    "manager_idle_cpu_pct_10k",
    "handler_signals_per_s",
    "relay_signals_per_s",
    "relay_p99_ms",
)


@dataclass(frozen=True)
class Spread:
    """min / median / max of the samples of one figure (n: how many samples)."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Iterable[float]) -> Spread | None:
        values = sorted(float(v) for v in samples)
        if not values:
            return None
        return cls(values[0], statistics.median(values), values[-1], len(values))


@dataclass
class Collected:
    """All samples of a sitting: key -> values, and key -> why it has none."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def add(self, figures: Mapping[str, Any]) -> None:
        """Take one measurement's dict: numbers are samples, ``<key>_why`` are reasons."""
        for key, value in figures.items():
            if key.endswith("_why"):
                if value:
                    self.why.setdefault(key[:-4], str(value))
            elif isinstance(value, bool):
                continue
            elif isinstance(value, (int, float)) and value == value:  # NaN is no sample
                self.samples.setdefault(key, []).append(float(value))

    def fail(self, keys: Sequence[str], reason: str) -> None:
        for key in keys:
            self.why.setdefault(key, reason)

    def spread(self, key: str) -> Spread | None:
        return Spread.of(self.samples.get(key, ()))


def ratio(a: Spread | None, b: Spread | None) -> float | None:
    """Median over median, or None when either is missing or b is zero."""
    if a is None or b is None or b.median == 0:
        return None
    return a.median / b.median


def _round(value: float) -> float:
    if abs(value) >= 100:
        return round(value, 1)
    if abs(value) >= 1:
        return round(value, 2)
    return round(value, 4)


def summary(collected: Collected, extra_keys: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON object: each figure's median (None + ``_why`` when unmeasured), the derived
    ratios, and ``spread``: key -> [min, median, max, n] for everything measured."""
    out: dict[str, Any] = {}
    keys = list(REQUIRED_KEYS) + [k for k in extra_keys if k not in REQUIRED_KEYS]
    derived = {"tunnel_vs_aiortc": ("tunnel_mb_s", "aiortc_dc_mb_s"),
               "tunnel_vs_keeper": ("tunnel_mb_s", "keeper_mb_s"),
               # like for like: the floor's packets are aiortc's size
               "tunnel_cpu_vs_floor": ("cpu_ms_per_mb_base_packet",
                                       "floor_cpu_ms_per_mb_busier"),
               "path_mtu_gain": ("tunnel_mb_s", "tunnel_base_packet_mb_s"),
               # the client's CPU per signal over the least Python can do
               "handler_cpu_vs_floor": ("handler_floor_signals_per_s",
                                        "handler_signals_per_cpu_s")}
    # A ratio beyond the required ones is shown when both of its figures were measured.
    keys += [k for k, (a, b) in derived.items() if k not in keys
             and collected.spread(a) is not None and collected.spread(b) is not None]
    for key in keys:
        if key in derived:
            a, b = derived[key]
            value = ratio(collected.spread(a), collected.spread(b))
            out[key] = None if value is None else round(value, 3)
            if value is None:
                missing = [k for k in (a, b) if collected.spread(k) is None]
                out[key + "_why"] = "; ".join(
                    f"{k}: {collected.why.get(k, 'not measured in this run (--only)')}" for k in missing
                ) or "division by zero"
            continue
        spread = collected.spread(key)
        if spread is None:
            out[key] = None
            out[key + "_why"] = collected.why.get(key, "not measured in this run (--only)")
        else:
            out[key] = _round(spread.median)
    out["spread"] = {
        key: [_round(s.min), _round(s.median), _round(s.max), s.n]
        for key in sorted(collected.samples)
        if (s := collected.spread(key)) is not None
    }
    return out
