"""A batch: everything one persist step asks for, written atomically.

A batch only records operations; values are encoded and checksummed here, as
they are added, so the work is done by whoever builds the batch. Conditional
operations (last-writer-wins `apply`, and the dedup table whose age index
needs the previous entry) are resolved when the store writes the batch, under
the store's write lock, against everything written before (synced or not) and
the earlier operations of the same batch.
"""

from __future__ import annotations

from typing import Any

from replicator.core.records import RecordId
from replicator.storage import _format as fmt

# Operation kinds. A MUTATION is (MUTATION, column family, key, stored bytes or None).
MUTATION = 0
APPLY = 1  # (APPLY, key, ts, stored bytes)
PUT_DEDUP = 2  # (PUT_DEDUP, request id, time_ms, stored bytes)
DELETE_DEDUP = 3  # (DELETE_DEDUP, request id)

# (kind, ...): see the kinds above.
Operation = tuple[Any, ...]


class Batch:
    """Operations to persist in one atomic write. A batch is written at most once."""

    __slots__ = ("operations", "written")

    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self.written = False

    def __len__(self) -> int:
        return len(self.operations)

    # The replication log.

    def put_record(self, record_id: RecordId, encoded: bytes) -> None:
        """`encoded` carries its own length and CRC32C (storage/_format.py, "log"): stored as it is,
        not checksummed again (a record received from the peer is stored as it came)."""
        if not fmt.log_value_shaped(encoded):
            raise ValueError("put_record takes a record in the log's form (u32 length, u32 CRC32C, body: framing.record_to_log)")
        self.operations.append((MUTATION, fmt.LOG, fmt.record_key(record_id), bytes(encoded)))

    def delete_record(self, record_id: RecordId) -> None:
        self.operations.append((MUTATION, fmt.LOG, fmt.record_key(record_id), None))

    # The visible state.

    def apply(self, key: bytes, ts: int, value: bytes | None) -> None:
        """Last-writer-wins: takes effect only if `ts` > the stored ts of `key` (a None value is a tombstone)."""
        key = bytes(key)
        stored = fmt.encode_value(key, ts, None if value is None else bytes(value))
        self.operations.append((APPLY, key, ts, stored))

    def erase(self, key: bytes) -> None:
        """Remove `key` from the visible state outright (no tombstone): a full resync's target
        clears its data this way. Do not mix with `apply` of the same key in one batch."""
        self.operations.append((MUTATION, fmt.DATA, bytes(key), None))

    # Site metadata, dirty set, resync position.

    def put_meta(self, name: str, value: bytes) -> None:
        key = fmt.meta_key(name)
        self.operations.append((MUTATION, fmt.META, key, fmt.frame(key, bytes(value))))

    def delete_meta(self, name: str) -> None:
        self.operations.append((MUTATION, fmt.META, fmt.meta_key(name), None))

    def add_dirty(self, key: bytes) -> None:
        self.operations.append((MUTATION, fmt.DIRTY, bytes(key), b""))

    def discard_dirty(self, key: bytes) -> None:
        self.operations.append((MUTATION, fmt.DIRTY, bytes(key), None))

    def set_resync_position(self, key: bytes | None) -> None:
        position_key = fmt.RESYNC_POSITION_KEY
        stored = None if key is None else fmt.frame(position_key, bytes(key))
        self.operations.append((MUTATION, fmt.META, position_key, stored))

    # The dedup table.

    def put_dedup(self, request_id: bytes, outcome: bytes, time_ms: int) -> None:
        request_id = bytes(request_id)
        stored = fmt.encode_dedup(request_id, bytes(outcome), time_ms)
        self.operations.append((PUT_DEDUP, request_id, time_ms, stored))

    def delete_dedup(self, request_id: bytes) -> None:
        self.operations.append((DELETE_DEDUP, bytes(request_id)))
