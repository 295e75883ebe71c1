"""Sealed signals: round trips, every kind of tampering, replay and clock checks, a real
aiortc SDP, a real relay in between, property tests and a micro-benchmark (run with -s)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import string
import time

import pytest
from aiortc import RTCPeerConnection
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import sealing
from tether.sealing import (
    MALFORMED,
    REPLAYED,
    SAME_ROLE,
    STALE,
    UNAUTHENTIC,
    UNSEALED,
    VERSION,
    VERSION_UNKNOWN,
    SealError,
    Sealer,
    conversation_id,
    new_secret,
)
from tether.signaling import SignalingClient, SignalingServer
from tether.signals import KINDS, make_signal, parse_frame, validate_signal

SECRET = "correct horse battery staple 42"
NAME = "db-prod"
TOKEN = "relay-token"


class Clock:
    """An injected wall clock."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pair(secret: str = SECRET, name: str = NAME, clock=time.time, **kw) -> tuple[Sealer, Sealer]:
    return (
        Sealer(secret, name, "connect", clock=clock, **kw),
        Sealer(secret, name, "expose", clock=clock, **kw),
    )


def sig(data: str = "candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host", **kw) -> dict:
    return make_signal("tube-1", "", kw.pop("kind", "icecandidate"), data, **kw)


def refused(sealer: Sealer, wire, reason: str) -> SealError:
    with pytest.raises(SealError) as info:
        sealer.open(wire)
    assert info.value.reason == reason, str(info.value)
    return info.value


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_every_kind_both_directions(kind):
    connect, expose = pair()
    for sender, receiver in ((connect, expose), (expose, connect)):
        signal = make_signal("tube-7", "whatever", kind, f"payload of {kind}", mid="0", n=3)
        wire = sender.seal(signal)
        assert validate_signal(wire) is wire
        assert parse_frame(json.dumps(wire)) == ([wire], [])
        assert wire["tube_id"] == "tube-7" and wire["kind"] == kind and wire["sealed"] == VERSION == 2
        assert wire["conversation_id"] == sender.conversation_id
        assert "mid" not in wire and "n" not in wire and f"payload of {kind}" not in json.dumps(wire)
        assert receiver.open(wire) == signal


def test_transport_keys_pass_through_unsealed():
    connect, expose = pair()
    wire = connect.seal(sig(peer="p-old", seq=99))
    assert wire["peer"] == "p-old" and wire["seq"] == 99
    wire.update(peer="p1", session="s1", seq=5, prev=4)  # what client and relay stamp
    opened = expose.open(wire)
    assert (opened["peer"], opened["session"], opened["seq"], opened["prev"]) == ("p1", "s1", 5, 4)
    assert opened["data"] == sig()["data"]


def test_any_text_round_trips_even_lone_surrogates():
    connect, expose = pair()
    odd = json.loads('"sdp \\ud800 \\u00e9 \\u2603 \\r\\n \\u0000"')
    signal = sig(odd, note=odd)
    assert expose.open(json.loads(json.dumps(connect.seal(signal)))) == signal


def test_bad_input_to_seal_is_refused_and_loses_nothing():
    connect, expose = pair()
    for bad in (
        None,
        "text",
        {"kind": "offer", "data": ""},
        {**sig(), "kind": "nope"},
        {**sig(), "data": 3},
        {**sig(), "x": float("nan")},
        {**sig(), "x": object()},
        {**sig(), 7: "int key"},
        {**sig(), "tube_id": "t" * 2000},
        sig("x" * (300 * 1024)),
    ):
        with pytest.raises(SealError) as info:
            connect.seal(bad)
        assert info.value.reason == sealing.INPUT
    assert expose.open(connect.seal(sig("after"))) == sig("after")


def test_constructor_refuses_bad_arguments():
    for args in (("short", NAME, "connect"), (SECRET, "", "connect"), (SECRET, NAME, "relay")):
        with pytest.raises(SealError):
            Sealer(*args)
    with pytest.raises(SealError, match="too short") as info:
        Sealer("hunter2hunter2", NAME, "expose")
    assert "hunter2" not in str(info.value)


# -- who can open what ------------------------------------------------------------------------


