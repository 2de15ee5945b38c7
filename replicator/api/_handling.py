"""Shared servicer plumbing: error mapping, deadlines and pipelined streams.

Every servicer method is wrapped by `translate_errors`, which maps the typed
backend errors (errors.py) to exactly one gRPC status. An error not in that
list is a bug: it is not caught here (grpc answers UNKNOWN and logs it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from replicator.api import errors
from replicator.api.backend import SiteBackend, WriteResult
from replicator.config import ApiConfig
from replicator.v1 import common_pb2

log = logging.getLogger("replicator.api")

OTHER_SITE_METADATA_KEY = "replicator-other-site"
RETRY_AFTER_METADATA_KEY = "replicator-retry-after-ms"

# The servicer stops this long before the client's deadline, so that an
# outcome-unknown answer reaches the client before it gives up on its own.
DEADLINE_MARGIN_S = 0.05

_CODES: dict[type[errors.BackendError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.OutcomeUnknown: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Corrupt: grpc.StatusCode.DATA_LOSS,
    errors.Refused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Changed: grpc.StatusCode.ABORTED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def describe(backend: SiteBackend, error: Exception) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, other site address) for an operating error."""
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "outcome unknown: timed out, retry with the same request id", ""
    assert isinstance(error, errors.BackendError), error
    code = next(c for kind, c in _CODES.items() if isinstance(error, kind))
    if isinstance(error, errors.OutcomeUnknown):
        message = error.message
        if "request id" not in message:
            message += ": the outcome is unknown, retry with the same request id to learn it"
        return code, message, ""
    if not isinstance(error, errors.Unavailable):
        return code, error.message, ""
    other = error.other_site_address
    status = backend.status()
    if not other:
        other = status.peer_address
    peer = f"site {status.peer!r}" if status.peer else "the other site"
    where = f"{peer} at {other}" if other else peer
    return code, f"site {backend.site_name!r} cannot serve ({error.message}); try {where}", other


def item_error(backend: SiteBackend, error: Exception) -> common_pb2.ItemError:
    """The per-item twin of `abort`: the same code and message, the trailers as fields."""
    code, message, other = describe(backend, error)
    retry_after = error.retry_after_ms if isinstance(error, errors.Overloaded) and not other else 0
    return common_pb2.ItemError(code=code.value[0], message=message, other_site=other, retry_after_ms=retry_after)


OPERATING_ERRORS = (errors.BackendError, TimeoutError)

F = TypeVar("F", bound=Callable[..., Any])


def translate_errors(method: F) -> F:
    """Map typed backend errors raised by a unary servicer method to gRPC statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except OPERATING_ERRORS as error:
            await abort(self.backend, context, error)

    return wrapper  # type: ignore[return-value]


def translate_stream_errors(method: F) -> F:
    """The same for server-streaming methods (async generators)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in method(self, request, context):
                yield response
        except OPERATING_ERRORS as error:
            await abort(self.backend, context, error)

    return wrapper  # type: ignore[return-value]


async def abort(backend: SiteBackend, context: grpc.aio.ServicerContext, error: Exception) -> None:
    code, message, other = describe(backend, error)
    if other:
        context.set_trailing_metadata(((OTHER_SITE_METADATA_KEY, other),))
    elif isinstance(error, errors.Overloaded):
        context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(error.retry_after_ms)),))
    await context.abort(code, message)


def timeout_s(context: grpc.aio.ServicerContext | None, config: ApiConfig) -> float:
    """How long the backend may take: the configured bound, cut to the client's deadline."""
    bound = config.request_timeout_ms / 1000
    remaining: float | None = context.time_remaining() if context is not None else None
    if remaining is None:
        return bound
    remaining -= DEADLINE_MARGIN_S
    if remaining <= 0:
        raise errors.OutcomeUnknown("the deadline expired before the request could start (nothing applied)")
    return min(bound, remaining)


