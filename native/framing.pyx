"""Log-shipping frame codec (native path). The format is in docs/wire.md.

The pure-Python twin is replicator/_pure/framing.py; replicator.framing picks
one of them. The definitions both share (errors, frame types, the decoded
frame bodies) live in the twin and are imported here, so both raise the same
exceptions and build the same frame objects. The per-record views are cdef
classes here, lazily decoded: a record's operations and request id become
Python objects only when asked for.

Encoding sizes the whole frame first, grows the caller's bytearray once and
writes every field and every key and value straight into it. Decoding reads
the receive buffer in place: keys, values and record bodies are memoryview
slices of it. The CRC32C calls go to the C function in crc32c.h, without the
GIL for large buffers.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8String, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from crc32c cimport crc32c_extend, crc32c_init

crc32c_init()


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Little-endian loads and stores at any alignment (docs/wire.md: every integer is little-endian). */
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define RF_SWAP16(v) __builtin_bswap16(v)
    #define RF_SWAP32(v) __builtin_bswap32(v)
    #define RF_SWAP64(v) __builtin_bswap64(v)
    #else
    #define RF_SWAP16(v) (v)
    #define RF_SWAP32(v) (v)
    #define RF_SWAP64(v) (v)
    #endif
    static inline uint16_t rf_load16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return RF_SWAP16(v); }
    static inline uint32_t rf_load32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return RF_SWAP32(v); }
    static inline uint64_t rf_load64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return RF_SWAP64(v); }
    static inline void rf_store16(unsigned char *p, uint16_t v) { v = RF_SWAP16(v); memcpy(p, &v, 2); }
    static inline void rf_store32(unsigned char *p, uint32_t v) { v = RF_SWAP32(v); memcpy(p, &v, 4); }
    static inline void rf_store64(unsigned char *p, uint64_t v) { v = RF_SWAP64(v); memcpy(p, &v, 8); }
    """
    uint16_t rf_load16(const unsigned char *p) nogil
    uint32_t rf_load32(const unsigned char *p) nogil
    uint64_t rf_load64(const unsigned char *p) nogil
    void rf_store16(unsigned char *p, uint16_t v) nogil
    void rf_store32(unsigned char *p, uint32_t v) nogil
    void rf_store64(unsigned char *p, uint64_t v) nogil

cdef extern from "Python.h":
    Py_buffer *PyMemoryView_GET_BUFFER(object view)
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_alloc