def test_reflection_to_the_sender_is_refused():
    connect, expose = pair()
    connect2, expose2 = pair()
    # Same role, same secret and name: refused, and said apart from a wrong secret.
    refused(connect2, connect.seal(sig()), SAME_ROLE)
    refused(expose2, expose.seal(sig()), SAME_ROLE)
    refused(connect, connect.seal(sig()), SAME_ROLE)  # our own signal, sent back


def test_wrong_secret_and_other_tunnel_are_refused():
    connect = Sealer(SECRET, NAME, "connect")
    for receiver in (
        Sealer(SECRET + "!", NAME, "expose"),
        Sealer(SECRET, NAME + "-2", "expose"),
    ):
        wire = connect.seal(sig())
        error = refused(receiver, wire, UNAUTHENTIC)
        assert "wrong secret or changed in transit" in str(error)
        assert SECRET not in str(error) and NAME not in str(error)
        # Even when the relay rewrites the conversation id to match, the key does not.
        refused(receiver, {**wire, "conversation_id": receiver.conversation_id}, UNAUTHENTIC)


def test_every_field_change_is_refused_and_the_original_still_opens():
    connect, expose = pair()
    wire = connect.seal(sig(kind="offer"))
    refused(expose, {**wire, "tube_id": "tube-2"}, UNAUTHENTIC)
    refused(expose, {**wire, "kind": "answer"}, UNAUTHENTIC)
    refused(expose, {**wire, "conversation_id": "t2-other"}, UNAUTHENTIC)
    refused(expose, {**wire, "conversation_id": NAME}, UNAUTHENTIC)
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/="
    data = wire["data"]
    for i, char in enumerate(data):  # every character changed (base64 text)
        other = alphabet[(alphabet.index(char) + 1) % len(alphabet)]
        with pytest.raises(SealError):
            expose.open({**wire, "data": data[:i] + other + data[i + 1 :]})
    blob = base64.b64decode(data, validate=True)
    for i in range(len(blob)):  # every byte, two bit flips each
        for bit in (0x01, 0x80):
            flipped = blob[:i] + bytes([blob[i] ^ bit]) + blob[i + 1 :]
            text = base64.b64encode(flipped).decode()
            reason = VERSION_UNKNOWN if i == 0 else UNAUTHENTIC
            refused(expose, {**wire, "data": text}, reason)
    refused(expose, {**wire, "data": data[:-1]}, MALFORMED)
    for junk in ("    ", "\n\n\n\n", "!!!!", "====", "QQ=="):  # stray text a lenient decoder skips
        refused(expose, {**wire, "data": data[:8] + junk + data[8:]}, MALFORMED)
        refused(expose, {**wire, "data": data + junk}, MALFORMED)
    with pytest.raises(SealError):
        expose.open({**wire, "data": data + "A"})
    assert expose.open(wire) == sig(kind="offer")  # nothing above consumed or broke it


def test_cut_and_paste_between_signals_is_refused():
    connect, expose = pair()
    offer = connect.seal(make_signal("tube-a", "", "offer", "v=0 a"))
    candidate = connect.seal(make_signal("tube-b", "", "icecandidate", "cand b"))
    refused(expose, {**candidate, "data": offer["data"]}, UNAUTHENTIC)
    refused(expose, {**offer, "tube_id": "tube-b"}, UNAUTHENTIC)


def test_unsealed_malformed_and_unknown_versions_have_clear_errors():
    connect, expose = pair()
    wire = connect.seal(sig())
    assert "unsealed signal" in str(refused(expose, sig(), UNSEALED))
    refused(expose, {**wire, "sealed": 1}, VERSION_UNKNOWN)  # ChaCha20-Poly1305, retired
    refused(expose, {**wire, "sealed": 3}, VERSION_UNKNOWN)
    refused(expose, {**wire, "sealed": True}, VERSION_UNKNOWN)
    refused(expose, {**wire, "sealed": "1"}, VERSION_UNKNOWN)
    refused(expose, [wire], MALFORMED)
    refused(expose, {**wire, "data": "!!!!"}, MALFORMED)
    refused(expose, {**wire, "data": "AAAA"}, MALFORMED)  # too short
    refused(expose, {**wire, "data": None}, MALFORMED)
    refused(expose, {**wire, "kind": "nope"}, MALFORMED)
    refused(expose, {**wire, "tube_id": ""}, MALFORMED)
    started = time.perf_counter()
    error = refused(expose, {**wire, "data": "A" * (50 * 1024 * 1024)}, MALFORMED)
    assert time.perf_counter() - started < 0.5  # refused by length, not decoded
    assert "larger than" in str(error)
    assert expose.open(wire) == sig()


