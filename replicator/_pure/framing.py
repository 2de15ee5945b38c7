"""Log-shipping frame codec in pure Python: the twin of native/framing.pyx.

The wire format is specified in docs/wire.md; this module is its executable
reference. Both implementations share the definitions at the top of this file
(error classes, frame types, decoded frame bodies), so that they raise the
same exceptions and return the same frame objects; only the record and
version views (`RecordView`, `OperationView`, `VersionedView`) are per
implementation, with the same attributes.

Encoding appends one frame to a caller's bytearray. Decoding hands out
memoryviews into the receive buffer (`FrameDecoder`), never copies of keys
and values; a consumer that keeps a record beyond the current callback calls
`materialise()` to get a `replicator.core.records.Record` of bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from replicator.checksum import crc32c
from replicator.core.records import Operation, Record, RecordId, Versioned

IMPLEMENTATION = "python"

# ---------------------------------------------------------------------------
# Shared definitions (the native module imports these).
# ---------------------------------------------------------------------------

MAGIC = b"RPLF"
# The link protocol version, in every frame's header and checked on every frame, so a peer of
# another version is refused at its first frame, the HELLO (docs/upgrades.md). Version 2 (issue 14):
# the link's frames in a code space of their own, one frame type per core message.
PROTOCOL_VERSION = 2
HEADER_BYTES = 48
FRAME_SIZE_BYTES_MAX_DEFAULT = 16 * 1024 * 1024
# The payload length is a u32; a frame is never larger than this, whatever is configured.
FRAME_SIZE_BYTES_LIMIT = HEADER_BYTES + 0xFFFFFFFF
RECEIVE_BUFFER_BYTES_DEFAULT = 1024 * 1024
# Below this much free tail the decoder moves to a fresh receive buffer rather than read a few bytes.
READ_BYTES_MIN = 16 * 1024

FLAG_RECONCILE = 0x0001  # RECORDS: shipped by a same-epoch reconcile (acknowledged by RECONCILE_ACK)
DELETE_LENGTH = 0xFFFFFFFF  # a value length meaning "delete" / "tombstone"
RECORD_PREFIX_BYTES = 8  # u32 body length, u32 body CRC32C
RECORD_FIXED_BYTES = 40  # fixed part of a record body
NAME_BYTES_MAX = 255  # pair id, site and origin names (utf-8)
SHORT_BYTES_MAX = 0xFFFF  # request ids, hello extras, goodbye messages
U64_MAX = 0xFFFFFFFFFFFFFFFF


class FrameType(IntEnum):
    """Two code spaces: the link's own frames (0x01-0x0F), which never reach the core, and the
    core's, one per core message (0x10-0x1F; their layout: replicator/daemon/wire.py, SCHEMA)."""

    LINK_HELLO = 0x01
    LINK_ACK = 0x02
    LINK_GOODBYE = 0x03
    HELLO = 0x10
    RECORDS = 0x11
    PREPARED_ACK = 0x12
    COMMIT_WATERMARK = 0x13
    COMMIT_CONFIRM = 0x14
    HEARTBEAT = 0x15
    HEARTBEAT_ACK = 0x16
    RECONCILE_DONE = 0x17
    RECONCILE_ACK = 0x18
    RESYNC_BEGIN = 0x19
    RESYNC_BEGIN_ACK = 0x1A
    RESYNC_DEDUP = 0x1B
    RESYNC_DATA = 0x1C
    RESYNC_ACK = 0x1D
    RESYNC_SYNCED = 0x1E
    GOODBYE = 0x1F


LINK_FRAME_TYPES = frozenset({FrameType.LINK_HELLO, FrameType.LINK_ACK, FrameType.LINK_GOODBYE})
CORE_FRAME_TYPES = frozenset(set(FrameType) - LINK_FRAME_TYPES)
# Core frames whose payload the codec parses itself (records, resync entries: views, twins in C);
# every other core frame's payload is laid out by the schema and handed over as `Fields`.
BULK_FRAME_TYPES = frozenset({FrameType.RECORDS, FrameType.RESYNC_DATA})
# Frame types the link numbers and acknowledges (its window of bytes in flight): the core's,
# but the heartbeats, which are meaningless once late (a lease is about now), and GOODBYE, which
# goes out at once (it ends the session: it must not wait behind a full window).
SEQUENCED_TYPES = frozenset(CORE_FRAME_TYPES - {FrameType.HEARTBEAT, FrameType.HEARTBEAT_ACK, FrameType.GOODBYE})
_FRAME_TYPE_VALUES = frozenset(int(frame_type) for frame_type in FrameType)