def item_timeout_s(timeout_ms: int, config: ApiConfig) -> float:
    """`timeout_s` for one call of a session: its own timeout_ms (from when the server starts it) plays
    the part of the unary call's deadline; 0 means the configured bound alone."""
    bound = config.request_timeout_ms / 1000
    if not timeout_ms:
        return bound
    remaining = timeout_ms / 1000 - DEADLINE_MARGIN_S
    if remaining <= 0:
        raise errors.OutcomeUnknown(f"timeout_ms {timeout_ms} leaves no time to serve the call (nothing applied)")
    return min(bound, remaining)


def ack(result: WriteResult) -> common_pb2.WriteAck:
    assert 0 <= result.ts < 1 << 64, result
    return common_pb2.WriteAck(ts=result.ts, duplicate=result.duplicate)


class PipelinedStream:
    """Runs the items of one bidi stream concurrently, bounded, answering each as it completes.

    At most `inflight_max` items are being processed or waiting to be written
    back: the reader takes a permit before starting an item and the writer
    returns it after sending the item's answer, so a slow reader of answers
    throttles the stream (gRPC flow control does the rest). When the client
    goes away, items already handed to the backend run to completion (a
    write cut in the middle would leave the client nothing to learn its
    outcome from but a retry with the same request id, which works anyway).
    """

    # Items still running after their stream ended, kept referenced so they finish.
    _orphans: set[asyncio.Task[Any]] = set()

    def __init__(self, inflight_max: int) -> None:
        self._permits = asyncio.Semaphore(inflight_max)
        self._answers: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._reading = False  # the reader waits for a request or a permit (where stop() may cut it)
        self.stopped = False

    def stop(self) -> None:
        """Read no more requests (the server is stopping); the items started run on and are answered,
        then `run` ends. Whatever the client sent after that was not read: nothing of it is applied."""
        self.stopped = True
        if self._reader is not None and self._reading:
            self._reader.cancel()

    async def run(self, requests: AsyncIterator[Any], handle: Callable[[Any], Awaitable[Any]]) -> AsyncIterator[Any]:
        """Each answer as it completes (`run_batches` one answer at a time)."""
        async for batch in self.run_batches(requests, handle, 0, 1, lambda answer: 0):
            yield batch[0]

    async def run_batches(
        self,
        requests: AsyncIterator[Any],
        handle: Callable[[Any], Awaitable[Any]],
        bytes_max: int,
        count_max: int,
        size: Callable[[Any], int],
    ) -> AsyncIterator[list[Any]]:
        """As `run`, but yields the answers ready at once as one list (to be sent as one message): at most
        `count_max` of them, and more than one only while their `size` adds up to at most `bytes_max`."""
        reader = self._reader = asyncio.create_task(self._read(requests, handle))
        carried: Any = None  # an answer taken that did not fit the last batch: it starts the next one
        ended = False  # the end (None) was taken while filling a batch
        try:
            while not ended:
                answer = carried if carried is not None else await self._answers.get()
                carried = None
                if answer is None:
                    break
                batch, total = [answer], size(answer)
                while len(batch) < count_max and not self._answers.empty():
                    following = self._answers.get_nowait()
                    if following is None:
                        ended = True
                        break
                    total += size(following)
                    if total > bytes_max:
                        carried = following
                        break
                    batch.append(following)
                yield batch
                for _ in batch:
                    self._permits.release()
            await reader  # re-raises a failure of the request stream
        finally:
            if not reader.done():
                reader.cancel()

    async def _read(self, requests: AsyncIterator[Any], handle: Callable[[Any], Awaitable[Any]]) -> None:
        running: set[asyncio.Task[Any]] = set()
        try:
            self._reading = True
            try:
                async for request in requests:
                    if self.stopped:  # stop() came before the reader first waited
                        break
                    await self._permits.acquire()
                    task = asyncio.create_task(self._one(handle, request))
                    running.add(task)
                    self._orphans.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(self._orphans.discard)
            except asyncio.CancelledError:
                if not self.stopped:
                    raise
            finally:
                self._reading = False
            if running:
                await asyncio.wait(list(running))
        finally:
            self._answers.put_nowait(None)

    async def _one(self, handle: Callable[[Any], Awaitable[Any]], request: Any) -> None:
        answer = await handle(request)
        await self._answers.put(answer)
