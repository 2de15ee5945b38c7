"""Resync, the target side: a site behind the grant holder takes its data.

Theory of operation. A ResyncBegin from a site ahead of us (a newer epoch, or
this epoch's grant holder) fences us, then makes us RESYNC_TARGET of its
epoch: we drop our whole log, since nothing in it was ever visible without
the source having it, and our own writes in flight end with an unknown
outcome. The keys of the dropped log stay suspect (in our own dirty set,
durably, reported with every ResyncBeginAck), since a source that crashes may
forget them. Only once that is durable do we acknowledge, cut by bytes into
parts, the last one carrying our next seq. We apply the batches and the
dedup entries as they come and acknowledge each batch once durable. The
source's ResyncSynced(e+1) ends it: our suspect keys are resolved, and we
are SYNC (or, having fallen back to FENCED or STARTING, reconcile in the
new epoch). The standing RESYNC_TARGET is durable: a restart resumes it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import reconcile, replication, takeover
from replicator.core.errors import RemoteErrorKind, WriteError
from replicator.core.messages import Role
from replicator.core.plants import Plant
from replicator.core.sizes import cut, key_bytes
from replicator.core.standing import Standing

if TYPE_CHECKING:
    from replicator.core.session import Session
    from replicator.core.site import SiteCore


def _drop_log(core: SiteCore) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Drop every record and write in flight; return (newly suspect keys, all suspect keys)."""
    log = core.replication
    dropped_keys = {key for record in log.records.values() for key in record.keys()}
    new_suspect = tuple(sorted(dropped_keys - core.dirty))
    core.dirty.update(dropped_keys)
    suspect = tuple(sorted(core.dirty))
    if core.plants.on(Plant.FORGET_SUSPECT_KEYS):
        suspect = ()
    for pending in list(log.pending.values()):
        for handle in pending.handles:
            core.reject_write(handle, WriteError.UNKNOWN, "outcome unknown: resync")
    log.drop_all()
    return new_suspect, suspect


def on_resync_begin(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncBegin)
    begin = event.message
    if not core.session_up():
        return
    if begin.epoch < core.epoch or core.holds_grant and begin.epoch == core.epoch:
        core.protocol_violation(RemoteErrorKind.RESYNC_BEGIN_NOT_AHEAD, "ResyncBegin from a site that is not ahead")
        return
    # Everything in our log is unresolved and was never visible without the
    # source having it: drop it. Outcome of our own writes: unknown.
    takeover.fence(core, "resync begins")
    dropped = tuple(core.replication.records)
    new_suspect, suspect = _drop_log(core)
    core.epoch = begin.epoch
    core.standing = Standing.RESYNC_TARGET
    # Nothing of ours is in flight any more: acknowledgements start over.
    core.peer_acked_seq = core.next_seq - 1
    core.set_role(Role.RESYNC_TARGET, f"resync from {core.config.peer} (full={begin.full})")
    session = core.session
    core.peer_generation = session.peer.generation if session is not None and session.peer is not None else b""
    persist_id = core.persist(
        log_delete=dropped,
        dirty_add=new_suspect,
        clear_data=begin.full,
        meta=(("epoch", core.epoch), ("target", 1), ("grant", 0), ("peer_generation", core.peer_generation)),
    )
    assert session is not None
    session.peer_next_seq = begin.next_seq
    parts = cut(suspect, key_bytes, core.config.message_bytes_max, len(suspect) or 1) or [()]
    core.after(persist_id, functools.partial(_acknowledge, core, session, parts, core.next_seq))


def _acknowledge(core: SiteCore, session: Session, parts: list[tuple[bytes, ...]], next_seq: int) -> None:
    # Every part but the last says "more follow" with next_seq 0 (seqs start at 1).
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        core.send_in(session, msg.ResyncBeginAck(core.epoch, part, next_seq if last else 0))


def on_resync_data(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncData)
    data = event.message
    if not core.session_up() or not replication.check_epoch(core, data.epoch):
        return
    for entry in data.entries:
        core.hlc.observe(entry.ts)
    persist_id = core.persist(apply=data.entries, meta=(("clock_high", core.hlc.high_water),))
    core.after(persist_id, functools.partial(_acknowledge_batch, core, core.session, data.batch))


def _acknowledge_batch(core: SiteCore, session: Session | None, batch: int) -> None:
    core.send_in(session, msg.ResyncAck(core.epoch, batch))


def on_resync_dedup(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncDedup)
    if not core.session_up() or not replication.check_epoch(core, event.message.epoch):
        return
    fresh = tuple((r, ts) for r, ts in event.message.entries if r not in core.dedup_table)
    for request_id, ts in fresh:
        core.dedup_table.put(request_id, ts)
    if fresh:
        core.persist(dedup_put=fresh)


def on_resync_synced(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncSynced)
    synced = event.message
    if not core.session_up() or synced.epoch != core.epoch + 1 or not core.is_target:
        core.protocol_violation(RemoteErrorKind.RESYNC_SYNCED_UNEXPECTED, f"ResyncSynced({synced.epoch}) in epoch {core.epoch}")
        return
    core.epoch = synced.epoch
    core.standing = Standing.PEER
    core.synced_epoch = synced.epoch
    resolved = tuple(sorted(core.dirty))  # our suspect keys: the source has sent them all
    core.dirty.clear()
    core.persist(
        dirty_remove=resolved,
        meta=(("epoch", core.epoch), ("target", 0), ("grant", 0), ("synced_epoch", synced.epoch)),
    )
    core.last_heard_ms = core.now_ms
    if core.role is Role.RESYNC_TARGET:
        core.set_role(Role.SYNC, f"resynchronised, SYNC {core.epoch}")
    else:
        # We had fallen back to FENCED/STARTING: meet again in the new epoch.
        reconcile.begin(core)