class FramingError(Exception):
    """The peer sent bytes that are not a valid frame (a remote error).

    The stream cannot be trusted past this point: drop the connection.
    Nothing from the bad frame has been returned.
    """


class BadMagic(FramingError):
    pass


class UnsupportedVersion(FramingError):
    pass


class UnknownFrameType(FramingError):
    pass


class FrameTooLarge(FramingError):
    pass


class ChecksumMismatch(FramingError):
    pass


class MalformedFrame(FramingError):
    """A length, count, reserved field or encoding inside the frame is wrong."""


@dataclass(frozen=True, slots=True)
class LinkHello:
    """The link's handshake: who is at the other end (the core's Hello follows, as a core frame)."""

    pair_id: str
    site: str
    incarnation: int
    extras: bytes  # the core's, for the link's user (the site's witness id)


@dataclass(frozen=True, slots=True)
class RecordBatch:
    records: tuple[Any, ...]  # RecordView of the implementation that decoded it
    reconcile: bool  # FLAG_RECONCILE


@dataclass(frozen=True, slots=True)
class ResyncData:
    batch_seq: int
    entries: tuple[Any, ...]  # VersionedView


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The link's GOODBYE (its own reason codes); the core's Goodbye is a core frame."""

    reason: int
    message: str


@dataclass(frozen=True, slots=True)
class Fields:
    """The payload of a core frame laid out by the schema (replicator/daemon/wire.py), CRC-checked."""

    payload: bytes


Body = LinkHello | RecordBatch | ResyncData | Goodbye | Fields | None


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    epoch: int  # the sender's epoch
    link_seq: int  # 0 for frames the link does not sequence
    link_ack: int  # cumulative: the sender received the receiver's frames up to this link seq
    size_bytes: int  # on the wire, header included
    body: Body


# ---------------------------------------------------------------------------
# Pure-Python implementation.
# ---------------------------------------------------------------------------

_HEADER = struct.Struct("<4sBBHII QQQ I")  # everything but the header CRC (44 bytes)
_HEADER_CRC = struct.Struct("<I")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RECORD_PREFIX = struct.Struct("<II")  # body length, body CRC
_RECORD_FIXED = struct.Struct("<QQQQIHBB")
_OPERATION = struct.Struct("<II")
_LINK_HELLO_FIXED = struct.Struct("<QBBH")
_RESYNC_DATA_FIXED = struct.Struct("<QI")
_RESYNC_ENTRY = struct.Struct("<QII")
_GOODBYE_FIXED = struct.Struct("<BBH")
assert _HEADER.size + _HEADER_CRC.size == HEADER_BYTES
assert _RECORD_FIXED.size == RECORD_FIXED_BYTES


class OperationView:
    """One operation of a decoded record: views into the receive buffer."""

    __slots__ = ("key", "value")

    def __init__(self, key: memoryview, value: memoryview | None) -> None:
        self.key = key
        self.value = value

    @property
    def is_delete(self) -> bool:
        return self.value is None

    def materialise(self) -> Operation:
        return Operation(bytes(self.key), None if self.value is None else bytes(self.value))

    def __repr__(self) -> str:
        return f"OperationView(key={bytes(self.key)!r}, value_bytes={None if self.value is None else len(self.value)})"


class RecordView:
    """A decoded record. `raw` is the record body as sent and `crc` its CRC32C."""

    __slots__ = ("origin", "incarnation", "seq", "epoch", "ts", "request_id", "operations", "crc", "raw", "encoded")

    def __init__(
        self,
        origin: str,
        incarnation: int,
        seq: int,
        epoch: int,
        ts: int,
        request_id: memoryview,
        operations: tuple[OperationView, ...],
        crc: int,
        raw: memoryview,
        encoded: memoryview,
    ) -> None:
        self.origin = origin
        self.incarnation = incarnation
        self.seq = seq
        self.epoch = epoch
        self.ts = ts
        self.request_id = request_id
        self.operations = operations
        self.crc = crc
        self.raw = raw
        self.encoded = encoded  # the record as it came: prefix (u32 body length, u32 body CRC32C) and body

    @property
    def id(self) -> RecordId:
        return RecordId(self.origin, self.incarnation, self.seq)

    def materialise(self, keep_encoded: bool = False) -> Record:
        """A `Record` holding bytes copies: safe to keep after the receive buffer is gone. With
        `keep_encoded`, it carries its encoded form (`Record.wire`), which the log stores as it is."""
        return Record(
            RecordId(self.origin, self.incarnation, self.seq),
            self.epoch,
            self.ts,
            bytes(self.request_id),
            tuple(operation.materialise() for operation in self.operations),
            bytes(self.encoded) if keep_encoded else None,
        )

    def __repr__(self) -> str:
        return f"RecordView({self.origin!r}, {self.incarnation}, {self.seq}, operations={len(self.operations)})"


class VersionedView:
    """A decoded resync entry: key and value are views into the receive buffer."""

    __slots__ = ("key", "ts", "value")

    def __init__(self, key: memoryview, ts: int, value: memoryview | None) -> None:
        self.key = key
        self.ts = ts
        self.value = value

    def materialise(self) -> Versioned:
        return Versioned(bytes(self.key), self.ts, None if self.value is None else bytes(self.value))

    def __repr__(self) -> str:
        return f"VersionedView(key={bytes(self.key)!r}, ts={self.ts})"


# --- encoding ---------------------------------------------------------------


def _u64(value: int, name: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value > U64_MAX:
        raise ValueError(f"{name} must be in 0..2**64-1, got {value}")
    return value


def _small(value: int, name: str, maximum: int) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value > maximum:
        raise ValueError(f"{name} must be in 0..{maximum}, got {value}")
    return value


def _name(value: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    encoded = value.encode("utf-8")
    if len(encoded) > NAME_BYTES_MAX:
        raise ValueError(f"{name} must be at most {NAME_BYTES_MAX} utf-8 bytes, got {len(encoded)}")
    return encoded


def _blob(value: Any, name: str, maximum: int) -> memoryview:
    view = memoryview(value)
    if not view.c_contiguous:
        raise BufferError(f"{name} must be a contiguous buffer")
    view = view.cast("B")
    if len(view) > maximum:
        raise ValueError(f"{name} must be at most {maximum} bytes, got {len(view)}")
    return view


def _begin(out: bytearray) -> int:
    if not isinstance(out, bytearray):
        raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
    start = len(out)
    out += bytes(HEADER_BYTES)
    return start


def _finish(out: bytearray, start: int, frame_type: int, flags: int, epoch: int, payload_crc: int | None = None) -> int:
    """Fill in the header of the frame that begins at `start` and return its size.

    RECORDS frames pass their payload CRC (the chain of docs/wire.md); the
    others have it computed here over the whole payload.
    """
    size = len(out) - start
    payload_bytes = size - HEADER_BYTES
    if payload_bytes > 0xFFFFFFFF:
        del out[start:]
        raise ValueError(f"frame payload of {payload_bytes} bytes exceeds the u32 length field")
    if payload_crc is None:
        with memoryview(out) as view:
            payload_crc = crc32c(view[start + HEADER_BYTES : start + size])
    _HEADER.pack_into(
        out, start, MAGIC, PROTOCOL_VERSION, frame_type, flags, payload_bytes, payload_crc, epoch, 0, 0, 0
    )
    _stamp_crc(out, start)
    return size


def _stamp_crc(out: bytearray, start: int) -> None:
    with memoryview(out) as view:
        header_crc = crc32c(view[start : start + HEADER_BYTES - 4])
    _HEADER_CRC.pack_into(out, start + HEADER_BYTES - 4, header_crc)


def stamp_link(frame: bytearray, offset: int, link_seq: int, link_ack: int) -> None:
    """Write the link sequence number and acknowledgement into an encoded frame.

    The link calls this just before a frame goes on the wire; only the header
    CRC is recomputed (the payload CRC does not cover the header).
    """
    _u64(link_seq, "link_seq")
    _u64(link_ack, "link_ack")
    if offset < 0 or offset + HEADER_BYTES > len(frame) or frame[offset : offset + 4] != MAGIC:
        raise ValueError(f"no frame header at offset {offset}")
    struct.pack_into("<QQ", frame, offset + 24, link_seq, link_ack)
    _stamp_crc(frame, offset)


def encode_link_hello(out: bytearray, epoch: int, pair_id: str, site: str, incarnation: int, extras: Any = b"") -> int:
    """The link's handshake frame: who sends (pair, site, incarnation) and the core's extras."""
    _u64(epoch, "epoch")
    pair = _name(pair_id, "pair_id")
    site_bytes = _name(site, "site")
    extras_view = _blob(extras, "extras", SHORT_BYTES_MAX)
    fixed = _LINK_HELLO_FIXED.pack(_u64(incarnation, "incarnation"), len(pair), len(site_bytes), len(extras_view))
    start = _begin(out)
    out += fixed
    out += pair
    out += site_bytes
    out += extras_view
    return _finish(out, start, FrameType.LINK_HELLO, 0, epoch)


def encode_records(out: bytearray, epoch: int, records: Iterable[Any], reconcile: bool = False) -> int:
    """Append one RECORDS frame. `records` are `Record`s (or `RecordView`s); `reconcile` marks a
    same-epoch reconcile's shipment (FLAG_RECONCILE)."""
    _u64(epoch, "epoch")
    start = _begin(out)
    try:
        count_at = len(out)
        out += bytes(4)
        prefixes = []
        for record in records:
            prefixes.append(len(out))
            _encode_record(out, record)
        if len(prefixes) > 0xFFFFFFFF:
            raise ValueError("too many records in one frame")
        _U32.pack_into(out, count_at, len(prefixes))
        # Each record body is covered by its own CRC; the payload CRC chains the rest (docs/wire.md).
        with memoryview(out) as view:
            payload_crc = crc32c(view[start + HEADER_BYTES : count_at + 4])
            for prefix_at in prefixes:
                payload_crc = crc32c(view[prefix_at : prefix_at + _RECORD_PREFIX.size], payload_crc)
        return _finish(out, start, FrameType.RECORDS, FLAG_RECONCILE if reconcile else 0, epoch, payload_crc)
    except BaseException:
        del out[start:]
        raise


