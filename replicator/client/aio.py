"""The asyncio client (grpc.aio): the same methods as Client, as coroutines."""

from __future__ import annotations

import asyncio
import builtins
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from replicator.client._api import ADMIN, BLOCKS, LIST_PAGE_SIZE, OBJECTS, _Api, _Call, _items, _volume
from replicator.client._common import (
    CHANNEL_OPTIONS,
    RETRYABLE,
    SAME_SITE_DEADLINES_MAX,
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
        tried: builtins.list[str] = []
        deadlines = 0  # consecutive DEADLINE_EXCEEDED at the current site
        for attempt in range(self.retry.attempts_max):
            delay = self._rotation.delay_s(attempt, switch=not 0 < deadlines < SAME_SITE_DEADLINES_MAX)
            if delay:
                await asyncio.sleep(delay)
            index = self._rotation.current
            tried.append(self.endpoints[index])
            stub = getattr(self._stubs[index][call.service], call.method)
            try:
                return call.parse(await stub(call.request, timeout=self._timeout_s))
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.retry.attempts_max - 1:
                    raise failure(error, self.endpoints[index], tried) from None
                deadlines = deadlines + 1 if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 0
        raise AssertionError("unreachable")

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