from replicator._pure.framing import (
    DELETE_LENGTH,
    FLAG_RECONCILE,
    FRAME_SIZE_BYTES_LIMIT,
    FRAME_SIZE_BYTES_MAX_DEFAULT,
    HEADER_BYTES,
    MAGIC,
    NAME_BYTES_MAX,
    PROTOCOL_VERSION,
    READ_BYTES_MIN,
    RECEIVE_BUFFER_BYTES_DEFAULT,
    RECORD_FIXED_BYTES,
    SEQUENCED_TYPES,
    SHORT_BYTES_MAX,
    U64_MAX,
    BadMagic,
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
from replicator.core.records import Operation, Record, RecordId, Versioned

IMPLEMENTATION = "cython"

DEF C_HEADER_BYTES = 48
DEF C_RECORD_FIXED_BYTES = 40
DEF C_DELETE_LENGTH = 0xFFFFFFFF
DEF C_FLAG_RECONCILE = 1
# The link's frames (docs/wire.md, "Frame types"): a code space of their own.
DEF T_LINK_HELLO = 0x01
DEF T_LINK_ACK = 0x02
DEF T_LINK_GOODBYE = 0x03
# The core's frames: one per core message (replicator/daemon/wire.py, SCHEMA); the codec parses
# RECORDS and RESYNC_DATA itself and hands the others' payload to the schema.
DEF T_CORE_FIRST = 0x10
DEF T_RECORDS = 0x11
DEF T_RESYNC_DATA = 0x1C
DEF T_CORE_LAST = 0x1F

# Below this many bytes a CRC is cheaper than dropping and retaking the GIL.
cdef Py_ssize_t GIL_RELEASE_BYTES_MIN = 65536
cdef const unsigned char *C_MAGIC = <const unsigned char *>b"RPLF"

# Frame types as Python objects, built once (None: not a frame type).
cdef tuple FRAME_TYPES = tuple([FrameType(value) if value in FrameType._value2member_map_ else None for value in range(256)])


cdef inline uint32_t _crc(const unsigned char *data, size_t length) noexcept:
    cdef uint32_t value
    if length >= <size_t>GIL_RELEASE_BYTES_MIN:
        with nogil:
            value = crc32c_extend(0, data, length)
        return value
    return crc32c_extend(0, data, length)


# --- argument checks (the same as the twin's) -------------------------------

cdef uint64_t _u64(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t converted
    if type(value) is int:
        # The fast path: an exact int converts in C; out of range raises as the twin does.
        try:
            converted = value
        except OverflowError:
            raise ValueError(f"{name} must be in 0..2**64-1, got {value}") from None
        return converted
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value > U64_MAX:
        raise ValueError(f"{name} must be in 0..2**64-1, got {value}")
    return <uint64_t>value


cdef uint64_t _small(object value, str name, uint64_t maximum) except? 0xFFFFFFFFFFFFFFFF:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value > maximum:
        raise ValueError(f"{name} must be in 0..{maximum}, got {value}")
    return <uint64_t>value


cdef bytes _name(object value, str name):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    cdef bytes encoded = PyUnicode_AsUTF8String(value)
    if PyBytes_GET_SIZE(encoded) > NAME_BYTES_MAX:
        raise ValueError(f"{name} must be at most {NAME_BYTES_MAX} utf-8 bytes, got {PyBytes_GET_SIZE(encoded)}")
    return encoded


cdef Py_ssize_t _length(object value, str name, Py_ssize_t maximum) except -1:
    """Byte length of a buffer (bytes without a buffer request), checked against maximum."""
    cdef Py_buffer view
    cdef Py_ssize_t length
    if PyBytes_CheckExact(value):
        length = PyBytes_GET_SIZE(value)
    else:
        PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
        length = view.len
        PyBuffer_Release(&view)
    if length > maximum:
        raise ValueError(f"{name} must be at most {maximum} bytes, got {length}")
    return length


# --- the output writer --------------------------------------------------------

cdef class _Writer:
    """Writes into a bytearray grown once to the frame's exact size.

    While it writes it holds a buffer export on the bytearray, so nothing can
    resize it under the raw pointer; every copy is bounds-checked against the
    size computed beforehand (a mismatch means a buffer changed size between
    the two passes: a bug in the caller, refused rather than overrun).
    """

    cdef object out
    cdef Py_buffer view
    cdef bint exported
    cdef Py_ssize_t start
    cdef Py_ssize_t position
    cdef Py_ssize_t end
    cdef unsigned char *data

    cdef int open(self, object out, Py_ssize_t size) except -1:
        if type(out) is not bytearray:
            raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
        self.out = out
        self.start = PyByteArray_GET_SIZE(out)
        if self.start + size >= (<PyByteArrayObject *>out).ob_alloc and self.start > 0:
            # CPython grows a bytearray to the exact size asked for when the jump is large,
            # so appending big frames one after another would copy the buffer every time.
            # Grow by half at least, then set the length (the allocation stays).
            PyByteArray_Resize(out, max(self.start + size, self.start + (self.start >> 1)))
        PyByteArray_Resize(out, self.start + size)
        PyObject_GetBuffer(out, &self.view, PyBUF_WRITABLE)
        self.exported = True
        self.data = <unsigned char *>self.view.buf
        self.position = self.start
        self.end = self.start + size
        return 0

    cdef int close(self, bint ok) except -1:
        if self.exported:
            PyBuffer_Release(&self.view)
            self.exported = False
        if not ok and self.out is not None:
            PyByteArray_Resize(self.out, self.start)
        return 0

    cdef inline unsigned char *reserve(self, Py_ssize_t length) except NULL:
        cdef unsigned char *at
        if length > self.end - self.position:
            raise RuntimeError("a buffer changed size while the frame was being encoded")
        at = self.data + self.position
        self.position += length
        return at

    cdef inline int put_buffer(self, object value) except -1:
        cdef Py_buffer view
        cdef unsigned char *at
        if PyBytes_CheckExact(value):
            at = self.reserve(PyBytes_GET_SIZE(value))
            memcpy(at, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
            return 0
        PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
        try:
            at = self.reserve(view.len)
            if view.len >= GIL_RELEASE_BYTES_MIN:
                with nogil:
                    memcpy(at, view.buf, view.len)
            else:
                memcpy(at, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int header(self, uint8_t frame_type, uint16_t flags, uint64_t epoch, bint crc_given=False, uint32_t payload_crc=0) except -1:
        """Fill in the header of the frame that starts at self.start.

        RECORDS frames pass their payload CRC (the chain of docs/wire.md); the
        others have it computed here over the whole payload.
        """
        assert self.position == self.end, "frame length on encode differs from the size computed"
        cdef unsigned char *h = self.data + self.start
        cdef Py_ssize_t payload_bytes = self.end - self.start - C_HEADER_BYTES
        memcpy(h, C_MAGIC, 4)
        h[4] = PROTOCOL_VERSION
        h[5] = frame_type
        rf_store16(h + 6, flags)
        rf_store32(h + 8, <uint32_t>payload_bytes)
        if not crc_given:
            payload_crc = _crc(h + C_HEADER_BYTES, payload_bytes)
        rf_store32(h + 12, payload_crc)
        rf_store64(h + 16, epoch)
        rf_store64(h + 24, 0)
        rf_store64(h + 32, 0)
        rf_store32(h + 40, 0)
        rf_store32(h + 44, crc32c_extend(0, h, C_HEADER_BYTES - 4))
        return 0


cdef inline Py_ssize_t _check_payload(Py_ssize_t payload_bytes) except -1:
    if payload_bytes > 0xFFFFFFFF:
        raise ValueError(f"frame payload of {payload_bytes} bytes exceeds the u32 length field")
    return payload_bytes


def stamp_link(frame, Py_ssize_t offset, link_seq, link_ack):
    """Write the link sequence number and acknowledgement into an encoded frame.

    Only the header CRC is recomputed: the payload CRC does not cover the header.
    """
    cdef uint64_t seq = _u64(link_seq, "link_seq")
    cdef uint64_t ack = _u64(link_ack, "link_ack")
    cdef Py_buffer view
    cdef unsigned char *h
    PyObject_GetBuffer(frame, &view, PyBUF_WRITABLE)
    try:
        if offset < 0 or offset + C_HEADER_BYTES > view.len or memcmp(<unsigned char *>view.buf + offset, C_MAGIC, 4) != 0:
            raise ValueError(f"no frame header at offset {offset}")
        h = <unsigned char *>view.buf + offset
        rf_store64(h + 24, seq)
        rf_store64(h + 32, ack)
        rf_store32(h + 44, crc32c_extend(0, h, C_HEADER_BYTES - 4))
    finally:
        PyBuffer_Release(&view)


def encode_link_hello(bytearray out, epoch, str pair_id, str site, incarnation, extras=b""):
    """The link's handshake frame: who sends (pair, site, incarnation) and the core's extras."""
    cdef uint64_t c_epoch = _u64(epoch, "epoch")
    cdef bytes pair = _name(pair_id, "pair_id")
    cdef bytes site_bytes = _name(site, "site")
    cdef Py_ssize_t extras_bytes = _length(extras, "extras", SHORT_BYTES_MAX)
    cdef uint64_t c_incarnation = _u64(incarnation, "incarnation")
    cdef Py_ssize_t size = C_HEADER_BYTES + 12 + len(pair) + len(site_bytes) + extras_bytes
    cdef _Writer writer = _Writer()
    cdef unsigned char *p
    cdef bint ok = False
    writer.open(out, size)
    try:
        writer.reserve(C_HEADER_BYTES)
        p = writer.reserve(12)
        rf_store64(p, c_incarnation)
        p[8] = <uint8_t>len(pair)
        p[9] = <uint8_t>len(site_bytes)
        rf_store16(p + 10, <uint16_t>extras_bytes)
        writer.put_buffer(pair)
        writer.put_buffer(site_bytes)
        writer.put_buffer(extras)
        writer.header(T_LINK_HELLO, 0, c_epoch)
        ok = True
    finally:
        writer.close(ok)
    return size


cdef Py_ssize_t _record_size(object record, list origin_cache) except -1:
    """Encoded size of one record, prefix included."""
    cdef object wire = getattr(record, "wire", None)
    if wire is not None:
        return _length(wire, "wire", 0xFFFFFFFF)
    cdef object record_id = record.id
    cdef Py_ssize_t size = 8 + C_RECORD_FIXED_BYTES
    cdef object operation, value
    cdef object operations = record.operations
    size += len(_cached_origin(record_id.origin, origin_cache))
    size += _length(record.request_id, "request_id", SHORT_BYTES_MAX)
    for operation in operations:
        size += 8 + _length(operation.key, "key", C_DELETE_LENGTH - 1)
        value = operation.value
        if value is not None:
            size += _length(value, "value", C_DELETE_LENGTH - 1)
    if size - 8 > 0xFFFFFFFF:
        raise ValueError(f"record of {size - 8} bytes exceeds the u32 length field")
    return size


cdef bytes _cached_origin(object origin, list cache):
    # Batches mostly hold one or two origins: remember the last encoding.
    if cache[0] is origin or cache[0] == origin:
        return cache[1]
    cdef bytes encoded = _name(origin, "origin")
    cache[0] = origin
    cache[1] = encoded
    return encoded


cdef uint32_t _write_record(_Writer writer, object record, list origin_cache, uint32_t payload_crc) except? 0:
    """Write one record; return the payload CRC extended over its prefix (length and CRC)."""
    cdef object wire = getattr(record, "wire", None)
    cdef Py_ssize_t wire_at
    cdef const unsigned char *fixed
    if wire is not None:
        # Encoded already (received from the peer, or read from the log): copied as it is, not re-encoded,
        # once its fixed fields are seen to be the record's (a record changed but not its wire is refused).
        wire_at = writer.position
        writer.put_buffer(wire)
        fixed = writer.data + wire_at + 8
        if (
            writer.position - wire_at < 8 + C_RECORD_FIXED_BYTES
            or rf_load64(fixed) != _u64(record.id.incarnation, "incarnation")
            or rf_load64(fixed + 8) != _u64(record.id.seq, "seq")
            or rf_load64(fixed + 16) != _u64(record.epoch, "epoch")
            or rf_load64(fixed + 24) != _u64(record.ts, "ts")
        ):
            raise ValueError(f"record {record.id} carries the encoding of another record")
        return crc32c_extend(payload_crc, writer.data + wire_at, 8)
    cdef object record_id = record.id
    cdef bytes origin = _cached_origin(record_id.origin, origin_cache)
    cdef object request_id = record.request_id
    cdef object operations = record.operations
    cdef object operation, value
    cdef Py_ssize_t prefix_at = writer.position
    cdef unsigned char *p
    cdef Py_ssize_t body_at, key_bytes, value_bytes
    cdef Py_ssize_t request_id_bytes = _length(request_id, "request_id", SHORT_BYTES_MAX)
    cdef uint64_t operation_count = _small(len(operations), "operation count", 0xFFFFFFFF)
    writer.reserve(8)
    body_at = writer.position
    p = writer.reserve(C_RECORD_FIXED_BYTES)
    rf_store64(p, _u64(record_id.incarnation, "incarnation"))
    rf_store64(p + 8, _u64(record_id.seq, "seq"))
    rf_store64(p + 16, _u64(record.epoch, "epoch"))
    rf_store64(p + 24, _u64(record.ts, "ts"))
    rf_store32(p + 32, <uint32_t>operation_count)
    rf_store16(p + 36, <uint16_t>request_id_bytes)
    p[38] = <uint8_t>len(origin)
    p[39] = 0
    writer.put_buffer(origin)
    writer.put_buffer(request_id)
    for operation in operations:
        value = operation.value
        key_bytes = _length(operation.key, "key", C_DELETE_LENGTH - 1)
        p = writer.reserve(8)
        rf_store32(p, <uint32_t>key_bytes)
        if value is None:
            rf_store32(p + 4, C_DELETE_LENGTH)
            writer.put_buffer(operation.key)
        else:
            value_bytes = _length(value, "value", C_DELETE_LENGTH - 1)
            rf_store32(p + 4, <uint32_t>value_bytes)
            writer.put_buffer(operation.key)
            writer.put_buffer(value)
    p = writer.data + prefix_at
    rf_store32(p, <uint32_t>(writer.position - body_at))
    rf_store32(p + 4, _crc(writer.data + body_at, writer.position - body_at))
    return crc32c_extend(payload_crc, p, 8)


def encode_records(bytearray out, epoch, records, reconcile=False):
    """Append one RECORDS frame. `records` are `Record`s (or `RecordView`s); `reconcile` marks a
    same-epoch reconcile's shipment (FLAG_RECONCILE)."""
    cdef uint64_t c_epoch = _u64(epoch, "epoch")
    cdef uint16_t flags = C_FLAG_RECONCILE if reconcile else 0
    cdef Py_ssize_t size = C_HEADER_BYTES + 4
    cdef list origin_cache = [None, None]
    cdef object record
    cdef _Writer writer
    cdef unsigned char *p
    cdef bint ok = False
    cdef uint32_t payload_crc
    if not isinstance(records, (list, tuple)):
        records = list(records)
    if len(records) > 0xFFFFFFFF:
        raise ValueError("too many records in one frame")
    for record in records:
        size += _record_size(record, origin_cache)
    _check_payload(size - C_HEADER_BYTES)
    writer = _Writer()
    writer.open(out, size)
    try:
        writer.reserve(C_HEADER_BYTES)
        p = writer.reserve(4)
        rf_store32(p, <uint32_t>len(records))
        # Each record body is covered by its own CRC; the payload CRC chains the rest (docs/wire.md).
        payload_crc = crc32c_extend(0, writer.data + writer.start + C_HEADER_BYTES, writer.position - writer.start - C_HEADER_BYTES)
        for record in records:
            payload_crc = _write_record(writer, record, origin_cache, payload_crc)
        writer.header(T_RECORDS, flags, c_epoch, True, payload_crc)
        ok = True
    finally:
        writer.close(ok)
    return size


def encode_record(bytearray out, record):
    """Append one record alone (u32 body length, u32 body CRC32C, body): the form a RECORDS frame
    carries it in and the log stores it in. Returns its size."""
    cdef list origin_cache = [None, None]
    cdef Py_ssize_t size = _record_size(record, origin_cache)
    cdef _Writer writer = _Writer()
    cdef bint ok = False
    writer.open(out, size)
    try:
        _write_record(writer, record, origin_cache, 0)
        assert writer.position == writer.end, "record length on encode differs from the size computed"
        ok = True
    finally:
        writer.close(ok)
    return size


def encode_resync_data(bytearray out, epoch, batch_seq, entries):
    """Append one RESYNC_DATA frame. `entries` are `Versioned` (or `VersionedView`)."""
    cdef uint64_t c_epoch = _u64(epoch, "epoch")
    cdef uint64_t c_batch_seq = _u64(batch_seq, "batch_seq")
    cdef Py_ssize_t size = C_HEADER_BYTES + 12
    cdef object entry, value
    cdef _Writer writer
    cdef unsigned char *p
    cdef bint ok = False
    if not isinstance(entries, (list, tuple)):
        entries = list(entries)
    if len(entries) > 0xFFFFFFFF:
        raise ValueError("too many entries in one frame")
    for entry in entries:
        size += 16 + _length(entry.key, "key", C_DELETE_LENGTH - 1)
        _u64(entry.ts, "ts")
        value = entry.value
        if value is not None:
            size += _length(value, "value", C_DELETE_LENGTH - 1)
    _check_payload(size - C_HEADER_BYTES)
    writer = _Writer()
    writer.open(out, size)
    try:
        writer.reserve(C_HEADER_BYTES)
        p = writer.reserve(12)
        rf_store64(p, c_batch_seq)
        rf_store32(p + 8, <uint32_t>len(entries))
        for entry in entries:
            value = entry.value
            p = writer.reserve(16)
            rf_store64(p, _u64(entry.ts, "ts"))
            rf_store32(p + 8, <uint32_t>_length(entry.key, "key", C_DELETE_LENGTH - 1))
            if value is None:
                rf_store32(p + 12, C_DELETE_LENGTH)
                writer.put_buffer(entry.key)
            else:
                rf_store32(p + 12, <uint32_t>_length(value, "value", C_DELETE_LENGTH - 1))
                writer.put_buffer(entry.key)
                writer.put_buffer(value)
        writer.header(T_RESYNC_DATA, 0, c_epoch)
        ok = True
    finally:
        writer.close(ok)
    return size


def encode_fields(bytearray out, frame_type, epoch, payload):
    """Append one frame of a core message whose payload the schema laid out (daemon/wire.py)."""
    cdef uint64_t c_epoch = _u64(epoch, "epoch")
    cdef int code = int(frame_type)
    if code < T_CORE_FIRST or code > T_CORE_LAST or code == T_RECORDS or code == T_RESYNC_DATA:
        raise ValueError(f"frame type {frame_type!r} is not a schema frame type")
    cdef Py_ssize_t payload_bytes = _length(payload, "payload", 0xFFFFFFFF)
    cdef Py_ssize_t size = C_HEADER_BYTES + payload_bytes
    cdef _Writer writer = _Writer()
    cdef bint ok = False
    writer.open(out, size)
    try:
        writer.reserve(C_HEADER_BYTES)
        writer.put_buffer(payload)
        writer.header(<uint8_t>code, 0, c_epoch)
        ok = True
    finally:
        writer.close(ok)
    return size


def encode_link_goodbye(bytearray out, epoch, reason, message=""):
    """The link's own GOODBYE (its reason codes: replicator/transport/link.py)."""
    cdef uint64_t c_epoch = _u64(epoch, "epoch")
    if not isinstance(message, str):
        raise TypeError(f"message must be a str, not {type(message).__name__}")
    cdef bytes message_bytes = PyUnicode_AsUTF8String(message)
    if len(message_bytes) > SHORT_BYTES_MAX:
        raise ValueError(f"message must be at most {SHORT_BYTES_MAX} utf-8 bytes")
    cdef uint8_t c_reason = <uint8_t>_small(reason, "reason", 255)
    cdef Py_ssize_t size = C_HEADER_BYTES + 4 + len(message_bytes)
    cdef _Writer writer = _Writer()
    cdef unsigned char *p
    cdef bint ok = False
    writer.open(out, size)
    try:
        writer.reserve(C_HEADER_BYTES)
        p = writer.reserve(4)
        p[0] = c_reason
        p[1] = 0
        rf_store16(p + 2, <uint16_t>len(message_bytes))
        writer.put_buffer(message_bytes)
        writer.header(T_LINK_GOODBYE, 0, c_epoch)
        ok = True
    finally:
        writer.close(ok)
    return size


def encode_link_ack(bytearray out, epoch):
    """An empty frame whose header carries the link acknowledgement (and keeps the connection alive)."""
    cdef uint64_t c_epoch = _u64(epoch, "epoch")
    cdef _Writer writer = _Writer()
    cdef bint ok = False
    writer.open(out, C_HEADER_BYTES)
    try:
        writer.reserve(C_HEADER_BYTES)
        writer.header(T_LINK_ACK, 0, c_epoch)
        ok = True
    finally:
        writer.close(ok)
    return C_HEADER_BYTES


# --- decoded views ------------------------------------------------------------

cdef class OperationView:
    """One operation of a decoded record: views into the receive buffer."""

    cdef readonly object key
    cdef readonly object value

    @property
    def is_delete(self):
        return self.value is None

    def materialise(self):
        return Operation(bytes(self.key), None if self.value is None else bytes(self.value))

    def __repr__(self):
        return f"OperationView(key={bytes(self.key)!r}, value_bytes={None if self.value is None else len(self.value)})"


cdef class RecordView:
    """A decoded record. `raw` is the record body as sent and `crc` its CRC32C.

    Only the fixed fields are read at decode time (after the whole body has
    been checked); the request id and the operations are sliced out of the
    receive buffer on first access.
    """

    cdef readonly str origin
    cdef readonly uint64_t incarnation
    cdef readonly uint64_t seq
    cdef readonly uint64_t epoch
    cdef readonly uint64_t ts
    cdef readonly uint32_t crc
    cdef object _base  # memoryview of the whole receive buffer
    cdef Py_ssize_t _body_at
    cdef Py_ssize_t _body_bytes
    cdef Py_ssize_t _request_id_at
    cdef Py_ssize_t _request_id_bytes
    cdef Py_ssize_t _operations_at
    cdef uint32_t _operation_count
    cdef object _operations

    @property
    def id(self):
        return RecordId(self.origin, self.incarnation, self.seq)

    @property
    def raw(self):
        return self._base[self._body_at : self._body_at + self._body_bytes]

    @property
    def request_id(self):
        return self._base[self._request_id_at : self._request_id_at + self._request_id_bytes]

    @property
    def operations(self):
        if self._operations is None:
            self._operations = self._slice_operations()
        return self._operations

    cdef tuple _slice_operations(self):
        cdef const unsigned char *base = <const unsigned char *>PyMemoryView_GET_BUFFER(self._base).buf
        cdef Py_ssize_t position = self._operations_at
        cdef uint32_t index, key_bytes, value_bytes
        cdef OperationView operation
        cdef list items = []
        for index in range(self._operation_count):
            # Checked at decode time: every length here lies inside the body.
            key_bytes = rf_load32(base + position)
            value_bytes = rf_load32(base + position + 4)
            position += 8
            operation = OperationView.__new__(OperationView)
            operation.key = self._base[position : position + key_bytes]
            position += key_bytes
            if value_bytes == C_DELETE_LENGTH:
                operation.value = None
            else:
                operation.value = self._base[position : position + value_bytes]
                position += value_bytes
            items.append(operation)
        assert position == self._body_at + self._body_bytes
        return tuple(items)

    @property
    def encoded(self):
        """The record as it came: prefix (u32 body length, u32 body CRC32C) and body."""
        return self._base[self._body_at - 8 : self._body_at + self._body_bytes]

    def materialise(self, bint keep_encoded=False):
        """A `Record` holding bytes copies: safe to keep after the receive buffer is gone. With
        `keep_encoded`, it carries its encoded form (`Record.wire`), which the log stores as it is."""
        return Record(
            RecordId(self.origin, self.incarnation, self.seq),
            self.epoch,
            self.ts,
            bytes(self.request_id),
            tuple([operation.materialise() for operation in self.operations]),
            bytes(self.encoded) if keep_encoded else None,
        )

    def __repr__(self):
        return f"RecordView({self.origin!r}, {self.incarnation}, {self.seq}, operations={self._operation_count})"


cdef class VersionedView:
    """A decoded resync entry: key and value are views into the receive buffer."""

    cdef readonly object key
    cdef readonly uint64_t ts
    cdef readonly object value

    def materialise(self):
        return Versioned(bytes(self.key), self.ts, None if self.value is None else bytes(self.value))

    def __repr__(self):
        return f"VersionedView(key={bytes(self.key)!r}, ts={self.ts})"


# --- decoding -----------------------------------------------------------------

cdef struct Header:
    Py_ssize_t total
    uint8_t frame_type
    uint16_t flags
    uint32_t payload_crc
    uint64_t epoch
    uint64_t link_seq
    uint64_t link_ack


cdef int _parse_header(const unsigned char *h, Py_ssize_t frame_size_bytes_max, Header *header) except -1:
    cdef uint16_t allowed
    if memcmp(h, C_MAGIC, 4) != 0:
        raise BadMagic(f"bad magic {PyBytes_FromStringAndSize(<const char *>h, 4)!r}")
    if crc32c_extend(0, h, C_HEADER_BYTES - 4) != rf_load32(h + 44):
        raise ChecksumMismatch("header CRC mismatch")
    if h[4] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {h[4]}, this end speaks {PROTOCOL_VERSION}")
    if FRAME_TYPES[h[5]] is None:
        raise UnknownFrameType(f"unknown frame type {h[5]}")
    header.total = C_HEADER_BYTES + <Py_ssize_t>rf_load32(h + 8)
    if header.total > frame_size_bytes_max:
        raise FrameTooLarge(f"frame of {header.total} bytes exceeds the maximum of {frame_size_bytes_max}")
    if rf_load32(h + 40) != 0:
        raise MalformedFrame("reserved header field is not zero")
    header.frame_type = h[5]
    header.flags = rf_load16(h + 6)
    allowed = C_FLAG_RECONCILE if header.frame_type == T_RECORDS else 0
    if header.flags & ~allowed:
        raise MalformedFrame(f"flags {header.flags:#x} not valid for frame type {header.frame_type}")
    header.payload_crc = rf_load32(h + 12)
    header.epoch = rf_load64(h + 16)
    header.link_seq = rf_load64(h + 24)
    header.link_ack = rf_load64(h + 32)
    return 0


cdef inline int _need(Py_ssize_t position, Py_ssize_t length, Py_ssize_t end) except -1:
    if length > end - position:
        raise MalformedFrame("length runs past the end of the frame")
    return 0


cdef inline int _finish(Py_ssize_t position, Py_ssize_t end) except -1:
    if position != end:
        raise MalformedFrame(f"{end - position} unexpected bytes at the end")
    return 0


cdef str _utf8(const unsigned char *data, Py_ssize_t length, str what):
    try:
        return PyUnicode_DecodeUTF8(<const char *>data, length, NULL)
    except UnicodeDecodeError as error:
        raise MalformedFrame(f"{what} is not valid utf-8") from error


cdef class _Origins:
    """The last origin decoded (batches mostly hold one or two origins)."""

    cdef unsigned char data[256]
    cdef Py_ssize_t length
    cdef str text

    def __cinit__(self):
        self.length = -1


cdef RecordView _record_at(object base_view, const unsigned char *base, Py_ssize_t position, Py_ssize_t end, _Origins origins):
    """The record whose prefix (u32 body length, u32 body CRC) is at `position`; its body ends by `end`."""
    cdef uint32_t operation_count, operation, key_bytes, value_bytes, body_crc
    cdef Py_ssize_t body_bytes, body_at, body_end, cursor
    cdef uint16_t request_id_bytes
    cdef uint8_t origin_bytes
    cdef const unsigned char *fixed
    cdef RecordView record
    _need(position, 8, end)
    body_bytes = rf_load32(base + position)
    body_crc = rf_load32(base + position + 4)
    position += 8
    if body_bytes < C_RECORD_FIXED_BYTES:
        raise MalformedFrame(f"record body of {body_bytes} bytes is shorter than its fixed part")
    _need(position, body_bytes, end)
    body_at = position
    body_end = position + body_bytes
    if _crc(base + body_at, body_bytes) != body_crc:
        raise ChecksumMismatch("record CRC mismatch")
    fixed = base + body_at
    operation_count = rf_load32(fixed + 32)
    request_id_bytes = rf_load16(fixed + 36)
    origin_bytes = fixed[38]
    if fixed[39] != 0:
        raise MalformedFrame("reserved record field is not zero")
    cursor = body_at + C_RECORD_FIXED_BYTES
    _need(cursor, origin_bytes, body_end)
    if origin_bytes != origins.length or memcmp(origins.data, base + cursor, origin_bytes) != 0:
        origins.text = _utf8(base + cursor, origin_bytes, "origin")
        memcpy(origins.data, base + cursor, origin_bytes)
        origins.length = origin_bytes
    cursor += origin_bytes
    _need(cursor, request_id_bytes, body_end)
    record = RecordView.__new__(RecordView)
    record._request_id_at = cursor
    cursor += request_id_bytes
    record._operations_at = cursor
    for operation in range(operation_count):
        _need(cursor, 8, body_end)
        key_bytes = rf_load32(base + cursor)
        value_bytes = rf_load32(base + cursor + 4)
        cursor += 8
        _need(cursor, key_bytes, body_end)
        cursor += key_bytes
        if value_bytes != C_DELETE_LENGTH:
            _need(cursor, value_bytes, body_end)
            cursor += value_bytes
    _finish(cursor, body_end)
    record.origin = origins.text
    record.incarnation = rf_load64(fixed)
    record.seq = rf_load64(fixed + 8)
    record.epoch = rf_load64(fixed + 16)
    record.ts = rf_load64(fixed + 24)
    record.crc = body_crc
    record._base = base_view
    record._body_at = body_at
    record._body_bytes = body_bytes
    record._request_id_bytes = request_id_bytes
    record._operation_count = operation_count
    return record


cdef object _decode_records(object base_view, const unsigned char *base, Py_ssize_t position, Py_ssize_t end, uint16_t flags, uint32_t payload_crc):
    cdef uint32_t count, index
    cdef RecordView record
    cdef list records = []
    cdef _Origins origins = _Origins()
    cdef Py_ssize_t payload_at = position
    cdef uint32_t chain
    _need(position, 4, end)
    count = rf_load32(base + position)
    position += 4
    chain = crc32c_extend(0, base + payload_at, position - payload_at)
    for index in range(count):
        _need(position, 8, end)
        chain = crc32c_extend(chain, base + position, 8)
        record = _record_at(base_view, base, position, end, origins)
        position = record._body_at + record._body_bytes
        records.append(record)
    _finish(position, end)
    if chain != payload_crc:
        raise ChecksumMismatch("payload CRC mismatch")
    return RecordBatch(tuple(records), bool(flags & C_FLAG_RECONCILE))


def decode_record(data):
    """Decode exactly one record as `encode_record` wrote it (prefix and body; views into `data`).
    The log stores records in this form (docs/storage.md)."""
    cdef object view = _byte_view(data)
    cdef Py_buffer *buffer = PyMemoryView_GET_BUFFER(view)
    cdef RecordView record = _record_at(view, <const unsigned char *>buffer.buf, 0, buffer.len, _Origins())
    _finish(record._body_at + record._body_bytes, buffer.len)
    return record


cdef object _decode_body(object base_view, const unsigned char *base, Py_ssize_t position, Py_ssize_t end, uint8_t frame_type, uint16_t flags, uint32_t payload_crc):
    cdef uint8_t name_bytes, site_bytes
    cdef uint16_t extras_bytes
    cdef uint32_t count, index, key_bytes, value_bytes
    cdef uint64_t ts
    cdef str pair_id, site
    cdef list entries
    cdef VersionedView entry
    cdef const unsigned char *p
    if frame_type == T_RECORDS:
        return _decode_records(base_view, base, position, end, flags, payload_crc)
    if frame_type == T_RESYNC_DATA:
        _need(position, 12, end)
        p = base + position
        batch_seq = rf_load64(p)
        count = rf_load32(p + 8)
        position += 12
        entries = []
        for index in range(count):
            _need(position, 16, end)
            ts = rf_load64(base + position)
            key_bytes = rf_load32(base + position + 8)
            value_bytes = rf_load32(base + position + 12)
            position += 16
            _need(position, key_bytes, end)
            entry = VersionedView.__new__(VersionedView)
            entry.key = base_view[position : position + key_bytes]
            entry.ts = ts
            position += key_bytes
            if value_bytes == C_DELETE_LENGTH:
                entry.value = None
            else:
                _need(position, value_bytes, end)
                entry.value = base_view[position : position + value_bytes]
                position += value_bytes
            entries.append(entry)
        _finish(position, end)
        return ResyncData(batch_seq, tuple(entries))
    if frame_type >= T_CORE_FIRST:
        # A core message laid out by the schema (daemon/wire.py): its payload, checked by its CRC.
        return Fields(PyBytes_FromStringAndSize(<const char *>base + position, end - position))
    if frame_type == T_LINK_HELLO:
        _need(position, 12, end)
        p = base + position
        name_bytes = p[8]
        site_bytes = p[9]
        extras_bytes = rf_load16(p + 10)
        position += 12
        _need(position, name_bytes, end)
        pair_id = _utf8(base + position, name_bytes, "pair id")
        position += name_bytes
        _need(position, site_bytes, end)
        site = _utf8(base + position, site_bytes, "site")
        position += site_bytes
        _need(position, extras_bytes, end)
        extras = PyBytes_FromStringAndSize(<const char *>base + position, extras_bytes)
        position += extras_bytes
        _finish(position, end)
        return LinkHello(pair_id, site, rf_load64(p), extras)
    if frame_type == T_LINK_GOODBYE:
        _need(position, 4, end)
        p = base + position
        if p[1] != 0:
            raise MalformedFrame("reserved goodbye field is not zero")
        extras_bytes = rf_load16(p + 2)
        position += 4
        _need(position, extras_bytes, end)
        message = _utf8(base + position, extras_bytes, "goodbye message")
        position += extras_bytes
        _finish(position, end)
        return Goodbye(p[0], message)
    assert frame_type == T_LINK_ACK, frame_type  # _parse_header refused every other type
    _finish(position, end)
    return None


cdef object _decode_at(object base_view, const unsigned char *base, Py_ssize_t offset, Header *header):
    # RECORDS frames check their CRC chain while they are walked (docs/wire.md); the others here.
    if header.frame_type != T_RECORDS and _crc(base + offset + C_HEADER_BYTES, header.total - C_HEADER_BYTES) != header.payload_crc:
        raise ChecksumMismatch("payload CRC mismatch")
    body = _decode_body(base_view, base, offset + C_HEADER_BYTES, offset + header.total, header.frame_type, header.flags, header.payload_crc)
    return Frame(FRAME_TYPES[header.frame_type], header.epoch, header.link_seq, header.link_ack, header.total, body)


cdef Py_ssize_t _check_frame_size_max(object frame_size_bytes_max) except -1:
    if not isinstance(frame_size_bytes_max, int):
        raise TypeError("frame_size_bytes_max must be an int")
    if frame_size_bytes_max < HEADER_BYTES or frame_size_bytes_max > FRAME_SIZE_BYTES_LIMIT:
        raise ValueError(f"frame_size_bytes_max must be in {HEADER_BYTES}..{FRAME_SIZE_BYTES_LIMIT}")
    return frame_size_bytes_max


cdef object _byte_view(object data):
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if not view.c_contiguous:
        raise BufferError("the frame must be a contiguous buffer")
    return view


def decode_frame(data, frame_size_bytes_max=FRAME_SIZE_BYTES_MAX_DEFAULT):
    """Decode exactly one frame that fills `data` (views point into `data`)."""
    cdef Py_ssize_t maximum = _check_frame_size_max(frame_size_bytes_max)
    cdef object view = _byte_view(data)
    cdef Py_buffer *buffer = PyMemoryView_GET_BUFFER(view)
    cdef Header header
    if buffer.len < C_HEADER_BYTES:
        raise MalformedFrame(f"{buffer.len} bytes is shorter than a frame header")
    _parse_header(<const unsigned char *>buffer.buf, maximum, &header)
    if header.total != buffer.len:
        raise MalformedFrame(f"frame length {header.total} but {buffer.len} bytes given")
    return _decode_at(view, <const unsigned char *>buffer.buf, 0, &header)


cdef class FrameDecoder:
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

    cdef Py_ssize_t _frame_size_bytes_max
    cdef Py_ssize_t _receive_buffer_bytes
    cdef object _view  # memoryview of the current receive buffer (a bytearray)
    cdef unsigned char *_data
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Header _header
    cdef bint _header_known
    cdef object _failed

    def __init__(self, frame_size_bytes_max=FRAME_SIZE_BYTES_MAX_DEFAULT, receive_buffer_bytes=RECEIVE_BUFFER_BYTES_DEFAULT):
        self._frame_size_bytes_max = _check_frame_size_max(frame_size_bytes_max)
        if not isinstance(receive_buffer_bytes, int) or receive_buffer_bytes < READ_BYTES_MIN:
            raise ValueError(f"receive_buffer_bytes must be an int of at least {READ_BYTES_MIN}")
        self._receive_buffer_bytes = receive_buffer_bytes
        self._replace_buffer(receive_buffer_bytes)
        self._header_known = False
        self._failed = None

    cdef int _replace_buffer(self, Py_ssize_t capacity) except -1:
        # A fresh bytearray: the old one may be referenced by frames already handed out.
        cdef bytearray fresh = PyByteArray_FromStringAndSize(NULL, capacity)
        cdef unsigned char *data = <unsigned char *>PyByteArray_AS_STRING(fresh)
        cdef Py_ssize_t pending = self._end - self._start
        if pending:
            memcpy(data, self._data + self._start, pending)
        self._view = memoryview(fresh)
        self._data = data
        self._capacity = capacity
        self._start = 0
        self._end = pending
        return 0

    @property
    def frame_size_bytes_max(self):
        return self._frame_size_bytes_max

    @property
    def pending_bytes(self):
        """Bytes received that do not yet form a whole frame."""
        return self._end - self._start

    cdef int _make_room(self) except -1:
        cdef Py_ssize_t required
        cdef bint move
        if self._header_known:
            # The frame's length is known (and checked): it must fit whole, so that it is one view.
            required = self._header.total
            move = self._start + required > self._capacity
        else:
            required = C_HEADER_BYTES
            move = self._capacity - self._end < READ_BYTES_MIN
        if move:
            self._replace_buffer(max(self._receive_buffer_bytes, required + READ_BYTES_MIN))
        return 0

    def get_buffer(self, Py_ssize_t size_hint=-1):
        """The free tail of the receive buffer, to be filled then reported by buffer_updated."""
        if self._failed is not None:
            raise self._failed
        self._make_room()
        return self._view[self._end :]

    def buffer_updated(self, Py_ssize_t nbytes):
        """`nbytes` were written into the buffer from get_buffer: return the frames completed."""
        if self._failed is not None:
            raise self._failed
        if nbytes < 0 or nbytes > self._capacity - self._end:
            raise ValueError(f"buffer_updated({nbytes}) beyond the buffer handed out")
        self._end += nbytes
        cdef list frames = []
        try:
            self._drain(frames)
        except FramingError as error:
            self._failed = error
            raise
        return frames

    def feed(self, data):
        """Take a chunk of the stream (any bytes-like object) and return the frames it completes."""
        if self._failed is not None:
            raise self._failed
        cdef list frames = []
        cdef Py_buffer chunk
        cdef const unsigned char *source
        cdef Py_ssize_t length, position = 0, count
        cdef Header header
        cdef object view
        PyObject_GetBuffer(data, &chunk, PyBUF_SIMPLE)
        try:
            source = <const unsigned char *>chunk.buf
            length = chunk.len
            if self._end == self._start and PyBytes_CheckExact(data):
                # Nothing pending and an immutable chunk: decode straight from it.
                view = memoryview(data)
                while length - position >= C_HEADER_BYTES:
                    _parse_header(source + position, self._frame_size_bytes_max, &header)
                    if length - position < header.total:
                        break
                    frames.append(_decode_at(view, source, position, &header))
                    position += header.total
            while position < length:
                self._make_room()
                count = min(self._capacity - self._end, length - position)
                memcpy(self._data + self._end, source + position, count)
                position += count
                self._end += count
                self._drain(frames)
        except FramingError as error:
            self._failed = error
            raise
        finally:
            PyBuffer_Release(&chunk)
        return frames

    cdef int _drain(self, list frames) except -1:
        cdef Py_ssize_t available
        while True:
            available = self._end - self._start
            if not self._header_known:
                if available < C_HEADER_BYTES:
                    return 0
                _parse_header(self._data + self._start, self._frame_size_bytes_max, &self._header)
                self._header_known = True
            if available < self._header.total:
                return 0
            frames.append(_decode_at(self._view, self._data, self._start, &self._header))
            self._start += self._header.total
            self._header_known = False
