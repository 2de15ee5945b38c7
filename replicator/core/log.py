"""The replication log of one site: records not yet resolved at both sites, and who waits on them.

- `records`: every record in the durable log (own and the peer's), by id.
- `pending`: own writes of this incarnation not yet committed, by seq; an `alone`
  one (SOLO) is not in the log, it commits once durable.
- `pending_by_request`: request id -> seq of its pending write (a retry joins it).
- `peer_records`: the peer's records prepared here in this session, by (incarnation, seq).
- `committed_unconfirmed`: own records committed that the peer has not applied yet;
  they stay in `records` until its CommitConfirm.
- `waiters`: request id -> client handles waiting for a record of that request id
  that is in the log (a retry at the other site, say).
- `key_pending`: key -> how many unresolved records write it; a read of such a key waits.
- `by_request`: request id -> the ids of the log's records with that request id (an index of
  `records`, so that a write's check for a logged retry costs O(1), not a pass over the log).

Invariant (checked by `check` at the phase boundaries, and pairwise at every change): `key_pending` counts
exactly the keys of the unresolved records, which are the log's records not
committed here plus the alone writes in flight; every pending non-alone write is
in the log; `pending_by_request` points at pending writes only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from replicator.core.errors import InvariantViolation, invariant
from replicator.core.records import Record, RecordId


@dataclass(slots=True)
class Pending:
    """An own write not yet committed."""

    record: Record
    handles: list[int]
    persist_id: int
    alone: bool  # SOLO write: commits when durable, no peer involved


class ReplicationLog:
    def __init__(self, site: str, waiters_max: int) -> None:
        self.site = site
        self.records: dict[RecordId, Record] = {}
        self.key_pending: dict[bytes, int] = {}
        self.pending: dict[int, Pending] = {}
        self.pending_by_request: dict[bytes, int] = {}
        self.committed_unconfirmed: dict[int, Record] = {}
        self.peer_records: dict[tuple[int, int], Record] = {}
        self.waiters: dict[bytes, list[int]] = {}
        self.waiters_max = waiters_max
        self.waiting = 0
        self.unresolved: set[RecordId] = set()  # the records whose keys key_pending counts
        self.by_request: dict[bytes, set[RecordId]] = {}  # an index of `records`

    # ------------------------------------------------------------ keys
    def _block(self, record: Record) -> None:
        if not (record.id not in self.unresolved):
            raise InvariantViolation(f"record {record.id} blocks its keys twice")
        self.unresolved.add(record.id)
        for key in record.keys():
            self.key_pending[key] = self.key_pending.get(key, 0) + 1

    def resolve(self, record: Record) -> None:
        """The record is committed here: it no longer blocks reads (it may stay in the log)."""
        if record.id not in self.unresolved:
            raise InvariantViolation(f"record {record.id} resolved but not unresolved")
        self.unresolved.discard(record.id)
        for key in record.keys():
            count = self.key_pending.get(key, 0) - 1
            if not (count >= 0):
                raise InvariantViolation(f"key {key!r} resolved more often than it was blocked")
            if count > 0:
                self.key_pending[key] = count
            else:
                del self.key_pending[key]

    def blocked(self, key: bytes) -> bool:
        return self.key_pending.get(key, 0) > 0

    # ------------------------------------------------------------ records
    def add(self, record: Record) -> None:
        if not (record.id not in self.records):
            raise InvariantViolation(f"record {record.id} logged twice")
        self.records[record.id] = record
        self.by_request.setdefault(record.request_id, set()).add(record.id)
        self._block(record)

    def _forget(self, record: Record) -> bool:
        """Take `record` out of `records` and its index; False when it was not there."""
        if self.records.pop(record.id, None) is None:
            return False
        ids = self.by_request[record.request_id]
        ids.discard(record.id)
        if not ids:
            del self.by_request[record.request_id]
        return True

    def remove(self, record: Record) -> None:
        if self._forget(record):
            self.resolve(record)

    def confirmed(self, record: Record) -> None:
        """An own record committed here and applied at the peer: out of the log (already resolved)."""
        self._forget(record)

    def sorted_records(self) -> list[Record]:
        return sorted(self.records.values(), key=lambda record: record.id)

    def request_logged(self, request_id: bytes) -> bool:
        """A record with this request id waits in the log (own committed ones are in the dedup table)."""
        return any(
            record_id.seq not in self.committed_unconfirmed or record_id.origin != self.site
            for record_id in self.by_request.get(request_id, ())
        )

    # ------------------------------------------------------------ own writes
    def add_pending(self, record: Record, handle: int, persist_id: int, *, alone: bool) -> None:
        self.pending[record.id.seq] = Pending(record, [handle], persist_id, alone)
        self.pending_by_request[record.request_id] = record.id.seq
        if alone:
            self._block(record)

    def pop_pending(self, seq: int) -> Pending | None:
        pending = self.pending.pop(seq, None)
        if pending is not None and self.pending_by_request.get(pending.record.request_id) == seq:
            del self.pending_by_request[pending.record.request_id]
        return pending

    def join_pending(self, request_id: bytes, handle: int) -> bool:
        """A retry of a write in flight waits for the same outcome."""
        seq = self.pending_by_request.get(request_id)
        if seq is None or seq not in self.pending:
            return False
        self.pending[seq].handles.append(handle)
        return True

    def wait_for_logged(self, request_id: bytes, handle: int) -> bool:
        """Park a retry of a request whose record is in the log; False when too many wait."""
        if self.waiting >= self.waiters_max:
            return False
        self.waiters.setdefault(request_id, []).append(handle)
        self.waiting += 1
        return True

    def pop_waiters(self, request_id: bytes) -> list[int]:
        handles = self.waiters.pop(request_id, [])
        self.waiting -= len(handles)
        return handles

    # ------------------------------------------------------------ wholesale
    def clear_resolved(self) -> None:
        """Every record of the log was resolved (whole-log commit): only alone writes still block."""
        self.records.clear()
        self.by_request.clear()
        self.key_pending.clear()
        self.unresolved.clear()
        for pending in self.pending.values():  # SOLO writes in flight keep their keys blocked
            if pending.alone:
                self._block(pending.record)
        self.peer_records.clear()
        self.committed_unconfirmed.clear()
        self.check()

    def drop_all(self) -> None:
        """A resync target drops its log and every write in flight (their outcome: unknown)."""
        self.pending.clear()
        self.pending_by_request.clear()
        self.records.clear()
        self.by_request.clear()
        self.key_pending.clear()
        self.unresolved.clear()
        self.peer_records.clear()
        self.committed_unconfirmed.clear()
        self.check()

    def check(self) -> None:
        """The invariants of the module docstring, in full: a pass over the log, so it runs at the
        phase boundaries that rebuild the log (a whole-log commit, a resync target's drop); the
        paired checks in `_block`/`resolve` (each record blocks its keys once and resolves once,
        against the set of unresolved ids) run at every change, at O(1)."""
        unresolved: Counter[bytes] = Counter()
        ids: set[RecordId] = set()
        for record in self.records.values():
            committed = self.committed_unconfirmed.get(record.id.seq) if record.id.origin == self.site else None
            if committed is None or committed.id != record.id:
                unresolved.update(record.keys())
                ids.add(record.id)
        for seq, pending in self.pending.items():
            if pending.alone:
                unresolved.update(pending.record.keys())
                ids.add(pending.record.id)
            else:
                if pending.record.id not in self.records:
                    raise InvariantViolation(f"pending write {seq} is not in the log")
        invariant(unresolved == Counter(self.key_pending), "key_pending differs from the keys of unresolved records")
        invariant(ids == self.unresolved, "the unresolved ids differ from the log's unresolved records")
        indexed = {record_id for record_ids in self.by_request.values() for record_id in record_ids}
        invariant(indexed == set(self.records) and all(
            self.records[record_id].request_id == request_id
            for request_id, record_ids in self.by_request.items() for record_id in record_ids
        ), "the request-id index differs from the log's records")
        for request_id, seq in self.pending_by_request.items():
            if seq not in self.pending:
                raise InvariantViolation(f"request {request_id!r} points at seq {seq}, not pending")
        invariant(self.waiting == sum(map(len, self.waiters.values())), "log waiters miscounted")
