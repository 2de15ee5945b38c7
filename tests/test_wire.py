"""Core messages <-> link frames (replicator/daemon/wire.py, SCHEMA): every message survives the
trip with both codec twins, every bad payload is refused, and a received record is stored as it
came (its bytes and CRC, not encoded again)."""

from __future__ import annotations

import struct
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import framing
from replicator._pure import framing as pure
from replicator.core import messages as msg
from replicator.core.messages import GoodbyeReason, Role
from replicator.core.records import Operation, Record, RecordId, Versioned
from replicator.daemon import wire
from replicator.daemon.wire import SCHEMA, Decoder, Encoder
from replicator.framing import record_from_log, record_to_log
from replicator.storage import MemoryStore
from replicator.storage._format import check_log_value

RECORD = Record(RecordId("a", 3, 7), 2, 1234, b"req", (Operation(b"k", b"v"),))
MESSAGES: list[msg.PeerMessage] = [
    msg.Hello(2, "a", "pair", Role.SYNC, 3, b"gen", 1),
    msg.Hello(2, "a", "pair", Role.RESYNC_TARGET, 3, b"gen", 1, 99),
    msg.ShipRecords(2, (RECORD,)),
    msg.ShipRecords(2, (RECORD,), reconcile=True),
    msg.PreparedAck(2, 3, 7),
    msg.CommitWatermark(2, 3, 7),
    msg.CommitConfirm(2, 3, 7),
    msg.Heartbeat(2, 5),
    msg.HeartbeatAck(2, 5, True),
    msg.ReconcileDone(2, 8),
    msg.ReconcileAck(2),
    msg.ResyncBegin(2, True, 9),
    msg.ResyncBegin(2, False, 1),
    msg.ResyncBeginAck(2, (b"x", b"y"), 4),
    msg.ResyncDedup(2, ((b"r1", 5), (b"r2", 6))),
    msg.ResyncData(2, 4, (Versioned(b"k", 5, b"v"), Versioned(b"gone", 6, None))),
    msg.ResyncAck(2, 11),
    msg.ResyncSynced(3),
    msg.Goodbye(2, GoodbyeReason.STALE_EPOCH, "you are behind"),
]
TWINS = [pytest.param(pure, id="pure"), pytest.param(framing, id=framing.IMPLEMENTATION)]


def _trip(message: msg.PeerMessage, decode=framing.decode_frame) -> msg.PeerMessage | None:  # type: ignore[no-untyped-def]
    (frame,) = Encoder("a").encode(message)
    return Decoder(pair="pair", peer="a").decode(decode(bytes(frame)))


def test_the_schema_covers_every_core_message_once() -> None:
    union = set(msg.PeerMessage.__args__)  # type: ignore[attr-defined]
    assert {layout.message for layout in SCHEMA} == union
    assert {layout.frame_type for layout in SCHEMA} == set(framing.CORE_FRAME_TYPES)
    for layout in SCHEMA:
        names = {"epoch", *layout.context, *(name for name, _ in layout.fields)}
        assert names == {f.name for f in fields(layout.message)}, layout.message


def test_docs_show_the_schema_as_it_is() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "wire.md").read_text()
    assert wire.schema_table_markdown() in page, "docs/wire.md: paste wire.schema_table_markdown()"


def test_link_and_core_frames_have_separate_code_spaces() -> None:
    assert all(0x01 <= frame_type <= 0x0F for frame_type in framing.LINK_FRAME_TYPES)
    assert all(0x10 <= frame_type <= 0x1F for frame_type in framing.CORE_FRAME_TYPES)
    # The link's "closing" is a LINK_GOODBYE: the core never sees it (it used to decode as STALE_EPOCH).
    out = bytearray()
    framing.encode_link_goodbye(out, 2, 1, "closing")
    assert Decoder(pair="pair", peer="a").decode(framing.decode_frame(bytes(out))) is None


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("twin", TWINS)
def test_core_messages_survive_the_link(message: msg.PeerMessage, twin) -> None:  # type: ignore[no-untyped-def]
    assert _trip(message, twin.decode_frame) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_the_twins_make_the_same_bytes(message: msg.PeerMessage) -> None:
    (frame,) = Encoder("a").encode(message)
    layout = wire.BY_MESSAGE[type(message)]
    assert frame[5] == layout.frame_type
    twin_frame = bytearray()
    if isinstance(message, msg.ShipRecords):
        pure.encode_records(twin_frame, message.epoch, message.records, message.reconcile)
    elif isinstance(message, msg.ResyncData):
        pure.encode_resync_data(twin_frame, message.epoch, message.batch, message.entries)
    else:
        payload = framing.decode_frame(bytes(frame)).body.payload
        pure.encode_fields(twin_frame, layout.frame_type, message.epoch, payload)
    assert twin_frame == frame


