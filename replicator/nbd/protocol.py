"""The NBD wire protocol (fixed newstyle), as pure functions: no I/O.

Theory of operation: the server (server.py) reads fixed-size headers and
the payloads they announce from a stream and hands the bytes to the
`parse_*` functions here, which either return a frozen value or raise
`ProtocolError` (the client sent something malformed: the connection is
dropped, nothing is applied). Everything the server writes is built by the
`encode_*` functions. Numbers are big-endian, as the NBD specification
(doc/proto.md of the NBD project) says.

Only what this server speaks is here: the fixed newstyle handshake (no
oldstyle, no extended headers), simple and structured replies, the
`base:allocation` metadata context.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# ---- handshake
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERROR = 1 << 31
REP_ERR_UNSUP = _REP_ERROR + 1
REP_ERR_POLICY = _REP_ERROR + 2
REP_ERR_INVALID = _REP_ERROR + 3
REP_ERR_PLATFORM = _REP_ERROR + 4
REP_ERR_TLS_REQD = _REP_ERROR + 5
REP_ERR_UNKNOWN = _REP_ERROR + 6
REP_ERR_SHUTDOWN = _REP_ERROR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERROR + 8
REP_ERR_TOO_BIG = _REP_ERROR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---- transmission flags (per export)
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

# ---- requests
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# ---- errors (NBD's own numbers, which are Linux errno values)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # the context id this server gives base:allocation

STRING_BYTES_MAX = 4096  # the spec's bound on names and strings
OPTION_BYTES_MAX = 64 * 1024  # no option this server knows needs more

_HANDSHAKE = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")
_EXPORT_INFO = struct.Struct(">HQH")
_BLOCK_SIZE_INFO = struct.Struct(">HIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

OPTION_HEADER_BYTES = _OPTION_HEADER.size
REQUEST_BYTES = _REQUEST.size
CLIENT_FLAGS_BYTES = 4


class ProtocolError(Exception):
    """The peer sent something this protocol forbids: drop the connection."""


# ---------------------------------------------------------------- handshake


def encode_server_greeting() -> bytes:
    return _HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def parse_client_flags(data: bytes) -> int:
    assert len(data) == CLIENT_FLAGS_BYTES, len(data)
    (flags,) = _U32.unpack(data)
    if not flags & CLIENT_FLAG_FIXED_NEWSTYLE:
        raise ProtocolError("the client does not speak fixed newstyle negotiation")
    if flags & ~CLIENT_FLAGS_KNOWN:
        # The spec: a server that does not know a client flag MUST close the connection.
        raise ProtocolError(f"unknown client flags 0x{flags:08x}")
    return flags


@dataclass(frozen=True, slots=True)
class OptionHeader:
    option: int
    length: int


def parse_option_header(data: bytes) -> OptionHeader:
    assert len(data) == OPTION_HEADER_BYTES, len(data)
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic 0x{magic:016x}")
    if length > OPTION_BYTES_MAX:
        raise ProtocolError(f"option {option} carries {length} bytes, the limit is {OPTION_BYTES_MAX}")
    return OptionHeader(option, length)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def encode_option_error(option: int, reply: int, message: str) -> bytes:
    assert reply & _REP_ERROR, reply
    return encode_option_reply(option, reply, message.encode()[:STRING_BYTES_MAX])


def encode_server_entry(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + description.encode()


def encode_info_export(size: int, flags: int) -> bytes:
    return _EXPORT_INFO.pack(INFO_EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return _U16.pack(INFO_NAME) + name.encode()


def encode_info_description(text: str) -> bytes:
    return _U16.pack(INFO_DESCRIPTION) + text.encode()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    assert minimum & (minimum - 1) == 0 and minimum <= preferred <= maximum, (minimum, preferred, maximum)
    return _BLOCK_SIZE_INFO.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def encode_meta_context(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size and flags, then 124 zero bytes unless NO_ZEROES."""
    return _U64.pack(size) + _U16.pack(flags) + (b"" if no_zeroes else bytes(124))


class _Reader:
    """Reads fields from an option's data, raising ProtocolError when it runs short."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.position = 0
        self.what = what

    def take(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self.data):
            raise ProtocolError(f"{self.what}: {len(self.data)} bytes is too short")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def string(self) -> str:
        length = self.u32()
        if length > STRING_BYTES_MAX:
            raise ProtocolError(f"{self.what}: a string of {length} bytes, the limit is {STRING_BYTES_MAX}")
        raw = self.take(length)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: a string that is not UTF-8") from None
        if "\x00" in text:
            raise ProtocolError(f"{self.what}: a string with a NUL")
        return text

    def end(self) -> None:
        if self.position != len(self.data):
            raise ProtocolError(f"{self.what}: {len(self.data) - self.position} bytes left over")


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO: an export name and the information items asked for."""

    name: str
    requests: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    reader = _Reader(data, "NBD_OPT_INFO/GO")
    name = reader.string()
    count = reader.u16()
    requests = tuple(reader.u16() for _ in range(count))
    reader.end()
    return InfoRequest(name, requests)


