"""The client's retry rule as a plan that does no I/O (sans-I/O, as h11 is for HTTP).

Theory of operation. A call is made of attempts. Before the first, the shell
asks `RetryPlan.start` where to go; after each attempt it tells the plan what
happened (`RetryPlan.record`, with an `Outcome` the shell classified from the
gRPC status), and the plan answers with a `Decision`: call again (which
endpoint, after what delay), give up, or done. The plan never sleeps, never
calls, never reads a clock: the blocking client, the asyncio client and the
chaos workload are thin shells around it, and the unit tests drive it alone.

The rule (docs/design.md, "Retries"):

- UNAVAILABLE (with or without the server's hint naming the other site, or a
  broken connection), DEADLINE_EXCEEDED, DATA_LOSS and RESOURCE_EXHAUSTED are
  tried again, up to `attempts_max` attempts in all; anything else ends the
  call at once.
- RESOURCE_EXHAUSTED (admission control: the site is busy, nothing applied)
  is retried at the SAME site after the server's hint
  (`replicator-retry-after-ms`), times a jitter in [1.0, 1.5), at most
  `backoff_ms_max`: the site is busy, not broken.
- A retry goes to the other site when there is one. The first switch is
  immediate; once every site was tried, each further attempt waits a backoff
  that doubles from `backoff_initial_ms` up to `backoff_ms_max`, times a
  jitter in [0.5, 1.0).
- After a timeout (the outcome is unknown, the site is alive) the next attempt
  goes to the SAME site, after `backoff_initial_ms` (times the jitter): that
  site finds the original record and waits for it. Only the second timeout in
  a row there moves on. A retry at the other site could overtake the original
  on its way there and apply the write twice.
- Writes carry the same request id in every attempt (the shells draw it once),
  so whichever site a retry reaches, the write is applied at most once.

What the caller learns at the end: `outcome_known`. A read is always known
(it changes nothing). A write that succeeded is known. A write that failed is
known (nothing was applied) only if every failed attempt was refused by a site
that answered: a refusal naming the other site (`REFUSED`) or a definite
rejection (`REJECTED`: invalid, not found, already exists, refused in this
state). After anything else (a timeout, a broken connection, an unexpected
status) the write may take effect at any time, or never: "maybe applied".
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Decision", "Outcome", "RetryPlan", "RetryPolicy", "Step"]

# Timeouts in a row at one site before the next attempt moves to the other.
SAME_SITE_TIMEOUTS_MAX = 2


# The default retry budget outlasts a failover with the default settings (docs/operations.md,
# "Failover time"): 16 attempts over two sites wait 20, 40, ... 640 ms and then 1 s eight times, with
# a jitter of 0.5-1.0, so at least 4.6 s (at most 9.3 s) of retrying against a failover of about 3 s
# (4 s when the non-preferred site survives and waits out the preferred site's grace).
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts_max: int = 16
    backoff_initial_ms: int = 20
    backoff_ms_max: int = 1000
    call_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        for name in ("attempts_max", "backoff_initial_ms", "backoff_ms_max", "call_timeout_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RetryPolicy.{name}: must be a positive integer, got {value!r}")

    def wait_ms_max(self) -> int:
        """The most a plan of this policy waits between attempts, over all its attempts (no jitter
        makes a wait longer than its backoff)."""
        return sum(self._wait_bound_ms(attempt) for attempt in range(1, self.attempts_max))

    def _wait_bound_ms(self, attempt: int) -> int:
        # A switch waits at most backoff_ms_max, a busy site's hint too; a same-site retry after a
        # timeout waits backoff_initial_ms (which may exceed backoff_ms_max).
        return max(self.backoff_ms_max, self.backoff_initial_ms)

    def budget_ms(self) -> int:
        """The longest a call can take: every attempt runs to its deadline, every wait is the longest."""
        return self.attempts_max * self.call_timeout_ms + self.wait_ms_max()


class Outcome(enum.Enum):
    """What one attempt came to, as the shell classified it."""

    OK = "ok"
    # A site answered and applied nothing, naming the other site (UNAVAILABLE with the
    # `replicator-other-site` trailer: fenced, resyncing, draining, not serving): try the other one.
    REFUSED = "refused"
    # No answer from a site (cannot connect, the connection broke, UNAVAILABLE without the hint):
    # the request may have reached it.
    UNREACHABLE = "unreachable"
    # The deadline passed (DEADLINE_EXCEEDED): the site is alive, a write's outcome is unknown.
    TIMEOUT = "timeout"
    # DATA_LOSS: a stored value failed its checksum at this site; the other may have a good copy.
    CORRUPT = "corrupt"
    # RESOURCE_EXHAUSTED: the site's admission control refused, nothing applied; retry there after its hint.
    BUSY = "busy"
    # A definite answer retrying cannot change (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
    # FAILED_PRECONDITION, OUT_OF_RANGE): nothing was applied.
    REJECTED = "rejected"
    # Anything else (UNKNOWN, INTERNAL, ...; CANCELLED by a stopping server counts as UNREACHABLE): not retried, and a
    # write's outcome is unknown.
    FAILED = "failed"


RETRIED = frozenset({Outcome.REFUSED, Outcome.UNREACHABLE, Outcome.TIMEOUT, Outcome.CORRUPT, Outcome.BUSY})
NOTHING_APPLIED = frozenset({Outcome.REFUSED, Outcome.REJECTED, Outcome.BUSY})
BUSY_RETRY_AFTER_MS_DEFAULT = 100  # a busy answer without the server's hint


class Step(enum.Enum):
    CALL = "call"  # make an attempt at `endpoint` after `delay_s`
    DONE = "done"  # the last attempt succeeded
    GIVE_UP = "give up"  # the last attempt's error is the call's


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    endpoint: int  # index into the client's endpoints: where the next attempt goes (CALL), or went
    delay_s: float = 0.0
    # Whether the call's final outcome is known (see the module docstring); meaningful at DONE and GIVE_UP.
    outcome_known: bool = True


class RetryPlan:
    """One call's attempts: where each goes, how long to wait before it, when to stop.

    `endpoints` is how many sites the client knows (1 or 2), `start` the one to try first (the
    client's sticky choice: the site that answered last). `write` says whether the call changes
    anything (for `outcome_known`). `random` draws the jitter in [0, 1); inject a seeded one
    for repeatable plans.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        endpoints: int,
        start: int = 0,
        *,
        write: bool,
        random: Callable[[], float] = random.random,
    ) -> None:
        if not 1 <= endpoints:
            raise ValueError(f"endpoints: must be at least 1, got {endpoints}")
        if not 0 <= start < endpoints:
            raise ValueError(f"start: must be in [0, {endpoints}), got {start}")
        self.policy = policy
        self.endpoints = endpoints
        self.write = write
        self.endpoint = start  # where the current (last) attempt goes
        self.attempts = 0  # attempts made (the current one included), since the last progress
        self.attempts_total = 0
        self.tried: list[int] = []  # endpoint of every attempt, in order
        self.waited_s = 0.0  # sum of the delays handed out
        self.maybe_applied = False  # some failed attempt of a write may have applied it
        self.timed_out = False  # some attempt of a write timed out: the documented "outcome unknown"
        self.last: Outcome | None = None
        self._timeouts_here = 0  # timeouts in a row at the current endpoint
        self._random = random
        self._finished = False

    @property
    def outcome_known(self) -> bool:
        """Known: the call succeeded, or changed nothing (a read, or every attempt refused)."""
        return self.last is Outcome.OK or not (self.write and self.maybe_applied)

    def start(self) -> Decision:
        """The first attempt: at `start`, at once."""
        assert not self.tried, "start() is called once, before the first attempt"
        return self._call(0.0)

    def progressed(self) -> None:
        """The attempt under way delivered part of a streamed answer: failures count from here."""
        assert self.tried and not self._finished
        self.attempts = 1
        self._timeouts_here = 0

    def record(self, outcome: Outcome, retry_after_ms: int | None = None) -> Decision:
        """The attempt under way ended with `outcome`: what to do next. `retry_after_ms`: a BUSY
        site's hint (the trailer `replicator-retry-after-ms`)."""
        assert self.tried and not self._finished, "record() follows start() or a CALL decision"
        self.last = outcome
        if outcome is Outcome.OK:
            return self._finish(Step.DONE)
        if outcome not in NOTHING_APPLIED:
            self.maybe_applied = True
        if outcome is Outcome.TIMEOUT and self.write:
            self.timed_out = True
        if outcome not in RETRIED or self.attempts >= self.policy.attempts_max:
            return self._finish(Step.GIVE_UP)
        if outcome is Outcome.BUSY:
            hint_ms = BUSY_RETRY_AFTER_MS_DEFAULT if retry_after_ms is None else max(0, retry_after_ms)
            return self._call(min(self.policy.backoff_ms_max, hint_ms * (1.0 + 0.5 * self._random())) / 1000)
        self._timeouts_here = self._timeouts_here + 1 if outcome is Outcome.TIMEOUT else 0
        if 0 < self._timeouts_here < SAME_SITE_TIMEOUTS_MAX:
            # Stay: the site is alive and holds the original; wait a little for it.
            return self._call(self.policy.backoff_initial_ms * self._jitter() / 1000)
        self._timeouts_here = 0
        self.endpoint = (self.endpoint + 1) % self.endpoints
        rounds = self.attempts - self.endpoints + 1  # full rounds of the sites behind us
        if rounds <= 0:
            return self._call(0.0)
        backoff_ms = min(self.policy.backoff_ms_max, self.policy.backoff_initial_ms * 2 ** min(rounds - 1, 62))
        return self._call(backoff_ms * self._jitter() / 1000)

    def _jitter(self) -> float:
        return 0.5 + 0.5 * self._random()

    def _call(self, delay_s: float) -> Decision:
        self.attempts += 1
        self.attempts_total += 1
        self.tried.append(self.endpoint)
        self.waited_s += delay_s
        return Decision(Step.CALL, self.endpoint, delay_s, self.outcome_known)

    def _finish(self, step: Step) -> Decision:
        self._finished = True
        return Decision(step, self.endpoint, 0.0, self.outcome_known)
