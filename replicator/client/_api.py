"""The client's methods, written once for both flavours.

Each simple method builds its request (a write draws its request id here,
once, so every retry carries the same id) and hands a `_Call` to `_run`,
which the blocking Client implements with a loop and the AsyncClient with a
coroutine; so on AsyncClient these same methods return awaitables. Methods
that loop over pages or streams are written in each flavour.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from replicator.client._common import LargeInfo, ObjectInfo, RequestIds, VolumeInfo, status_from_message
from replicator.v1 import admin_pb2, admin_pb2_grpc, blocks_pb2, blocks_pb2_grpc, objects_pb2, objects_pb2_grpc

OBJECTS, BLOCKS, ADMIN = "objects", "blocks", "admin"
SESSION = "session"  # a site's multiplexed session (session.py), beside its stubs
LIST_PAGE_SIZE = 1000
LARGE_CHUNK_BYTES = 1024 * 1024  # one PutLarge message's data
# A large transfer's deadline: the call timeout plus its size at this rate (a slow, loaded pair).
LARGE_BYTES_PER_S_MIN = 1024 * 1024


def large_timeout_s(call_timeout_s: float, size: int) -> float:
    return call_timeout_s + size / LARGE_BYTES_PER_S_MIN


class LargeSource:
    """What put_large sends: bytes, or a binary file read from its current position to its end.

    `chunks()` starts again from the beginning each time (a retry re-sends the body), so a
    file must be seekable; nothing is read before the server accepted the declared size.
    """

    def __init__(self, source: bytes | bytearray | memoryview | BinaryIO) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data: memoryview | None = memoryview(source).cast("B")
            self.file: BinaryIO | None = None
            self.start = 0
            self.size = len(self.data)
            return
        if not hasattr(source, "read") or not source.seekable():
            raise TypeError("put_large takes bytes or a seekable binary file")
        self.data = None
        self.file = source
        self.start = source.tell()
        self.size = source.seek(0, io.SEEK_END) - self.start
        source.seek(self.start)

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            for offset in range(0, self.size, LARGE_CHUNK_BYTES):
                yield bytes(self.data[offset : offset + LARGE_CHUNK_BYTES])
            return
        assert self.file is not None
        self.file.seek(self.start)
        left = self.size
        while left > 0:
            chunk = self.file.read(min(LARGE_CHUNK_BYTES, left))
            if not chunk:
                raise ValueError(f"the file ended {left} bytes before the size it had when put_large began")
            left -= len(chunk)
            yield chunk


def large_first(bucket: str, key: str, size: int, request_id: bytes, content_type: str) -> objects_pb2.PutLargeRequest:
    return objects_pb2.PutLargeRequest(
        bucket=bucket, key=key, size_bytes=size, request_id=request_id, content_type=content_type
    )


def large_info(key: str, message: objects_pb2.LargeInfo) -> LargeInfo:
    return LargeInfo(key, message.size_bytes, message.etag, message.mtime_ms, message.content_type)


@dataclass(frozen=True, slots=True)
class _Call:
    service: str  # OBJECTS, BLOCKS or ADMIN
    method: str
    request: Any
    parse: Callable[[Any], Any]
    # Pinned calls (admin actions) go to the first endpoint only, never
    # retried elsewhere: an operator action names the site it acts on.
    pinned: bool = False
    # A write changes something: after a timeout its outcome is unknown (retry.RetryPlan).
    write: bool = False


def stubs_of(channel: Any) -> dict[str, Any]:
    """The stubs of one site's channel (blocking or asyncio: the stubs take either), by service."""
    return {
        OBJECTS: objects_pb2_grpc.ObjectServiceStub(channel),
        BLOCKS: blocks_pb2_grpc.BlockServiceStub(channel),
        ADMIN: admin_pb2_grpc.AdminServiceStub(channel),
    }


