"""The blocking client (grpc sync channels); safe to share between threads."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from replicator.client.session import SyncSession, session_kind
from replicator.config import TlsFiles
from replicator.v1 import admin_pb2, blocks_pb2, objects_pb2


class Client(_Api, RetryingShell):
    """Talks to one or two sites; with two, fails over between them on its own.

    `tls` (CA, cert, key) turns on mutual TLS; `credentials` overrides it with
    any grpc.ChannelCredentials. `retry` bounds attempts, backoff and each
    call's deadline. `multiplex` (the default) sends the simple object calls
    (put, put_batch, get, head, delete, list) of all threads over one session
    stream per site instead of a unary gRPC call each (session.py: the same
    answers, errors, request ids and retries); False makes every call unary.
    """

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
            grpc.secure_channel(e, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.insecure_channel(e, options=CHANNEL_OPTIONS)
            for e in self.endpoints
        ]
        self._stubs = [stubs_of(channel) for channel in self._channels]
        self._sessions = [SyncSession(stubs[OBJECTS], e) for stubs, e in zip(self._stubs, self.endpoints, strict=True)]
        for stubs, session in zip(self._stubs, self._sessions, strict=True):
            stubs[SESSION] = session

    def close(self) -> None:
        for session in self._sessions:
            session.close()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _timeout_s(self) -> float:
        return self.retry.call_timeout_ms / 1000

    def _run(self, call: _Call) -> Any:
        kind = session_kind(call.method, call.request) if self.multiplex and call.service == OBJECTS else None
        if kind is not None:  # multiplexed: on the site's session stream (session.py)
            return self._retrying(
                lambda site: call.parse(site[SESSION].call(kind, call.request, self._timeout_s)), call.write
            )
        return self._retrying(
            lambda site: call.parse(getattr(site[call.service], call.method)(call.request, timeout=self._timeout_s)),
            call.write,
            call.pinned,
        )

    def _retrying(self, invoke: Callable[[dict[str, Any]], Any], write: bool, pinned: bool = False) -> Any:
        """`invoke(stubs of one site)`, attempted as a RetryPlan says (retry.py)."""
        plan = self._plan(write, pinned)
        time.sleep(plan.start().delay_s)
        while True:
            try:
                return self._succeeded(plan, invoke(self._stubs[plan.endpoint]))
            except grpc.RpcError as error:
                time.sleep(self._failed(plan, error))

    # ---- objects of any size (the S3 namespace)

    def put_large(
        self, bucket: str, key: str, source: bytes | bytearray | memoryview | BinaryIO, content_type: str = ""
    ) -> int:
        """Store an object of any size from bytes or a seekable binary file (read from its current
        position, in 1 MiB chunks, never whole); returns the commit timestamp.

        It becomes visible, at both sites, only once all of it is durable at both; S3 reads it as
        s3://bucket/key. Retried like any write (the body is sent again, with the same request id).
        """
        body = LargeSource(source)
        request_id = self._ids.next()
        timeout = large_timeout_s(self._timeout_s, body.size)

        source_errors: builtins.list[Exception] = []

        def messages() -> Iterator[objects_pb2.PutLargeRequest]:
            yield large_first(bucket, key, body.size, request_id, content_type)
            try:
                yield from (objects_pb2.PutLargeRequest(data=chunk) for chunk in body.chunks())
            except Exception as error:  # gRPC would report it as CANCELLED: the caller gets the source's error
                source_errors.append(error)
                raise

        def invoke(stubs: dict[str, Any]) -> int:
            try:
                return int(stubs[OBJECTS].PutLarge(messages(), timeout=timeout).ack.ts)
            except grpc.RpcError:
                if source_errors:
                    raise source_errors[0] from None
                raise

        return int(self._retrying(invoke, write=True))

    def iter_large(self, bucket: str, key: str, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        """The bytes [offset, offset + length) of a large object (length 0: to the end), chunk by chunk.

        A read cut by a site failure resumes where it stopped, at the other site, pinned to the
        object's etag: if the object was replaced meanwhile, the read ends with ClientError (ABORTED).
        """
        return self._iter_large(bucket, key, self.head_large(bucket, key), offset, length)

    def _iter_large(self, bucket: str, key: str, info: LargeInfo, offset: int, length: int) -> Iterator[bytes]:
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
                for message in self._stubs[plan.endpoint][OBJECTS].GetLarge(request, timeout=timeout):
                    if message.data:
                        position += len(message.data)
                        plan.progressed()  # failures count from the last byte received
                        yield message.data
            except grpc.RpcError as error:
                time.sleep(self._failed(plan, error))
                continue
            if position < end:
                raise ClientError(f"GetLarge ended at byte {position} of {end}", None, self.endpoints[plan.endpoint])

    def get_large(self, bucket: str, key: str) -> bytes:
        """A large object's bytes, whole (iter_large or get_large_to keep memory bounded)."""
        return b"".join(self.iter_large(bucket, key))

    def get_large_to(self, bucket: str, key: str, file: BinaryIO) -> LargeInfo:
        """Write a large object to a binary file, chunk by chunk; returns what head_large says of it."""
        info: LargeInfo = self.head_large(bucket, key)
        for chunk in self._iter_large(bucket, key, info, 0, 0):
            file.write(chunk)
        return info

    # ---- paginated and streaming calls

    def list_objects(self, bucket: str, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object of `bucket` under `prefix`, in key order (follows pagination)."""
        found: builtins.list[ObjectInfo] = []
        token = b""
        while True:
            request = objects_pb2.ListRequest(bucket=bucket, prefix=prefix, page_size=LIST_PAGE_SIZE, page_token=token)
            page = self._run(_Call(OBJECTS, "List", request, lambda r: r))
            found += [ObjectInfo(o.key, o.size_bytes, o.ts) for o in page.objects]
            token = page.next_page_token
            if not token:
                return found

    def list(self, bucket: str, prefix: str = "") -> builtins.list[str]:
        """Keys of `bucket` under `prefix`, in order (follows pagination)."""
        return [info.key for info in self.list_objects(bucket, prefix)]

    def list_volumes(self) -> builtins.list[VolumeInfo]:
        found: builtins.list[VolumeInfo] = []
        token = b""
        while True:
            request = blocks_pb2.ListVolumesRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            page = self._run(_Call(BLOCKS, "ListVolumes", request, lambda r: r))
            found += [_volume(v) for v in page.volumes]
            token = page.next_page_token
            if not token:
                return found

    def put_many(self, bucket: str, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> builtins.list[int]:
        """Pipelined puts over one stream: returns each item's commit timestamp, in input order.

        Items are independent (not atomic together; see put_batch). Items
        the site could not serve are retried, with their request ids, as any
        write is (retry.py: on the other site, or the same one after a
        timeout). If an item fails for good, ClientError is raised for the
        first such item; other items may have been applied.
        """
        requests = [
            objects_pb2.PutRequest(bucket=bucket, key=k, data=bytes(v), request_id=self._ids.next())
            for k, v in _items(items)
        ]
        if not requests:
            return []
        many = PutMany(requests, self._timeout_s)
        plan = self._plan(write=True)
        time.sleep(plan.start().delay_s)
        while True:
            endpoint = self.endpoints[plan.endpoint]
            try:
                for response in self._stubs[plan.endpoint][OBJECTS].PutStream(
                    iter(many.batch()), timeout=many.timeout_s()
                ):
                    many.answered(response, endpoint)
            except grpc.RpcError as error:
                time.sleep(self._next(plan, classify(error), many.give_up_after(error), retry_after_ms(error)))
                continue
            outcome = many.outcome()
            if outcome is Outcome.OK:
                return self._succeeded(plan, many.results())
            time.sleep(self._next(plan, outcome, many.give_up))

    def verify(self, repair: bool = False, progress: Callable[[int, int], None] | None = None) -> VerifyResult:
        """Compare the two replicas (through the first endpoint's site), calling progress(done, total)."""
        stream = self._stubs[0][ADMIN].Verify(admin_pb2.VerifyRequest(repair=repair))
        try:
            for event in stream:
                if event.HasField("progress"):
                    if progress is not None:
                        progress(event.progress.done, event.progress.total)
                else:
                    return verify_result(event.report)
        except grpc.RpcError as error:
            raise failure(error, self.endpoints[0], [self.endpoints[0]]) from None
        raise ClientError("verify stream ended without a report", None, self.endpoints[0])
