"""Objects of any size as keys of the site's one replicated keyspace: pieces, manifests, garbage.

Shared by the S3 front-end (replicator/s3/store.py adds buckets' listing and
multipart uploads on top) and the gRPC object API's large-object calls
(replicator/api/objects.py: PutLarge, GetLarge, HeadLarge, DeleteLarge), so an
object written through one is read through the other.

Theory of operation. Nothing here touches storage: every datum is an opaque
key written and read through the site's `SiteBackend` (the one write path), so
replication, fencing, leases and linearizable reads hold as for the rest.
Keys (all under b"s", beside the small-object API's b"o" objects):

    bucket    b"sB" + bucket                                 -> JSON {created_ms}
    object    b"sO" + bucket + NUL + key                     -> manifest (below)
    piece     b"sD" + data_id(16) + u32be(index)             -> <= piece_bytes of an object's body
    owner     b"sP" + data_id(16)                            -> JSON {b, k, u, n, t}: who may reference the pieces
    upload    b"sU" + bucket + NUL + key + NUL + upload_id   -> JSON {created_ms, headers, meta}
    part      b"sQ" + upload_id(16) + u32be(part_number)     -> JSON {size, md5, data, piece_bytes, mtime_ms}

Three sizes of body, three layouts, each put atomic (a record is visible
anywhere only once durable at both sites, so the object appears whole at both
or not at all):

- up to `inline_bytes_max` (16 KiB): inline in its manifest. One key, one
  read for a GET; a HEAD or a listing reads the body too, which at this size
  costs less than a GET's second read would.
- up to `piece_bytes` (1 MiB): ONE piece under a fresh random `data_id`,
  written in the same record as its owner record and the manifest naming it.
  The manifest stays small, so a HEAD, a listing, an overwrite's or a
  delete's look at the old manifest and the sweep's `_referenced` read no
  body; a GET reads the manifest, then the piece. One record, as the inline
  layout was: nothing is written before the manifest, so a put that fails or
  crashes leaves no garbage, and a duplicate (a retried request id) writes
  nothing at all.
- larger: cut into pieces under a fresh `data_id`, several in flight; the
  manifest naming the data id is written LAST, in one record.

The threshold weighs a GET's second read against what an inline body adds
to every HEAD, listing entry and overwrite (reading, checking and copying
it). Measured on a pair (docs/performance.md, "The S3 1 MiB GET, profiled"):
the second read adds about 0.4 ms to a GET, an inline body about 1.1 us per
KiB to a HEAD, so for GETs alone the break-even is a few hundred KiB; 16 KiB
keeps what HEADs and listings pay for inline bodies near 1 % of a HEAD while
the smallest objects (most of a typical bucket by count) stay one read.

Old data. Up to this layout every body up to `piece_bytes` was inline; such
manifests are the same format (M1, below) and are read, listed, overwritten,
deleted and swept as before, forever; they only keep costing their whole
body on a HEAD or a listing until rewritten. The format is unchanged, only
the choice of layout is, so a site running the earlier code reads objects
the new code wrote, and the reverse (a pair can be upgraded a site at a time).

Garbage. Before its first piece (or in the same record, for a one-piece
body), every data id gets an *owner* record that names the only places that
may ever reference it: the manifest of bucket/key or the part record
(upload, number). Pieces whose owner no longer references them are garbage.
They are freed at once when we know it (the object was overwritten or
deleted, an upload aborted, a put failed or was a duplicate of one already
applied) and a sweep (`collect_garbage`, run periodically by the S3 server,
or by the gRPC server when S3 is off) frees the rest: pieces of a put cut
short by a crash or a failover, and the rare leftovers of two concurrent
overwrites of one key. A data id is random and referenced only by its owner,
so once unreferenced (and older than `garbage_age_ms`, the bound on an
upload in progress) it can never become referenced again.

A record that names pieces written before it (a manifest, a part) and fails
frees them only when the backend's error promises nothing was applied. An
unknown outcome or a cancellation mid-write (the client went away) leaves the
record free to commit later, and a retry with the same request id would be
acknowledged on it: its pieces stay for the sweep, which keeps them while
referenced. The age bound still holds for them: such a record commits before
either site serves again (two sites meeting in one epoch commit every
unresolved record) or never (a site that returns to a newer epoch drops its
unresolved records), and the sweep runs only while its site serves.

An overwrite or a delete that replaces one-piece segments (up to
`FOLDED_SEGMENTS_MAX` of them) deletes their piece and owner in the same
record as the new manifest or the tombstone: no window where they are
garbage, no two more records after it, and if that record's outcome is
unknown the deletions share its fate (they commit with it or not at all).
Larger segments are freed by a spawned `_free` after the record, as before
(thousands of piece deletions do not fit one record). Two sites overwriting
one key at once (each read the same old manifest): both records delete the
old segment (twice, harmless), the key keeps the last writer's manifest,
and the loser's new piece and owner are left unreferenced for the sweep,
exactly as with a larger body. What makes this safe is what made the
spawned `_free` safe: the old segment is referenced only by the manifest we
read and replace, and a record written after that read orders after it.

Manifest: b"M1" + u32be(header length) + JSON header + inline body. The
header holds size, etag, mtime_ms, the standard content headers, the user
metadata and the segments [[data_id hex, size, piece_bytes], ...] (one per
put, one per part of a multipart object; empty when the body is inline).
A multipart part is always a data id of pieces (the manifest lists the
parts' data ids); one up to `piece_bytes` is one piece written in the same
record as its owner and its part record.

Errors: the front-ends speak different languages (S3 XML codes, gRPC
statuses), so the two failures this module finds itself are made by
overridable methods (`too_large`, `object_changed`); the rest are the
backend's typed errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from replicator.api.backend import SiteBackend, WriteResult
from replicator.api.errors import BackendError, Changed, InvalidRequest, OutcomeUnknown
from replicator.api.keys import prefix_end
from replicator.config import S3Config
from replicator.core.records import Operation, Versioned

SEP = b"\x00"
BUCKET = b"sB"
OBJECT = b"sO"
PIECE = b"sD"
OWNER = b"sP"
UPLOAD = b"sU"
PART = b"sQ"
_U32 = struct.Struct(">I")
_MANIFEST_MAGIC = b"M1"
DELETES_PER_RECORD = 256  # piece deletions batched per write when freeing garbage
INLINE_BYTES_MAX = 16 * 1024  # a body up to this stays inline in its manifest (see the theory above)
FOLDED_SEGMENTS_MAX = 16  # one-piece segments deleted in the record that replaces them (the rest: _free)
MULTIPART_OBJECT_BYTES_MAX = 5 * 1024**4  # S3's limit on an object made by multipart upload: 5 TiB


class ObjectTooLarge(InvalidRequest):
    """A body over the configured maximum; nothing was stored (pieces already written are freed)."""

    def __init__(self, size_max: int, what: str = "s3.object_bytes_max") -> None:
        super().__init__(f"the object is larger than the limit ({what}) of {size_max} bytes")
        self.size_max = size_max


class ObjectChanged(Changed):
    """The object was replaced while it was being read (its pieces are gone): read it again."""


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def valid_bucket_name(name: str) -> bool:
    """S3's rule: 3-63 lower-case letters, digits, dots and dashes, DNS-like, not an IPv4 address."""
    return bool(
        _BUCKET_NAME.match(name) and ".." not in name and ".-" not in name and "-." not in name and not _IP.match(name)
    )


