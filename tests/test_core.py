"""The protocol core: purity, the transition table, the witness, basic flows."""

from __future__ import annotations

import ast
import pathlib

import pytest

from chaos.sim.manual import ManualSite, connect, settle
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.config import CoreConfig
from replicator.core.errors import ProtocolError
from replicator.core.log import ReplicationLog
from replicator.core.messages import Role
from replicator.core.records import Operation, Record, RecordId
from replicator.core.site import SiteCore
from replicator.core.witness import PairConfig, WitnessCore, WitnessPersisted, WitnessReply, WitnessRequested

CORE = pathlib.Path(__file__).resolve().parent.parent / "replicator" / "core"
FORBIDDEN = {"asyncio", "socket", "time", "os", "random", "threading"}


def test_core_does_no_io() -> None:
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    assert offenders == []


def config(site: str = "a") -> CoreConfig:
    return CoreConfig(site=site, peer="b" if site == "a" else "a", pair="p", preferred="a")


def fresh(site: str = "a") -> SiteCore:
    """A started core whose start-up persist is durable (driven by the one SiteDriver)."""
    manual = ManualSite(site, config=config(site), wall=1_000)
    manual.start()
    assert manual.core is not None
    return manual.core


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="peer_timeout_ms"):
        CoreConfig(site="a", peer="b", pair="p", preferred="a", peer_timeout_ms=-5)
    with pytest.raises(ValueError, match="preferred"):
        CoreConfig(site="a", peer="b", pair="p", preferred="c")
    with pytest.raises(ValueError, match="plants"):
        CoreConfig(site="a", peer="b", pair="p", preferred="a", plants=frozenset({"nope"}))


def test_recovery_needs_a_generation() -> None:
    with pytest.raises(ValueError, match="generation"):
        SiteCore(config(), ev.Recovered())


def test_start_bumps_the_incarnation_durably() -> None:
    core = SiteCore(config(), ev.Recovered(meta={"generation": b"g", "incarnation": 7}))
    actions = core.start(0.0, 0)
    persists = [a for a in actions if isinstance(a, ev.Persist)]
    assert core.incarnation == 8
    assert ("incarnation", 8) in persists[0].meta


def test_starting_site_refuses_writes_and_reads() -> None:
    core = fresh()
    out = core.step(ev.WriteRequested(1, b"r1", (Operation(b"k", b"v"),)), 1.0, 1_001)
    assert out[0] == ev.AnswerWrite(1, False, error="unavailable", message="site a is STARTING")
    out = core.step(ev.ReadRequested(2, b"k"), 1.0, 1_001)
    assert isinstance(out[0], ev.RejectRead) and out[0].error == "unavailable"


def connected_pair() -> tuple[ManualSite, ManualSite]:
    """Two fresh sites, each tracing its actions, connected and reconciled at 1 ms."""
    a, b = (ManualSite(name, config=config(name), wall=1_000, trace=[]) for name in "ab")
    a.start()
    b.start()
    a.now = b.now = 1.0
    connect(a, b)
    return a, b


def test_two_fresh_sites_reconcile_and_replicate_a_write() -> None:
    a, b = connected_pair()
    assert a.core is not None and b.core is not None and a.trace is not None and b.trace is not None
    assert a.core.role is Role.SYNC and b.core.role is Role.SYNC
    assert any(isinstance(x, ev.RoleChanged) and x.new is Role.SYNC for x in a.trace)
    a.trace.clear()
    b.trace.clear()
    a.now = b.now = 6.0
    a.step(ev.WriteRequested(9, b"req", (Operation(b"k", b"v"),)))
    settle(a, b)
    answers = [x for x in a.trace if isinstance(x, ev.AnswerWrite)]
    assert len(answers) == 1 and answers[0].ok and answers[0].handle == 9
    applied_b = [v for x in b.trace if isinstance(x, ev.Persist) for v in x.apply]
    assert [(v.key, v.value) for v in applied_b] == [(b"k", b"v")]
    assert b.value(b"k") == b"v"
    # A retry of the same request id is answered from the dedup table, not applied again.
    out = b.core.step(ev.WriteRequested(10, b"req", (Operation(b"k", b"v"),)), 7.0, 1_000)
    assert out == [ev.AnswerWrite(10, True, ts=answers[0].ts, duplicate=True)]