def encode_record(out: bytearray, record: Any) -> int:
    """Append one record alone (u32 body length, u32 body CRC32C, body): the form a RECORDS frame
    carries it in and the log stores it in. Returns its size."""
    if not isinstance(out, bytearray):
        raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
    start = len(out)
    try:
        _encode_record(out, record)
    except BaseException:
        del out[start:]
        raise
    return len(out) - start


def _encode_record(out: bytearray, record: Any) -> None:
    wire = getattr(record, "wire", None)
    if wire is not None:
        # Encoded already (received from the peer, or read from the log): copied as it is, not re-encoded,
        # once its fixed fields are seen to be the record's (a record changed but not its wire is refused).
        view = _blob(wire, "wire", 0xFFFFFFFF)
        fixed = (record.id.incarnation, record.id.seq, record.epoch, record.ts)
        if len(view) < _RECORD_PREFIX.size + RECORD_FIXED_BYTES or struct.unpack_from("<QQQQ", view, 8) != fixed:
            raise ValueError(f"record {record.id} carries the encoding of another record")
        out += view
        return
    record_id = record.id
    origin = _name(record_id.origin, "origin")
    request_id = _blob(record.request_id, "request_id", SHORT_BYTES_MAX)
    operations = record.operations
    prefix_at = len(out)
    out += bytes(_RECORD_PREFIX.size)
    body_at = len(out)
    out += _RECORD_FIXED.pack(
        _u64(record_id.incarnation, "incarnation"),
        _u64(record_id.seq, "seq"),
        _u64(record.epoch, "epoch"),
        _u64(record.ts, "ts"),
        _small(len(operations), "operation count", 0xFFFFFFFF),
        len(request_id),
        len(origin),
        0,
    )
    out += origin
    out += request_id
    for operation in operations:
        key = _blob(operation.key, "key", DELETE_LENGTH - 1)
        if operation.value is None:
            out += _OPERATION.pack(len(key), DELETE_LENGTH)
            out += key
        else:
            value = _blob(operation.value, "value", DELETE_LENGTH - 1)
            out += _OPERATION.pack(len(key), len(value))
            out += key
            out += value
    body_bytes = len(out) - body_at
    if body_bytes > 0xFFFFFFFF:
        raise ValueError(f"record of {body_bytes} bytes exceeds the u32 length field")
    with memoryview(out) as view:
        body_crc = crc32c(view[body_at:])
    _RECORD_PREFIX.pack_into(out, prefix_at, body_bytes, body_crc)


