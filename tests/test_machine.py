"""The pure state machine: every timing rule, driven by clock values, never by sleeping."""

from __future__ import annotations

import pytest

from tether.machine import (
    AnswerOffer,
    ApplyAnswer,
    CancelRestart,
    ConnectionMachine,
    ConnectionState,
    ICERestartPolicy,
    NetworkChangeType,
    ReadStats,
    SendKeepalive,
    SetState,
    StartRestart,
)

S = ConnectionState
IP = NetworkChangeType.IP_ADDRESS_CHANGE
# A change whose cause is not known: it restarts under the backoff rules.
BLIND = NetworkChangeType.ICE_FAILURE


def connected(now: float = 0.0, *, initiator: bool = True, **policy) -> ConnectionMachine:
    """A machine whose tube just connected, with a byte-counter baseline of (0, 0)."""
    machine = ConnectionMachine("t1", now, initiator=initiator, policy=ICERestartPolicy(**policy))
    actions = machine.core_state_changed("connected", now)
    assert actions == [SetState(S.INITIALIZING, S.CONNECTED), ReadStats()]
    assert machine.stats_read(now, (0, 0)) == []
    return machine


def of(kind, actions):
    return [a for a in actions if isinstance(a, kind)]


def started(actions) -> int:
    """The seq of the one StartRestart in ``actions``."""
    (start,) = of(StartRestart, actions)
    return start.seq


def complete(machine: ConnectionMachine, seq: int, now: float) -> list:
    """Run attempt ``seq`` to success: offer out, answer in and applied, core connected."""
    assert machine.offer_sent(seq, now) == []
    assert machine.answer_received("ANSWER", now) == [ApplyAnswer(seq, "ANSWER")]
    assert machine.answer_applied(seq, now) == []
    return machine.core_state_changed("connected", now)


def run_until_start(machine: ConnectionMachine, limit: float = 10_000.0) -> tuple[float, int]:
    """Advance to each deadline in turn until an attempt starts; return (time, seq)."""
    while (when := machine.deadline) is not None and when <= limit:
        starts = of(StartRestart, machine.timer(when))
        if starts:
            return when, starts[0].seq
    raise AssertionError("no restart started")


# -- states -----------------------------------------------------------------------------


def test_initial_states_and_callbacks_actions():
    machine = ConnectionMachine("t1", 0.0)
    assert machine.state is S.INITIALIZING
    assert machine.core_state_changed("new", 0.1) == []
    assert machine.core_state_changed("connecting", 0.2) == [SetState(S.INITIALIZING, S.CONNECTING)]
    assert machine.core_state_changed("checking", 0.3) == []
    actions = machine.core_state_changed("connected", 0.4)
    assert of(SetState, actions) == [SetState(S.CONNECTING, S.CONNECTED)]
    assert machine.core_state_changed("connected", 0.5) == []  # no change, no action
    assert machine.metrics.state_changes == 2


def test_initial_answer_means_connecting():
    machine = ConnectionMachine("t1", 0.0)
    assert machine.initial_answer(1.0) == [SetState(S.INITIALIZING, S.CONNECTING)]
    assert machine.initial_answer(1.0) == []


def test_failure_before_connecting_is_final_and_no_restart_is_tried():
    machine = ConnectionMachine("t1", 0.0)
    assert machine.network_change(IP, 1.0) == []  # nothing to restart yet
    assert machine.core_state_changed("failed", 2.0) == [SetState(S.INITIALIZING, S.FAILED)]
    assert machine.metrics.restarts_started == 0


def test_closed_and_channel_closed_mean_failed():
    machine = connected()
    assert machine.core_state_changed("closed", 5.0) == [SetState(S.CONNECTED, S.FAILED)]
    other = connected()
    seq = started(other.network_change(IP, 1.0))
    actions = other.channel_closed(2.0, "tunnel channel closed")
    assert actions == [CancelRestart(seq), SetState(S.RECONNECTING, S.FAILED)]
    assert other.deadline is None


