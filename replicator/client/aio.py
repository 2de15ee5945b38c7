"""The asyncio client (grpc.aio): the same methods as Client, as coroutines."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import grpc

from replicator.client._api import (
    ADMIN,
    BLOCKS,
    LIST_PAGE_SIZE,
    OBJECTS,
    SESSION,
    LargeSource,
    _Api,
    _Call,
    _items,
    _volume,
    large_first,
    large_timeout_s,
    stubs_of,
)
from replicator.client._common import (
    CHANNEL_OPTIONS,
    LargeInfo,
    ObjectInfo,
    PutMany,
    RequestIds,
    RetryingShell,
    RetryPolicy,
    VerifyResult,
    VolumeInfo,
    channel_credentials,
    check_endpoints,
    classify,
    failure,
    retry_after_ms,
    verify_result,
)
from replicator.client.errors import ClientError
from replicator.client.retry import Outcome
from replicator.client.session import AsyncSession, session_kind
from replicator.config import TlsFiles
from replicator.v1 import admin_pb2, blocks_pb2, objects_pb2


class AsyncClient(_Api, RetryingShell):
    """Like Client, but every method is a coroutine. Create it inside a running event loop."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        tls: TlsFiles | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retry: RetryPolicy | None = None,
        multiplex: bool = True,
    ) -> None:
        self.endpoints = check_endpoints(endpoints)
        self.multiplex = multiplex
        self.retry = retry or RetryPolicy()
        self._ids = RequestIds()
        self._current = 0  # sticky: the site that answered (or was tried) last
        if credentials is None and tls is not None:
            credentials = channel_credentials(tls)
        self._channels = [
            grpc.aio.secure_channel(e, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.aio.insecure_channel(e, options=CHANNEL_OPTIONS)
            for e in self.endpoints
        ]
        self._stubs = [stubs_of(channel) for channel in self._channels]
        self._sessions = [AsyncSession(stubs[OBJECTS], e) for stubs, e in zip(self._stubs, self.endpoints, strict=True)]
        for stubs, session in zip(self._stubs, self._sessions, strict=True):
            stubs[SESSION] = session

    async def close(self) -> None:
        for session in self._sessions:
            await session.close()
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
        kind = session_kind(call.method, call.request) if self.multiplex and call.service == OBJECTS else None

        async def invoke(stubs: dict[str, Any]) -> Any:
            if kind is not None:  # multiplexed: on the site's session stream (session.py)
                return call.parse(await stubs[SESSION].call(kind, call.request, self._timeout_s))
            return call.parse(await getattr(stubs[call.service], call.method)(call.request, timeout=self._timeout_s))

        return await self._retrying(invoke, call.write, call.pinned)

    async def _retrying(
        self, invoke: Callable[[dict[str, Any]], Awaitable[Any]], write: bool, pinned: bool = False
    ) -> Any:
        """`await invoke(stubs of one site)`, attempted as a RetryPlan says (retry.py)."""
        plan = self._plan(write, pinned)
        await asyncio.sleep(plan.start().delay_s)
        while True:
            try:
                return self._succeeded(plan, await invoke(self._stubs[plan.endpoint]))
            except grpc.RpcError as error:
                await asyncio.sleep(self._failed(plan, error))

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

        return int(await self._retrying(invoke, write=True))

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
        plan = self._plan(write=False)
        plan.start()
        while position < end:
            request = objects_pb2.GetLargeRequest(
                bucket=bucket, key=key, offset=position, length=end - position, etag=info.etag
            )
            try:
                async for message in self._stubs[plan.endpoint][OBJECTS].GetLarge(request, timeout=timeout):
                    if message.data:
                        position += len(message.data)
                        plan.progressed()  # failures count from the last byte received
                        yield message.data
            except grpc.RpcError as error:
                await asyncio.sleep(self._failed(plan, error))
                continue
            if position < end:
                raise ClientError(f"GetLarge ended at byte {position} of {end}", None, self.endpoints[plan.endpoint])

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
        if not requests:
            return []
        many = PutMany(requests, self._timeout_s)
        plan = self._plan(write=True)
        await asyncio.sleep(plan.start().delay_s)
        while True:
            endpoint = self.endpoints[plan.endpoint]
            batch = many.batch()

            async def send(
                batch: builtins.list[objects_pb2.PutRequest] = batch,
            ) -> AsyncIterator[objects_pb2.PutRequest]:
                for request in batch:
                    yield request

            try:
                async for response in self._stubs[plan.endpoint][OBJECTS].PutStream(send(), timeout=many.timeout_s()):
                    many.answered(response, endpoint)
            except grpc.RpcError as error:
                await asyncio.sleep(self._next(plan, classify(error), many.give_up_after(error), retry_after_ms(error)))
                continue
            outcome = many.outcome()
            if outcome is Outcome.OK:
                return self._succeeded(plan, many.results())
            await asyncio.sleep(self._next(plan, outcome, many.give_up))

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
