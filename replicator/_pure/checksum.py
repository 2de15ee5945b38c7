"""CRC32C and CRC-64/NVME in pure Python: the twin of native/checksum.pyx, same API and results.

Slow (a table lookup per byte), used where the extension is not built or when
REPLICATOR_NO_EXTENSIONS=1 forces it, and by the tests as a second opinion.
"""

from __future__ import annotations

IMPLEMENTATION = "python"

_POLY = 0x82F63B78


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _make_table()


def _check_crc(crc: object) -> int:
    if not isinstance(crc, int):
        raise TypeError(f"crc must be an int, not {type(crc).__name__}")
    if crc < 0 or crc > 0xFFFFFFFF:
        raise ValueError(f"crc must be in 0..0xFFFFFFFF, got {crc}")
    return crc


def crc32c(data: object, crc: int = 0) -> int:
    """Return the CRC32C of `data` (any contiguous buffer), continuing from `crc`."""
    value = _check_crc(crc) ^ 0xFFFFFFFF
    view = memoryview(data)  # type: ignore[arg-type]  # TypeError for non-buffers, as the native path
    if not view.c_contiguous:
        raise BufferError("crc32c needs a contiguous buffer")
    table = _TABLE
    for byte in view.cast("B"):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


crc32c_software = crc32c


# CRC-64/NVME (S3's x-amz-checksum-crc64nvme): reflected, polynomial 0xAD93D23594C93659 (reflected:
# 0x9A6C9329AC4BC9B5), init and final xor all ones. Check value: "123456789" -> 0xAE8B14860A799888.
_POLY64 = 0x9A6C9329AC4BC9B5
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _make_table64() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY64 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE64 = _make_table64()


def crc64nvme(data: object, crc: int = 0) -> int:
    """Return the CRC-64/NVME of `data` (any contiguous buffer), continuing from `crc`."""
    if not isinstance(crc, int):
        raise TypeError(f"crc must be an int, not {type(crc).__name__}")
    if crc < 0 or crc > _MASK64:
        raise ValueError(f"crc must be in 0..0xFFFFFFFFFFFFFFFF, got {crc}")
    view = memoryview(data)  # type: ignore[arg-type]  # TypeError for non-buffers, as the native path
    if not view.c_contiguous:
        raise BufferError("crc64nvme needs a contiguous buffer")
    value = crc ^ _MASK64
    table = _TABLE64
    for byte in view.cast("B"):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ _MASK64
