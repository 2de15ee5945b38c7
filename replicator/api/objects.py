"""ObjectService servicer: bucket/key -> bytes over a SiteBackend.

Small objects (Put, Get, ...) are one record each under b"o" (keys.py). Objects
of any size (PutLarge, GetLarge, HeadLarge, DeleteLarge) use the S3 endpoint's
layout (pieces.py): the body in pieces, the manifest written last, in the
namespace S3 serves, so either API reads what the other wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from replicator.api import keys, pieces
from replicator.api._handling import (
    OPERATING_ERRORS,
    PipelinedStream,
    abort,
    ack,
    item_error,
    item_timeout_s,
    timeout_s,
    translate_errors,
    translate_stream_errors,
)
from replicator.api.backend import SiteBackend
from replicator.api.errors import Changed, InvalidRequest, NotFound, Unavailable
from replicator.client.session import SESSION_PACK_BYTES_MAX, SESSION_PACK_CALLS_MAX, SESSION_PACK_METADATA
from replicator.config import ApiConfig, S3Config
from replicator.core.records import Operation, Versioned
from replicator.v1 import objects_pb2, objects_pb2_grpc

CHUNK_BYTES = 1024 * 1024  # GetLarge answers in chunks of at most this (the client sends the same)
GET_LARGE_ATTEMPTS = 3  # reads of an object replaced between its manifest and its first piece (GetLarge)

# How long the backend may take, asked when a handler is about to call it (after validation, so that
# bad input is refused as such whatever the deadline): a unary call's deadline or a session call's own.
Timeout = Callable[[], float]
SESSION_CALLS = ("put", "put_batch", "get", "head", "delete", "list")


def large_limits(s3: S3Config, api: ApiConfig) -> pieces.StoreLimits:
    """The layout's limits, one set for both front-ends (the [s3] section holds them)."""
    return pieces.StoreLimits.of(s3, api.request_timeout_ms / 1000, api.key_bytes_max)


class _StreamBody(pieces.Body):
    """The body of a PutLarge: the first message's data, then the data of the others, exactly `declared` bytes."""

    def __init__(self, first: objects_pb2.PutLargeRequest, rest: AsyncIterator[objects_pb2.PutLargeRequest]) -> None:
        self.declared = first.size_bytes
        self.rest = rest
        self.buffer = bytearray(first.data)
        self.received = len(first.data)
        self.ended = False
        self._check_count()

    def _check_count(self) -> None:
        if self.received > self.declared:
            raise InvalidRequest(f"PutLarge sent more than the {self.declared} bytes its size_bytes declared")

    async def read(self, size: int) -> bytes:
        while len(self.buffer) < size and not self.ended:
            try:
                message = await anext(self.rest)
            except StopAsyncIteration:
                self.ended = True
                break
            if message.bucket or message.key or message.request_id or message.size_bytes:
                raise InvalidRequest("only the first PutLarge message names the object (bucket, key, size, id)")
            self.received += len(message.data)
            self._check_count()
            self.buffer += message.data
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size]
        return chunk

    def finish(self) -> None:
        if self.received != self.declared:
            raise InvalidRequest(f"PutLarge declared {self.declared} bytes (size_bytes) and sent {self.received}")


def _info(manifest: pieces.Manifest) -> objects_pb2.LargeInfo:
    return objects_pb2.LargeInfo(
        size_bytes=manifest.size,
        etag=manifest.etag,
        mtime_ms=manifest.mtime_ms,
        content_type=manifest.headers.get("content-type", ""),
    )


