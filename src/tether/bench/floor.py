"""The floor: the least Python a tunnel's packet path can do per MB on this machine.

Issue 9 asks for 20 ms of CPU per MB per side. This figure says how much of tether's CPU
per MB is the unavoidable price of moving packets in Python here, and how much is the
protocol machinery above it (aiortc's SCTP and DTLS objects, tether's patches included).

Two processes, one per side, run the same wire shape as tether's tunnel and nothing more:
the sender reads a TCP connection, cuts 60 KiB messages into DATA chunks of 1,160 bytes
(aiortc's), frames each as an SCTP packet (common header, DATA chunk header, CRC32c) in a
DTLS 1.2 application-data record sealed with AES-128-GCM by tether's own record layer
(``tether.cores.dtls_records``, replay window included), and sends the datagrams of a loop
turn in one UDP GSO ``sendmsg``; the
receiver (uvloop's datagram transport) opens each record, checks the CRC, takes the chunk
in TSN order, and once per loop turn writes the messages completed in it to a TCP
connection in one write and answers with one SACK-shaped packet (cumulative TSN) sealed the
same way (fewer SACKs than tether sends: its peers' Max.Burst needs one per 4 packets). A
window of unacknowledged bytes paces the sender; a go-back-N resend after silence covers a
datagram lost on loopback. The sink reads as fast as it can, so the receiver's writes
need no flow control of their own.

What it leaves out, on purpose: congestion control, gap reports, stream and message
bookkeeping beyond one stream, every object per chunk. So no real protocol can be cheaper;
"tether's CPU per MB / the floor's" is how far tether's packet path is from it.

Figures: ``floor_mb_s`` (one way, checked by SHA-256 at the sink), ``floor_cpu_ms_per_mb_send``
and ``floor_cpu_ms_per_mb_receive`` (each side's own CPU over the transfer; ``_busier`` the
larger), ``floor_sys_ms_per_mb_*`` (the kernel's part of it: system calls and the loopback
delivery they do), ``floor_resends`` (go-back-N rounds; 0 when no datagram was lost).
``tether bench`` adds ``tunnel_cpu_vs_floor``: the CLI's busier side over the floor's, both
with aiortc's packet size (the CLI's ``cli_base`` figure: path_mtu off).

The sides run as ``python -m tether.bench.floor send|receive ...``; both are driven by
:func:`measure`, which serves the source and the sink on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import socket
import struct
import sys
import time
from typing import Any

from google_crc32c import value as crc32c

from ..cores.dtls_records import APPLICATION_DATA, Keys, RecordLayer
from ..tunnel.frames import MAX_DATA_LARGE
from .checked import Payload, start_source

MESSAGE = MAX_DATA_LARGE      # one tunnel DATA frame per message, as two tether peers send
CHUNK = 1160                 # aiortc's USERDATA_MAX_LENGTH (a 1,188-byte SCTP packet; tested)
WINDOW = 128 * 1024          # unacknowledged bytes the sender allows itself
RESEND_AFTER = 0.2           # seconds without progress before the window is sent again
LINGER = 1.0                 # the receiver answers resends this long after the end
GSO_RUN = 32                 # datagrams per GSO send at most (tether's MAX_SEGMENTS)
UDP_SEGMENT = 103

SCTP_COMMON = struct.Struct("!HHII")      # ports, verification tag, checksum
DATA_HEADER = struct.Struct("!BBHIHHI")   # type, flags, length, TSN, stream, SSN, PPID
SACK = struct.Struct("!BBHIIHH")          # type 3, flags, length 16, cum TSN, a_rwnd, 0, 0
FLAG_BEGIN, FLAG_END = 0x02, 0x01


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _system() -> float:
    """CPU seconds in the kernel (system calls, and loopback delivery done on our behalf)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _layer(is_client: bool) -> RecordLayer:
    """tether's own record layer (the one its tunnel seals with), keyed by a bench constant;
    the sender is the client side, the receiver the server side."""
    block = hashlib.sha512(b"tether floor").digest()
    keys = Keys(block[:16], block[16:32], block[32:36], block[36:40])
    return RecordLayer(keys, is_client, epoch=1, next_seq=1)


def _packet(chunk: bytes) -> bytes:
    """An SCTP packet around ``chunk``, CRC32c filled in."""
    zeroed = SCTP_COMMON.pack(5000, 5000, 1, 0) + chunk
    checksum = crc32c(zeroed)
    return zeroed[:8] + checksum.to_bytes(4, "little") + zeroed[12:]


