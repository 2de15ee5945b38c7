"""The asyncio client (grpc.aio): the same methods as Client, as coroutines."""

from __future__ import annotations

import asyncio
import builtins
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import grpc

from replicator.client._api import (
    ADMIN,
    BLOCKS,
    LIST_PAGE_SIZE,
    OBJECTS,
    LargeSource,
    _Api,
    _Call,
    _items,
    _volume,
    large_first,
    large_timeout_s,
)
from replicator.client._common import (
    CHANNEL_OPTIONS,
    RETRYABLE,
    SAME_SITE_DEADLINES_MAX,
    LargeInfo,
    ObjectInfo,
    RequestIds,
    RetryPolicy,
    Rotation,
    VerifyResult,
    VolumeInfo,
    channel_credentials,
    check_endpoints,
    failure,
    verify_result,
)
from replicator.client.errors import ClientError, error_for
from replicator.client.sync import STREAM_ITEMS_PER_TIMEOUT, _code
from replicator.config import TlsFiles
from replicator.v1 import admin_pb2, admin_pb2_grpc, blocks_pb2, blocks_pb2_grpc, objects_pb2, objects_pb2_grpc


class AsyncClient(_Api):
    """Like Client, but every method is a coroutine. Create it inside a running event loop."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        tls: TlsFiles | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.endpoints = check_endpoints(endpoints)
        self.retry = retry or RetryPolicy()
        self._ids = RequestIds()
        self._rotation = Rotation(self.endpoints, self.retry)
        if credentials is None and tls is not None:
            credentials = channel_credentials(tls)
        self._channels = [
            grpc.aio.secure_channel(e, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.aio.insecure_channel(e, options=CHANNEL_OPTIONS)
            for e in self.endpoints
        ]
        self._stubs: builtins.list[dict[str, Any]] = [
            {
                OBJECTS: objects_pb2_grpc.ObjectServiceStub(channel),
                BLOCKS: blocks_pb2_grpc.BlockServiceStub(channel),
                ADMIN: admin_pb2_grpc.AdminServiceStub(channel),
            }
            for channel in self._channels
        ]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _timeout_s(self) -> float:
        return self.retry.call_timeout_ms / 1000

    async def _run(self, call: _Call) -> Any:
        if call.pinned:
            stub = getattr(self._stubs[0][call.service], call.method)
            try:
                return call.parse(await stub(call.request, timeout=self._timeout_s))
            except grpc.RpcError as error:
                raise failure(error, self.endpoints[0], [self.endpoints[0]]) from None

        async def invoke(stubs: dict[str, Any]) -> Any:
            return call.parse(await getattr(stubs[call.service], call.method)(call.request, timeout=self._timeout_s))

        return await self._retrying(invoke)

    async def _retrying(self, invoke: Callable[[dict[str, Any]], Awaitable[Any]]) -> Any:
        """`await invoke(stubs of one site)`, retried by the rule in _common.py."""
        tried: builtins.list[str] = []
        deadlines = 0  # consecutive DEADLINE_EXCEEDED at the current site
        for attempt in range(self.retry.attempts_max):
            delay = self._rotation.delay_s(attempt, switch=not 0 < deadlines < SAME_SITE_DEADLINES_MAX)
            if delay:
                await asyncio.sleep(delay)
            index = self._rotation.current
            tried.append(self.endpoints[index])
            try:
                return await invoke(self._stubs[index])
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.retry.attempts_max - 1:
                    raise failure(error, self.endpoints[index], tried) from None
                deadlines = deadlines + 1 if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 0
        raise AssertionError("unreachable")

    # ---- objects of any size (the S3 namespace); see Client for the rules

    async def put_large(
        self, bucket: str, key: str, source: bytes | bytearray | memoryview | BinaryIO, content_type: str = ""
    ) -> int:
        """Store an object of any size (see Client.put_large); a file is read in a worker thread."""
        body = LargeSource(source)
        request_id = self._ids.next()
        timeout = large_timeout_s(self._timeout_s, body.size)

        source_errors: builtins.list[Exception] = []

        async def messages() -> AsyncIterator[objects_pb2.PutLargeRequest]:
            yield large_first(bucket, key, body.size, request_id, content_type)
            chunks = body.chunks()
            while True:
                try:
                    chunk = next(chunks, None) if body.file is None else await asyncio.to_thread(next, chunks, None)
                except Exception as error:  # gRPC would report it as CANCELLED: the caller gets the source's error
                    source_errors.append(error)
                    raise
                if chunk is None:
                    return
                yield objects_pb2.PutLargeRequest(data=chunk)

        async def invoke(stubs: dict[str, Any]) -> int:
            try:
                return int((await stubs[OBJECTS].PutLarge(messages(), timeout=timeout)).ack.ts)
            except grpc.RpcError:
                if source_errors:
                    raise source_errors[0] from None
                raise

        return int(await self._retrying(invoke))

    async def iter_large(self, bucket: str, key: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        """The bytes [offset, offset + length) of a large object, chunk by chunk (see Client.iter_large)."""
        info: LargeInfo = await self.head_large(bucket, key)
        async for chunk in self._iter_large(bucket, key, info, offset, length):
            yield chunk

    async def _iter_large(
        self, bucket: str, key: str, info: LargeInfo, offset: int, length: int
    ) -> AsyncIterator[bytes]:
        end = info.size_bytes if length == 0 else min(info.size_bytes, offset + length)
        position = offset
        timeout = large_timeout_s(self._timeout_s, max(0, end - offset))
        tried: builtins.list[str] = []
        attempt = 0  # failures since the last byte received
        while position < end:
            delay = self._rotation.delay_s(attempt)
            if delay:
                await asyncio.sleep(delay)
            index = self._rotation.current
            tried.append(self.endpoints[index])
            request = objects_pb2.GetLargeRequest(
                bucket=bucket, key=key, offset=position, length=end - position, etag=info.etag
            )
            try:
                async for message in self._stubs[index][OBJECTS].GetLarge(request, timeout=timeout):
                    if message.data:
                        position += len(message.data)
                        attempt = 0
                        yield message.data
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.retry.attempts_max - 1:
                    raise failure(error, self.endpoints[index], tried) from None
                attempt += 1
                continue
            if position < end:
                raise ClientError(f"GetLarge ended at byte {position} of {end}", None, self.endpoints[index])

    async def get_large(self, bucket: str, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.iter_large(bucket, key)])

    async def get_large_to(self, bucket: str, key: str, file: BinaryIO) -> LargeInfo:
        """Write a large object to a binary file (written in a worker thread); returns its LargeInfo."""
        info: LargeInfo = await self.head_large(bucket, key)
        async for chunk in self._iter_large(bucket, key, info, 0, 0):
            await asyncio.to_thread(file.write, chunk)
        return info

    async def list_objects(self, bucket: str, prefix: str = "") -> builtins.list[ObjectInfo]:
        found: builtins.list[ObjectInfo] = []
        token = b""
        while True:
            request = objects_pb2.ListRequest(bucket=bucket, prefix=prefix, page_size=LIST_PAGE_SIZE, page_token=token)
            page = await self._run(_Call(OBJECTS, "List", request, lambda r: r))
            found += [ObjectInfo(o.key, o.size_bytes, o.ts) for o in page.objects]
            token = page.next_page_token
            if not token:
                return found

    async def list(self, bucket: str, prefix: str = "") -> builtins.list[str]:
        return [info.key for info in await self.list_objects(bucket, prefix)]

    async def list_volumes(self) -> builtins.list[VolumeInfo]:
        found: builtins.list[VolumeInfo] = []
        token = b""
        while True:
            request = blocks_pb2.ListVolumesRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            page = await self._run(_Call(BLOCKS, "ListVolumes", request, lambda r: r))
            found += [_volume(v) for v in page.volumes]
            token = page.next_page_token
            if not token:
                return found

    async def put_many(
        self, bucket: str, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]
    ) -> builtins.list[int]:
        """Pipelined puts over one stream; see Client.put_many."""
        requests = [
            objects_pb2.PutRequest(bucket=bucket, key=k, data=bytes(v), request_id=self._ids.next())
            for k, v in _items(items)
        ]
        results: builtins.list[int | None] = [None] * len(requests)
        pending = {request.request_id: index for index, request in enumerate(requests)}
        failed: builtins.list[ClientError] = []
        tried: builtins.list[str] = []
        last: ClientError | None = None
        for attempt in range(self.retry.attempts_max):
            if not pending:
                break
            delay = self._rotation.delay_s(attempt)
            if delay:
                await asyncio.sleep(delay)
            index = self._rotation.current
            endpoint = self.endpoints[index]
            tried.append(endpoint)
            batch = [requests[i] for i in sorted(pending.values())]
            timeout = self._timeout_s * math.ceil(1 + len(batch) / STREAM_ITEMS_PER_TIMEOUT)

            async def send(
                batch: builtins.list[objects_pb2.PutRequest] = batch,
            ) -> AsyncIterator[objects_pb2.PutRequest]:
                for request in batch:
                    yield request

            try:
                async for response in self._stubs[index][OBJECTS].PutStream(send(), timeout=timeout):
                    position = pending.get(response.request_id)
                    if position is None:
                        continue
                    if response.HasField("ack"):
                        results[position] = response.ack.ts
                        del pending[response.request_id]
                        continue
                    code = _code(response.error.code)
                    last = error_for(code, response.error.message, endpoint)
                    if code not in RETRYABLE:
                        del pending[response.request_id]
                        failed.append(error_for(code, f"{requests[position].key}: {response.error.message}", endpoint))
            except grpc.RpcError as error:
                last = failure(error, endpoint, tried)
                if error.code() not in RETRYABLE:
                    raise last from None
        if failed:
            raise failed[0]
        if pending:
            assert last is not None
            raise last
        return [ts for ts in results if ts is not None]

    async def verify(self, repair: bool = False, progress: Callable[[int, int], None] | None = None) -> VerifyResult:
        stream = self._stubs[0][ADMIN].Verify(admin_pb2.VerifyRequest(repair=repair))
        try:
            async for event in stream:
                if event.HasField("progress"):
                    if progress is not None:
                        progress(event.progress.done, event.progress.total)
                else:
                    return verify_result(event.report)
        except grpc.RpcError as error:
            raise failure(error, self.endpoints[0], [self.endpoints[0]]) from None
        raise ClientError("verify stream ended without a report", None, self.endpoints[0])
