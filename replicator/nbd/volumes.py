"""Byte-addressed access to block volumes over a SiteBackend: what an NBD export needs.

This is the same path into storage as the gRPC BlockService (api/blocks.py):
the key layout of api/keys.py and the backend's `read`, `scan` and `write`,
nothing else. A write of n blocks is ONE backend write (one record, atomic,
answered only when durable at both sites); a read is one ordered scan of the
block keys, blocks absent from it reading as zeros.

Alignment is the caller's to check (server.py refuses a misaligned write
with EINVAL): every write here covers whole blocks, because two sites
applying read-modify-write to different halves of one block would lose one
half under last-writer-wins.

Every call re-reads the volume's metadata and compares the generation the
export was opened with, as api/blocks.py does: a volume deleted and
re-created (at either site) must not swallow writes meant for the old one.
"""

from __future__ import annotations

import asyncio
import os

from replicator.api import keys
from replicator.api.backend import SiteBackend
from replicator.api.errors import InvalidRequest, NotFound
from replicator.config import ApiConfig
from replicator.core.records import Operation

REQUEST_ID_BYTES = 16


class VolumeGone(NotFound):
    """The volume the export was opened on was deleted (or re-created as another generation)."""


class Volumes:
    def __init__(self, backend: SiteBackend, config: ApiConfig) -> None:
        self.backend = backend
        self.config = config

    async def open(self, name: str, timeout_s: float) -> keys.VolumeMeta:
        volume = keys.volume_bytes(name, self.config)
        version = await self.backend.read(keys.volume_key(volume), timeout_s)
        if version is None or version.value is None:
            raise InvalidRequest(f"unknown volume {name!r}")
        return keys.VolumeMeta.decode(name, version.value)

    async def _check_current(self, meta: keys.VolumeMeta, timeout_s: float) -> None:
        try:
            current = await self.open(meta.name, timeout_s)
        except InvalidRequest:
            raise VolumeGone(f"volume {meta.name!r} was deleted") from None
        if current.generation != meta.generation:
            raise VolumeGone(f"volume {meta.name!r} was deleted and created again")

    async def list(self, limit: int, timeout_s: float) -> list[keys.VolumeMeta]:
        """Up to `limit` volumes in name order (paged scans of the metadata keys)."""
        found: list[keys.VolumeMeta] = []
        start = keys.VOLUME_PREFIX
        end = keys.prefix_end(keys.VOLUME_PREFIX)
        page = self.config.list_page_size_max
        while len(found) < limit:
            versions = await self.backend.scan(start, end, page, timeout_s)
            for version in versions:
                if version.value is not None and len(found) < limit:
                    found.append(keys.VolumeMeta.decode(version.key[1:].decode(), version.value))
            if len(versions) < page:
                break
            start = versions[-1].key + keys.SEPARATOR
        return found

    def _keys(self, meta: keys.VolumeMeta) -> bytes:
        return keys.volume_bytes(meta.name, self.config)

    async def _blocks(self, meta: keys.VolumeMeta, first: int, count: int, timeout_s: float) -> dict[int, bytes]:
        volume = self._keys(meta)
        start = keys.block_key(volume, meta.generation, first)
        end = keys.block_key(volume, meta.generation, first + count)
        versions = await self.backend.scan(start, end, count, timeout_s)
        blocks: dict[int, bytes] = {}
        for version in versions:
            if version.value is None:
                continue
            assert start <= version.key < end, (version.key, start, end)
            assert len(version.value) == meta.block_size, (version.key, len(version.value))
            blocks[keys.lba_from_block_key(version.key)] = version.value
        return blocks

    async def read(self, meta: keys.VolumeMeta, offset: int, length: int, timeout_s: float) -> bytes:
        """`length` bytes at `offset` (any alignment: reading never modifies a block)."""
        size = meta.block_size
        first = offset // size
        last = (offset + length - 1) // size
        count = last - first + 1
        check = asyncio.ensure_future(self._check_current(meta, timeout_s))
        try:
            blocks = await self._blocks(meta, first, count, timeout_s)
        finally:
            await check  # raises VolumeGone if the export's volume went away
        data = bytearray(count * size)  # unwritten and trimmed blocks read as zeros
        for lba, value in blocks.items():
            position = (lba - first) * size
            data[position : position + size] = value
        skip = offset - first * size
        return bytes(data[skip : skip + length]) if skip or len(data) != length else bytes(data)

    async def write(self, meta: keys.VolumeMeta, offset: int, data: bytes, timeout_s: float) -> None:
        size = meta.block_size
        assert offset % size == 0 and len(data) % size == 0 and data, (offset, len(data), size)
        await self._check_current(meta, timeout_s)
        volume = self._keys(meta)
        first = offset // size
        operations = keys.block_puts(volume, meta.generation, first, bytes(data), size)
        await self.backend.write(operations, os.urandom(REQUEST_ID_BYTES), timeout_s)

    async def trim(self, meta: keys.VolumeMeta, offset: int, length: int, timeout_s: float) -> None:
        """Tombstone the written blocks of the range, a bounded page at a time.

        Only blocks that are stored are tombstoned (a trim of a never-written
        range writes nothing). Not atomic as a whole, which NBD does not ask
        of a trim; each page is one record.
        """
        size = meta.block_size
        assert offset % size == 0 and length % size == 0, (offset, length, size)
        await self._check_current(meta, timeout_s)
        volume = self._keys(meta)
        first, end = offset // size, (offset + length) // size
        page = self.config.trim_blocks_max
        position = first
        while position < end:
            count = min(page, end - position)
            blocks = await self._blocks(meta, position, count, timeout_s)
            if blocks:
                operations = [Operation(keys.block_key(volume, meta.generation, lba), None) for lba in sorted(blocks)]
                await self.backend.write(operations, os.urandom(REQUEST_ID_BYTES), timeout_s)
            position += count

    async def write_zeroes(
        self, meta: keys.VolumeMeta, offset: int, length: int, allocate: bool, timeout_s: float
    ) -> None:
        """Make the range read as zeros: a trim, or (allocate: NBD_CMD_FLAG_NO_HOLE) blocks of zeros written."""
        if not allocate:
            await self.trim(meta, offset, length, timeout_s)
            return
        size = meta.block_size
        chunk = max(size, self.config.block_write_bytes_max // size * size)
        position, end = offset, offset + length
        while position < end:
            step = min(chunk, end - position)
            await self.write(meta, position, bytes(step), timeout_s)
            position += step

    async def allocation(self, meta: keys.VolumeMeta, offset: int, length: int, timeout_s: float) -> list[bool]:
        """For each block from the one holding `offset` to the one holding the range's last byte: stored?"""
        size = meta.block_size
        first = offset // size
        count = (offset + length - 1) // size - first + 1
        await self._check_current(meta, timeout_s)
        blocks = await self._blocks(meta, first, count, timeout_s)
        return [first + index in blocks for index in range(count)]
