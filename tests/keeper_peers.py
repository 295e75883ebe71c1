"""Two tether sides through real signaling, run inside a test's network namespace.

The Rust core never gathers 127.0.0.1, so the keeper tests run this module with
``ip netns exec NS python -m tests.keeper_peers SCENARIO ADDRESS`` in a namespace whose
only address is a 10.x/32 on lo, and read one JSON line of results from it.

Scenarios: ``keeper`` (both sides on the Rust core, resumable streams on: connect, carry
bytes, a restart started by either side, which replaces the tube, while one echo stream
runs across both replacements and must come back whole, bytes again) and ``cross`` (the
connecting side on aiortc offers, the exposing side on the Rust core answers, with its own
ICE restart and tunnel: connect, a data channel the aiortc end opens in-band is accepted
by the Rust core, ICE restarts started by either side). Not the other
way round: the Rust core's offered channel takes SCTP stream 1, which the aiortc core
keeps for its pre-negotiated control channel.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
import time
from typing import Any

from tether.app import ConnectSide, ExposeSide, Side
from tether.connection_manager import ConnectionState
from tether.cores.aiortc_core import AiortcTubeRegistry
from tether.cores.keeper_core import KeeperTubeRegistry
from tether.echo import start_echo_server
from tether.signaling import SignalingServer

WAIT = 30.0


async def until(check: Any, timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.02)


def handle_of(side: Side) -> Any:
    handles = list(side.tubes.values())
    return handles[-1] if handles else None


def connected(side: Side) -> bool:
    handle = handle_of(side)
    return (handle is not None and handle.manager.state is ConnectionState.CONNECTED
            and not handle.manager.machine.restart_in_progress)


async def echo_round(listen: tuple[str, int], size: int) -> float:
    """Push ``size`` random bytes through the tunnel's echo; check them; MB/s."""
    reader, writer = await asyncio.open_connection(*listen)
    data = secrets.token_bytes(size)
    started = time.perf_counter()
    writer.write(data)
    got = await asyncio.wait_for(reader.readexactly(size), WAIT)
    seconds = time.perf_counter() - started
    writer.close()
    if got != data:
        raise AssertionError("the echo came back different")
    return size / seconds / 1e6


class EchoStream:
    """One TCP connection through the tunnel that keeps echoing paced random bytes."""

    def __init__(self, listen: tuple[str, int], size: int = 6 << 20) -> None:
        self.listen = listen
        self.data = secrets.token_bytes(size)
        self.sent = 0
        self.echoed = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.reading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(*self.listen)
        self.task = asyncio.create_task(self._send())
        self.reading = asyncio.create_task(self._read_all())

    async def _send(self) -> None:
        while self.sent < len(self.data):
            chunk = self.data[self.sent:self.sent + 16384]
            self.writer.write(chunk)
            await self.writer.drain()
            self.sent += len(chunk)
            await asyncio.sleep(0.01)  # ~1.6 MB/s: the stream is running during restarts

    async def finish(self) -> dict[str, Any]:
        assert self.task is not None and self.reading is not None
        await asyncio.wait_for(self.task, 4 * WAIT)
        self.writer.write_eof()
        await asyncio.wait_for(self.reading, WAIT)
        self.writer.close()
        return {"sent": self.sent, "echoed": len(self.echoed),
                "intact": bytes(self.echoed) == self.data}

    async def _read_all(self) -> None:
        while got := await self.reader.read(65536):
            self.echoed += got

    def cancel(self) -> None:
        for task in (self.task, self.reading):
            if task is not None:
                task.cancel()
        if hasattr(self, "writer"):
            self.writer.close()


async def replace_from(side: Side, peer: Side) -> dict[str, Any]:
    """A restart on the Rust core replaces the tube: a new one on both sides, connected."""
    handle, peer_handle = handle_of(side), handle_of(peer)
    started = time.perf_counter()
    await handle.manager.restart()

    await until(lambda: handle_of(side) is not handle and handle_of(peer) is not peer_handle
                and connected(side) and connected(peer), 2 * WAIT, what="a new tube")
    return {"seconds": round(time.perf_counter() - started, 3),
            "state": handle_of(side).manager.state.value,
            "peer_state": handle_of(peer).manager.state.value,
            "same_tube": handle_of(side) is handle}


