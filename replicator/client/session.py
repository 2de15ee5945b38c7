"""Multiplexed calls: one Session stream per site carries every concurrent call of a client.

Theory of operation. A unary gRPC call costs the server ~100-200 µs of CPU in
Python grpc.aio (docs/performance.md), more than the rest of a replicated put.
So, in the client's multiplexed mode (the default), the simple object calls
(put, put_batch, get, head, delete, list) of every thread (Client) or task
(AsyncClient) of one client go over one long-lived bidirectional stream per
site, `ObjectService.Session`, opened on the first call to that site. Each call
sends one `SessionRequest` with a tag the session picks (unique for the
session's life) and waits for the `SessionResponse` carrying the same tag; the
server answers calls in completion order.

Failures look to the retry shell exactly as a unary call's would: the session
turns a per-call `ItemError` into a `SessionError`, a `grpc.RpcError` with the
same code, details and trailers (`replicator-other-site`,
`replicator-retry-after-ms`) the unary call would have ended with, and
`RetryingShell` classifies it unchanged. When the stream itself breaks (the
site stopped: UNAVAILABLE or CANCELLED), every call in flight on it fails with
the stream's status, as each unary call would have on its own connection (a
write's outcome is unknown; the retry plan retries it with the same request
id), and the next call opens a new stream. A call that has no answer within
its deadline fails with DEADLINE_EXCEEDED (its late answer is dropped), as a
unary call's would; the deadline also travels in the request (`timeout_ms`),
so that the server answers "outcome unknown" before the client gives up.

Packing. The calls waiting to be sent when the stream's writer takes the next
one go together, as one message (`SessionRequest.more`), and the server answers
the calls done at once as one message (`SessionResponse.more`): one gRPC
message read and written per pack instead of per call, on both sides, and the
site's backend gets the pack's calls in one turn of its loop (one batch for
the core). Each call keeps its own tag, deadline, answer and error. A pack
holds at most `SESSION_PACK_CALLS_MAX` calls and, beyond its first,
`SESSION_PACK_BYTES_MAX` bytes. Both sides say in the stream's metadata that
they take packs (`replicator-session-pack: 1`: the client in its request, the
server in its answer's headers); neither packs for one that did not say so,
so older clients and servers work with newer ones unchanged.

Calls that the session does not carry go unary: the other methods, and any
request larger than `SESSION_ITEM_BYTES_MAX` (a message over the server's gRPC
limit would end the stream for every call on it; alone, unary, it gets its own
error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from replicator.v1 import common_pb2, objects_pb2

__all__ = ["AsyncSession", "SessionError", "SyncSession", "session_kind"]

# _Call.method -> the SessionRequest field that carries it (objects.proto, Session).
SESSION_CALLS = {
    "Put": "put",
    "PutBatch": "put_batch",
    "Get": "get",
    "Head": "head",
    "Delete": "delete",
    "List": "list",
}
# Larger requests go unary (see the module docstring): the default object_bytes_max plus room for a key.
SESSION_ITEM_BYTES_MAX = 1024 * 1024 + 64 * 1024
# Packed messages (see the module docstring); replicator/api/objects.py's Session packs answers the same.
SESSION_PACK_METADATA = ("replicator-session-pack", "1")
SESSION_PACK_BYTES_MAX = 256 * 1024
SESSION_PACK_CALLS_MAX = 64
OTHER_SITE_METADATA_KEY = "replicator-other-site"
RETRY_AFTER_METADATA_KEY = "replicator-retry-after-ms"


def session_kind(method: str, request: Any) -> str | None:
    """The Session field for this object call, or None when it goes unary."""
    kind = SESSION_CALLS.get(method)
    if kind is None or request.ByteSize() > SESSION_ITEM_BYTES_MAX:
        return None
    return kind


class SessionError(grpc.RpcError):
    """A call of a session failed: what the unary call would have raised (code, details, trailers)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailers = tuple(trailers)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


def _status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


def _item_failed(error: common_pb2.ItemError) -> SessionError:
    trailers = []
    if error.other_site:
        trailers.append((OTHER_SITE_METADATA_KEY, error.other_site))
    if error.retry_after_ms:
        trailers.append((RETRY_AFTER_METADATA_KEY, str(error.retry_after_ms)))
    return SessionError(_status_code(error.code), error.message, trailers)