def encode_resync_data(out: bytearray, epoch: int, batch_seq: int, entries: Iterable[Any]) -> int:
    """Append one RESYNC_DATA frame. `entries` are `Versioned` (or `VersionedView`)."""
    _u64(epoch, "epoch")
    start = _begin(out)
    try:
        out += _RESYNC_DATA_FIXED.pack(_u64(batch_seq, "batch_seq"), 0)
        count = 0
        for entry in entries:
            key = _blob(entry.key, "key", DELETE_LENGTH - 1)
            ts = _u64(entry.ts, "ts")
            if entry.value is None:
                out += _RESYNC_ENTRY.pack(ts, len(key), DELETE_LENGTH)
                out += key
            else:
                value = _blob(entry.value, "value", DELETE_LENGTH - 1)
                out += _RESYNC_ENTRY.pack(ts, len(key), len(value))
                out += key
                out += value
            count += 1
        if count > 0xFFFFFFFF:
            raise ValueError("too many entries in one frame")
        _U32.pack_into(out, start + HEADER_BYTES + 8, count)
        return _finish(out, start, FrameType.RESYNC_DATA, 0, epoch)
    except BaseException:
        del out[start:]
        raise


def encode_fields(out: bytearray, frame_type: int, epoch: int, payload: Any) -> int:
    """Append one frame of a core message whose payload the schema laid out (daemon/wire.py)."""
    _u64(epoch, "epoch")
    if frame_type not in CORE_FRAME_TYPES or frame_type in BULK_FRAME_TYPES:
        raise ValueError(f"frame type {frame_type!r} is not a schema frame type")
    payload_view = _blob(payload, "payload", 0xFFFFFFFF)
    start = _begin(out)
    out += payload_view
    return _finish(out, start, frame_type, 0, epoch)


