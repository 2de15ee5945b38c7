"""The transition table is the whole truth: every (role, event) pair either moves the site to a
role its row lists or raises the protocol error, and the guard refuses any other move."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.sim.manual import ManualSite
from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.config import CoreConfig
from replicator.core.errors import InvariantViolation, ProtocolError, ProtocolErrorKind
from replicator.core.messages import Role
from replicator.core.records import Operation
from replicator.core.site import SiteCore
from replicator.core.table import TRANSITIONS

CORE = pathlib.Path(__file__).resolve().parent.parent / "replicator" / "core"
FUNCTION_LINES_MAX = 70


def config(site: str) -> CoreConfig:
    return CoreConfig(site=site, peer="b" if site == "a" else "a", pair="p", preferred="a")


class Pair:
    """Two sites driven by the one SiteDriver, a perfect link and disks synced as soon as asked."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sites = {name: ManualSite(name, config=config(name), wall=1_000) for name in "ab"}
        for site in self.sites.values():
            site.start()
        self.cores = {name: site.core for name, site in self.sites.items() if site.core is not None}
        self.settle()

    @property
    def asked(self) -> dict[str, list[msg.WitnessRequest]]:
        return {name: site.asks for name, site in self.sites.items()}

    def step(self, name: str, event: ev.Event) -> None:
        site = self.sites[name]
        site.now = self.now
        site.step(event)

    def settle(self) -> None:
        for _ in range(500):
            moved = False
            for name, site in self.sites.items():
                other = "b" if name == "a" else "a"
                if site.driver is not None and site.driver.unsynced:
                    moved = True
                    site.now = self.now
                    site.sync()
                messages, site.outbox = site.outbox, []
                for message in messages:
                    moved = True
                    self.step(other, ev.PeerSent(message))
            if not moved:
                return
        raise AssertionError("did not settle")

    def tick(self, ms: float) -> None:
        self.now += ms
        for name in "ab":
            self.step(name, ev.TimePassed())
        self.settle()

    def connect(self) -> None:
        for name in "ab":
            self.step(name, ev.PeerConnected())
        self.settle()

    def cut(self) -> None:
        for name in "ab":
            self.step(name, ev.PeerDisconnected())
        self.settle()

    def answer(self, name: str, verdict: msg.Verdict, epoch: int, mode: msg.WitnessMode, holder: str) -> None:
        request = self.asked[name][-1]
        self.step(name, ev.WitnessAnswered(request, msg.WitnessAnswer(verdict, epoch, mode, holder)))
        self.settle()


def reach(role: Role) -> SiteCore:
    """A core that really is in `role`, reached through the protocol (no attribute set by hand)."""
    pair = Pair()
    a, b = pair.cores["a"], pair.cores["b"]
    if role is Role.STARTING:
        return a
    if role is Role.RECONCILE:
        for name in "ab":
            pair.step(name, ev.PeerConnected())
        hello = pair.sites["b"].outbox[0]
        for site in pair.sites.values():
            site.outbox.clear()
        pair.step("a", ev.PeerSent(hello))
        return a
    pair.connect()
    pair.tick(1.0)
    if role is Role.SYNC:
        return a
    pair.step("a", ev.WriteRequested(1, b"r1", (Operation(b"k", b"v"),)))
    pair.settle()
    pair.cut()
    pair.tick(3_000.0)
    if role is Role.SUSPENDED:
        return a
    if role is Role.FENCED:
        pair.answer("b", msg.Verdict.DENIED, 2, msg.WitnessMode.SOLO, "a")
        return b
    pair.answer("a", msg.Verdict.GRANTED, 2, msg.WitnessMode.SOLO, "a")
    pair.tick(3_000.0)
    if role is Role.SOLO:
        return a
    pair.connect()
    if role is Role.RESYNC_SOURCE:
        return a
    if role is Role.RESYNC_TARGET:
        return b
    assert role is Role.STOPPED
    a.step(ev.PersistFailed("disk gone"), pair.now, 1_000)
    return a


