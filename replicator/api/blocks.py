"""BlockService servicer: volumes of fixed-size blocks over a SiteBackend (layout in keys.py).

A multi-block write or a trim is ONE backend write carrying one operation
per block, so it is atomic. A range read is ONE backend scan over the
volume's block keys; blocks the scan does not return (never written, or
trimmed: tombstones) read as zeros. Every request reads the volume's
metadata first (one local read) to validate the range and to find the
volume's generation; caching it would be unsafe, since a volume deleted and
re-created at the other site would silently swallow writes sent to a stale
generation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
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
from replicator.api.backend import SiteBackend, WriteResult
from replicator.api.errors import AlreadyExists, InvalidRequest, NotFound
from replicator.config import ApiConfig
from replicator.core.records import Operation
from replicator.v1 import blocks_pb2, blocks_pb2_grpc

log = logging.getLogger("replicator.api.blocks")


def _volume_message(meta: keys.VolumeMeta) -> blocks_pb2.Volume:
    return blocks_pb2.Volume(
        name=meta.name, size_bytes=meta.size_bytes, block_size=meta.block_size, block_count=meta.block_count
    )


class BlockServicer(blocks_pb2_grpc.BlockServiceServicer):
    def __init__(self, backend: SiteBackend, config: ApiConfig) -> None:
        self.backend = backend
        self.config = config
        # Serialises create/delete of volumes through this site. It does not
        # make create-if-absent atomic across the two sites (the backend has
        # no compare-and-set); see docs/api.md, "Known limits".
        self._metadata_lock = asyncio.Lock()

    async def _volume(self, name: str, timeout: float) -> keys.VolumeMeta:
        volume = keys.volume_bytes(name, self.config)
        version = await self.backend.read(keys.volume_key(volume), timeout)
        if version is None or version.value is None:
            raise InvalidRequest(f"unknown volume {name!r}")
        return keys.VolumeMeta.decode(name, version.value)

    def _range(self, meta: keys.VolumeMeta, lba: int, count: int) -> None:
        if count <= 0:
            raise InvalidRequest("the block count must be positive")
        if lba + count > meta.block_count:
            raise InvalidRequest(
                f"blocks {lba}..{lba + count - 1} are outside volume {meta.name!r} "
                f"({meta.block_count} blocks of {meta.block_size} bytes)"
            )

    # ---- volumes

    @translate_errors
    async def CreateVolume(
        self, request: blocks_pb2.CreateVolumeRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.CreateVolumeResponse:
        volume = keys.volume_bytes(request.name, self.config)
        block_size = keys.check_volume_geometry(request.size_bytes, request.block_size, self.config)
        request_id = keys.check_request_id(request.request_id, self.config)
        meta = keys.VolumeMeta(request.name, request.size_bytes, block_size, keys.generation_for(request_id))
        timeout = timeout_s(context, self.config)
        async with self._metadata_lock:
            existing = await self.backend.read(keys.volume_key(volume), timeout)
            if existing is not None and existing.value is not None:
                found = keys.VolumeMeta.decode(request.name, existing.value)
                if found == meta:
                    # A retry of the create that made it (same request id, same generation).
                    return blocks_pb2.CreateVolumeResponse(
                        volume=_volume_message(found), ack=ack(WriteResult(existing.ts, duplicate=True))
                    )
                raise AlreadyExists(f"volume {request.name!r} already exists")
            result = await self.backend.write([Operation(keys.volume_key(volume), meta.encode())], request_id, timeout)
        return blocks_pb2.CreateVolumeResponse(volume=_volume_message(meta), ack=ack(result))

    @translate_errors
    async def ListVolumes(
        self, request: blocks_pb2.ListVolumesRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.ListVolumesResponse:
        page_size = min(request.page_size or self.config.list_page_size_max, self.config.list_page_size_max)
        start = keys.VOLUME_PREFIX
        if request.page_token:
            start = keys.volume_key(keys.volume_bytes(request.page_token.decode(errors="replace"), self.config))
            start += keys.SEPARATOR
        end = keys.prefix_end(keys.VOLUME_PREFIX)
        versions = await self.backend.scan(start, end, page_size, timeout_s(context, self.config))
        volumes = [
            _volume_message(keys.VolumeMeta.decode(v.key[1:].decode(), v.value))
            for v in versions
            if v.value is not None
        ]
        next_token = versions[-1].key[1:] if len(versions) == page_size else b""
        return blocks_pb2.ListVolumesResponse(volumes=volumes, next_page_token=next_token)

    @translate_errors
    async def DeleteVolume(
        self, request: blocks_pb2.DeleteVolumeRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.DeleteVolumeResponse:
        volume = keys.volume_bytes(request.name, self.config)
        request_id = keys.check_request_id(request.request_id, self.config)
        timeout = timeout_s(context, self.config)
        async with self._metadata_lock:
            existing = await self.backend.read(keys.volume_key(volume), timeout)
            # Written even when the volume is missing: if this is a retry of a
            # delete that went through, the backend recognises the request id
            # and answers duplicate, and the retry succeeds as the first did.
            result = await self.backend.write([Operation(keys.volume_key(volume), None)], request_id, timeout)
        if existing is None or existing.value is None:
            if not result.duplicate:
                raise NotFound(f"volume {request.name!r} not found")
            return blocks_pb2.DeleteVolumeResponse(ack=ack(result))
        meta = keys.VolumeMeta.decode(request.name, existing.value)
        await self._erase_blocks(volume, meta.generation, request_id, context)
        return blocks_pb2.DeleteVolumeResponse(ack=ack(result))

    async def _erase_blocks(
        self, volume: bytes, generation: int, request_id: bytes, context: grpc.aio.ServicerContext
    ) -> None:
        """Tombstone the dead generation's blocks, in bounded batches, within the request's deadline.

        Best effort: the blocks are already invisible (no metadata points at
        their generation), so running out of time only leaves garbage.
        """
        prefix = keys.block_generation_prefix(volume, generation)
        start, end = prefix, keys.prefix_end(prefix)
        batch = 0
        try:
            while True:
                versions = await self.backend.scan(
                    start, end, self.config.volume_delete_batch_blocks, timeout_s(context, self.config)
                )
                live = [Operation(v.key, None) for v in versions if v.value is not None]
                if live:
                    batch_id = hashlib.blake2b(request_id + b"/erase/%d" % batch, digest_size=16).digest()
                    await self.backend.write(live, batch_id, timeout_s(context, self.config))
                    batch += 1
                if len(versions) < self.config.volume_delete_batch_blocks:
                    return
                start = versions[-1].key + keys.SEPARATOR
        except OPERATING_ERRORS as error:
            log.warning("volume %r: erasing old blocks stopped early (%s); they stay invisible", volume, error)

    # ---- blocks

    async def _write(
        self, request: blocks_pb2.WriteBlocksRequest, context: grpc.aio.ServicerContext | None
    ) -> WriteResult:
        size = len(request.data)
        if size == 0:
            raise InvalidRequest("WriteBlocks carries no data")
        if size > self.config.block_write_bytes_max:
            raise InvalidRequest(
                f"WriteBlocks carries {size} bytes, the limit (block_write_bytes_max) is "
                f"{self.config.block_write_bytes_max}"
            )
        request_id = keys.check_request_id(request.request_id, self.config)
        timeout = timeout_s(context, self.config)
        meta = await self._volume(request.volume, timeout)
        if size % meta.block_size:
            raise InvalidRequest(
                f"data is {size} bytes, not a whole number of {meta.block_size}-byte blocks of volume {meta.name!r}"
            )
        count = size // meta.block_size
        self._range(meta, request.lba, count)
        volume = keys.volume_bytes(request.volume, self.config)
        operations = keys.block_puts(volume, meta.generation, request.lba, request.data, meta.block_size)
        return await self.backend.write(operations, request_id, timeout)

    @translate_errors
    async def WriteBlocks(
        self, request: blocks_pb2.WriteBlocksRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.WriteBlocksResponse:
        return blocks_pb2.WriteBlocksResponse(ack=ack(await self._write(request, context)))

    async def WriteBlocksStream(
        self, request_iterator: AsyncIterator[blocks_pb2.WriteBlocksRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[blocks_pb2.WriteBlocksStreamResponse]:
        async def handle(request: blocks_pb2.WriteBlocksRequest) -> blocks_pb2.WriteBlocksStreamResponse:
            try:
                result = await self._write(request, None)
            except OPERATING_ERRORS as error:
                return blocks_pb2.WriteBlocksStreamResponse(
                    request_id=request.request_id, error=item_error(self.backend, error)
                )
            return blocks_pb2.WriteBlocksStreamResponse(request_id=request.request_id, ack=ack(result))

        async for answer in PipelinedStream(self.config.stream_inflight_max).run(request_iterator, handle):
            yield answer

    @translate_errors
    async def ReadBlocks(
        self, request: blocks_pb2.ReadBlocksRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.ReadBlocksResponse:
        timeout = timeout_s(context, self.config)
        meta = await self._volume(request.volume, timeout)
        self._range(meta, request.lba, request.count)
        size = request.count * meta.block_size
        if size > self.config.block_read_bytes_max:
            raise InvalidRequest(
                f"ReadBlocks of {request.count} blocks is {size} bytes, the limit (block_read_bytes_max) is "
                f"{self.config.block_read_bytes_max}"
            )
        volume = keys.volume_bytes(request.volume, self.config)
        start = keys.block_key(volume, meta.generation, request.lba)
        end = keys.block_key(volume, meta.generation, request.lba + request.count)
        versions = await self.backend.scan(start, end, request.count, timeout)
        data = bytearray(size)  # unwritten and trimmed blocks read as zeros
        for version in versions:
            if version.value is None:
                continue
            assert start <= version.key < end, (version.key, start, end)
            assert len(version.value) == meta.block_size, (version.key, len(version.value))
            offset = (keys.lba_from_block_key(version.key) - request.lba) * meta.block_size
            data[offset : offset + meta.block_size] = version.value
        return blocks_pb2.ReadBlocksResponse(data=bytes(data))

    @translate_errors
    async def TrimBlocks(
        self, request: blocks_pb2.TrimBlocksRequest, context: grpc.aio.ServicerContext
    ) -> blocks_pb2.TrimBlocksResponse:
        if request.count > self.config.trim_blocks_max:
            raise InvalidRequest(
                f"TrimBlocks of {request.count} blocks, the limit (trim_blocks_max) is {self.config.trim_blocks_max}"
            )
        request_id = keys.check_request_id(request.request_id, self.config)
        timeout = timeout_s(context, self.config)
        meta = await self._volume(request.volume, timeout)
        self._range(meta, request.lba, request.count)
        volume = keys.volume_bytes(request.volume, self.config)
        operations = [Operation(key, None) for key in keys.block_keys(volume, meta.generation, request.lba, request.count)]
        return blocks_pb2.TrimBlocksResponse(ack=ack(await self.backend.write(operations, request_id, timeout)))