def encode_link_goodbye(out: bytearray, epoch: int, reason: int, message: str = "") -> int:
    """The link's own GOODBYE (its reason codes: replicator/transport/link.py)."""
    _u64(epoch, "epoch")
    if not isinstance(message, str):
        raise TypeError(f"message must be a str, not {type(message).__name__}")
    message_bytes = message.encode("utf-8")
    if len(message_bytes) > SHORT_BYTES_MAX:
        raise ValueError(f"message must be at most {SHORT_BYTES_MAX} utf-8 bytes")
    fixed = _GOODBYE_FIXED.pack(_small(reason, "reason", 255), 0, len(message_bytes))
    start = _begin(out)
    out += fixed
    out += message_bytes
    return _finish(out, start, FrameType.LINK_GOODBYE, 0, epoch)


def encode_link_ack(out: bytearray, epoch: int) -> int:
    """An empty frame whose header carries the link acknowledgement (and keeps the connection alive)."""
    _u64(epoch, "epoch")
    start = _begin(out)
    return _finish(out, start, FrameType.LINK_ACK, 0, epoch)


# --- decoding ---------------------------------------------------------------


def _check_frame_size_max(frame_size_bytes_max: int) -> int:
    if not isinstance(frame_size_bytes_max, int):
        raise TypeError("frame_size_bytes_max must be an int")
    if frame_size_bytes_max < HEADER_BYTES or frame_size_bytes_max > FRAME_SIZE_BYTES_LIMIT:
        raise ValueError(f"frame_size_bytes_max must be in {HEADER_BYTES}..{FRAME_SIZE_BYTES_LIMIT}")
    return frame_size_bytes_max


