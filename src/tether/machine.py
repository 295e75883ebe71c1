"""The connection manager's rules as a pure state machine (sans-I/O, like websockets' protocol).

ConnectionMachine is fed events, each with the current clock value ``now`` (seconds on any
monotonic clock), and returns a list of actions for its driver to carry out. It never
sleeps, reads a clock, or touches a socket, so every timing rule (restart backoff, answer
timeout, keepalive schedule, stable-time reset) is tested by passing numbers.

The driver asks ``deadline`` after every event and calls ``timer(now)`` once that time has
come; waking it early is harmless (nothing is due, ``deadline`` says when to come back).
Results of the I/O an action asked for come back as events carrying the action's ``seq``, so
a late result of an abandoned attempt is recognised and ignored.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class ConnectionState(enum.StrEnum):
    """Where a tube stands. CONNECTED and DEGRADED carry data; RECONNECTING is an ICE restart
    in flight; FAILED still retries when the policy keeps trying; TERMINATED is final."""

    INITIALIZING = "initializing"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DEGRADED = "degraded"
    FAILED = "failed"
    TERMINATED = "terminated"


class NetworkChangeType(enum.StrEnum):
    """Why the manager is told the network changed. Interface and address changes are known
    causes: they restart ICE at once, whatever the backoff."""

    INTERFACE_CHANGE = "interface_change"
    IP_ADDRESS_CHANGE = "ip_change"
    CONNECTION_TIMEOUT = "timeout"
    ICE_FAILURE = "ice_failure"
    QUALITY_DEGRADATION = "quality_degraded"


@dataclass
class ICERestartPolicy:
    """When and how often to restart ICE. Times are seconds; may be swapped at any time."""

    max_restart_attempts: int = 5
    restart_backoff_base: float = 5.0
    restart_backoff_max: float = 60.0
    timeout_threshold: float = 30.0
    backoff_factor: float = 2.0
    # Connected this long without trouble resets the attempt count (and so the backoff).
    stable_time: float = 60.0
    # How long an attempt waits for the peer's answer, and then for the core's 'connected'.
    answer_timeout: float = 15.0
    # Send a keepalive when a connected tube has carried nothing for this long.
    keepalive_interval: float = 300.0
    # QUALITY_DEGRADATION restarts only above this packet loss rate (0..1).
    loss_threshold: float = 0.05
    # A core 'disconnected' that lasts this long counts as an ICE failure. The core's own
    # silence window already is the wait (tether's liveness: about 2 s), so none by default.
    disconnected_grace: float = 0.0
    # Give up on a tube that never connects within this time (None: wait for the core).
    connect_timeout: float | None = 15.0
    # After the attempts run out (FAILED), go on trying every restart_backoff_max seconds
    # instead of waiting for a manual restart, like autossh. Only for a tube that connected
    # once; a closed channel or core stays final.
    keep_trying: bool = False

    def __post_init__(self) -> None:
        if self.max_restart_attempts < 1:
            raise ValueError("max_restart_attempts must be at least 1")
        if self.backoff_factor < 1.0:
            raise ValueError("backoff_factor must be at least 1")
        for name in ("restart_backoff_base", "restart_backoff_max", "timeout_threshold",
                     "stable_time", "answer_timeout", "keepalive_interval",
                     "disconnected_grace", "loss_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def backoff(self, attempt: int) -> float:
        """Seconds that must pass after attempt ``attempt`` (1-based) before the next one."""
        exponent = max(attempt - 1, 0)
        # Cap the exponent so a long-lived count cannot overflow the float.
        delay = self.restart_backoff_base * self.backoff_factor ** min(exponent, 64)
        return min(delay, self.restart_backoff_max)


@dataclass(slots=True)
class ConnectionMetrics:
    """Counters for status displays. Times are clock values (the machine's ``now``)."""

    # Attempts since the last stable connection: the count the policy limits.
    ice_restart_attempts: int = 0
    last_activity: float = 0.0
    last_restart_time: float | None = None
    last_keepalive_time: float | None = None
    restarts_started: int = 0
    restarts_succeeded: int = 0
    restarts_failed: int = 0
    restarts_abandoned: int = 0  # ours, dropped to answer the peer's (glare, non-initiator)
    restarts_answered: int = 0  # the peer's, answered by us
    restarts_superseded: int = 0  # ours, replaced by a fresh one after a network change
    restarts_unneeded: int = 0  # ours, ended because the old path answered again
    glare_ignored: int = 0  # the peer's offers ignored because ours was in flight (initiator)
    keepalives_sent: int = 0  # counted by the driver once the core took it
    state_changes: int = 0


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetState:
    """The state changed: tell the callbacks."""

    old: ConnectionState
    new: ConnectionState


@dataclass(frozen=True, slots=True)
class StartRestart:
    """Run attempt ``seq``: offer = restart_ice(); send it as ice_restart_offer.

    Report offer_sent(seq) or restart_error(seq).
    """

    seq: int


@dataclass(frozen=True, slots=True)
class CancelRestart:
    """Attempt ``seq`` is over: stop its I/O and withdraw its signals the peer has not got.

    Its results no longer matter; an offer still queued would only make the peer build a
    generation nobody uses.
    """

    seq: int


@dataclass(frozen=True, slots=True)
class ApplyAnswer:
    """set_remote_description(sdp, is_answer=True); report answer_applied or restart_error."""

    seq: int
    sdp: str


@dataclass(frozen=True, slots=True)
class AnswerOffer:
    """Answer the peer's restart offer and send ice_restart_answer (echoing ``ref``).

    Report peer_offer_answered(seq) or peer_offer_failed(seq).
    """

    seq: int
    sdp: str
    ref: int | None = None  # the peer's attempt number, if its offer carried one


@dataclass(frozen=True, slots=True)
class ReadStats:
    """Read the core's byte counters; report stats_read(now, (sent, received) or None)."""


@dataclass(frozen=True, slots=True)
class SendKeepalive:
    """Send one keepalive over the tube."""


Action = (
    SetState | StartRestart | CancelRestart | ApplyAnswer | AnswerOffer | ReadStats | SendKeepalive
)

# Stages of an attempt. Ours: offering -> awaiting_answer -> applying -> connecting.
# The peer's: answering -> answered. Both end with the core's 'connected'.
OFFERING = "offering"
AWAITING_ANSWER = "awaiting_answer"
APPLYING = "applying"
CONNECTING = "connecting"
ANSWERING = "answering"
ANSWERED = "answered"


class _Attempt:
    __slots__ = ("seq", "own", "stage", "deadline", "undo")

    def __init__(self, seq: int, own: bool, stage: str, deadline: float,
                 undo: tuple[int, float | None] | None = None) -> None:
        self.seq = seq
        self.own = own
        self.stage = stage
        self.deadline = deadline
        self.undo = undo  # the count and time to restore if ours is abandoned


# Seconds after a keepalive before the byte counters are read again as the new baseline.
KEEPALIVE_REBASE_DELAY = 1.0

S = ConnectionState
_ENDED = (S.FAILED, S.TERMINATED)
# Network changes whose cause is known: ours; they restart at once, whatever the backoff.
KNOWN_CAUSES = frozenset({NetworkChangeType.IP_ADDRESS_CHANGE,
                          NetworkChangeType.INTERFACE_CHANGE})


class ConnectionMachine:
    """One tube's connection state, restart policy and keepalive schedule.

    ``initiator`` makes this side the impolite peer of perfect negotiation: when both sides
    offer an ICE restart at once, the initiator's offer wins.
    """

    __slots__ = (
        "tube_id", "initiator", "policy", "state", "metrics", "core_state",
        "_created", "_ever_connected", "_attempt", "_seq", "_last_attempt_at",
        "_pending", "_pending_reason", "_connected_at", "_disconnected_at",
        "_baseline", "_stats_asked", "_rebase_at", "_late_seq", "_retry_at",
    )

    def __init__(self, tube_id: str, now: float, *, initiator: bool = True,
                 policy: ICERestartPolicy | None = None) -> None:
        self.tube_id = tube_id
        self.initiator = initiator
        self.policy = policy if policy is not None else ICERestartPolicy()
        self.state = S.INITIALIZING
        self.metrics = ConnectionMetrics(last_activity=now)
        self.core_state: str | None = None
        self._created = now
        self._ever_connected = False
        self._attempt: _Attempt | None = None
        self._seq = 0
        self._last_attempt_at: float | None = None
        self._pending = False  # a restart is wanted, waiting for the backoff to end
        self._pending_reason = ""
        self._connected_at: float | None = None
        self._disconnected_at: float | None = None
        self._baseline: tuple[int, int] | None = None  # byte counters at the last look
        self._stats_asked: float | None = None  # when ReadStats went out, until stats_read
        self._rebase_at: float | None = None  # re-read the counters after our keepalive
        # Our attempt that ended because the path came back while its offer was out: its
        # answer, if it still comes, is applied (the peer has built a generation for it).
        self._late_seq: int | None = None
        self._retry_at: float | None = None  # FAILED but keep_trying: the next attempt

    # -- queries --------------------------------------------------------------------------

    @property
    def restart_in_progress(self) -> bool:
        return self._attempt is not None

    @property
    def restart_pending(self) -> bool:
        return self._pending

    @property
    def ever_connected(self) -> bool:
        return self._ever_connected

    @property
    def retrying(self) -> bool:
        """FAILED, but keep_trying: another attempt is planned (see ``deadline``)."""
        return self.state is S.FAILED and self._retry_at is not None

    @property
    def deadline(self) -> float | None:
        """The next clock value at which ``timer`` has something to do, or None."""
        if self.state is S.TERMINATED:
            return None
        policy = self.policy
        best = math.inf
        attempt = self._attempt
        if attempt is not None:
            best = attempt.deadline
        elif self._pending and self.state is not S.FAILED:
            best = self._next_allowed()
        if self._disconnected_at is not None:
            best = min(best, self._disconnected_at + policy.disconnected_grace)
        if self._retry_at is not None and self.state is S.FAILED and attempt is None:
            best = min(best, self._retry_at)
        if self.state is S.CONNECTED:
            if self.metrics.ice_restart_attempts and self._connected_at is not None:
                best = min(best, self._connected_at + policy.stable_time)
            best = min(best, self._stats_due())
        elif (policy.connect_timeout is not None and not self._ever_connected
              and self.state in (S.INITIALIZING, S.CONNECTING)):
            best = min(best, self._created + policy.connect_timeout)
        return None if best == math.inf else best

    def next_restart_in(self, now: float) -> float | None:
        """Seconds until the backoff allows another restart; None if nothing holds one back."""
        if self.state in _ENDED:
            return None
        wait = self._next_allowed() - now
        return wait if wait > 0 else None

    # -- events ---------------------------------------------------------------------------

    def activity(self, now: float) -> None:
        """Something passed for this tube (a WebSocket message, a signal). O(1) on purpose."""
        if now > self.metrics.last_activity:
            self.metrics.last_activity = now

    def network_change(self, change: NetworkChangeType | str, now: float, *,
                       loss: float | None = None) -> list[Action]:
        """A network change was reported; ``loss`` is the measured packet loss rate, if any."""
        change = NetworkChangeType(change)
        if change is NetworkChangeType.CONNECTION_TIMEOUT:
            idle = now - self.metrics.last_activity
            if self.state is not S.CONNECTED or idle < self.policy.timeout_threshold:
                logger.info("tube %s: timeout report ignored (state %s, idle %.1f s, "
                            "threshold %.1f s)", self.tube_id, self.state,
                            idle, self.policy.timeout_threshold)
                return []
        elif change is NetworkChangeType.QUALITY_DEGRADATION:
            if loss is None or loss <= self.policy.loss_threshold:
                logger.info("tube %s: quality report ignored (loss %s, threshold %s)",
                            self.tube_id, loss, self.policy.loss_threshold)
                return []
        elif change in KNOWN_CAUSES:
            return self._restart_now(now, change.value)
        return self._want_restart(now, change.value)

    def core_state_changed(self, core_state: str, now: float) -> list[Action]:
        """The core reported its connection state ('new', 'connecting', 'connected', ...)."""
        self.core_state = core_state
        if self.state is S.TERMINATED:
            return []
        attempt = self._attempt
        if core_state in ("connecting", "checking"):
            return self._set(S.CONNECTING) if self.state is S.INITIALIZING else []
        if core_state in ("connected", "completed"):
            if attempt is None:
                return self._connected(now)
            if attempt.stage in (APPLYING, CONNECTING, ANSWERING, ANSWERED):
                return self._restart_succeeded(now)
            return self._path_came_back(now)
        if core_state == "disconnected":
            if attempt is None and self.state is S.CONNECTED:
                self._disconnected_at = now
                return self._set(S.DEGRADED)
            return []
        if core_state == "failed":
            if attempt is not None and attempt.own:
                return self._attempt_failed(now, "the core reported 'failed'")
            if attempt is not None:
                self._attempt = None
                return self._after_peer_restart_failed(now, "the core reported 'failed'")
            if not self._ever_connected:
                return self._give_up(now, "the connection failed before it was established")
            return self._want_restart(now, NetworkChangeType.ICE_FAILURE.value)
        if core_state == "closed":
            return self._give_up(now, "the core closed the connection")
        if core_state != "new":
            logger.info("tube %s: unknown core state %r ignored", self.tube_id, core_state)
        return []

    def initial_answer(self, now: float) -> list[Action]:
        """The peer's first answer is being applied: the connection is under way."""
        return self._set(S.CONNECTING) if self.state is S.INITIALIZING else []

    def offer_sent(self, seq: int, now: float) -> list[Action]:
        attempt = self._own(seq, OFFERING)
        if attempt is not None:
            attempt.stage = AWAITING_ANSWER
        return []

    def restart_error(self, seq: int, now: float, reason: str) -> list[Action]:
        """Attempt ``seq`` could not go on (the core raised, the offer could not be sent)."""
        if self._own(seq) is None:
            return []
        return self._attempt_failed(now, reason)

    def answer_received(self, sdp: str, now: float, seq: int | None = None) -> list[Action]:
        """The peer's ice_restart_answer arrived, naming our attempt ``seq`` if it echoed it.

        An answer naming an older attempt is a late answer to an offer we gave up on.
        """
        attempt = self._attempt
        late = self._late_seq
        if attempt is None and late is not None and seq in (None, late):
            # The path came back before this answer did; the peer already switched to the
            # generation it answered with, so follow it (a quiet path switch).
            self._late_seq = None
            logger.info("tube %s: applying the late answer to restart offer %d",
                        self.tube_id, late)
            return [ApplyAnswer(late, sdp)]
        if attempt is None or not attempt.own or attempt.stage not in (OFFERING, AWAITING_ANSWER):
            logger.info("tube %s: restart answer with no restart offer waiting; ignored",
                        self.tube_id)
            return []
        if seq is not None and seq != attempt.seq:
            logger.info("tube %s: late answer to restart offer %d ignored (waiting for %d)",
                        self.tube_id, seq, attempt.seq)
            return []
        attempt.stage = APPLYING
        return [ApplyAnswer(attempt.seq, sdp)]

    def answer_applied(self, seq: int, now: float) -> list[Action]:
        attempt = self._own(seq, APPLYING)
        if attempt is not None:
            attempt.stage = CONNECTING
            attempt.deadline = now + self.policy.answer_timeout
        return []

    def peer_offer(self, sdp: str, now: float, ref: int | None = None) -> list[Action]:
        """The peer offers an ICE restart. Glare: the initiator's own offer wins."""
        if self.state is S.TERMINATED:
            return []
        actions: list[Action] = []
        attempt = self._attempt
        self._late_seq = None
        if attempt is not None and attempt.own:
            # Glare is two offers crossing. Once the peer has answered ours (APPLYING and
            # later), its offers are newer than our attempt: it learned something (its own
            # network changed), so its offer wins whoever is the initiator.
            if self.initiator and attempt.stage in (OFFERING, AWAITING_ANSWER):
                self.metrics.glare_ignored += 1
                logger.info("tube %s: glare: ignoring the peer's restart offer, ours "
                            "(attempt %d) wins", self.tube_id, attempt.seq)
                return []
            logger.info("tube %s: glare: abandoning our attempt %d to answer the peer's offer",
                        self.tube_id, attempt.seq)
            assert attempt.undo is not None
            self.metrics.ice_restart_attempts, self._last_attempt_at = attempt.undo
            self.metrics.restarts_abandoned += 1
            actions.append(CancelRestart(attempt.seq))
        self._pending = False
        self._disconnected_at = None
        self._seq += 1
        self._attempt = _Attempt(self._seq, False, ANSWERING, now + self.policy.answer_timeout)
        actions += self._set(S.RECONNECTING)
        actions.append(AnswerOffer(self._seq, sdp, ref))
        return actions

    def peer_offer_answered(self, seq: int, now: float) -> list[Action]:
        attempt = self._attempt
        if attempt is not None and attempt.seq == seq and attempt.stage == ANSWERING:
            attempt.stage = ANSWERED
            attempt.deadline = now + self.policy.answer_timeout
            self.metrics.restarts_answered += 1
        return []

    def peer_offer_failed(self, seq: int, now: float, reason: str) -> list[Action]:
        attempt = self._attempt
        if attempt is None or attempt.own or attempt.seq != seq:
            return []
        self._attempt = None
        return self._after_peer_restart_failed(now, reason)

    def stats_read(self, now: float, counters: tuple[int, int] | None) -> list[Action]:
        """Byte counters (sent, received) read for ReadStats; None if they could not be."""
        self._stats_asked = None
        if self.state is not S.CONNECTED:
            return []
        if counters is not None and self._baseline is not None and counters != self._baseline:
            self.activity(now)  # data moved since the last look
        self._baseline = counters
        if now < self._keepalive_due():
            return []
        self.metrics.last_keepalive_time = now
        # Our own keepalive moves the counters: read them again once it has gone out, so it
        # is not mistaken for traffic at the next look.
        self._baseline = None
        self._rebase_at = now + KEEPALIVE_REBASE_DELAY
        logger.debug("tube %s: idle for %.0f s, sending a keepalive",
                     self.tube_id, now - self.metrics.last_activity)
        return [SendKeepalive()]

    def channel_closed(self, now: float, reason: str = "") -> list[Action]:
        if self.state is S.TERMINATED:
            return []
        return self._give_up(now, f"the data channel closed{': ' + reason if reason else ''}")

    def manual_restart(self, now: float) -> list[Action]:
        """A restart asked for by hand: allowed from FAILED, resets the count and the backoff."""
        if self.state is S.TERMINATED:
            return []
        if self._attempt is not None:
            logger.info("tube %s: manual restart: a restart is already in progress",
                        self.tube_id)
            return []
        self.metrics.ice_restart_attempts = 0
        self._last_attempt_at = None
        return self._start_attempt(now, "manual restart")

    def request_restart(self, now: float, reason: str = "requested") -> list[Action]:
        """A restart under the policy's rules (backoff, attempt limit)."""
        return self._want_restart(now, reason)

    def timer(self, now: float) -> list[Action]:
        """Time has passed: act on every deadline that is due."""
        if self.state is S.TERMINATED:
            return []
        policy = self.policy
        actions: list[Action] = []
        attempt = self._attempt
        if attempt is not None and now >= attempt.deadline:
            waited = "answer" if attempt.stage in (OFFERING, AWAITING_ANSWER) else "'connected'"
            reason = f"no {waited} within {policy.answer_timeout:g} s"
            if attempt.own:
                actions += self._attempt_failed(now, reason)
            else:
                self._attempt = None
                actions += self._after_peer_restart_failed(now, reason)
        if (self._pending and self._attempt is None and self.state not in _ENDED
                and now >= self._next_allowed()):
            actions += self._try_start(now)
        if (self._retry_at is not None and self.state is S.FAILED and self._attempt is None
                and now >= self._retry_at):
            self._retry_at = None
            actions += self._start_attempt(now, "still trying: the tube failed, retrying "
                                                f"every {policy.restart_backoff_max:g} s")
        if (self._disconnected_at is not None
                and now >= self._disconnected_at + policy.disconnected_grace):
            self._disconnected_at = None
            actions += self._want_restart(now, "disconnected for more than "
                                               f"{policy.disconnected_grace:g} s")
        if self.state is S.CONNECTED:
            if (self.metrics.ice_restart_attempts and self._connected_at is not None
                    and now >= self._connected_at + policy.stable_time):
                logger.info("tube %s: stable for %g s, restart count reset",
                            self.tube_id, policy.stable_time)
                self.metrics.ice_restart_attempts = 0
                self._last_attempt_at = None
            if now >= self._stats_due():
                self._stats_asked = now
                self._rebase_at = None
                actions.append(ReadStats())
        elif (policy.connect_timeout is not None and not self._ever_connected
              and self.state in (S.INITIALIZING, S.CONNECTING)
              and now >= self._created + policy.connect_timeout):
            actions += self._give_up(now, f"not connected within {policy.connect_timeout:g} s")
        return actions

    def shutdown(self, now: float) -> list[Action]:
        """Final: stop everything. Returns SetState(TERMINATED) exactly once."""
        if self.state is S.TERMINATED:
            return []
        actions: list[Action] = []
        if self._attempt is not None:
            actions.append(CancelRestart(self._attempt.seq))
            self._attempt = None
        self._pending = False
        self._disconnected_at = None
        self._retry_at = None
        return actions + self._set(S.TERMINATED)

    # -- internals ------------------------------------------------------------------------

    def _set(self, state: ConnectionState) -> list[Action]:
        old = self.state
        if old is state:
            return []
        self.state = state
        self.metrics.state_changes += 1
        logger.info("tube %s: %s -> %s", self.tube_id, old, state)
        return [SetState(old, state)]

    def _own(self, seq: int, stage: str | None = None) -> _Attempt | None:
        attempt = self._attempt
        if attempt is None or not attempt.own or attempt.seq != seq:
            return None
        if stage is not None and attempt.stage != stage:
            return None
        return attempt

    def _next_allowed(self) -> float:
        attempts = self.metrics.ice_restart_attempts
        if self._last_attempt_at is None or attempts == 0:
            return -math.inf
        return self._last_attempt_at + self.policy.backoff(attempts)

    def _keepalive_due(self) -> float:
        last = self.metrics.last_activity
        sent = self.metrics.last_keepalive_time
        if sent is not None and sent > last:
            last = sent
        return last + self.policy.keepalive_interval

    def _stats_due(self) -> float:
        """When to read the counters: keepalive time, or again if a read never reported."""
        if self._stats_asked is not None:
            return self._stats_asked + self.policy.answer_timeout
        due = self._keepalive_due()
        if self._rebase_at is not None and self._rebase_at < due:
            return self._rebase_at
        return due

    def _want_restart(self, now: float, reason: str) -> list[Action]:
        if self.state in _ENDED:
            logger.info("tube %s: %s: no restart, the tube is %s", self.tube_id, reason, self.state)
            return []
        if not self._ever_connected:
            logger.info("tube %s: %s: no restart, not connected yet", self.tube_id, reason)
            return []
        if self._attempt is not None:
            logger.info("tube %s: %s: restart already in progress", self.tube_id, reason)
            return []
        if self._pending:
            logger.info("tube %s: %s: restart already waiting for the backoff",
                        self.tube_id, reason)
            return []
        self._pending = True
        self._pending_reason = reason
        return self._try_start(now)

    def _try_start(self, now: float) -> list[Action]:
        """Start the pending restart if the policy allows it now."""
        attempts = self.metrics.ice_restart_attempts
        if attempts >= self.policy.max_restart_attempts:
            reason = f"{attempts} restart attempts without a stable connection"
            if self.policy.keep_trying and self._ever_connected:
                return self._give_up(now, reason, final=False)
            return self._give_up(now, reason)
        allowed = self._next_allowed()
        if now < allowed:
            logger.info("tube %s: %s: restart in %.1f s (backoff)",
                        self.tube_id, self._pending_reason, allowed - now)
            return self._set(S.DEGRADED) if self.state is S.CONNECTED else []
        return self._start_attempt(now, self._pending_reason)

    def _start_attempt(self, now: float, reason: str) -> list[Action]:
        metrics = self.metrics
        undo = (metrics.ice_restart_attempts, self._last_attempt_at)
        self._pending = False
        self._disconnected_at = None
        self._seq += 1
        metrics.ice_restart_attempts += 1
        metrics.restarts_started += 1
        metrics.last_restart_time = now
        self._last_attempt_at = now
        self._attempt = _Attempt(self._seq, True, OFFERING, now + self.policy.answer_timeout, undo)
        logger.info("tube %s: ICE restart attempt %d (%s)",
                    self.tube_id, metrics.ice_restart_attempts, reason)
        return self._set(S.RECONNECTING) + [StartRestart(self._seq)]

    def _attempt_failed(self, now: float, reason: str) -> list[Action]:
        attempt = self._attempt
        assert attempt is not None and attempt.own
        self._attempt = None
        self.metrics.restarts_failed += 1
        logger.warning("tube %s: restart attempt %d failed: %s",
                       self.tube_id, self.metrics.ice_restart_attempts, reason)
        self._pending = True
        self._pending_reason = "retry after a failed attempt"
        return [CancelRestart(attempt.seq)] + self._try_start(now)

    def _after_peer_restart_failed(self, now: float, reason: str) -> list[Action]:
        logger.warning("tube %s: the peer's restart did not complete: %s", self.tube_id, reason)
        if not self._ever_connected:
            return self._set(S.CONNECTING)
        return self._want_restart(now, NetworkChangeType.ICE_FAILURE.value)

    def _restart_succeeded(self, now: float) -> list[Action]:
        attempt = self._attempt
        assert attempt is not None
        self._attempt = None
        if attempt.own:
            self.metrics.restarts_succeeded += 1
        logger.info("tube %s: ICE restart complete (%s)", self.tube_id,
                    "ours" if attempt.own else "the peer's")
        return self._connected(now)

    def _connected(self, now: float) -> list[Action]:
        self._ever_connected = True
        self._pending = False
        self._disconnected_at = None
        self._retry_at = None
        actions = self._set(S.CONNECTED)
        if actions:
            self._connected_at = now
            self.activity(now)  # ICE and DTLS just passed: every mapping on the path is fresh
            self._stats_asked = now  # a baseline, to tell data from idleness later
            self._rebase_at = None
            actions.append(ReadStats())
        return actions

    def _give_up(self, now: float, reason: str, *, final: bool = True) -> list[Action]:
        """FAILED. Not ``final``: keep_trying, so one more attempt after the longest backoff."""
        actions: list[Action] = []
        attempt = self._attempt
        if attempt is not None:
            if attempt.own:
                actions.append(CancelRestart(attempt.seq))
            self._attempt = None
        self._pending = False
        self._disconnected_at = None
        self._late_seq = None
        if final:
            self._retry_at = None
            if self.state is not S.FAILED:
                logger.warning("tube %s: giving up: %s", self.tube_id, reason)
        else:
            since = self._last_attempt_at if self._last_attempt_at is not None else now
            self._retry_at = since + self.policy.restart_backoff_max
            logger.warning("tube %s: %s; still trying, next attempt in %.0f s",
                           self.tube_id, reason, self._retry_at - now)
        return actions + self._set(S.FAILED)

    def _restart_now(self, now: float, reason: str) -> list[Action]:
        """A restart for a known cause (our address or interface changed): at once.

        The backoff is for retrying blind; a network change is news, so it is not held back.
        An attempt of ours still in flight was gathered on the old addresses: it is replaced
        by a fresh one, which takes its place in the count. Answering the peer's restart
        is dropped the same way: our answer carried the old addresses.
        """
        if self.state is S.TERMINATED:
            return []
        if not self._ever_connected:
            logger.info("tube %s: %s: no restart, not connected yet", self.tube_id, reason)
            return []
        actions: list[Action] = []
        attempt = self._attempt
        if attempt is not None:
            if attempt.own:
                assert attempt.undo is not None
                self.metrics.ice_restart_attempts, self._last_attempt_at = attempt.undo
                self.metrics.restarts_superseded += 1
                actions.append(CancelRestart(attempt.seq))
                logger.info("tube %s: %s: replacing restart attempt %d with a fresh one",
                            self.tube_id, reason, attempt.seq)
            self._attempt = None
        if self.state is S.FAILED:
            self.metrics.ice_restart_attempts = 0
            self._last_attempt_at = None
        self._late_seq = None
        self._retry_at = None
        return actions + self._start_attempt(now, reason)

    def _path_came_back(self, now: float) -> list[Action]:
        """The core reports 'connected' while our offer waits: the old path answers again.

        The attempt was not needed: it ends without counting against the policy, and if
        its offer reached the peer, the answer is still applied when it comes.
        """
        attempt = self._attempt
        assert attempt is not None and attempt.own and attempt.undo is not None
        self._attempt = None
        self.metrics.ice_restart_attempts, self._last_attempt_at = attempt.undo
        self.metrics.restarts_unneeded += 1
        logger.info("tube %s: the path answers again; restart attempt %d not needed",
                    self.tube_id, attempt.seq)
        if attempt.stage != OFFERING:
            self._late_seq = attempt.seq
        return [CancelRestart(attempt.seq)] + self._connected(now)
