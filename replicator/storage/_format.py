"""On-disk encoding of keys and values, shared by the RocksDB store and its double.

Column families (indexes into COLUMN_FAMILIES):

- data:      key -> value header (13 bytes) + value bytes.
             header = ">BQI": format byte (0x10 | tombstone bit), ts, crc32c.
             crc32c covers the key, the first 9 header bytes and the value, so
             a flipped bit in the ts, the flag, the value or a value stored
             under the wrong key is caught on read.
- log:       origin utf-8 + 0x00 + ">QQ" (incarnation, seq) -> the record as a RECORDS frame
             carries it (docs/wire.md): "<II" body length, crc32c of the body, body.
             A received record is stored as it came (its CRC is the sender's,
             checked on receipt and again on load); the record names its own id,
             which the reader checks against the key (framing.record_from_log).
             Byte order of these keys is RecordId order (UTF-8 preserves code
             point order, and the 0x00 terminator sorts a prefix first).
- meta:      b"m" + name utf-8 -> crc32c + value; b"r" -> crc32c + resync position.
- dirty:     key -> b"" (set membership).
- dedup:     request id -> crc32c + ">Q" time_ms + outcome.
- dedup_age: ">Q" time_ms + request id -> b"" (the age index used to prune and bound).

Every framed value's crc32c starts from the crc32c of its key (log values carry their own).
"""

from __future__ import annotations

import struct

from replicator.checksum import crc32c
from replicator.core.records import RecordId

COLUMN_FAMILIES: tuple[str, ...] = ("data", "log", "meta", "dirty", "dedup", "dedup_age")
DATA, LOG, META, DIRTY, DEDUP, DEDUP_AGE = range(len(COLUMN_FAMILIES))

VALUE_HEADER = struct.Struct(">BQI")
VALUE_HEADER_SIZE = VALUE_HEADER.size  # 13
_PREFIX = struct.Struct(">BQ")
FORMAT_VERSION_BITS = 0x10
TOMBSTONE_BIT = 0x01
TS_MAX = (1 << 64) - 1

_CRC = struct.Struct(">I")
_LOG_PREFIX = struct.Struct("<II")  # body length, crc32c of the body (the wire's record prefix)
_U64 = struct.Struct(">Q")
_U64_PAIR = struct.Struct(">QQ")

META_PREFIX = b"m"
RESYNC_POSITION_KEY = b"r"


def encode_value(key: bytes, ts: int, value: bytes | None) -> bytes:
    """The stored form of (ts, value or tombstone) at `key`."""
    assert 0 <= ts <= TS_MAX, f"ts out of range: {ts}"
    flags = FORMAT_VERSION_BITS | (TOMBSTONE_BIT if value is None else 0)
    prefix = _PREFIX.pack(flags, ts)
    body = b"" if value is None else value
    checksum = crc32c(body, crc32c(prefix, crc32c(key)))
    return prefix + _CRC.pack(checksum) + body


def decode_value(key: bytes, stored: bytes) -> tuple[int, bytes | None] | None:
    """(ts, value or None for a tombstone), or None when the bytes fail their check."""
    if len(stored) < VALUE_HEADER_SIZE:
        return None
    flags, ts, checksum = VALUE_HEADER.unpack_from(stored)
    if flags & 0xF0 != FORMAT_VERSION_BITS:
        return None
    view = memoryview(stored)
    if crc32c(view[VALUE_HEADER_SIZE:], crc32c(view[:9], crc32c(key))) != checksum:
        return None
    if flags & TOMBSTONE_BIT:
        if len(stored) != VALUE_HEADER_SIZE:
            return None
        return ts, None
    return ts, stored[VALUE_HEADER_SIZE:]


def value_ts_unchecked(stored: bytes) -> int | None:
    """The ts in a stored header without checking the CRC (None when malformed)."""
    if len(stored) < VALUE_HEADER_SIZE or stored[0] & 0xF0 != FORMAT_VERSION_BITS:
        return None
    ts: int = _U64.unpack_from(stored, 1)[0]
    return ts


def frame(key: bytes, payload: bytes) -> bytes:
    """crc32c(key, payload) + payload, for log, meta and dedup values."""
    return _CRC.pack(crc32c(payload, crc32c(key))) + payload