def test_the_log_finds_a_logged_request_by_its_index() -> None:
    log = ReplicationLog("a", waiters_max=8)

    def record(origin: str, seq: int, request_id: bytes) -> Record:
        return Record(RecordId(origin, 1, seq), 1, seq, request_id, (Operation(b"k%d" % seq, b"v"),))

    own, peer, twin = record("a", 1, b"r1"), record("b", 1, b"r2"), record("b", 2, b"r1")
    for each in (own, peer, twin):
        log.add(each)
    assert log.request_logged(b"r1") and log.request_logged(b"r2") and not log.request_logged(b"r3")
    # An own record committed here (waiting for the peer's confirm) no longer counts; the peer's twin does.
    log.committed_unconfirmed[own.id.seq] = own
    log.resolve(own)
    log.remove(twin)
    assert not log.request_logged(b"r1")
    log.confirmed(log.committed_unconfirmed.pop(own.id.seq))
    assert log.by_request == {b"r2": {peer.id}}
    log.remove(peer)
    assert not log.request_logged(b"r2") and log.by_request == {}
    log.check()


def test_a_read_served_at_once_by_the_shell_is_one_the_core_would_serve_at_once() -> None:
    from replicator.core import reads

    a, b = connected_pair()
    assert a.core is not None and a.trace is not None

    def core_serves_at_once(key: bytes, handle: int) -> bool:
        assert a.trace is not None
        a.trace.clear()
        a.step(ev.ReadRequested(handle, key))
        return any(isinstance(x, ev.ServeRead) and x.handle == handle for x in a.trace)

    def agree(key: bytes, handle: int) -> bool:
        assert a.core is not None
        now = reads.serve_now(a.core, key, a.now)
        assert core_serves_at_once(key, handle) == now, (key, a.core.role, now)
        return now

    assert not agree(b"k", 1)  # SYNC, but no heartbeat answered yet: no lease
    a.now = b.now = 150.0  # a heartbeat goes, its answer brings the lease
    a.step(ev.TimePassed())
    settle(a, b)
    assert agree(b"k", 2)
    a.step(ev.WriteRequested(3, b"r", (Operation(b"k", b"v"),)))  # unresolved: k waits, j does not
    assert not agree(b"k", 4) and agree(b"j", 5)
    settle(a, b)
    assert agree(b"k", 6)
    # Later than the core's clock, past the lease: the shell's clock decides, and refuses.
    lease_until = a.core.reads.lease_until_ms
    assert not reads.serve_now(a.core, b"k", lease_until + 1) and reads.serve_now(a.core, b"k", lease_until - 1)
    a.now = lease_until + 1
    assert not agree(b"k", 7)


def test_local_events_missing_from_the_table_are_protocol_errors() -> None:
    core = fresh()
    core.stop("test")
    with pytest.raises(ProtocolError):
        core.step(ev.TimePassed(), 1.0, 0)


# Every (role, event) pair is driven from real states in tests/test_core_table.py.


def witness() -> WitnessCore:
    return WitnessCore({"p": PairConfig(sites=("a", "b"), preferred="a", preferred_grace_ms=100)})


def answers(actions: list) -> list[msg.WitnessAnswer]:
    return [a.answer for a in actions if isinstance(a, WitnessReply)]


def test_witness_grants_one_site_per_epoch_and_only_after_persisting() -> None:
    core = witness()
    out = core.step(WitnessRequested(1, msg.Arbitrate("p", "a", 1)), 0.0)
    assert answers(out) == []  # waits for the persist
    out = core.step(WitnessPersisted(1), 1.0)
    assert answers(out) == [msg.WitnessAnswer(msg.Verdict.GRANTED, 2, msg.WitnessMode.SOLO, "a")]
    out = core.step(WitnessRequested(2, msg.Arbitrate("p", "b", 1)), 2.0)
    assert answers(out)[0].verdict is msg.Verdict.DENIED
    out = core.step(WitnessRequested(3, msg.Arbitrate("p", "a", 1)), 2.0)
    assert answers(out)[0].verdict is msg.Verdict.GRANTED  # idempotent for the holder


def test_witness_holds_the_non_preferred_site_for_the_grace() -> None:
    core = witness()
    assert answers(core.step(WitnessRequested(1, msg.Arbitrate("p", "b", 1)), 0.0)) == []
    out = core.step(WitnessRequested(2, msg.Arbitrate("p", "a", 1)), 50.0)
    out += core.step(WitnessPersisted(1), 51.0)
    verdicts = {a.holder: a.verdict for a in answers(out)}
    assert [a.verdict for a in answers(out)] == [msg.Verdict.GRANTED, msg.Verdict.DENIED]
    assert verdicts == {"a": msg.Verdict.DENIED} or answers(out)[0].holder == "a"