def bucket_key(bucket: str) -> bytes:
    return BUCKET + bucket.encode()


def object_key(bucket: str, key: str) -> bytes:
    return OBJECT + bucket.encode() + SEP + key.encode()


def piece_key(data_id: bytes, index: int) -> bytes:
    return PIECE + data_id + _U32.pack(index)


def owner_key(data_id: bytes) -> bytes:
    return OWNER + data_id


def upload_key(bucket: str, key: str, upload_id: str) -> bytes:
    return UPLOAD + bucket.encode() + SEP + key.encode() + SEP + upload_id.encode()


def part_key(upload_id: str, number: int) -> bytes:
    return PART + bytes.fromhex(upload_id) + _U32.pack(number)


@dataclass(frozen=True, slots=True)
class Segment:
    data_id: bytes
    size: int
    piece_bytes: int

    @property
    def pieces(self) -> int:
        return -(-self.size // self.piece_bytes) if self.size else 0


@dataclass(slots=True)
class Manifest:
    size: int
    etag: str  # without quotes
    mtime_ms: int
    headers: dict[str, str] = field(default_factory=dict)  # content-type etc., lower-case names
    meta: dict[str, str] = field(default_factory=dict)  # user metadata, names without x-amz-meta-
    segments: list[Segment] = field(default_factory=list)
    inline: bytes = b""
    parts: int = 0  # multipart: number of parts (0 for a single PUT)
    checksums: dict[str, str] = field(default_factory=dict)  # algorithm -> base64 value, as the client sent it

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "size": self.size,
                "etag": self.etag,
                "mtime_ms": self.mtime_ms,
                "headers": self.headers,
                "meta": self.meta,
                "segments": [[s.data_id.hex(), s.size, s.piece_bytes] for s in self.segments],
                "parts": self.parts,
                "checksums": self.checksums,
            },
            separators=(",", ":"),
        ).encode()
        return _MANIFEST_MAGIC + _U32.pack(len(header)) + header + self.inline

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        # We are the only writer of b"sO" keys: a malformed manifest is a bug, not bad input.
        assert raw[:2] == _MANIFEST_MAGIC, raw[:16]
        (length,) = _U32.unpack_from(raw, 2)
        header = json.loads(raw[6 : 6 + length])
        inline = raw[6 + length :]
        segments = [Segment(bytes.fromhex(d), size, piece) for d, size, piece in header["segments"]]
        manifest = cls(
            size=header["size"],
            etag=header["etag"],
            mtime_ms=header["mtime_ms"],
            headers=header["headers"],
            meta=header["meta"],
            segments=segments,
            inline=bytes(inline),
            parts=header.get("parts", 0),
            checksums=header.get("checksums", {}),
        )
        assert (not segments and len(inline) == manifest.size) or (
            not inline and sum(s.size for s in segments) == manifest.size
        ), header
        return manifest

    def data_ids(self) -> set[bytes]:
        return {segment.data_id for segment in self.segments}


