"""The transition table: (role, event type) -> (handler function, the exact roles it may lead to).

It is the whole truth of the protocol's control flow. `SiteCore.step` looks the
pair up here: a pair not in the table is a `ProtocolError` for a local event
and a remote protocol error (counted, the session dropped) for a peer message;
after the handler and the timers ran, a role its row does not list is an
`InvariantViolation`. Rows are built role by role from the moves each handler
makes itself and the moves the timers (run after every event) can make from
the roles reached; no role is added to a row for any other reason.
`docs/protocol.md` is generated from this table (`make docs`,
`replicator/core/docgen.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import (
    reads,
    reconcile,
    replication,
    resync_source,
    resync_target,
    session,
    witness_client,
)
from replicator.core.messages import Role

if TYPE_CHECKING:
    from replicator.core.site import SiteCore


def on_tick(core: SiteCore, event: ev.Event) -> None:
    """Nothing but the timers, which run after every event."""


def on_persisted(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.Persisted)
    core.effects.durable(event.persist_id)


def on_persist_failed(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PersistFailed)
    core.stop(f"storage failed: {event.reason}")


Handler = Callable[["SiteCore", ev.Event], None]


@dataclass(frozen=True, slots=True)
class Row:
    """What a (role, event type) pair does: its handler and every role it may move the site to
    (the role it came from is always allowed: staying put is not a move)."""

    handler: Handler
    next_roles: frozenset[Role]
    # The moves the handler makes itself; the rest of next_roles are the timers' (docs only).
    handler_moves: frozenset[Role] = frozenset()


R = Role
# Moves that the timers (run after every event) can make from each role, and from the roles those
# lead to: a peer timeout suspends SYNC, RECONCILE and STARTING (a RECONCILE whose new connection
# never says Hello falls back to STARTING); a resync source that loses its target goes SOLO; a
# granted site (SUSPENDED, STARTING with a confirmed grant, FENCED granted late) takes over, SOLO.
TIMER_MOVES: dict[Role, frozenset[Role]] = {
    R.STARTING: frozenset({R.SUSPENDED, R.SOLO}),
    R.SYNC: frozenset({R.SUSPENDED, R.SOLO}),
    R.RECONCILE: frozenset({R.SUSPENDED, R.STARTING, R.SOLO}),
    R.SUSPENDED: frozenset({R.SOLO}),
    R.FENCED: frozenset({R.SOLO}),
    R.RESYNC_SOURCE: frozenset({R.SOLO}),
}


def _closure(role: Role, moves: frozenset[Role]) -> frozenset[Role]:
    """The roles a step from `role` may end in: the handler's moves, then the timers' moves."""
    reached = set(moves)
    frontier = [role, *moves]
    while frontier:
        for nxt in TIMER_MOVES.get(frontier.pop(), frozenset()):
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    reached.discard(role)
    return frozenset(reached)


# What losing the session makes of a role (a peer's bad message, a Goodbye, a drop).
_SESSION_LOST: dict[Role, frozenset[Role]] = {
    R.RECONCILE: frozenset({R.SUSPENDED, R.STARTING}),
    R.RESYNC_SOURCE: frozenset({R.SOLO}),
}
# A message from another epoch: a newer one fences (outside FENCED and RESYNC_TARGET), an older one
# ends the session.
_FENCES = frozenset({R.STARTING, R.SYNC, R.RECONCILE, R.SUSPENDED, R.SOLO, R.RESYNC_SOURCE})


def _epoch_checked(role: Role) -> frozenset[Role]:
    fenced = frozenset({R.FENCED}) if role in _FENCES else frozenset()
    return fenced | _SESSION_LOST.get(role, frozenset())


# The answer to an outstanding MarkSynced moves the site to SYNC (or FENCED when refused) from
# whatever role it came to while the question was out.
_MARK_SYNCED_ANSWER = frozenset({R.SYNC, R.FENCED})
_WITNESS_ANSWER: dict[Role, frozenset[Role]] = {
    R.STARTING: frozenset({R.SUSPENDED, R.FENCED}),  # adopt a SYNC epoch, or denied
    R.SYNC: frozenset({R.SUSPENDED}),  # a late grant
    R.RECONCILE: frozenset({R.SUSPENDED}),  # a late grant
    R.SUSPENDED: frozenset({R.FENCED}),  # denied (adopting stays SUSPENDED)
    R.SOLO: frozenset(),
    R.FENCED: frozenset({R.SUSPENDED}),  # adopt a SYNC epoch
    R.RESYNC_SOURCE: frozenset(),
    R.RESYNC_TARGET: frozenset({R.SUSPENDED}),  # adopt a SYNC epoch
}
_HELLO: dict[Role, frozenset[Role]] = {
    R.STARTING: frozenset({R.RECONCILE, R.SUSPENDED}),
    R.SYNC: frozenset({R.RECONCILE, R.FENCED, R.SUSPENDED}),
    R.RECONCILE: frozenset({R.FENCED}) | _SESSION_LOST[R.RECONCILE],
    R.SUSPENDED: frozenset({R.RECONCILE, R.FENCED}),
    R.SOLO: frozenset({R.RESYNC_SOURCE, R.FENCED}),
    R.FENCED: frozenset(),
    R.RESYNC_SOURCE: frozenset({R.FENCED}) | _SESSION_LOST[R.RESYNC_SOURCE],
    R.RESYNC_TARGET: frozenset(),
}
_GOODBYE_FENCES = frozenset({R.STARTING, R.SYNC, R.RECONCILE, R.SUSPENDED})
_RESYNC_SYNCED: dict[Role, frozenset[Role]] = {
    R.STARTING: frozenset({R.RECONCILE}),
    R.FENCED: frozenset({R.RECONCILE}),
    R.RESYNC_TARGET: frozenset({R.SYNC}),
}
_NONE: frozenset[Role] = frozenset()


def _rows_of(role: Role) -> dict[type, tuple[Handler, frozenset[Role]]]:
    """Every event type `role` takes, with its handler and the moves the handler itself makes."""
    lost = _SESSION_LOST.get(role, _NONE)
    checked = _epoch_checked(role)
    rows: dict[type, tuple[Handler, frozenset[Role]]] = {
        ev.WriteRequested: (replication.on_write, _NONE),
        ev.ReadRequested: (reads.on_read, _NONE),
        ev.TimePassed: (on_tick, _NONE),
        ev.Persisted: (on_persisted, frozenset({R.SYNC}) if role is R.RECONCILE else _NONE),
        ev.PersistFailed: (on_persist_failed, frozenset({R.STOPPED})),
        ev.PeerConnected: (session.on_connected, _NONE),
        ev.PeerDisconnected: (session.on_disconnected, lost),
        ev.WitnessAnswered: (witness_client.on_witness_answered, _WITNESS_ANSWER[role] | _MARK_SYNCED_ANSWER),
        ev.WitnessFailed: (witness_client.on_witness_failed, _NONE),
        ev.ResyncBatchLoaded: (resync_source.on_resync_batch_loaded, _NONE),
        msg.Hello: (session.on_hello, _HELLO[role] | lost),
        msg.Goodbye: (session.on_goodbye, (frozenset({R.FENCED}) if role in _GOODBYE_FENCES else _NONE) | lost),
        msg.Heartbeat: (session.on_heartbeat, checked),
        msg.HeartbeatAck: (session.on_heartbeat_ack, checked),
    }
    if role in (R.SYNC, R.RECONCILE, R.RESYNC_SOURCE, R.RESYNC_TARGET):
        rows[msg.ShipRecords] = (replication.on_ship_records, checked)
        rows[msg.PreparedAck] = (replication.on_prepared_ack, checked)
        rows[msg.CommitWatermark] = (replication.on_commit_watermark, checked)
        rows[msg.CommitConfirm] = (replication.on_commit_confirm, checked)
    if role in (R.STARTING, R.SUSPENDED, R.FENCED):
        rows[ev.FailoverForced] = (witness_client.on_failover_forced, _NONE)
    if role in (R.STARTING, R.SUSPENDED, R.FENCED, R.RESYNC_TARGET):
        rows[msg.ResyncBegin] = (resync_target.on_resync_begin, frozenset({R.RESYNC_TARGET}))
    if role in _RESYNC_SYNCED:
        rows[msg.ResyncSynced] = (resync_target.on_resync_synced, _RESYNC_SYNCED[role])
    if role is R.RECONCILE:
        rows[msg.ReconcileDone] = (reconcile.on_reconcile_done, checked)
        rows[msg.ReconcileAck] = (reconcile.on_reconcile_ack, checked)
    if role is R.RESYNC_SOURCE:
        rows[msg.ResyncBeginAck] = (resync_source.on_resync_begin_ack, checked)
        rows[msg.ResyncAck] = (resync_source.on_resync_ack, checked)
    if role is R.RESYNC_TARGET:
        rows[msg.ResyncData] = (resync_target.on_resync_data, checked)
        rows[msg.ResyncDedup] = (resync_target.on_resync_dedup, checked)
    return rows


def _build_table() -> dict[tuple[Role, type], Row]:
    table: dict[tuple[Role, type], Row] = {}
    for role in Role:
        if role is R.STOPPED:
            continue  # a stopped site takes nothing
        for kind, (handler, moves) in _rows_of(role).items():
            # A persist failure stops the site at once: no timer runs after it.
            nxt = moves if kind is ev.PersistFailed else _closure(role, moves)
            table[(role, kind)] = Row(handler, nxt, moves - {role})
    return table


# The whole truth: (role, event type) -> Row.
TRANSITIONS: dict[tuple[Role, type], Row] = _build_table()
NEXT_ROLES: dict[tuple[Role, type], frozenset[Role]] = {key: row.next_roles for key, row in TRANSITIONS.items()}