def _stream_failed(error: grpc.RpcError | None) -> SessionError:
    """What each call in flight on a stream that ended gets: the stream's own status."""
    if error is None:
        return SessionError(grpc.StatusCode.UNAVAILABLE, "the site ended the session stream with calls in flight")
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    try:
        trailers = [(str(key), str(value)) for key, value in (error.trailing_metadata() or ())]
    except Exception:  # noqa: BLE001 - a connection-level error may have no trailers to give
        trailers = []
    return SessionError(code, f"session stream broke: {details or code.name}", trailers)


def _timed_out(timeout_s: float) -> SessionError:
    return SessionError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"no answer within {timeout_s:g} s on the session stream: the outcome is unknown, "
        "retry with the same request id to learn it",
    )


def _closed() -> SessionError:
    return SessionError(grpc.StatusCode.CANCELLED, "the client was closed")


def _request(tag: int, kind: str, request: Any, timeout_s: float) -> objects_pb2.SessionRequest:
    timeout_ms = min(max(1, math.ceil(timeout_s * 1000)), (1 << 32) - 1)
    message = objects_pb2.SessionRequest(tag=tag, timeout_ms=timeout_ms)
    getattr(message, kind).CopyFrom(request)
    return message


def _answer(response: objects_pb2.SessionResponse, kind: str) -> Any:
    """The unary answer inside a session answer, or raise the unary call's error."""
    got = response.WhichOneof("result")
    if got == "error":
        raise _item_failed(response.error)
    if got != kind:
        # The server answered this tag with another call's kind: a broken server, never retried.
        raise SessionError(grpc.StatusCode.INTERNAL, f"the session answered a {kind} call with {got!r}")
    return getattr(response, kind)


class _Packer:
    """Packs the requests a stream's writer finds waiting into one message (see the module docstring)."""

    def __init__(self) -> None:
        self.enabled = False  # set once the server's headers said it takes packs
        self.carried: objects_pb2.SessionRequest | None = None  # taken, did not fit the last pack
        self.packs_sent = 0
        self.calls_sent = 0

    def pack(self, first: objects_pb2.SessionRequest, take: Any) -> tuple[objects_pb2.SessionRequest, bool]:
        """`first` with what `take()` gives (a request, None at the end of the stream, or raises when
        nothing waits) packed into its `more`; and whether the end was taken."""
        rest: list[objects_pb2.SessionRequest] = []
        ended = False
        if self.enabled:
            total = 0
            while len(rest) + 1 < SESSION_PACK_CALLS_MAX:
                try:
                    following = take()
                except (queue.Empty, asyncio.QueueEmpty):
                    break
                if following is None:
                    ended = True
                    break
                total += following.ByteSize()
                if total > SESSION_PACK_BYTES_MAX:
                    self.carried = following
                    break
                rest.append(following)
        if rest:
            first.more.extend(rest)
        self.packs_sent += 1
        self.calls_sent += 1 + len(rest)
        return first, ended

    def next_carried(self) -> objects_pb2.SessionRequest | None:
        carried, self.carried = self.carried, None
        return carried


# ------------------------------------------------------------------ blocking (threads)


class _SyncStream:
    """One Session call and the calls in flight on it, answered by a reader thread."""

    def __init__(self, stub: Any) -> None:
        self.requests: queue.SimpleQueue[objects_pb2.SessionRequest | None] = queue.SimpleQueue()
        self.pending: dict[int, concurrent.futures.Future[objects_pb2.SessionResponse]] = {}
        self.packer = _Packer()
        # gRPC's own thread takes the requests from the queue (None ends the stream).
        self.call = stub.Session(self._outgoing(), metadata=(SESSION_PACK_METADATA,))

    def _outgoing(self) -> Any:
        while True:
            message = self.packer.next_carried()
            if message is None:
                message = self.requests.get()
            if message is None:
                return
            packed, ended = self.packer.pack(message, self.requests.get_nowait)
            yield packed
            if ended:
                return