def _parse_header(view: memoryview, offset: int, frame_size_bytes_max: int) -> tuple[int, int, int, int, int, int, int]:
    """Check the header at `offset` (HEADER_BYTES available) and return its fields.

    Returns (total size, type, flags, payload CRC, epoch, link seq, link ack).
    """
    magic, version, frame_type, flags, payload_bytes, payload_crc, epoch, link_seq, link_ack, reserved = (
        _HEADER.unpack_from(view, offset)
    )
    if magic != MAGIC:
        raise BadMagic(f"bad magic {bytes(magic)!r}")
    (header_crc,) = _HEADER_CRC.unpack_from(view, offset + HEADER_BYTES - 4)
    if crc32c(view[offset : offset + HEADER_BYTES - 4]) != header_crc:
        raise ChecksumMismatch("header CRC mismatch")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version}, this end speaks {PROTOCOL_VERSION}")
    if frame_type not in _FRAME_TYPE_VALUES:
        raise UnknownFrameType(f"unknown frame type {frame_type}")
    total = HEADER_BYTES + payload_bytes
    if total > frame_size_bytes_max:
        raise FrameTooLarge(f"frame of {total} bytes exceeds the maximum of {frame_size_bytes_max}")
    if reserved != 0:
        raise MalformedFrame("reserved header field is not zero")
    allowed_flags = FLAG_RECONCILE if frame_type == FrameType.RECORDS else 0
    if flags & ~allowed_flags:
        raise MalformedFrame(f"flags {flags:#x} not valid for frame type {frame_type}")
    return total, frame_type, flags, payload_crc, epoch, link_seq, link_ack


def _utf8(view: memoryview, what: str) -> str:
    try:
        return str(view, "utf-8")
    except UnicodeDecodeError as error:
        raise MalformedFrame(f"{what} is not valid utf-8") from error


class _Reader:
    """Bounds-checked reads from a payload; every overrun is a MalformedFrame."""

    __slots__ = ("view", "position", "end")

    def __init__(self, view: memoryview, position: int, end: int) -> None:
        self.view = view
        self.position = position
        self.end = end

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        if self.end - self.position < layout.size:
            raise MalformedFrame("length runs past the end of the frame")
        values = layout.unpack_from(self.view, self.position)
        self.position += layout.size
        return values

    def take(self, length: int) -> memoryview:
        if self.end - self.position < length:
            raise MalformedFrame("length runs past the end of the frame")
        piece = self.view[self.position : self.position + length]
        self.position += length
        return piece

    def finish(self) -> None:
        if self.position != self.end:
            raise MalformedFrame(f"{self.end - self.position} unexpected bytes at the end")


def _record_at(reader: _Reader, origin_cache: list[Any]) -> RecordView:
    """The record whose prefix (u32 body length, u32 body CRC) is at the reader's position."""
    prefix_at = reader.position
    body_bytes, body_crc = reader.unpack(_RECORD_PREFIX)
    if body_bytes < RECORD_FIXED_BYTES:
        raise MalformedFrame(f"record body of {body_bytes} bytes is shorter than its fixed part")
    body = reader.take(body_bytes)
    if crc32c(body) != body_crc:
        raise ChecksumMismatch("record CRC mismatch")
    inner = _Reader(body, 0, body_bytes)
    incarnation, seq, epoch, ts, operation_count, request_id_bytes, origin_bytes, reserved = inner.unpack(_RECORD_FIXED)
    if reserved != 0:
        raise MalformedFrame("reserved record field is not zero")
    origin_view = inner.take(origin_bytes)
    if origin_view == origin_cache[0]:
        origin = origin_cache[1]
    else:
        origin = _utf8(origin_view, "origin")
        origin_cache[:] = [bytes(origin_view), origin]
    request_id = inner.take(request_id_bytes)
    operations = []
    for _ in range(operation_count):
        key_bytes, value_bytes = inner.unpack(_OPERATION)
        key = inner.take(key_bytes)
        value = None if value_bytes == DELETE_LENGTH else inner.take(value_bytes)
        operations.append(OperationView(key, value))
    inner.finish()
    encoded = reader.view[prefix_at : reader.position]
    return RecordView(origin, incarnation, seq, epoch, ts, request_id, tuple(operations), body_crc, body, encoded)


