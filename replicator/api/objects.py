"""ObjectService servicer: bucket/key -> bytes over a SiteBackend (layout in keys.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from replicator.api import keys
from replicator.api._handling import (
    OPERATING_ERRORS,
    PipelinedStream,
    ack,
    item_error,
    timeout_s,
    translate_errors,
)
from replicator.api.backend import SiteBackend
from replicator.api.errors import InvalidRequest, NotFound
from replicator.config import ApiConfig
from replicator.core.records import Operation, Versioned
from replicator.v1 import objects_pb2, objects_pb2_grpc


class ObjectServicer(objects_pb2_grpc.ObjectServiceServicer):
    def __init__(self, backend: SiteBackend, config: ApiConfig) -> None:
        self.backend = backend
        self.config = config

    # ---- validation: everything is checked before the backend is called,
    # so a refused request has no effect at all.

    def _put_operation(self, bucket: str, key: str, data: bytes) -> Operation:
        storage_key = keys.object_key(keys.bucket_bytes(bucket, self.config), keys.object_key_bytes(key, self.config))
        if len(data) > self.config.object_bytes_max:
            raise InvalidRequest(
                f"object is {len(data)} bytes, the limit (object_bytes_max) is {self.config.object_bytes_max}"
            )
        return Operation(storage_key, data)

    async def _put(
        self, request: objects_pb2.PutRequest, context: grpc.aio.ServicerContext | None
    ) -> objects_pb2.PutResponse:
        operation = self._put_operation(request.bucket, request.key, request.data)
        request_id = keys.check_request_id(request.request_id, self.config)
        result = await self.backend.write([operation], request_id, timeout_s(context, self.config))
        return objects_pb2.PutResponse(ack=ack(result))

    async def _read_object(self, bucket: str, key: str, context: grpc.aio.ServicerContext) -> Versioned:
        storage_key = keys.object_key(keys.bucket_bytes(bucket, self.config), keys.object_key_bytes(key, self.config))
        version = await self.backend.read(storage_key, timeout_s(context, self.config))
        if version is None or version.value is None:
            raise NotFound(f"object {bucket}/{key} not found")
        return version

    # ---- RPCs

    @translate_errors
    async def Put(self, request: objects_pb2.PutRequest, context: grpc.aio.ServicerContext) -> objects_pb2.PutResponse:
        return await self._put(request, context)

    @translate_errors
    async def PutBatch(
        self, request: objects_pb2.PutBatchRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.PutResponse:
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
        result = await self.backend.write(operations, request_id, timeout_s(context, self.config))
        return objects_pb2.PutResponse(ack=ack(result))

    async def PutStream(
        self, request_iterator: AsyncIterator[objects_pb2.PutRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[objects_pb2.PutStreamResponse]:
        async def handle(request: objects_pb2.PutRequest) -> objects_pb2.PutStreamResponse:
            try:
                # Items of a long-lived stream are bounded one by one, not by the stream's deadline.
                response = await self._put(request, None)
            except OPERATING_ERRORS as error:
                return objects_pb2.PutStreamResponse(
                    request_id=request.request_id, error=item_error(self.backend, error)
                )
            return objects_pb2.PutStreamResponse(request_id=request.request_id, ack=response.ack)

        async for answer in PipelinedStream(self.config.stream_inflight_max).run(request_iterator, handle):
            yield answer

    @translate_errors
    async def Get(self, request: objects_pb2.GetRequest, context: grpc.aio.ServicerContext) -> objects_pb2.GetResponse:
        version = await self._read_object(request.bucket, request.key, context)
        assert version.value is not None
        return objects_pb2.GetResponse(data=version.value, ts=version.ts)

    @translate_errors
    async def Head(
        self, request: objects_pb2.HeadRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.HeadResponse:
        version = await self._read_object(request.bucket, request.key, context)
        assert version.value is not None
        return objects_pb2.HeadResponse(size_bytes=len(version.value), ts=version.ts)

    @translate_errors
    async def Delete(
        self, request: objects_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.DeleteResponse:
        storage_key = keys.object_key(
            keys.bucket_bytes(request.bucket, self.config), keys.object_key_bytes(request.key, self.config)
        )
        request_id = keys.check_request_id(request.request_id, self.config)
        result = await self.backend.write([Operation(storage_key, None)], request_id, timeout_s(context, self.config))
        return objects_pb2.DeleteResponse(ack=ack(result))

    @translate_errors
    async def List(
        self, request: objects_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> objects_pb2.ListResponse:
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
        versions = await self.backend.scan(start, range_end, page_size, timeout_s(context, self.config))
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