u64 = st.integers(0, 2**64 - 1)
blobs = st.binary(max_size=40)
records = st.builds(
    Record,
    st.builds(RecordId, st.text(min_size=1, max_size=8).filter(lambda s: "\x00" not in s), u64, u64),
    u64,
    u64,
    blobs,
    st.lists(st.builds(Operation, blobs, st.none() | blobs), max_size=3).map(tuple),
)
any_message = st.one_of(
    st.builds(msg.Hello, u64, st.just("a"), st.just("pair"), st.sampled_from(list(Role)), u64, blobs, u64, st.none() | u64),
    st.builds(msg.ShipRecords, u64, st.lists(records, max_size=4).map(tuple), st.booleans()),
    st.builds(msg.PreparedAck, u64, u64, u64),
    st.builds(msg.CommitWatermark, u64, u64, u64),
    st.builds(msg.CommitConfirm, u64, u64, u64),
    st.builds(msg.Heartbeat, u64, u64),
    st.builds(msg.HeartbeatAck, u64, u64, st.booleans()),
    st.builds(msg.ReconcileDone, u64, u64),
    st.builds(msg.ReconcileAck, u64),
    st.builds(msg.ResyncBegin, u64, st.booleans(), u64),
    st.builds(msg.ResyncBeginAck, u64, st.lists(blobs, max_size=5).map(tuple), u64),
    st.builds(msg.ResyncDedup, u64, st.lists(st.tuples(blobs, u64), max_size=5).map(tuple)),
    st.builds(msg.ResyncData, u64, u64, st.lists(st.builds(Versioned, blobs, u64, st.none() | blobs), max_size=4).map(tuple)),
    st.builds(msg.ResyncAck, u64, u64),
    st.builds(msg.ResyncSynced, u64),
    st.builds(msg.Goodbye, u64, st.sampled_from(list(GoodbyeReason)), st.text(max_size=30)),
)


@settings(max_examples=300, deadline=None)
@given(any_message)
def test_round_trip_over_the_schema(message: msg.PeerMessage) -> None:
    for twin in (pure, framing):
        assert _trip(message, twin.decode_frame) == message


@settings(max_examples=300, deadline=None)
@given(any_message, st.data())
def test_a_cut_or_lengthened_payload_is_refused(message: msg.PeerMessage, data: st.DataObject) -> None:
    layout = wire.BY_MESSAGE[type(message)]
    if layout.frame_type in framing.BULK_FRAME_TYPES:
        return  # the codec's own payloads: tests/test_framing.py
    (frame,) = Encoder("a").encode(message)
    payload = framing.decode_frame(bytes(frame)).body.payload
    if data.draw(st.booleans()) and payload:
        bad = payload[: data.draw(st.integers(0, len(payload) - 1))]
    else:
        bad = payload + data.draw(st.binary(min_size=1, max_size=9))
    out = bytearray()
    framing.encode_fields(out, layout.frame_type, message.epoch, bad)
    with pytest.raises(framing.MalformedFrame):
        Decoder(pair="pair", peer="a").decode(framing.decode_frame(bytes(out)))


@pytest.mark.parametrize(
    "frame_type, payload",
    [
        (framing.FrameType.HEARTBEAT_ACK, struct.pack("<QB", 5, 2)),  # a boolean of 2
        (framing.FrameType.GOODBYE, struct.pack("<BH", 99, 0)),  # no such reason
        (framing.FrameType.HELLO, struct.pack("<BQH", 200, 1, 0) + struct.pack("<QB", 1, 0)),  # no such role
        (framing.FrameType.RESYNC_BEGIN_ACK, struct.pack("<I", 10**6) + struct.pack("<Q", 1)),  # a count that cannot fit
        (framing.FrameType.RESYNC_DEDUP, struct.pack("<IIQ", 1, 100, 5) + b"short"),  # a length past the end
        (framing.FrameType.GOODBYE, struct.pack("<BH", 1, 2) + b"\xff\xfe"),  # not utf-8
    ],
)
def test_bad_fields_are_refused(frame_type: framing.FrameType, payload: bytes) -> None:
    out = bytearray()
    framing.encode_fields(out, frame_type, 2, payload)
    with pytest.raises(framing.MalformedFrame):
        Decoder(pair="pair", peer="a").decode(framing.decode_frame(bytes(out)))


