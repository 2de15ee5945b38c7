"""S3 buckets, listings and multipart uploads over the shared object layout (replicator/api/pieces.py).

The keys, the manifests, the pieces and their garbage are `PieceStore`'s (the
gRPC object API's large-object calls use the same, so an object written
through one is read through the other); this module adds what only S3 has:
bucket records and listings, multipart uploads (a part is a data id of
pieces; completing writes one manifest that lists the parts' data ids, no
copy), and S3's error codes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from replicator.api.keys import prefix_end
from replicator.api.pieces import (
    _U32,
    BUCKET,
    DELETES_PER_RECORD,
    MULTIPART_OBJECT_BYTES_MAX,
    OBJECT,
    PART,
    SEP,
    UPLOAD,
    Body,
    BytesBody,
    IteratorBody,
    Manifest,
    Part,
    PieceStore,
    Segment,
    StoreLimits,
    bucket_key,
    now_ms,
    object_key,
    part_key,
    upload_key,
)
from replicator.core.records import Operation
from replicator.s3.errors import S3Error

__all__ = [
    "Body",
    "BytesBody",
    "IteratorBody",
    "Listed",
    "Manifest",
    "ObjectChangedError",
    "ObjectStore",
    "Part",
    "Segment",
    "StoreLimits",
    "Upload",
]


@dataclass(frozen=True, slots=True)
class Upload:
    bucket: str
    key: str
    upload_id: str
    created_ms: int
    headers: dict[str, str]
    meta: dict[str, str]


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    manifest: Manifest


class ObjectChangedError(S3Error):
    """The object was replaced (its pieces freed) while it was being read: InternalError, which clients retry."""

    def __init__(self) -> None:
        super().__init__("InternalError", "the object changed while it was being read; retry the request", 500)


class ObjectStore(PieceStore):
    """The S3 data model over a SiteBackend. Every method raises S3Error or a backend error."""

    def too_large(self, size_max: int) -> Exception:
        return S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", 400)

    def object_changed(self) -> Exception:
        return ObjectChangedError()

    # ------------------------------------------------------------ buckets
    async def create_bucket(self, bucket: str, location: str = "", recreate_ok: bool = False) -> None:
        """Create `bucket`. Creating one that exists is BucketAlreadyOwnedByYou, except where S3 answers
        success and changes nothing (its default region, us-east-1: `recreate_ok`)."""
        if not await self.bucket_record(bucket, location) and not recreate_ok:
            raise S3Error("BucketAlreadyOwnedByYou", f"bucket {bucket} exists and is yours", 409)

    async def bucket_location(self, bucket: str) -> str:
        raw = await self._read(bucket_key(bucket))
        if raw is None:
            raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404, resource=bucket)
        return str(json.loads(raw).get("location", ""))

    async def require_bucket(self, bucket: str) -> None:
        if not await self.bucket_exists(bucket):
            raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404, resource=bucket)

    async def list_buckets(self) -> list[tuple[str, int]]:
        return [
            (version.key[len(BUCKET) :].decode(), json.loads(version.value)["created_ms"])
            async for version in self._live(BUCKET, prefix_end(BUCKET), 1000)
        ]

    async def delete_bucket(self, bucket: str) -> None:
        """Delete an empty bucket: no live object anywhere in its range (deleted objects leave tombstones,
        so the first page may hold none while a live one comes after); its uploads in progress go with it."""
        await self.require_bucket(bucket)
        head = OBJECT + bucket.encode() + SEP
        async for _ in self._live(head, prefix_end(head)):
            raise S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty", 409, resource=bucket)
        uploads = UPLOAD + bucket.encode() + SEP
        for key in [version.key async for version in self._live(uploads, prefix_end(uploads), 1000)]:
            await self._abort_upload_key(key)
        await self._write([Operation(bucket_key(bucket), None)])

    # ------------------------------------------------------------ reading objects
    async def head(self, bucket: str, key: str) -> Manifest:
        raw = await self._read(object_key(bucket, key))
        if raw is None:
            await self.require_bucket(bucket)
            raise S3Error("NoSuchKey", "The specified key does not exist.", 404, resource=f"{bucket}/{key}")
        return Manifest.decode(raw)

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

        def check_md5(md5_hex: str) -> None:
            if content_md5 is not None and content_md5 != md5_hex:
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)

        manifest, _ = await self.put_object(
            bucket,
            key,
            body,
            self.limits.object_bytes_max,
            headers=headers,
            meta=meta,
            checksums=checksums,
            check=check,
            check_md5=check_md5,
        )
        return manifest

    async def delete(self, bucket: str, key: str) -> None:
        await self.require_bucket(bucket)
        await self.delete_object(bucket, key)

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
        # Never inline: parts are referenced by data id. A part up to piece_bytes is one piece, written
        # with its owner in the part's record.
        stored = await self._store_body(body, owner, self.limits.object_bytes_max, inline_ok=False)
        assert stored.data_id is not None
        storage_key = part_key(upload.upload_id, number)
        part = Part(number, stored.size, stored.md5_hex, stored.data_id, self.limits.piece_bytes, now_ms())
        async with self._lock(storage_key):
            try:
                if content_md5 is not None and content_md5 != stored.md5_hex:
                    raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
                # The upload may have been completed or aborted while the body streamed in.
                await self.get_upload(upload.bucket, upload.key, upload.upload_id)
                old_raw = await self._read(storage_key)
            except BaseException:
                self._abandon(stored.written_segments())  # no part record was written
                raise
            # As for a whole object: a one-piece part is written with its record or not at all; the pieces
            # written before are freed only if that record surely is not written.
            operations = [Operation(storage_key, part.encode()), *stored.together]
            await self._write_referencing(operations, stored.written_segments())
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
        uploads: list[Upload] = []
        # Completed and aborted uploads leave tombstones: page on until `limit` live ones are found.
        async for version in self._live(start, prefix_end(head + prefix.encode()), min(max(limit, 1), 1000)):
            key, _, upload_id = version.key[len(head) :].rpartition(SEP)
            value = json.loads(version.value)
            uploads.append(
                Upload(bucket, key.decode(), upload_id.decode(), value["created_ms"], value["headers"], value["meta"])
            )
            if len(uploads) >= limit:
                break
        return uploads
