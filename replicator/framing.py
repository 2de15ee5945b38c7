"""The log-shipping frame codec (docs/wire.md): Cython, or its pure-Python twin.

Encoding: `encode_records`, `encode_resync_data` (the core's bulk frames),
`encode_fields` (every other core frame, its payload laid out by the schema of
replicator/daemon/wire.py), `encode_link_hello`, `encode_link_goodbye` and
`encode_link_ack` (the link's own frames) each append one frame to a bytearray
and return its size; `encode_record` appends one record alone (the form the
log stores); `stamp_link` writes the link sequence number and acknowledgement
into an encoded frame. Decoding: `FrameDecoder` (a stream, cut anywhere),
`decode_frame` (exactly one frame) and `decode_record` (exactly one record).
`record_to_log` / `record_from_log`: a record's form in the log (the same bytes
as in a RECORDS frame; a received record is stored as it came).
Errors from the wire are `FramingError`s. REPLICATOR_NO_EXTENSIONS=1 forces
the pure twin; `IMPLEMENTATION` says which one is in use ("cython" or "python").
"""

from __future__ import annotations

import dataclasses

from replicator._pure.framing import (
    BULK_FRAME_TYPES,
    CORE_FRAME_TYPES,
    DELETE_LENGTH,
    FLAG_RECONCILE,
    FRAME_SIZE_BYTES_LIMIT,
    FRAME_SIZE_BYTES_MAX_DEFAULT,
    HEADER_BYTES,
    LINK_FRAME_TYPES,
    MAGIC,
    PROTOCOL_VERSION,
    RECEIVE_BUFFER_BYTES_DEFAULT,
    RECORD_PREFIX_BYTES,
    SEQUENCED_TYPES,
    SHORT_BYTES_MAX,
    BadMagic,
    Body,
    ChecksumMismatch,
    Fields,
    Frame,
    FrameTooLarge,
    FrameType,
    FramingError,
    Goodbye,
    LinkHello,
    MalformedFrame,
    RecordBatch,
    ResyncData,
    UnknownFrameType,
    UnsupportedVersion,
)
from replicator._select import native_or_pure
from replicator.core.records import Record, RecordId

_module = native_or_pure("framing")

IMPLEMENTATION: str = _module.IMPLEMENTATION
FrameDecoder = _module.FrameDecoder
RecordView = _module.RecordView
OperationView = _module.OperationView
VersionedView = _module.VersionedView
decode_frame = _module.decode_frame
decode_record = _module.decode_record
encode_fields = _module.encode_fields
encode_link_ack = _module.encode_link_ack
encode_link_goodbye = _module.encode_link_goodbye
encode_link_hello = _module.encode_link_hello
encode_record = _module.encode_record
encode_records = _module.encode_records
encode_resync_data = _module.encode_resync_data
stamp_link = _module.stamp_link


def record_to_log(record: Record) -> bytes:
    """What the log stores for a record: the record as a RECORDS frame carries it (u32 body length,
    u32 body CRC32C, body). A record that came encoded (from the peer, or from the log) is stored
    as it came; only a record made here is encoded."""
    if record.wire is not None:
        return record.wire
    out = bytearray()
    encode_record(out, record)
    return bytes(out)


def record_from_log(raw: bytes, record_id: RecordId | None = None) -> Record:
    """A record the log stored (its CRC checked again); `record_id` is the log key it was under,
    which it must name (a record stored under another key is refused: MalformedFrame)."""
    record: Record = dataclasses.replace(decode_record(raw).materialise(), wire=bytes(raw))
    if record_id is not None and record.id != record_id:
        raise MalformedFrame(f"the log entry {record_id} holds record {record.id}")
    return record

__all__ = [
    "BULK_FRAME_TYPES",
    "CORE_FRAME_TYPES",
    "DELETE_LENGTH",
    "FLAG_RECONCILE",
    "FRAME_SIZE_BYTES_LIMIT",
    "FRAME_SIZE_BYTES_MAX_DEFAULT",
    "HEADER_BYTES",
    "IMPLEMENTATION",
    "LINK_FRAME_TYPES",
    "MAGIC",
    "PROTOCOL_VERSION",
    "RECEIVE_BUFFER_BYTES_DEFAULT",
    "RECORD_PREFIX_BYTES",
    "SEQUENCED_TYPES",
    "SHORT_BYTES_MAX",
    "BadMagic",
    "Body",
    "ChecksumMismatch",
    "Fields",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "FrameType",
    "FramingError",
    "Goodbye",
    "LinkHello",
    "MalformedFrame",
    "OperationView",
    "RecordBatch",
    "RecordView",
    "ResyncData",
    "UnknownFrameType",
    "UnsupportedVersion",
    "VersionedView",
    "decode_frame",
    "decode_record",
    "encode_fields",
    "encode_link_ack",
    "encode_link_goodbye",
    "encode_link_hello",
    "encode_record",
    "encode_records",
    "encode_resync_data",
    "record_from_log",
    "record_to_log",
    "stamp_link",
]
