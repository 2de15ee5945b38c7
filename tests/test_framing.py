"""Frame codec: round trips, streaming, hostile input, and the two twins against each other."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import replicator.framing as public
from replicator._pure import framing as pure
from replicator._select import extensions_disabled
from replicator.checksum import crc32c
from replicator.core.records import Operation, Record, RecordId, Versioned
from replicator.framing import FrameType

native = pytest.importorskip("replicator._native.framing") if extensions_disabled() else None
if native is None:
    from replicator._native import framing as native  # a missing build fails here, loudly

IMPLEMENTATIONS = [pytest.param(native, id="cython"), pytest.param(pure, id="pure")]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u64 = st.integers(0, 2**64 - 1)
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12).filter(
    lambda text: len(text.encode()) <= 255
)
blobs = st.binary(max_size=64)
operations = st.builds(Operation, blobs, st.one_of(st.none(), st.binary(max_size=300)))
records = st.builds(
    Record,
    st.builds(RecordId, names, u64, u64),
    u64,
    u64,
    st.binary(max_size=40),
    st.lists(operations, max_size=4).map(tuple),
)
versioned = st.builds(Versioned, blobs, u64, st.one_of(st.none(), st.binary(max_size=300)))

SCHEMA_FRAME_TYPES = sorted(pure.CORE_FRAME_TYPES - pure.BULK_FRAME_TYPES)

# One frame description: (encoder name, arguments after `out`).
frame_specs = st.one_of(
    st.tuples(st.just("records"), st.tuples(u64, st.lists(records, max_size=5), st.booleans())),
    st.tuples(st.just("link_hello"), st.tuples(u64, names, names, u64, st.binary(max_size=30))),
    st.tuples(st.just("fields"), st.tuples(st.sampled_from(SCHEMA_FRAME_TYPES), u64, st.binary(max_size=80))),
    st.tuples(st.just("resync_data"), st.tuples(u64, u64, st.lists(versioned, max_size=5))),
    st.tuples(st.just("link_goodbye"), st.tuples(u64, st.integers(0, 255), names)),
    st.tuples(st.just("link_ack"), st.tuples(u64)),
)


def encode(module, spec, out: bytearray | None = None) -> bytearray:
    kind, arguments = spec
    out = bytearray() if out is None else out
    getattr(module, f"encode_{kind}")(out, *arguments)
    return out


def expected_frame(spec) -> tuple:
    """What decoding the frame of `spec` must give, in normal form."""
    kind, arguments = spec
    if kind == "records":
        epoch, items, reconcile = arguments
        return (FrameType.RECORDS, epoch, ("records", tuple(items), reconcile))
    if kind == "link_hello":
        epoch, pair_id, site, incarnation, extras = arguments
        return (FrameType.LINK_HELLO, epoch, pure.LinkHello(pair_id, site, incarnation, extras))
    if kind == "fields":
        frame_type, epoch, payload = arguments
        return (frame_type, epoch, pure.Fields(payload))
    if kind == "resync_data":
        epoch, batch_seq, entries = arguments
        return (FrameType.RESYNC_DATA, epoch, ("resync", batch_seq, tuple(entries)))
    if kind == "link_goodbye":
        epoch, reason, message = arguments
        return (FrameType.LINK_GOODBYE, epoch, pure.Goodbye(reason, message))
    assert kind == "link_ack"
    return (FrameType.LINK_ACK, arguments[0], None)


def normal(frame) -> tuple:
    body = frame.body
    if isinstance(body, pure.RecordBatch):
        body = ("records", tuple(record.materialise() for record in body.records), body.reconcile)
    elif isinstance(body, pure.ResyncData):
        body = ("resync", body.batch_seq, tuple(entry.materialise() for entry in body.entries))
    return (frame.type, frame.epoch, body)


def sample_records(count: int = 3, value_bytes: int = 100) -> list[Record]:
    return [
        Record(
            RecordId("a", 7, seq),
            3,
            1000 + seq,
            b"request-%d" % seq,
            (Operation(b"key-%d" % seq, bytes([seq % 256]) * value_bytes), Operation(b"gone", None)),
        )
        for seq in range(1, count + 1)
    ]


def records_payload_crc(payload: bytes, flags: int = 0) -> int:
    """The CRC chain of a RECORDS payload: everything but the record bodies (docs/wire.md)."""
    position = 4
    (count,) = struct.unpack_from("<I", payload, position - 4)
    crc = crc32c(payload[:position])
    for _ in range(count):
        crc = crc32c(payload[position : position + 8], crc)
        position += 8 + struct.unpack_from("<I", payload, position)[0]
    return crc


def raw_frame(
    payload: bytes,
    frame_type: int = FrameType.LINK_ACK,
    version: int = pure.PROTOCOL_VERSION,
    flags: int = 0,
    reserved: int = 0,
    magic: bytes = pure.MAGIC,
    length: int | None = None,
    payload_crc: int | None = None,
) -> bytes:
    """A frame with arbitrary header fields and correct CRCs."""
    length = len(payload) if length is None else length
    payload_crc = payload_crc if payload_crc is not None else crc32c(payload)
    header = struct.pack("<4sBBHIIQQQI", magic, version, frame_type, flags, length, payload_crc, 9, 0, 0, reserved)
    return header + struct.pack("<I", crc32c(header)) + payload


# --- round trips and agreement ------------------------------------------------


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@FAST
@given(spec=frame_specs)
def test_round_trip_every_frame_type(module, spec):
    data = encode(module, spec)
    frame = module.decode_frame(bytes(data))
    assert frame.size_bytes == len(data)
    assert (frame.link_seq, frame.link_ack) == (0, 0)
    assert normal(frame) == expected_frame(spec)


@FAST
@given(spec=frame_specs)
def test_twins_agree_byte_for_byte(spec):
    native_bytes = encode(native, spec)
    pure_bytes = encode(pure, spec)
    assert native_bytes == pure_bytes
    assert normal(native.decode_frame(pure_bytes)) == normal(pure.decode_frame(native_bytes))


@FAST
@given(specs=st.lists(frame_specs, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_stream_cut_anywhere_gives_whole_frames(specs, cuts):
    stream = bytearray()
    for spec in specs:
        encode(native, spec, stream)
    stream = bytes(stream)
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    expected = [expected_frame(spec) for spec in specs]
    for module in (native, pure):
        decoder = module.FrameDecoder()
        frames = []
        for start, end in zip(points, points[1:], strict=False):
            frames.extend(decoder.feed(stream[start:end]))
        assert [normal(frame) for frame in frames] == expected
        assert decoder.pending_bytes == 0


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@FAST
@given(specs=st.lists(frame_specs, min_size=1, max_size=6), reads=st.lists(st.integers(1, 5000), min_size=1))
def test_buffered_protocol_path(module, specs, reads):
    stream = bytearray()
    for spec in specs:
        encode(module, spec, stream)
    decoder = module.FrameDecoder(receive_buffer_bytes=16 * 1024)
    frames, position, index = [], 0, 0
    while position < len(stream):
        target = decoder.get_buffer(-1)
        count = min(len(target), reads[index % len(reads)], len(stream) - position)
        target[:count] = stream[position : position + count]
        position += count
        index += 1
        frames.extend(decoder.buffer_updated(count))
    assert [normal(frame) for frame in frames] == [expected_frame(spec) for spec in specs]


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_keys_and_values_are_views_of_the_receive_buffer(module):
    chunk = bytes(encode(module, ("records", (5, sample_records(), True))))
    (frame,) = module.FrameDecoder().feed(chunk)  # immutable chunk, nothing pending: decoded in place
    record = frame.body.records[0]
    assert isinstance(record.operations[0].key, memoryview)
    assert record.operations[0].key.obj is chunk
    assert record.operations[0].value.obj is chunk
    assert record.request_id.obj is chunk
    assert record.raw.obj is chunk
    assert crc32c(record.raw) == record.crc
    assert record.id == RecordId("a", 7, 1)
    assert record.operations[1].is_delete
    assert frame.body.reconcile
    assert record.encoded.obj is chunk and bytes(record.encoded[8:]) == bytes(record.raw)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_views_survive_later_reads(module):
    """Frames handed out keep their bytes while the decoder moves on to fresh buffers."""
    decoder = module.FrameDecoder(receive_buffer_bytes=16 * 1024)
    kept = []
    for round_number in range(40):
        batch = sample_records(4, value_bytes=1000 + round_number)
        stream = encode(module, ("records", (round_number, batch, False)))
        for start in range(0, len(stream), 3000):
            piece = stream[start : start + 3000]
            target = decoder.get_buffer(-1)
            target[: len(piece)] = piece
            for frame in decoder.buffer_updated(len(piece)):
                kept.append((frame, batch))
    assert len(kept) == 40
    for frame, batch in kept:
        assert [record.materialise() for record in frame.body.records] == batch


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_large_values(module):
    big = Record(RecordId("b", 1, 1), 1, 1, b"", (Operation(b"k", bytes(range(256)) * 1024),))
    data = encode(module, ("records", (1, [big], False)))
    decoder = module.FrameDecoder(receive_buffer_bytes=64 * 1024)
    frames = []
    for start in range(0, len(data), 50_000):
        frames.extend(decoder.feed(data[start : start + 50_000]))
    assert [record.materialise() for record in frames[0].body.records] == [big]


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_stamp_link(module):
    data = encode(module, ("fields", (FrameType.HEARTBEAT, 4, struct.pack("<Q", 99))))
    module.encode_link_ack(data, 4)
    module.stamp_link(data, 56, 0, 17)
    module.stamp_link(data, 0, 12, 34)
    frames = module.FrameDecoder().feed(bytes(data))
    assert [(frame.link_seq, frame.link_ack) for frame in frames] == [(12, 34), (0, 17)]
    with pytest.raises(ValueError):
        module.stamp_link(data, 1, 1, 1)


def test_twins_agree_on_many_records_in_one_buffer():
    native_out, pure_out = bytearray(), bytearray()
    for epoch in range(30):
        native.encode_records(native_out, epoch, sample_records(20, 500))
        pure.encode_records(pure_out, epoch, sample_records(20, 500))
    assert native_out == pure_out


def test_public_module_picks_an_implementation():
    expected = "python" if extensions_disabled() else "cython"
    assert public.IMPLEMENTATION == expected
    assert public.FramingError is pure.FramingError


# --- hostile input --------------------------------------------------------------


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=4))
def test_random_bytes_are_never_accepted(module, data, cuts):
    decoder = module.FrameDecoder(frame_size_bytes_max=4096)
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    try:
        for start, end in zip(points, points[1:], strict=False):
            assert decoder.feed(data[start:end]) == []
    except pure.FramingError:
        pass


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@settings(max_examples=200, deadline=None)
@given(spec=frame_specs, position=st.integers(0, 10**6), replacement=st.integers(1, 255))
def test_mutated_frames_are_never_accepted(module, spec, position, replacement):
    data = bytearray(encode(module, spec))
    position %= len(data)
    data[position] ^= replacement  # a different byte
    with pytest.raises(pure.FramingError):
        module.FrameDecoder().feed(bytes(data))


@settings(max_examples=200, deadline=None)
@given(spec=frame_specs, position=st.integers(0, 10**6), noise=st.binary(min_size=1, max_size=16))
def test_twins_raise_the_same_error(spec, position, noise):
    data = bytearray(encode(pure, spec))
    position %= len(data)
    end = min(len(data), position + len(noise))
    assume(data[position:end] != noise[: end - position])
    data[position:end] = noise[: end - position]
    errors = []
    for module in (native, pure):
        with pytest.raises(pure.FramingError) as caught:
            module.FrameDecoder().feed(bytes(data))
        errors.append(type(caught.value))
    assert errors[0] is errors[1]


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@settings(max_examples=100, deadline=None)
@given(spec=frame_specs, keep=st.integers(0, 10**6))
def test_truncated_frame_returns_nothing(module, spec, keep):
    data = encode(module, spec)
    keep %= len(data)
    decoder = module.FrameDecoder()
    assert decoder.feed(bytes(data[:keep])) == []
    assert decoder.pending_bytes == keep


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (raw_frame(b"", magic=b"XPLF"), pure.BadMagic),
        (raw_frame(b"", version=1), pure.UnsupportedVersion),  # the release before
        (raw_frame(b"", version=3), pure.UnsupportedVersion),
        (raw_frame(b"", frame_type=0), pure.UnknownFrameType),
        (raw_frame(b"", frame_type=4), pure.UnknownFrameType),  # between the two code spaces
        (raw_frame(b"", frame_type=0x20), pure.UnknownFrameType),
        (raw_frame(b"x" * 5000), pure.FrameTooLarge),
        (raw_frame(b"", length=2**32 - 1), pure.FrameTooLarge),
        (raw_frame(b"", reserved=1), pure.MalformedFrame),
        (raw_frame(b"", flags=1), pure.MalformedFrame),
        (raw_frame(b"\x00"), pure.MalformedFrame),  # LINK_ACK has no payload
        (raw_frame(struct.pack("<I", 3), FrameType.RECORDS), pure.MalformedFrame),  # 3 records announced, none there
        (raw_frame(struct.pack("<QI", 1, 1), FrameType.RESYNC_DATA), pure.MalformedFrame),
        (raw_frame(struct.pack("<QBBH", 1, 5, 0, 0), FrameType.LINK_HELLO), pure.MalformedFrame),  # names past the end
        (raw_frame(struct.pack("<QBBH", 1, 1, 0, 0) + b"\xff", FrameType.LINK_HELLO), pure.MalformedFrame),  # not utf-8
        (raw_frame(struct.pack("<BBH", 1, 1, 0), FrameType.LINK_GOODBYE), pure.MalformedFrame),  # reserved
        (raw_frame(b"", flags=1, frame_type=FrameType.HEARTBEAT), pure.MalformedFrame),
        (raw_frame(struct.pack("<II", 1, 39) + bytes(8), FrameType.RECORDS), pure.MalformedFrame),
    ],
)
def test_typed_errors(module, frame, error):
    decoder = module.FrameDecoder(frame_size_bytes_max=4096)
    with pytest.raises(error):
        decoder.feed(frame)
    with pytest.raises(error):  # the decoder stays failed
        decoder.feed(raw_frame(b""))


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_checksum_errors(module):
    data = bytearray(encode(module, ("records", (1, sample_records(2), False))))
    data[-1] ^= 1
    with pytest.raises(pure.ChecksumMismatch):
        module.decode_frame(bytes(data))
    data = bytearray(encode(module, ("records", (1, sample_records(2), False))))
    data[30] ^= 1  # inside the header
    with pytest.raises(pure.ChecksumMismatch):
        module.FrameDecoder().feed(bytes(data))


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_record_crc_is_checked(module):
    """A frame whose payload CRC is right but a record's own CRC is wrong (a broken sender)."""
    data = bytearray(encode(module, ("records", (1, sample_records(1), False))))
    data[pure.HEADER_BYTES + 8] ^= 0xFF  # the record CRC field
    payload = bytes(data[pure.HEADER_BYTES :])
    frame = raw_frame(payload, FrameType.RECORDS, payload_crc=records_payload_crc(payload))
    with pytest.raises(pure.ChecksumMismatch, match="record CRC"):
        module.decode_frame(frame)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@settings(max_examples=30, deadline=None)
