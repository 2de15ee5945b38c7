"""The pair protocol of one site, as a pure state machine: the conductor.

Theory of operation (docs/protocol.md, generated from the table, has the long form).

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

The layout. `SiteCore` keeps the role, the epoch, the durable standing and the
dispatch through `table.TRANSITIONS`; its state lives in leaves (`log`,
`dedup`, `reads`, `effects`) and in phase objects that exist only while their
phase runs (`reconcile.Reconcile`, `resync_source.ResyncSource`,
`takeover.Takeover`, `resync_source.MarkSynced`). The handlers live in the
module of their phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from replicator.core import events as ev
from replicator.core import messages as msg
from replicator.core import reads, table, timers
from replicator.core import session as sessions
from replicator.core.config import CoreConfig
from replicator.core.dedup import DedupTable
from replicator.core.effects import Effects, Meta
from replicator.core.errors import (
    InvariantViolation,
    ProtocolError,
    ProtocolErrorKind,
    ReadError,
    RemoteErrorKind,
    WriteError,
)
from replicator.core.hlc import HybridLogicalClock
from replicator.core.log import Pending, ReplicationLog
from replicator.core.messages import Role
from replicator.core.plants import Plant, Plants
from replicator.core.reads import ReadGate
from replicator.core.records import Record, RecordId, Versioned
from replicator.core.replication import SERVING_WRITES
from replicator.core.resync_source import MarkSynced
from replicator.core.session import Session
from replicator.core.sizes import cut, message_bytes, single_item
from replicator.core.standing import CommitKind, Standing
from replicator.core.takeover import Takeover

__all__ = ["SiteCore", "ProtocolError", "cut", "message_bytes", "SERVING_WRITES"]


@dataclass(frozen=True, slots=True)
class CoreStatus:
    """What the shells may know of a core between steps (status, metrics, logs, checkers):
    a frozen copy, so no shell reads or writes the core's internals."""

    site: str
    peer: str
    role: Role
    epoch: int
    incarnation: int
    generation: bytes
    peer_generation: bytes  # the peer's generation as last met ("" : none, or forgotten for a full resync)
    tie_break_site: str  # the configured preferred site (who wins a tie without a witness)
    peer_connected: bool  # a session with the peer is up
    holds_grant: bool  # the site holds the witness's grant (SOLO, or a resync source after it)
    is_target: bool  # the site is (or was, before a restart) a resync target: its data is incomplete
    takeover_pending: bool  # granted, but still waiting out leases / committing its log to go on alone
    asked_epoch: int  # the epoch the site durably asked the witness to go on alone in (0: none)
    log_records: int
    dirty_keys: int
    pending_writes: int
    resync_full_position: bytes | None  # a full resync's scan position while one runs
    protocol_errors: int