async def restart_from(side: Side, peer: Side) -> dict[str, Any]:
    handle, peer_handle = handle_of(side), handle_of(peer)
    before = handle.manager.metrics.restarts_succeeded
    started = time.perf_counter()
    await handle.manager.restart()
    await until(lambda: handle.manager.metrics.restarts_succeeded > before
                and connected(side) and connected(peer), 2 * WAIT, what="restart")
    return {"seconds": round(time.perf_counter() - started, 3),
            "state": handle.manager.state.value, "peer_state": peer_handle.manager.state.value,
            "same_tube": handle_of(side) is handle}


async def main(scenario: str, address: str) -> dict[str, Any]:
    token = secrets.token_urlsafe(12)
    secret = secrets.token_urlsafe(32)
    server = SignalingServer(host="127.0.0.1", port=0, token=token)
    await server.start()
    echo = await start_echo_server("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.port}"
    target = echo.sockets[0].getsockname()[:2]
    if scenario == "keeper":
        connect_core: Any = KeeperTubeRegistry()
    else:
        connect_core = AiortcTubeRegistry(host_addresses=[address])
    # cross: the Rust exposing side with its own ICE restart and tunnel (aiortc speaks
    # neither resumable streams nor tube replacement).
    expose_core = (KeeperTubeRegistry() if scenario == "keeper" else
                   KeeperTubeRegistry(resume=False, replace_on_restart=False))
    expose = ExposeSide("kt", target=target, signal_url=url, token=token,
                        core=expose_core, secret=secret)
    connect = ConnectSide("kt", listen=("127.0.0.1", 0), signal_url=url, token=token,
                          core=connect_core, secret=secret)
    result: dict[str, Any] = {"scenario": scenario}
    channels: list[Any] = []
    try:
        await expose.start()
        await connect.start()
        await connect.wait_ready(WAIT)
        await until(lambda: connected(connect) and connected(expose), what="connection")
        result["connect_ms"] = round(handle_of(connect).connect_ms, 1)
        if scenario == "keeper":
            result["mb_s"] = round(await echo_round(connect.listen_address, 4 << 20), 2)
        else:
            # An in-band channel from the aiortc end: the Rust core must accept it (DCEP).
            pc = connect_core._tube(handle_of(connect).tube_id).pc
            channels.append(pc.createDataChannel("tether-cross"))
            await until(lambda: channels[0].readyState == "open",
                        what="data channel opened by the Rust core")
            result["channel"] = {"label": channels[0].label, "id": channels[0].id,
                                 "state": channels[0].readyState}
        if scenario == "keeper":
            stream = EchoStream(connect.listen_address)
            await stream.start()
            await asyncio.sleep(0.5)
            try:
                result["restart_by_connect"] = await replace_from(connect, expose)
                await asyncio.sleep(0.5)
                result["restart_by_expose"] = await replace_from(expose, connect)
                result["stream"] = await stream.finish()
            finally:
                stream.cancel()
            result["resumes"] = connect_core.resume_client.resumes
            result["mb_s_after"] = round(await echo_round(connect.listen_address, 1 << 20), 2)
        else:
            result["restart_by_connect"] = await restart_from(connect, expose)
            result["restart_by_expose"] = await restart_from(expose, connect)
            result["channel_after"] = channels[0].readyState
            status = await expose.core._run(expose.core._rust.get_tube_status,
                                             expose.core._tube(handle_of(expose).tube_id)
                                             .rust_id)
            result["rust_status_after"] = status
        result["tube_kept"] = len(connect.tubes) == 1 and len(expose.tubes) == 1
        result["ok"] = True
    except Exception as exc:
        result["ok"] = False
        result["error"] = repr(exc)
    finally:
        await connect.close()
        await expose.close()
        echo.close()
        await echo.wait_closed()
        await server.close()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(relativeCreated)6d %(name)s: %(message)s")
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))), flush=True)