def parse_export_name(data: bytes) -> str:
    if len(data) > STRING_BYTES_MAX:
        raise ProtocolError(f"NBD_OPT_EXPORT_NAME: a name of {len(data)} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ProtocolError("NBD_OPT_EXPORT_NAME: a name that is not UTF-8") from None
    if "\x00" in text:
        raise ProtocolError("NBD_OPT_EXPORT_NAME: a name with a NUL")
    return text


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    name: str
    queries: tuple[str, ...]


META_QUERIES_MAX = 128


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    reader = _Reader(data, "NBD_OPT_*_META_CONTEXT")
    name = reader.string()
    count = reader.u32()
    if count > META_QUERIES_MAX:
        raise ProtocolError(f"NBD_OPT_*_META_CONTEXT: {count} queries, the limit is {META_QUERIES_MAX}")
    queries = tuple(reader.string() for _ in range(count))
    reader.end()
    return MetaContextRequest(name, queries)


def matching_contexts(queries: tuple[str, ...], listing: bool) -> list[tuple[int, str]]:
    """The contexts this server has that match `queries` (LIST with no query, or "base:": all)."""
    if not queries:
        return [(BASE_ALLOCATION_ID, BASE_ALLOCATION)] if listing else []
    found: list[tuple[int, str]] = []
    for query in queries:
        hit = query == BASE_ALLOCATION or (listing and query == "base:")
        if hit and (BASE_ALLOCATION_ID, BASE_ALLOCATION) not in found:
            found.append((BASE_ALLOCATION_ID, BASE_ALLOCATION))
    return found


# ---------------------------------------------------------------- transmission


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int


def parse_request(data: bytes) -> Request:
    assert len(data) == REQUEST_BYTES, len(data)
    magic, flags, command, cookie, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:08x}")
    return Request(flags, command, cookie, offset, length)


def encode_request(request: Request) -> bytes:
    """The client side of a request header (the multipath endpoint and the tests send these)."""
    return _REQUEST.pack(
        REQUEST_MAGIC, request.flags, request.command, request.cookie, request.offset, request.length
    )


def encode_simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def encode_chunk_header(cookie: int, kind: int, payload: bytes, done: bool) -> bytes:
    return _STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie, len(payload))


def encode_read_chunk(cookie: int, offset: int, data: bytes) -> list[bytes]:
    """One OFFSET_DATA chunk with DONE, as pieces to write without copying `data`."""
    head = _STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(data)
    )
    return [head + _U64.pack(offset), data]


def encode_error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:STRING_BYTES_MAX]
    payload = _U32.pack(error) + _U16.pack(len(text)) + text
    return encode_chunk_header(cookie, REPLY_TYPE_ERROR, payload, done=True) + payload


def encode_done_chunk(cookie: int) -> bytes:
    return encode_chunk_header(cookie, REPLY_TYPE_NONE, b"", done=True)


def encode_block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    payload = _U32.pack(context_id) + b"".join(struct.pack(">II", length, flags) for length, flags in extents)
    return encode_chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, payload, done=True) + payload


def extents_from_allocation(allocated: list[bool], block_size: int, first: int, end: int) -> list[tuple[int, int]]:
    """Run-length encode per-block allocation into (length, flags) descriptors covering [first, end).

    `allocated[i]` is block i of the range that starts at the block holding
    `first`; the first and last descriptors are cut to the byte range asked.
    """
    extents: list[tuple[int, int]] = []
    start_block = first // block_size
    position = first
    index = 0
    while position < end and index < len(allocated):
        state = allocated[index]
        run_end_block = start_block + index
        while index < len(allocated) and allocated[index] == state:
            index += 1
            run_end_block += 1
        run_end = min(run_end_block * block_size, end)
        extents.append((run_end - position, 0 if state else STATE_HOLE | STATE_ZERO))
        position = run_end
    return extents


# ---------------------------------------------------------------- replies (client side)


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    structured: bool
    cookie: int
    error: int = 0  # simple replies
    flags: int = 0  # structured chunks
    kind: int = 0
    length: int = 0


SIMPLE_REPLY_BYTES = _SIMPLE_REPLY.size
STRUCTURED_REPLY_BYTES = _STRUCTURED_REPLY.size


def parse_reply_magic(data: bytes) -> int:
    (magic,) = _U32.unpack(data[:4])
    if magic not in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
        raise ProtocolError(f"bad reply magic 0x{magic:08x}")
    return int(magic)


def parse_simple_reply(data: bytes) -> ReplyHeader:
    magic, error, cookie = _SIMPLE_REPLY.unpack(data)
    assert magic == SIMPLE_REPLY_MAGIC, magic
    return ReplyHeader(False, cookie, error=error)


def parse_structured_reply(data: bytes) -> ReplyHeader:
    magic, flags, kind, cookie, length = _STRUCTURED_REPLY.unpack(data)
    assert magic == STRUCTURED_REPLY_MAGIC, magic
    return ReplyHeader(True, cookie, flags=flags, kind=kind, length=length)


def parse_option_reply(data: bytes) -> tuple[int, int, int]:
    """(option, reply type, length) of an option reply header."""
    magic, option, reply, length = _OPTION_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic 0x{magic:016x}")
    return option, reply, length


OPTION_REPLY_BYTES = _OPTION_REPLY.size


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_info_request(name: str, requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _U16.pack(len(requests)) + b"".join(_U16.pack(r) for r in requests)


def parse_info_reply(data: bytes) -> tuple[int, bytes]:
    """(info type, the rest) of an NBD_REP_INFO payload."""
    if len(data) < 2:
        raise ProtocolError("NBD_REP_INFO shorter than its type")
    return int(_U16.unpack(data[:2])[0]), data[2:]


def parse_export_info(body: bytes) -> tuple[int, int]:
    if len(body) != 10:
        raise ProtocolError("NBD_INFO_EXPORT of the wrong size")
    size, flags = struct.unpack(">QH", body)
    return int(size), int(flags)


def parse_block_size_info(body: bytes) -> tuple[int, int, int]:
    if len(body) != 12:
        raise ProtocolError("NBD_INFO_BLOCK_SIZE of the wrong size")
    minimum, preferred, maximum = struct.unpack(">III", body)
    return int(minimum), int(preferred), int(maximum)
