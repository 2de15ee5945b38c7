"""Core peer messages <-> frames: one schema table (docs/wire.md, "Core messages").

The link carries frames; the protocol core speaks `replicator.core.messages`. `SCHEMA` says, for
each core message class, its frame type (one per message, in the core's code space 0x10-0x1F;
the link's own frames have 0x01-0x0F and never reach the core) and its fields in wire order. The
epoch of every message travels in the frame header. The table drives `Encoder` and `Decoder`:

- the bulk fields (`RECORDS`, `VERSIONED`) are the codec's own (Cython, or its pure twin:
  `framing.encode_records` / `encode_resync_data` and their decoders, which hand out views);
- every other field is laid out here, little-endian, and travels as the payload of
  `framing.encode_fields`; the decoder checks every length and count against the payload and
  refuses trailing bytes, unknown roles and reasons and bad booleans (MalformedFrame).

A received record keeps its encoded form (`Record.wire`: the bytes and CRC it came with), so
the log stores it, and a reconcile ships it, as it came (no second encoding, no second CRC).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any

from replicator import framing
from replicator.core import messages as msg
from replicator.core.messages import GoodbyeReason, Role

FT = framing.FrameType
ROLES = list(Role)
GOODBYE_MESSAGE_CHARS_MAX = 1000


class Kind(enum.Enum):
    """How one field is laid out."""

    U64 = "u64"
    BOOL = "u8 0 or 1"
    ROLE = "u8 index in Role"
    REASON = "u8 GoodbyeReason value"
    BYTES = "u16 length + bytes"
    TEXT = "u16 length + utf-8"
    OPTIONAL_U64 = "u8 0 (absent) or 1 + u64"
    KEYS = "u32 count + (u32 length + bytes) each"
    DEDUP = "u32 count + (u32 length, u64 ts, bytes) each"
    RECORDS = "the codec's RECORDS payload"
    VERSIONED = "the codec's RESYNC_DATA payload"
    RECONCILE_FLAG = "the RECORDS frame's FLAG_RECONCILE"


@dataclass(frozen=True, slots=True)
class Layout:
    message: type
    frame_type: framing.FrameType
    fields: tuple[tuple[str, Kind], ...]  # in wire order; `epoch` is the header's
    # Fields the decoder fills from the link's handshake, not sent again (the peer's name, the pair).
    context: tuple[str, ...] = ()


U64, BOOL, ROLE, REASON, BYTES, TEXT = Kind.U64, Kind.BOOL, Kind.ROLE, Kind.REASON, Kind.BYTES, Kind.TEXT

SCHEMA: tuple[Layout, ...] = (
    Layout(
        msg.Hello,
        FT.HELLO,
        (("role", ROLE), ("incarnation", U64), ("generation", BYTES), ("synced_epoch", U64), ("clock_high", Kind.OPTIONAL_U64)),
        context=("site", "pair"),
    ),
    Layout(msg.ShipRecords, FT.RECORDS, (("records", Kind.RECORDS), ("reconcile", Kind.RECONCILE_FLAG))),
    Layout(msg.PreparedAck, FT.PREPARED_ACK, (("incarnation", U64), ("seq", U64))),
    Layout(msg.CommitWatermark, FT.COMMIT_WATERMARK, (("incarnation", U64), ("seq", U64))),
    Layout(msg.CommitConfirm, FT.COMMIT_CONFIRM, (("incarnation", U64), ("seq", U64))),
    Layout(msg.Heartbeat, FT.HEARTBEAT, (("nonce", U64),)),
    Layout(msg.HeartbeatAck, FT.HEARTBEAT_ACK, (("nonce", U64), ("lease_granted", BOOL))),
    Layout(msg.ReconcileDone, FT.RECONCILE_DONE, (("next_seq", U64),)),
    Layout(msg.ReconcileAck, FT.RECONCILE_ACK, ()),
    Layout(msg.ResyncBegin, FT.RESYNC_BEGIN, (("full", BOOL), ("next_seq", U64))),
    Layout(msg.ResyncBeginAck, FT.RESYNC_BEGIN_ACK, (("suspect_keys", Kind.KEYS), ("next_seq", U64))),
    Layout(msg.ResyncDedup, FT.RESYNC_DEDUP, (("entries", Kind.DEDUP),)),
    Layout(msg.ResyncData, FT.RESYNC_DATA, (("batch", U64), ("entries", Kind.VERSIONED))),
    Layout(msg.ResyncAck, FT.RESYNC_ACK, (("batch", U64),)),
    Layout(msg.ResyncSynced, FT.RESYNC_SYNCED, ()),
    Layout(msg.Goodbye, FT.GOODBYE, (("reason", REASON), ("message", TEXT))),
)
BY_MESSAGE: dict[type, Layout] = {layout.message: layout for layout in SCHEMA}
BY_FRAME_TYPE: dict[int, Layout] = {layout.frame_type: layout for layout in SCHEMA}
assert len(BY_MESSAGE) == len(BY_FRAME_TYPE) == len(SCHEMA)
assert set(BY_FRAME_TYPE) == set(framing.CORE_FRAME_TYPES)
for _layout in SCHEMA:  # the table names every field of its message, once
    _names = ("epoch", *_layout.context, *(name for name, _ in _layout.fields))
    assert sorted(_names) == sorted(f.name for f in fields(_layout.message)), _layout

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_DEDUP_ENTRY = struct.Struct("<IQ")
_U64_MAX = (1 << 64) - 1


def _check_u64(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{name} must be an int in 0..2**64-1, got {value!r}")
    return value


def _short(data: bytes, name: str) -> bytes:
    if len(data) > framing.SHORT_BYTES_MAX:
        raise ValueError(f"{name} must be at most {framing.SHORT_BYTES_MAX} bytes, got {len(data)}")
    return _U16.pack(len(data)) + data


def _pack_field(kind: Kind, value: Any, name: str) -> bytes:
    if kind is Kind.U64:
        return _U64.pack(_check_u64(value, name))
    if kind is Kind.BOOL:
        return _U8.pack(1 if value else 0)
    if kind is Kind.ROLE:
        return _U8.pack(ROLES.index(value))
    if kind is Kind.REASON:
        return _U8.pack(GoodbyeReason(value).value)
    if kind is Kind.BYTES:
        return _short(bytes(value), name)
    if kind is Kind.TEXT:
        return _short(str(value)[:GOODBYE_MESSAGE_CHARS_MAX].encode("utf-8"), name)
    if kind is Kind.OPTIONAL_U64:
        return b"\x00" if value is None else b"\x01" + _U64.pack(_check_u64(value, name))
    if kind is Kind.KEYS:
        return _U32.pack(len(value)) + b"".join(_U32.pack(len(key)) + bytes(key) for key in value)
    if kind is Kind.DEDUP:
        return _U32.pack(len(value)) + b"".join(
            _DEDUP_ENTRY.pack(len(request_id), _check_u64(ts, name)) + bytes(request_id) for request_id, ts in value
        )
    raise AssertionError(f"{kind} is not a schema field kind")  # pragma: no cover - the table is checked above


class _Payload:
    """Bounds-checked reads of a schema payload; every overrun or leftover is a MalformedFrame."""

    __slots__ = ("data", "position", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.position = 0
        self.what = what

    def take(self, length: int) -> bytes:
        if len(self.data) - self.position < length:
            raise framing.MalformedFrame(f"{self.what}: a field runs past the end of the frame")
        piece = self.data[self.position : self.position + length]
        self.position += length
        return piece

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def count(self, item_bytes_min: int) -> int:
        (count,) = self.unpack(_U32)
        if count * item_bytes_min > len(self.data) - self.position:
            raise framing.MalformedFrame(f"{self.what}: a count of {count} does not fit in the frame")
        return int(count)

    def field(self, kind: Kind) -> Any:
        if kind is Kind.U64:
            return self.unpack(_U64)[0]
        if kind is Kind.BOOL or kind is Kind.OPTIONAL_U64:
            (flag,) = self.unpack(_U8)
            if flag > 1:
                raise framing.MalformedFrame(f"{self.what}: a flag of {flag}")
            if kind is Kind.BOOL:
                return bool(flag)
            return self.unpack(_U64)[0] if flag else None
        if kind is Kind.ROLE:
            (index,) = self.unpack(_U8)
            if index >= len(ROLES):
                raise framing.MalformedFrame(f"{self.what}: unknown role {index}")
            return ROLES[index]
        if kind is Kind.REASON:
            (code,) = self.unpack(_U8)
            try:
                return GoodbyeReason(code)
            except ValueError:
                raise framing.MalformedFrame(f"{self.what}: unknown goodbye reason {code}") from None
        if kind is Kind.BYTES or kind is Kind.TEXT:
            (length,) = self.unpack(_U16)
            data = self.take(length)
            if kind is Kind.BYTES:
                return data
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                raise framing.MalformedFrame(f"{self.what}: text is not valid utf-8") from None
        if kind is Kind.KEYS:
            keys = []
            for _ in range(self.count(_U32.size)):
                (length,) = self.unpack(_U32)
                keys.append(self.take(length))
            return tuple(keys)
        if kind is Kind.DEDUP:
            entries = []
            for _ in range(self.count(_DEDUP_ENTRY.size)):
                length, ts = self.unpack(_DEDUP_ENTRY)
                entries.append((self.take(length), ts))
            return tuple(entries)
        raise AssertionError(f"{kind} is not a schema field kind")  # pragma: no cover

    def finish(self) -> None:
        if self.position != len(self.data):
            raise framing.MalformedFrame(f"{self.what}: {len(self.data) - self.position} unexpected bytes at the end")


@dataclass
class Encoder:
    """Turns core messages into frames, by the schema."""

    site: str
    # The link's frame limit: every frame made is checked against it (the core cut the message
    # to message_bytes_max, the frame limit less a headroom; this is the pair assertion).
    frame_bytes_max: int | None = None

    def encode(self, message: msg.PeerMessage) -> list[bytearray]:
        """The frames of one message (one frame each since protocol version 2)."""
        frame = self.encode_one(message)
        if self.frame_bytes_max is not None:
            assert len(frame) <= self.frame_bytes_max, (
                f"{type(message).__name__} made a frame of {len(frame)} bytes, over {self.frame_bytes_max}"
            )
        return [frame]

    def encode_one(self, message: msg.PeerMessage) -> bytearray:
        layout = BY_MESSAGE.get(type(message))
        if layout is None:
            raise TypeError(f"no frame for {message!r}")
        out = bytearray()
        if isinstance(message, msg.ShipRecords):
            framing.encode_records(out, message.epoch, message.records, message.reconcile)
        elif isinstance(message, msg.ResyncData):
            framing.encode_resync_data(out, message.epoch, message.batch, message.entries)
        else:
            payload = b"".join(_pack_field(kind, getattr(message, name), name) for name, kind in layout.fields)
            framing.encode_fields(out, layout.frame_type, message.epoch, payload)
        return out


@dataclass
class Decoder:
    """Turns frames from the peer into core messages (None for the link's own frames)."""

    pair: str
    peer: str

    def reset(self) -> None:
        """Nothing to forget at a new connection: since protocol version 2 every frame stands alone."""

    def decode(self, frame: framing.Frame) -> msg.PeerMessage | None:
        layout = BY_FRAME_TYPE.get(frame.type)
        if layout is None:
            return None  # LINK_HELLO, LINK_ACK, LINK_GOODBYE belong to the link
        body = frame.body
        if isinstance(body, framing.RecordBatch):
            # Each record keeps the bytes and CRC it came with: the log stores them as they are.
            records = tuple(view.materialise(keep_encoded=True) for view in body.records)
            return msg.ShipRecords(frame.epoch, records, reconcile=body.reconcile)
        if isinstance(body, framing.ResyncData):
            return msg.ResyncData(frame.epoch, body.batch_seq, tuple(entry.materialise() for entry in body.entries))
        assert isinstance(body, framing.Fields), body
        payload = _Payload(body.payload, frame.type.name)
        values: dict[str, Any] = {name: payload.field(kind) for name, kind in layout.fields}
        payload.finish()
        if layout.context:
            values.update(site=self.peer, pair=self.pair)
        message: msg.PeerMessage = layout.message(epoch=frame.epoch, **values)
        return message


def schema_table_markdown() -> str:
    """The core frames as docs/wire.md shows them (a test checks the page against this table)."""
    lines = ["| type | frame | core message | fields after the header's epoch |", "|---:|---|---|---|"]
    for layout in SCHEMA:
        described = ", ".join(f"`{name}` {kind.value}" for name, kind in layout.fields) or "none"
        if layout.context:
            described += "; " + ", ".join(f"`{name}`" for name in layout.context) + " from the LINK_HELLO"
        lines.append(f"| 0x{int(layout.frame_type):02X} | {layout.frame_type.name} | `{layout.message.__name__}` | {described} |")
    return "\n".join(lines)