# -- replay and time --------------------------------------------------------------------------


def test_replay_and_reordering_are_refused():
    connect, expose = pair()
    first, second = connect.seal(sig("1")), connect.seal(sig("2"))
    assert expose.open(first)["data"] == "1"
    assert "replayed" in str(refused(expose, first, REPLAYED))
    assert expose.open(second)["data"] == "2"
    refused(expose, first, REPLAYED)
    refused(expose, second, REPLAYED)
    # a restarted sender is a new session and is accepted
    connect_again = Sealer(SECRET, NAME, "connect")
    assert expose.open(connect_again.seal(sig("3")))["data"] == "3"


def test_old_and_future_timestamps_are_refused():
    clock = Clock()
    connect, expose = pair(clock=clock, max_age=600)
    wire = connect.seal(sig())
    clock.now += 601
    assert "too old" in str(refused(expose, wire, STALE))
    fresh = connect.seal(sig("fresh"))
    clock.now -= 601  # the receiver's clock is 601 s behind the sender's
    assert "future" in str(refused(expose, fresh, STALE))
    clock.now += 1  # 600 s skew is still accepted
    assert expose.open(fresh)["data"] == "fresh"


def test_replay_of_an_old_session_to_a_fresh_peer_is_refused():
    clock = Clock()
    connect = Sealer(SECRET, NAME, "connect", clock=clock)
    recorded = [connect.seal(sig(str(i))) for i in range(3)]
    assert [Sealer(SECRET, NAME, "expose", clock=clock).open(w)["data"] for w in recorded] == [
        "0", "1", "2"
    ]
    clock.now += 3600
    restarted = Sealer(SECRET, NAME, "expose", clock=clock)
    for wire in recorded:
        refused(restarted, wire, STALE)


def test_forgotten_sessions_cannot_be_replayed():
    clock = Clock()
    expose = Sealer(SECRET, NAME, "expose", clock=clock, max_sessions=2)
    senders = [Sealer(SECRET, NAME, "connect", clock=clock) for _ in range(3)]
    first_wires = []
    for sender in senders:
        clock.now += 1
        first_wires.append(sender.seal(sig()))
        expose.open(first_wires[-1])
    assert len(expose._seen) == 2  # senders[0] was forgotten (least recently used)
    refused(expose, first_wires[0], REPLAYED)
    refused(expose, first_wires[2], REPLAYED)
    clock.now += 1
    assert expose.open(senders[0].seal(sig("later")))["data"] == "later"  # live again
    assert expose.open(Sealer(SECRET, NAME, "connect", clock=clock).seal(sig("new")))


# -- the relay cannot see or swap the DTLS fingerprint ---------------------------------------


async def test_relay_cannot_see_or_swap_the_dtls_fingerprint():
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("tether")
        offer = await pc.createOffer()
    finally:
        await pc.close()
    sdp = offer.sdp
    fingerprints = re.findall(r"^a=fingerprint:\S+ (\S+)\r?$", sdp, re.M)
    assert fingerprints
    connect, expose = pair()
    wire = connect.seal(make_signal("tube-1", "", "offer", sdp))
    text = json.dumps(wire)
    for secret_part in [*fingerprints, "fingerprint", "ice-pwd", "v=0", NAME, SECRET]:
        assert secret_part not in text
    # The relay forges its own offer with its fingerprint: refused as unsealed.
    forged = sdp.replace(fingerprints[0], "AA:" * 31 + "AA")
    refused(expose, {**wire, "data": forged, "sealed": 0}, VERSION_UNKNOWN)
    refused(expose, {**make_signal("tube-1", wire["conversation_id"], "offer", forged)}, UNSEALED)
    # ...or seals it under a secret of its own: refused as unauthentic.
    attacker = Sealer(new_secret(), NAME, "connect")
    sealed_by_attacker = attacker.seal(make_signal("tube-1", "", "offer", forged))
    refused(expose, {**sealed_by_attacker, "conversation_id": wire["conversation_id"]}, UNAUTHENTIC)
    assert expose.open(wire)["data"] == sdp


