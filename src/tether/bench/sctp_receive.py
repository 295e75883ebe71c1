"""The SCTP receive step per DATA packet, with and without ``receive_in_order``.

The CLI's CPU per MB moves by 20-40 % between runs on a shared machine, more than one
patch on one step of the packet path changes it. This measures that step alone, in one
process, both ways interleaved: an established aiortc association (tether's patches
installed) takes a stream of SCTP packets as they come out of DTLS - 16 KiB messages cut
into aiortc's 1200-byte DATA chunks, in order, as a tunnel's stream arrives - through
``_handle_data``, the loop turning every 8 packets (a receive burst) so that burst SACKs
go out as they do in a tunnel. SACKs are built and counted, not sent. CPU per packet, best and median of the
rounds, each way; the ratio is the figure.

Run: ``python -m tether.bench.sctp_receive [--json]``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

from aiortc.rtcsctptransport import (
    USERDATA_MAX_LENGTH,
    DataChunk,
    RTCSctpTransport,
    SackChunk,
    serialize_packet,
)

from ..cores import aiortc_speed

MESSAGE = 16 * 1024     # one tunnel DATA frame
CHUNK = USERDATA_MAX_LENGTH  # aiortc's cut: 1200 bytes of user data per DATA chunk
FRAGMENTS = -(-MESSAGE // CHUNK)  # 14
BURST = 8               # packets handled per loop turn
ROUNDS = 7
TAG = 0x5E7


def _packets(messages: int) -> list[bytes]:
    packets = []
    tsn = 1
    for seq in range(messages):
        message = bytes([seq % 251]) * MESSAGE
        for i in range(FRAGMENTS):
            chunk = DataChunk(flags=(0x02 if i == 0 else 0) | (0x01 if i == FRAGMENTS - 1 else 0))
            chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn, 1, seq, 53
            chunk.user_data = message[i * CHUNK:(i + 1) * CHUNK]
            packets.append(serialize_packet(5000, 5000, TAG, chunk))
            tsn += 1
    return packets


def _association() -> tuple[RTCSctpTransport, list[int]]:
    """An established association's receiving side; SACKs are counted, not sent."""
    sctp = RTCSctpTransport(SimpleNamespace(state="new"))  # type: ignore[arg-type]
    sctp._association_state = RTCSctpTransport.State.ESTABLISHED
    sctp._local_verification_tag = TAG
    sctp._last_received_tsn = 0
    sctp._srtt = 0.002  # a short path, as on loopback: SACKs cover bursts of up to 4
    sctp._get_inbound_stream(1)  # (made by the channel's open message in a tunnel)
    sacks = [0]

    async def count(chunk: Any) -> None:
        sacks[0] += isinstance(chunk, SackChunk)

    async def deliver(stream_id: int, pp_id: int, data: bytes) -> None:
        pass

    sctp._send_chunk = count  # type: ignore[method-assign]
    sctp._receive = deliver  # type: ignore[method-assign]
    return sctp, sacks


async def _round(packets: list[bytes], in_order: bool) -> tuple[float, int]:
    aiortc_speed._in_order[0] = in_order
    sctp, sacks = _association()
    started = time.process_time()
    for i, data in enumerate(packets):
        await sctp._handle_data(data)
        if i % BURST == BURST - 1:
            await asyncio.sleep(0)  # the loop turn ends: the burst's SACK goes out
    spent = time.process_time() - started
    sctp._set_state(RTCSctpTransport.State.CLOSED)  # (cancels the SACK timer)
    return spent / len(packets) * 1e6, sacks[0]


async def measure(messages: int = 300) -> dict[str, Any]:
    aiortc_speed.install()
    if "receive_in_order" not in aiortc_speed.active_patches():
        raise RuntimeError("receive_in_order is not among the installed patches")
    before = aiortc_speed._in_order[0]
    packets = _packets(messages)
    spent: dict[bool, list[float]] = {False: [], True: []}
    sacks: dict[bool, int] = {}
    try:
        for _ in range(ROUNDS):
            for in_order in (False, True):
                per_packet, sacks[in_order] = await _round(packets, in_order)
                spent[in_order].append(per_packet)
    finally:
        aiortc_speed._in_order[0] = before
    if sacks[False] != sacks[True]:
        raise RuntimeError(f"the two ways sent different SACKs: {sacks}")
    out: dict[str, Any] = {"sctp_rx_packets": len(packets), "sctp_rx_sacks": sacks[True]}
    for in_order, name in ((False, "before"), (True, "in_order")):
        out[f"sctp_rx_us_per_packet_{name}"] = statistics.median(spent[in_order])
        out[f"sctp_rx_us_per_packet_{name}_best"] = min(spent[in_order])
    out["sctp_rx_in_order_vs_before"] = (out["sctp_rx_us_per_packet_in_order"]
                                         / out["sctp_rx_us_per_packet_before"])
    return out


def main() -> None:
    from .. import runloop

    result = runloop.run(measure())
    if "--json" in sys.argv[1:]:
        print(json.dumps(result))
        return
    print(f"{result['sctp_rx_packets']} packets, {result['sctp_rx_sacks']} SACKs, "
          f"median (best) of {ROUNDS} rounds per way:")
    for name in ("before", "in_order"):
        print(f"  {name:9} {result[f'sctp_rx_us_per_packet_{name}']:.2f} "
              f"({result[f'sctp_rx_us_per_packet_{name}_best']:.2f}) us of CPU per packet")
    print(f"  in_order / before: {result['sctp_rx_in_order_vs_before']:.2f}")


if __name__ == "__main__":
    main()