def test_shutdown_is_final_and_once():
    machine = connected()
    seq = started(machine.network_change(IP, 1.0))
    assert machine.shutdown(2.0) == [CancelRestart(seq), SetState(S.RECONNECTING, S.TERMINATED)]
    assert machine.shutdown(3.0) == []
    assert machine.deadline is None
    for event in (lambda: machine.core_state_changed("connected", 4.0),
                  lambda: machine.network_change(IP, 4.0),
                  lambda: machine.peer_offer("OFFER", 4.0),
                  lambda: machine.manual_restart(4.0),
                  lambda: machine.timer(1000.0),
                  lambda: machine.channel_closed(4.0)):
        assert event() == []
    assert machine.state is S.TERMINATED


def test_connect_timeout_gives_up_on_a_tube_that_never_connects():
    machine = ConnectionMachine("t1", 0.0, policy=ICERestartPolicy(connect_timeout=20.0))
    machine.core_state_changed("connecting", 1.0)
    assert machine.deadline == 20.0
    assert machine.timer(19.9) == []
    assert machine.timer(20.0) == [SetState(S.CONNECTING, S.FAILED)]
    assert ConnectionMachine("t2", 0.0).deadline == 15.0  # 15 s by default
    assert ConnectionMachine("t3", 0.0, policy=ICERestartPolicy(
        connect_timeout=None)).deadline is None


# -- backoff ----------------------------------------------------------------------------


def test_backoff_values():
    policy = ICERestartPolicy()
    assert [policy.backoff(n) for n in range(1, 8)] == [5, 10, 20, 40, 60, 60, 60]
    assert ICERestartPolicy(restart_backoff_base=1, backoff_factor=3,
                            restart_backoff_max=100).backoff(4) == 27
    assert policy.backoff(10_000) == 60  # no overflow on a long-lived count


def test_exact_backoff_sequence_between_failing_attempts():
    machine = connected(max_restart_attempts=10)
    times = [0.0]
    seq = started(machine.network_change(IP, 0.0))  # the first restart runs at once
    for _ in range(6):
        # The core errors at once: the attempt fails, the next waits for the backoff.
        actions = machine.restart_error(seq, times[-1], "core error")
        assert CancelRestart(seq) in actions and not of(StartRestart, actions)
        assert machine.state is S.RECONNECTING
        next_at = machine.deadline
        assert machine.timer(next_at - 0.001) == []  # not a moment early
        when, seq = run_until_start(machine)
        times.append(when)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == [5, 10, 20, 40, 60, 60]
    assert machine.metrics.ice_restart_attempts == 7
    assert machine.metrics.restarts_failed == 6


def test_next_restart_in_reports_the_backoff():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    machine.restart_error(seq, 1.0, "core error")
    assert machine.next_restart_in(1.0) == pytest.approx(4.0)
    assert machine.next_restart_in(5.0) is None


def test_rapid_blind_changes_make_one_restart():
    machine = connected()
    actions = []
    for i, change in enumerate([BLIND, NetworkChangeType.ICE_FAILURE, BLIND,
                                NetworkChangeType.CONNECTION_TIMEOUT, BLIND]):
        actions += machine.network_change(change, i * 0.2)
    assert len(of(StartRestart, actions)) == 1
    assert machine.metrics.ice_restart_attempts == 1
    assert machine.metrics.restarts_started == 1


def test_change_during_backoff_is_kept_and_runs_when_backoff_ends():
    machine = connected()
    seq = started(machine.network_change(BLIND, 0.0))
    assert of(SetState, complete(machine, seq, 1.0)) == [SetState(S.RECONNECTING, S.CONNECTED)]
    machine.stats_read(1.0, (0, 0))
    # Attempt 1 ran at 0: the next is not allowed before 0 + 5.
    actions = machine.network_change(BLIND, 2.0)
    assert actions == [SetState(S.CONNECTED, S.DEGRADED)]
    assert machine.restart_pending and machine.deadline == 5.0
    assert machine.network_change(BLIND, 3.0) == []  # still one restart waiting
    assert machine.timer(4.99) == []
    actions = machine.timer(5.0)
    assert of(SetState, actions) == [SetState(S.DEGRADED, S.RECONNECTING)]
    assert started(actions) == seq + 1
    assert machine.metrics.ice_restart_attempts == 2