def test_witness_mark_synced_moves_to_a_new_sync_epoch() -> None:
    core = witness()
    core.step(WitnessRequested(1, msg.Arbitrate("p", "a", 1)), 0.0)
    core.step(WitnessPersisted(1), 0.0)
    assert answers(core.step(WitnessRequested(2, msg.MarkSynced("p", "b", 2)), 0.0))[0].verdict is msg.Verdict.DENIED
    core.step(WitnessRequested(3, msg.MarkSynced("p", "a", 2)), 0.0)
    out = core.step(WitnessPersisted(2), 0.0)
    assert answers(out) == [msg.WitnessAnswer(msg.Verdict.SYNCED, 3, msg.WitnessMode.SYNC, "")]


def test_dedup_entries_expire_by_age_once_the_table_is_large() -> None:
    # 1500 entries written at wall 1_000 ms and 1500 at 500_000 ms; dedup_age_ms is 600_000.
    dedup = {f"old{i}".encode(): (1_000 << 22) | i << 1 for i in range(1500)}
    dedup |= {f"new{i}".encode(): (500_000 << 22) | i << 1 for i in range(1500)}
    core = SiteCore(config(), ev.Recovered(meta={"generation": b"g"}, dedup=dedup))
    core.start(0.0, 1_000)
    core.step(ev.TimePassed(), 1.0, 601_000)  # horizon 1_000: nothing is older
    assert len(core.dedup) == 3000
    core.step(ev.TimePassed(), 2.0, 601_001)  # the old ones are now older than the horizon
    assert set(core.dedup) == {f"new{i}".encode() for i in range(1500)}
    # An entry set again with a newer ts is kept when its first (stale) expiry comes up.
    core.dedup_table.put(b"new0", 900_000 << 22)
    core.step(ev.TimePassed(), 3.0, 1_100_000)  # horizon 500_000: nothing is older
    assert len(core.dedup) == 1500
    core.step(ev.TimePassed(), 4.0, 1_200_000)  # every entry but the renewed one is older
    assert core.dedup == {b"new0": 900_000 << 22}


def test_dedup_table_is_bounded_by_count_as_the_store_is() -> None:
    dedup = {f"r{i}".encode(): (1_000 << 22) | i << 1 for i in range(50)}
    core = SiteCore(
        CoreConfig(site="a", peer="b", pair="p", preferred="a", dedup_entries_max=20),
        ev.Recovered(meta={"generation": b"g"}, dedup=dedup),
    )
    assert set(core.dedup) == {f"r{i}".encode() for i in range(30, 50)}  # the oldest went first
    core.dedup_table.put(b"newest", 2_000 << 22)
    assert len(core.dedup) == 20 and b"newest" in core.dedup and b"r30" not in core.dedup


def test_witness_learns_an_undeclared_pair_from_the_sites_it_sees() -> None:
    from replicator.core.witness import PairLearned, PairNotLearned, SiteSeen

    core = WitnessCore({"p": PairConfig(sites=("a", "b"), preferred="a")}, learned_pairs_max=1)
    assert core.step(SiteSeen("p", "c"), 0.0) == []  # a declared pair is never changed
    assert answers(core.step(WitnessRequested(1, msg.Arbitrate("q", "x", 1)), 0.0))[0].epoch == 0  # unknown
    assert core.step(SiteSeen("q", "x"), 0.0) == [PairLearned("q", ("x", ""))]
    assert core.step(SiteSeen("q", "y"), 0.0) == [PairLearned("q", ("x", "y"))]
    assert core.step(SiteSeen("q", "z"), 0.0) == []  # a third name: not one of its sites, denied below
    assert answers(core.step(WitnessRequested(2, msg.Arbitrate("q", "z", 1)), 0.0))[0].verdict is msg.Verdict.DENIED
    assert core.step(SiteSeen("r", "x"), 0.0) == [PairNotLearned("r", "x", "too many learned pairs")]
    assert core.learned_pairs == 1
    # First come, first served (no preferred site, no grace): y's request is granted at once.
    core.step(WitnessRequested(3, msg.Arbitrate("q", "y", 1)), 0.0)
    assert answers(core.step(WitnessPersisted(1), 0.0)) == [msg.WitnessAnswer(msg.Verdict.GRANTED, 2, msg.WitnessMode.SOLO, "y")]
    # After a restart the learned sites come back from the shell's store.
    again = WitnessCore({}, {"q": core.states["q"]}, learned={"q": ("x", "y")}, learned_pairs_max=1)
    assert again.pairs["q"].sites == ("x", "y") and again.learned_pairs == 1