def _check(packet: bytes) -> bytes:
    """The chunk of a packet whose CRC32c holds, else ValueError."""
    if crc32c(packet[:8] + b"\0\0\0\0" + packet[12:]) != int.from_bytes(packet[8:12], "little"):
        raise ValueError("bad CRC32c")
    return packet[12:]


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.records = _layer(is_client=False)
        self.transport: asyncio.DatagramTransport | None = None
        self.next_tsn = 1
        self.parts: list[bytes] = []   # the message being reassembled
        self.ready: list[bytes] = []   # completed messages' parts, written once a turn
        self.ended = False
        self.peer: Any = None
        self.flush_scheduled = False
        self.started: float | None = None
        self.cpu0 = self.sys0 = 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.bad = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.started is None:
            self.started, self.cpu0, self.sys0 = time.perf_counter(), _cpu(), _system()
        self.peer = addr
        try:
            plain = self.records.open(data)
            chunk = _check(plain) if plain is not None else None
        except ValueError:  # not a whole record, or a bad CRC32c
            chunk = None
        if chunk is None:
            self.bad += 1
            return
        _, flags, length, tsn, _, _, ppid = DATA_HEADER.unpack_from(chunk)
        if tsn == self.next_tsn:
            self.next_tsn = tsn + 1
            if ppid == 0:  # the end of the stream
                self.ended = True
            else:
                self.parts.append(chunk[16:length])
                if flags & FLAG_END:
                    self.ready += self.parts
                    self.parts = []
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Once per loop turn: the completed messages in one write, one SACK."""
        self.flush_scheduled = False
        if self.ready:
            self.writer.write(b"".join(self.ready))
            self.ready = []
        assert self.transport is not None
        sack = SACK.pack(3, 0, 16, self.next_tsn - 1, 1 << 20, 0, 0)
        self.transport.sendto(self.records.seal(APPLICATION_DATA, _packet(sack)), self.peer)
        if self.ended and not self.done.done():
            self.writer.write_eof()
            self.done.set_result(None)


async def _receive(sink_port: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    _, writer = await asyncio.open_connection("127.0.0.1", sink_port)
    transport, side = await loop.create_datagram_endpoint(
        lambda: _Receiver(writer), local_addr=("127.0.0.1", 0))
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # the window and more
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    await side.done
    await writer.drain()
    cpu, system = _cpu() - side.cpu0, _system() - side.sys0
    writer.close()
    await asyncio.sleep(LINGER)  # a resend of the end meets a SACK, not a closed port
    transport.close()
    return {"cpu_s": cpu, "sys_s": system, "bad": side.bad}


class _Sender(asyncio.DatagramProtocol):
    def __init__(self, peer: tuple[str, int]) -> None:
        self.sock: Any = None  # our own descriptor of the transport's socket
        self.peer = peer
        self.records = _layer(is_client=True)
        self.sent: list[bytes] = []      # sealed datagrams not yet acknowledged, from TSN base
        self.base = 1                    # TSN of sent[0]
        self.next_tsn = 1
        self.acked_at = time.monotonic()
        self.room = asyncio.Event()
        self.room.set()
        self.pending: list[bytes] = []
        self.flush_scheduled = False
        self.resends = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            plain = self.records.open(data)
            chunk = _check(plain) if plain is not None else None
        except ValueError:
            return
        if chunk is None:
            return
        cumulative = SACK.unpack_from(chunk)[3]
        done = cumulative + 1 - self.base
        if done > 0:
            del self.sent[:done]
            self.base += done
            self.acked_at = time.monotonic()
            if self.in_flight() < WINDOW:
                self.room.set()

    def in_flight(self) -> int:
        return len(self.sent) * CHUNK

    def send_chunk(self, flags: int, payload: bytes, ppid: int = 51) -> None:
        tsn = self.next_tsn
        self.next_tsn += 1
        chunk = DATA_HEADER.pack(0, flags, 16 + len(payload), tsn, 0, 0, ppid) + payload
        datagram = self.records.seal(APPLICATION_DATA, _packet(chunk))
        self.sent.append(datagram)
        self._queue(datagram)

    def _queue(self, datagram: bytes) -> None:
        self.pending.append(datagram)
        if len(self.pending) >= GSO_RUN:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """The datagrams of this turn in GSO runs: equal sizes, a shorter one may end a run."""
        self.flush_scheduled = False
        pending, self.pending = self.pending, []
        i, count = 0, len(pending)
        while i < count:
            size = len(pending[i])
            j = i + 1
            while j < count and j - i < GSO_RUN and len(pending[j]) == size:
                j += 1
            if j < count and j - i < GSO_RUN and len(pending[j]) < size:
                j += 1
            try:
                if j - i == 1:
                    self.sock.sendto(pending[i], self.peer)
                else:
                    self.sock.sendmsg(pending[i:j], [(socket.SOL_UDP, UDP_SEGMENT,
                                                      struct.pack("H", size))], 0, self.peer)
            except (BlockingIOError, InterruptedError):
                pass  # lost like a dropped datagram: the resend covers it
            i = j

    async def resend_when_silent(self) -> None:
        while True:
            await asyncio.sleep(RESEND_AFTER / 2)
            if self.sent and time.monotonic() - self.acked_at > RESEND_AFTER:
                self.resends += 1
                self.acked_at = time.monotonic()
                for datagram in self.sent:
                    self._queue(datagram)


async def _send(source_port: int, udp_port: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    peer = ("127.0.0.1", udp_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", source_port)
    transport, sender = await loop.create_datagram_endpoint(
        lambda: _Sender(peer), local_addr=("127.0.0.1", 0))
    raw = transport.get_extra_info("socket")
    own = socket.socket(fileno=os.dup(raw.fileno()))  # GSO sends, as tether's udp_batch
    own.setblocking(False)
    sender.sock = own
    resend = asyncio.create_task(sender.resend_when_silent())
    cpu0, sys0, started = _cpu(), _system(), time.perf_counter()
    try:
        while data := await reader.read(64 * 1024):
            for start in range(0, len(data), MESSAGE):
                message = data[start:start + MESSAGE]
                last = len(message) - CHUNK
                for offset in range(0, len(message), CHUNK):
                    while sender.in_flight() >= WINDOW:
                        sender.room.clear()
                        await sender.room.wait()
                    flags = (FLAG_BEGIN if offset == 0 else 0) | (FLAG_END if offset >= last else 0)
                    sender.send_chunk(flags, message[offset:offset + CHUNK])
        sender.send_chunk(FLAG_BEGIN | FLAG_END, b"\0", ppid=0)  # the end of the stream
        while sender.sent:
            sender.room.clear()
            await sender.room.wait()
    finally:
        resend.cancel()
        await asyncio.gather(resend, return_exceptions=True)
    result = {"cpu_s": _cpu() - cpu0, "sys_s": _system() - sys0,
              "seconds": time.perf_counter() - started, "resends": sender.resends}
    writer.close()
    transport.close()
    own.close()
    return result


async def measure(mb: float, seed: int = 9) -> dict[str, Any]:
    """One checked transfer of ``mb`` MiB through the floor's two processes."""
    from .signaling import stop

    payload = Payload.make(int(mb * 1024 * 1024), seed)
    source = await start_source(payload)
    got = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, size = hashlib.sha256(), 0
        while data := await reader.read(256 * 1024):
            digest.update(data)
            size += len(data)
        writer.close()
        if not got.done():
            got.set_result((size, digest.digest(), time.perf_counter()))

    sink_server = await asyncio.start_server(sink, "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    source_port = source.sockets[0].getsockname()[1]

    async def side(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tether.bench.floor", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    receiver = await side("receive", str(sink_port))
    sender = None
    try:
        assert receiver.stdout is not None
        async with asyncio.timeout(60):
            port = json.loads(await receiver.stdout.readline())["port"]
        started = time.perf_counter()
        sender = await side("send", str(source_port), str(port))
        assert sender.stdout is not None
        async with asyncio.timeout(60 + 4 * mb):
            size, digest, finished = await got
            sent = json.loads(await sender.stdout.readline())
            received = json.loads(await receiver.stdout.readline())
    except (TimeoutError, ValueError, KeyError) as exc:  # a side died or hung: say why
        errors = []
        for proc in (receiver, sender):
            if proc is not None and proc.stderr is not None:
                await stop(proc)
                errors.append((await proc.stderr.read()).decode(errors="replace")[-300:])
        raise RuntimeError(f"the floor's transfer did not complete ({exc!r}) {errors}") from None
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                await stop(proc)
        source.close()
        sink_server.close()
    if received["bad"]:
        raise RuntimeError(f"the floor's receiver refused {received['bad']} datagrams")
    if size != len(payload.data) or digest != payload.digest:
        raise RuntimeError(f"the floor delivered {size:,} of {len(payload.data):,} bytes, "
                           "or they differ")
    send_ms, receive_ms = sent["cpu_s"] * 1000.0 / mb, received["cpu_s"] * 1000.0 / mb
    return {
        "floor_mb_s": mb / (finished - started),
        "floor_cpu_ms_per_mb_send": send_ms,
        "floor_cpu_ms_per_mb_receive": receive_ms,
        "floor_cpu_ms_per_mb_busier": max(send_ms, receive_ms),
        "floor_sys_ms_per_mb_send": sent["sys_s"] * 1000.0 / mb,
        "floor_sys_ms_per_mb_receive": received["sys_s"] * 1000.0 / mb,
        "floor_resends": sent["resends"],
    }


def main() -> None:
    from .. import runloop

    role, *ports = sys.argv[1:]
    if role == "receive":
        result = runloop.run(_receive(int(ports[0])))
    elif role == "send":
        result = runloop.run(_send(int(ports[0]), int(ports[1])))
    elif role == "measure":
        result = runloop.run(measure(float(ports[0]) if ports else 64.0))
    else:
        raise SystemExit("usage: python -m tether.bench.floor measure [MB] | send | receive")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
