"""Reconcile: two sites of the same epoch, neither holding a grant, agree on their logs.

Theory of operation. On the Hello of a new connection in the same epoch, each
site ships every record of its log (cut by bytes and by count) and then a
ReconcileDone with its next seq. Each persists what it got and, once that is
durable, answers ReconcileAck: "your records are durable here". A site that
has sent its ReconcileAck and received the peer's now knows that both logs
are durable at both sites, and commits its whole log (both sites commit the
same union, one record per request id) and goes SYNC once that commit is
durable. The phase object lives in the session: a lost connection ends it,
and the site falls back to SUSPENDED (it still holds a read lease) or
STARTING.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import reads, replication
from replicator.core.messages import Role
from replicator.core.plants import Plant
from replicator.core.records import record_wire_bytes
from replicator.core.sizes import cut

if TYPE_CHECKING:
    from replicator.core.session import Session
    from replicator.core.site import SiteCore


@dataclass(slots=True)
class Reconcile:
    shipped_ts: int = 0  # the newest ts we shipped: the peer holds it durably once it acks
    peer_done_persist: int | None = None  # persist id covering the peer's records
    ack_sent: bool = False
    ack_received: bool = False
    commit_persist: int | None = None


def begin(core: SiteCore) -> None:
    session = core.session
    assert session is not None and session.peer is not None
    core.set_role(Role.RECONCILE, "met the peer in the same epoch")
    # The peer's Hello on a new connection (which needs both directions) is news of it: the
    # silence before, a link cut say, does not count against the reconcile.
    core.last_heard_ms = core.now_ms
    records = core.replication.sorted_records()
    session.reconcile = Reconcile(shipped_ts=max((record.ts for record in records), default=0))
    config = core.config
    for part in cut(records, record_wire_bytes, config.message_bytes_max, config.reconcile_records_per_message_max):
        core.send(msg.ShipRecords(core.epoch, part, reconcile=True))
    core.send(msg.ReconcileDone(core.epoch, core.next_seq))


def _phase(core: SiteCore) -> Reconcile:
    """This session's reconcile (a RECONCILE site whose new connection did not begin one yet
    answers with an empty phase, as it ships nothing)."""
    session = core.session
    assert session is not None
    if session.reconcile is None:
        session.reconcile = Reconcile()
    return session.reconcile


def on_reconcile_done(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ReconcileDone)
    if not core.session_up() or not replication.check_epoch(core, event.message.epoch):
        return
    session = core.session
    assert session is not None
    session.peer_next_seq = event.message.next_seq
    persist_id = core.effects.last_issued()
    _phase(core).peer_done_persist = persist_id
    core.after(persist_id, functools.partial(_send_ack, core))


def _send_ack(core: SiteCore) -> None:
    session = core.session
    if session is None or core.role is not Role.RECONCILE or session.reconcile is None:
        return
    if session.reconcile.peer_done_persist is None:
        return
    core.send(msg.ReconcileAck(core.epoch))
    session.reconcile.ack_sent = True
    maybe_finish(core)


def on_reconcile_ack(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ReconcileAck)
    if not core.session_up() or not replication.check_epoch(core, event.message.epoch):
        return
    phase = _phase(core)
    phase.ack_received = True
    core.raise_peer_clock_floor(phase.shipped_ts)
    maybe_finish(core)


def maybe_finish(core: SiteCore) -> None:
    session = core.session
    if session is None or session.reconcile is None:
        return
    phase = session.reconcile
    peer_holds_ours = phase.ack_received or core.plants.on(Plant.RECONCILE_EARLY)
    if not phase.ack_sent or not peer_holds_ours or phase.commit_persist is not None:
        return
    # Both logs are now durable at both sites: commit everything in ours.
    records = core.replication.sorted_records()
    assert session.peer is not None
    if not core.peer_generation:
        # Recorded only now that the two sites hold the same data: a site
        # that never got this far never goes on alone (see witness_client.suspend).
        core.peer_generation = session.peer.generation
        core.persist(meta=(("peer_generation", core.peer_generation),))
    persist_id = replication.commit_whole_log(core, records, alone=False)
    phase.commit_persist = persist_id
    core.after(persist_id, functools.partial(_finish, core, session))


def _finish(core: SiteCore, session: Session) -> None:
    if core.session is session and core.role is Role.RECONCILE:
        core.last_heard_ms = core.now_ms
        session.reconcile = None
        core.set_role(Role.SYNC, "reconciled")
        reads.wake(core)
