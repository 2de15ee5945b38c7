"""The log-shipping frame codec (docs/wire.md): Cython, or its pure-Python twin.

Encoding: `encode_records`, `encode_resync_data` (the core's bulk frames),
`encode_fields` (every other core frame, its payload laid out by the schema of
replicator/daemon/wire.py), `encode_link_hello`, `encode_link_goodbye` and
`encode_link_ack` (the link's own frames) each append one frame to a bytearray
and return its size; `encode_record` appends one record alone (the form the
log stores); `stamp_link` writes the link sequence number and acknowledgement
into an encoded frame. Decoding: `FrameDecoder` (a stream, cut anywhere),
`decode_frame` (exactly one frame) and `decode_record` (exactly one record).
Errors from the wire are `FramingError`s. REPLICATOR_NO_EXTENSIONS=1 forces
the pure twin; `IMPLEMENTATION` says which one is in use ("cython" or "python").
"""

from __future__ import annotations

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
    "stamp_link",
]