def test_stable_time_resets_the_count_and_the_backoff():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    complete(machine, seq, 1.0)
    machine.stats_read(1.0, (0, 0))
    assert machine.metrics.ice_restart_attempts == 1
    assert machine.deadline == 61.0  # connected at 1 + stable_time 60
    machine.timer(60.9)
    assert machine.metrics.ice_restart_attempts == 1
    machine.timer(61.0)
    assert machine.metrics.ice_restart_attempts == 0
    # With the count reset, a change restarts at once again.
    assert started(machine.network_change(IP, 62.0)) == seq + 1
    assert machine.metrics.ice_restart_attempts == 1


def test_an_unstable_connection_keeps_counting():
    machine = connected(max_restart_attempts=3)
    actions = machine.network_change(BLIND, 0.0)
    for attempt in range(1, 4):
        seq = started(actions) if of(StartRestart, actions) else run_until_start(machine)[1]
        assert machine.metrics.ice_restart_attempts == attempt
        now = machine.metrics.last_restart_time + 1.0
        complete(machine, seq, now)  # every attempt succeeds...
        machine.stats_read(now, (0, 0))
        # ... but trouble comes back long before stable_time (60 s).
        actions = machine.network_change(BLIND, now + 10.0)
    # Three attempts without a stable connection: the policy gives up.
    assert machine.state is S.FAILED
    assert machine.metrics.restarts_succeeded == 3 and machine.metrics.restarts_failed == 0


def test_answer_timeout_fails_the_attempt_and_the_next_waits_for_the_backoff():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    machine.offer_sent(seq, 0.1)
    assert machine.deadline == 15.0
    assert machine.timer(14.9) == []
    actions = machine.timer(15.0)
    # Failed; attempt 2 was allowed from 0 + 5, so it starts right away.
    assert actions[0] == CancelRestart(seq)
    seq2 = started(actions)
    assert machine.metrics.restarts_failed == 1
    machine.offer_sent(seq2, 15.0)
    actions = machine.timer(30.0)  # no answer to attempt 2 either
    assert CancelRestart(seq2) in actions
    # Attempt 2 ran at 15: attempt 3 is allowed from 15 + 10 = 25 <= 30, so now.
    assert machine.metrics.last_restart_time == 30.0
    seq3 = started(actions)
    # A late answer that names attempt 2 is not applied to attempt 3's offer.
    assert machine.answer_received("LATE", 31.0, seq=seq2) == []
    assert machine.answer_received("RIGHT", 31.0, seq=seq3) == [ApplyAnswer(seq3, "RIGHT")]
    # Results reported for dead attempts are ignored.
    assert machine.offer_sent(seq2, 31.0) == [] and machine.answer_applied(seq2, 31.0) == []
    assert machine.restart_error(seq2, 31.0, "late") == []
    assert machine.restart_in_progress


def test_no_connected_after_the_answer_fails_the_attempt():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    machine.offer_sent(seq, 0.0)
    machine.answer_received("A", 2.0)
    machine.answer_applied(seq, 3.0)
    assert machine.deadline == 18.0  # answer_timeout again, from the applied answer
    actions = machine.timer(18.0)
    assert CancelRestart(seq) in actions and machine.metrics.restarts_failed == 1


def test_core_failed_during_an_attempt_fails_it():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    machine.offer_sent(seq, 0.0)
    actions = machine.core_state_changed("failed", 1.0)
    assert actions[0] == CancelRestart(seq)
    assert machine.metrics.restarts_failed == 1
    assert machine.deadline == 5.0  # next attempt at the next allowed time


def test_failed_after_max_attempts_then_manual_restart():
    machine = connected(max_restart_attempts=3)
    seq = started(machine.network_change(IP, 0.0))
    for _ in range(2):
        machine.restart_error(seq, machine.metrics.last_restart_time, "core error")
        seq = run_until_start(machine)[1]
    actions = machine.restart_error(seq, machine.metrics.last_restart_time, "core error")
    assert of(SetState, actions) == [SetState(S.RECONNECTING, S.FAILED)]
    assert machine.metrics.ice_restart_attempts == 3
    assert machine.deadline is None
    # FAILED: blind changes no longer restart.
    assert machine.network_change(BLIND, 100.0) == []
    assert machine.core_state_changed("failed", 100.0) == []
    # A manual restart resets the count and runs at once.
    actions = machine.manual_restart(101.0)
    assert of(SetState, actions) == [SetState(S.FAILED, S.RECONNECTING)]
    seq = started(actions)
    assert machine.metrics.ice_restart_attempts == 1
    complete(machine, seq, 102.0)
    assert machine.state is S.CONNECTED
    assert machine.metrics.restarts_succeeded == 1


