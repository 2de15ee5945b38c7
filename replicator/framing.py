"""The log-shipping frame codec (docs/wire.md): Cython, or its pure-Python twin.

Encoding: `encode_records`, `encode_hello`, `encode_cumulative`,
`encode_heartbeat`, `encode_resync_data`, `encode_resync_control`,
`encode_goodbye` and `encode_link_ack` each append one frame to a bytearray
and return its size; `stamp_link` writes the link sequence number and
acknowledgement into an encoded frame. Decoding: `FrameDecoder` (a stream,
cut anywhere) and `decode_frame` (exactly one frame). Errors from the wire
are `FramingError`s. REPLICATOR_NO_EXTENSIONS=1 forces the pure twin;
`IMPLEMENTATION` says which one is in use ("cython" or "python").
"""

from __future__ import annotations

from replicator._pure.framing import (
    CUMULATIVE_TYPES,
    DELETE_LENGTH,
    FLAG_WATERMARK,
    FRAME_SIZE_BYTES_LIMIT,
    FRAME_SIZE_BYTES_MAX_DEFAULT,
    HEADER_BYTES,
    HEARTBEAT_TYPES,
    MAGIC,
    PROTOCOL_VERSION,
    RECEIVE_BUFFER_BYTES_DEFAULT,
    SEQUENCED_TYPES,
    BadMagic,
    Body,
    ChecksumMismatch,
    Cumulative,
    Frame,
    FrameTooLarge,
    FrameType,
    FramingError,
    Goodbye,
    Heartbeat,
    Hello,
    MalformedFrame,
    RecordBatch,
    ResyncControl,
    ResyncData,
    ResyncKind,
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
encode_cumulative = _module.encode_cumulative
encode_goodbye = _module.encode_goodbye
encode_heartbeat = _module.encode_heartbeat
encode_hello = _module.encode_hello
encode_link_ack = _module.encode_link_ack
encode_records = _module.encode_records
encode_resync_control = _module.encode_resync_control
encode_resync_data = _module.encode_resync_data
stamp_link = _module.stamp_link

__all__ = [
    "CUMULATIVE_TYPES",
    "DELETE_LENGTH",
    "FLAG_WATERMARK",
    "FRAME_SIZE_BYTES_LIMIT",
    "FRAME_SIZE_BYTES_MAX_DEFAULT",
    "HEADER_BYTES",
    "HEARTBEAT_TYPES",
    "IMPLEMENTATION",
    "MAGIC",
    "PROTOCOL_VERSION",
    "RECEIVE_BUFFER_BYTES_DEFAULT",
    "SEQUENCED_TYPES",
    "BadMagic",
    "Body",
    "ChecksumMismatch",
    "Cumulative",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "FrameType",
    "FramingError",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "MalformedFrame",
    "OperationView",
    "RecordBatch",
    "RecordView",
    "ResyncControl",
    "ResyncData",
    "ResyncKind",
    "UnknownFrameType",
    "UnsupportedVersion",
    "VersionedView",
    "decode_frame",
    "encode_cumulative",
    "encode_goodbye",
    "encode_heartbeat",
    "encode_hello",
    "encode_link_ack",
    "encode_records",
    "encode_resync_control",
    "encode_resync_data",
    "stamp_link",
]
