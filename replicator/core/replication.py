"""The write path: records made, shipped, prepared, acknowledged, committed and confirmed.

Theory of operation. In SYNC (and RESYNC_SOURCE) a write becomes a record of
this incarnation with the next seq and a fresh HLC ts; it is persisted to the
local log and shipped to the peer at once. The peer takes the records of our
incarnation strictly in sequence (a gap or a repeat is a remote protocol
error), persists them as prepared and acks cumulatively once durable. We
commit our own records in seq order once each is durable here and acked,
answer the clients, and send a cumulative CommitWatermark; the peer applies
the records it prepared up to it, and confirms once durable, and only then do
we forget them. In SOLO a write commits alone once durable, its keys dirty.

A whole-log commit (reconcile, takeover, a lost resync target) commits every
record in the log; a request id that appears twice (a retry at the other site
while the origin crashed) commits once, by a deterministic rule both sites
apply (see `winners`).

Retries. A client's retry carries the request id of its first try. At the
site that committed it, the dedup table answers it (duplicate). At the site
where it is in flight, it joins the pending write and gets the same answer.
Where its record waits in the log (shipped by the peer, not yet resolved),
it waits for that record. A write whose answer never came (a timeout) may
still be on its way to the other site, so a client retries it where it sent
it first: only there is the first try sure to be found.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import reads, takeover
from replicator.core.errors import RemoteErrorKind, WriteError
from replicator.core.messages import Role
from replicator.core.plants import Plant
from replicator.core.records import Record, RecordId, Versioned, record_wire_bytes
from replicator.core.standing import CommitKind

if TYPE_CHECKING:
    from replicator.core.session import Session
    from replicator.core.site import SiteCore

SERVING_WRITES = frozenset({Role.SYNC, Role.SOLO, Role.RESYNC_SOURCE})


def versions(record: Record) -> tuple[Versioned, ...]:
    return tuple(Versioned(operation.key, record.ts, operation.value) for operation in record.operations)


def _refusal(core: SiteCore, event: ev.WriteRequested) -> tuple[WriteError, str] | None:
    if core.role not in SERVING_WRITES or core.takeover is not None or core.mark_synced is not None:
        return WriteError.UNAVAILABLE, f"site {core.config.site} is {core.role.name}"
    if core.role is Role.SYNC and not core.session_up():
        return WriteError.UNAVAILABLE, "peer link is down"
    if len(core.replication.pending) >= core.config.inflight_records_max:
        return WriteError.OVERLOADED, "too many writes in flight"
    if not event.operations:
        return WriteError.INVALID, "a write needs at least one operation"
    return None


def on_write(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.WriteRequested)
    log = core.replication
    known = core.dedup_table.get(event.request_id)
    if known is not None:
        core.emit(ev.AnswerWrite(event.handle, True, ts=known, duplicate=True))
        return
    if log.join_pending(event.request_id, event.handle):
        return
    if log.request_logged(event.request_id):
        if not log.wait_for_logged(event.request_id, event.handle):
            core.reject_write(event.handle, WriteError.OVERLOADED, "too many retries wait for logged records")
        return
    refusal = _refusal(core, event)
    if refusal is not None:
        core.reject_write(event.handle, *refusal)
        return
    record = Record(
        id=RecordId(core.config.site, core.incarnation, core.next_seq),
        epoch=core.epoch,
        ts=core.hlc.next(core.wall_ms),
        request_id=event.request_id,
        operations=event.operations,
    )
    size = record_wire_bytes(record)
    if size > core.config.message_bytes_max:
        limit = core.config.message_bytes_max
        core.reject_write(event.handle, WriteError.INVALID, f"a write of {size} bytes exceeds message_bytes_max {limit}")
        return
    core.next_seq += 1
    if core.role is Role.SOLO:
        _write_alone(core, record, event.handle)
    else:
        _write_shipped(core, record, event.handle)


def _write_alone(core: SiteCore, record: Record, handle: int) -> None:
    core.decide_commit(CommitKind.ALONE)
    dirty = core.dirty_keys(record.keys())
    persist_id = core.persist(
        apply=versions(record),
        dirty_add=dirty,
        dedup_put=((record.request_id, record.ts),),
        meta=(("clock_high", core.hlc.high_water),),
    )
    core.dirty.update(dirty)
    core.replication.add_pending(record, handle, persist_id, alone=True)
    core.after(persist_id, functools.partial(_commit_own_alone, core, record.id.seq))


def _write_shipped(core: SiteCore, record: Record, handle: int) -> None:
    """SYNC or RESYNC_SOURCE: local log and peer in parallel."""
    persist_id = core.persist(log_put=(record,), meta=(("clock_high", core.hlc.high_water),))
    core.replication.add(record)
    core.replication.add_pending(record, handle, persist_id, alone=False)
    if core.session is not None:
        core.session.shipped_last_seq = record.id.seq
    core.send(msg.ShipRecords(core.epoch, (record,)))
    core.after(persist_id, functools.partial(advance_commits, core))


def _commit_own_alone(core: SiteCore, seq: int) -> None:
    pending = core.replication.pop_pending(seq)
    if pending is None:
        return
    record = pending.record
    core.replication.resolve(record)
    core.dedup_table.put(record.request_id, record.ts)
    core.emit(ev.Committed(record.id, core.epoch, core.role, alone=True))
    for handle in pending.handles:
        core.emit(ev.AnswerWrite(handle, True, ts=record.ts))
    reads.wake(core)


def on_ship_records(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ShipRecords)
    ship = event.message
    if not core.session_up() or not check_epoch(core, ship.epoch):
        return
    if not ship.reconcile:
        problem = take_in_sequence(core, ship.records)
        if problem is not None:
            core.protocol_violation(RemoteErrorKind.OUT_OF_SEQUENCE, problem)
            return
    log = core.replication
    fresh = [record for record in ship.records if record.id not in log.records]
    for record in ship.records:
        core.hlc.observe(record.ts)
    for record in fresh:
        log.add(record)
        if not ship.reconcile:
            log.peer_records[(record.id.incarnation, record.id.seq)] = record
    persist_id = core.persist(log_put=tuple(fresh), meta=(("clock_high", core.hlc.high_water),))
    if ship.reconcile:
        return
    if ship.records:
        last = ship.records[-1].id
        core.pending_peer_acks.append((persist_id, last.incarnation, last.seq))
        core.after(persist_id, functools.partial(_send_prepared_acks, core))


def take_in_sequence(core: SiteCore, records: tuple[Record, ...]) -> str | None:
    """What a PreparedAck relies on: the peer's records arrived in sequence, none missing.

    The ack is cumulative (it covers every record of the incarnation up to
    its seq), so the origin commits every record below it. A record that
    overtook an earlier one, a repeat, or a record before the peer said
    where its sequence starts would make the ack cover a record this site
    never prepared, and a read here could then miss a committed write. So
    that is a remote protocol error: the session drops and the reconcile
    or resync that follows ships the unresolved records again. Returns the
    error, or None after advancing the expected seq past the records.
    """
    session = core.session
    assert session is not None and session.peer is not None
    if not core.checks_sequence:
        return None
    expected = session.peer_next_seq
    if expected is None:
        return "records shipped before the peer announced its sequence"
    incarnation = session.peer.incarnation
    for record in records:
        record_id = record.id
        if record_id.origin != core.config.peer or record_id.incarnation != incarnation:
            return f"record {record_id} is not of the peer's incarnation {incarnation}"
        if record_id.seq != expected:
            return f"record {record_id} out of sequence: expected seq {expected}"
        expected += 1
    session.peer_next_seq = expected
    return None


def _send_prepared_acks(core: SiteCore) -> None:
    best: tuple[int, int] | None = None
    keep = []
    for persist_id, incarnation, seq in core.pending_peer_acks:
        if persist_id <= core.effects.durable_persist_id:
            if best is None or (incarnation, seq) > best:
                best = (incarnation, seq)
        else:
            keep.append((persist_id, incarnation, seq))
    core.pending_peer_acks = keep
    if best is not None and core.session_up():
        core.send(msg.PreparedAck(core.epoch, best[0], best[1]))


def on_prepared_ack(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.PreparedAck)
    ack = event.message
    if not core.session_up() or not check_epoch(core, ack.epoch):
        return
    if ack.incarnation != core.incarnation:
        return  # about an older incarnation of ours: resolved by reconcile
    session = core.session
    assert session is not None
    if (ack.seq > session.shipped_last_seq or ack.seq < session.acked_last_seq) and core.checks_sequence:
        # Acks cover only records shipped in this session, and never go back.
        shipped, acked = session.shipped_last_seq, session.acked_last_seq
        core.protocol_violation(
            RemoteErrorKind.OUT_OF_SEQUENCE, f"ack for seq {ack.seq}: shipped up to {shipped}, acked {acked}"
        )
        return
    session.acked_last_seq = ack.seq
    core.peer_acked_seq = max(core.peer_acked_seq, ack.seq)
    acked_record = core.replication.records.get(RecordId(core.config.site, core.incarnation, ack.seq))
    if acked_record is not None:
        core.raise_peer_clock_floor(acked_record.ts)
    advance_commits(core)


def _committable(core: SiteCore) -> list[Record]:
    """Own records, in seq order, that are durable here and acked by the peer."""
    committed: list[Record] = []
    acked_unchecked = core.plants.on(Plant.EARLY_VISIBLE)
    for seq in sorted(core.replication.pending):
        pending = core.replication.pending[seq]
        if pending.alone:
            break
        durable = pending.persist_id <= core.effects.durable_persist_id
        acked = seq <= core.peer_acked_seq or acked_unchecked
        if not (durable and acked):
            break
        committed.append(pending.record)
    return committed


def advance_commits(core: SiteCore) -> None:
    """Commit own records, in seq order, that are durable here and acked by the peer."""
    if core.role not in (Role.SYNC, Role.RESYNC_SOURCE):
        # SUSPENDED (or worse) commits nothing: reconcile or takeover resolves these records.
        return
    committed = _committable(core)
    if not committed:
        return
    core.decide_commit(CommitKind.ACKED)
    core.persist(  # the answers below do not wait for it (the records are durable in the log)
        apply=tuple(v for record in committed for v in versions(record)),
        dedup_put=tuple((record.request_id, record.ts) for record in committed),
        urgent=False,
    )
    log = core.replication
    for record in committed:
        pending = log.pop_pending(record.id.seq)
        assert pending is not None
        log.committed_unconfirmed[record.id.seq] = record
        log.resolve(record)  # still in the log until the peer confirms
        core.dedup_table.put(record.request_id, record.ts)
        core.emit(ev.Committed(record.id, core.epoch, core.role, alone=False))
        for handle in pending.handles:
            core.emit(ev.AnswerWrite(handle, True, ts=record.ts))
    last = committed[-1].id
    if core.session_up():
        assert core.session is not None
        core.session.watermark_sent_seq = max(core.session.watermark_sent_seq, last.seq)
        core.send(msg.CommitWatermark(core.epoch, last.incarnation, last.seq))
    reads.wake(core)


def on_commit_watermark(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.CommitWatermark)
    mark = event.message
    if not core.session_up() or not check_epoch(core, mark.epoch):
        return
    session = core.session
    assert session is not None and session.peer is not None
    if core.checks_sequence and (
        session.peer_next_seq is None or mark.incarnation != session.peer.incarnation or mark.seq >= session.peer_next_seq
    ):
        # The origin commits only what we acknowledged, and we acknowledged only what arrived.
        core.protocol_violation(
            RemoteErrorKind.OUT_OF_SEQUENCE,
            f"commit watermark ({mark.incarnation}, {mark.seq}) over records never received here",
        )
        return
    log = core.replication
    ready = sorted((key, record) for key, record in log.peer_records.items() if key <= (mark.incarnation, mark.seq))
    if not ready:
        return
    records = [record for _, record in ready]
    core.raise_peer_clock_floor(max(record.ts for record in records))  # the peer committed them: durable there
    persist_id = core.persist(  # only the CommitConfirm (the origin's log trimming) waits for it
        apply=tuple(v for record in records for v in versions(record)),
        log_delete=tuple(record.id for record in records),
        dedup_put=tuple((record.request_id, record.ts) for record in records),
        urgent=False,
    )
    for key, record in ready:
        del log.peer_records[key]
        log.remove(record)
        core.dedup_table.put(record.request_id, record.ts)
        for handle in log.pop_waiters(record.request_id):  # applying the origin's decision: no commit decision
            core.emit(ev.AnswerWrite(handle, True, ts=record.ts, duplicate=True))
    reads.wake(core)
    incarnation, seq = ready[-1][0]
    core.after(persist_id, functools.partial(_confirm, core, session, incarnation, seq))


def _confirm(core: SiteCore, session: Session | None, incarnation: int, seq: int) -> None:
    core.send_in(session, msg.CommitConfirm(core.epoch, incarnation, seq))


def on_commit_confirm(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.CommitConfirm)
    confirm = event.message
    if not core.session_up() or not check_epoch(core, confirm.epoch):
        return
    if confirm.incarnation != core.incarnation:
        return
    assert core.session is not None
    if confirm.seq > core.session.watermark_sent_seq and core.checks_sequence:
        core.protocol_violation(RemoteErrorKind.OUT_OF_SEQUENCE, f"commit confirm for seq {confirm.seq} beyond the watermark sent")
        return
    log = core.replication
    done = [seq for seq in log.committed_unconfirmed if seq <= confirm.seq]
    if not done:
        return
    records = [log.committed_unconfirmed.pop(seq) for seq in sorted(done)]
    for record in records:
        log.confirmed(record)
    core.persist(log_delete=tuple(record.id for record in records), urgent=False)


def winners(core: SiteCore, records: list[Record]) -> tuple[list[Record], dict[bytes, int]]:
    """Which records of a whole-log commit take effect: one per request id.

    A client retry that reached a site while its original was only in the
    other site's log (the origin crashed) makes a second record with the
    same request id. Both sites commit the same union of records here, so
    a deterministic rule keeps exactly one: an outcome already in the
    dedup table wins, else the lowest (ts, origin).
    """
    outcome: dict[bytes, int] = {}
    chosen: dict[bytes, Record] = {}
    for record in sorted(records, key=lambda r: (r.ts, r.id.origin)):
        request_id = record.request_id
        known = core.dedup_table.get(request_id)
        if known is not None:
            outcome[request_id] = known
        elif request_id not in chosen:
            chosen[request_id] = record
            outcome[request_id] = record.ts
    return [r for r in records if chosen.get(r.request_id) is r], outcome


def commit_whole_log(core: SiteCore, records: list[Record], *, alone: bool, mark_dirty: bool = False) -> int:
    """Commit every record of the log (reconcile and takeover), then forget the log."""
    core.decide_commit(CommitKind.WHOLE_LOG)
    chosen, outcome = winners(core, records)
    keys = tuple(sorted({key for record in records for key in record.keys()}))
    dirty = core.dirty_keys(keys) if mark_dirty else ()
    persist_id = core.persist(
        apply=tuple(v for record in chosen for v in versions(record)),
        log_delete=tuple(record.id for record in records),
        dedup_put=tuple((record.request_id, record.ts) for record in chosen),
        dirty_add=dirty,
    )
    core.dirty.update(dirty)
    for record in chosen:
        core.dedup_table.put(record.request_id, record.ts)
        core.emit(ev.Committed(record.id, core.epoch, core.role, alone=alone))
    log = core.replication
    answered: list[tuple[int, Record]] = []
    for record in records:
        if record.id.origin == core.config.site and record.id.incarnation == core.incarnation:
            pending = log.pop_pending(record.id.seq)
            if pending is not None:
                answered.extend((handle, record) for handle in pending.handles)
    answered += [(h, r) for r in records for h in log.pop_waiters(r.request_id)]
    log.clear_resolved()
    core.peer_acked_seq = core.next_seq - 1
    core.after(persist_id, functools.partial(_answer, core, answered, outcome))
    return persist_id


def _answer(core: SiteCore, answered: list[tuple[int, Record]], outcome: dict[bytes, int]) -> None:
    for handle, record in answered:
        ts = outcome[record.request_id]
        core.emit(ev.AnswerWrite(handle, True, ts=ts, duplicate=ts != record.ts))


def check_epoch(core: SiteCore, epoch: int) -> bool:
    """Fencing: a message from another epoch ends the session."""
    if epoch == core.epoch:
        return True
    session = core.session
    source = session.resync_source if session is not None else None
    if epoch < core.epoch and source is not None and not source.begin_acked:
        return False  # sent by the target before it took our ResyncBegin: expected, ignored
    if epoch < core.epoch:
        core.send(msg.Goodbye(core.epoch, msg.GoodbyeReason.STALE_EPOCH, "stale epoch"))
        core.drop_session("message from an older epoch")
    else:
        if core.role not in (Role.FENCED, Role.RESYNC_TARGET):
            takeover.fence(core, "message from a newer epoch")
        core.drop_session("message from a newer epoch")
    return False