class ObjectServicer(objects_pb2_grpc.ObjectServiceServicer):
    def __init__(self, backend: SiteBackend, config: ApiConfig, s3: S3Config | None = None) -> None:
        self.backend = backend
        self.config = config
        self.large = pieces.PieceStore(backend, large_limits(s3 or S3Config(), config))
        self._sessions: set[PipelinedStream] = set()

    def end_sessions(self) -> None:
        """The server is stopping: every Session stream reads no more calls, answers the ones it started,
        and ends with UNAVAILABLE naming the other site (a call still unanswered then was never read)."""
        for pipeline in list(self._sessions):
            pipeline.stop()

    # ---- validation: everything is checked before the backend is called,
    # so a refused request has no effect at all.

    def _put_operation(self, bucket: str, key: str, data: bytes) -> Operation:
        storage_key = keys.object_key(keys.bucket_bytes(bucket, self.config), keys.object_key_bytes(key, self.config))
        if len(data) > self.config.object_bytes_max:
            raise InvalidRequest(
                f"object is {len(data)} bytes, the limit (object_bytes_max) is {self.config.object_bytes_max}; "
                "PutLarge (the client's put_large) stores objects of any size"
            )
        return Operation(storage_key, data)

    def _deadline(self, context: grpc.aio.ServicerContext | None) -> Timeout:
        return lambda: timeout_s(context, self.config)

    async def _read_object(self, bucket: str, key: str, timeout: Timeout) -> Versioned:
        storage_key = keys.object_key(keys.bucket_bytes(bucket, self.config), keys.object_key_bytes(key, self.config))
        version = await self.backend.read(storage_key, timeout())
        if version is None or version.value is None:
            raise NotFound(f"object {bucket}/{key} not found")
        return version

    # ---- the handlers, one per call, shared by the unary RPCs and the Session stream

    async def _put(self, request: objects_pb2.PutRequest, timeout: Timeout) -> objects_pb2.PutResponse:
        operation = self._put_operation(request.bucket, request.key, request.data)
        request_id = keys.check_request_id(request.request_id, self.config)
        result = await self.backend.write([operation], request_id, timeout())
        return objects_pb2.PutResponse(ack=ack(result))

    async def _put_batch(self, request: objects_pb2.PutBatchRequest, timeout: Timeout) -> objects_pb2.PutResponse:
        if not request.items:
            raise InvalidRequest("PutBatch has no items")
        if len(request.items) > self.config.batch_items_max:
            raise InvalidRequest(
                f"PutBatch has {len(request.items)} items, the limit (batch_items_max) is {self.config.batch_items_max}"
            )
        total = sum(len(item.data) + len(item.key.encode()) for item in request.items)
        if total > self.config.batch_bytes_max:
            raise InvalidRequest(
                f"PutBatch carries {total} bytes, the limit (batch_bytes_max) is {self.config.batch_bytes_max}"
            )
        operations = [self._put_operation(request.bucket, item.key, item.data) for item in request.items]
        if len({operation.key for operation in operations}) != len(operations):
            raise InvalidRequest("PutBatch names the same key twice")
        request_id = keys.check_request_id(request.request_id, self.config)
        result = await self.backend.write(operations, request_id, timeout())
        return objects_pb2.PutResponse(ack=ack(result))

    async def _get(self, request: objects_pb2.GetRequest, timeout: Timeout) -> objects_pb2.GetResponse:
        version = await self._read_object(request.bucket, request.key, timeout)
        assert version.value is not None
        return objects_pb2.GetResponse(data=version.value, ts=version.ts)

    async def _head(self, request: objects_pb2.HeadRequest, timeout: Timeout) -> objects_pb2.HeadResponse:
        version = await self._read_object(request.bucket, request.key, timeout)
        assert version.value is not None
        return objects_pb2.HeadResponse(size_bytes=len(version.value), ts=version.ts)

    async def _delete(self, request: objects_pb2.DeleteRequest, timeout: Timeout) -> objects_pb2.DeleteResponse:
        storage_key = keys.object_key(
            keys.bucket_bytes(request.bucket, self.config), keys.object_key_bytes(request.key, self.config)
        )
        request_id = keys.check_request_id(request.request_id, self.config)
        result = await self.backend.write([Operation(storage_key, None)], request_id, timeout())
        return objects_pb2.DeleteResponse(ack=ack(result))

    async def _list(self, request: objects_pb2.ListRequest, timeout: Timeout) -> objects_pb2.ListResponse:
        bucket = keys.bucket_bytes(request.bucket, self.config)
        prefix = request.prefix.encode()
        if len(prefix) > self.config.key_bytes_max:
            raise InvalidRequest(
                f"prefix is {len(prefix)} bytes, the limit (key_bytes_max) is {self.config.key_bytes_max}"
            )
        page_size = min(request.page_size or self.config.list_page_size_max, self.config.list_page_size_max)
        range_start = keys.object_prefix(bucket, prefix)
        range_end = keys.prefix_end(range_start)
        if request.page_token:
            if not request.page_token.startswith(prefix) or keys.SEPARATOR in request.page_token:
                raise InvalidRequest("page_token does not belong to this listing (bucket and prefix must not change)")
            # Keys hold no NUL, so key + NUL is the first key after it.
            start = keys.object_key(bucket, request.page_token) + keys.SEPARATOR
        else:
            start = range_start
        versions = await self.backend.scan(start, range_end, page_size, timeout())
        assert len(versions) <= page_size, (len(versions), page_size)
        objects = [
            objects_pb2.ObjectInfo(
                key=keys.object_key_from_storage(bucket, version.key).decode(),
                size_bytes=len(version.value),
                ts=version.ts,
            )
            for version in versions
            if version.value is not None
        ]
        next_token = b""
        if len(versions) == page_size:
            next_token = keys.object_key_from_storage(bucket, versions[-1].key)
        return objects_pb2.ListResponse(objects=objects, next_page_token=next_token)

    # ---- RPCs

    @translate_errors
    async def Put(self, request: objects_pb2.PutRequest, context: grpc.aio.ServicerContext) -> objects_pb2.PutResponse:
        return await self._put(request, self._deadline(context))

    @translate_errors
    async def PutBatch(
        self, request: objects_pb2.PutBatchRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.PutResponse:
        return await self._put_batch(request, self._deadline(context))

    @translate_errors
    async def Get(self, request: objects_pb2.GetRequest, context: grpc.aio.ServicerContext) -> objects_pb2.GetResponse:
        return await self._get(request, self._deadline(context))

    @translate_errors
    async def Head(
        self, request: objects_pb2.HeadRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.HeadResponse:
        return await self._head(request, self._deadline(context))

    @translate_errors
    async def Delete(
        self, request: objects_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.DeleteResponse:
        return await self._delete(request, self._deadline(context))

    @translate_errors
    async def List(
        self, request: objects_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.ListResponse:
        return await self._list(request, self._deadline(context))

    async def PutStream(
        self, request_iterator: AsyncIterator[objects_pb2.PutRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[objects_pb2.PutStreamResponse]:
        async def handle(request: objects_pb2.PutRequest) -> objects_pb2.PutStreamResponse:
            try:
                # Items of a long-lived stream are bounded one by one, not by the stream's deadline.
                response = await self._put(request, self._deadline(None))
            except OPERATING_ERRORS as error:
                return objects_pb2.PutStreamResponse(
                    request_id=request.request_id, error=item_error(self.backend, error)
                )
            return objects_pb2.PutStreamResponse(request_id=request.request_id, ack=response.ack)

        async for answer in PipelinedStream(self.config.stream_inflight_max).run(request_iterator, handle):
            yield answer

    async def Session(
        self, request_iterator: AsyncIterator[objects_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[objects_pb2.SessionResponse]:
        """A client's multiplexed calls (objects.proto, Session): each served by its unary call's handler."""
        handlers: dict[str, Callable[[Any, Timeout], Awaitable[Any]]] = {
            "put": self._put,
            "put_batch": self._put_batch,
            "get": self._get,
            "head": self._head,
            "delete": self._delete,
            "list": self._list,
        }
        assert set(handlers) == set(SESSION_CALLS)

        async def handle(entry: tuple[objects_pb2.SessionRequest, bool]) -> objects_pb2.SessionResponse:
            request, packed = entry
            kind = request.WhichOneof("call")
            try:
                if kind is None:
                    raise InvalidRequest(
                        f"session call {request.tag} names no call: set one of {', '.join(SESSION_CALLS)}"
                    )
                if packed and len(request.more):
                    raise InvalidRequest(
                        f"session call {request.tag} was packed in `more` and packs calls of its own: they "
                        "were not served (only the first message of a pack may carry `more`)"
                    )
                # Bounded by the call's own timeout, from now (a unary call's deadline runs the same way).
                timeout_ms = request.timeout_ms
                answer = await handlers[kind](getattr(request, kind), lambda: item_timeout_s(timeout_ms, self.config))
            except OPERATING_ERRORS as error:
                return objects_pb2.SessionResponse(tag=request.tag, error=item_error(self.backend, error))
            response = objects_pb2.SessionResponse(tag=request.tag)
            getattr(response, kind).CopyFrom(answer)
            return response

        async def unpacked() -> AsyncIterator[tuple[objects_pb2.SessionRequest, bool]]:
            # Each call of a packed message is an item of its own (its permit, its answer), flagged as
            # packed; `more` is left set on the first, whose handler ignores it.
            async for message in request_iterator:
                yield message, False
                for item in message.more:
                    yield item, True

        # A client that takes packed answers says so; the answer's headers tell it that we take packed calls.
        pack = SESSION_PACK_METADATA in tuple(context.invocation_metadata() or ())
        if pack:
            await context.send_initial_metadata((SESSION_PACK_METADATA,))
        pipeline = PipelinedStream(self.config.session_inflight_max)
        self._sessions.add(pipeline)
        try:
            if pack:
                answers = pipeline.run_batches(
                    unpacked(), handle, SESSION_PACK_BYTES_MAX, SESSION_PACK_CALLS_MAX, lambda a: a.ByteSize()
                )
                async for batch in answers:
                    head = batch[0]
                    if len(batch) > 1:
                        head.more.extend(batch[1:])
                    yield head
            else:
                async for response in pipeline.run(unpacked(), handle):
                    yield response
        finally:
            self._sessions.discard(pipeline)
        if pipeline.stopped:
            await abort(self.backend, context, Unavailable("it is stopping"))

    # ---- objects of any size (pieces.py)

    def _large_names(self, bucket: str, key: str) -> None:
        if not pieces.valid_bucket_name(bucket):
            raise InvalidRequest(
                f"bucket name {bucket!r} is invalid for large objects (they live in the S3 namespace): use 3-63 "
                "lower-case letters, digits, '.' and '-', starting and ending with a letter or digit"
            )
        encoded = key.encode("utf-8", errors="surrogatepass")
        if not encoded:
            raise InvalidRequest("object key is empty")
        if len(encoded) > self.large.limits.key_bytes_max:
            raise InvalidRequest(
                f"object key is {len(encoded)} bytes, the limit (key_bytes_max) is {self.large.limits.key_bytes_max}"
            )
        if "\x00" in key:
            raise InvalidRequest("object key contains a NUL character")

    async def _large_manifest(self, bucket: str, key: str) -> pieces.Manifest:
        self._large_names(bucket, key)
        manifest = await self.large.manifest(bucket, key)
        if manifest is None:
            raise NotFound(f"object {bucket}/{key} not found")
        return manifest

    @translate_errors
    async def PutLarge(
        self, request_iterator: AsyncIterator[objects_pb2.PutLargeRequest], context: grpc.aio.ServicerContext
    ) -> objects_pb2.PutResponse:
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            raise InvalidRequest("PutLarge sent no message") from None
        self._large_names(first.bucket, first.key)
        request_id = keys.check_request_id(first.request_id, self.config)
        size_max = self.large.limits.object_bytes_max
        # Refused on the declaration, before any more of the body is read.
        if first.size_bytes > size_max:
            raise InvalidRequest(f"object is {first.size_bytes} bytes, the limit (s3.object_bytes_max) is {size_max}")
        body = _StreamBody(first, request_iterator)
        await self.large.bucket_record(first.bucket)
        headers = {"content-type": first.content_type} if first.content_type else {}
        _, result = await self.large.put_object(
            first.bucket, first.key, body, size_max, headers=headers, request_id=request_id
        )
        return objects_pb2.PutResponse(ack=ack(result))

    @translate_stream_errors
    async def GetLarge(
        self, request: objects_pb2.GetLargeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[objects_pb2.GetLargeResponse]:
        # The first chunk is read before the info is sent: an object replaced between its manifest and its
        # first piece (every object over inline_bytes_max is at least two reads) is read again from its new
        # manifest, up to GET_LARGE_ATTEMPTS times, unless the request named the etag it wants (then the
        # caller is told it changed). One replaced later, mid-stream, fails with ABORTED (resume by etag).
        for attempt in range(GET_LARGE_ATTEMPTS):
            manifest = await self._large_manifest(request.bucket, request.key)
            if request.etag and request.etag != manifest.etag:
                raise Changed(f"object {request.bucket}/{request.key} is no longer the one with etag {request.etag}")
            if request.offset > manifest.size:
                raise InvalidRequest(f"offset {request.offset} is past the end of the object ({manifest.size} bytes)")
            end = manifest.size if request.length == 0 else min(manifest.size, request.offset + request.length)
            chunks = self.large.read_range(manifest, request.offset, end)
            try:
                first = await anext(chunks, b"")
            except pieces.ObjectChanged:
                await chunks.aclose()  # type: ignore[attr-defined]
                if request.etag or attempt + 1 == GET_LARGE_ATTEMPTS:
                    raise
                continue
            break
        try:
            yield objects_pb2.GetLargeResponse(info=_info(manifest))
            for start in range(0, len(first), CHUNK_BYTES):
                yield objects_pb2.GetLargeResponse(data=first[start : start + CHUNK_BYTES])
            async for chunk in chunks:
                for start in range(0, len(chunk), CHUNK_BYTES):
                    yield objects_pb2.GetLargeResponse(data=chunk[start : start + CHUNK_BYTES])
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    @translate_errors
    async def HeadLarge(
        self, request: objects_pb2.HeadRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.LargeInfo:
        return _info(await self._large_manifest(request.bucket, request.key))

    @translate_errors
    async def DeleteLarge(
        self, request: objects_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.DeleteResponse:
        self._large_names(request.bucket, request.key)
        request_id = keys.check_request_id(request.request_id, self.config)
        result = await self.large.delete_object(request.bucket, request.key, request_id)
        assert result is not None  # with a request id, a tombstone is always written
        return objects_pb2.DeleteResponse(ack=ack(result))
