"""The client's retry plan (replicator/client/retry.py) alone: no gRPC, no sockets, no sleeping.

The blocking client, the asyncio client and the chaos workload all run this plan; tests/test_client.py
runs it through the real clients against real gRPC servers.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.client import RetryPolicy
from replicator.client.retry import NOTHING_APPLIED, RETRIED, Decision, Outcome, RetryPlan, Step

FAILURES = [outcome for outcome in Outcome if outcome is not Outcome.OK]


def run(plan: RetryPlan, outcomes: list[Outcome]) -> list[Decision]:
    """Feed `outcomes` to the plan until it stops calling; the decisions, the first one included."""
    decisions = [plan.start()]
    for outcome in outcomes:
        if decisions[-1].step is not Step.CALL:
            break
        decisions.append(plan.record(outcome))
    return decisions


def test_switches_at_once_then_backs_off_doubling_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts_max=7, backoff_initial_ms=10, backoff_ms_max=40)
    plan = RetryPlan(policy, 2, write=False, random=lambda: 1.0)  # jitter 1.0: the backoff itself
    decisions = run(plan, [Outcome.UNREACHABLE] * 7)
    assert [d.endpoint for d in decisions[:7]] == [0, 1, 0, 1, 0, 1, 0]
    assert [round(d.delay_s * 1000) for d in decisions[:7]] == [0, 0, 10, 20, 40, 40, 40]
    assert decisions[-1].step is Step.GIVE_UP and plan.attempts_total == 7
    assert decisions[-1].outcome_known  # a read changed nothing


def test_one_endpoint_retries_there_with_backoff_from_the_first_retry() -> None:
    plan = RetryPlan(RetryPolicy(attempts_max=3, backoff_initial_ms=10), 1, write=False, random=lambda: 1.0)
    decisions = run(plan, [Outcome.REFUSED] * 3)
    assert [d.endpoint for d in decisions] == [0, 0, 0, 0]
    assert [round(d.delay_s * 1000) for d in decisions[:3]] == [0, 10, 20]


def test_a_timeout_is_retried_once_at_the_same_site_then_moves_on() -> None:
    policy = RetryPolicy(attempts_max=8, backoff_initial_ms=10)
    plan = RetryPlan(policy, 2, start=1, write=True, random=lambda: 1.0)
    decisions = run(plan, [Outcome.TIMEOUT, Outcome.TIMEOUT, Outcome.TIMEOUT, Outcome.OK])
    assert [d.endpoint for d in decisions] == [1, 1, 0, 0, 0]
    assert round(decisions[1].delay_s * 1000) == 10  # a short wait for the original at the same site
    assert decisions[-1].step is Step.DONE and decisions[-1].outcome_known  # it succeeded: known


def test_a_refusal_after_a_timeout_moves_on_but_the_outcome_stays_unknown() -> None:
    plan = RetryPlan(RetryPolicy(attempts_max=3), 2, write=True)
    decisions = run(plan, [Outcome.TIMEOUT, Outcome.REFUSED, Outcome.REFUSED])
    assert [d.endpoint for d in decisions[:3]] == [0, 0, 1]
    assert decisions[-1].step is Step.GIVE_UP
    assert not decisions[-1].outcome_known and plan.maybe_applied and plan.timed_out


def test_a_busy_site_is_retried_in_place_after_its_hint_capped_by_the_policy() -> None:
    policy = RetryPolicy(attempts_max=5, backoff_initial_ms=10, backoff_ms_max=300)
    plan = RetryPlan(policy, 2, write=True, random=lambda: 0.0)  # jitter 1.0: the hint itself
    plan.start()
    assert plan.record(Outcome.BUSY, retry_after_ms=120) == Decision(Step.CALL, 0, 0.12, True)
    assert plan.record(Outcome.BUSY, retry_after_ms=5000).delay_s == 0.3  # never longer than backoff_ms_max
    assert plan.record(Outcome.BUSY).delay_s == 0.1  # no hint: 100 ms
    assert plan.record(Outcome.REFUSED).endpoint == 1  # a refusal still moves on
    final = plan.record(Outcome.BUSY, retry_after_ms=10)
    assert final.step is Step.GIVE_UP and final.outcome_known  # busy applied nothing


def test_refusals_and_rejections_leave_a_write_known_not_applied() -> None:
    plan = RetryPlan(RetryPolicy(attempts_max=4), 2, write=True)
    decisions = run(plan, [Outcome.REFUSED, Outcome.REFUSED, Outcome.REJECTED])
    assert [d.step for d in decisions] == [Step.CALL, Step.CALL, Step.CALL, Step.GIVE_UP]
    assert decisions[-1].outcome_known and not plan.maybe_applied


@pytest.mark.parametrize("outcome", [Outcome.REJECTED, Outcome.FAILED])
def test_an_error_retrying_cannot_change_ends_the_call_at_once(outcome: Outcome) -> None:
    plan = RetryPlan(RetryPolicy(), 2, write=True)
    decisions = run(plan, [outcome])
    assert decisions[-1].step is Step.GIVE_UP and plan.attempts_total == 1
    assert decisions[-1].outcome_known is (outcome in NOTHING_APPLIED)


def test_progress_restarts_the_count_of_failures() -> None:
    plan = RetryPlan(RetryPolicy(attempts_max=2), 2, write=False)
    plan.start()
    assert plan.record(Outcome.UNREACHABLE).step is Step.CALL
    plan.progressed()  # the stream at the other site delivered bytes: two more attempts allowed
    assert plan.record(Outcome.UNREACHABLE).step is Step.CALL
    assert plan.record(Outcome.UNREACHABLE).step is Step.GIVE_UP
    assert plan.attempts_total == 3


def test_the_plan_is_used_once_and_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="start"):
        RetryPlan(RetryPolicy(), 2, start=2, write=False)
    with pytest.raises(ValueError, match="endpoints"):
        RetryPlan(RetryPolicy(), 0, write=False)
    with pytest.raises(ValueError, match="backoff_ms_max"):
        RetryPolicy(backoff_ms_max=0)
    plan = RetryPlan(RetryPolicy(), 2, write=False)
    with pytest.raises(AssertionError):
        plan.record(Outcome.OK)  # before start()
    plan.start()
    plan.record(Outcome.OK)
    with pytest.raises(AssertionError):
        plan.record(Outcome.OK)  # after DONE


def test_the_default_budget_is_the_documented_one() -> None:
    """docs/design.md: 16 attempts over two sites wait 20, 40, ... 640 ms and then 1 s eight times."""
    policy = RetryPolicy()
    plan = RetryPlan(policy, 2, write=True, random=lambda: 1.0)
    waits_ms = [round(d.delay_s * 1000) for d in run(plan, [Outcome.UNREACHABLE] * 16)[:16]]
    assert waits_ms == [0, 0, 20, 40, 80, 160, 320, 640] + [1000] * 8
    assert sum(waits_ms) <= policy.wait_ms_max()


# ---- properties

policies = st.builds(
    RetryPolicy,
    attempts_max=st.integers(1, 40),
    backoff_initial_ms=st.integers(1, 2000),
    backoff_ms_max=st.integers(1, 5000),
    call_timeout_ms=st.integers(1, 10_000),
)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    endpoints=st.integers(1, 2),
    write=st.booleans(),
    outcomes=st.lists(st.sampled_from(list(Outcome)), max_size=60),
    seed=st.integers(0, 2**32),
)
def test_every_plan_ends_within_its_attempt_and_time_budget(
    policy: RetryPolicy, endpoints: int, write: bool, outcomes: list[Outcome], seed: int
) -> None:
    jitter = random.Random(seed)
    plan = RetryPlan(policy, endpoints, seed % endpoints, write=write, random=jitter.random)
    # After the given outcomes, the sites keep failing in ways that are retried: the plan must stop anyway.
    decisions = run(plan, outcomes + [Outcome.UNREACHABLE] * (policy.attempts_max + 1))
    final = decisions[-1]
    assert final.step is not Step.CALL, "the plan never stopped"
    calls = [d for d in decisions if d.step is Step.CALL]
    assert len(calls) == plan.attempts_total <= policy.attempts_max
    assert all(0 <= d.endpoint < endpoints for d in decisions)
    assert sum(d.delay_s for d in calls) <= policy.wait_ms_max() / 1000 + 1e-9
    assert sum(d.delay_s for d in calls) * 1000 + len(calls) * policy.call_timeout_ms <= policy.budget_ms() + 1e-6
    # It gives up early only on an outcome that is not retried.
    if final.step is Step.GIVE_UP and len(calls) < policy.attempts_max:
        assert plan.last not in RETRIED


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    endpoints=st.integers(1, 2),
    before=st.lists(st.sampled_from(FAILURES), max_size=10),
    after=st.lists(st.sampled_from(FAILURES), max_size=30),
    ends_ok=st.booleans(),
)
def test_a_write_that_timed_out_is_never_reported_known_unless_it_succeeded(
    policy: RetryPolicy, endpoints: int, before: list[Outcome], after: list[Outcome], ends_ok: bool
) -> None:
    plan = RetryPlan(policy, endpoints, write=True)
    outcomes = before + [Outcome.TIMEOUT] + after + ([Outcome.OK] if ends_ok else [])
    decisions = run(plan, outcomes + [Outcome.UNREACHABLE] * (policy.attempts_max + 1))
    final = decisions[-1]
    fed = outcomes[: len(decisions) - 1]
    if Outcome.TIMEOUT not in fed:
        return  # the plan stopped before the timeout was ever seen
    assert final.step is not Step.CALL
    if final.step is Step.GIVE_UP:
        assert not final.outcome_known and plan.timed_out
    else:
        assert final.outcome_known  # DONE: the write is applied, and known to be


@settings(max_examples=300, deadline=None)
@given(
    endpoints=st.integers(1, 2),
    outcomes=st.lists(st.sampled_from(FAILURES), min_size=1, max_size=20),
    write=st.booleans(),
)
def test_known_means_every_failure_said_nothing_was_applied(
    endpoints: int, outcomes: list[Outcome], write: bool
) -> None:
    """The chaos workload's rule: a failed write is `fail` (known) only if every attempt was a
    refusal or a rejection; a read is always known."""
    policy = RetryPolicy(attempts_max=len(outcomes))
    plan = RetryPlan(policy, endpoints, write=write)
    decisions = run(plan, outcomes)
    seen = outcomes[: len(decisions) - 1]
    assert decisions[-1].step is Step.GIVE_UP
    assert decisions[-1].outcome_known is ((not write) or all(o in NOTHING_APPLIED for o in seen))


@settings(max_examples=200, deadline=None)
@given(outcomes=st.lists(st.sampled_from(FAILURES), min_size=1, max_size=20))
def test_two_timeouts_in_a_row_at_a_site_are_needed_before_a_switch(outcomes: list[Outcome]) -> None:
    """After a timeout the next attempt goes to the same site unless the previous attempt there
    also timed out (docs/design.md, "Retries")."""
    plan = RetryPlan(RetryPolicy(attempts_max=len(outcomes) + 1), 2, write=True)
    decisions = run(plan, outcomes)
    calls = [d for d in decisions if d.step is Step.CALL]
    in_a_row = 0
    for index, outcome in enumerate(outcomes[: len(calls) - 1]):
        if outcome is not Outcome.BUSY:  # a busy answer neither counts nor breaks the run (it stays anyway)
            in_a_row = in_a_row + 1 if outcome is Outcome.TIMEOUT else 0
        same = calls[index + 1].endpoint == calls[index].endpoint
        assert same is (outcome is Outcome.BUSY or in_a_row == 1), (outcomes, [c.endpoint for c in calls])
        if not same:
            in_a_row = 0


def test_a_call_the_server_cancelled_is_retried_with_its_outcome_unknown() -> None:
    """A stopping site cancels the calls still in flight (seen in a drained rolling restart): that is a site
    gone mid-call, retried with the same request id, not a final error."""
    import grpc

    from replicator.client._common import outcome_of
    from replicator.client.retry import RETRIED, Outcome

    assert outcome_of(grpc.StatusCode.CANCELLED, False) is Outcome.UNREACHABLE
    assert Outcome.UNREACHABLE in RETRIED
    assert outcome_of(grpc.StatusCode.INTERNAL, False) is Outcome.FAILED