def test_manual_restart_ignores_backoff_but_not_an_attempt_in_flight():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    assert machine.manual_restart(0.5) == []  # one in flight is enough
    machine.restart_error(seq, 1.0, "core error")
    assert machine.deadline == 5.0
    assert started(machine.manual_restart(1.5)) == seq + 1


# -- per change type --------------------------------------------------------------------


def test_timeout_rule():
    policy = {"timeout_threshold": 30.0}
    machine = connected(**policy)
    machine.activity(10.0)
    timeout = NetworkChangeType.CONNECTION_TIMEOUT
    assert machine.network_change(timeout, 39.9) == []  # idle 29.9 s
    assert started(machine.network_change(timeout, 40.0)) == 1
    # Only a CONNECTED tube times out.
    other = ConnectionMachine("t2", 0.0, policy=ICERestartPolicy(**policy))
    other.core_state_changed("connecting", 0.0)
    assert other.network_change(timeout, 100.0) == []
    assert other.state is S.CONNECTING


def test_quality_rule():
    machine = connected(loss_threshold=0.05)
    quality = NetworkChangeType.QUALITY_DEGRADATION
    assert machine.network_change(quality, 1.0) == []  # no figure
    assert machine.network_change(quality, 1.0, loss=0.01) == []
    assert machine.network_change(quality, 1.0, loss=0.05) == []
    assert started(machine.network_change(quality, 1.0, loss=0.2)) == 1


def test_network_change_accepts_values():
    machine = connected()
    assert started(machine.network_change("interface_change", 0.0)) == 1
    with pytest.raises(ValueError):
        machine.network_change("no_such_change", 0.0)


# -- disconnected grace ----------------------------------------------------------------


def test_short_disconnect_recovers_long_one_restarts():
    machine = connected(disconnected_grace=3.0)
    assert machine.core_state_changed("disconnected", 10.0) == [SetState(S.CONNECTED, S.DEGRADED)]
    assert machine.deadline == 13.0
    actions = machine.core_state_changed("connected", 11.0)
    assert of(SetState, actions) == [SetState(S.DEGRADED, S.CONNECTED)]
    machine.stats_read(11.0, (0, 0))
    assert machine.timer(13.0) == []  # nothing to do: it came back
    machine.core_state_changed("disconnected", 20.0)
    assert machine.timer(22.9) == []
    actions = machine.timer(23.0)
    assert of(SetState, actions) == [SetState(S.DEGRADED, S.RECONNECTING)]
    assert started(actions) == 1


def test_disconnected_during_an_attempt_changes_nothing():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    assert machine.core_state_changed("disconnected", 1.0) == []
    assert machine.state is S.RECONNECTING and machine.deadline == 15.0
    complete(machine, seq, 2.0)
    assert machine.state is S.CONNECTED


def test_core_failed_while_connected_restarts():
    machine = connected()
    actions = machine.core_state_changed("failed", 5.0)
    assert started(actions) == 1


# -- keepalive --------------------------------------------------------------------------


def test_keepalive_every_300_s_when_idle():
    machine = connected()
    assert machine.deadline == 300.0
    assert machine.timer(299.0) == []
    assert machine.timer(300.0) == [ReadStats()]
    assert machine.deadline == 315.0  # only a retry of the read until it reports
    assert machine.stats_read(300.0, (0, 0)) == [SendKeepalive()]
    assert machine.metrics.last_keepalive_time == 300.0
    # Once the keepalive is out, the counters it moved become the new baseline...
    assert machine.deadline == 301.0
    assert machine.timer(301.0) == [ReadStats()]
    assert machine.stats_read(301.0, (80, 60)) == []
    assert machine.deadline == 600.0
    assert machine.timer(600.0) == [ReadStats()]
    # ... so it is not taken for traffic.
    assert machine.stats_read(600.0, (80, 60)) == [SendKeepalive()]
    assert machine.timer(601.0) == [ReadStats()]
    assert machine.stats_read(601.0, (160, 120)) == []
    assert machine.deadline == 900.0
    # Data after a keepalive counts.
    assert machine.timer(900.0) == [ReadStats()]
    assert machine.stats_read(900.0, (9000, 120)) == []
    assert machine.deadline == 1200.0