def unframe(key: bytes, stored: bytes) -> bytes | None:
    """The payload of a framed value, or None when it fails its check."""
    if len(stored) < 4:
        return None
    view = memoryview(stored)
    if crc32c(view[4:], crc32c(key)) != _CRC.unpack_from(stored)[0]:
        return None
    return stored[4:]


def log_value_of(body: bytes) -> bytes:
    """A log value around `body` (what framing.encode_record makes of a record's body)."""
    return _LOG_PREFIX.pack(len(body), crc32c(body)) + body


def log_value_shaped(encoded: bytes) -> bool:
    """Whether `encoded` has the log's form by its length prefix (no CRC pass: that is load's)."""
    return len(encoded) >= _LOG_PREFIX.size and _LOG_PREFIX.unpack_from(encoded)[0] == len(encoded) - _LOG_PREFIX.size


def check_log_value(stored: bytes) -> bool:
    """Whether a stored log value is whole: its length and its body's crc32c."""
    if len(stored) < _LOG_PREFIX.size:
        return False
    length, checksum = _LOG_PREFIX.unpack_from(stored)
    view = memoryview(stored)
    return length == len(stored) - _LOG_PREFIX.size and crc32c(view[_LOG_PREFIX.size :]) == checksum


# The log value of the releases before link protocol version 2: crc32c(key, payload) + payload, the
# payload a whole version-1 RECORDS frame of one record (48-byte header, u32 count = 1, the record).
_LEGACY_RECORDS_HEADER = b"RPLF\x01\x02\x00\x00"  # magic, version 1, type RECORDS, no flags
_LEGACY_RECORD_AT = 48 + 4


def log_value(key: bytes, stored: bytes) -> bytes | None:
    """The record a stored log value holds, in today's form (None when it fails its checks). A
    value an older release wrote is read too (its record is the same bytes, inside a frame)."""
    if check_log_value(stored):
        return stored
    legacy = unframe(key, stored)
    if legacy is None or legacy[:8] != _LEGACY_RECORDS_HEADER or legacy[48:52] != b"\x01\x00\x00\x00":
        return None
    record = legacy[_LEGACY_RECORD_AT:]
    return record if check_log_value(record) else None


def record_key(record_id: RecordId) -> bytes:
    origin = record_id.origin.encode("utf-8")
    assert b"\x00" not in origin, f"origin may not contain NUL: {record_id.origin!r}"
    return origin + b"\x00" + _U64_PAIR.pack(record_id.incarnation, record_id.seq)


def decode_record_key(key: bytes) -> RecordId:
    origin, _, numbers = key.partition(b"\x00")
    assert len(numbers) == 16, f"malformed log key {key!r}"
    incarnation, seq = _U64_PAIR.unpack(numbers)
    return RecordId(origin.decode("utf-8"), incarnation, seq)


def meta_key(name: str) -> bytes:
    return META_PREFIX + name.encode("utf-8")


def encode_dedup(request_id: bytes, outcome: bytes, time_ms: int) -> bytes:
    assert 0 <= time_ms <= TS_MAX, f"time_ms out of range: {time_ms}"
    return frame(request_id, _U64.pack(time_ms) + outcome)


def decode_dedup(request_id: bytes, stored: bytes) -> tuple[int, bytes] | None:
    """(time_ms, outcome), or None when the bytes fail their check."""
    payload = unframe(request_id, stored)
    if payload is None or len(payload) < 8:
        return None
    time_ms: int = _U64.unpack_from(payload)[0]
    return time_ms, payload[8:]


def dedup_time_unchecked(stored: bytes) -> int | None:
    if len(stored) < 12:
        return None
    time_ms: int = _U64.unpack_from(stored, 4)[0]
    return time_ms


def dedup_age_key(time_ms: int, request_id: bytes) -> bytes:
    return _U64.pack(time_ms) + request_id


def decode_dedup_age_key(key: bytes) -> tuple[int, bytes]:
    time_ms: int = _U64.unpack_from(key)[0]
    return time_ms, key[8:]


def key_successor(key: bytes) -> bytes:
    """The smallest key greater than `key`."""
    return key + b"\x00"
