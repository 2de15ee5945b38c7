"""CRC32C (Castagnoli): the checksum of every frame and every stored value; and CRC-64/NVME (S3).

`crc32c(data, crc=0) -> int` takes any contiguous buffer without copying and
continues from a running CRC. `IMPLEMENTATION` names the path in use:
"sse4.2" or "software" (the Cython extension) or "python" (the pure twin,
forced by REPLICATOR_NO_EXTENSIONS=1 or used when the extension is missing).
"""

from __future__ import annotations

from replicator._select import native_or_pure

_module = native_or_pure("checksum")

crc32c = _module.crc32c
crc32c_software = _module.crc32c_software
crc64nvme = _module.crc64nvme  # `crc64nvme(data, crc=0) -> int`, S3's x-amz-checksum-crc64nvme
IMPLEMENTATION: str = _module.IMPLEMENTATION

__all__ = ["IMPLEMENTATION", "crc32c", "crc32c_software", "crc64nvme"]
