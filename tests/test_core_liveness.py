"""PathClock, the timing of dead-path detection, driven by a simulated path and clock.

No sleeping: a small discrete-event simulation feeds the clock what IcePath would (data
sent, acknowledgements and probe answers heard one round trip later while the path is
up) and polls it when it asks to be polled.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from types import SimpleNamespace

import pytest
from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.cores.ice_path import PathClock, _ice_at_work


class SimPath:
    """A path with a round trip ``rtt`` that is up except during ``outages``
    ((start, end) pairs, end may be inf); ``loss`` drops datagrams at random."""

    def __init__(self, rtt: float, *, outages=(), loss: float = 0.0, seed: int = 1,
                 **clock_settings) -> None:
        self.rtt = rtt
        self.outages = list(outages)
        self.loss = loss
        self.random = random.Random(seed)
        self.clock = PathClock(0.0, **clock_settings)
        self.now = 0.0
        self.queue: list[tuple[float, int, str, float]] = []
        self.order = itertools.count()
        self.outstanding = 0  # data chunks waiting for their acknowledgement
        self.changes: list[tuple[float, bool]] = []  # (time, alive) each time it flips
        self.probes = 0
        self._alive = True
        self.at(0.0, "poll")

    def at(self, when: float, kind: str, value: float = 0.0) -> None:
        heapq.heappush(self.queue, (when, next(self.order), kind, value))

    def up(self, when: float) -> bool:
        return not any(start <= when < end for start, end in self.outages)

    def delivered(self, sent_at: float) -> bool:
        """Both legs of a round trip made it."""
        ok = self.up(sent_at) and self.up(sent_at + self.rtt / 2)
        return ok and self.random.random() >= self.loss and self.random.random() >= self.loss

    def send_data(self, when: float) -> None:
        self.at(when, "send")

    def run(self, until: float) -> None:
        while self.queue and self.queue[0][0] <= until:
            when, _, kind, value = heapq.heappop(self.queue)
            self.now = when
            if kind == "poll":
                verdict = self.clock.poll(when, self.outstanding > 0)
                self._note(verdict.alive)
                if verdict.probe:
                    self.probes += 1
                    if self.delivered(when):
                        self.at(when + self.rtt, "answer", when)
                assert verdict.wake_at > when  # never asks to be polled in a loop
                self.at(max(verdict.wake_at, when + 1e-4), "poll")
            elif kind == "send":
                self.outstanding += 1
                if self.clock.sent(when, True):
                    self.at(when, "poll")
                self._transmit(when)
            elif kind == "retransmit":
                self.clock.sent(when, True)
                self._transmit(when)
            elif kind == "ack":
                self.outstanding -= 1
                self._heard(when)
            elif kind == "answer":
                self._note_revival(self.clock.probe_answered(when, when - value))

    def _transmit(self, when: float) -> None:
        if self.delivered(when):
            self.at(when + self.rtt, "ack")
        else:  # SCTP's retransmission timer: at least 1 s
            self.at(when + max(1.0, 3 * self.rtt), "retransmit")

    def _heard(self, when: float) -> None:
        self._note_revival(self.clock.received(when))

    def _note_revival(self, revived: bool) -> None:
        if revived:
            self._note(True)

    def _note(self, alive: bool) -> None:
        if alive != self._alive:
            self._alive = alive
            self.changes.append((self.now, alive))

    @property
    def deaths(self) -> list[float]:
        return [t for t, alive in self.changes if not alive]


def steady_traffic(path: SimPath, start: float, end: float, every: float) -> None:
    t = start
    while t < end:
        path.send_data(t)
        t += every


def bursty_traffic(path: SimPath, bursts: list[tuple[float, int, float]]) -> None:
    for start, count, every in bursts:
        for i in range(count):
            path.send_data(start + i * every)


# -- a working slow path is never declared dead ----------------------------------------------

@pytest.mark.parametrize("pattern", ["idle", "busy", "bursty"])
def test_a_working_600ms_path_is_never_declared_dead(pattern):
    path = SimPath(0.6)
    if pattern == "busy":
        steady_traffic(path, 0.0, 300.0, 0.01)
    elif pattern == "bursty":
        bursty_traffic(path, [(t, 5, 0.05) for t in range(0, 300, 7)])
    path.run(300.0)
    assert path.deaths == []
    assert path.clock.rtt == pytest.approx(0.6)


def test_a_slow_path_with_loss_is_never_declared_dead():
    """2 % loss per leg, busy and quiet in turns, for ten minutes of simulated time."""
    path = SimPath(0.6, loss=0.02, seed=7)
    bursty_traffic(path, [(t, 200, 0.01) for t in range(0, 600, 20)])
    path.run(600.0)
    assert path.deaths == []


def test_round_trip_that_grows_under_way_is_not_mistaken_for_death():
    """The clock learned 1 ms, then the path slows to 600 ms (a queue fills up)."""
    path = SimPath(0.001)
    steady_traffic(path, 0.0, 10.0, 0.01)
    path.run(10.0)
    path.rtt = 0.6
    steady_traffic(path, 10.0, 60.0, 0.01)
    bursty_traffic(path, [(t, 3, 0.1) for t in range(60, 120, 5)])
    path.run(120.0)
    assert path.deaths == []


@settings(max_examples=30, deadline=None)
@given(
    rtt=st.floats(min_value=0.0005, max_value=0.6),
    bursts=st.lists(
        st.tuples(st.floats(0.0, 100.0), st.integers(1, 150), st.floats(0.001, 0.5)),
        max_size=8,
    ),
)
def test_no_traffic_pattern_makes_a_working_path_look_dead(rtt, bursts):
    path = SimPath(rtt)
    bursty_traffic(path, bursts)
    path.run(130.0)
    assert path.deaths == []


# -- a dead path is reported in time ------------------------------------------------------

@pytest.mark.parametrize("rtt", [0.0005, 0.01, 0.05, 0.1])
def test_a_dead_busy_path_is_reported_within_two_seconds(rtt):
    path = SimPath(rtt, outages=[(20.0, math.inf)])
    steady_traffic(path, 0.0, 40.0, 0.01)
    path.run(40.0)
    assert len(path.deaths) == 1
    detected = path.deaths[0] - 20.0
    print(f"\nbusy path, rtt {rtt * 1000:g} ms: dead after {detected:.2f} s")
    assert 0 < detected <= 2.0


def test_a_dead_busy_slow_path_is_still_reported():
    path = SimPath(0.6, outages=[(30.0, math.inf)])
    steady_traffic(path, 0.0, 50.0, 0.01)
    path.run(50.0)
    detected = path.deaths[0] - 30.0
    print(f"\nbusy path, rtt 600 ms: dead after {detected:.2f} s")
    assert detected <= 4.0


@pytest.mark.parametrize("rtt", [0.001, 0.1, 0.6])
def test_a_dead_idle_path_is_reported_within_about_four_seconds(rtt):
    path = SimPath(rtt, outages=[(20.5, math.inf)])
    path.run(40.0)
    assert len(path.deaths) == 1
    detected = path.deaths[0] - 20.5
    print(f"\nidle path, rtt {rtt * 1000:g} ms: dead after {detected:.2f} s")
    assert 0 < detected <= 4.5


def test_a_path_dead_right_after_it_started_is_reported():
    path = SimPath(0.01, outages=[(0.0, math.inf)])
    steady_traffic(path, 0.0, 10.0, 0.01)
    path.run(10.0)
    assert path.deaths and path.deaths[0] <= 2.5  # no round trip measured yet: wider


# -- verdicts are never skipped (the old == miss-count bug) --------------------------------

def test_every_outage_is_reported_and_every_return_too():
    outages = [(10.0, 15.0), (20.0, 26.0), (40.0, 41.0), (50.0, 60.0)]
    path = SimPath(0.01, outages=outages)
    steady_traffic(path, 0.0, 70.0, 0.01)
    path.run(70.0)
    deaths = path.deaths
    returns = [t for t, alive in path.changes if alive]
    # The 1 s outage is shorter than the busy window: rightly not reported.
    assert len(deaths) == 3 and len(returns) == 3
    for (start, end), died, back in zip([outages[0], outages[1], outages[3]], deaths, returns):
        assert start < died <= start + 2.0
        assert end <= back <= end + 0.25  # the next probe (every 0.2 s while dead) answered


def test_a_path_restarted_while_dead_is_judged_afresh():
    clock = PathClock(0.0)
    assert clock.poll(0.0, busy=False).probe  # round trip measured at once
    clock.probe_answered(0.01, 0.01)
    verdict = clock.poll(10.0, busy=False)
    assert not verdict.alive
    clock.restart(10.5)  # a new generation became current
    assert clock.poll(10.5, busy=False).alive
    assert clock.poll(11.0, busy=True).alive
    dead_at = next(t / 100 for t in range(1100, 2000) if not clock.poll(t / 100, busy=True).alive)
    assert dead_at <= 11.0 + 2.5  # reported again: nothing counts past a threshold


def test_received_after_death_revives_at_once():
    clock = PathClock(0.0)
    clock.poll(0.0, busy=False)
    assert not clock.poll(9.0, busy=False).alive
    assert clock.received(9.2) is True
    assert clock.alive and clock.received(9.3) is False


# -- windows follow the round trip ----------------------------------------------------------

def test_windows_and_probe_timeout_widen_with_the_round_trip():
    fast, slow = PathClock(0.0), PathClock(0.0)
    for i in range(20):
        fast.probe_answered(i, 0.002)
        slow.probe_answered(i, 0.6)
    assert fast.busy_window() == pytest.approx(1.5)
    assert slow.busy_window() > 2.5
    assert fast.probe_timeout() == 1.0 and slow.probe_timeout() >= 1.8
    assert slow.idle_window() > fast.idle_window() >= 3.0


def test_busy_quiet_path_is_probed_soon_and_then_every_round_trip():
    clock = PathClock(0.0)
    clock.poll(0.0, busy=False)
    clock.probe_answered(0.005, 0.005)
    assert clock.sent(0.5, busy=True) is True  # a wait starts: poll now
    assert clock.sent(0.51, busy=True) is False
    verdict = clock.poll(0.5, busy=True)
    assert not verdict.probe and verdict.wake_at == pytest.approx(0.7)
    assert clock.poll(0.7, busy=True).probe
    assert not clock.poll(0.8, busy=True).probe
    assert clock.poll(0.9, busy=True).probe
    assert clock.poll(0.95, busy=False).wake_at == pytest.approx(1.9)  # idle: every interval


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="interval"):
        PathClock(0.0, interval=0)
    with pytest.raises(ValueError, match="busy_silence"):
        PathClock(0.0, busy_silence=-1)


def test_strays_without_the_far_end_mean_a_rebinding_dead_within_a_second():
    """A NAT gave the peer a new port: its packets come from elsewhere, none from the pair,
    and this side has nothing unacknowledged. Dead after the stray window, not the idle one."""
    clock = PathClock(0.0)
    clock.probe_answered(9.0, 0.002)  # a fast path, measured
    clock.received(10.0)
    assert clock.poll(10.0, busy=False).alive
    assert clock.stray(10.1)  # the verdict comes forward: poll now
    assert not clock.stray(10.2)  # one wait, however many strays follow
    assert clock.deadline() == pytest.approx(10.1 + clock.stray_window())
    assert clock.poll(10.3, busy=False).probe  # the old path gets probed at once
    assert clock.poll(10.1 + clock.stray_window() - 0.01, busy=False).alive
    assert not clock.poll(10.1 + clock.stray_window(), busy=False).alive
    assert clock.stray_window() < 1.0 < clock.busy_window() < clock.idle_window()


@pytest.mark.parametrize("rtt", [0.001, 0.1, 0.6])
def test_strays_never_kill_a_working_path_even_a_slow_one(rtt):
    """Strays arrive all along while the far end answers, one round trip late, the probes
    this wait sends: the path stays alive."""
    clock = PathClock(0.0)
    for step in range(10):  # settle the round trip estimate
        clock.probe_answered(step * 1.0, rtt)
    now = 10.0
    pending: list[float] = []
    while now < 40.0:
        while pending and pending[0] <= now:
            clock.probe_answered(pending.pop(0), rtt)
        clock.stray(now)
        verdict = clock.poll(now, busy=False)
        assert verdict.alive, f"declared dead at {now:.2f} s"
        if verdict.probe:
            pending.append(now + rtt)
        now += 0.05


def test_strays_on_a_path_that_still_answers_change_nothing():
    clock = PathClock(0.0)
    for step in range(100):
        now = step * 0.1
        clock.received(now)
        clock.stray(now + 0.05)  # e.g. a late check from another candidate
        assert clock.poll(now + 0.06, busy=False).alive
        assert clock.poll(now + 0.099, busy=False).alive


def test_checks_on_other_pairs_are_ice_at_work_not_strays():
    """What the path's receive hook counts as a stray (the far end of the nominated pair
    is 10.0.0.1:5000; ICE also checks 10.0.0.1:6000, the peer's other uplink)."""
    checked = SimpleNamespace(remote_addr=("10.0.0.1", 6000))
    nominated = SimpleNamespace(remote_addr=("10.0.0.1", 5000))
    gen = SimpleNamespace(_check_list=[nominated, checked])
    request = bytes(stun.Message(message_method=stun.Method.BINDING,
                                 message_class=stun.Class.REQUEST))
    dtls = bytes([23, 0xFE, 0xFD]) + b"\x00" * 20
    assert _ice_at_work(gen, request, ("10.0.0.1", 6000))  # a late check: ICE at work
    assert not _ice_at_work(gen, dtls, ("10.0.0.1", 6000))  # data from there: a stray
    assert not _ice_at_work(gen, request, ("10.0.0.1", 7000))  # a NAT's new port: a stray
    assert not _ice_at_work(gen, b"", ("10.0.0.1", 6000))
