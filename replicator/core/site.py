"""The pair protocol of one site, as a pure state machine.

Theory of operation (docs/protocol.md has the long form).

Writes. In SYNC a write becomes a record `(site, incarnation, seq)` with a
hybrid-logical-clock `ts`. It is persisted to the local log and shipped to
the peer at the same time. The peer persists it as *prepared* and acks
cumulatively. The origin commits (applies to the visible state, answers the
client) once the record is durable locally and acked, in seq order, then
tells the peer with a cumulative commit watermark; the peer applies and
confirms; the origin then forgets the log entry. A read of a key with an
unresolved record waits for it.

Leases. In SYNC each site heartbeats the other. An answer granted in SYNC
lets the asker serve reads for `lease_read_ms` after it *sent* the heartbeat;
the answerer promises not to go on alone for `lease_ms` after it answered.

Failure. Without an answer for `peer_timeout_ms` a site is SUSPENDED: it
commits nothing, drops the connection and asks the witness. GRANTED(e+1):
it waits out every lease it granted, commits every record in its log (either
origin), marks their keys dirty and serves alone in SOLO(e+1), marking dirty
every key it writes. DENIED: FENCED, retrying the witness and the peer.

Meeting again. The Hello exchange on each new connection decides:
- same epoch, nobody holds a grant: RECONCILE. Both ship every log record,
  wait until the peer has them durably, commit them all, and are SYNC again.
- one side holds the grant of a newer (or the same) epoch: it is the resync
  SOURCE, the other the TARGET. The target drops its log (nothing in it was
  ever visible without the source having it), takes the dirty keys' current
  versions (all keys for a wiped target), then the source asks the witness to
  move the pair to SYNC(e+1).

Durability is in order: the shell makes persists durable in issue order, and
the core waits for `Persisted` before anything that depends on durability
(acks, answers, role changes that promise something).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core.config import CoreConfig
from replicator.core.hlc import HybridLogicalClock, wall_ms_of
from replicator.core.messages import Role
from replicator.core.records import (
    DEDUP_ENTRY_OVERHEAD_BYTES,
    KEY_OVERHEAD_BYTES,
    Record,
    RecordId,
    Versioned,
    record_wire_bytes,
    versioned_wire_bytes,
)


class ProtocolError(Exception):
    """An event this role cannot take: a bug in the caller (local error)."""


T = TypeVar("T")


def cut(items: list[T] | tuple[T, ...], size_of: Callable[[T], int], bytes_max: int, count_max: int) -> list[tuple[T, ...]]:
    """Cut items, in order, into parts of at most `count_max` items and `bytes_max` bytes (a part
    of one item may be larger: each item was bounded where it was made)."""
    parts: list[tuple[T, ...]] = []
    current: list[T] = []
    used = 0
    for item in items:
        size = size_of(item)
        if current and (used + size > bytes_max or len(current) >= count_max):
            parts.append(tuple(current))
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        parts.append(tuple(current))
    return parts


def _dedup_entry_bytes(entry: tuple[bytes, int]) -> int:
    return DEDUP_ENTRY_OVERHEAD_BYTES + len(entry[0])


def _key_bytes(key: bytes) -> int:
    return KEY_OVERHEAD_BYTES + len(key)


def message_bytes(message: msg.PeerMessage) -> int:
    """The content bytes of a message as the link encodes it (what message_bytes_max bounds)."""
    if isinstance(message, msg.ShipRecords):
        return sum(map(record_wire_bytes, message.records))
    if isinstance(message, msg.ResyncData):
        return sum(map(versioned_wire_bytes, message.entries))
    if isinstance(message, msg.ResyncBeginAck):
        return sum(map(_key_bytes, message.suspect_keys))
    if isinstance(message, msg.ResyncDedup):
        return sum(map(_dedup_entry_bytes, message.entries))
    if isinstance(message, msg.Goodbye):
        return len(message.message.encode())
    return 0


def _single_item(message: msg.PeerMessage) -> bool:
    """A message of one item: bounded where that item was made (a write, a stored version)."""
    if isinstance(message, msg.ShipRecords):
        return len(message.records) == 1
    if isinstance(message, msg.ResyncData):
        return len(message.entries) == 1
    return False


# Roles in which a session (Hello exchanged) with the peer may exist.
SERVING_WRITES = frozenset({Role.SYNC, Role.SOLO, Role.RESYNC_SOURCE})


@dataclass(slots=True)
class _Pending:
    """An own write not yet committed."""

    record: Record
    handles: list[int]
    persist_id: int
    alone: bool  # SOLO write: commits when durable, no peer involved


@dataclass(slots=True)
class _Session:
    """What we know about the current connection; gone with it."""

    started_ms: float = 0.0
    peer: msg.Hello | None = None
    # RECONCILE progress
    reconcile_peer_done_persist: int | None = None  # persist id covering the peer's records
    reconcile_ack_sent: bool = False
    reconcile_ack_received: bool = False
    reconcile_commit_persist: int | None = None
    # RESYNC (source side)
    resync_began: bool = False
    resync_begin_acked: bool = False
    resync_queue: list[bytes] = field(default_factory=list)  # dirty keys still to send
    resync_scan_cursor: bytes | None = None  # full scan: next load position
    resync_scan_done: bool = False
    resync_next_batch: int = 1
    resync_loading: dict[int, tuple[bytes, ...]] = field(default_factory=dict)  # token -> keys asked
    # token -> (keys sent, whether it was a full-scan batch, where the scan goes on after it)
    resync_inflight: dict[int, tuple[tuple[bytes, ...], bool, bytes | None]] = field(default_factory=dict)
    # RESYNC (target side): acks that wait for a persist
    heartbeat_nonce: int = 0
    # Sequence checks of the cumulative messages (see _take_in_sequence). The peer's records
    # (of the incarnation in its Hello) must arrive with exactly these seqs, from the seq its
    # ReconcileDone / ResyncBegin / ResyncBeginAck announced; None until announced.
    peer_next_seq: int | None = None
    shipped_last_seq: int = 0  # the highest own seq shipped in this session
    watermark_sent_seq: int = 0  # the highest own seq this session's CommitWatermark covered
    acked_last_seq: int = 0  # the highest PreparedAck the peer sent in this session


@dataclass(slots=True)
class _ParkedRead:
    handle: int
    key: bytes
    deadline_ms: float


class SiteCore:
    """One site's pair protocol. Drive it with `start()` then `step(event, now_ms, wall_ms)`."""

    def __init__(self, config: CoreConfig, recovered: ev.Recovered) -> None:
        self.config = config
        meta = recovered.meta
        generation = meta.get("generation")
        if not isinstance(generation, bytes) or not generation:
            raise ValueError("recovered meta must hold this site's generation (bytes)")
        self.generation: bytes = generation
        self.epoch = _int(meta, "epoch", 1)
        self.holds_grant = bool(_int(meta, "grant", 0))  # we hold the witness's grant for self.epoch
        self.is_target = bool(_int(meta, "target", 0))  # we are being resynchronised in self.epoch
        self.synced_epoch = _int(meta, "synced_epoch", 0)
        # We asked the witness to go on alone in this epoch and do not know the
        # answer: it may have granted us the next epoch (see _confirm_grant).
        self.asked_epoch = _int(meta, "asked_epoch", 0)
        peer_generation = meta.get("peer_generation", b"")
        self.peer_generation: bytes = peer_generation if isinstance(peer_generation, bytes) else b""
        full_position = meta.get("resync_full_position", b"")
        self.resync_full_position: bytes | None = (
            full_position if _int(meta, "resync_full_active", 0) and isinstance(full_position, bytes) else None
        )
        incarnation = _int(meta, "incarnation", 0)
        self.incarnation = incarnation + 1
        self.next_seq = 1
        self.hlc = HybridLogicalClock(config.origin_bit, _int(meta, "clock_high", 0))

        self.role = Role.STARTING
        self.log: dict[RecordId, Record] = {}
        self.key_pending: dict[bytes, int] = {}
        for record in recovered.log:
            self._log_add(record)
            self.hlc.observe(record.ts)
        self.dirty: set[bytes] = set(recovered.dirty)
        self.dedup: dict[bytes, int] = dict(recovered.dedup)
        # (ts, request id) of every dedup entry, a min-heap: pruning by age pops the old ones instead
        # of scanning the whole table at every step. An entry whose request id was set again (to
        # another ts) is stale and skipped when popped.
        self.dedup_expiry: list[tuple[int, bytes]] = [(ts, r) for r, ts in self.dedup.items()]
        heapq.heapify(self.dedup_expiry)
        self.pending: dict[int, _Pending] = {}  # own uncommitted writes by seq (this incarnation)
        self.pending_by_request: dict[bytes, int] = {}
        self.committed_unconfirmed: dict[int, Record] = {}  # own committed, peer has not applied
        self.peer_acked_seq = 0  # peer holds our records up to this seq (this incarnation)
        self.peer_records: dict[tuple[int, int], Record] = {}  # peer's (incarnation, seq) -> record prepared here
        self.parked_reads: list[_ParkedRead] = []
        self.log_waiters: dict[bytes, list[int]] = {}  # request id -> handles waiting for a logged record

        self.next_persist_id = 1
        self.durable_persist_id = 0
        self.after_durable: deque[tuple[int, Callable[[], None]]] = deque()
        self.out: list[ev.Action] = []

        self.connected = False
        self.session: _Session | None = None
        self.now_ms = 0.0
        self.wall_ms = 0
        self.last_heard_ms = 0.0
        self.next_heartbeat_ms = 0.0
        self.heartbeats_sent: dict[int, float] = {}
        self.lease_until_ms = 0.0
        self.lease_granted_until_ms = 0.0
        self.witness_outstanding: msg.WitnessRequest | None = None
        self.witness_next_try_ms = 0.0
        self.witness_unreachable_since_ms: float | None = None
        self.grant_epoch: int | None = None  # granted, waiting out leases before taking over
        self.takeover_persist: int | None = None
        self.mark_synced_outstanding = False
        self.pending_peer_acks: list[tuple[int, int, int]] = []  # (persist id, incarnation, seq)
        self.protocol_errors = 0
        self.stopped_reason = ""
        # The plant that takes the peer's cumulative messages unchecked (a simulator-only plant).
        self._accept_gaps = "accept_gaps" in config.plants

    # ================================================================ entry points
    def start(self, now_ms: float, wall_ms: int) -> list[ev.Action]:
        """Begin after recovery: bump the incarnation durably, act as if a lease was granted now."""
        self.now_ms, self.wall_ms = now_ms, wall_ms
        self.last_heard_ms = now_ms
        self.lease_granted_until_ms = now_ms + self.config.lease_ms
        self._persist(meta=(("incarnation", self.incarnation), ("clock_high", self.hlc.high_water)))
        if self.holds_grant:
            # Confirm the grant with the witness before serving alone: it may
            # have moved on (a MarkSynced we did not live to record).
            self._ask_witness(msg.Arbitrate(self.config.pair, self.config.site, self.epoch))
        return self._drain()

    def step(self, event: ev.Event, now_ms: float, wall_ms: int) -> list[ev.Action]:
        if self.role is Role.STOPPED:
            raise ProtocolError(f"site {self.config.site} is stopped ({self.stopped_reason}); got {event!r}")
        self.now_ms = max(self.now_ms, now_ms)  # monotonic
        self.wall_ms = wall_ms
        kind: type = type(event.message) if isinstance(event, ev.PeerSent) else type(event)
        handler_name = TRANSITIONS.get((self.role, kind))
        if handler_name is None:
            if isinstance(event, ev.PeerSent):
                # A remote error: the peer sent what this role cannot take.
                self._protocol_violation(f"{self.role.name} cannot take {kind.__name__}")
                return self._drain()
            raise ProtocolError(f"{self.role.name} cannot take {kind.__name__}")
        before = self.role
        if isinstance(event, ev.PeerSent) and before is Role.RECONCILE:
            # In RECONCILE, which serves nothing, every frame counts as hearing the peer: heartbeat
            # answers queue behind the reconcile shipments (megabytes with large values), and a
            # one-way cut still ends it, since the deaf side times out and drops the connection.
            self.last_heard_ms = self.now_ms
        handler: Callable[[SiteCore, ev.Event], None] = getattr(SiteCore, handler_name)
        handler(self, event)
        self._run_timers()
        allowed = NEXT_ROLES.get((before, kind), frozenset())
        assert self.role is before or self.role in allowed, (
            f"{before.name} --{kind.__name__}--> {self.role.name} is not in the transition table"
        )
        return self._drain()

    # ================================================================ client requests
    def _on_write(self, event: ev.Event) -> None:
        assert isinstance(event, ev.WriteRequested)
        if event.request_id in self.dedup:
            self.out.append(ev.AnswerWrite(event.handle, True, ts=self.dedup[event.request_id], duplicate=True))
            return
        seq = self.pending_by_request.get(event.request_id)
        if seq is not None and seq in self.pending:
            self.pending[seq].handles.append(event.handle)
            return
        if self._request_logged(event.request_id):
            self.log_waiters.setdefault(event.request_id, []).append(event.handle)
            return
        if self.role not in SERVING_WRITES or self.grant_epoch is not None or self.mark_synced_outstanding:
            self._reject_write(event.handle, "unavailable", f"site {self.config.site} is {self.role.name}")
            return
        if self.role is Role.SYNC and not self._session_up():
            self._reject_write(event.handle, "unavailable", "peer link is down")
            return
        if len(self.pending) >= self.config.inflight_records_max:
            self._reject_write(event.handle, "overloaded", "too many writes in flight")
            return
        if not event.operations:
            self._reject_write(event.handle, "invalid", "a write needs at least one operation")
            return
        record = Record(
            id=RecordId(self.config.site, self.incarnation, self.next_seq),
            epoch=self.epoch,
            ts=self.hlc.next(self.wall_ms),
            request_id=event.request_id,
            operations=event.operations,
        )
        size = record_wire_bytes(record)
        if size > self.config.message_bytes_max:
            self._reject_write(
                event.handle, "invalid", f"a write of {size} bytes exceeds message_bytes_max {self.config.message_bytes_max}"
            )
            return
        self.next_seq += 1
        if self.role is Role.SOLO:
            dirty = () if "drop_dirty" in self.config.plants else record.keys()
            persist_id = self._persist(
                apply=_versions(record),
                dirty_add=dirty,
                dedup_put=((record.request_id, record.ts),),
                meta=(("clock_high", self.hlc.high_water),),
            )
            self.dirty.update(dirty)
            self._add_pending(record, event.handle, persist_id, alone=True)
            self._after(persist_id, lambda: self._commit_own_alone(record.id.seq))
            return
        # SYNC or RESYNC_SOURCE: local log and peer in parallel.
        persist_id = self._persist(
            log_put=(record,), meta=(("clock_high", self.hlc.high_water),)
        )
        self._log_add(record)
        self._add_pending(record, event.handle, persist_id, alone=False)
        if self.session is not None:
            self.session.shipped_last_seq = record.id.seq
        self._send(msg.ShipRecords(self.epoch, (record,)))
        self._after(persist_id, self._advance_commits)

    def _on_read(self, event: ev.Event) -> None:
        assert isinstance(event, ev.ReadRequested)
        if not self._can_serve_reads() and not self._lease_coming():
            self.out.append(ev.RejectRead(event.handle, "unavailable", f"site {self.config.site} is {self.role.name}"))
            return
        if self._key_blocked(event.key) or not self._can_serve_reads():
            self.parked_reads.append(_ParkedRead(event.handle, event.key, self.now_ms + self.config.read_wait_ms_max))
            return
        self.out.append(ev.ServeRead(event.handle, event.key))

    # ================================================================ durability
    def _on_persisted(self, event: ev.Event) -> None:
        assert isinstance(event, ev.Persisted)
        if event.persist_id >= self.next_persist_id:
            raise ProtocolError(f"persist {event.persist_id} was never issued")
        if event.persist_id <= self.durable_persist_id:
            return
        self.durable_persist_id = event.persist_id
        while self.after_durable and self.after_durable[0][0] <= self.durable_persist_id:
            _, callback = self.after_durable.popleft()
            callback()

    def _on_persist_failed(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PersistFailed)
        self._stop(f"storage failed: {event.reason}")

    # ================================================================ time
    def _on_tick(self, event: ev.Event) -> None:
        pass  # timers run after every event

    def _run_timers(self) -> None:
        if self.role is Role.STOPPED:
            return
        now = self.now_ms
        # Parked reads: time out.
        if self.parked_reads:
            keep = []
            for parked in self.parked_reads:
                if now >= parked.deadline_ms:
                    self.out.append(ev.RejectRead(parked.handle, "timeout", "key has an unresolved write"))
                else:
                    keep.append(parked)
            self.parked_reads = keep
        # Heartbeats within a session.
        if self._session_up() and now >= self.next_heartbeat_ms:
            assert self.session is not None
            self.session.heartbeat_nonce += 1
            nonce = self.session.heartbeat_nonce
            self.heartbeats_sent[nonce] = now
            if len(self.heartbeats_sent) > 64:
                del self.heartbeats_sent[min(self.heartbeats_sent)]
            self._send(msg.Heartbeat(self.epoch, nonce))
            self.next_heartbeat_ms = now + self.config.heartbeat_interval_ms
        # A connection whose Hello never comes (half-open, or a peer that hangs).
        session = self.session
        if self.connected and session is not None and session.peer is None:
            if now - session.started_ms > self.config.peer_timeout_ms:
                self._drop_session("no Hello from the peer")
        # Failure detection.
        if now - self.last_heard_ms > self.config.peer_timeout_ms:
            self._peer_timed_out()
        # Witness retries.
        if self.witness_outstanding is None and now >= self.witness_next_try_ms:
            self._maybe_ask_witness_again()
        # Static priority: the preferred site goes on without the witness.
        if (
            self.config.static_priority
            and self.config.site == self.config.preferred
            and self.role is Role.SUSPENDED
            and self.grant_epoch is None
            and self.witness_unreachable_since_ms is not None
            and now - self.witness_unreachable_since_ms >= self.config.witness_timeout_ms
        ):
            self.grant_epoch = self.epoch + 1
        # Takeover once the leases we granted have run out.
        if self.grant_epoch is not None and self.takeover_persist is None:
            if now >= self.lease_granted_until_ms or "no_lease_wait" in self.config.plants:
                self._take_over(self.grant_epoch)
        # Dedup table: bounded by age.
        if len(self.dedup) > 1024:
            horizon = self.wall_ms - self.config.dedup_age_ms
            expiry = self.dedup_expiry
            while expiry and wall_ms_of(expiry[0][0]) < horizon:
                ts, request_id = heapq.heappop(expiry)
                if self.dedup.get(request_id) == ts:
                    del self.dedup[request_id]
        if len(self.dedup_expiry) > 2 * len(self.dedup) + 1024:
            self.dedup_expiry = [(ts, r) for r, ts in self.dedup.items()]
            heapq.heapify(self.dedup_expiry)

    def _dedup_put(self, request_id: bytes, ts: int) -> None:
        self.dedup[request_id] = ts
        heapq.heappush(self.dedup_expiry, (ts, request_id))

    def _peer_timed_out(self) -> None:
        role = self.role
        if role in (Role.SYNC, Role.RECONCILE):
            self._suspend("peer timeout")
        elif role is Role.STARTING:
            self.last_heard_ms = self.now_ms  # do not re-trigger every tick
            if self.witness_outstanding is None and self.grant_epoch is None and not self.holds_grant:
                self._suspend("peer not heard since start-up")
        elif role is Role.RESYNC_SOURCE:
            self.last_heard_ms = self.now_ms
            self._drop_session("peer timeout during resync")
        elif role is Role.RESYNC_TARGET:
            self.last_heard_ms = self.now_ms
            self._drop_session("source timeout during resync")
        else:
            self.last_heard_ms = self.now_ms

    # ================================================================ connection
    def _on_connected(self, event: ev.Event) -> None:
        self.connected = True
        self.session = _Session(started_ms=self.now_ms)
        self._send(self._hello())

    def _on_disconnected(self, event: ev.Event) -> None:
        self.connected = False
        self._end_session()

    def _session_lost(self) -> None:
        """Whatever ended the session, some roles cannot go on without one."""
        if self.role is Role.RECONCILE:
            fallback = Role.SUSPENDED if self.lease_until_ms > self.now_ms else Role.STARTING
            self._set_role(fallback, "link lost in reconcile")
        elif self.role is Role.RESYNC_SOURCE and not self.mark_synced_outstanding:
            self._resync_source_lost_peer()

    def _hello(self) -> msg.Hello:
        return msg.Hello(
            epoch=self.epoch,
            site=self.config.site,
            pair=self.config.pair,
            role=self.role,
            incarnation=self.incarnation,
            generation=self.generation,
            synced_epoch=self.synced_epoch,
        )

    def _on_hello(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.Hello)
        hello = event.message
        session = self.session
        if session is None or session.peer is not None:
            self._protocol_violation("unexpected Hello")
            return
        if hello.pair != self.config.pair or hello.site != self.config.peer:
            self._send(msg.Goodbye(self.epoch, msg.GoodbyeReason.NOT_PEER, f"expected {self.config.peer}"))
            self._drop_session(f"hello from {hello.site!r} of pair {hello.pair!r}")
            return
        session.peer = hello
        if self.grant_epoch is not None:
            self._drop_session("taking over: not now")
            return
        wiped = bool(self.peer_generation) and hello.generation != self.peer_generation
        peer_holds = hello.role in (Role.SOLO, Role.RESYNC_SOURCE)
        # We are the source: we hold a confirmed grant and the peer is behind or our target.
        source = self.role in (Role.SOLO, Role.RESYNC_SOURCE) and not self.mark_synced_outstanding
        if source and (hello.epoch < self.epoch or (hello.epoch == self.epoch and not peer_holds)):
            self.last_heard_ms = self.now_ms
            self._begin_resync_source(full=wiped or not self.peer_generation or self.resync_full_position is not None)
            return
        if hello.epoch > self.epoch or (hello.epoch == self.epoch and peer_holds and not self.holds_grant):
            # The peer is ahead (or holds this epoch's grant): we wait for its ResyncBegin.
            if self.role not in (Role.FENCED, Role.RESYNC_TARGET, Role.STARTING):
                self._fence("peer is in a newer epoch")
            return
        if hello.epoch < self.epoch:
            if (
                self.role in (Role.SYNC, Role.SUSPENDED, Role.STARTING)
                and self.grant_epoch is None
                and hello.role is Role.RESYNC_TARGET
                and hello.epoch == self.epoch - 1
                and self.synced_epoch == self.epoch
                and hello.generation == self.peer_generation
            ):
                # Our ResyncSynced was lost with the connection: say it again, then reconcile.
                self._send(msg.ResyncSynced(self.epoch))
                self._begin_reconcile()
                return
            self._send(msg.Goodbye(self.epoch, msg.GoodbyeReason.STALE_EPOCH, "you are behind: wait for resync"))
            self._drop_session("peer in an older epoch")
            return
        # Same epoch, nobody holds a grant.
        busy = self.grant_epoch is not None or self.holds_grant or self.is_target
        if wiped or busy or hello.role is Role.RESYNC_TARGET:
            self._drop_session("cannot reconcile now")
            return
        if self.role in (Role.FENCED,):
            self._drop_session("fenced: waiting for the witness")
            return
        self._begin_reconcile()

    def _on_goodbye(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.Goodbye)
        goodbye = event.message
        if goodbye.reason is msg.GoodbyeReason.STALE_EPOCH and goodbye.epoch > self.epoch:
            if self.role in (Role.SYNC, Role.SUSPENDED, Role.RECONCILE, Role.STARTING):
                self._fence("peer says we are behind")
        self._drop_session(f"goodbye from peer: {goodbye.reason.name} {goodbye.message}")

    # ================================================================ peer messages: replication
    def _check_epoch(self, epoch: int) -> bool:
        """Fencing: a message from another epoch ends the session."""
        if epoch == self.epoch:
            return True
        session = self.session
        if epoch < self.epoch and session is not None and session.resync_began and not session.resync_begin_acked:
            return False  # sent by the target before it took our ResyncBegin: expected, ignored
        if epoch < self.epoch:
            self._send(msg.Goodbye(self.epoch, msg.GoodbyeReason.STALE_EPOCH, "stale epoch"))
            self._drop_session("message from an older epoch")
        else:
            if self.role not in (Role.FENCED, Role.RESYNC_TARGET):
                self._fence("message from a newer epoch")
            self._drop_session("message from a newer epoch")
        return False

    def _on_ship_records(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ShipRecords)
        ship = event.message
        if not self._session_up() or not self._check_epoch(ship.epoch):
            return
        if not ship.reconcile:
            problem = self._take_in_sequence(ship.records)
            if problem is not None:
                self._protocol_violation(problem)
                return
        fresh = [record for record in ship.records if record.id not in self.log]
        for record in ship.records:
            self.hlc.observe(record.ts)
        for record in fresh:
            self._log_add(record)
            if not ship.reconcile:
                self.peer_records[(record.id.incarnation, record.id.seq)] = record
        persist_id = self._persist(log_put=tuple(fresh), meta=(("clock_high", self.hlc.high_water),))
        if ship.reconcile:
            return
        if ship.records:
            last = ship.records[-1].id
            self.pending_peer_acks.append((persist_id, last.incarnation, last.seq))
            self._after(persist_id, self._send_prepared_acks)

    def _take_in_sequence(self, records: tuple[Record, ...]) -> str | None:
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
        session = self.session
        assert session is not None and session.peer is not None
        if self._accept_gaps:
            return None
        expected = session.peer_next_seq
        if expected is None:
            return "records shipped before the peer announced its sequence"
        incarnation = session.peer.incarnation
        for record in records:
            record_id = record.id
            if record_id.origin != self.config.peer or record_id.incarnation != incarnation:
                return f"record {record_id} is not of the peer's incarnation {incarnation}"
            if record_id.seq != expected:
                return f"record {record_id} out of sequence: expected seq {expected}"
            expected += 1
        session.peer_next_seq = expected
        return None

    def _send_prepared_acks(self) -> None:
        best: tuple[int, int] | None = None
        keep = []
        for persist_id, incarnation, seq in self.pending_peer_acks:
            if persist_id <= self.durable_persist_id:
                if best is None or (incarnation, seq) > best:
                    best = (incarnation, seq)
            else:
                keep.append((persist_id, incarnation, seq))
        self.pending_peer_acks = keep
        if best is not None and self._session_up():
            self._send(msg.PreparedAck(self.epoch, best[0], best[1]))

    def _on_prepared_ack(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.PreparedAck)
        ack = event.message
        if not self._session_up() or not self._check_epoch(ack.epoch):
            return
        if ack.incarnation != self.incarnation:
            return  # about an older incarnation of ours: resolved by reconcile
        session = self.session
        assert session is not None
        if (ack.seq > session.shipped_last_seq or ack.seq < session.acked_last_seq) and not self._accept_gaps:
            # Acks cover only records shipped in this session, and never go back.
            self._protocol_violation(
                f"ack for seq {ack.seq}: shipped up to {session.shipped_last_seq}, acked {session.acked_last_seq}"
            )
            return
        session.acked_last_seq = ack.seq
        self.peer_acked_seq = max(self.peer_acked_seq, ack.seq)
        self._advance_commits()

    def _advance_commits(self) -> None:
        """Commit own records, in seq order, that are durable here and acked by the peer."""
        if self.role not in (Role.SYNC, Role.RESYNC_SOURCE):
            # SUSPENDED (or worse) commits nothing: reconcile or takeover resolves these records.
            return
        committed: list[Record] = []
        for seq in sorted(self.pending):
            pending = self.pending[seq]
            if pending.alone:
                break
            durable = pending.persist_id <= self.durable_persist_id
            acked = seq <= self.peer_acked_seq or "early_visible" in self.config.plants
            if not (durable and acked):
                break
            committed.append(pending.record)
        if not committed:
            return
        self._persist(
            apply=tuple(v for record in committed for v in _versions(record)),
            dedup_put=tuple((record.request_id, record.ts) for record in committed),
        )
        for record in committed:
            pending = self.pending.pop(record.id.seq)
            self._forget_pending_request(record)
            self.committed_unconfirmed[record.id.seq] = record
            self._log_resolve(record)  # still in the log until the peer confirms
            self._dedup_put(record.request_id, record.ts)
            self.out.append(ev.Committed(record.id, self.epoch, self.role, alone=False))
            for handle in pending.handles:
                self.out.append(ev.AnswerWrite(handle, True, ts=record.ts))
        last = committed[-1].id
        if self._session_up():
            assert self.session is not None
            self.session.watermark_sent_seq = max(self.session.watermark_sent_seq, last.seq)
            self._send(msg.CommitWatermark(self.epoch, last.incarnation, last.seq))
        self._wake_reads()

    def _on_commit_watermark(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.CommitWatermark)
        mark = event.message
        if not self._session_up() or not self._check_epoch(mark.epoch):
            return
        session = self.session
        assert session is not None and session.peer is not None
        if not self._accept_gaps and (
            session.peer_next_seq is None
            or mark.incarnation != session.peer.incarnation
            or mark.seq >= session.peer_next_seq
        ):
            # The origin commits only what we acknowledged, and we acknowledged only what arrived.
            self._protocol_violation(
                f"commit watermark ({mark.incarnation}, {mark.seq}) over records never received here"
            )
            return
        ready = sorted(
            (key, record) for key, record in self.peer_records.items() if key <= (mark.incarnation, mark.seq)
        )
        if not ready:
            return
        records = [record for _, record in ready]
        persist_id = self._persist(
            apply=tuple(v for record in records for v in _versions(record)),
            log_delete=tuple(record.id for record in records),
            dedup_put=tuple((record.request_id, record.ts) for record in records),
        )
        for key, record in ready:
            del self.peer_records[key]
            self._log_remove(record)
            self._dedup_put(record.request_id, record.ts)
            self._answer_log_waiters(record)  # applying the origin's decision is not a commit decision
        self._wake_reads()
        incarnation, seq = ready[-1][0]
        self._after(persist_id, lambda: self._send_in(session, msg.CommitConfirm(self.epoch, incarnation, seq)))

    def _on_commit_confirm(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.CommitConfirm)
        confirm = event.message
        if not self._session_up() or not self._check_epoch(confirm.epoch):
            return
        if confirm.incarnation != self.incarnation:
            return
        assert self.session is not None
        if confirm.seq > self.session.watermark_sent_seq and not self._accept_gaps:
            self._protocol_violation(f"commit confirm for seq {confirm.seq} beyond the watermark sent")
            return
        done = [seq for seq in self.committed_unconfirmed if seq <= confirm.seq]
        if not done:
            return
        records = [self.committed_unconfirmed.pop(seq) for seq in sorted(done)]
        for record in records:
            self.log.pop(record.id, None)
        self._persist(log_delete=tuple(record.id for record in records))

    def _on_heartbeat(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.Heartbeat)
        beat = event.message
        if not self._session_up() or not self._check_epoch(beat.epoch):
            return
        grant = self.role is Role.SYNC and self.grant_epoch is None
        if grant:
            self.lease_granted_until_ms = max(self.lease_granted_until_ms, self.now_ms + self.config.lease_ms)
        self._send(msg.HeartbeatAck(self.epoch, beat.nonce, grant))

    def _on_heartbeat_ack(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.HeartbeatAck)
        ack = event.message
        if not self._session_up() or not self._check_epoch(ack.epoch):
            return
        sent = self.heartbeats_sent.pop(ack.nonce, None)
        if sent is None:
            return
        self.last_heard_ms = self.now_ms
        if ack.lease_granted and self.role is Role.SYNC:
            self.lease_until_ms = max(self.lease_until_ms, sent + self.config.lease_read_ms)
            self._wake_reads()

    # ================================================================ reconcile (same epoch)
    def _begin_reconcile(self) -> None:
        session = self.session
        assert session is not None and session.peer is not None
        self._set_role(Role.RECONCILE, "met the peer in the same epoch")
        # The peer's Hello on a new connection (which needs both directions) is news of it: the
        # silence before, a link cut say, does not count against the reconcile.
        self.last_heard_ms = self.now_ms
        records = sorted(self.log.values(), key=lambda record: record.id)
        config = self.config
        for part in cut(records, record_wire_bytes, config.message_bytes_max, config.reconcile_records_per_message_max):
            self._send(msg.ShipRecords(self.epoch, part, reconcile=True))
        self._send(msg.ReconcileDone(self.epoch, self.next_seq))

    def _on_reconcile_done(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ReconcileDone)
        if not self._session_up() or not self._check_epoch(event.message.epoch):
            return
        session = self.session
        assert session is not None
        session.peer_next_seq = event.message.next_seq
        persist_id = self.next_persist_id - 1
        session.reconcile_peer_done_persist = persist_id
        self._after(persist_id, self._send_reconcile_ack)

    def _send_reconcile_ack(self) -> None:
        session = self.session
        if session is None or self.role is not Role.RECONCILE or session.reconcile_peer_done_persist is None:
            return
        self._send(msg.ReconcileAck(self.epoch))
        session.reconcile_ack_sent = True
        self._maybe_finish_reconcile()

    def _on_reconcile_ack(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ReconcileAck)
        if not self._session_up() or not self._check_epoch(event.message.epoch):
            return
        assert self.session is not None
        self.session.reconcile_ack_received = True
        self._maybe_finish_reconcile()

    def _maybe_finish_reconcile(self) -> None:
        session = self.session
        early = "reconcile_early" in self.config.plants
        if (
            session is None
            or not session.reconcile_ack_sent
            or not (session.reconcile_ack_received or early)
            or session.reconcile_commit_persist is not None
        ):
            return
        # Both logs are now durable at both sites: commit everything in ours.
        records = sorted(self.log.values(), key=lambda record: record.id)
        assert session.peer is not None
        if not self.peer_generation:
            # Recorded only now that the two sites hold the same data: a site
            # that never got this far never goes on alone (see _suspend).
            self.peer_generation = session.peer.generation
            self._persist(meta=(("peer_generation", self.peer_generation),))
        persist_id = self._commit_whole_log(records, alone=False)
        session.reconcile_commit_persist = persist_id

        def finish() -> None:
            if self.session is session and self.role is Role.RECONCILE:
                self.last_heard_ms = self.now_ms
                self._set_role(Role.SYNC, "reconciled")
                self._wake_reads()

        self._after(persist_id, finish)

    def _winners(self, records: list[Record]) -> tuple[list[Record], dict[bytes, int]]:
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
            if request_id in self.dedup:
                outcome[request_id] = self.dedup[request_id]
            elif request_id not in chosen:
                chosen[request_id] = record
                outcome[request_id] = record.ts
        return [r for r in records if chosen.get(r.request_id) is r], outcome

    def _commit_whole_log(self, records: list[Record], *, alone: bool, mark_dirty: bool = False) -> int:
        """Commit every record of the log (reconcile and takeover), then forget the log."""
        winners, outcome = self._winners(records)
        keys = tuple(sorted({key for record in records for key in record.keys()}))
        dirty = keys if mark_dirty and "drop_dirty" not in self.config.plants else ()
        persist_id = self._persist(
            apply=tuple(v for record in winners for v in _versions(record)),
            log_delete=tuple(record.id for record in records),
            dedup_put=tuple((record.request_id, record.ts) for record in winners),
            dirty_add=dirty,
        )
        self.dirty.update(dirty)
        answered: list[tuple[int, Record]] = []
        for record in winners:
            self._dedup_put(record.request_id, record.ts)
            self.out.append(ev.Committed(record.id, self.epoch, self.role, alone=alone))
        for record in records:
            if record.id.origin == self.config.site and record.id.incarnation == self.incarnation:
                pending = self.pending.pop(record.id.seq, None)
                if pending is not None:
                    self._forget_pending_request(record)
                    answered.extend((handle, record) for handle in pending.handles)
        waiters = [(h, r) for r in records for h in self.log_waiters.pop(r.request_id, [])]
        self.log.clear()
        self.key_pending.clear()
        for pending in self.pending.values():  # SOLO writes in flight keep their keys blocked
            for key in pending.record.keys():
                self.key_pending[key] = self.key_pending.get(key, 0) + 1
        self.peer_records.clear()
        self.committed_unconfirmed.clear()
        self.peer_acked_seq = self.next_seq - 1

        def answer() -> None:
            for handle, record in answered + waiters:
                ts = outcome[record.request_id]
                self.out.append(ev.AnswerWrite(handle, True, ts=ts, duplicate=ts != record.ts))

        self._after(persist_id, answer)
        return persist_id

    # ================================================================ suspension, witness, takeover
    def _suspend(self, reason: str) -> None:
        self._drop_session(reason)
        self._set_role(Role.SUSPENDED, reason)
        if not self.peer_generation:
            # We never met the peer: we may be a wiped site whose peer holds
            # everything. Going on alone could lose it all, so wait for the peer.
            return
        if "no_witness" in self.config.plants:
            self.grant_epoch = self.epoch + 1
            return
        self._arbitrate()

    def _arbitrate(self, *, force: bool = False, meta: tuple[tuple[str, int | bytes | str], ...] = ()) -> None:
        """Ask to go on alone, after recording durably that we asked: a grant
        whose answer we do not live to see must still be found again."""
        request = msg.Arbitrate(self.config.pair, self.config.site, self.epoch, force=force)
        if self.asked_epoch == self.epoch and not force and not meta:
            self._ask_witness(request)
            return
        self.asked_epoch = self.epoch
        persist_id = self._persist(meta=(("asked_epoch", self.epoch), *meta))
        self.witness_outstanding = request  # nothing else goes to the witness meanwhile

        def ask() -> None:
            if self.witness_outstanding == request:
                self.witness_outstanding = None
                self._ask_witness(request)

        self._after(persist_id, ask)

    def _on_failover_forced(self, event: ev.Event) -> None:
        assert isinstance(event, ev.FailoverForced)
        if self.is_target or self.grant_epoch is not None or self._session_up():
            raise ProtocolError("a forced failover needs a site that is not a resync target, without a peer")
        # The other site may have served writes we never saw: when it returns it
        # gets a full resync (its data cleared), not just our dirty keys.
        self.resync_full_position = b""
        self._arbitrate(force=True, meta=(("resync_full_active", 1), ("resync_full_position", b"")))

    def _clear_asked(self) -> None:
        if self.asked_epoch:
            self.asked_epoch = 0
            self._persist(meta=(("asked_epoch", 0),))

    def _ask_witness(self, request: msg.WitnessRequest) -> None:
        if self.witness_outstanding == request:
            return
        self.witness_outstanding = request
        self.out.append(ev.AskWitness(request))

    def _maybe_ask_witness_again(self) -> None:
        if self.mark_synced_outstanding:
            self._ask_witness(msg.MarkSynced(self.config.pair, self.config.site, self.epoch))
        elif self.role in (Role.SUSPENDED, Role.FENCED) and self.grant_epoch is None and self.peer_generation:
            self._arbitrate()
        elif self.asked_epoch == self.epoch and self.grant_epoch is None and self.role in (Role.SYNC, Role.RECONCILE):
            # Back in SYNC without the answer to our Arbitrate: find out
            # whether the witness granted us the next epoch (without asking again).
            self._ask_witness(msg.Query(self.config.pair, self.config.site))
        elif self.role is Role.STARTING and self.holds_grant and self.grant_epoch is None:
            self._ask_witness(msg.Arbitrate(self.config.pair, self.config.site, self.epoch))

    def _on_witness_failed(self, event: ev.Event) -> None:
        assert isinstance(event, ev.WitnessFailed)
        if event.request != self.witness_outstanding:
            return
        self.witness_outstanding = None
        self.witness_next_try_ms = self.now_ms + self.config.witness_retry_ms
        if self.witness_unreachable_since_ms is None:
            self.witness_unreachable_since_ms = self.now_ms

    def _on_witness_answered(self, event: ev.Event) -> None:
        assert isinstance(event, ev.WitnessAnswered)
        if event.request != self.witness_outstanding:
            return
        self.witness_outstanding = None
        self.witness_unreachable_since_ms = None
        self.witness_next_try_ms = self.now_ms + self.config.witness_retry_ms
        answer = event.answer
        if isinstance(event.request, msg.MarkSynced):
            self._on_mark_synced_answer(answer)
            return
        if isinstance(event.request, msg.Query):
            granted_to_us = (
                answer.mode is msg.WitnessMode.SOLO and answer.holder == self.config.site and answer.epoch > self.epoch
            )
            if granted_to_us and self.role in (Role.SYNC, Role.RECONCILE):
                self._drop_session("the witness granted us an epoch we had not heard of")
                self._set_role(Role.SUSPENDED, "late grant found by query")
                self.grant_epoch = answer.epoch
            elif not granted_to_us:
                self._clear_asked()
            return

        if answer.verdict is msg.Verdict.GRANTED:
            if self.role in (Role.SOLO, Role.RESYNC_SOURCE) and answer.epoch == self.epoch:
                return
            if answer.epoch == self.epoch and self.holds_grant and self.role is Role.STARTING:
                self.grant_epoch = answer.epoch  # our grant is confirmed
            elif answer.epoch > self.epoch and self.role in (
                Role.SUSPENDED,
                Role.STARTING,
                Role.FENCED,
                Role.SYNC,
                Role.RECONCILE,
            ):
                if self.role in (Role.SYNC, Role.RECONCILE):
                    self._drop_session("granted while connected")
                    self._set_role(Role.SUSPENDED, "late grant")
                self.grant_epoch = answer.epoch
            return
        # DENIED: whatever we asked before, we were not granted.
        self._clear_asked()
        adoptable = (
            answer.mode is msg.WitnessMode.SYNC
            and answer.epoch == self.epoch + 1
            and (self.is_target or self.holds_grant)
            and self.role in (Role.STARTING, Role.SUSPENDED, Role.FENCED, Role.RESYNC_TARGET)
        )
        if adoptable:
            # The pair went SYNC(e+1) after a completed resync that we took
            # part in but did not live to record: adopt the epoch.
            # As a target, our suspect keys were resynced before MarkSynced went through.
            resolved = tuple(sorted(self.dirty)) if self.is_target else ()
            self.dirty.difference_update(resolved)
            self.epoch = answer.epoch
            self.holds_grant = False
            self.is_target = False
            self._persist(dirty_remove=resolved, meta=(("epoch", self.epoch), ("grant", 0), ("target", 0)))
            self._drop_session("adopted the witness's epoch")
            self._set_role(Role.SUSPENDED, "adopted the witness's SYNC epoch")
            self.witness_next_try_ms = self.now_ms  # ask again at once, in the new epoch
            return
        if self.role in (Role.SUSPENDED, Role.STARTING):
            self._fence(f"witness denied: {answer.mode.name} epoch {answer.epoch} holder {answer.holder or '-'}")

    def _take_over(self, epoch: int) -> None:
        """Granted and the leases are out: commit the whole log and go on alone."""
        self._drop_session("taking over")
        records = sorted(self.log.values(), key=lambda record: record.id)
        self.epoch = epoch
        self.holds_grant = True
        self.is_target = False
        self._persist(meta=(("epoch", epoch), ("grant", 1), ("target", 0)))
        # SOLO from here on, but serving waits (grant_epoch stays set) until
        # the commits below are durable.
        self._set_role(Role.SOLO, f"granted epoch {epoch}")
        persist_id = self._commit_whole_log(records, alone=True, mark_dirty=True)
        self.takeover_persist = persist_id

        def finish() -> None:
            self.grant_epoch = None
            self.takeover_persist = None
            self._wake_reads()

        self._after(persist_id, finish)

    def _fence(self, reason: str) -> None:
        self._set_role(Role.FENCED, reason)
        self.lease_until_ms = 0.0
        self.grant_epoch = None
        # Own writes in flight: the peer may commit them, or not.
        for pending in list(self.pending.values()):
            if pending.alone:
                continue
            for handle in pending.handles:
                self._reject_write(handle, "unknown", "outcome unknown: this site was fenced")
            pending.handles = []
        self._wake_reads()

    # ================================================================ resync: source
    def _begin_resync_source(self, *, full: bool) -> None:
        session = self.session
        assert session is not None and session.peer is not None
        self._set_role(Role.RESYNC_SOURCE, "peer returned behind us")
        self.peer_generation = session.peer.generation
        session.resync_began = True
        meta: list[tuple[str, int | bytes | str]] = [("peer_generation", self.peer_generation)]
        if full and self.resync_full_position is None:
            self.resync_full_position = b""
        # The target clears its data only when a full scan starts from the beginning.
        clear = self.resync_full_position == b""
        if self.resync_full_position is not None:
            meta += [("resync_full_active", 1), ("resync_full_position", self.resync_full_position)]
            session.resync_scan_cursor = self.resync_full_position
        else:
            session.resync_scan_done = True
        self._persist(meta=tuple(meta))
        session.resync_queue = sorted(self.dirty)
        if "rejoin_without_resync" in self.config.plants:
            session.resync_queue = []
            session.resync_scan_done = True
        self._send(msg.ResyncBegin(self.epoch, full=clear, next_seq=self.next_seq))

    def _on_resync_begin_ack(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncBeginAck)
        if not self._session_up() or not self._check_epoch(event.message.epoch):
            return
        assert self.session is not None
        if self.session.resync_begin_acked:
            self._protocol_violation("a second ResyncBeginAck")
            return
        suspect = [key for key in event.message.suspect_keys if key not in self.dirty]
        if suspect and "rejoin_without_resync" not in self.config.plants:
            self.dirty.update(suspect)
            self._persist(dirty_add=tuple(suspect))
            self.session.resync_queue.extend(suspect)
        if event.message.next_seq == 0:
            return  # more suspect keys follow (they did not fit in one message): wait for the last part
        self.session.resync_begin_acked = True
        self.session.peer_next_seq = event.message.next_seq
        entries = sorted(self.dedup.items())
        config = self.config
        for part in cut(entries, _dedup_entry_bytes, config.message_bytes_max, config.dedup_entries_per_message_max):
            self._send(msg.ResyncDedup(self.epoch, part))
        self._pump_resync()

    def _pump_resync(self) -> None:
        session = self.session
        if session is None or self.role is not Role.RESYNC_SOURCE or not session.resync_begin_acked:
            return
        window = self.config.resync_batches_inflight_max
        while len(session.resync_loading) + len(session.resync_inflight) < window:
            token = session.resync_next_batch
            if not session.resync_scan_done and not any(keys == () for keys in session.resync_loading.values()):
                session.resync_next_batch += 1
                session.resync_loading[token] = ()
                self.out.append(
                    ev.LoadResyncBatch(
                        token, scan_from=session.resync_scan_cursor, limit=self.config.resync_batch_keys_max
                    )
                )
                continue
            if session.resync_queue:
                keys = tuple(session.resync_queue[: self.config.resync_batch_keys_max])
                del session.resync_queue[: len(keys)]
                session.resync_next_batch += 1
                session.resync_loading[token] = keys
                self.out.append(ev.LoadResyncBatch(token, keys=keys))
                continue
            break
        if (
            not session.resync_loading
            and not session.resync_inflight
            and not session.resync_queue
            and session.resync_scan_done
            and not self.mark_synced_outstanding
        ):
            if self.dirty and "rejoin_without_resync" not in self.config.plants:
                session.resync_queue = sorted(self.dirty)
                self._pump_resync()
                return
            self.mark_synced_outstanding = True
            self._ask_witness(msg.MarkSynced(self.config.pair, self.config.site, self.epoch))

    def _on_resync_batch_loaded(self, event: ev.Event) -> None:
        assert isinstance(event, ev.ResyncBatchLoaded)
        session = self.session
        if session is None or event.token not in session.resync_loading or self.role is not Role.RESYNC_SOURCE:
            return  # the session it was for is gone
        keys = session.resync_loading.pop(event.token)
        scan = keys == ()
        if scan:
            keys = tuple(entry.key for entry in event.entries)
            session.resync_scan_cursor = event.next_position
            session.resync_scan_done = event.next_position is None
        elif len(event.entries) < len(keys):
            # Only a prefix fitted in a frame: the rest goes back to the front of the queue.
            sent = len(event.entries)
            if sent == 0 or tuple(entry.key for entry in event.entries) != keys[:sent]:
                raise ProtocolError("a resync batch must answer a non-empty prefix of the asked keys")
            session.resync_queue[:0] = keys[sent:]
            keys = keys[:sent]
        if len(event.entries) > 1 and sum(map(versioned_wire_bytes, event.entries)) > self.config.message_bytes_max:
            raise ProtocolError(f"a resync batch of {len(event.entries)} entries exceeds message_bytes_max")
        session.resync_inflight[event.token] = (keys, scan, event.next_position)
        for entry in event.entries:
            self.hlc.observe(entry.ts)
        self._send(msg.ResyncData(self.epoch, event.token, event.entries))

    def _on_resync_ack(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncAck)
        ack = event.message
        if not self._session_up() or not self._check_epoch(ack.epoch):
            return
        session = self.session
        assert session is not None
        entry = session.resync_inflight.pop(ack.batch, None)
        if entry is None:
            self._protocol_violation(f"resync ack for unknown batch {ack.batch}")
            return
        keys, scan, next_position = entry
        meta: tuple[tuple[str, int | bytes | str], ...] = ()
        if scan:
            if next_position is None:
                self.resync_full_position = None
                meta = (("resync_full_active", 0), ("resync_full_position", b""))
            else:
                self.resync_full_position = next_position
                meta = (("resync_full_position", next_position),)
        removed = tuple(key for key in keys if key in self.dirty)
        self.dirty.difference_update(removed)
        self._persist(dirty_remove=removed, meta=meta)
        self._pump_resync()

    def _on_mark_synced_answer(self, answer: msg.WitnessAnswer) -> None:
        self.mark_synced_outstanding = False
        if answer.verdict is not msg.Verdict.SYNCED:
            self._fence(f"witness refused MarkSynced: {answer.mode.name} epoch {answer.epoch}")
            return
        epoch = answer.epoch
        self.epoch = epoch
        self.holds_grant = False
        self.synced_epoch = epoch
        self._persist(meta=(("epoch", epoch), ("grant", 0), ("target", 0), ("synced_epoch", epoch)))
        self.last_heard_ms = self.now_ms
        self._set_role(Role.SYNC, f"witness moved the pair to SYNC {epoch}")
        # Sent at once, before any record of the new epoch. If we crash before
        # the persist above is durable, the witness's answer lets us adopt the
        # epoch at restart (see _on_witness_answered); without a session the
        # peer hears it again at the next Hello (see _on_hello).
        self._send_if_session(msg.ResyncSynced(epoch))

    def _resync_source_lost_peer(self) -> None:
        """The resync target vanished: go on alone again (we still hold the grant)."""
        records = sorted(self.log.values(), key=lambda record: record.id)
        self._set_role(Role.SOLO, "resync target lost")
        self._commit_whole_log(records, alone=True, mark_dirty=True)

    # ================================================================ resync: target
    def _on_resync_begin(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncBegin)
        begin = event.message
        if not self._session_up():
            return
        if begin.epoch < self.epoch or self.holds_grant and begin.epoch == self.epoch:
            self._protocol_violation("ResyncBegin from a site that is not ahead")
            return
        # Everything in our log is unresolved and was never visible without the
        # source having it: drop it. Outcome of our own writes: unknown.
        self._fence("resync begins")
        dropped = tuple(self.log)
        # The keys of what we drop stay suspect until the resync is over: kept
        # in our own dirty set (durably, with the drop), reported at every
        # ResyncBegin, since a source that crashes may forget them.
        dropped_keys = {key for record in self.log.values() for key in record.keys()}
        new_suspect = tuple(sorted(dropped_keys - self.dirty))
        self.dirty.update(dropped_keys)
        suspect = tuple(sorted(self.dirty))
        if "forget_suspect_keys" in self.config.plants:
            suspect = ()
        for pending in list(self.pending.values()):
            for handle in pending.handles:
                self._reject_write(handle, "unknown", "outcome unknown: resync")
        self.pending.clear()
        self.pending_by_request.clear()
        self.log.clear()
        self.key_pending.clear()
        self.peer_records.clear()
        self.committed_unconfirmed.clear()
        self.epoch = begin.epoch
        self.is_target = True
        self.holds_grant = False
        # Nothing of ours is in flight any more: acknowledgements start over.
        self.peer_acked_seq = self.next_seq - 1
        self._set_role(Role.RESYNC_TARGET, f"resync from {self.config.peer} (full={begin.full})")
        self.peer_generation = self.session.peer.generation if self.session and self.session.peer else b""
        persist_id = self._persist(
            log_delete=dropped,
            dirty_add=new_suspect,
            clear_data=begin.full,
            meta=(("epoch", self.epoch), ("target", 1), ("grant", 0), ("peer_generation", self.peer_generation)),
        )
        assert self.session is not None
        self.session.peer_next_seq = begin.next_seq
        session, next_seq = self.session, self.next_seq
        parts = cut(suspect, _key_bytes, self.config.message_bytes_max, len(suspect) or 1) or [()]

        def acknowledge() -> None:
            # Every part but the last says "more follow" with next_seq 0 (seqs start at 1).
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                self._send_in(session, msg.ResyncBeginAck(self.epoch, part, next_seq if last else 0))

        self._after(persist_id, acknowledge)

    def _on_resync_data(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncData)
        data = event.message
        if not self._session_up() or not self._check_epoch(data.epoch):
            return
        for entry in data.entries:
            self.hlc.observe(entry.ts)
        persist_id = self._persist(apply=data.entries, meta=(("clock_high", self.hlc.high_water),))
        batch, session = data.batch, self.session
        self._after(persist_id, lambda: self._send_in(session, msg.ResyncAck(self.epoch, batch)))

    def _on_resync_dedup(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncDedup)
        if not self._session_up() or not self._check_epoch(event.message.epoch):
            return
        fresh = tuple((r, ts) for r, ts in event.message.entries if r not in self.dedup)
        for request_id, ts in fresh:
            self._dedup_put(request_id, ts)
        if fresh:
            self._persist(dedup_put=fresh)

    def _on_resync_synced(self, event: ev.Event) -> None:
        assert isinstance(event, ev.PeerSent) and isinstance(event.message, msg.ResyncSynced)
        synced = event.message
        if not self._session_up() or synced.epoch != self.epoch + 1 or not self.is_target:
            self._protocol_violation(f"ResyncSynced({synced.epoch}) in epoch {self.epoch}")
            return
        self.epoch = synced.epoch
        self.is_target = False
        self.synced_epoch = synced.epoch
        resolved = tuple(sorted(self.dirty))  # our suspect keys: the source has sent them all
        self.dirty.clear()
        self._persist(
            dirty_remove=resolved,
            meta=(("epoch", self.epoch), ("target", 0), ("grant", 0), ("synced_epoch", synced.epoch)),
        )
        self.last_heard_ms = self.now_ms
        if self.role is Role.RESYNC_TARGET:
            self._set_role(Role.SYNC, f"resynchronised, SYNC {self.epoch}")
        else:
            # We had fallen back to FENCED/STARTING: meet again in the new epoch.
            self._begin_reconcile()

    # ================================================================ helpers
    def _session_up(self) -> bool:
        return self.connected and self.session is not None and self.session.peer is not None

    def _can_serve_reads(self) -> bool:
        if self.grant_epoch is not None or self.takeover_persist is not None:
            return False
        if self.role in (Role.SOLO, Role.RESYNC_SOURCE):
            return not self.mark_synced_outstanding or self._session_up()
        if self.role in (Role.SYNC, Role.SUSPENDED):
            return self.now_ms < self.lease_until_ms or "no_read_lease" in self.config.plants
        return False

    def _lease_coming(self) -> bool:
        """SYNC with a live session but no lease yet (just joined): a read waits for it."""
        return self.role is Role.SYNC and self._session_up() and self.grant_epoch is None

    def _key_blocked(self, key: bytes) -> bool:
        if "no_read_gate" in self.config.plants:
            return False
        return self.key_pending.get(key, 0) > 0

    def _wake_reads(self) -> None:
        if not self.parked_reads:
            return
        keep = []
        for parked in self.parked_reads:
            if not self._can_serve_reads() and self._lease_coming():
                keep.append(parked)  # SYNC with the peer, the next heartbeat answer brings the lease
            elif not self._can_serve_reads():
                self.out.append(ev.RejectRead(parked.handle, "unavailable", f"site is {self.role.name}"))
            elif self._key_blocked(parked.key):
                keep.append(parked)
            else:
                self.out.append(ev.ServeRead(parked.handle, parked.key))
        self.parked_reads = keep

    def _log_add(self, record: Record) -> None:
        self.log[record.id] = record
        for key in record.keys():
            self.key_pending[key] = self.key_pending.get(key, 0) + 1

    def _log_resolve(self, record: Record) -> None:
        """The record is committed here: it no longer blocks reads (it may stay in the log)."""
        for key in record.keys():
            count = self.key_pending.get(key, 0) - 1
            if count > 0:
                self.key_pending[key] = count
            else:
                self.key_pending.pop(key, None)

    def _log_remove(self, record: Record) -> None:
        if self.log.pop(record.id, None) is not None:
            self._log_resolve(record)

    def _request_logged(self, request_id: bytes) -> bool:
        """A record with this request id waits in the log (own committed ones are in the dedup table)."""
        return any(
            record.request_id == request_id
            and (record.id.seq not in self.committed_unconfirmed or record.id.origin != self.config.site)
            for record in self.log.values()
        )

    def _answer_log_waiters(self, record: Record) -> None:
        for handle in self.log_waiters.pop(record.request_id, []):
            self.out.append(ev.AnswerWrite(handle, True, ts=record.ts, duplicate=True))

    def _add_pending(self, record: Record, handle: int, persist_id: int, *, alone: bool) -> None:
        self.pending[record.id.seq] = _Pending(record, [handle], persist_id, alone)
        self.pending_by_request[record.request_id] = record.id.seq
        if alone:
            for key in record.keys():
                self.key_pending[key] = self.key_pending.get(key, 0) + 1

    def _forget_pending_request(self, record: Record) -> None:
        if self.pending_by_request.get(record.request_id) == record.id.seq:
            del self.pending_by_request[record.request_id]

    def _commit_own_alone(self, seq: int) -> None:
        pending = self.pending.pop(seq, None)
        if pending is None:
            return
        record = pending.record
        self._forget_pending_request(record)
        self._log_resolve(record)
        self._dedup_put(record.request_id, record.ts)
        self.out.append(ev.Committed(record.id, self.epoch, self.role, alone=True))
        for handle in pending.handles:
            self.out.append(ev.AnswerWrite(handle, True, ts=record.ts))
        self._wake_reads()

    def _reject_write(self, handle: int, error: str, message: str) -> None:
        self.out.append(ev.AnswerWrite(handle, False, error=error, message=message))

    def _persist(
        self,
        *,
        log_put: tuple[Record, ...] = (),
        log_delete: tuple[RecordId, ...] = (),
        apply: tuple[Versioned, ...] = (),
        dirty_add: tuple[bytes, ...] = (),
        dirty_remove: tuple[bytes, ...] = (),
        dedup_put: tuple[tuple[bytes, int], ...] = (),
        meta: tuple[tuple[str, int | bytes | str], ...] = (),
        clear_data: bool = False,
    ) -> int:
        persist_id = self.next_persist_id
        self.next_persist_id += 1
        self.out.append(
            ev.Persist(
                persist_id,
                log_put=log_put,
                log_delete=log_delete,
                apply=apply,
                dirty_add=dirty_add,
                dirty_remove=dirty_remove,
                dedup_put=dedup_put,
                meta=meta,
                clear_data=clear_data,
            )
        )
        return persist_id

    def _after(self, persist_id: int, callback: Callable[[], None]) -> None:
        if persist_id <= self.durable_persist_id:
            callback()
        else:
            self.after_durable.append((persist_id, callback))

    def _send(self, message: msg.PeerMessage) -> None:
        # The pair assertion of the byte bound: cut where made, checked here, and again by the encoder.
        size = message_bytes(message)
        assert size <= self.config.message_bytes_max or _single_item(message), (
            f"{type(message).__name__} of {size} bytes exceeds message_bytes_max {self.config.message_bytes_max}"
        )
        if self.connected:
            self.out.append(ev.SendToPeer(message))

    def _send_if_session(self, message: msg.PeerMessage) -> None:
        if self._session_up():
            self._send(message)

    def _send_in(self, session: _Session | None, message: msg.PeerMessage) -> None:
        """Send an answer that became due after a persist, only on the session it answers."""
        if session is not None and self.session is session and self._session_up():
            self._send(message)

    def _end_session(self) -> None:
        had_session = self.session is not None
        self.session = None
        self.heartbeats_sent.clear()
        self.pending_peer_acks.clear()
        if had_session:
            self._session_lost()

    def _drop_session(self, reason: str) -> None:
        if self.connected:
            self.out.append(ev.DropPeerConnection(reason))
        self.connected = False
        self._end_session()

    def _set_role(self, role: Role, reason: str) -> None:
        if role is self.role:
            return
        old = self.role
        self.role = role
        if role not in (Role.SYNC, Role.SUSPENDED):
            # Only SYNC earns a read lease; SUSPENDED keeps what it has left.
            self.lease_until_ms = min(self.lease_until_ms, self.now_ms)
        self.out.append(ev.RoleChanged(old, role, self.epoch, reason))
        self._wake_reads()

    def _protocol_violation(self, reason: str) -> None:
        self.protocol_errors += 1
        self._drop_session(f"protocol error: {reason}")

    def _stop(self, reason: str) -> None:
        self.stopped_reason = reason
        old = self.role
        self.role = Role.STOPPED
        self.out.append(ev.RoleChanged(old, Role.STOPPED, self.epoch, reason))
        for pending in self.pending.values():
            for handle in pending.handles:
                self._reject_write(handle, "unknown", reason)
        self.pending.clear()
        for parked in self.parked_reads:
            self.out.append(ev.RejectRead(parked.handle, "stopped", reason))
        self.parked_reads.clear()
        self.out.append(ev.Stop(reason))

    def _drain(self) -> list[ev.Action]:
        out, self.out = self.out, []
        return out

    # ================================================================ introspection
    def status(self) -> dict[str, object]:
        return {
            "site": self.config.site,
            "role": self.role.name,
            "epoch": self.epoch,
            "incarnation": self.incarnation,
            "connected": self._session_up(),
            "pending_writes": len(self.pending),
            "log_records": len(self.log),
            "dirty_keys": len(self.dirty),
            "lease_valid": self.now_ms < self.lease_until_ms,
            "resync_full_position": self.resync_full_position,
            "witness_outstanding": self.witness_outstanding is not None,
            "protocol_errors": self.protocol_errors,
        }


