"""The witness ends its hold on a non-preferred site early when the preferred site has gone silent.

`preferred_silence_ms` (replicator/core/witness.py): a live site reports to the witness every second, so a
preferred site that has sent nothing for that long is dead or cut off from the witness, and holding the other
site's Arbitrate for the rest of `preferred_grace_ms` only lengthens the failover. A preferred site that keeps
reporting keeps its head start; a restarted witness watches a whole silence interval before using it.
"""

from __future__ import annotations

from replicator.core import messages as msg
from replicator.core.witness import PairConfig, WitnessAction, WitnessCore, WitnessPersisted, WitnessReply, WitnessTick
from replicator.core.witness import WitnessRequested as Req

GRACE, SILENCE = 2000, 1500


def witness(silence: int = SILENCE) -> WitnessCore:
    return WitnessCore({"p": PairConfig(("a", "b"), "a", preferred_grace_ms=GRACE, preferred_silence_ms=silence)})


def granted(actions: list[WitnessAction]) -> list[str]:
    return [a.answer.holder for a in actions if isinstance(a, WitnessReply) and a.answer.verdict is msg.Verdict.GRANTED]


def report(site: str) -> msg.Report:
    return msg.Report("p", site, 1, holds_grant=False, in_sync=True)


def run_until_granted(core: WitnessCore, start_ms: float, end_ms: float, reports_from_a: bool) -> float | None:
    """Tick every 50 ms (a reports every 1000 ms when it is alive); the time b's grant is persisted and answered."""
    handle = 100
    now = start_ms
    while now <= end_ms:
        if reports_from_a and int(now) % 1000 == 0:
            handle += 1
            core.step(Req(handle, report("a")), now)
        actions = core.step(WitnessTick(), now)
        actions += core.step(WitnessPersisted(1), now) if core._issued_persist_id else []
        if "b" in granted(actions):
            return now
        now += 50
    return None


def test_a_dead_preferred_site_stops_the_hold_after_the_silence_not_the_grace() -> None:
    core = witness()
    core.step(Req(1, report("a")), 0.0)  # a's last sign of life at t=0, then it dies
    core.step(Req(2, report("b")), 0.0)
    assert granted(core.step(Req(3, msg.Arbitrate("p", "b", 1)), 1000.0)) == []  # held: a spoke 1 s ago
    when = run_until_granted(core, 1050.0, 5000.0, reports_from_a=False)
    assert when == SILENCE  # 1.5 s after a's last report, not 1000 + 2000 ms


def test_a_preferred_site_that_keeps_reporting_keeps_the_whole_grace() -> None:
    core = witness()
    core.step(Req(1, report("a")), 0.0)
    core.step(Req(2, report("a")), 1000.0)
    assert granted(core.step(Req(3, msg.Arbitrate("p", "b", 1)), 1000.0)) == []
    when = run_until_granted(core, 1050.0, 5000.0, reports_from_a=True)
    assert when == 1000.0 + GRACE  # a is alive (cut from b only): b waited the whole grace for a to ask


def test_silence_zero_keeps_the_old_rule() -> None:
    core = witness(silence=0)
    core.step(Req(1, report("a")), 0.0)
    assert granted(core.step(Req(3, msg.Arbitrate("p", "b", 1)), 1000.0)) == []
    assert run_until_granted(core, 1050.0, 5000.0, reports_from_a=False) == 1000.0 + GRACE


def test_a_restarted_witness_watches_a_whole_silence_before_using_it() -> None:
    core = witness()  # it heard nobody yet: its first event (b's request at t=10 000) starts the clock
    assert granted(core.step(Req(1, msg.Arbitrate("p", "b", 1)), 10_000.0)) == []
    assert run_until_granted(core, 10_050.0, 15_000.0, reports_from_a=False) == 10_000.0 + SILENCE


def test_the_preferred_site_asking_during_the_hold_still_wins() -> None:
    core = witness()
    core.step(Req(1, report("a")), 0.0)
    assert granted(core.step(Req(2, msg.Arbitrate("p", "b", 1)), 1000.0)) == []
    actions = core.step(Req(3, msg.Arbitrate("p", "a", 1)), 1200.0)
    actions += core.step(WitnessPersisted(1), 1200.0)
    assert granted(actions) == ["a"]
    denied = [a for a in actions if isinstance(a, WitnessReply) and a.answer.verdict is msg.Verdict.DENIED]
    assert [a.handle for a in denied] == [2]


def test_a_negative_silence_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="preferred_silence_ms must be >= 0"):
        witness(silence=-1)