@given(items=st.lists(records, max_size=4), reconcile=st.booleans())
def test_records_payload_crc_is_a_chain(module, items, reconcile):
    data = encode(module, ("records", (1, items, reconcile)))
    payload = bytes(data[pure.HEADER_BYTES :])
    assert struct.unpack_from("<I", data, 12)[0] == records_payload_crc(payload)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_good_frames_before_a_bad_one_in_the_same_call_are_not_returned(module):
    good = encode(module, ("fields", (FrameType.HEARTBEAT, 1, struct.pack("<Q", 5))))
    bad = bytearray(encode(module, ("fields", (FrameType.HEARTBEAT, 1, struct.pack("<Q", 6)))))
    bad[-1] ^= 0x10
    decoder = module.FrameDecoder()
    with pytest.raises(pure.ChecksumMismatch):
        decoder.feed(bytes(good + bad))


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_local_errors_on_encode(module):
    out = bytearray(b"keep")
    with pytest.raises(ValueError):
        module.encode_fields(out, FrameType.HEARTBEAT, -1, b"")
    with pytest.raises(TypeError):
        module.encode_fields(out, FrameType.HEARTBEAT, "1", b"")
    with pytest.raises(ValueError):
        module.encode_fields(out, FrameType.RECORDS, 1, b"")  # the codec's own payload
    with pytest.raises(ValueError):
        module.encode_fields(out, FrameType.LINK_ACK, 1, b"")  # a link frame
    with pytest.raises(ValueError):
        module.encode_link_hello(out, 1, "p" * 300, "a", 1)
    with pytest.raises(ValueError):
        module.encode_link_goodbye(out, 1, 300, "")
    with pytest.raises(ValueError):
        module.encode_record(out, Record(RecordId("a", -1, 1), 1, 1, b"", ()))
    bad_record = Record(RecordId("a", -1, 1), 1, 1, b"", ())
    with pytest.raises(ValueError):
        module.encode_records(out, 1, [sample_records(1)[0], bad_record])
    with pytest.raises(TypeError):
        module.encode_link_ack(b"immutable", 1)
    assert out == b"keep"  # nothing half-written


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@FAST
@given(record=records)
def test_one_record_alone_is_what_the_frame_carries(module, record):
    alone = bytearray()
    size = module.encode_record(alone, record)
    assert size == len(alone)
    frame = encode(module, ("records", (1, [record], False)))
    assert bytes(frame[pure.HEADER_BYTES + 4 :]) == bytes(alone)
    view = module.decode_record(bytes(alone))
    assert view.materialise() == record and bytes(view.encoded) == bytes(alone)
    kept = view.materialise(keep_encoded=True)
    assert kept.wire == bytes(alone)
    again = bytearray()
    module.encode_record(again, kept)  # carried as it is
    assert again == alone
    with pytest.raises(pure.MalformedFrame):
        module.decode_record(bytes(alone) + b"\x00")
    changed = dataclasses.replace(kept, ts=(kept.ts + 1) % 2**64)  # its wire is another record's now
    with pytest.raises(ValueError, match="encoding of another record"):
        module.encode_record(bytearray(), changed)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_decoder_limits_are_checked(module):
    with pytest.raises(ValueError):
        module.FrameDecoder(frame_size_bytes_max=10)
    with pytest.raises(ValueError):
        module.FrameDecoder(receive_buffer_bytes=100)