async def test_sealed_signals_cross_a_real_relay_and_open():
    server = SignalingServer(port=0, token=TOKEN)
    await server.start()
    connect, expose = pair()
    received: list[dict] = []
    arrived = asyncio.Event()

    def on_signal(signal: dict) -> None:
        received.append(signal)
        arrived.set()

    a = SignalingClient(server.url, TOKEN, connect.conversation_id, lambda s: None)
    b = SignalingClient(server.url, TOKEN, expose.conversation_id, on_signal)
    try:
        await asyncio.wait_for(asyncio.gather(a.start(), b.start()), 5)
        signals = [make_signal(f"tube-{i}", "", "icecandidate", f"cand {i}", i=i) for i in range(5)]
        await a.send([connect.seal(s) for s in signals])
        async with asyncio.timeout(5):
            while len(received) < len(signals):
                arrived.clear()
                await arrived.wait()
        opened = [expose.open(w) for w in received]
        for original, got in zip(signals, opened):
            assert {k: v for k, v in got.items() if k not in sealing.TRANSPORT_KEYS} == original
            assert got["peer"] == a.peer_id
    finally:
        await a.close()
        await b.close()
        await server.close()


# -- conversation ids and secrets -------------------------------------------------------------


def test_conversation_ids_are_stable_private_and_distinct():
    cid = conversation_id(SECRET, NAME)
    assert cid == conversation_id(SECRET, NAME) == Sealer(SECRET, NAME, "expose").conversation_id
    assert len(cid) <= 64 and cid.isprintable() and NAME not in cid
    others = {
        conversation_id(SECRET + "x", NAME),
        conversation_id(SECRET, NAME + "x"),
        conversation_id(new_secret(), NAME),
        conversation_id(SECRET, "db-pro"),
    }
    assert cid not in others and len(others) == 4


def test_new_secret_is_strong_url_safe_text():
    values = {new_secret() for _ in range(50)}
    assert len(values) == 50
    for value in values:
        assert len(value) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", value)
        Sealer(value, NAME, "connect")


# -- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_PROPERTY_PAIR = pair()
_TEMPLATE = Sealer(SECRET, NAME, "connect").seal(sig())


def _splice(data: str, at: int, length: int, insert: str) -> str:
    at %= len(data) + 1
    return data[:at] + insert + data[at + length :]


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        json_values,
        st.dictionaries(
            st.sampled_from(["tube_id", "kind", "conversation_id", "data", "sealed", "peer"]),
            json_values,
        ),
        st.builds(
            lambda key, value: {**_TEMPLATE, key: value},
            st.sampled_from(sorted(_TEMPLATE)),
            json_values,
        ),
        st.builds(
            lambda at, length, insert: {**_TEMPLATE, "data": _splice(_TEMPLATE["data"], at, length, insert)},
            st.integers(0, 200),
            st.integers(0, 3),
            st.text(alphabet=string.ascii_letters + string.digits + "+/=-_ \n\u00e9", max_size=4),
        ),
    )
)
def test_open_of_anything_raises_only_seal_error(wire):
    try:
        opened = _PROPERTY_PAIR[1].open(wire)
    except SealError:
        return
    # Only the untouched template may ever open (and then only once: it was never opened).
    assert wire == _TEMPLATE and opened == sig()


extra_keys = st.text(min_size=1).filter(
    lambda k: k not in ("tube_id", "kind", "conversation_id", "data") and k not in sealing.TRANSPORT_KEYS
)


@settings(max_examples=200, deadline=None)
@given(
    tube_id=st.text(min_size=1, max_size=40),
    kind=st.sampled_from(sorted(KINDS)),
    conversation=st.text(max_size=20),
    data=st.text(),
    extra=st.dictionaries(extra_keys, json_values, max_size=5),
)
def test_seal_open_round_trip_of_arbitrary_signals(tube_id, kind, conversation, data, extra):
    connect, expose = _PROPERTY_PAIR
    signal = make_signal(tube_id, conversation, kind, data, **extra)
    wire = expose.seal(signal)
    assert validate_signal(wire) is wire
    assert connect.open(json.loads(json.dumps(wire))) == signal


# -- speed ------------------------------------------------------------------------------------