def _int(meta: dict[str, int | bytes | str], name: str, default: int) -> int:
    value = meta.get(name, default)
    return value if isinstance(value, int) else default


def _versions(record: Record) -> tuple[Versioned, ...]:
    return tuple(Versioned(operation.key, record.ts, operation.value) for operation in record.operations)


# ==================================================================== the transition table
# (role, event kind) -> handler. A pair not in the table is a ProtocolError.
# NEXT_ROLES says which roles a handler may move to; step() asserts it.

_ALWAYS: dict[type, str] = {
    ev.WriteRequested: "_on_write",
    ev.ReadRequested: "_on_read",
    ev.TimePassed: "_on_tick",
    ev.Persisted: "_on_persisted",
    ev.PersistFailed: "_on_persist_failed",
    ev.PeerConnected: "_on_connected",
    ev.PeerDisconnected: "_on_disconnected",
    ev.WitnessAnswered: "_on_witness_answered",
    ev.WitnessFailed: "_on_witness_failed",
    ev.ResyncBatchLoaded: "_on_resync_batch_loaded",
    msg.Hello: "_on_hello",
    msg.Goodbye: "_on_goodbye",
    msg.Heartbeat: "_on_heartbeat",
    msg.HeartbeatAck: "_on_heartbeat_ack",
}