class SiteCore:
    """One site's pair protocol. Drive it with `start()` then `step(event, now_ms, wall_ms)`."""

    def __init__(self, config: CoreConfig, recovered: ev.Recovered) -> None:
        self.config = config
        self.plants = Plants.of(config.plants)
        # The cumulative messages of the peer are checked against their sequence (the one plant
        # that skips it is decided here, once).
        self.checks_sequence = not self.plants.on(Plant.ACCEPT_GAPS)
        self._recover_meta(recovered.meta)
        self.role = Role.STARTING
        self.replication = ReplicationLog(config.site, waiters_max=config.inflight_records_max)
        for record in recovered.log:
            self.replication.add(record)
            self.hlc.observe(record.ts)
        self.dirty: set[bytes] = set(recovered.dirty)
        self.dedup_table = DedupTable(dict(recovered.dedup), config.dedup_age_ms, config.dedup_entries_max)
        self.peer_acked_seq = 0  # peer holds our records up to this seq (this incarnation)
        self.reads = ReadGate(config.parked_reads_max)
        self.effects = Effects(continuations_max=4 * config.inflight_records_max + config.parked_reads_max)
        self.connected = False
        self.session: Session | None = None
        self.now_ms = 0.0
        self.wall_ms = 0
        self.started_ms = 0.0
        self.last_heard_ms = 0.0
        self.next_heartbeat_ms = 0.0
        self.heartbeats_sent: dict[int, float] = {}
        self.witness_outstanding: msg.WitnessRequest | None = None
        self.witness_next_try_ms = 0.0
        self.witness_unreachable_since_ms: float | None = None
        self.takeover: Takeover | None = None  # granted: waiting out leases, then committing the log
        self.mark_synced: MarkSynced | None = None  # resync done: asking the witness for SYNC(e+1)
        self.pending_peer_acks: list[tuple[int, int, int]] = []  # (persist id, incarnation, seq)
        self.protocol_errors = 0
        self.stopped_reason = ""

    def _recover_meta(self, meta: dict[str, int | bytes | str]) -> None:
        generation = meta.get("generation")
        if not isinstance(generation, bytes) or not generation:
            raise ValueError("recovered meta must hold this site's generation (bytes)")
        self.generation: bytes = generation
        self.epoch = _int(meta, "epoch", 1)
        grant, target = bool(_int(meta, "grant", 0)), bool(_int(meta, "target", 0))
        if grant and target:
            raise ValueError("recovered meta holds both the grant and the resync target mark")
        self.standing = Standing.GRANT_HOLDER if grant else Standing.RESYNC_TARGET if target else Standing.PEER
        self.synced_epoch = _int(meta, "synced_epoch", 0)
        # We asked the witness to go on alone in this epoch and do not know the
        # answer: it may have granted us the next epoch (see witness_client.ask_again).
        self.asked_epoch = _int(meta, "asked_epoch", 0)
        peer_generation = meta.get("peer_generation", b"")
        self.peer_generation: bytes = peer_generation if isinstance(peer_generation, bytes) else b""
        # Rollback detection (docs/design.md, "A disk restored from an older copy"): the newest ts
        # that the peer told us it holds durably (it acknowledged a record or a resync batch, or
        # committed a record of its own). Its disk holds a clock high-water at least that high, so
        # a peer whose Hello reports less came back with an older copy of its data.
        self.peer_clock_floor = _int(meta, "peer_clock_floor", 0)
        self.peer_clock_floor_saved = self.peer_clock_floor
        full_position = meta.get("resync_full_position", b"")
        active = bool(_int(meta, "resync_full_active", 0))
        self.resync_full_position: bytes | None = full_position if active and isinstance(full_position, bytes) else None
        self.incarnation = _int(meta, "incarnation", 0) + 1
        self.next_seq = 1
        self.hlc = HybridLogicalClock(self.config.origin_bit, _int(meta, "clock_high", 0))

    # ================================================================ entry points
    def start(self, now_ms: float, wall_ms: int) -> list[ev.Action]:
        """Begin after recovery: bump the incarnation durably, act as if a lease was granted now."""
        self.now_ms, self.wall_ms = now_ms, wall_ms
        self.last_heard_ms = now_ms
        self.started_ms = now_ms
        self.reads.lease_granted_until_ms = now_ms + self.config.lease_ms
        self.persist(meta=(("incarnation", self.incarnation), ("clock_high", self.hlc.high_water)))
        if self.holds_grant:
            # Confirm the grant with the witness before serving alone: it may
            # have moved on (a MarkSynced we did not live to record).
            self.ask_witness(msg.Arbitrate(self.config.pair, self.config.site, self.epoch))
        return self.effects.drain()

    def step(self, event: ev.Event, now_ms: float, wall_ms: int) -> list[ev.Action]:
        if self.role is Role.STOPPED:
            raise ProtocolError(ProtocolErrorKind.STOPPED, f"site {self.config.site} ({self.stopped_reason}); got {event!r}")
        if self.config.tick_ms is not None and now_ms - self.now_ms > self.config.heartbeat_interval_ms:
            # No event was stepped here for longer than a heartbeat interval although the shell's
            # timer steps one every tick (a stalled loop, a paused process): that time is not the
            # peer's silence, whose frames may wait unread behind this very event. Liveness only:
            # the leases run on the clock as before.
            self.last_heard_ms += now_ms - self.now_ms - self.config.heartbeat_interval_ms
        self.now_ms = max(self.now_ms, now_ms)  # monotonic
        self.wall_ms = wall_ms
        kind: type = type(event.message) if isinstance(event, ev.PeerSent) else type(event)
        row = table.TRANSITIONS.get((self.role, kind))
        if row is None:
            if isinstance(event, ev.PeerSent):
                # A remote error: the peer sent what this role cannot take.
                self.protocol_violation(RemoteErrorKind.NOT_IN_TABLE, f"{self.role.name} cannot take {kind.__name__}")
                return self.effects.drain()
            raise ProtocolError(ProtocolErrorKind.NOT_IN_TABLE, f"{self.role.name} cannot take {kind.__name__}")
        before = self.role
        if isinstance(event, ev.PeerSent) and before is Role.RECONCILE:
            # In RECONCILE, which serves nothing, every frame counts as hearing the peer: heartbeat
            # answers queue behind the reconcile shipments (megabytes with large values), and a
            # one-way cut still ends it, since the deaf side times out and drops the connection.
            self.last_heard_ms = self.now_ms
        row.handler(self, event)
        if isinstance(event, ev.PeerSent) and before is Role.SYNC and self.session_up():
            # So in SYNC does every frame of a session that goes on: heartbeat answers queue behind
            # the peer's shipments (block writes), and a busy peer is not a dead one. Not a frame
            # that ends the session (a Hello refused: a peer restored from an old copy that keeps
            # reconnecting must not keep this site from asking the witness, simulator seed 444).
            # A one-way cut still ends the session: the deaf side times out and asks the witness,
            # and the other, heard but not hearing, gets no heartbeat answer, so no read lease.
            self.last_heard_ms = self.now_ms
        timers.run(self)
        if self.role is not before and self.role not in row.next_roles:
            raise InvariantViolation(f"{before.name} --{kind.__name__}--> {self.role.name} is not in the transition table")
        return self.effects.drain()

    # ================================================================ services for the phases
    def emit(self, action: ev.Action) -> None:
        self.effects.out.append(action)

    def persist(
        self,
        *,
        log_put: tuple[Record, ...] = (),
        log_delete: tuple[RecordId, ...] = (),
        apply: tuple[Versioned, ...] = (),
        dirty_add: tuple[bytes, ...] = (),
        dirty_remove: tuple[bytes, ...] = (),
        dedup_put: tuple[tuple[bytes, int], ...] = (),
        meta: Meta = (),
        clear_data: bool = False,
        urgent: bool = True,
    ) -> int:
        if self.peer_clock_floor > self.peer_clock_floor_saved:
            # A floor lost in a crash only makes the rollback check weaker, never wrong.
            meta = (*meta, ("peer_clock_floor", self.peer_clock_floor))
            self.peer_clock_floor_saved = self.peer_clock_floor
        return self.effects.persist(
            log_put=log_put,
            log_delete=log_delete,
            apply=apply,
            dirty_add=dirty_add,
            dirty_remove=dirty_remove,
            dedup_put=dedup_put,
            meta=meta,
            clear_data=clear_data,
            urgent=urgent,
        )

    def after(self, persist_id: int, continuation: Callable[[], None]) -> None:
        self.effects.after(persist_id, continuation)

    def decide_commit(self, kind: CommitKind) -> None:
        """The one place a commit is decided: only in the roles that may decide it."""
        if self.role not in kind.value:
            raise InvariantViolation(f"a {kind.name} commit decided in {self.role.name}")

    def dirty_keys(self, keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """The keys to mark dirty for a write or commit made alone: all of them."""
        return () if self.plants.on(Plant.DROP_DIRTY) else keys

    def raise_peer_clock_floor(self, ts: int) -> None:
        # Made durable with the next persist (see persist).
        self.peer_clock_floor = max(self.peer_clock_floor, ts)

    def session_up(self) -> bool:
        return self.connected and self.session is not None and self.session.peer is not None

    def send(self, message: msg.PeerMessage) -> None:
        # The pair assertion of the byte bound: cut where made, checked here, and again by the encoder.
        size = message_bytes(message)
        if size > self.config.message_bytes_max and not single_item(message):
            limit = self.config.message_bytes_max
            raise InvariantViolation(f"{type(message).__name__} of {size} bytes exceeds message_bytes_max {limit}")
        if self.connected:
            self.emit(ev.SendToPeer(message))

    def send_if_session(self, message: msg.PeerMessage) -> None:
        if self.session_up():
            self.send(message)

    def send_in(self, session: Session | None, message: msg.PeerMessage) -> None:
        """Send an answer that became due after a persist, only on the session it answers."""
        if session is not None and self.session is session and self.session_up():
            self.send(message)

    def ask_witness(self, request: msg.WitnessRequest) -> None:
        if self.witness_outstanding == request:
            return
        self.witness_outstanding = request
        self.emit(ev.AskWitness(request))

    def reject_write(self, handle: int, error: WriteError, message: str) -> None:
        self.emit(ev.AnswerWrite(handle, False, error=error, message=message))

    def end_session(self) -> None:
        had_session = self.session is not None
        self.session = None
        self.heartbeats_sent.clear()
        self.pending_peer_acks.clear()
        if had_session:
            sessions.session_lost(self)

    def drop_session(self, reason: str) -> None:
        if self.connected:
            self.emit(ev.DropPeerConnection(reason))
        self.connected = False
        self.end_session()

    def set_role(self, role: Role, reason: str) -> None:
        if role is self.role:
            return
        old = self.role
        self.role = role
        if role not in (Role.SYNC, Role.SUSPENDED):
            # Only SYNC earns a read lease; SUSPENDED keeps what it has left.
            self.reads.lease_until_ms = min(self.reads.lease_until_ms, self.now_ms)
        self.emit(ev.RoleChanged(old, role, self.epoch, reason))
        reads.wake(self)

    def protocol_violation(self, kind: RemoteErrorKind, reason: str) -> None:
        self.protocol_errors += 1
        self.drop_session(f"protocol error {kind.name}: {reason}")

    def stop(self, reason: str) -> None:
        self.stopped_reason = reason
        old = self.role
        self.role = Role.STOPPED
        self.emit(ev.RoleChanged(old, Role.STOPPED, self.epoch, reason))
        for pending in self.replication.pending.values():
            for handle in pending.handles:
                self.reject_write(handle, WriteError.UNKNOWN, reason)
        self.replication.pending.clear()
        self.replication.pending_by_request.clear()
        for parked in self.reads.parked:
            self.emit(ev.RejectRead(parked.handle, ReadError.STOPPED, reason))
        self.reads.parked.clear()
        self.emit(ev.Stop(reason))

    # ================================================================ read-only views (the shells use them)
    @property
    def holds_grant(self) -> bool:
        return self.standing is Standing.GRANT_HOLDER

    @property
    def is_target(self) -> bool:
        return self.standing is Standing.RESYNC_TARGET

    @property
    def grant_epoch(self) -> int | None:
        """The epoch the witness granted us while we wait out leases or commit the log to take it over."""
        return self.takeover.granted_epoch if self.takeover is not None else None

    @property
    def takeover_persist(self) -> int | None:
        return self.takeover.persist_id if self.takeover is not None else None

    @property
    def mark_synced_outstanding(self) -> bool:
        return self.mark_synced is not None

    @property
    def log(self) -> dict[RecordId, Record]:
        return self.replication.records

    @property
    def key_pending(self) -> dict[bytes, int]:
        return self.replication.key_pending

    @property
    def pending(self) -> dict[int, Pending]:
        return self.replication.pending

    @property
    def dedup(self) -> dict[bytes, int]:
        return self.dedup_table.entries

    def snapshot(self) -> CoreStatus:
        """The public view of the core for the shells (see CoreStatus)."""
        return CoreStatus(
            site=self.config.site,
            peer=self.config.peer,
            role=self.role,
            epoch=self.epoch,
            incarnation=self.incarnation,
            generation=self.generation,
            peer_generation=self.peer_generation,
            tie_break_site=self.config.preferred,
            peer_connected=self.session_up(),
            holds_grant=self.holds_grant,
            is_target=self.is_target,
            takeover_pending=self.grant_epoch is not None,
            asked_epoch=self.asked_epoch,
            log_records=len(self.replication.records),
            dirty_keys=len(self.dirty),
            pending_writes=len(self.replication.pending),
            resync_full_position=self.resync_full_position,
            protocol_errors=self.protocol_errors,
        )

    def unresolved_keys(self) -> frozenset[bytes]:
        """Keys with a write not yet resolved here (pending, prepared or committed but not confirmed):
        the simulator's convergence check at sync points leaves them out."""
        keys = set(self.replication.key_pending)
        for record in self.replication.records.values():
            keys.update(record.keys())
        return frozenset(keys)

    def status(self) -> dict[str, object]:
        return {
            "site": self.config.site,
            "role": self.role.name,
            "epoch": self.epoch,
            "incarnation": self.incarnation,
            "connected": self.session_up(),
            "pending_writes": len(self.replication.pending),
            "log_records": len(self.replication.records),
            "dirty_keys": len(self.dirty),
            "lease_valid": self.now_ms < self.reads.lease_until_ms,
            "resync_full_position": self.resync_full_position,
            "witness_outstanding": self.witness_outstanding is not None,
            "protocol_errors": self.protocol_errors,
        }


def _int(meta: dict[str, int | bytes | str], name: str, default: int) -> int:
    value = meta.get(name, default)
    return value if isinstance(value, int) else default