def test_activity_postpones_the_keepalive():
    machine = connected()
    machine.activity(100.0)  # a WebSocket message, a signal
    assert machine.deadline == 400.0
    assert machine.timer(300.0) == []  # an early wake-up is harmless
    assert machine.timer(400.0) == [ReadStats()]
    assert machine.stats_read(400.0, (0, 0)) == [SendKeepalive()]


def test_data_on_the_tube_postpones_the_keepalive():
    machine = connected()
    assert machine.timer(300.0) == [ReadStats()]
    assert machine.stats_read(300.0, (5000, 7000)) == []  # bytes moved: activity
    assert machine.metrics.last_activity == 300.0
    assert machine.deadline == 600.0
    assert machine.timer(600.0) == [ReadStats()]
    assert machine.stats_read(600.0, (5000, 7000)) == [SendKeepalive()]


def test_a_stats_read_that_never_reports_is_retried():
    machine = connected(answer_timeout=15.0)
    assert machine.timer(300.0) == [ReadStats()]
    assert machine.timer(314.0) == []
    assert machine.timer(315.0) == [ReadStats()]
    assert machine.stats_read(315.0, None) == [SendKeepalive()]  # unknown counters: send


def test_no_keepalive_unless_connected():
    machine = connected(disconnected_grace=3.0)
    machine.core_state_changed("disconnected", 1.0)
    assert machine.deadline == 4.0  # the grace period, not a keepalive
    assert machine.stats_read(300.0, (0, 0)) == []
    idle = ConnectionMachine("t2", 0.0, policy=ICERestartPolicy(connect_timeout=None))
    assert idle.deadline is None and idle.timer(1000.0) == []


# -- glare and the peer's restarts ---------------------------------------------------------


def test_glare_the_initiator_keeps_its_offer():
    machine = connected(initiator=True)
    seq = started(machine.network_change(IP, 0.0))
    machine.offer_sent(seq, 0.1)
    assert machine.peer_offer("PEER-OFFER", 0.2) == []
    assert machine.metrics.glare_ignored == 1
    complete(machine, seq, 1.0)
    assert machine.state is S.CONNECTED
    assert machine.metrics.restarts_succeeded == 1


def test_glare_the_non_initiator_answers_the_peer():
    machine = connected(initiator=False)
    seq = started(machine.network_change(IP, 0.0))
    machine.offer_sent(seq, 0.1)
    actions = machine.peer_offer("PEER-OFFER", 0.2)
    assert actions[0] == CancelRestart(seq)
    (answer,) = of(AnswerOffer, actions)
    assert answer.sdp == "PEER-OFFER" and answer.seq != seq
    # Abandoned, not failed: the count is as before the attempt.
    assert machine.metrics.ice_restart_attempts == 0
    assert machine.metrics.restarts_failed == 0 and machine.metrics.restarts_abandoned == 1
    assert machine.state is S.RECONNECTING
    # The peer's answer to our abandoned offer is not applied.
    assert machine.answer_received("STALE", 0.3) == []
    assert machine.peer_offer_answered(answer.seq, 0.3) == []
    actions = machine.core_state_changed("connected", 0.5)
    assert of(SetState, actions) == [SetState(S.RECONNECTING, S.CONNECTED)]
    assert machine.metrics.restarts_answered == 1
    # Nothing counted against the policy: the next change restarts at once.
    assert of(StartRestart, machine.network_change(IP, 1.0))