@dataclass(frozen=True, slots=True)
class Part:
    number: int
    size: int
    md5: str  # hex
    data_id: bytes
    piece_bytes: int
    mtime_ms: int

    def encode(self) -> bytes:
        return json.dumps(
            {
                "size": self.size,
                "md5": self.md5,
                "data": self.data_id.hex(),
                "piece_bytes": self.piece_bytes,
                "mtime_ms": self.mtime_ms,
            }
        ).encode()

    @classmethod
    def decode(cls, number: int, raw: bytes) -> Part:
        value = json.loads(raw)
        return cls(
            number, value["size"], value["md5"], bytes.fromhex(value["data"]), value["piece_bytes"], value["mtime_ms"]
        )


@dataclass(frozen=True, slots=True)
class StoreLimits:
    piece_bytes: int
    object_bytes_max: int
    part_bytes_min: int
    parts_max: int
    pieces_inflight_max: int
    garbage_age_ms: int
    timeout_s: float
    key_bytes_max: int = 1024
    inline_bytes_max: int = INLINE_BYTES_MAX  # capped at piece_bytes

    def __post_init__(self) -> None:
        if self.inline_bytes_max < 0:
            raise ValueError(f"inline_bytes_max: must be at least 0, got {self.inline_bytes_max}")

    @classmethod
    def of(cls, s3: S3Config, timeout_s: float, key_bytes_max: int) -> StoreLimits:
        """The layout's limits from the [s3] section, one set for both front-ends (S3 and GetLarge/PutLarge)."""
        return cls(
            piece_bytes=s3.piece_bytes,
            object_bytes_max=s3.object_bytes_max,
            part_bytes_min=s3.part_bytes_min,
            parts_max=s3.parts_max,
            pieces_inflight_max=s3.pieces_inflight_max,
            garbage_age_ms=s3.garbage_age_ms,
            timeout_s=timeout_s,
            key_bytes_max=key_bytes_max,
            inline_bytes_max=s3.inline_bytes_max,
        )


@dataclass(slots=True)
class StoredBody:
    """What `_store_body` stored, or will store with the record that references it.

    `together`: the owner and piece records of a one-piece body, not written yet: they must go in the
    record that writes the reference (manifest or part record), so a failure before it leaves nothing.
    `data_id` is None only for an inline body.
    """

    segments: list[Segment]
    inline: bytes
    size: int
    md5_hex: str
    data_id: bytes | None
    together: list[Operation] = field(default_factory=list)

    def written_segments(self) -> list[Segment]:
        """The segments whose pieces are already stored (to free if the reference is never written)."""
        return [] if self.together else self.segments


