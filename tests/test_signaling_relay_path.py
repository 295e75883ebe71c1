"""The relay's per-frame path (issue 9): one-signal frames pass through as they arrived,
anything the fast path does not take gets the full path's answers, and what is queued in
one event-loop turn leaves in one socket write (no task woken per frame)."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket

import pytest
from websockets.asyncio.client import ClientConnection

from tether.signaling import SignalingServer
from tether.signaling import server as server_module

from .test_signaling_liveness import TOKEN, raw_join


async def join(relay: SignalingServer, peer: str, rcvbuf: int | None = None) -> ClientConnection:
    """A bare websockets peer of conversation "conv" (raw_join), past the relay's first
    presence message; ``rcvbuf`` shrinks its socket's receive buffer."""
    ws = await raw_join(relay, peer, rcvbuf=rcvbuf)
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["control"] == "peer"
    return ws


async def recv_text(ws: ClientConnection) -> str:
    message = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(message, str)
    return message


def signal_text(n: int, **extra) -> str:
    """Signal number ``n`` of sender a (session s, seq n); ``extra`` adds or overrides."""
    signal = {"tube_id": "t", "conversation_id": "conv", "kind": "icecandidate",
              "data": f"candidate:{n}", "peer": "a", "session": "s", "seq": n,
              "prev": n - 1, **extra}
    return json.dumps(signal, separators=(",", ":"))


@pytest.fixture
async def pair():
    async with SignalingServer(port=0, token=TOKEN, ping_interval=None) as relay:
        a = await join(relay, "a")
        b = await join(relay, "b")
        assert json.loads(await recv_text(a)) == {"control": "peer", "event": "joined"}
        yield relay, a, b
        await a.close()
        await b.close()


async def test_a_plain_signal_arrives_byte_for_byte_and_odd_ones_are_answered(pair):
    relay, a, b = pair
    # spacing and key order of the sender's own: relayed exactly as sent
    odd_spacing = signal_text(1).replace(",", ", ").replace('{"tube_id"', '{ "tube_id"')
    await a.send(odd_spacing)
    assert await recv_text(b) == odd_spacing
    # a frame the relay re-encodes (it fills in the conversation): a number beyond 64 bits
    # in an extra field keeps its integer value (orjson alone would make it a float)
    big = 123456789012345678901234567890
    await a.send(signal_text(2, conversation_id="", extra=big))
    relayed = json.loads(await recv_text(b))
    assert relayed["extra"] == big and relayed["conversation_id"] == "conv"
    # a signal speaking for another peer: not the fast path; peer overwritten, relayed
    await a.send(signal_text(3).replace('"peer":"a"', '"peer":"mallory"'))
    assert json.loads(await recv_text(b))["peer"] == "a"
    # bad transport fields: the full path's errors (and "rejected" where the seq is
    # usable), nothing relayed
    for bad, words, notice in (
        (signal_text(4, seq=-1), "'seq' must be an integer >= 0", False),
        (signal_text(5, seq=True), "'seq' must be an integer >= 0", False),
        (signal_text(6, session=7), "'session' must be a string", False),
        (signal_text(7, kind="bogus"), "unknown kind", True),
        (f"[{signal_text(8, control='x')}]", "item 0: the key 'control' is reserved", True),
    ):
        await a.send(bad)
        reply = json.loads(await recv_text(a))
        assert reply["kind"] == "error" and words in reply["data"], (bad, reply)
        if notice:
            assert json.loads(await recv_text(a)) == {
                "control": "rejected", "session": "s", "seqs": [json.loads(bad.strip("[]"))["seq"]],
                "retry": False}
    # lone surrogate escapes and NaN are still JSON the relay takes, as before orjson
    odd = signal_text(9, note="\ud800", x=float("nan"))
    assert "\\ud800" in odd and "NaN" in odd
    await a.send(odd)
    assert await recv_text(b) == odd
    await a.send(signal_text(10))
    assert json.loads(await recv_text(b))["seq"] == 10
    assert relay.metrics.signals == 5


async def test_frames_queued_in_one_turn_leave_in_one_write(pair, monkeypatch):
    relay, a, b = pair
    batches: list[int] = []
    write_batch = server_module._Endpoint._write_batch

    def counting(self) -> bool:
        queued = len(self._queue) if self._queue else 0
        wrote = write_batch(self)
        if wrote:
            batches.append(queued)
        return wrote

    monkeypatch.setattr(server_module._Endpoint, "_write_batch", counting)
    frames = [signal_text(seq) for seq in range(1, 101)]
    # 100 one-signal frames in one TCP write: the relay reads them in one turn or a few
    for text in frames:
        a.protocol.send_text(text.encode())
    a.send_data()
    got = [await recv_text(b) for _ in frames]
    assert got == frames
    print(f"\n[relay path] 100 frames left in {len(batches)} socket write(s): {batches}")
    assert sum(min(n, 100) for n in batches) >= 100
    assert len(batches) < 50  # one write per frame would be 100
    # the idle endpoint keeps no queue, callback or task afterwards
    endpoint = relay.table._conversations["conv"].peers["b"]
    await asyncio.sleep(0)
    assert endpoint._queue is None and endpoint._flush_handle is None
    assert endpoint._writer is None


async def test_a_receiver_that_reads_slowly_gets_everything_in_order_via_the_writer_task():
    """Past write_limit the flush hands over to a writer task that waits for the socket
    to drain; the frames queued meanwhile follow in order, and nothing is left behind."""
    async with SignalingServer(port=0, token=TOKEN, ping_interval=None, write_limit=4096,
                               send_timeout=30) as relay:
        for sock in relay._server.sockets:  # small kernel buffers: the writer must wait
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a = await join(relay, "a")
        b = await join(relay, "b", rcvbuf=4096)
        assert json.loads(await recv_text(a)) == {"control": "peer", "event": "joined"}
        endpoint = relay.table._conversations["conv"].peers["b"]
        b.transport.pause_reading()
        # random (incompressible: the bare peers negotiate permessage-deflate), ~200 KB
        frames = [signal_text(n, pad=secrets.token_hex(750)) for n in range(1, 121)]
        for start in range(0, len(frames), 10):
            for text in frames[start:start + 10]:
                a.protocol.send_text(text.encode())
            a.send_data()
            await asyncio.sleep(0.01)
        await asyncio.wait_for(_until(lambda: endpoint._writer is not None), 10)
        b.transport.resume_reading()
        got = [await recv_text(b) for _ in frames]
        assert got == frames
        await asyncio.wait_for(_until(lambda: endpoint._writer is None), 10)
        assert not endpoint.gone and endpoint._queue is None
        await a.close()
        await b.close()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)
