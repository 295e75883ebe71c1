"""The client reads frames that already wait as one burst: one ack per sender and session for
all of them (never more ack frames than frames), every signal delivered once, in order, and a
control frame never overtakes the signals before it. Real client, real loopback WebSocket; the
relay side is the bench's stand-in (pre-built frames written straight to the socket)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tether.bench.signaling import StandInRelay, server_frame
from tether.signaling import SignalingClient


def frame(seqs: range, session: str = "s", peer: str = "p") -> str:
    return json.dumps([
        {"tube_id": f"t{seq % 3}", "conversation_id": "conv", "kind": "icecandidate",
         "data": f"{session}{seq}", "peer": peer, "session": session, "seq": seq,
         "prev": seq - 1}
        for seq in seqs
    ])


async def eventually(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class Harness:
    def __init__(self) -> None:
        self.relays: list[StandInRelay] = []
        self.events: list[Any] = []
        self.acks: list[dict[str, Any]] = []

    async def __aenter__(self) -> Harness:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.client = SignalingClient(
            f"ws://127.0.0.1:{port}", "token", "conv", self.events.append,
            on_peer=lambda event: self.events.append(("peer", event)), proxy=None)
        await asyncio.wait_for(self.client.start(), 20)
        await asyncio.wait_for(self.relays[0].opened, 20)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.close()
        self.server.close()
        await self.server.wait_closed()

    def _accept(self) -> StandInRelay:
        relay = StandInRelay([])
        relay.on_ack = self.acks.append
        self.relays.append(relay)
        return relay

    def write(self, *texts: str) -> None:
        """All in one socket write: the client finds them waiting together."""
        transport = self.relays[0].transport
        assert transport is not None
        transport.write(b"".join(server_frame(text) for text in texts))

    def data(self) -> list[str]:
        return [e["data"] for e in self.events if isinstance(e, dict)]


async def test_a_burst_is_acknowledged_together_and_delivered_in_order() -> None:
    async with Harness() as h:
        frames = [frame(range(start, start + 10)) for start in range(1, 501, 10)]
        h.write(*frames)
        await eventually(lambda: len(h.data()) == 500)
        await eventually(lambda: sum(len(a["seqs"]) for a in h.acks) == 500)
        assert h.data() == [f"s{seq}" for seq in range(1, 501)]
        assert [seq for a in h.acks for seq in a["seqs"]] == list(range(1, 501))
        assert all(a == {"control": "ack", "to": "p", "session": "s", "seqs": a["seqs"]}
                   for a in h.acks)
        assert len(h.acks) < len(frames)  # coalesced (at most one per frame in any case)


async def test_frames_that_arrive_apart_get_one_ack_each() -> None:
    async with Harness() as h:
        for start in (1, 4, 7):
            h.write(frame(range(start, start + 3)))
            await eventually(lambda start=start: len(h.acks) == (start + 2) // 3)
        assert [a["seqs"] for a in h.acks] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
        assert h.data() == [f"s{seq}" for seq in range(1, 10)]


async def test_two_sessions_in_one_burst_get_one_ack_each_and_duplicates_are_acked() -> None:
    async with Harness() as h:
        h.write(frame(range(1, 4)), frame(range(1, 3), session="z"), frame(range(2, 6)))
        await eventually(lambda: len(h.data()) == 7)
        await eventually(lambda: sum(len(a["seqs"]) for a in h.acks) == 9)
        assert h.data() == ["s1", "s2", "s3", "z1", "z2", "s4", "s5"]
        by_session: dict[str, list[int]] = {}
        for ack in h.acks:
            by_session.setdefault(ack["session"], []).extend(ack["seqs"])
        assert by_session == {"s": [1, 2, 3, 2, 3, 4, 5], "z": [1, 2]}
        assert len(h.acks) <= 3


async def test_a_gap_is_not_acknowledged_and_a_mixed_frame_keeps_its_first_sender() -> None:
    async with Harness() as h:
        mixed = json.loads(frame(range(1, 3)))
        mixed[1]["peer"] = "intruder"
        h.write(frame(range(5, 6)), json.dumps(mixed))  # seq 5 before 4: a gap
        await eventually(lambda: len(h.data()) == 1)
        await eventually(lambda: len(h.acks) == 1)
        assert h.data() == ["s1"] and h.acks[0]["seqs"] == [1]


async def test_a_control_frame_does_not_overtake_the_signals_before_it() -> None:
    async with Harness() as h:
        await eventually(lambda: ("peer", "joined") in h.events)  # the stand-in's "present"
        h.events.clear()
        h.write(frame(range(1, 4)), json.dumps({"control": "peer", "event": "left"}),
                frame(range(4, 6)))
        await eventually(lambda: len(h.events) == 6)
        assert [e if isinstance(e, tuple) else e["data"] for e in h.events] == [
            "s1", "s2", "s3", ("peer", "left"), "s4", "s5"]


async def test_what_a_cancelled_reader_accepted_is_handed_over_after_the_reconnect() -> None:
    """Acknowledged signals are never resent: a reader cancelled while handing over a burst
    (here: on_signal reconnects) leaves the rest to the next connection's reader."""
    async with Harness() as h:
        seen: list[str] = []

        async def on_signal(signal: dict[str, Any]) -> None:
            seen.append(signal["data"])
            if signal["data"] == "s3":
                # The connection drops; the writer finds out first (it has a signal to send)
                # and the reader is cancelled right here.
                h.client.reconnect("test: cancel the reader mid-burst")
                await h.client.send({"tube_id": "t0", "kind": "icecandidate", "data": "x"})
                await asyncio.sleep(30)

        h.client._on_signal = on_signal
        h.write(*[frame(range(start, start + 5)) for start in range(1, 11, 5)])
        await eventually(lambda: len(h.relays) == 2 and seen[-1:] == ["s10"])
        assert seen == [f"s{seq}" for seq in range(1, 11)]
        assert sorted(seq for a in h.acks for seq in a["seqs"]) == list(range(1, 11))


async def test_more_frames_than_one_read_takes_are_all_delivered_in_order() -> None:
    # 300 frames in one write: several recv_batch calls (64 frames each at most) and more
    # signals than one burst holds (MAX_BURST 512), so at least two acks, never one per frame.
    async with Harness() as h:
        frames = [frame(range(start, start + 2)) for start in range(1, 601, 2)]
        h.write(*frames)
        await eventually(lambda: len(h.data()) == 600)
        await eventually(lambda: sum(len(a["seqs"]) for a in h.acks) == 600)
        assert h.data() == [f"s{seq}" for seq in range(1, 601)]
        assert [seq for a in h.acks for seq in a["seqs"]] == list(range(1, 601))
        assert 2 <= len(h.acks) < len(frames) // 10