_REPLICATION: dict[type, str] = {
    msg.ShipRecords: "_on_ship_records",
    msg.PreparedAck: "_on_prepared_ack",
    msg.CommitWatermark: "_on_commit_watermark",
    msg.CommitConfirm: "_on_commit_confirm",
}

_PER_ROLE: dict[Role, dict[type, str]] = {
    Role.STARTING: {
        msg.ResyncBegin: "_on_resync_begin",
        msg.ResyncSynced: "_on_resync_synced",
        ev.FailoverForced: "_on_failover_forced",
    },
    Role.SYNC: {**_REPLICATION},
    Role.RECONCILE: {
        **_REPLICATION,
        msg.ReconcileDone: "_on_reconcile_done",
        msg.ReconcileAck: "_on_reconcile_ack",
    },
    Role.SUSPENDED: {msg.ResyncBegin: "_on_resync_begin", ev.FailoverForced: "_on_failover_forced"},
    Role.SOLO: {},
    Role.FENCED: {
        msg.ResyncBegin: "_on_resync_begin",
        msg.ResyncSynced: "_on_resync_synced",
        ev.FailoverForced: "_on_failover_forced",
    },
    Role.RESYNC_SOURCE: {
        **_REPLICATION,
        msg.ResyncBeginAck: "_on_resync_begin_ack",
        msg.ResyncAck: "_on_resync_ack",
    },
    Role.RESYNC_TARGET: {
        **_REPLICATION,
        msg.ResyncBegin: "_on_resync_begin",
        msg.ResyncData: "_on_resync_data",
        msg.ResyncDedup: "_on_resync_dedup",
        msg.ResyncSynced: "_on_resync_synced",
    },
    Role.STOPPED: {},
}