EVENTS: list[ev.Event] = [
    ev.WriteRequested(1, b"r", (Operation(b"k", b"v"),)),
    ev.WriteRequested(2, b"r2", ()),
    ev.ReadRequested(2, b"k"),
    ev.TimePassed(),
    ev.PeerConnected(),
    ev.PeerDisconnected(),
    ev.Persisted(1),
    ev.PersistFailed("disk"),
    ev.FailoverForced(),
    ev.WitnessFailed(msg.Arbitrate("p", "a", 1)),
    ev.WitnessAnswered(msg.Arbitrate("p", "a", 1), msg.WitnessAnswer(msg.Verdict.DENIED, 2, msg.WitnessMode.SOLO, "b")),
    ev.ResyncBatchLoaded(1, (), None),
    ev.PeerSent(msg.Heartbeat(1, 1)),
    ev.PeerSent(msg.Heartbeat(2, 1)),
    ev.PeerSent(msg.HeartbeatAck(1, 1, True)),
    ev.PeerSent(msg.ShipRecords(1, ())),
    ev.PeerSent(msg.PreparedAck(1, 1, 1)),
    ev.PeerSent(msg.CommitWatermark(1, 1, 1)),
    ev.PeerSent(msg.CommitConfirm(1, 1, 1)),
    ev.PeerSent(msg.ReconcileDone(1, 1)),
    ev.PeerSent(msg.ReconcileAck(1)),
    ev.PeerSent(msg.ResyncBegin(2, False, 1)),
    ev.PeerSent(msg.ResyncBegin(3, True, 1)),
    ev.PeerSent(msg.ResyncBeginAck(2, (), 1)),
    ev.PeerSent(msg.ResyncData(2, 1, ())),
    ev.PeerSent(msg.ResyncDedup(2, ())),
    ev.PeerSent(msg.ResyncAck(2, 1)),
    ev.PeerSent(msg.ResyncSynced(2)),
    ev.PeerSent(msg.ResyncSynced(3)),
    ev.PeerSent(msg.Goodbye(1, msg.GoodbyeReason.SHUTDOWN)),
    ev.PeerSent(msg.Goodbye(3, msg.GoodbyeReason.STALE_EPOCH)),
    ev.PeerSent(msg.Hello(1, "b", "p", Role.SYNC, 1, b"bbbb", 0)),
    ev.PeerSent(msg.Hello(2, "b", "p", Role.SOLO, 1, b"bbbb", 0)),
    ev.PeerSent(msg.Hello(1, "a", "p", Role.SYNC, 1, b"aaaa", 0)),
]


def kind_of(event: ev.Event) -> type:
    return type(event.message) if isinstance(event, ev.PeerSent) else type(event)


def take(core: SiteCore, event: ev.Event, now: float) -> None:
    """One step, checked against the table from outside as well as by the core's own guard."""
    before = core.role
    row = TRANSITIONS.get((before, kind_of(event)))
    errors = core.protocol_errors
    try:
        core.step(event, now, 1_000)
    except ProtocolError as error:
        # A local event the role cannot take, or one that is wrong in itself (a persist never issued,
        # a refused forced failover, a stopped site): never a role change.
        assert not isinstance(event, ev.PeerSent), error
        assert core.role is before
        assert row is None or error.kind is not ProtocolErrorKind.NOT_IN_TABLE
        return
    if row is None:
        assert isinstance(event, ev.PeerSent)
        assert core.protocol_errors == errors + 1  # a remote error: counted, the session dropped
        dropped = TRANSITIONS[(before, ev.PeerDisconnected)].next_roles  # as if the link went down
        assert core.role is before or core.role in dropped
    else:
        assert core.role is before or core.role in row.next_roles


ROLES = list(Role)


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_every_role_is_reached_through_the_protocol(role: Role) -> None:
    assert reach(role).role is role


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_every_role_event_pair_moves_as_its_row_says_or_raises(role: Role) -> None:
    for event in EVENTS:
        core = reach(role)
        if role is Role.STOPPED:
            with pytest.raises(ProtocolError) as raised:
                core.step(event, 1e6, 1_000)
            assert raised.value.kind is ProtocolErrorKind.STOPPED
            continue
        take(core, event, core.now_ms + 1.0)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ROLES[:-1]), st.lists(st.tuples(st.sampled_from(EVENTS), st.floats(0, 1_500)), max_size=25))
def test_random_sequences_from_every_role_stay_in_the_table(role: Role, sequence: list[tuple[ev.Event, float]]) -> None:
    core = reach(role)
    now = core.now_ms
    for event, elapsed in sequence:
        if core.role is Role.STOPPED:
            with pytest.raises(ProtocolError):
                core.step(event, now, 1_000)
            return
        now += elapsed
        take(core, event, now)


def test_the_guard_refuses_a_move_its_row_does_not_list(monkeypatch: pytest.MonkeyPatch) -> None:
    # SYNC --PersistFailed--> STOPPED is in the table; with the row narrowed, the same move trips the guard.
    key = (Role.SYNC, ev.PersistFailed)
    narrowed = dataclasses.replace(TRANSITIONS[key], next_roles=frozenset())
    monkeypatch.setitem(TRANSITIONS, key, narrowed)
    core = reach(Role.SYNC)
    with pytest.raises(InvariantViolation, match="not in the transition table"):
        core.step(ev.PersistFailed("disk"), core.now_ms, 1_000)


