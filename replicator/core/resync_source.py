"""Resync, the source side: the grant holder brings a returning peer up to date.

Theory of operation. A site holding the grant (SOLO, or RESYNC_SOURCE again)
meets a peer that is behind: it sends ResyncBegin (clear your data, for a full
resync from the start of the key space) and waits for the target's
ResyncBeginAck, which reports the target's suspect keys (those of the log it
dropped), possibly in several parts, the last one carrying its next seq. Then
it sends its dedup table and pumps batches: the dirty keys (and, for a full
resync, a scan of every key from `resync_full_position`), at most
`resync_batches_inflight_max` loading or unacknowledged at once. A key leaves
the dirty set, durably, once its batch is acknowledged. When nothing is left,
it asks the witness to mark the pair synced (the `MarkSynced` phase, which
outlives the session: the witness's answer decides) and, SYNCED, goes SYNC in
the new epoch and tells the target. Writes meanwhile are shipped as in SYNC.
A target lost before MarkSynced: SOLO again, committing the whole log.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import replication, takeover
from replicator.core.effects import Meta
from replicator.core.errors import ProtocolError, ProtocolErrorKind, RemoteErrorKind
from replicator.core.messages import Role
from replicator.core.plants import Plant
from replicator.core.records import versioned_wire_bytes
from replicator.core.sizes import cut, dedup_entry_bytes
from replicator.core.standing import Standing

if TYPE_CHECKING:
    from replicator.core.session import Session
    from replicator.core.site import SiteCore


@dataclass(slots=True)
class ResyncSource:
    """Progress of one resync, in the session it runs in."""

    sends_keys: bool = True  # False only under the plant that rejoins without a resync
    begin_sent: bool = False  # ResyncBegin goes out once the resync's own meta is durable
    begin_acked: bool = False
    queue: list[bytes] = field(default_factory=list)  # dirty keys still to send
    scan_cursor: bytes | None = None  # full scan: next load position
    scan_done: bool = False
    next_batch: int = 1
    loading: dict[int, tuple[bytes, ...]] = field(default_factory=dict)  # token -> keys asked (() = scan)
    # token -> (keys sent, whether it was a full-scan batch, where the scan goes on after it)
    inflight: dict[int, tuple[tuple[bytes, ...], bool, bytes | None]] = field(default_factory=dict)
    inflight_ts: dict[int, int] = field(default_factory=dict)  # batch -> its newest ts (rollback floor)


@dataclass(frozen=True, slots=True)
class MarkSynced:
    """Every key is sent and acknowledged: waiting for the witness to move the pair to SYNC."""

    epoch: int


def _phase(core: SiteCore) -> ResyncSource | None:
    session = core.session
    if session is None or core.role is not Role.RESYNC_SOURCE:
        return None
    return session.resync_source


def begin(core: SiteCore, *, full: bool, rolled_back: bool = False) -> None:
    session = core.session
    assert session is not None and session.peer is not None
    reason = "peer returned behind us"
    if rolled_back:
        reason += " with data older than it had acknowledged (restored from a copy?): full resync"
    core.set_role(Role.RESYNC_SOURCE, reason)
    core.peer_generation = session.peer.generation
    phase = ResyncSource(sends_keys=not core.plants.on(Plant.REJOIN_WITHOUT_RESYNC))
    session.resync_source = phase
    meta: Meta = (("peer_generation", core.peer_generation),)
    if full and core.resync_full_position is None:
        core.resync_full_position = b""
    # The target clears its data only when a full scan starts from the beginning.
    clear = core.resync_full_position == b""
    if core.resync_full_position is not None:
        meta += (("resync_full_active", 1), ("resync_full_position", core.resync_full_position))
        phase.scan_cursor = core.resync_full_position
    else:
        phase.scan_done = True
    persist_id = core.persist(meta=meta)
    phase.queue = sorted(core.dirty)
    if not phase.sends_keys:
        phase.queue = []
        phase.scan_done = True
    resync_begin = msg.ResyncBegin(core.epoch, full=clear, next_seq=core.next_seq)
    if core.plants.on(Plant.UNDURABLE_RESYNC_BEGIN):
        _send_begin(core, session, phase, resync_begin)
        return
    # A full ResyncBegin makes the target erase its data: by then we must be sure to remember,
    # across a crash, that a full resync is under way, or we would come back, resync only our
    # dirty keys into the erased target and lose every acknowledged key (simulator seed 220).
    core.after(persist_id, functools.partial(_send_begin, core, session, phase, resync_begin))


def _send_begin(core: SiteCore, session: Session, phase: ResyncSource, resync_begin: msg.ResyncBegin) -> None:
    if core.session is session and session.resync_source is phase and core.session_up():
        phase.begin_sent = True
        core.send(resync_begin)


def on_resync_begin_ack(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncBeginAck)
    if not core.session_up() or not replication.check_epoch(core, event.message.epoch):
        return
    session = core.session
    assert session is not None and session.resync_source is not None
    phase = session.resync_source
    if phase.begin_acked:
        core.protocol_violation(RemoteErrorKind.SECOND_RESYNC_BEGIN_ACK, "a second ResyncBeginAck")
        return
    suspect = [key for key in event.message.suspect_keys if key not in core.dirty]
    if suspect and phase.sends_keys:
        core.dirty.update(suspect)
        core.persist(dirty_add=tuple(suspect))
        phase.queue.extend(suspect)
    if event.message.next_seq == 0:
        return  # more suspect keys follow (they did not fit in one message): wait for the last part
    phase.begin_acked = True
    session.peer_next_seq = event.message.next_seq
    config = core.config
    entries = core.dedup_table.sorted_items()
    for part in cut(entries, dedup_entry_bytes, config.message_bytes_max, config.dedup_entries_per_message_max):
        core.send(msg.ResyncDedup(core.epoch, part))
    pump(core)


def _load_more(core: SiteCore, phase: ResyncSource) -> None:
    """Ask the shell for batches until the window is full."""
    keys_max = core.config.resync_batch_keys_max
    while len(phase.loading) + len(phase.inflight) < core.config.resync_batches_inflight_max:
        token = phase.next_batch
        if not phase.scan_done and not any(keys == () for keys in phase.loading.values()):
            phase.next_batch += 1
            phase.loading[token] = ()
            core.emit(ev.LoadResyncBatch(token, scan_from=phase.scan_cursor, limit=keys_max))
            continue
        if phase.queue:
            keys = tuple(phase.queue[:keys_max])
            del phase.queue[: len(keys)]
            phase.next_batch += 1
            phase.loading[token] = keys
            core.emit(ev.LoadResyncBatch(token, keys=keys))
            continue
        break


def pump(core: SiteCore) -> None:
    phase = _phase(core)
    if phase is None or not phase.begin_acked:
        return
    _load_more(core, phase)
    idle = not phase.loading and not phase.inflight and not phase.queue and phase.scan_done
    if not idle or core.mark_synced is not None:
        return
    if core.dirty and phase.sends_keys:
        phase.queue = sorted(core.dirty)  # written meanwhile, or reported late: send them too
        pump(core)
        return
    core.mark_synced = MarkSynced(core.epoch)
    core.ask_witness(msg.MarkSynced(core.config.pair, core.config.site, core.epoch))


def on_resync_batch_loaded(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.ResyncBatchLoaded)
    phase = _phase(core)
    if phase is None or event.token not in phase.loading:
        return  # the session it was for is gone
    keys = phase.loading.pop(event.token)
    scan = keys == ()
    if scan:
        keys = tuple(entry.key for entry in event.entries)
        phase.scan_cursor = event.next_position
        phase.scan_done = event.next_position is None
    elif len(event.entries) < len(keys):
        # Only a prefix fitted in a frame: the rest goes back to the front of the queue.
        sent = len(event.entries)
        if sent == 0 or tuple(entry.key for entry in event.entries) != keys[:sent]:
            raise ProtocolError(ProtocolErrorKind.BAD_RESYNC_BATCH, "not a non-empty prefix of the asked keys")
        phase.queue[:0] = keys[sent:]
        keys = keys[:sent]
    if len(event.entries) > 1 and sum(map(versioned_wire_bytes, event.entries)) > core.config.message_bytes_max:
        raise ProtocolError(ProtocolErrorKind.BAD_RESYNC_BATCH, f"{len(event.entries)} entries exceed message_bytes_max")
    phase.inflight[event.token] = (keys, scan, event.next_position)
    phase.inflight_ts[event.token] = max((entry.ts for entry in event.entries), default=0)
    for entry in event.entries:
        core.hlc.observe(entry.ts)
    data = msg.ResyncData(core.epoch, event.token, event.entries)
    if core.plants.on(Plant.UNDURABLE_RESYNC):
        core.send(data)
        return
    # The loader read the store as the persists issued so far left it, durable or not (a write just
    # committed alone). The target applies what we send as the truth, so it waits until all of that is
    # durable here: a version we could still lose in a crash must never reach the target (seed 9377:
    # the target kept it, by its higher ts, over the older version the source came back with).
    core.after(core.effects.last_issued(), functools.partial(core.send_in, core.session, data))


def on_resync_ack(core: SiteCore, event: ev.Event) -> None:
    assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncAck)
    ack = event.message
    if not core.session_up() or not replication.check_epoch(core, ack.epoch):
        return
    session = core.session
    assert session is not None
    phase = session.resync_source
    entry = phase.inflight.pop(ack.batch, None) if phase is not None else None
    if phase is None or entry is None:
        core.protocol_violation(RemoteErrorKind.UNKNOWN_RESYNC_BATCH, f"resync ack for unknown batch {ack.batch}")
        return
    keys, scan, next_position = entry
    core.raise_peer_clock_floor(phase.inflight_ts.pop(ack.batch, 0))
    meta: Meta = ()
    if scan:
        if next_position is None:
            core.resync_full_position = None
            meta = (("resync_full_active", 0), ("resync_full_position", b""))
        else:
            core.resync_full_position = next_position
            meta = (("resync_full_position", next_position),)
    removed = tuple(key for key in keys if key in core.dirty)
    core.dirty.difference_update(removed)
    core.persist(dirty_remove=removed, meta=meta)
    pump(core)


def on_mark_synced_answer(core: SiteCore, answer: msg.WitnessAnswer) -> None:
    core.mark_synced = None
    if answer.verdict is not msg.Verdict.SYNCED:
        takeover.fence(core, f"witness refused MarkSynced: {answer.mode.name} epoch {answer.epoch}")
        return
    epoch = answer.epoch
    core.epoch = epoch
    core.standing = Standing.PEER
    core.synced_epoch = epoch
    core.persist(meta=(("epoch", epoch), ("grant", 0), ("target", 0), ("synced_epoch", epoch)))
    core.last_heard_ms = core.now_ms
    if core.session is not None:
        core.session.resync_source = None
    core.set_role(Role.SYNC, f"witness moved the pair to SYNC {epoch}")
    # Sent at once, before any record of the new epoch. If we crash before
    # the persist above is durable, the witness's answer lets us adopt the
    # epoch at restart (see witness_client._denied); without a session the
    # peer hears it again at the next Hello (see session.on_hello).
    core.send_if_session(msg.ResyncSynced(epoch))


def lost_peer(core: SiteCore) -> None:
    """The resync target vanished: go on alone again (we still hold the grant)."""
    records = core.replication.sorted_records()
    core.set_role(Role.SOLO, "resync target lost")
    replication.commit_whole_log(core, records, alone=True, mark_dirty=True)
