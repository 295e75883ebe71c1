"""An aiortc tube and a Rust-core tube, through tether's signaling and managers.

The connecting side runs aiortc and offers; the exposing side runs the Rust core and
answers. A data channel the aiortc end opens in-band is accepted by the Rust core, and the
tube survives an ICE restart started by either side (tests/keeper_peers.py, run in a
namespace with only a 10.x/32 on lo). The Rust side runs with ``resume=False,
replace_on_restart=False``: aiortc speaks neither resumable streams nor tube replacement,
and this test is about the Rust core's own ICE restart handshake.
"""

from __future__ import annotations

import pytest

from .keeper_ns import last_json, lo_namespace, need_namespaces, run_in


@pytest.mark.netns
def test_aiortc_and_rust_core_connect_open_a_channel_and_survive_restarts() -> None:
    need_namespaces()
    with lo_namespace() as (namespace, address):
        result = last_json(run_in(namespace, "-m", "tests.keeper_peers", "cross", address))
    print(result)
    assert result["ok"], result
    assert result["channel"]["state"] == "open"
    for key in ("restart_by_connect", "restart_by_expose"):
        assert result[key]["state"] == result[key]["peer_state"] == "connected"
        assert result[key]["same_tube"]
    assert result["channel_after"] == "open"
    assert result["rust_status_after"] == "ready"
    assert result["tube_kept"]