def _decode_records(reader: _Reader, flags: int, payload_crc: int) -> RecordBatch:
    payload_at = reader.position
    (count,) = reader.unpack(_U32)
    chain = crc32c(reader.view[payload_at : reader.position])
    records = []
    origin_cache: list[Any] = [b"", ""]
    for _ in range(count):
        if reader.end - reader.position >= _RECORD_PREFIX.size:
            chain = crc32c(reader.view[reader.position : reader.position + _RECORD_PREFIX.size], chain)
        records.append(_record_at(reader, origin_cache))
    reader.finish()
    if chain != payload_crc:
        raise ChecksumMismatch("payload CRC mismatch")
    return RecordBatch(tuple(records), bool(flags & FLAG_RECONCILE))


def decode_record(data: Any) -> RecordView:
    """Decode exactly one record as `encode_record` wrote it (prefix and body; views into `data`).
    The log stores records in this form (docs/storage.md)."""
    view = memoryview(data).cast("B")
    reader = _Reader(view, 0, len(view))
    record = _record_at(reader, [b"", ""])
    reader.finish()
    return record


def _decode_body(frame_type: int, flags: int, reader: _Reader, payload_crc: int) -> Body:
    if frame_type == FrameType.RECORDS:
        return _decode_records(reader, flags, payload_crc)
    if frame_type == FrameType.RESYNC_DATA:
        batch_seq, count = reader.unpack(_RESYNC_DATA_FIXED)
        entries = []
        for _ in range(count):
            ts, key_bytes, value_bytes = reader.unpack(_RESYNC_ENTRY)
            key = reader.take(key_bytes)
            value = None if value_bytes == DELETE_LENGTH else reader.take(value_bytes)
            entries.append(VersionedView(key, ts, value))
        reader.finish()
        return ResyncData(batch_seq, tuple(entries))
    if frame_type in CORE_FRAME_TYPES:
        # A core message laid out by the schema (daemon/wire.py): its payload, checked by its CRC.
        return Fields(bytes(reader.take(reader.end - reader.position)))
    if frame_type == FrameType.LINK_HELLO:
        incarnation, pair_bytes, site_bytes, extras_bytes = reader.unpack(_LINK_HELLO_FIXED)
        pair_id = _utf8(reader.take(pair_bytes), "pair id")
        site = _utf8(reader.take(site_bytes), "site")
        extras = bytes(reader.take(extras_bytes))
        reader.finish()
        return LinkHello(pair_id, site, incarnation, extras)
    if frame_type == FrameType.LINK_GOODBYE:
        reason, reserved, message_bytes = reader.unpack(_GOODBYE_FIXED)
        if reserved != 0:
            raise MalformedFrame("reserved goodbye field is not zero")
        message = _utf8(reader.take(message_bytes), "goodbye message")
        reader.finish()
        return Goodbye(reason, message)
    assert frame_type == FrameType.LINK_ACK, frame_type  # _parse_header refused every other type
    reader.finish()
    return None


def _decode_at(view: memoryview, offset: int, header: tuple[int, int, int, int, int, int, int]) -> Frame:
    total, frame_type, flags, payload_crc, epoch, link_seq, link_ack = header
    # RECORDS frames check their CRC chain while they are walked (docs/wire.md); the others here.
    if frame_type != FrameType.RECORDS and crc32c(view[offset + HEADER_BYTES : offset + total]) != payload_crc:
        raise ChecksumMismatch("payload CRC mismatch")
    body = _decode_body(frame_type, flags, _Reader(view, offset + HEADER_BYTES, offset + total), payload_crc)
    return Frame(FrameType(frame_type), epoch, link_seq, link_ack, total, body)


def decode_frame(data: Any, frame_size_bytes_max: int = FRAME_SIZE_BYTES_MAX_DEFAULT) -> Frame:
    """Decode exactly one frame that fills `data` (views point into `data`)."""
    _check_frame_size_max(frame_size_bytes_max)
    view = memoryview(data).cast("B")
    if len(view) < HEADER_BYTES:
        raise MalformedFrame(f"{len(view)} bytes is shorter than a frame header")
    header = _parse_header(view, 0, frame_size_bytes_max)
    if header[0] != len(view):
        raise MalformedFrame(f"frame length {header[0]} but {len(view)} bytes given")
    return _decode_at(view, 0, header)


