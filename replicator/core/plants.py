"""Deliberate protocol bugs, planted to show that the checkers catch them.

Each plant is one member of `Plant`, listed here beside the rule it breaks, and
checked at exactly one place in the core (`Plants.on(Plant.X)`; a test counts
the call sites). A safety predicate never mentions a plant by name: the one
call site sits beside the rule, so editing the rule cannot hide or reveal one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Plant(enum.Enum):
    # value: (what the plant does, the rule it breaks, simulator-only)
    EARLY_VISIBLE = (
        "commit a write at its origin once it is durable locally, before the peer has it",
        "replication.advance_commits: an own record commits only once the peer acked it",
        False,
    )
    NO_LEASE_WAIT = (
        "go on alone right after the witness's grant, without waiting out the leases",
        "takeover.run_timer: a granted site waits until every lease it granted has run out",
        False,
    )
    NO_WITNESS = (
        "go on alone on a peer timeout without asking the witness",
        "witness_client.suspend: going on alone needs the witness's grant",
        False,
    )
    REJOIN_WITHOUT_RESYNC = (
        "let a returning site rejoin without sending it the dirty keys",
        "resync_source: the target gets every dirty and suspect key before MarkSynced",
        False,
    )
    DROP_DIRTY = (
        "forget to mark keys written alone as dirty",
        "SiteCore.dirty_keys: every key written or committed alone is dirty",
        False,
    )
    RECONCILE_EARLY = (
        "in a same-epoch reconcile, commit before the peer holds our records durably",
        "reconcile.maybe_finish: commit only after the peer's ReconcileAck",
        False,
    )
    FORGET_SUSPECT_KEYS = (
        "a resync target does not report the keys of the log it drops",
        "resync_target.on_resync_begin: the keys of the dropped log are reported as suspect",
        False,
    )
    NO_READ_GATE = (
        "serve reads of keys that have a prepared, unresolved record",
        "reads.ReadGate.key_blocked: a key with an unresolved record is not read",
        False,
    )
    NO_READ_LEASE = (
        "serve reads in SYNC without a valid lease",
        "reads.can_serve: SYNC and SUSPENDED serve only under a valid lease",
        False,
    )
    SKIP_ROLLBACK_CHECK = (
        "take a peer restored from an older copy of its disk at its word (no full resync)",
        "session.rolled_back: a peer whose clock is below what it acknowledged gets a full resync",
        False,
    )
    # Only a simulator fault opens its window: real TCP never reorders within a connection
    # (docs/chaos.md, "Seed 61196"; the simulator needs reorder_within_connection).
    ACCEPT_GAPS = (
        "take the peer's records without checking they arrive in sequence (a cumulative ack over a gap)",
        "session.take_in_sequence and the ack/watermark/confirm checks: cumulative messages cover what arrived",
        True,
    )

    # Its window is a crash of the source within a persist's durability of a commit made alone while
    # it serves a resync: one seed in thousands (seed 9377); the simulator's replay shows it caught.
    UNDURABLE_RESYNC = (
        "a resync source sends what it loaded before its own latest persists are durable",
        "resync_source.on_resync_batch_loaded: a target only gets versions durable at the source",
        True,
    )
    # Its window is a crash of the source within a persist's durability of the resync starting: the
    # target has erased its data and the source forgets that a full resync is under way.
    UNDURABLE_RESYNC_BEGIN = (
        "a resync source sends ResyncBegin before the resync's own state is durable",
        "resync_source.begin: a target erases its data only once the source cannot forget the full resync",
        True,
    )

    @property
    def name_in_config(self) -> str:
        return self.name.lower()

    @property
    def description(self) -> str:
        return str(self.value[0])

    @property
    def rule(self) -> str:
        return str(self.value[1])

    @property
    def simulator_only(self) -> bool:
        return bool(self.value[2])


def plant_named(name: str) -> Plant:
    for plant in Plant:
        if plant.name_in_config == name:
            return plant
    raise ValueError(f"plants: unknown {name!r}")


@dataclass(frozen=True, slots=True)
class Plants:
    """The plants switched on for one core."""

    active: frozenset[Plant] = frozenset()

    @classmethod
    def of(cls, names: frozenset[str]) -> Plants:
        return cls(frozenset(plant_named(name) for name in names))

    def on(self, plant: Plant) -> bool:
        return plant in self.active
