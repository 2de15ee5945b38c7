"""Key layout of objects, blocks and volume metadata, and validation of names.

Every datum is one opaque byte key in the site's single ordered keyspace,
written through the one replicated write path:

    object        b"o" + bucket + b"\\x00" + key                     -> the object's bytes
    volume meta   b"v" + volume                                   -> VolumeMeta.encode()
    block         b"b" + volume + b"\\x00" + u64be(generation) + u64be(lba) -> block_size bytes

Bucket and volume names never contain NUL, so b"\\x00" ends them and every
bucket's (volume's) keys are one contiguous range; a prefix listing and a
block range are each one ordered scan.

Block keys carry the volume's *generation*, drawn when the volume is created
(derived from the create's request id, so a retried create finds the same
one). Deleting a volume removes its metadata; blocks of the old generation
left behind (erasure is best effort, bounded by the request deadline) can
never show through a new volume of the same name, and a write racing a
delete lands in the dead generation, invisible.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from replicator.api.errors import InvalidRequest
from replicator.config import ApiConfig
from replicator.core.records import Operation

OBJECT_PREFIX = b"o"
VOLUME_PREFIX = b"v"
BLOCK_PREFIX = b"b"
SEPARATOR = b"\x00"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_U64 = struct.Struct(">Q")
_META = struct.Struct(">BQIQ")  # format version, size_bytes, block_size, generation
_META_VERSION = 1
BLOCK_SIZE_DEFAULT = 4096
BLOCK_SIZE_MIN = 512
BLOCK_SIZE_MAX = 65536


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _check_name(value: str, what: str, bytes_max: int) -> bytes:
    encoded = value.encode()
    if not encoded:
        raise InvalidRequest(f"{what} name is empty")
    if len(encoded) > bytes_max:
        raise InvalidRequest(f"{what} name is {len(encoded)} bytes, the limit is {bytes_max}")
    if not _NAME.match(value):
        raise InvalidRequest(
            f"{what} name {value!r} is invalid: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return encoded


def bucket_bytes(bucket: str, limits: ApiConfig) -> bytes:
    return _check_name(bucket, "bucket", limits.bucket_bytes_max)


def volume_bytes(volume: str, limits: ApiConfig) -> bytes:
    return _check_name(volume, "volume", limits.volume_name_bytes_max)


def object_key_bytes(key: str, limits: ApiConfig) -> bytes:
    encoded = key.encode()
    if not encoded:
        raise InvalidRequest("object key is empty")
    if len(encoded) > limits.key_bytes_max:
        raise InvalidRequest(f"object key is {len(encoded)} bytes, the limit (key_bytes_max) is {limits.key_bytes_max}")
    if SEPARATOR in encoded:
        raise InvalidRequest("object key contains a NUL character")
    return encoded


def check_request_id(request_id: bytes, limits: ApiConfig) -> bytes:
    if not request_id:
        raise InvalidRequest("request_id is empty: every write needs one (the client library sets it)")
    if len(request_id) > limits.request_id_bytes_max:
        raise InvalidRequest(
            f"request_id is {len(request_id)} bytes, the limit (request_id_bytes_max) is {limits.request_id_bytes_max}"
        )
    return request_id


def object_key(bucket: bytes, key: bytes) -> bytes:
    return OBJECT_PREFIX + bucket + SEPARATOR + key


def object_prefix(bucket: bytes, prefix: bytes = b"") -> bytes:
    return OBJECT_PREFIX + bucket + SEPARATOR + prefix


def object_key_from_storage(bucket: bytes, storage_key: bytes) -> bytes:
    head = OBJECT_PREFIX + bucket + SEPARATOR
    assert storage_key.startswith(head), (storage_key, bucket)
    return storage_key[len(head) :]


def volume_key(volume: bytes) -> bytes:
    return VOLUME_PREFIX + volume


def block_key(volume: bytes, generation: int, lba: int) -> bytes:
    return BLOCK_PREFIX + volume + SEPARATOR + _U64.pack(generation) + _U64.pack(lba)


def block_generation_prefix(volume: bytes, generation: int) -> bytes:
    return BLOCK_PREFIX + volume + SEPARATOR + _U64.pack(generation)


def block_keys(volume: bytes, generation: int, first: int, count: int) -> list[bytes]:
    """The keys of blocks first .. first + count - 1 (block_key of each, the prefix built once)."""
    prefix, pack = block_generation_prefix(volume, generation), _U64.pack
    return [prefix + pack(lba) for lba in range(first, first + count)]


def block_puts(volume: bytes, generation: int, first: int, data: bytes, block_size: int) -> list[Operation]:
    """One put per block of `data` (whole blocks) from block `first` on: each value is a slice of
    `data` (one copy of it, no view in between; a 1 MiB write is 256 of them)."""
    assert len(data) % block_size == 0, (len(data), block_size)
    count = len(data) // block_size
    return [
        Operation(key, data[index * block_size : (index + 1) * block_size])
        for index, key in enumerate(block_keys(volume, generation, first, count))
    ]


def lba_from_block_key(storage_key: bytes) -> int:
    return int(_U64.unpack_from(storage_key, len(storage_key) - 8)[0])


def generation_for(request_id: bytes) -> int:
    """A volume generation derived from the create's request id: a retried create draws the same one."""
    return int.from_bytes(hashlib.blake2b(request_id, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class VolumeMeta:
    name: str
    size_bytes: int
    block_size: int
    generation: int

    @property
    def block_count(self) -> int:
        return self.size_bytes // self.block_size

    def encode(self) -> bytes:
        return _META.pack(_META_VERSION, self.size_bytes, self.block_size, self.generation)

    @classmethod
    def decode(cls, name: str, value: bytes) -> VolumeMeta:
        # A malformed record is a bug (we are the only writer of b"v" keys): crash, never guess.
        assert len(value) == _META.size, (name, value)
        version, size_bytes, block_size, generation = _META.unpack(value)
        assert version == _META_VERSION, (name, version)
        return cls(name, size_bytes, block_size, generation)


def check_volume_geometry(size_bytes: int, block_size: int, limits: ApiConfig) -> int:
    """Validate a new volume's size and block size; return the block size (0 means the default)."""
    block_size = block_size or BLOCK_SIZE_DEFAULT
    if block_size < BLOCK_SIZE_MIN or block_size > BLOCK_SIZE_MAX or block_size & (block_size - 1):
        raise InvalidRequest(
            f"block_size must be a power of two from {BLOCK_SIZE_MIN} to {BLOCK_SIZE_MAX}, got {block_size}"
        )
    if size_bytes <= 0 or size_bytes % block_size:
        raise InvalidRequest(f"size_bytes must be a positive multiple of block_size {block_size}, got {size_bytes}")
    if size_bytes > limits.volume_size_bytes_max:
        raise InvalidRequest(
            f"size_bytes {size_bytes} exceeds the limit (volume_size_bytes_max) {limits.volume_size_bytes_max}"
        )
    return block_size


def describe_key(storage_key: bytes) -> str:
    """A storage key as an operator reads it: object bucket/key, block volume@lba, volume name."""
    kind, rest = storage_key[:1], storage_key[1:]
    if kind == OBJECT_PREFIX and SEPARATOR in rest:
        bucket, _, key = rest.partition(SEPARATOR)
        return f"object {bucket.decode(errors='replace')}/{key.decode(errors='replace')}"
    if kind == BLOCK_PREFIX and SEPARATOR in rest and len(rest.partition(SEPARATOR)[2]) == 16:
        volume, _, tail = rest.partition(SEPARATOR)
        return f"block {volume.decode(errors='replace')}@{int.from_bytes(tail[8:], 'big')}"
    if kind == VOLUME_PREFIX:
        return f"volume {rest.decode(errors='replace')}"
    return f"key {storage_key!r}"