def test_the_peers_restart_without_glare():
    machine = connected(initiator=True)
    actions = machine.peer_offer("OFFER", 5.0)
    assert of(SetState, actions) == [SetState(S.CONNECTED, S.RECONNECTING)]
    (answer,) = of(AnswerOffer, actions)
    # Blind trouble while the peer's restart runs is covered by it.
    assert machine.network_change(BLIND, 5.5) == []
    machine.peer_offer_answered(answer.seq, 6.0)
    assert machine.deadline == 21.0
    machine.core_state_changed("connected", 7.0)
    assert machine.state is S.CONNECTED
    assert machine.metrics.ice_restart_attempts == 0


def test_the_peers_restart_that_never_connects_leads_to_ours():
    machine = connected()
    (answer,) = of(AnswerOffer, machine.peer_offer("OFFER", 5.0))
    machine.peer_offer_answered(answer.seq, 5.0)
    actions = machine.timer(20.0)
    assert started(actions) == answer.seq + 1


def test_the_peers_offer_the_core_rejects_leads_to_ours():
    machine = connected()
    (answer,) = of(AnswerOffer, machine.peer_offer("BAD", 5.0))
    actions = machine.peer_offer_failed(answer.seq, 5.1, "bad sdp")
    assert of(StartRestart, actions)


def test_stray_answer_is_ignored():
    machine = connected()
    assert machine.answer_received("A", 1.0) == []
    assert machine.state is S.CONNECTED


def test_policy_can_be_replaced():
    machine = connected()
    machine.policy = ICERestartPolicy(keepalive_interval=30.0)
    assert machine.deadline == 30.0


@pytest.mark.parametrize("bad", [{"max_restart_attempts": 0}, {"answer_timeout": -1},
                                 {"backoff_factor": 0.5}])
def test_policy_validation(bad):
    with pytest.raises(ValueError):
        ICERestartPolicy(**bad)


# -- known causes, a path that comes back, never giving up ----------------------------------


def test_a_known_cause_restarts_at_once_whatever_the_backoff():
    machine = connected()
    seq = started(machine.network_change(BLIND, 0.0))
    complete(machine, seq, 1.0)
    machine.stats_read(1.0, (0, 0))
    # A blind change at 2 s would wait for 0 + 5; our address changing is news: now.
    actions = machine.network_change(IP, 2.0)
    assert of(SetState, actions) == [SetState(S.CONNECTED, S.RECONNECTING)]
    assert started(actions) == seq + 1
    assert machine.metrics.ice_restart_attempts == 2


def test_a_known_cause_replaces_an_attempt_in_flight_without_counting_twice():
    machine = connected()
    seq = started(machine.network_change(IP, 0.0))
    machine.offer_sent(seq, 0.1)
    actions = machine.network_change(NetworkChangeType.INTERFACE_CHANGE, 0.5)
    assert CancelRestart(seq) in actions
    fresh = started(actions)
    assert fresh == seq + 1
    assert machine.metrics.ice_restart_attempts == 1  # the replaced one is not counted
    assert machine.metrics.restarts_superseded == 1
    # The old attempt's answer no longer applies; the fresh one's does.
    machine.offer_sent(fresh, 0.6)
    assert machine.answer_received("OLD", 0.7, seq) == []
    assert machine.answer_received("NEW", 0.8, fresh) == [ApplyAnswer(fresh, "NEW")]


def test_a_known_cause_replaces_our_answer_to_the_peers_restart():
    machine = connected(initiator=False)
    actions = machine.peer_offer("OFFER", 1.0)
    (answer,) = of(AnswerOffer, actions)
    machine.peer_offer_answered(answer.seq, 1.1)
    actions = machine.network_change(IP, 1.5)
    assert started(actions) == answer.seq + 1
    assert machine.restart_in_progress and machine.state is S.RECONNECTING


def test_a_known_cause_before_the_first_connection_does_nothing():
    machine = ConnectionMachine("t1", 0.0)
    assert machine.network_change(IP, 1.0) == []


