"""The client's methods, written once for both flavours.

Each simple method builds its request (a write draws its request id here,
once, so every retry carries the same id) and hands a `_Call` to `_run`,
which the blocking Client implements with a loop and the AsyncClient with a
coroutine; so on AsyncClient these same methods return awaitables. Methods
that loop over pages or streams are written in each flavour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from replicator.client._common import ObjectInfo, RequestIds, VolumeInfo, status_from_message
from replicator.v1 import admin_pb2, blocks_pb2, objects_pb2

OBJECTS, BLOCKS, ADMIN = "objects", "blocks", "admin"
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class _Call:
    service: str  # OBJECTS, BLOCKS or ADMIN
    method: str
    request: Any
    parse: Callable[[Any], Any]
    # Pinned calls (admin actions) go to the first endpoint only, never
    # retried elsewhere: an operator action names the site it acts on.
    pinned: bool = False


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
        return self._run(_Call(OBJECTS, "Put", request, lambda r: r.ack.ts))

    def put_batch(self, bucket: str, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> Any:
        """Store several objects atomically (all or none) in one call; returns the commit timestamp."""
        request = objects_pb2.PutBatchRequest(
            bucket=bucket,
            items=[objects_pb2.PutBatchItem(key=k, data=bytes(v)) for k, v in _items(items)],
            request_id=self._ids.next(),
        )
        return self._run(_Call(OBJECTS, "PutBatch", request, lambda r: r.ack.ts))

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
        return self._run(_Call(OBJECTS, "Delete", request, lambda r: r.ack.ts))

    # ---- volumes and blocks

    def create_volume(self, name: str, size_bytes: int, block_size: int = 4096) -> Any:
        request = blocks_pb2.CreateVolumeRequest(
            name=name, size_bytes=size_bytes, block_size=block_size, request_id=self._ids.next()
        )
        return self._run(_Call(BLOCKS, "CreateVolume", request, lambda r: _volume(r.volume)))

    def delete_volume(self, name: str) -> Any:
        request = blocks_pb2.DeleteVolumeRequest(name=name, request_id=self._ids.next())
        return self._run(_Call(BLOCKS, "DeleteVolume", request, lambda r: None))

    def write_blocks(self, volume: str, lba: int, data: bytes) -> Any:
        """Write len(data)/block_size blocks from `lba`, atomically; returns the commit timestamp."""
        request = blocks_pb2.WriteBlocksRequest(volume=volume, lba=lba, data=bytes(data), request_id=self._ids.next())
        return self._run(_Call(BLOCKS, "WriteBlocks", request, lambda r: r.ack.ts))

    def read_blocks(self, volume: str, lba: int, count: int) -> Any:
        """count * block_size bytes from `lba`; never-written blocks are zeros."""
        request = blocks_pb2.ReadBlocksRequest(volume=volume, lba=lba, count=count)
        return self._run(_Call(BLOCKS, "ReadBlocks", request, lambda r: r.data))

    def trim_blocks(self, volume: str, lba: int, count: int) -> Any:
        """Discard `count` blocks from `lba` (they read as zeros); atomic."""
        request = blocks_pb2.TrimBlocksRequest(volume=volume, lba=lba, count=count, request_id=self._ids.next())
        return self._run(_Call(BLOCKS, "TrimBlocks", request, lambda r: r.ack.ts))

    # ---- admin

    def status(self) -> Any:
        """SiteStatus of the first site that answers (in the order the endpoints were given)."""
        return self._run(_Call(ADMIN, "Status", admin_pb2.StatusRequest(), lambda r: status_from_message(r.status)))

    def resync(self, full: bool = False) -> Any:
        request = admin_pb2.ResyncRequest(full=full)
        return self._run(_Call(ADMIN, "Resync", request, lambda r: None, pinned=True))

    def switchover(self) -> Any:
        return self._run(_Call(ADMIN, "Switchover", admin_pb2.SwitchoverRequest(), lambda r: None, pinned=True))

    def failover(self, force: bool = False) -> Any:
        """Forced failover of the first endpoint's site; the server refuses it unless force=True."""
        request = admin_pb2.FailoverRequest(force=force)
        return self._run(_Call(ADMIN, "Failover", request, lambda r: None, pinned=True))
