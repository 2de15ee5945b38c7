"""A witness without state for a pair learns the pair's epoch from the sites before it grants (issue 18)."""

from __future__ import annotations

from replicator.core import messages as msg
from replicator.core.messages import Verdict, WitnessMode
from replicator.core.witness import PairConfig, PairState, WitnessCore, WitnessPersisted, WitnessReply, WitnessRequested

PAIR = "p"


def fresh_witness(states: dict[str, PairState] | None = None, fresh: bool = True) -> WitnessCore:
    config = {PAIR: PairConfig(sites=("a", "b"), preferred="a", preferred_grace_ms=0)}
    return WitnessCore(config, states, fresh={PAIR} if fresh else set())


def ask(witness: WitnessCore, request: msg.WitnessRequest) -> msg.WitnessAnswer:
    actions = witness.step(WitnessRequested(1, request), 0.0)
    persisted = [a.persist_id for a in actions if hasattr(a, "persist_id")]
    if persisted:
        actions += witness.step(WitnessPersisted(max(persisted)), 0.0)
    (reply,) = [a for a in actions if isinstance(a, WitnessReply)]
    return reply.answer


def report(site: str, epoch: int, *, holds: bool = False, in_sync: bool = False) -> msg.Report:
    return msg.Report(PAIR, site, epoch, holds, in_sync)


def test_a_fresh_pair_grants_nothing_and_shows_epoch_0() -> None:
    witness = fresh_witness()
    for request in (msg.Arbitrate(PAIR, "a", 16), msg.Arbitrate(PAIR, "a", 1), msg.MarkSynced(PAIR, "a", 16)):
        answer = ask(witness, request)
        assert (answer.verdict, answer.epoch) == (Verdict.DENIED, 0)
    assert ask(witness, msg.Query(PAIR, "a")).epoch == 0
    assert PAIR in witness.fresh


def test_one_site_in_sync_with_its_peer_is_enough() -> None:
    witness = fresh_witness()
    assert ask(witness, report("a", 16, in_sync=True)).epoch == 16
    assert PAIR not in witness.fresh
    granted = ask(witness, msg.Arbitrate(PAIR, "a", 16))
    assert (granted.verdict, granted.epoch, granted.holder) == (Verdict.GRANTED, 17, "a")


def test_otherwise_both_sites_and_the_holder_of_the_highest_epoch_keeps_it() -> None:
    witness = fresh_witness()
    ask(witness, report("a", 16))  # FENCED at 16
    assert PAIR in witness.fresh and ask(witness, msg.Arbitrate(PAIR, "a", 16)).verdict is Verdict.DENIED
    answer = ask(witness, report("b", 17, holds=True))  # SOLO 17 (granted by the lost witness)
    assert (answer.epoch, answer.mode, answer.holder) == (17, WitnessMode.SOLO, "b")
    denied = ask(witness, msg.Arbitrate(PAIR, "a", 16))
    assert (denied.verdict, denied.epoch, denied.holder) == (Verdict.DENIED, 17, "b")
    assert ask(witness, msg.MarkSynced(PAIR, "b", 17)).verdict is Verdict.SYNCED


def test_a_site_ahead_makes_a_stale_witness_learn_again() -> None:
    witness = fresh_witness({PAIR: PairState(epoch=4)}, fresh=False)  # restored from an old copy
    assert ask(witness, report("a", 4, in_sync=True)).epoch == 4  # level: nothing to learn
    assert PAIR not in witness.fresh
    assert ask(witness, report("b", 9)).epoch == 0  # ahead: the witness lost state
    assert PAIR in witness.fresh
    assert ask(witness, msg.Arbitrate(PAIR, "b", 9)).verdict is Verdict.DENIED
    assert ask(witness, report("a", 9)).epoch == 9 and PAIR not in witness.fresh


def test_a_forced_failover_goes_above_every_epoch_reported_or_asked() -> None:
    witness = fresh_witness()
    ask(witness, report("b", 12))
    granted = ask(witness, msg.Arbitrate(PAIR, "a", 10, force=True))
    assert (granted.verdict, granted.epoch, granted.holder) == (Verdict.GRANTED, 13, "a")
    assert PAIR not in witness.fresh
    behind = fresh_witness({PAIR: PairState(epoch=2)}, fresh=False)
    assert ask(behind, msg.Arbitrate(PAIR, "a", 16, force=True)).epoch == 17
