"""Figures from the network lab (:mod:`tether.lab`): real ``tether`` processes in network
namespaces, through real faults. Reuses the lab's scenarios as they are:

- ``loss5_mb_s``: the ``packet_loss`` scenario (5 % loss both ways), echo through the tunnel,
  bytes echoed and checked per second (MiB/s);
- ``recover_ip_change_ms``: the ``ip_change`` scenario, the connecting side's address
  replaced: from the change to the first byte echoed again.

Needs root, ``ip``, ``nft`` and ``conntrack`` (the lab's preflight says what is missing).
"""

from __future__ import annotations

from typing import Any

from .checked import MB


def unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    from ..lab import netns

    try:
        netns.preflight(need_turn=False, need_tun=False)
    except netns.LabUnavailable as exc:
        return str(exc)
    return None


async def _one(name: str, **options: Any) -> Any:
    from ..lab.runner import run_lab
    from ..lab.session import LabOptions

    results = await run_lab([name], runs=1, options=LabOptions(**options))
    result = results[0]
    if not result.ok and result.failures:
        detail = "; ".join(result.failures)[:300]
    else:
        detail = ""
    return result, detail


async def loss5(mb: float) -> dict[str, Any]:
    total = int(mb * MB)
    result, detail = await _one("packet_loss", loss_percent=5, loss_bytes=total,
                                loss_timeout_s=180.0)
    seconds = result.extra.get("transfer_s")
    if not seconds or result.bytes_lost:
        return {"loss5_mb_s": None,
                "loss5_mb_s_why": f"lab packet_loss did not finish cleanly: {detail or result.extra}"}
    return {"loss5_mb_s": total / MB / seconds}


async def ip_change() -> dict[str, Any]:
    result, detail = await _one("ip_change", give_up_s=30.0)
    if result.recovered_ms is None:
        return {"recover_ip_change_ms": None,
                "recover_ip_change_ms_why": f"lab ip_change: no recovery seen ({detail})"}
    out: dict[str, Any] = {"recover_ip_change_ms": result.recovered_ms}
    if result.detected_ms is not None:
        out["detect_ip_change_ms"] = result.detected_ms
    return out
