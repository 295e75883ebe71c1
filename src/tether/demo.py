"""``tether demo``: a whole tunnel in one process, with every byte checked.

An embedded signaling server on loopback, an exposing peer forwarding to a built-in echo
server, a connecting peer; N MB pushed through several concurrent TCP connections and
compared, byte for byte, with what came back.

Halfway through, the demo kills the path the tube runs on (its sockets stop passing
anything, as when an address disappears) and shows what tether is for: the dead path is
detected, ICE restarts onto a new one, and the streams go on with no byte lost. The result
says how long detection (``detected_ms``) and recovery (``recovered_ms``, from the break
to the first byte echoed again) took.

Both peers share one process (and one core), so throughput here is about a third of two
tether processes on two cores.

Every stream is a client connection, an accepted one, a dialled one and an echoed one, all
in this process, opened at once: the listeners get a deep accept queue (the kernel resets
connections beyond asyncio's default backlog of 100, which is what crashed 500 streams),
the open-file limit is raised to what the streams need (or a clear error says why not),
and the exposing tunnel admits as many streams and OPENs as the demo makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .app import LISTEN_BACKLOG, ConnectSide, ExposeSide, TubeHandle
from .connection_manager import ConnectionState
from .cores.gathering import LOOPBACK
from .echo import _echo
from .sealing import new_secret
from .signaling import SignalingServer

MB = 1024 * 1024
CHUNK = 64 * 1024
# Bytes echoed this soon after the break were already past the path when it died.
STRAGGLERS = 0.25
# Open files per stream in this one process (client, accepted, dialled, echoed) and spare.
FILES_PER_STREAM = 4
SPARE_FILES = 256


def ensure_file_limit(streams: int) -> None:
    """Raise the soft open-file limit to what ``streams`` need, or say why it cannot be."""
    import resource

    needed = streams * FILES_PER_STREAM + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(f"{streams} streams need about {needed:,} open files; this system "
                         f"allows {hard:,} (ulimit -Hn): use fewer --streams")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class _DemoExposeSide(ExposeSide):
    """The exposing side, admitting every stream the demo opens at once."""

    def __init__(self, *args: Any, streams: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._demo_streams = streams

    def _tunnel_options(self) -> dict[str, Any]:
        options = dict(super()._tunnel_options())
        if self.core is None or type(self.core).__name__ == "AiortcTubeRegistry":
            n = self._demo_streams
            options.update(max_streams=max(n, 256), open_burst=max(n, 128),
                           open_rate=max(float(n), 64.0))
        return options


@dataclass
class DemoProgress:
    """What the live display shows while the demo runs."""

    phase: str = "starting"
    tube_state: str = "initializing"
    bytes_total: int = 0
    bytes_sent: int = 0
    bytes_verified: int = 0
    started: float = field(default_factory=time.perf_counter)
    transfer_started: float | None = None
    broken_at: float | None = None  # when the demo killed the path
    detected_at: float | None = None  # when the connecting side saw trouble
    recovered_at: float | None = None  # first byte echoed after the break
    last_verified_at: float | None = None

    def verified(self, n: int) -> None:
        now = time.perf_counter()
        self.bytes_verified += n
        self.last_verified_at = now
        if self.broken_at is not None and self.recovered_at is None and (
                now - self.broken_at >= STRAGGLERS or self.detected_at is not None):
            self.recovered_at = now

    @property
    def mb_s(self) -> float:
        if self.transfer_started is None:
            return 0.0
        elapsed = time.perf_counter() - self.transfer_started
        return self.bytes_verified / MB / elapsed if elapsed > 0 else 0.0


@dataclass
class DemoResult:
    connect_ms: float
    mb: float
    streams: int
    seconds: float
    throughput_mb_s: float
    bytes_sent: int
    bytes_verified: int
    tube_id: str
    tube_state: str
    path_broken: bool = False
    detected_ms: float | None = None
    recovered_ms: float | None = None
    bytes_lost: int = 0
    restarts: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class DataMismatch(Exception):
    """The echo returned different bytes than were sent."""


async def push_and_verify(
    address: tuple[str, int], size: int, seed: int, progress: DemoProgress | None = None
) -> None:
    """Send ``size`` seeded-random bytes and check the echo against the same sequence."""
    progress = progress or DemoProgress()
    reader, writer = await asyncio.open_connection(*address)
    sent_gen, check_gen = random.Random(seed), random.Random(seed)

    async def send() -> None:
        left = size
        while left:
            n = min(CHUNK, left)
            writer.write(sent_gen.randbytes(n))
            await writer.drain()
            progress.bytes_sent += n
            left -= n
        writer.write_eof()

    async def check() -> None:
        left = size
        # Expected bytes, made in the sender's chunks: randbytes(n) split differently is a
        # different sequence, and reads may end anywhere (the Rust core's do).
        expected, to_make = bytearray(), size
        while left:
            data = await reader.read(min(CHUNK, left))
            if not data:
                raise DataMismatch(f"stream {seed}: echo ended {left} bytes early")
            while len(expected) < len(data):
                n = min(CHUNK, to_make)
                expected += check_gen.randbytes(n)
                to_make -= n
            if data != expected[:len(data)]:
                raise DataMismatch(f"stream {seed}: bytes differ at offset {size - left}")
            del expected[:len(data)]
            progress.verified(len(data))
            left -= len(data)

    try:
        await asyncio.gather(send(), check())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def run_demo(
    mb: float = 32,
    streams: int = 4,
    progress: DemoProgress | None = None,
    on_tick: Callable[[DemoProgress], None] | None = None,
    break_path: bool = True,
    core: str = "aiortc",
) -> DemoResult:
    """Run the whole demo; raise DataMismatch if any byte came back wrong.

    ``break_path``: kill the tube's path once half the data is verified (see the module doc).
    """
    progress = progress or DemoProgress()
    ensure_file_limit(streams)
    total = int(mb * MB)
    progress.bytes_total = total
    token = secrets.token_urlsafe(16)
    async with contextlib.AsyncExitStack() as stack:
        server = SignalingServer(host="127.0.0.1", port=0, token=token)
        await server.start()
        stack.push_async_callback(server.close)
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
        stack.push_async_callback(echo.wait_closed)
        stack.callback(echo.close)
        url = f"ws://127.0.0.1:{server.port}"
        target = echo.sockets[0].getsockname()[:2]
        secret = new_secret()  # every signal between the two peers is sealed with it
        expose = _DemoExposeSide("demo", streams=streams, target=target, signal_url=url, token=token,
                            host_addresses=LOOPBACK, secret=secret, core=_core(core))
        connect = ConnectSide("demo", listen=("127.0.0.1", 0), signal_url=url, token=token,
                              host_addresses=LOOPBACK, secret=secret, core=_core(core))
        await expose.start()
        stack.push_async_callback(expose.close)
        progress.phase = "connecting"
        await connect.start()
        stack.push_async_callback(connect.close)

        ticker = asyncio.create_task(_tick(connect, progress, on_tick))
        breaker: asyncio.Task[None] | None = None
        try:
            handle = await connect.wait_ready(timeout=30)
            progress.tube_state = handle.manager.state.value
            progress.phase = "transferring"
            progress.transfer_started = time.perf_counter()
            if break_path and hasattr(connect.core, "drop_traffic"):  # not the Rust core
                breaker = asyncio.create_task(_break_halfway(connect, handle, progress))
            sizes = [total // streams + (1 if i < total % streams else 0) for i in range(streams)]
            await asyncio.gather(*(
                push_and_verify(connect.listen_address, size, seed, progress)
                for seed, size in enumerate(sizes)
            ))
            seconds = time.perf_counter() - progress.transfer_started
            progress.tube_state = handle.manager.state.value  # not the last tick's, maybe stale
            progress.phase = "done"
        finally:
            for task in (ticker, breaker):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        if on_tick:
            on_tick(progress)
        return DemoResult(
            connect_ms=round(handle.connect_ms or 0.0, 1),
            mb=mb,
            streams=streams,
            seconds=round(seconds, 3),
            throughput_mb_s=round(total / MB / seconds, 2),
            bytes_sent=progress.bytes_sent,
            bytes_verified=progress.bytes_verified,
            tube_id=handle.tube_id,
            tube_state=handle.manager.state.value,
            path_broken=progress.broken_at is not None,
            detected_ms=_ms_since(progress.broken_at, progress.detected_at),
            recovered_ms=_ms_since(progress.broken_at, progress.recovered_at),
            bytes_lost=progress.bytes_sent - progress.bytes_verified,
            # Either side may have started the restart that healed the tube (or both: glare).
            restarts=sum(m.metrics.restarts_succeeded for m in (
                handle.manager, expose.managers.get(handle.tube_id)) if m is not None),
        )


def _core(name: str) -> Any:
    """None (the sides' default aiortc core on loopback) or the Rust core ("keeper"), which
    never gathers 127.0.0.1: run it where the host has another address."""
    if name == "keeper":
        from .cores.keeper_core import KeeperTubeRegistry

        return KeeperTubeRegistry()
    if name != "aiortc":
        raise ValueError(f"unknown core {name!r}: aiortc or keeper")
    return None


def _ms_since(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 1)


async def _break_halfway(connect: ConnectSide, handle: TubeHandle,
                         progress: DemoProgress) -> None:
    """Kill the tube's current path once half the bytes are back; note when it is seen."""
    while progress.bytes_verified < progress.bytes_total // 2:
        await asyncio.sleep(0.01)
    progress.phase = "path broken"
    progress.broken_at = time.perf_counter()
    connect.core.drop_traffic(handle.tube_id, True)
    while handle.manager.state is ConnectionState.CONNECTED:
        await asyncio.sleep(0.005)
    progress.detected_at = time.perf_counter()
    progress.phase = "recovering"
    while progress.recovered_at is None:
        await asyncio.sleep(0.01)
    progress.phase = "transferring"


async def _tick(
    connect: ConnectSide, progress: DemoProgress, on_tick: Callable[[DemoProgress], None] | None
) -> None:
    while True:
        if connect.current is not None:
            progress.tube_state = connect.current.manager.state.value
        if on_tick:
            on_tick(progress)
        await asyncio.sleep(0.1)