def _items(items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return list(items.items()) if isinstance(items, Mapping) else list(items)


def _volume(message: blocks_pb2.Volume) -> VolumeInfo:
    return VolumeInfo(message.name, message.size_bytes, message.block_size, message.block_count)


class _Api:
    _ids: RequestIds

    def _run(self, call: _Call) -> Any:
        raise NotImplementedError

    # ---- objects

    def put(self, bucket: str, key: str, data: bytes) -> Any:
        """Store `data` at bucket/key; returns the commit timestamp."""
        request = objects_pb2.PutRequest(bucket=bucket, key=key, data=bytes(data), request_id=self._ids.next())
        return self._run(_Call(OBJECTS, "Put", request, lambda r: r.ack.ts, write=True))

    def put_batch(self, bucket: str, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> Any:
        """Store several objects atomically (all or none) in one call; returns the commit timestamp."""
        request = objects_pb2.PutBatchRequest(
            bucket=bucket,
            items=[objects_pb2.PutBatchItem(key=k, data=bytes(v)) for k, v in _items(items)],
            request_id=self._ids.next(),
        )
        return self._run(_Call(OBJECTS, "PutBatch", request, lambda r: r.ack.ts, write=True))

    def get(self, bucket: str, key: str) -> Any:
        """The object's bytes; raises NotFound."""
        request = objects_pb2.GetRequest(bucket=bucket, key=key)
        return self._run(_Call(OBJECTS, "Get", request, lambda r: r.data))

    def head(self, bucket: str, key: str) -> Any:
        """The object's size and timestamp (ObjectInfo); raises NotFound."""
        request = objects_pb2.HeadRequest(bucket=bucket, key=key)
        return self._run(_Call(OBJECTS, "Head", request, lambda r: ObjectInfo(key, r.size_bytes, r.ts)))

    def delete(self, bucket: str, key: str) -> Any:
        """Delete bucket/key (succeeds if it is already missing); returns the commit timestamp."""
        request = objects_pb2.DeleteRequest(bucket=bucket, key=key, request_id=self._ids.next())
        return self._run(_Call(OBJECTS, "Delete", request, lambda r: r.ack.ts, write=True))

    def head_large(self, bucket: str, key: str) -> Any:
        """A large (any size, S3 namespace) object's size, etag, mtime and content type; raises NotFound."""
        request = objects_pb2.HeadRequest(bucket=bucket, key=key)
        return self._run(_Call(OBJECTS, "HeadLarge", request, lambda r: large_info(key, r)))

    def delete_large(self, bucket: str, key: str) -> Any:
        """Delete a large object (succeeds if it is already missing); returns the commit timestamp."""
        request = objects_pb2.DeleteRequest(bucket=bucket, key=key, request_id=self._ids.next())
        return self._run(_Call(OBJECTS, "DeleteLarge", request, lambda r: r.ack.ts, write=True))

    # ---- volumes and blocks

    def create_volume(self, name: str, size_bytes: int, block_size: int = 4096) -> Any:
        request = blocks_pb2.CreateVolumeRequest(
            name=name, size_bytes=size_bytes, block_size=block_size, request_id=self._ids.next()
        )
        return self._run(_Call(BLOCKS, "CreateVolume", request, lambda r: _volume(r.volume), write=True))

    def delete_volume(self, name: str) -> Any:
        request = blocks_pb2.DeleteVolumeRequest(name=name, request_id=self._ids.next())
        return self._run(_Call(BLOCKS, "DeleteVolume", request, lambda r: None, write=True))

    def write_blocks(self, volume: str, lba: int, data: bytes) -> Any:
        """Write len(data)/block_size blocks from `lba`, atomically; returns the commit timestamp."""
        request = blocks_pb2.WriteBlocksRequest(volume=volume, lba=lba, data=bytes(data), request_id=self._ids.next())
        return self._run(_Call(BLOCKS, "WriteBlocks", request, lambda r: r.ack.ts, write=True))

    def read_blocks(self, volume: str, lba: int, count: int) -> Any:
        """count * block_size bytes from `lba`; never-written blocks are zeros."""
        request = blocks_pb2.ReadBlocksRequest(volume=volume, lba=lba, count=count)
        return self._run(_Call(BLOCKS, "ReadBlocks", request, lambda r: r.data))

    def trim_blocks(self, volume: str, lba: int, count: int) -> Any:
        """Discard `count` blocks from `lba` (they read as zeros); atomic."""
        request = blocks_pb2.TrimBlocksRequest(volume=volume, lba=lba, count=count, request_id=self._ids.next())
        return self._run(_Call(BLOCKS, "TrimBlocks", request, lambda r: r.ack.ts, write=True))

    # ---- admin

    def status(self) -> Any:
        """SiteStatus of the first site that answers (in the order the endpoints were given)."""
        return self._run(_Call(ADMIN, "Status", admin_pb2.StatusRequest(), lambda r: status_from_message(r.status)))

    def resync(self, full: bool = False) -> Any:
        request = admin_pb2.ResyncRequest(full=full)
        return self._run(_Call(ADMIN, "Resync", request, lambda r: None, pinned=True, write=True))

    def switchover(self) -> Any:
        return self._run(
            _Call(ADMIN, "Switchover", admin_pb2.SwitchoverRequest(), lambda r: None, pinned=True, write=True)
        )

    def failover(self, force: bool = False) -> Any:
        """Forced failover of the first endpoint's site; the server refuses it unless force=True."""
        request = admin_pb2.FailoverRequest(force=force)
        return self._run(_Call(ADMIN, "Failover", request, lambda r: None, pinned=True, write=True))
