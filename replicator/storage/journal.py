"""The journal: the store's own write-ahead log, appended and fsynced off the event loop.

Why it exists (docs/storage.md has the measurements): rocksdict keeps the GIL
for the whole of `Rdict.write`, and a RocksDB write with the WAL on can block
for tens of milliseconds while another thread fsyncs that WAL (the kernel makes
an append to a page under writeback wait). That would stall the event loop
even for unsynced writes. So RocksDB runs with its WAL off (writes go to the
memtable only: microseconds, never disk I/O), and durability comes from this
journal, written with `os.writev` and made durable with `os.fdatasync`, both of
which release the GIL.

Format: files `journal-<number>.log` in the store's directory, numbered in
order. A file is a sequence of entries; an entry is one store write:

    header ">IIIQ": magic, body length, crc32c, sequence number
    body: mutations, each ">BII" (column family | 0x80 for a delete, key length,
          value length) + key + value
    crc32c covers the length, the sequence number and the body.

Sequence numbers are consecutive across files. Recovery reads every file in
order and stops at the first entry that is incomplete or fails its CRC, which
may only be in the last file (a torn tail: never acknowledged); anything else
is corruption and the store refuses to open.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator

from replicator.checksum import crc32c
from replicator.storage.errors import StorageFailed

MAGIC = 0x524A4E4C  # "RJNL"
HEADER = struct.Struct(">IIIQ")
HEADER_SIZE = HEADER.size  # 20
_LENGTH_SEQUENCE = struct.Struct(">IQ")
MUTATION_HEADER = struct.Struct(">BII")
DELETE_BIT = 0x80
ENTRY_BODY_SIZE_BYTES_MAX = 1 << 30
IOV_MAX = 1024
_FILE_NAME = re.compile(r"^journal-(\d{12})\.log$")

Mutation = tuple[int, bytes, bytes | None]


def file_name(number: int) -> str:
    return f"journal-{number:012d}.log"


def list_files(directory: str) -> list[tuple[int, str]]:
    """(number, path) of every journal file in `directory`, in order."""
    found = []
    for name in os.listdir(directory):
        match = _FILE_NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def encode_entry_parts(sequence: int, mutations: list[Mutation]) -> tuple[bytes, bytes]:
    """An entry as (header, body), to be written one after the other (writev: the body is not
    copied once more behind its header)."""
    parts: list[bytes] = []
    pack = MUTATION_HEADER.pack
    for column_family, key, value in mutations:
        if value is None:
            parts.append(pack(column_family | DELETE_BIT, len(key), 0))
            parts.append(key)
        else:
            parts.append(pack(column_family, len(key), len(value)))
            parts.append(key)
            parts.append(value)
    body = b"".join(parts)
    assert len(body) <= ENTRY_BODY_SIZE_BYTES_MAX, f"journal entry too large: {len(body)} bytes"
    checksum = crc32c(body, crc32c(_LENGTH_SEQUENCE.pack(len(body), sequence)))
    return HEADER.pack(MAGIC, len(body), checksum, sequence), body


def encode_entry(sequence: int, mutations: list[Mutation]) -> bytes:
    return b"".join(encode_entry_parts(sequence, mutations))


def decode_body(body: memoryview) -> list[Mutation]:
    mutations: list[Mutation] = []
    offset = 0
    size = MUTATION_HEADER.size
    while offset < len(body):
        flags, key_length, value_length = MUTATION_HEADER.unpack_from(body, offset)
        offset += size
        key = bytes(body[offset : offset + key_length])
        offset += key_length
        if flags & DELETE_BIT:
            mutations.append((flags & ~DELETE_BIT, key, None))
        else:
            mutations.append((flags, key, bytes(body[offset : offset + value_length])))
            offset += value_length
    assert offset == len(body), "journal entry body overran"
    return mutations


def read_entries(path: str) -> tuple[list[tuple[int, list[Mutation]]], bool]:
    """The whole entries of one file, and whether the file ended cleanly (no torn or bad tail)."""
    with open(path, "rb") as journal:
        data = journal.read()
    view = memoryview(data)
    entries: list[tuple[int, list[Mutation]]] = []
    offset = 0
    while offset + HEADER_SIZE <= len(data):
        magic, length, checksum, sequence = HEADER.unpack_from(data, offset)
        if magic != MAGIC or length > ENTRY_BODY_SIZE_BYTES_MAX or offset + HEADER_SIZE + length > len(data):
            return entries, False
        body = view[offset + HEADER_SIZE : offset + HEADER_SIZE + length]
        if crc32c(body, crc32c(_LENGTH_SEQUENCE.pack(length, sequence))) != checksum:
            return entries, False
        entries.append((sequence, decode_body(body)))
        offset += HEADER_SIZE + length
    return entries, offset == len(data)


def recover(directory: str) -> Iterator[tuple[int, list[Mutation]]]:
    """Every whole entry of every journal file, in order; raises StorageFailed on corruption that
    is not a torn tail of the last file, or on a gap in the sequence numbers."""
    files = list_files(directory)
    previous: int | None = None
    for index, (_, path) in enumerate(files):
        entries, clean = read_entries(path)
        if not clean and index != len(files) - 1:
            raise StorageFailed(f"journal {path!r} is corrupt before its end (not a torn tail); refusing to open")
        for sequence, mutations in entries:
            if previous is not None and sequence != previous + 1:
                raise StorageFailed(f"journal {path!r}: sequence {sequence} follows {previous}; refusing to open")
            previous = sequence
            yield sequence, mutations


def fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_all(descriptor: int, chunks: list[bytes]) -> int:
    """Write every chunk in order with writev (which releases the GIL); return the bytes written."""
    total = 0
    start = 0
    while start < len(chunks):
        group = chunks[start : start + IOV_MAX]
        expected = sum(len(chunk) for chunk in group)
        written = os.writev(descriptor, group)
        if written != expected:
            # A short write (rare on regular files): finish this group byte by byte.
            rest = b"".join(group)[written:]
            while rest:
                written_now = os.write(descriptor, rest)
                rest = rest[written_now:]
        total += expected
        start += IOV_MAX
    return total
