"""S3 buckets, objects and multipart uploads as keys of the site's one replicated keyspace.

Theory of operation. The S3 front-end never touches storage: every datum is
an opaque key written and read through the site's `SiteBackend` (the same
write path as the gRPC object API), so replication, fencing, leases and
linearizable reads hold for S3 exactly as for the rest. Keys (all under
b"s", beside the gRPC API's b"o" objects):

    bucket    b"sB" + bucket                                 -> JSON {created_ms}
    object    b"sO" + bucket + NUL + key                     -> manifest (below)
    piece     b"sD" + data_id(16) + u32be(index)             -> <= piece_bytes of an object's body
    owner     b"sP" + data_id(16)                            -> JSON {b, k, u, n, t}: who may reference the pieces
    upload    b"sU" + bucket + NUL + key + NUL + upload_id   -> JSON {created_ms, headers, meta}
    part      b"sQ" + upload_id(16) + u32be(part_number)     -> JSON {size, md5, data, piece_bytes, mtime_ms}

A body up to `piece_bytes` is stored inline in its manifest: one record, so
the PUT is atomic by itself. A larger body is cut into pieces written under
a fresh random `data_id`, several in flight; the manifest naming the data id
is written LAST, in one record, so the object appears whole at both sites
(a record is visible anywhere only once durable at both) or not at all.

Garbage. Before its first piece, every data id gets an *owner* record that
names the only places that may ever reference it: the manifest of bucket/key
or the part record (upload, number). Pieces whose owner no longer
references them are garbage. They are freed at once when we know it (the
object was overwritten or deleted, an upload aborted, a PUT failed) and a
sweep (`collect_garbage`, run periodically by the server) frees the rest:
pieces of a PUT cut short by a crash or a failover, and the rare leftovers
of two concurrent overwrites of one key. A data id is random and referenced
only by its owner, so once unreferenced (and older than `garbage_age_ms`,
the bound on an upload in progress) it can never become referenced again.

Manifest: b"M1" + u32be(header length) + JSON header + inline body. The
header holds size, etag, mtime_ms, the standard content headers, the user
metadata and the segments [[data_id hex, size, piece_bytes], ...] (one per
PUT, one per part of a multipart object; empty when the body is inline).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from replicator.api.backend import SiteBackend
from replicator.api.keys import prefix_end
from replicator.core.records import Operation, Versioned
from replicator.s3.errors import S3Error

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
MULTIPART_OBJECT_BYTES_MAX = 5 * 1024**4  # S3's limit on an object made by multipart upload: 5 TiB


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
class Upload:
    bucket: str
    key: str
    upload_id: str
    created_ms: int
    headers: dict[str, str]
    meta: dict[str, str]


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
        return cls(number, value["size"], value["md5"], bytes.fromhex(value["data"]), value["piece_bytes"], value["mtime_ms"])


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    manifest: Manifest


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


def now_ms() -> int:
    return int(time.time() * 1000)


class Body:
    """A request body, already decoded (aws-chunked framing removed), read in pieces.

    `read(n)` returns up to n bytes, b"" at the end; `finish()` runs the checks that need the
    whole body (payload hash, trailer checksum, Content-MD5) and raises S3Error on a mismatch.
    """

    async def read(self, size: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

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


class ObjectStore:
    """The S3 data model over a SiteBackend. Every method raises S3Error or a backend error."""

    def __init__(self, backend: SiteBackend, limits: StoreLimits) -> None:
        self.backend = backend
        self.limits = limits
        # Overwrites of one key at this site are serialized, so that each sees the manifest it
        # replaces and frees its pieces (the sweep catches the cross-site race).
        # Weak values: a lock lives while a coroutine holds or awaits it, then goes by itself.
        self.key_locks: weakref.WeakValueDictionary[bytes, asyncio.Lock] = weakref.WeakValueDictionary()
        self.background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ plumbing
    async def _write(self, operations: Sequence[Operation]) -> int:
        result = await self.backend.write(list(operations), os.urandom(16), self.limits.timeout_s)
        return result.ts

    async def _read(self, key: bytes) -> bytes | None:
        version = await self.backend.read(key, self.limits.timeout_s)
        if version is None or version.value is None:
            return None
        return version.value

    async def _scan(self, start: bytes, end: bytes | None, limit: int) -> list[Versioned]:
        return [v for v in await self.backend.scan(start, end, limit, self.limits.timeout_s)]

    def _lock(self, key: bytes) -> asyncio.Lock:
        lock = self.key_locks.get(key)
        if lock is None:
            lock = self.key_locks[key] = asyncio.Lock()
        return lock

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ------------------------------------------------------------ buckets
    async def create_bucket(self, bucket: str, location: str = "", recreate_ok: bool = False) -> None:
        """Create `bucket`. Creating one that exists is BucketAlreadyOwnedByYou, except where S3 answers
        success and changes nothing (its default region, us-east-1: `recreate_ok`)."""
        if await self._read(bucket_key(bucket)) is not None:
            if recreate_ok:
                return
            raise S3Error("BucketAlreadyOwnedByYou", f"bucket {bucket} exists and is yours", 409)
        value = {"created_ms": now_ms(), "location": location}
        await self._write([Operation(bucket_key(bucket), json.dumps(value).encode())])

    async def bucket_location(self, bucket: str) -> str:
        raw = await self._read(bucket_key(bucket))
        if raw is None:
            raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404, resource=bucket)
        return str(json.loads(raw).get("location", ""))

    async def bucket_exists(self, bucket: str) -> bool:
        return await self._read(bucket_key(bucket)) is not None

    async def require_bucket(self, bucket: str) -> None:
        if not await self.bucket_exists(bucket):
            raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404, resource=bucket)

    async def list_buckets(self) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        start, end = BUCKET, prefix_end(BUCKET)
        while True:
            page = await self._scan(start, end, 1000)
            for version in page:
                if version.value is not None:
                    found.append((version.key[len(BUCKET) :].decode(), json.loads(version.value)["created_ms"]))
            if len(page) < 1000:
                return found
            start = page[-1].key + SEP

    async def delete_bucket(self, bucket: str) -> None:
        await self.require_bucket(bucket)
        head = OBJECT + bucket.encode() + SEP
        if any(v.value is not None for v in await self._scan(head, prefix_end(head), 100)):
            raise S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty", 409, resource=bucket)
        uploads = UPLOAD + bucket.encode() + SEP
        for version in await self._scan(uploads, prefix_end(uploads), 1000):
            if version.value is not None:
                await self._abort_upload_key(version.key)
        await self._write([Operation(bucket_key(bucket), None)])

    # ------------------------------------------------------------ reading objects
    async def head(self, bucket: str, key: str) -> Manifest:
        raw = await self._read(object_key(bucket, key))
        if raw is None:
            await self.require_bucket(bucket)
            raise S3Error("NoSuchKey", "The specified key does not exist.", 404, resource=f"{bucket}/{key}")
        return Manifest.decode(raw)

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
                    raise S3Error(
                        "InternalError", "the object changed while it was being read; retry the request", 500
                    )
                yield value[low:high]
        finally:
            for task in tasks:
                task.cancel()

    async def list_range(self, bucket: str, prefix: str, start: bytes, limit: int) -> list[Listed]:
        """At most `limit` objects whose key starts with `prefix` and is >= `start` (key bytes), in key order."""
        head = OBJECT + bucket.encode() + SEP
        first = head + max(start, prefix.encode())
        end = prefix_end(head + prefix.encode())
        found: list[Listed] = []
        while len(found) < limit:
            page_size = min(1000, limit - len(found))
            page = await self._scan(first, end, page_size)
            for version in page:
                if version.value is not None:
                    found.append(Listed(version.key[len(head) :].decode(), Manifest.decode(version.value)))
            if len(page) < page_size:
                break
            first = page[-1].key + SEP
        return found

    # ------------------------------------------------------------ writing objects
    async def _store_body(
        self, body: Body, owner: dict[str, Any], size_max: int
    ) -> tuple[list[Segment], bytes, int, str, bytes | None]:
        """Read the whole body, store it (inline or in pieces); return (segments, inline, size, md5 hex, data_id).

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
                raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", 400)
            return [], first, len(first), md5.hexdigest(), None
        data_id = os.urandom(16)
        owner = dict(owner, t=now_ms())
        await self._write([Operation(owner_key(data_id), json.dumps(owner).encode())])
        inflight: set[asyncio.Task[int]] = set()
        index = 0
        size = 0
        try:
            pending = first
            while pending:
                size += len(pending)
                if size > size_max:
                    raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", 400)
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
                for finished in await asyncio.gather(*inflight, return_exceptions=True):
                    if isinstance(finished, BaseException):
                        raise finished
                inflight = set()
            body.finish()
        except BaseException:
            for task in inflight:
                task.cancel()
            self._spawn(self._free([Segment(data_id, size, piece_bytes)]))
            raise
        return [Segment(data_id, size, piece_bytes)], b"", size, md5.hexdigest(), data_id

    async def put(
        self,
        bucket: str,
        key: str,
        body: Body,
        headers: dict[str, str],
        meta: dict[str, str],
        check: Callable[[Manifest | None], None] | None = None,
        checksums: dict[str, str] | None = None,
        content_md5: str | None = None,
    ) -> Manifest:
        """Store an object. `check(old manifest or None)` runs just before the manifest is written
        (conditional PUT); `content_md5` (hex) is compared with the body's MD5 first."""
        await self.require_bucket(bucket)
        segments, inline, size, md5_hex, data_id = await self._store_body(
            body, {"b": bucket, "k": key}, self.limits.object_bytes_max
        )
        try:
            if content_md5 is not None and content_md5 != md5_hex:
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
            manifest = Manifest(size, md5_hex, now_ms(), headers, meta, segments, inline, 0, checksums or {})
            await self._commit_manifest(bucket, key, manifest, [], check)
        except BaseException:
            if segments:
                self._spawn(self._free(segments))
            raise
        return manifest

    async def _commit_manifest(
        self,
        bucket: str,
        key: str,
        manifest: Manifest,
        extra: list[Operation],
        check: Callable[[Manifest | None], None] | None,
    ) -> None:
        storage_key = object_key(bucket, key)
        lock = self._lock(storage_key)
        async with lock:
            old_raw = await self._read(storage_key)
            old = Manifest.decode(old_raw) if old_raw is not None else None
            if check is not None:
                check(old)
            await self._write([Operation(storage_key, manifest.encode()), *extra])
        if old is not None:
            stale = [s for s in old.segments if s.data_id not in manifest.data_ids()]
            if stale:
                self._spawn(self._free(stale))

    async def delete(self, bucket: str, key: str) -> None:
        await self.require_bucket(bucket)
        storage_key = object_key(bucket, key)
        lock = self._lock(storage_key)
        async with lock:
            old_raw = await self._read(storage_key)
            if old_raw is not None:
                await self._write([Operation(storage_key, None)])
        if old_raw is not None:
            old = Manifest.decode(old_raw)
            if old.segments:
                self._spawn(self._free(old.segments))

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

    # ------------------------------------------------------------ multipart
    async def create_upload(self, bucket: str, key: str, headers: dict[str, str], meta: dict[str, str]) -> str:
        await self.require_bucket(bucket)
        upload_id = os.urandom(16).hex()
        value = json.dumps({"created_ms": now_ms(), "headers": headers, "meta": meta}).encode()
        await self._write([Operation(upload_key(bucket, key, upload_id), value)])
        return upload_id

    async def get_upload(self, bucket: str, key: str, upload_id: str) -> Upload:
        valid = len(upload_id) == 32 and all(c in "0123456789abcdef" for c in upload_id)
        raw = await self._read(upload_key(bucket, key, upload_id)) if valid else None
        if raw is None:
            await self.require_bucket(bucket)
            raise S3Error(
                "NoSuchUpload",
                "The specified upload does not exist. The upload ID may be invalid, or the upload may have been "
                "aborted or completed.",
                404,
            )
        value = json.loads(raw)
        return Upload(bucket, key, upload_id, value["created_ms"], value["headers"], value["meta"])

    async def upload_part(self, upload: Upload, number: int, body: Body, content_md5: str | None) -> Part:
        owner = {"b": upload.bucket, "k": upload.key, "u": upload.upload_id, "n": number}
        segments, inline, size, md5_hex, data_id = await self._store_body(body, owner, self.limits.object_bytes_max)
        try:
            if content_md5 is not None and content_md5 != md5_hex:
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
            if data_id is None:
                # A small part still goes to pieces (parts are referenced by data id); one piece.
                data_id = os.urandom(16)
                owner = dict(owner, t=now_ms())
                await self._write([Operation(owner_key(data_id), json.dumps(owner).encode())])
                segments = [Segment(data_id, size, self.limits.piece_bytes)]
                await self._write([Operation(piece_key(data_id, 0), inline)])
            part = Part(number, size, md5_hex, data_id, self.limits.piece_bytes, now_ms())
            storage_key = part_key(upload.upload_id, number)
            lock = self._lock(storage_key)
            async with lock:
                # The upload may have been completed or aborted while the body streamed in.
                await self.get_upload(upload.bucket, upload.key, upload.upload_id)
                old_raw = await self._read(storage_key)
                await self._write([Operation(storage_key, part.encode())])
        except BaseException:
            if segments:
                self._spawn(self._free(segments))
            raise
        if old_raw is not None:
            old = Part.decode(number, old_raw)
            self._spawn(self._free([Segment(old.data_id, old.size, old.piece_bytes)]))
        return part

    async def list_parts(self, upload_id: str, after: int, limit: int) -> list[Part]:
        head = PART + bytes.fromhex(upload_id)
        page = await self._scan(head + _U32.pack(after + 1), prefix_end(head), limit)
        return [Part.decode(_U32.unpack(v.key[-4:])[0], v.value) for v in page if v.value is not None]

    async def _all_parts(self, upload_id: str) -> list[Part]:
        parts: list[Part] = []
        after = 0
        while True:
            page = await self.list_parts(upload_id, after, 1000)
            parts += page
            if len(page) < 1000:
                return parts
            after = page[-1].number

    async def complete_upload(
        self, upload: Upload, chosen: list[tuple[int, str]], check: Callable[[Manifest | None], None] | None = None
    ) -> Manifest:
        """Make the object from the parts `chosen` [(number, etag without quotes)], in that order."""
        if not chosen:
            raise S3Error("MalformedXML", "You must specify at least one part", 400)
        numbers = [n for n, _ in chosen]
        if any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
            raise S3Error("InvalidPartOrder", "The list of parts was not in ascending order.", 400)
        stored = {part.number: part for part in await self._all_parts(upload.upload_id)}
        segments: list[Segment] = []
        digests = b""
        for number, etag in chosen:
            part = stored.get(number)
            if part is None or part.md5 != etag.strip('"'):
                raise S3Error(
                    "InvalidPart",
                    "One or more of the specified parts could not be found. The part may not have been uploaded, "
                    "or the specified entity tag may not have matched the part's entity tag.",
                    400,
                )
            segments.append(Segment(part.data_id, part.size, part.piece_bytes))
            digests += bytes.fromhex(part.md5)
        # Every part named must exist before sizes are judged (InvalidPart wins over EntityTooSmall).
        if any(segment.size < self.limits.part_bytes_min for segment in segments[:-1]):
            raise S3Error("EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size", 400)
        size = sum(s.size for s in segments)
        if size > MULTIPART_OBJECT_BYTES_MAX:
            raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", 400)
        etag = f"{hashlib.md5(digests).hexdigest()}-{len(chosen)}"
        segments = [s for s in segments if s.size > 0] or segments[:1]
        manifest = Manifest(size, etag, now_ms(), upload.headers, upload.meta, segments, b"", len(chosen))
        if size == 0:
            manifest.segments = []
        removals = [Operation(upload_key(upload.bucket, upload.key, upload.upload_id), None)]
        removals += [Operation(part_key(upload.upload_id, n), None) for n in stored]
        await self._commit_manifest(upload.bucket, upload.key, manifest, removals, check)
        used = manifest.data_ids()
        unused = [Segment(p.data_id, p.size, p.piece_bytes) for p in stored.values() if p.data_id not in used]
        if unused:
            self._spawn(self._free(unused))
        return manifest

    async def abort_upload(self, upload: Upload) -> None:
        await self._abort_upload_key(upload_key(upload.bucket, upload.key, upload.upload_id))

    async def _abort_upload_key(self, storage_key: bytes) -> None:
        upload_id = storage_key.rsplit(SEP, 1)[1].decode()
        parts = await self._all_parts(upload_id)
        removals = [Operation(storage_key, None)] + [Operation(part_key(upload_id, p.number), None) for p in parts]
        for start in range(0, len(removals), DELETES_PER_RECORD):
            await self._write(removals[start : start + DELETES_PER_RECORD])
        if parts:
            self._spawn(self._free([Segment(p.data_id, p.size, p.piece_bytes) for p in parts]))

    async def list_uploads(self, bucket: str, prefix: str, key_marker: str, limit: int) -> list[Upload]:
        head = UPLOAD + bucket.encode() + SEP
        start = head + prefix.encode()
        if key_marker and key_marker.encode() >= prefix.encode():
            start = max(start, head + key_marker.encode() + SEP + b"\xff")
        page = await self._scan(start, prefix_end(head + prefix.encode()), limit)
        uploads = []
        for version in page:
            if version.value is None:
                continue
            key, _, upload_id = version.key[len(head) :].rpartition(SEP)
            value = json.loads(version.value)
            uploads.append(
                Upload(bucket, key.decode(), upload_id.decode(), value["created_ms"], value["headers"], value["meta"])
            )
        return uploads
