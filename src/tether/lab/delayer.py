"""A user-space delay line for the slow_path scenario (this kernel has no netem).

How packets get here: the router namespace gets a TUN device; policy routing sends every
packet that arrives from the laptop's or the server's link (``ip rule add iif <veth>
lookup 100``; table 100's default route is the TUN) into it. This program reads each packet
from ``/dev/net/tun`` and writes it back into the same TUN ``--delay`` seconds later; a
packet written back arrives with ``iif`` = the TUN, matches no rule and follows the main
table to its real destination. Each direction passes the TUN once, so a 0.3 s delay makes a
0.6 s round trip. The lab routes through the TUN from the start with no delay and turns the
delay on (a ``delay 0.3`` line on stdin) as the fault, in one step. Connection tracking
would see every packet twice (once on the way in, once from the TUN), which breaks the NAT,
so the topology marks the first pass ``notrack`` (see
:meth:`tether.lab.topology.Topology.slow_path`). A TUN was chosen over NFQUEUE because it
needs nothing beyond the standard library and the kernel's tun driver.

:class:`DelayLine` is the pure part (what is due when, bounded); :func:`main` is the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import signal
import struct
import sys
from collections import deque

logger = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65535


class DelayLine:
    """Holds packets for a fixed delay, in arrival order, up to a bound.

    Due times never decrease (no packet overtakes one ahead of it, even when the delay
    shrinks), so a FIFO is sorted by due time. A full line drops the new packet, as a
    router's full queue would.
    """

    def __init__(self, delay: float, *, max_packets: int = 50_000,
                 max_bytes: int = 64 * 1024 * 1024) -> None:
        if delay < 0 or max_packets <= 0 or max_bytes <= 0:
            raise ValueError("delay must not be negative and the bounds must be positive")
        self.delay = delay
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self._queue: deque[tuple[float, bytes]] = deque()
        self._bytes = 0
        self.accepted = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def set_delay(self, delay: float) -> None:
        """Packets queued from now on wait ``delay``; order is kept (a shorter delay makes a
        packet wait for the ones ahead of it, as on a real link)."""
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.delay = delay

    def push(self, packet: bytes, now: float) -> bool:
        """Queue ``packet`` arriving at ``now``; False if the line is full (dropped)."""
        if len(self._queue) >= self.max_packets or self._bytes + len(packet) > self.max_bytes:
            self.dropped += 1
            return False
        due = now + self.delay
        if self._queue and self._queue[-1][0] > due:
            due = self._queue[-1][0]
        self._queue.append((due, packet))
        self._bytes += len(packet)
        self.accepted += 1
        return True

    def next_due(self) -> float | None:
        """When the oldest packet is due, or None if the line is empty."""
        return self._queue[0][0] if self._queue else None

    def pop_due(self, now: float) -> list[bytes]:
        """Every packet due at ``now``, oldest first."""
        out = []
        while self._queue and self._queue[0][0] <= now:
            _, packet = self._queue.popleft()
            self._bytes -= len(packet)
            out.append(packet)
        return out


def open_tun(name: str) -> int:
    """Attach to the (already created) TUN device ``name``; a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


async def run(device: str, delay: float) -> DelayLine:
    """Delay every packet of ``device`` until stdin closes or SIGTERM arrives.

    A line ``delay SECONDS`` on stdin changes the delay: the lab routes through the TUN
    from the start with no delay and turns the delay on as the fault, in one step.
    """
    loop = asyncio.get_running_loop()
    queue = DelayLine(delay)
    fd = open_tun(device)
    timer: asyncio.TimerHandle | None = None
    stop = asyncio.Event()

    def flush() -> None:
        nonlocal timer
        timer = None
        for packet in queue.pop_due(loop.time()):
            try:
                os.write(fd, packet)
            except OSError:
                queue.dropped += 1
        arm()

    def arm() -> None:
        nonlocal timer
        due = queue.next_due()
        if timer is None and due is not None:
            timer = loop.call_at(due, flush)

    def readable() -> None:
        while True:
            try:
                packet = os.read(fd, MAX_PACKET)
            except BlockingIOError:
                break
            except OSError as exc:
                logger.error("reading %s: %s", device, exc)
                stop.set()
                break
            queue.push(packet, loop.time())
        arm()

    reader = asyncio.StreamReader(limit=1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while text := await reader.readline():
            words = text.decode(errors="replace").split()
            try:
                if len(words) == 2 and words[0] == "delay":
                    queue.set_delay(float(words[1]))
                    _say({"delay": queue.delay})
                    continue
            except ValueError:
                pass
            logger.error("unknown command %r (expected: delay SECONDS)", text[:80])

    loop.add_reader(fd, readable)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stdin_closed = asyncio.ensure_future(commands())
    stopped = asyncio.ensure_future(stop.wait())
    _say({"ready": device, "delay": delay})
    try:
        await asyncio.wait({stdin_closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stdin_closed.cancel()
        stopped.cancel()
        await asyncio.gather(stdin_closed, stopped, return_exceptions=True)
        loop.remove_reader(fd)
        loop.remove_signal_handler(signal.SIGTERM)
        if timer is not None:
            timer.cancel()
        os.close(fd)
    return queue


def _say(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="delay every packet of a TUN device")
    parser.add_argument("--device", required=True)
    parser.add_argument("--delay", type=float, default=0.3, help="seconds, each way")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    queue = asyncio.run(run(args.device, args.delay))
    _say({"accepted": queue.accepted, "dropped": queue.dropped})


if __name__ == "__main__":
    main()
