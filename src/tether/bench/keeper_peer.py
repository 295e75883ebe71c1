"""One peer of the Rust core benchmark (keeper-pam-webrtc-rs in its own tunnel mode), run as
a script inside the bench's network namespace (``python -P keeper_peer.py``).

Each prints ``{"waiting"}`` once started; ``offer`` then waits for ``{"go"}``.
``offer``: a tube whose end listens on 127.0.0.1 (``local_listen_addr``) and forwards each
TCP connection over WebRTC; prints ``{"offer", "listen"}``, then ``{"ready": ms}`` (from
creating the tube to the tube status "ready"). ``answer TARGET_PORT``: reads the offer,
prints ``{"answer"}``, and dials 127.0.0.1:TARGET_PORT for each stream. Both print trickled
candidates as ``{"candidate"}`` and take ``{"answer"}`` / ``{"candidate"}`` / ``{"quit"}``
on stdin. The Rust core calls back from its own threads: output goes through one lock.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import keeper_pam_webrtc_rs as keeper

_out = threading.Lock()
_TEST_CONFIG = "TEST_MODE_KSM_CONFIG"  # the library's test mode: no calls to Keeper's router


def emit(record: dict) -> None:
    with _out:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def on_signal(signal: dict) -> None:
    if signal.get("kind") == "icecandidate":
        emit({"candidate": signal.get("data") or ""})


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    role = sys.argv[1]
    registry = keeper.PyTubeRegistry()
    common = {"conversation_id": "bench", "trickle_ice": True, "callback_token": "bench",
              "krelay_server": "127.0.0.1", "client_version": "ms16.5.0",
              "ksm_config": _TEST_CONFIG, "signal_callback": on_signal}
    emit({"waiting": True})  # imported and started: the bench's clock may start
    if role == "offer":
        sys.stdin.readline()  # {"go": true}
    first = None if role == "offer" else json.loads(sys.stdin.readline())
    t0 = time.perf_counter()
    if role == "offer":
        info = registry.create_tube(
            settings={"conversationType": "tunnel", "local_listen_addr": "127.0.0.1:0"},
            **common)
        emit({"offer": info["offer"], "listen": info.get("actual_local_listen_addr")})
    else:
        info = registry.create_tube(
            settings={"conversationType": "tunnel", "target_host": "127.0.0.1",
                      "target_port": sys.argv[2]},
            offer=first["offer"], **common)
        emit({"answer": info["answer"]})
    tube_id = info["tube_id"]
    quit_ = threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            message = json.loads(line)
            if "answer" in message:
                registry.set_remote_description(tube_id, message["answer"], is_answer=True)
            elif "candidate" in message:
                registry.add_ice_candidate(tube_id, message["candidate"])
            elif "quit" in message:
                break
        quit_.set()

    threading.Thread(target=commands, daemon=True).start()
    deadline = time.monotonic() + 30
    while registry.get_tube_status(tube_id) != "ready" and not quit_.is_set():
        if time.monotonic() > deadline:
            emit({"error": f"tube not ready after 30 s: {registry.get_tube_status(tube_id)}"})
            break
        time.sleep(0.002)
    else:
        if not quit_.is_set():
            emit({"ready": (time.perf_counter() - t0) * 1000.0})
    quit_.wait()
    registry.close_tube(tube_id)
    registry.shutdown_runtime()


if __name__ == "__main__":
    main()