class SyncSession:
    """The session of one site for the blocking client; shared by its threads (see the module docstring)."""

    def __init__(self, stub: Any, endpoint: str) -> None:
        self._stub = stub
        self._endpoint = endpoint
        self._lock = threading.Lock()  # guards _stream, _closed and every stream's pending set
        self._stream: _SyncStream | None = None
        self._closed = False
        self._tags = itertools.count(1)
        self.streams_opened = 0

    def call(self, kind: str, request: Any, timeout_s: float) -> Any:
        tag = next(self._tags)
        message = _request(tag, kind, request, timeout_s)
        future: concurrent.futures.Future[objects_pb2.SessionResponse] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise _closed()
            stream = self._stream
            if stream is None:  # lazily: the first call, or the first after a stream broke
                stream = self._stream = _SyncStream(self._stub)
                self.streams_opened += 1
                threading.Thread(
                    target=self._read, args=(stream,), name=f"replicator-session-{self._endpoint}", daemon=True
                ).start()
            stream.pending[tag] = future
            stream.requests.put(message)
        try:
            response = future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise _timed_out(timeout_s) from None
        finally:
            with self._lock:
                stream.pending.pop(tag, None)
        return _answer(response, kind)

    def _read(self, stream: _SyncStream) -> None:
        error: grpc.RpcError | None = None
        try:
            stream.packer.enabled = SESSION_PACK_METADATA in tuple(stream.call.initial_metadata() or ())
            for message in stream.call:
                for response in (message, *message.more):
                    with self._lock:
                        future = stream.pending.pop(response.tag, None)
                    if future is not None:  # None: its caller timed out and left
                        future.set_result(response)
        except grpc.RpcError as broken:
            error = broken
        with self._lock:
            if self._stream is stream:
                self._stream = None
            failed = list(stream.pending.values())
            stream.pending.clear()
        stream.requests.put(None)
        for future in failed:
            future.set_exception(_closed() if self._closed else _stream_failed(error))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.requests.put(None)
            stream.call.cancel()


# ------------------------------------------------------------------ asyncio (tasks)


class _AsyncStream:
    """One Session call and the calls in flight on it, answered by a reader task."""

    def __init__(self, stub: Any) -> None:
        self.requests: asyncio.Queue[objects_pb2.SessionRequest | None] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[objects_pb2.SessionResponse]] = {}
        self.packer = _Packer()
        self.call = stub.Session(self._outgoing(), metadata=(SESSION_PACK_METADATA,))
        self.reader: asyncio.Task[None] | None = None

    async def _outgoing(self) -> AsyncIterator[objects_pb2.SessionRequest]:
        # One writer (gRPC's task consuming this iterator): grpc.aio allows one write at a time.
        while True:
            message = self.packer.next_carried()
            if message is None:
                message = await self.requests.get()
            if message is None:
                return
            packed, ended = self.packer.pack(message, self.requests.get_nowait)
            yield packed
            if ended:
                return


class AsyncSession:
    """The session of one site for the asyncio client; shared by its tasks (one event loop)."""

    def __init__(self, stub: Any, endpoint: str) -> None:
        self._stub = stub
        self._endpoint = endpoint
        self._stream: _AsyncStream | None = None
        self._closed = False
        self._tags = itertools.count(1)
        self.streams_opened = 0

    async def call(self, kind: str, request: Any, timeout_s: float) -> Any:
        if self._closed:
            raise _closed()
        tag = next(self._tags)
        message = _request(tag, kind, request, timeout_s)
        stream = self._stream
        if stream is None:  # lazily: the first call, or the first after a stream broke
            stream = self._stream = _AsyncStream(self._stub)
            self.streams_opened += 1
            stream.reader = asyncio.get_running_loop().create_task(
                self._read(stream), name=f"replicator-session-{self._endpoint}"
            )
        future: asyncio.Future[objects_pb2.SessionResponse] = asyncio.get_running_loop().create_future()
        stream.pending[tag] = future
        stream.requests.put_nowait(message)
        try:
            response = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise _timed_out(timeout_s) from None
        finally:
            stream.pending.pop(tag, None)
        return _answer(response, kind)

    async def _read(self, stream: _AsyncStream) -> None:
        error: grpc.RpcError | None = None
        try:
            stream.packer.enabled = SESSION_PACK_METADATA in tuple(await stream.call.initial_metadata() or ())
            async for message in stream.call:
                for response in (message, *message.more):
                    future = stream.pending.pop(response.tag, None)
                    if future is not None and not future.done():  # gone or done: its caller timed out and left
                        future.set_result(response)
        except grpc.RpcError as broken:
            error = broken
        except asyncio.CancelledError:
            error = _closed()
        if self._stream is stream:
            self._stream = None
        stream.requests.put_nowait(None)
        failed = list(stream.pending.values())
        stream.pending.clear()
        for future in failed:
            if not future.done():
                future.set_exception(_closed() if self._closed else _stream_failed(error))

    async def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.requests.put_nowait(None)
            stream.call.cancel()
            if stream.reader is not None:
                await asyncio.gather(stream.reader, return_exceptions=True)