def test_the_path_coming_back_ends_our_attempt_without_spending_it():
    machine = connected()
    machine.core_state_changed("disconnected", 10.0)
    seq = started(machine.timer(10.0))  # no grace by default: restart at once
    machine.offer_sent(seq, 10.1)
    assert machine.state is S.RECONNECTING
    actions = machine.core_state_changed("connected", 11.0)
    assert of(SetState, actions) == [SetState(S.RECONNECTING, S.CONNECTED)]
    assert CancelRestart(seq) in actions  # its unsent signals are withdrawn
    assert not machine.restart_in_progress
    assert machine.metrics.ice_restart_attempts == 0  # not spent
    assert machine.metrics.restarts_unneeded == 1 and machine.metrics.restarts_failed == 0
    assert machine.deadline != 10.0 + 15.0  # no answer timeout left to fire
    # The answer to the offer that went out is still applied: the peer follows it.
    assert machine.answer_received("ANSWER", 11.5, seq) == [ApplyAnswer(seq, "ANSWER")]
    assert machine.answer_received("AGAIN", 11.6, seq) == []


def test_the_path_coming_back_before_the_offer_left_cancels_it():
    machine = connected()
    seq = started(machine.network_change(BLIND, 0.0))
    actions = machine.core_state_changed("connected", 0.2)
    assert CancelRestart(seq) in actions
    assert machine.state is S.CONNECTED
    assert machine.answer_received("ANSWER", 0.5, seq) == []


def test_a_second_outage_right_after_a_healed_one_gets_every_attempt():
    machine = connected(max_restart_attempts=2)
    for outage in range(3):
        now = 10.0 * (outage + 1)
        machine.core_state_changed("disconnected", now)
        seq = started(machine.timer(now))
        machine.offer_sent(seq, now)
        machine.core_state_changed("connected", now + 1.0)
        assert machine.state is S.CONNECTED
    assert machine.metrics.ice_restart_attempts == 0


def test_glare_is_only_crossing_offers():
    machine = connected(initiator=True)
    seq = started(machine.network_change(IP, 0.0))
    machine.offer_sent(seq, 0.1)
    machine.answer_received("ANSWER", 0.2, seq)
    machine.answer_applied(seq, 0.3)
    # The peer answered ours, then offers again: it knows something new. Its offer wins.
    actions = machine.peer_offer("NEWER", 0.5)
    assert CancelRestart(seq) in actions and of(AnswerOffer, actions)
    assert machine.metrics.glare_ignored == 0


def test_never_give_up_retries_at_the_longest_backoff():
    machine = connected(max_restart_attempts=2, keep_trying=True)
    seq = started(machine.network_change(BLIND, 0.0))
    machine.restart_error(seq, 0.0, "no answer")
    when, seq = run_until_start(machine)
    assert when == 5.0
    actions = machine.restart_error(seq, 5.0, "no answer")
    assert of(SetState, actions) == [SetState(S.RECONNECTING, S.FAILED)]
    # FAILED for the user, but the next attempt is already planned: 60 s after the last.
    assert machine.deadline == 65.0
    assert machine.timer(64.9) == []
    actions = machine.timer(65.0)
    assert of(SetState, actions) == [SetState(S.FAILED, S.RECONNECTING)]
    seq = started(actions)
    actions = machine.restart_error(seq, 70.0, "no answer")
    assert of(SetState, actions) == [SetState(S.RECONNECTING, S.FAILED)]
    assert machine.deadline == 125.0
    # The path answering again brings it back at once.
    actions = machine.core_state_changed("connected", 80.0)
    assert of(SetState, actions) == [SetState(S.FAILED, S.CONNECTED)]


def test_never_give_up_a_network_change_in_failed_tries_at_once():
    machine = connected(max_restart_attempts=1, keep_trying=True)
    seq = started(machine.network_change(BLIND, 0.0))
    machine.restart_error(seq, 0.0, "no answer")
    assert machine.state is S.FAILED
    actions = machine.network_change(IP, 3.0)
    assert of(SetState, actions) == [SetState(S.FAILED, S.RECONNECTING)]
    assert machine.metrics.ice_restart_attempts == 1


def test_a_closed_channel_is_final_even_when_keep_trying():
    machine = connected(keep_trying=True)
    assert of(SetState, machine.channel_closed(1.0)) == [SetState(S.CONNECTED, S.FAILED)]
    assert machine.deadline is None


def test_never_give_up_needs_a_tube_that_connected_once():
    machine = ConnectionMachine("t1", 0.0, policy=ICERestartPolicy(keep_trying=True))
    assert machine.timer(15.0) == [SetState(S.INITIALIZING, S.FAILED)]
    assert machine.deadline is None
