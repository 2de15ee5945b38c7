"""Records: the unit of replication (DESIGN.md section 3).

A record is one atomic mutation: one or more operations (put key value,
delete key) with an id `(origin, incarnation, seq)`, the epoch it was written
in, a hybrid-logical-clock timestamp `ts` and the client's request id. Keys
and values are bytes. Timestamps are totally ordered integers; ties between
origins are broken inside the integer (see hlc.py), so last-writer-wins on
`ts` alone is deterministic at both sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, order=True)
class RecordId:
    """Identity of a record. Ordered by (origin, incarnation, seq)."""

    origin: str
    incarnation: int
    seq: int


@dataclass(frozen=True, slots=True)
class Operation:
    """Put `value` at `key`, or delete `key` when `value` is None."""

    key: bytes
    value: bytes | None

    @property
    def is_delete(self) -> bool:
        return self.value is None


@dataclass(frozen=True, slots=True)
class Record:
    id: RecordId
    epoch: int
    ts: int
    request_id: bytes
    operations: tuple[Operation, ...]
    # The record as the link and the log encode it (docs/wire.md: u32 body length, u32 body
    # CRC32C, body), when it came encoded (from the peer, or from the log): stored and shipped
    # as it is, never encoded again. None for a record made here. Not part of its value.
    wire: bytes | None = field(default=None, compare=False, repr=False)

    def keys(self) -> tuple[bytes, ...]:
        return tuple(operation.key for operation in self.operations)


@dataclass(frozen=True, slots=True)
class Versioned:
    """A stored version of a key: what resync ships and the visible state holds."""

    key: bytes
    ts: int
    value: bytes | None  # None is a tombstone


# Sizes as the link encodes them (docs/wire.md), rounded up, so that the core can cut what
# it sends to its byte bound where it makes a message (CoreConfig.message_bytes_max).
RECORD_OVERHEAD_BYTES = 128  # u32 length, u32 CRC, the 40-byte body header, rounded up
OPERATION_OVERHEAD_BYTES = 8  # u32 key length, u32 value length
VERSIONED_OVERHEAD_BYTES = 64  # a resync entry: u64 ts, two u32 lengths, rounded up
DEDUP_ENTRY_OVERHEAD_BYTES = 12  # u32 length, u64 ts
KEY_OVERHEAD_BYTES = 4  # u32 length of a key in a key list


def record_wire_bytes(record: Record) -> int:
    return (
        RECORD_OVERHEAD_BYTES
        + len(record.id.origin)
        + len(record.request_id)
        + sum(
            OPERATION_OVERHEAD_BYTES + len(op.key) + (len(op.value) if op.value is not None else 0)
            for op in record.operations
        )
    )


def versioned_wire_bytes(version: Versioned) -> int:
    return VERSIONED_OVERHEAD_BYTES + len(version.key) + (len(version.value) if version.value is not None else 0)