class FrameDecoder:
    """Turn a byte stream, cut anywhere, into whole frames.

    Two ways in: `feed(chunk)` for any bytes-like chunk, or the
    `asyncio.BufferedProtocol` pair `get_buffer(size_hint)` /
    `buffer_updated(nbytes)`, with which the socket is read straight into the
    decoder's receive buffer. Decoded frames point into that buffer; it is
    never written again once a frame has been handed out (a fresh buffer is
    started instead), so the views stay valid for as long as they are held.

    The first invalid frame raises a FramingError; the frames decoded earlier
    in the same call are discarded with it (the link resends them), and
    every later call raises the same error.
    """

    def __init__(
        self,
        frame_size_bytes_max: int = FRAME_SIZE_BYTES_MAX_DEFAULT,
        receive_buffer_bytes: int = RECEIVE_BUFFER_BYTES_DEFAULT,
    ) -> None:
        self._frame_size_bytes_max = _check_frame_size_max(frame_size_bytes_max)
        if not isinstance(receive_buffer_bytes, int) or receive_buffer_bytes < READ_BYTES_MIN:
            raise ValueError(f"receive_buffer_bytes must be an int of at least {READ_BYTES_MIN}")
        self._receive_buffer_bytes = receive_buffer_bytes
        self._view = memoryview(bytearray(receive_buffer_bytes))
        self._start = 0  # first byte of the first frame not yet returned
        self._end = 0  # end of the bytes received
        self._header: tuple[int, int, int, int, int, int, int] | None = None  # of the frame at _start
        self._failed: FramingError | None = None

    @property
    def frame_size_bytes_max(self) -> int:
        return self._frame_size_bytes_max

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return self._end - self._start

    def get_buffer(self, size_hint: int = -1) -> memoryview:
        """The free tail of the receive buffer, to be filled then reported by buffer_updated."""
        if self._failed is not None:
            raise self._failed
        capacity = len(self._view)
        if self._header is not None:
            # The frame's length is known (and checked): it must fit whole, so that it is one view.
            required = self._header[0]
            move = self._start + required > capacity
        else:
            required = HEADER_BYTES
            move = capacity - self._end < READ_BYTES_MIN
        if move:
            # Move to a fresh buffer: the old one may be referenced by frames already handed out.
            pending = self._end - self._start
            fresh = memoryview(bytearray(max(self._receive_buffer_bytes, required + READ_BYTES_MIN)))
            fresh[:pending] = self._view[self._start : self._end]
            self._view = fresh
            self._start = 0
            self._end = pending
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """`nbytes` were written into the buffer from get_buffer: return the frames completed."""
        if self._failed is not None:
            raise self._failed
        if nbytes < 0 or self._end + nbytes > len(self._view):
            raise ValueError(f"buffer_updated({nbytes}) beyond the buffer handed out")
        self._end += nbytes
        try:
            return self._drain()
        except FramingError as error:
            self._failed = error
            raise

    def feed(self, data: Any) -> list[Frame]:
        """Take a chunk of the stream (any bytes-like object) and return the frames it completes."""
        if self._failed is not None:
            raise self._failed
        view = memoryview(data).cast("B")
        frames: list[Frame] = []
        try:
            if self._end == self._start and isinstance(data, bytes):
                # Nothing pending and an immutable chunk: decode straight from it.
                position = 0
                while len(view) - position >= HEADER_BYTES:
                    header = _parse_header(view, position, self._frame_size_bytes_max)
                    if len(view) - position < header[0]:
                        break
                    frames.append(_decode_at(view, position, header))
                    position += header[0]
                view = view[position:]
            while len(view):
                target = self.get_buffer(len(view))
                count = min(len(target), len(view))
                target[:count] = view[:count]
                view = view[count:]
                self._end += count
                frames.extend(self._drain())
        except FramingError as error:
            self._failed = error
            raise
        return frames

    def _drain(self) -> list[Frame]:
        frames: list[Frame] = []
        while True:
            available = self._end - self._start
            if self._header is None:
                if available < HEADER_BYTES:
                    return frames
                self._header = _parse_header(self._view, self._start, self._frame_size_bytes_max)
            total = self._header[0]
            if available < total:
                return frames
            frames.append(_decode_at(self._view, self._start, self._header))
            self._start += total
            self._header = None
