"""The pure delivery bookkeeping (outbox, inbox, resend timer), with a fake clock."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.signaling.delivery import DELIVER, DUPLICATE, GAP, Inbox, Outbox, ResendTimer


def add(outbox: Outbox, tube: str = "t") -> int:
    seq = outbox.next_seq
    outbox.add(seq, tube, json.dumps({"tube_id": tube, "seq": seq}))
    return seq


def prevs(unsent: list[tuple[int, str]]) -> list[tuple[int, int]]:
    return [(seq, json.loads(text)["prev"]) for seq, text in unsent]


def test_outbox_numbers_keeps_and_links_each_signal_to_the_previous_kept_one():
    box = Outbox()
    for tube in ("a", "b", "a", "c"):
        add(box, tube)
    assert len(box) == 4 and box.has_unsent and not box.outstanding
    assert prevs(box.unsent()) == [(1, 0), (2, 1), (3, 2), (4, 3)]

    box.mark_sent(4, box.epoch)
    assert box.unsent() == [] and box.outstanding and not box.has_unsent
    assert box.ack([2, 2, 99]) == 1  # unknown and repeated seqs are ignored
    assert box.discard("a") == 2
    assert box.discard("nope") == 0
    box.rewind()
    assert prevs(box.unsent()) == [(4, 0)]  # 1, 2, 3 gone: 4 depends on nothing now

    with pytest.raises(ValueError):
        box.add(9, "t", "{}")  # must be next_seq
    with pytest.raises(ValueError):
        box.add(box.next_seq, "t", "[]")


def test_discard_by_kind():
    box = Outbox()
    for kind in ("offer", "icecandidate", "icecandidate", "answer"):
        box.add(box.next_seq, "t", json.dumps({"kind": kind}), kind)
    box.add(box.next_seq, "u", json.dumps({"kind": "offer"}), "offer")
    assert box.discard("t", {"icecandidate", "answer"}) == 3
    assert box.discard("t", frozenset()) == 0
    assert [seq for seq, _ in box.unsent()] == [1, 5]


def test_a_stale_mark_sent_after_a_rewind_is_ignored():
    box = Outbox()
    add(box), add(box)
    epoch = box.epoch
    box.rewind()  # e.g. the peer joined while the writer was busy
    box.mark_sent(2, epoch)
    assert [seq for seq, _ in box.unsent()] == [1, 2]
    box.mark_sent(1, box.epoch)
    assert [seq for seq, _ in box.unsent()] == [2]


def test_inbox_delivers_in_order_drops_duplicates_and_waits_for_a_missing_predecessor():
    inbox = Inbox()
    assert inbox.classify("p", "s", 1, 0) == DELIVER
    assert inbox.classify("p", "s", 1, 0) == DUPLICATE
    assert inbox.classify("p", "s", 3, 2) == GAP  # 2 is missing
    assert inbox.last("p", "s") == 1
    assert inbox.classify("p", "s", 2, 1) == DELIVER
    assert inbox.classify("p", "s", 3, 2) == DELIVER
    assert inbox.classify("p", "s", 5, 3) == DELIVER  # 4 was discarded by the sender
    assert inbox.classify("p", "other", 7, None) == DELIVER  # no prev: dedup only
    assert inbox.classify("q", "s", 1, 0) == DELIVER  # keys are (peer, session)


def test_inbox_is_bounded():
    inbox = Inbox(limit=2)
    for peer in "abc":
        inbox.classify(peer, "s", 1, 0)
    assert len(inbox) == 2 and inbox.last("a", "s") == 0 and inbox.last("c", "s") == 1


def test_resend_timer_with_a_fake_clock():
    timer = ResendTimer(first=5.0, maximum=12.0)
    assert timer.deadline is None and not timer.due(100.0)
    timer.wrote(10.0)
    timer.wrote(11.0)  # a wait is running: not restarted
    assert timer.deadline == 15.0
    assert not timer.due(14.9) and timer.due(15.0)
    timer.fired(15.0)
    assert timer.deadline == 25.0  # doubled
    timer.fired(25.0)
    assert timer.deadline == 37.0  # capped at 12
    timer.acked(30.0, outstanding=True)
    assert timer.deadline == 35.0  # progress: back to the first wait
    timer.acked(31.0, outstanding=False)
    assert timer.deadline is None
    timer.reset(40.0, outstanding=False)
    timer.wrote(41.0)
    assert timer.deadline == 46.0
    with pytest.raises(ValueError):
        ResendTimer(first=0)


# -- the whole scheme against an adversarial channel -----------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from("abc")),
        st.tuples(st.just("write"), st.just(None)),
        st.tuples(st.just("deliver"), st.integers(1, 5)),
        st.tuples(st.just("lose_one"), st.integers(0, 50)),  # the relay refused one
        st.tuples(st.just("drop_connection"), st.just(None)),  # everything in flight lost
        st.tuples(st.just("rewind"), st.just(None)),  # peer joined / resend timer
        st.tuples(st.just("ack_arrives"), st.integers(1, 5)),
        st.tuples(st.just("discard"), st.sampled_from("abc")),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_exactly_once_in_order_whatever_the_channel_does(ops):
    """Sender outbox + FIFO channel (that may lose single frames or everything in flight,
    and carries acks back FIFO) + receiver inbox: the receiver never delivers a seq twice
    or out of order, every ack is for something delivered, and once the channel behaves,
    every signal not discarded is delivered."""
    box, inbox = Outbox(), Inbox()
    wire: list[str] = []  # sender -> receiver
    acks: list[list[int]] = []  # receiver -> sender
    delivered: list[int] = []
    discarded_undelivered: set[int] = set()
    tubes: dict[int, str] = {}

    def receive(text: str) -> None:
        signal = json.loads(text)
        verdict = inbox.classify("p", "s", signal["seq"], signal["prev"])
        if verdict == DELIVER:
            delivered.append(signal["seq"])
        if verdict != GAP:
            acks.append([signal["seq"]])

    def write() -> None:
        unsent = box.unsent()
        if unsent:
            wire.extend(text for _, text in unsent)
            box.mark_sent(unsent[-1][0], box.epoch)

    for op, arg in ops:
        if op == "send":
            seq = add(box, arg)
            tubes[seq] = arg
        elif op == "write":
            write()
        elif op == "deliver":
            for _ in range(min(arg, len(wire))):
                receive(wire.pop(0))
        elif op == "lose_one" and wire:
            wire.pop(arg % len(wire))
        elif op == "drop_connection":
            wire.clear()
            acks.clear()
            box.rewind()  # a reconnect resends everything kept
        elif op == "rewind":
            box.rewind()
        elif op == "ack_arrives":
            for _ in range(min(arg, len(acks))):
                box.ack(acks.pop(0))
        elif op == "discard":
            for seq, tube in tubes.items():
                if tube == arg and seq not in delivered:
                    discarded_undelivered.add(seq)
            box.discard(arg)

    # From here on the channel is perfect: rewind, deliver everything, carry every ack.
    for _ in range(3):
        box.rewind()
        write()
        while wire:
            receive(wire.pop(0))
        while acks:
            box.ack(acks.pop(0))

    assert delivered == sorted(set(delivered)), "out of order or duplicated"
    assert len(box) == 0, "everything kept was acknowledged in the end"
    expected = [seq for seq in sorted(tubes) if seq not in discarded_undelivered]
    assert [seq for seq in delivered if seq not in discarded_undelivered] == expected


def test_inbox_delivers_a_run_that_follows_on_at_once_and_leaves_any_other_alone():
    inbox = Inbox()
    assert inbox.classify_run("p", "s", 0, [1, 2, 3])
    assert inbox.last("p", "s") == 3
    assert not inbox.classify_run("p", "s", 2, [3, 4])  # 3 was delivered
    assert not inbox.classify_run("p", "s", 4, [5, 6])  # 4 is missing
    assert inbox.last("p", "s") == 3  # refusals change nothing
    assert inbox.classify_run("p", "s", 2, [7])  # 4-6 discarded by the sender: follows on
    assert inbox.last("p", "s") == 7


# -- the client's burst: deciding a frame at once gives what deciding each signal gives ----

_FIELD = st.one_of(st.integers(-1, 9), st.booleans(), st.none(), st.just(2.0), st.just("3"))


@st.composite
def _frame(draw):
    """A frame as a relay (or a hostile one) may send: often a run, sometimes anything."""
    peer = draw(st.sampled_from(["p", "q"]))
    session = draw(st.sampled_from(["s", "t"]))
    if draw(st.booleans()):  # a run: rising seqs, each naming the one before
        prev = draw(st.integers(0, 3))  # often what the inbox delivered last
        frame = []
        for _ in range(draw(st.integers(1, 5))):
            seq = prev + draw(st.integers(0, 2))  # 0: the same seq again
            frame.append({"peer": peer, "session": session, "seq": seq, "prev": prev})
            prev = seq
        if draw(st.booleans()):  # then spoil one field of one signal
            victim = draw(st.sampled_from(frame))
            key = draw(st.sampled_from(["peer", "session", "seq", "prev"]))
            victim[key] = draw(st.one_of(_FIELD, st.sampled_from(["p", "q", "s", "t"])))
        return frame
    frame = []
    for _ in range(draw(st.integers(1, 5))):
        signal = {}
        for key, values in (("peer", st.sampled_from(["p", "q", 1])),
                            ("session", st.sampled_from(["s", "t"])),
                            ("seq", _FIELD), ("prev", _FIELD)):
            if draw(st.integers(0, 5)):
                signal[key] = draw(values)
        frame.append(signal)
    return frame


def _each_on_its_own(history, frames):
    """What the client did before frames were decided at once: every signal on its own."""
    inbox = Inbox()
    for peer, session, seq in history:
        inbox.classify(peer, session, seq, None)
    acks, delivered = {}, []
    for frame in frames:
        key = None
        for signal in frame:
            peer, session, seq = signal.get("peer"), signal.get("session"), signal.get("seq")
            if type(peer) is str and type(session) is str and type(seq) is int and seq >= 0:
                if key is None:
                    key = (peer, session)
                    acks.setdefault(key, [])
                elif key != (peer, session):
                    continue
                prev = signal.get("prev")
                prev = prev if type(prev) is int and prev >= 0 else None
                verdict = inbox.classify(peer, session, seq, prev)
                if verdict == GAP:
                    continue
                acks[key].append(seq)
                if verdict == DUPLICATE:
                    continue
            delivered.append(signal)
    return [(key, seqs) for key, seqs in acks.items() if seqs], delivered


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p", "q"]), st.sampled_from(["s", "t"]),
                          st.integers(1, 3)), max_size=4),
       st.lists(_frame(), min_size=1, max_size=5))
def test_a_burst_is_accepted_and_acknowledged_as_if_each_signal_were_decided_alone(
        history, frames):
    from tether.signaling import SignalingClient

    delivered = []
    client = SignalingClient("ws://127.0.0.1:1/", "token", "conv", delivered.append)
    for peer, session, seq in history:
        client._inbox.classify(peer, session, seq, None)

    class Socket:
        def __init__(self):
            self.acks = []

        async def send(self, text):
            ack = json.loads(text)
            self.acks.append(((ack["to"], ack["session"]), ack["seqs"]))

    socket = Socket()
    flush = client._flush(socket, [list(frame) for frame in frames])
    with pytest.raises(StopIteration):  # nothing in it waits: the socket takes every ack
        flush.send(None)
    assert (socket.acks, delivered) == _each_on_its_own(history, frames)