def test_micro_benchmark_seal_and_open_of_a_4kb_signal():
    """Best of 7 batches (the CPU is shared, so the best batch is the honest figure)."""
    connect, expose = pair()
    signal = make_signal("tube-1", "", "offer", "a=candidate:x\r\n" * 273)  # ~4 KB
    assert 4000 <= len(signal["data"]) <= 4200
    rounds, seal_times, open_times = 500, [], []
    for _ in range(7):
        started = time.perf_counter()
        wires = [connect.seal(signal) for _ in range(rounds)]
        sealed = time.perf_counter()
        opened = [expose.open(wire) for wire in wires]
        seal_times.append((sealed - started) / rounds * 1e6)
        open_times.append((time.perf_counter() - sealed) / rounds * 1e6)
        assert opened[-1] == signal
    seal_us, open_us = min(seal_times), min(open_times)
    print(
        f"\nseal {seal_us:.1f} us + open {open_us:.1f} us = {seal_us + open_us:.1f} us per 4 KB "
        f"signal (best of 7 x {rounds}; medians {sorted(seal_times)[3]:.1f} + "
        f"{sorted(open_times)[3]:.1f} us); wire {len(json.dumps(wires[0]))} bytes for "
        f"{len(json.dumps(signal))}"
    )
    assert seal_us + open_us < 5000  # a sanity bound only; the figure is printed


# -- a known answer (version 2), shared with src/tether/web/tether-peer.js ---------------------


def test_known_answer_matches_webcrypto():
    """Fixed inputs, the bytes WebCrypto (tether-peer.js) produced for them: the derivation,
    the header, the associated data and AES-256-GCM must never drift from the page's."""
    expected_cid = "t2-y3UEVCYJA_-Qd8oUIidzxMBqwnknSgEzRFOWhS0xnXI"
    expected_blob = (
        "AgABAgMEBQYHCAkKCwwNDg8AAAAAAAAAAQAGCiQYHkAAZGVmZ2hpamtsbW5vSrcto99t6Qrgmi9vNKs97L2X"
        "g7YQ7P9CxP0QeXHTzP0D3dlPVoyx3HdHs/I+oNjrRDfMDakWIr1F7JY0QWcdaSgr0MTH"
    )
    sealer = Sealer(SECRET, NAME, "connect")
    assert sealer.conversation_id == conversation_id(SECRET, NAME) == expected_cid
    signal = make_signal("tube-1", NAME, "offer", "v=0\r\n", restart_id=3)
    session, nonce, stamp = bytes(range(16)), bytes(range(100, 112)), 1_700_000_000_000_000
    header = sealing._HEADER.pack(VERSION, session, 1, stamp)
    meta = json.dumps({"conversation_id": NAME, "restart_id": 3}, separators=(",", ":")).encode()
    plaintext = sealing._META_LEN.pack(len(meta)) + meta + b"v=0\r\n"
    ciphertext = sealer._seal_key.encrypt(nonce, plaintext, sealer._ad(header, "tube-1", "offer"))
    assert base64.b64encode(header + nonce + ciphertext).decode() == expected_blob
    expose = Sealer(SECRET, NAME, "expose", clock=lambda: stamp / 1e6)
    wire = {"tube_id": "tube-1", "kind": "offer", "conversation_id": expected_cid,
            "data": expected_blob, "sealed": 2}
    assert expose.open(wire) == signal


def test_extra_keys_open_right_in_any_order_and_are_never_shared():
    """open() reuses the last parsed extra keys when they repeat (scalars only)."""
    connect, expose = pair()
    sent = [sig("a", restart_id=1), sig("b", restart_id=1), sig("c", restart_id=2),
            sig("d", note={"n": [1]}), sig("e", note={"n": [1]}), sig("f"), sig("g", restart_id=2)]
    opened = [expose.open(connect.seal(s)) for s in sent]
    assert [{k: v for k, v in o.items() if k != "conversation_id"} for o in opened] == [
        {k: v for k, v in s.items() if k != "conversation_id"} for s in sent]
    opened[0]["restart_id"] = 99
    opened[3]["note"]["n"].append(2)
    again = [expose.open(connect.seal(s)) for s in (sig("h", restart_id=1),
                                                     sig("i", note={"n": [1]}))]
    assert again[0]["restart_id"] == 1 and opened[1]["restart_id"] == 1
    assert again[1]["note"] == {"n": [1]} and opened[4]["note"] == {"n": [1]}