def now_ms() -> int:
    return int(time.time() * 1000)


class Body:
    """A request body, already decoded (aws-chunked framing removed), read in pieces.

    `read(n)` returns up to n bytes, b"" at the end; `finish()` runs the checks that need the
    whole body (payload hash, trailer checksum, Content-MD5, declared size) and raises on a mismatch.
    """

    async def read(self, size: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    # Set by finish(): the x-amz-checksum-* values (algorithm -> base64) the body was checked against.
    verified: dict[str, str] = {}  # noqa: RUF012 - replaced, never mutated

    def finish(self) -> None:
        return None


class BytesBody(Body):
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    async def read(self, size: int) -> bytes:
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += len(chunk)
        return chunk


class IteratorBody(Body):
    """A body that is another object's bytes (CopyObject, UploadPartCopy)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""
        self.done = False

    async def read(self, size: int) -> bytes:
        while len(self.buffer) < size and not self.done:
            try:
                self.buffer += await anext(self.chunks)
            except StopAsyncIteration:
                self.done = True
        chunk, self.buffer = self.buffer[:size], self.buffer[size:]
        return chunk


async def _read_full(body: Body, size: int) -> bytes:
    """Read exactly `size` bytes unless the body ends first."""
    parts: list[bytes] = []
    wanted = size
    while wanted > 0:
        chunk = await body.read(wanted)
        if not chunk:
            break
        parts.append(chunk)
        wanted -= len(chunk)
    return b"".join(parts)


class PieceStore:
    """Objects of any size over a SiteBackend: bodies in pieces, manifests written last, garbage freed.

    Methods raise the backend's errors, `too_large()` and `object_changed()`.
    """

    def __init__(self, backend: SiteBackend, limits: StoreLimits) -> None:
        self.backend = backend
        self.limits = limits
        # Overwrites of one key at this site are serialized, so that each sees the manifest it
        # replaces and frees its pieces (the sweep catches the cross-site race).
        # Weak values: a lock lives while a coroutine holds or awaits it, then goes by itself.
        self.key_locks: weakref.WeakValueDictionary[bytes, asyncio.Lock] = weakref.WeakValueDictionary()
        self.background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ plumbing
    async def _write(self, operations: Sequence[Operation], request_id: bytes | None = None) -> WriteResult:
        """One record. A caller's `request_id` makes it exactly-once (gRPC retries); else a random one."""
        return await self.backend.write(list(operations), request_id or os.urandom(16), self.limits.timeout_s)

    # ------------------------------------------------------------ what the front-ends say
    def too_large(self, size_max: int) -> Exception:
        """The error for a body over `size_max` bytes (the gRPC API's; S3 answers EntityTooLarge)."""
        return ObjectTooLarge(size_max)

    def object_changed(self) -> Exception:
        """The error for an object replaced (its pieces freed) while it was being read."""
        return ObjectChanged("the object changed while it was being read; retry the request")

    async def _read(self, key: bytes) -> bytes | None:
        version = await self.backend.read(key, self.limits.timeout_s)
        if version is None or version.value is None:
            return None
        return version.value

    async def _scan(self, start: bytes, end: bytes | None, limit: int) -> list[Versioned]:
        return [v for v in await self.backend.scan(start, end, limit, self.limits.timeout_s)]

    async def _live(self, start: bytes, end: bytes, page_size: int = 256) -> AsyncIterator[Versioned]:
        """Every live version in [start, end), page by page: a range's first page may hold only
        tombstones (a deleted key's stays) with live keys after it."""
        while True:
            page = await self._scan(start, end, page_size)
            for version in page:
                if version.value is not None:
                    yield version
            if len(page) < page_size:
                return
            start = page[-1].key + SEP

    def _lock(self, key: bytes) -> asyncio.Lock:
        lock = self.key_locks.get(key)
        if lock is None:
            lock = self.key_locks[key] = asyncio.Lock()
        return lock

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def bucket_exists(self, bucket: str) -> bool:
        return await self._read(bucket_key(bucket)) is not None

    async def read_range(self, manifest: Manifest, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield the bytes [start, end) of the object, piece by piece, reading one piece ahead."""
        assert 0 <= start <= end <= manifest.size, (start, end, manifest.size)
        if not manifest.segments:
            if end > start:
                yield manifest.inline[start:end]
            return
        wanted: list[tuple[bytes, int, int]] = []  # (piece key, from, to) within the piece
        offset = 0
        for segment in manifest.segments:
            segment_end = offset + segment.size
            if segment_end > start and offset < end:
                first = max(start, offset) - offset
                last = min(end, segment_end) - offset
                for index in range(first // segment.piece_bytes, -(-last // segment.piece_bytes)):
                    piece_start = index * segment.piece_bytes
                    wanted.append(
                        (
                            piece_key(segment.data_id, index),
                            max(first, piece_start) - piece_start,
                            min(last, piece_start + segment.piece_bytes) - piece_start,
                        )
                    )
            offset = segment_end
            if offset >= end:
                break
        ahead = 2
        tasks = [asyncio.ensure_future(self._read(k)) for k, _, _ in wanted[:ahead]]
        try:
            for position, (_key, low, high) in enumerate(wanted):
                if position + ahead < len(wanted):
                    tasks.append(asyncio.ensure_future(self._read(wanted[position + ahead][0])))
                value = await tasks[position]
                # A manifest is written only after all its pieces; a missing piece means the object was
                # replaced under us and its pieces freed: the client must retry.
                if value is None or len(value) < high:
                    raise self.object_changed()
                yield value[low:high]
        finally:
            for task in tasks:
                task.cancel()

    # ------------------------------------------------------------ writing objects
    async def _store_body(self, body: Body, owner: dict[str, Any], size_max: int, inline_ok: bool = True) -> StoredBody:
        """Read the whole body and store it: inline (when `inline_ok`), as one piece to write with its
        reference (`together`), or in pieces written now.

        On any failure the pieces already written are freed and the error propagates. The body's own
        checks (payload hash, checksums) run before this returns.
        """
        piece_bytes = self.limits.piece_bytes
        md5 = hashlib.md5()
        first = await _read_full(body, piece_bytes)
        md5.update(first)
        more = await body.read(1) if len(first) == piece_bytes else b""
        if not more:
            body.finish()
            if len(first) > size_max:
                raise self.too_large(size_max)
            if inline_ok and len(first) <= min(self.limits.inline_bytes_max, piece_bytes):
                return StoredBody([], first, len(first), md5.hexdigest(), None)
            data_id = os.urandom(16)
            together = [
                Operation(owner_key(data_id), json.dumps(dict(owner, t=now_ms())).encode()),
                Operation(piece_key(data_id, 0), first),
            ]
            segment = Segment(data_id, len(first), piece_bytes)
            return StoredBody([segment], b"", len(first), md5.hexdigest(), data_id, together)
        data_id = os.urandom(16)
        owner = dict(owner, t=now_ms())
        await self._write([Operation(owner_key(data_id), json.dumps(owner).encode())])
        inflight: set[asyncio.Task[WriteResult]] = set()
        index = 0
        size = 0
        try:
            pending = first
            while pending:
                size += len(pending)
                if size > size_max:
                    raise self.too_large(size_max)
                task = asyncio.ensure_future(self._write([Operation(piece_key(data_id, index), pending)]))
                inflight.add(task)
                index += 1
                if len(inflight) >= self.limits.pieces_inflight_max:
                    done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    for finished in done:
                        finished.result()
                pending = more + await _read_full(body, piece_bytes - len(more))
                more = b""
                md5.update(pending)
            if inflight:
                for outcome in await asyncio.gather(*inflight, return_exceptions=True):
                    if isinstance(outcome, BaseException):
                        raise outcome
                inflight = set()
            body.finish()
        except BaseException:
            for task in inflight:
                task.cancel()
            self._spawn(self._free([Segment(data_id, size, piece_bytes)]))
            raise
        return StoredBody([Segment(data_id, size, piece_bytes)], b"", size, md5.hexdigest(), data_id)

    @staticmethod
    def _fold(stale: Sequence[Segment]) -> tuple[list[Operation], list[Segment]]:
        """Split the segments a record replaces into deletions for that record (up to FOLDED_SEGMENTS_MAX
        one-piece segments: piece and owner) and the segments left to a spawned `_free`."""
        folded = [s for s in stale if s.pieces <= 1][:FOLDED_SEGMENTS_MAX]
        ids = {s.data_id for s in folded}
        deletions = [Operation(k, None) for s in folded for k in (piece_key(s.data_id, 0), owner_key(s.data_id))]
        return deletions, [s for s in stale if s.data_id not in ids]

    async def _commit_manifest(
        self,
        bucket: str,
        key: str,
        manifest: Manifest,
        extra: list[Operation],
        check: Callable[[Manifest | None], None] | None,
        request_id: bytes | None = None,
        together: Sequence[Operation] = (),
        own: Sequence[Segment] = (),
    ) -> WriteResult:
        """Write the manifest (with `together` and `extra`, one record) after `check(old manifest or None)`;
        free what it replaced (small segments in that record, see `_fold`).

        `own` are the segments written beforehand for this manifest: freed when the record is surely not
        written, left to the sweep when it may still commit (see `_write_referencing`).

        A duplicate (a retry whose `request_id` was applied already) changed nothing now: its own
        segments written beforehand are the unreferenced ones (`together` was not written at all),
        the old manifest's are left alone.
        """
        storage_key = object_key(bucket, key)
        lock = self._lock(storage_key)
        async with lock:
            try:
                old_raw = await self._read(storage_key)
                old = Manifest.decode(old_raw) if old_raw is not None else None
                if check is not None:
                    check(old)
            except BaseException:
                self._abandon(own)  # nothing was written: the pieces written for it are garbage now
                raise
            stale = [s for s in old.segments if s.data_id not in manifest.data_ids()] if old is not None else []
            deletions, spawned = self._fold(stale)
            operations = [Operation(storage_key, manifest.encode()), *together, *extra, *deletions]
            result = await self._write_referencing(operations, own, request_id)
        if result.duplicate:
            mine = {operation.key for operation in together}
            written = [s for s in manifest.segments if owner_key(s.data_id) not in mine]
            if written and (old is None or not {s.data_id for s in written} <= old.data_ids()):
                self._spawn(self._free(written))
            return result
        if spawned:
            self._spawn(self._free(spawned))
        return result

    # ------------------------------------------------------------ whole objects
    async def bucket_record(self, bucket: str, location: str = "") -> bool:
        """Create the bucket's record unless it exists; True when it was created."""
        if await self._read(bucket_key(bucket)) is not None:
            return False
        value = {"created_ms": now_ms(), "location": location}
        await self._write([Operation(bucket_key(bucket), json.dumps(value).encode())])
        return True

    async def manifest(self, bucket: str, key: str) -> Manifest | None:
        raw = await self._read(object_key(bucket, key))
        return Manifest.decode(raw) if raw is not None else None

    async def put_object(
        self,
        bucket: str,
        key: str,
        body: Body,
        size_max: int,
        *,
        headers: dict[str, str] | None = None,
        meta: dict[str, str] | None = None,
        checksums: dict[str, str] | None = None,
        check: Callable[[Manifest | None], None] | None = None,
        check_md5: Callable[[str], None] | None = None,
        request_id: bytes | None = None,
    ) -> tuple[Manifest, WriteResult]:
        """Store the body (inline or in pieces), then its manifest, last, in one record.

        `check_md5(md5 hex)` runs once the body is in (Content-MD5), `check(old manifest or None)`
        just before the manifest is written (conditional puts). On any failure nothing becomes
        visible and the pieces written are freed, unless the manifest's record may still commit (an
        unknown outcome): then the sweep frees them if it does not.
        """
        stored = await self._store_body(body, {"b": bucket, "k": key}, size_max)
        try:
            if check_md5 is not None:
                check_md5(stored.md5_hex)
            checksums = {**(checksums or {}), **body.verified}
            manifest = Manifest(
                stored.size,
                stored.md5_hex,
                now_ms(),
                headers or {},
                meta or {},
                stored.segments,
                stored.inline,
                0,
                checksums,
            )
        except BaseException:
            self._abandon(stored.written_segments())  # before any manifest write: surely unreferenced
            raise
        # A one-piece body is written with the manifest or not at all; pieces written before are freed by
        # `_commit_manifest` only when its record surely is not written.
        result = await self._commit_manifest(
            bucket, key, manifest, [], check, request_id, stored.together, stored.written_segments()
        )
        return manifest, result

    async def delete_object(self, bucket: str, key: str, request_id: bytes | None = None) -> WriteResult | None:
        """Delete bucket/key and free its pieces. Without a `request_id` a missing object writes nothing
        (None); with one a tombstone is written anyway, so that the caller has a timestamp to answer."""
        storage_key = object_key(bucket, key)
        lock = self._lock(storage_key)
        async with lock:
            old_raw = await self._read(storage_key)
            if old_raw is None and request_id is None:
                return None
            deletions, spawned = self._fold(Manifest.decode(old_raw).segments if old_raw is not None else [])
            result = await self._write([Operation(storage_key, None), *deletions], request_id)
        if spawned and not result.duplicate:
            self._spawn(self._free(spawned))
        return result

    def _abandon(self, segments: Sequence[Segment]) -> None:
        """Free segments that no record references (a spawned `_free`: the caller answers at once)."""
        if segments:
            self._spawn(self._free(segments))

    async def _write_referencing(
        self, operations: Sequence[Operation], own: Sequence[Segment], request_id: bytes | None = None
    ) -> WriteResult:
        """Write the record that references `own` (segments written beforehand); on failure free them only
        when the backend's error promises nothing was applied.

        An unknown outcome (OutcomeUnknown), a cancellation while the write was in flight (the client went
        away) or any other error there leaves the record free to commit later, at this site or at the peer
        after a failover; freeing its pieces then would leave a manifest or a part naming deleted pieces,
        and a retry with the same request id would be acknowledged on them. The sweep frees them instead
        once nothing references them (`collect_garbage`).
        """
        try:
            return await self._write(operations, request_id)
        except BackendError as error:
            if not isinstance(error, OutcomeUnknown):
                self._abandon(own)
            raise

    async def _free(self, segments: Sequence[Segment]) -> None:
        """Delete the pieces of unreferenced segments and their owner records (best effort: the sweep retries)."""
        try:
            for segment in segments:
                keys = [piece_key(segment.data_id, i) for i in range(max(segment.pieces, 1))]
                for start in range(0, len(keys), DELETES_PER_RECORD):
                    await self._write([Operation(k, None) for k in keys[start : start + DELETES_PER_RECORD]])
                await self._write([Operation(owner_key(segment.data_id), None)])
        except Exception:  # the periodic sweep finds what was left
            return

    async def _free_data_id(self, data_id: bytes) -> None:
        """Free every piece of `data_id`, however many there are (the sweep does not know the size)."""
        start = PIECE + data_id
        end = prefix_end(start)
        while True:
            page = await self._scan(start, end, DELETES_PER_RECORD)
            live = [v.key for v in page if v.value is not None]
            if live:
                await self._write([Operation(k, None) for k in live])
            if len(page) < DELETES_PER_RECORD:
                break
            start = page[-1].key + SEP
        await self._write([Operation(owner_key(data_id), None)])

    async def collect_garbage(self) -> int:
        """One sweep over the owner records: free every data id whose owner no longer references it."""
        freed = 0
        start, end = OWNER, prefix_end(OWNER)
        now = now_ms()
        while True:
            page = await self._scan(start, end, 256)
            for version in page:
                if version.value is None:
                    continue
                data_id = version.key[len(OWNER) :]
                owner = json.loads(version.value)
                if now - owner["t"] < self.limits.garbage_age_ms:
                    continue
                if await self._referenced(data_id, owner):
                    continue
                await self._free_data_id(data_id)
                freed += 1
            if len(page) < 256:
                return freed
            start = page[-1].key + SEP

    async def _referenced(self, data_id: bytes, owner: dict[str, Any]) -> bool:
        raw = await self._read(object_key(owner["b"], owner["k"]))
        if raw is not None and data_id in Manifest.decode(raw).data_ids():
            return True
        if owner.get("u"):
            part = await self._read(part_key(owner["u"], owner["n"]))
            if part is not None and Part.decode(owner["n"], part).data_id == data_id:
                return True
        return False


async def sweep_forever(
    store: PieceStore, interval_s: float, serving: Callable[[], bool], freed: Callable[[int], None]
) -> None:
    """Run `store.collect_garbage()` every `interval_s` while the site serves; `freed(n)` counts what went."""
    while True:
        await asyncio.sleep(interval_s)
        if not serving():
            continue
        try:
            count = await store.collect_garbage()
        except (BackendError, TimeoutError):
            continue
        if count:
            freed(count)