def test_the_encoder_checks_the_frame_limit() -> None:
    big = Record(RecordId("a", 1, 1), 1, 1, b"", (Operation(b"k", b"v" * 1000),))
    with pytest.raises(AssertionError, match="over 500"):
        Encoder("a", frame_bytes_max=500).encode(msg.ShipRecords(1, (big,)))


# ------------------------------------------------------------------ stored as it came


def _received(record: Record) -> tuple[bytearray, Record]:
    (frame,) = Encoder("a").encode(msg.ShipRecords(2, (record,)))
    message = Decoder(pair="pair", peer="a").decode(framing.decode_frame(bytes(frame)))
    assert isinstance(message, msg.ShipRecords)
    (received,) = message.records
    return frame, received


def test_a_received_record_is_stored_as_it_came() -> None:
    record = Record(RecordId("a", 3, 7), 2, 1234, b"req", (Operation(b"k", b"marker" * 5000), Operation(b"d", None)))
    frame, received = _received(record)
    assert received == record
    # The record's bytes in the frame: after the 48-byte header and the u32 record count.
    in_frame = bytes(frame[framing.HEADER_BYTES + 4 :])
    assert received.wire == in_frame
    assert record_to_log(received) is received.wire  # not encoded again
    store = MemoryStore()
    batch = store.batch()
    batch.put_record(received.id, record_to_log(received))
    store.write(batch)
    stored = store.get_record(received.id)
    assert stored == in_frame
    assert record_from_log(stored, received.id) == record
    # A record made here is encoded, to the same bytes.
    assert record_to_log(record) == in_frame


@pytest.mark.parametrize("twin", TWINS)
def test_a_corrupted_stored_record_is_refused(twin) -> None:  # type: ignore[no-untyped-def]
    _, received = _received(RECORD)
    assert received.wire is not None
    for position in range(len(received.wire)):
        corrupt = bytearray(received.wire)
        corrupt[position] ^= 0x10
        assert not check_log_value(bytes(corrupt))
        with pytest.raises(framing.FramingError):
            twin.decode_record(bytes(corrupt))


def test_a_record_stored_under_another_key_is_refused() -> None:
    wire_bytes = record_to_log(RECORD)
    with pytest.raises(framing.MalformedFrame, match="holds record"):
        record_from_log(wire_bytes, RecordId("a", 3, 8))


def test_a_corrupted_record_in_a_frame_is_refused_and_stores_nothing() -> None:
    frame, _ = _received(RECORD)
    frame[-1] ^= 1  # the last byte of the record's value
    with pytest.raises(framing.ChecksumMismatch):
        framing.decode_frame(bytes(frame))


def test_a_log_entry_of_the_release_before_is_read() -> None:
    """Before protocol version 2 the log held crc32c(key, frame) + a version-1 RECORDS frame of the
    record; a site upgraded with records in its log reads them (the record is the same bytes)."""
    from replicator.checksum import crc32c
    from replicator.storage import _format as fmt

    record_bytes = record_to_log(RECORD)
    payload = struct.pack("<I", 1) + record_bytes
    header = struct.pack("<4sBBHIIQQQI", b"RPLF", 1, 2, 0, len(payload), 0, RECORD.epoch, 0, 0, 0)
    old_frame = header + struct.pack("<I", crc32c(header)) + payload
    key = fmt.record_key(RECORD.id)
    store = MemoryStore()
    store.raw_put("log", key, fmt.frame(key, old_frame))
    assert store.get_record(RECORD.id) == record_bytes
    assert record_from_log(store.load().log[RECORD.id], RECORD.id) == RECORD
    corrupt = bytearray(fmt.frame(key, old_frame))
    corrupt[-1] ^= 1
    store.raw_put("log", key, bytes(corrupt))
    with pytest.raises(Exception, match="corrupt"):
        store.load()