def test_no_row_adds_a_blanket_of_failure_roles() -> None:
    # The write and read paths never move the site but by their timers, and the replication
    # messages of a resync target never move it at all: rows differ, role by role.
    assert TRANSITIONS[(Role.SOLO, ev.WriteRequested)].next_roles == frozenset()
    assert TRANSITIONS[(Role.RESYNC_TARGET, msg.ResyncData)].next_roles == frozenset()
    assert TRANSITIONS[(Role.SYNC, ev.WriteRequested)].next_roles == frozenset({Role.SUSPENDED, Role.SOLO})
    distinct = {row.next_roles for row in TRANSITIONS.values()}
    assert len(distinct) >= 10


def test_table_rows_name_functions_not_strings() -> None:
    assert all(callable(row.handler) and not isinstance(row.handler, str) for row in TRANSITIONS.values())
    # No dispatch by name anywhere in the core (config.py's validation loop over its own fields aside).
    calls = [
        f"{path.name}:{node.lineno}"
        for path in sorted(CORE.glob("**/*.py"))
        if path.name != "config.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "eval")
    ]
    assert calls == []


def test_no_function_in_the_core_is_longer_than_70_lines() -> None:
    long = []
    for path in sorted(CORE.glob("**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > FUNCTION_LINES_MAX:
                    long.append(f"{path.relative_to(CORE)}:{node.lineno} {node.name} {lines} lines")
    assert long == []


def test_each_plant_is_checked_at_exactly_one_place() -> None:
    from replicator.core.plants import Plant

    sites: dict[str, list[str]] = {plant.name: [] for plant in Plant}
    for path in sorted(CORE.glob("**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "on"
                and node.args
                and isinstance(node.args[0], ast.Attribute)
                and isinstance(node.args[0].value, ast.Name)
                and node.args[0].value.id == "Plant"
            ):
                sites[node.args[0].attr].append(f"{path.name}:{node.lineno}")
    assert {name: len(where) for name, where in sites.items()} == {plant.name: 1 for plant in Plant}, sites
    # No plant is named by its string anywhere in the core outside plants.py.
    for path in sorted(CORE.glob("**/*.py")):
        if path.name != "plants.py":
            text = path.read_text()
            assert not [plant for plant in Plant if f'"{plant.name_in_config}"' in text], path.name


def test_invariants_stay_on_without_assert_statements() -> None:
    # The invariant checks raise InvariantViolation explicitly (python -O strips `assert`).
    from replicator.core.errors import invariant

    with pytest.raises(InvariantViolation, match="broken"):
        invariant(False, "broken")
    core = reach(Role.SYNC)
    core.replication.key_pending[b"ghost"] = 1  # a key blocked by no record
    with pytest.raises(InvariantViolation, match="key_pending"):
        core.replication.check()  # as every whole-log commit and resync drop does
    del core.replication.key_pending[b"ghost"]
    # The paired check at every change: a record resolves once.
    core.step(ev.WriteRequested(7, b"r7", (Operation(b"k7", b"v"),)), core.now_ms, 1_000)
    record = next(iter(core.replication.records.values()))
    core.replication.resolve(record)
    with pytest.raises(InvariantViolation, match="resolved but not unresolved"):
        core.replication.resolve(record)


def test_a_takeover_checks_the_whole_log() -> None:
    # reach(SOLO) goes through a takeover whose log held a write: the check ran and passed, and
    # nothing is left unresolved.
    core = reach(Role.SOLO)
    assert not core.replication.records and not core.replication.unresolved


def test_the_durable_persist_id_never_passes_the_next_one() -> None:
    core = reach(Role.SYNC)
    with pytest.raises(ProtocolError) as raised:
        core.step(ev.Persisted(core.effects.next_persist_id), core.now_ms, 1_000)
    assert raised.value.kind is ProtocolErrorKind.PERSIST_NEVER_ISSUED


def test_a_commit_outside_the_committing_roles_is_refused() -> None:
    from replicator.core.standing import CommitKind

    core = reach(Role.SUSPENDED)
    with pytest.raises(InvariantViolation, match="ACKED commit decided in SUSPENDED"):
        core.decide_commit(CommitKind.ACKED)


def test_a_message_over_the_byte_bound_is_refused_where_it_is_sent() -> None:
    core = reach(Role.SYNC)
    keys = tuple(bytes([i % 256]) * 1000 + i.to_bytes(4, "big") for i in range(core.config.message_bytes_max // 1000 + 10))
    with pytest.raises(InvariantViolation, match="exceeds message_bytes_max"):
        core.send(msg.ResyncBeginAck(core.epoch, keys, 1))


def test_docs_protocol_md_is_generated_from_the_table() -> None:
    from replicator.core import docgen

    committed = (CORE.parent.parent / "docs" / "protocol.md").read_text()
    assert committed == docgen.render(), "docs/protocol.md is stale: run `make docs` and commit it"
    for (_role, kind), row in TRANSITIONS.items():  # the matrix names every row
        assert f"| `{kind.__name__}` | `{row.handler.__module__.rsplit('.', 1)[-1]}.{row.handler.__name__}` |" in committed