TRANSITIONS: dict[tuple[Role, type], str] = {}
for _role, _specific in _PER_ROLE.items():
    if _role is Role.STOPPED:
        continue
    for _kind, _handler in {**_ALWAYS, **_specific}.items():
        TRANSITIONS[(_role, _kind)] = _handler

# Which roles each handler may lead to (checked on every step; the docs'
# state diagram is generated from this table).
_ANY_FAILURE = frozenset({Role.SUSPENDED, Role.FENCED, Role.SOLO, Role.STARTING, Role.STOPPED})
_HANDLER_NEXT: dict[str, frozenset[Role]] = {
    "_on_write": frozenset(),
    "_on_read": frozenset(),
    "_on_tick": frozenset({Role.SUSPENDED, Role.SOLO}),
    "_on_persisted": frozenset({Role.SYNC, Role.SOLO}),
    "_on_persist_failed": frozenset({Role.STOPPED}),  # fail-stop
    "_on_connected": frozenset(),
    "_on_disconnected": frozenset({Role.SUSPENDED, Role.STARTING, Role.SOLO}),
    "_on_witness_answered": frozenset({Role.FENCED, Role.SUSPENDED, Role.SYNC}),
    "_on_witness_failed": frozenset(),
    "_on_failover_forced": frozenset(),
    "_on_resync_batch_loaded": frozenset(),
    "_on_hello": frozenset({Role.RECONCILE, Role.RESYNC_SOURCE, Role.FENCED}),
    "_on_goodbye": frozenset({Role.FENCED, Role.SOLO}),
    "_on_heartbeat": frozenset({Role.FENCED}),
    "_on_heartbeat_ack": frozenset({Role.FENCED}),
    "_on_ship_records": frozenset({Role.FENCED}),
    "_on_prepared_ack": frozenset({Role.FENCED}),
    "_on_commit_watermark": frozenset({Role.FENCED}),
    "_on_commit_confirm": frozenset({Role.FENCED}),
    "_on_reconcile_done": frozenset({Role.FENCED, Role.SYNC}),
    "_on_reconcile_ack": frozenset({Role.FENCED}),
    "_on_resync_begin": frozenset({Role.RESYNC_TARGET, Role.FENCED}),
    "_on_resync_begin_ack": frozenset({Role.FENCED}),
    "_on_resync_ack": frozenset({Role.FENCED}),
    "_on_resync_data": frozenset({Role.FENCED}),
    "_on_resync_dedup": frozenset({Role.FENCED}),
    "_on_resync_synced": frozenset({Role.SYNC, Role.RECONCILE}),
}
NEXT_ROLES: dict[tuple[Role, type], frozenset[Role]] = {
    key: _HANDLER_NEXT[handler] | _ANY_FAILURE for key, handler in TRANSITIONS.items()
}
