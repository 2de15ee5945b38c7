"""CRC32C and CRC-64/NVME for Python buffers, without copying (native path).

The pure-Python twin is replicator/_pure/checksum.py; replicator.checksum picks
one of them. Both take any object that exports a contiguous buffer and an
optional running CRC, so crc32c(b, crc32c(a)) == crc32c(a + b).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t, uint64_t

from crc32c cimport crc32c_extend, crc32c_extend_software, crc32c_hardware_enabled, crc32c_init

crc32c_init()

IMPLEMENTATION = "sse4.2" if crc32c_hardware_enabled() else "software"

# Below this many bytes, dropping and retaking the GIL costs more than the CRC.
cdef Py_ssize_t GIL_RELEASE_BYTES_MIN = 65536


cdef inline uint32_t _check_crc(object crc) except? 0xFFFFFFFF:
    if not isinstance(crc, int):
        raise TypeError(f"crc must be an int, not {type(crc).__name__}")
    if crc < 0 or crc > 0xFFFFFFFF:
        raise ValueError(f"crc must be in 0..0xFFFFFFFF, got {crc}")
    return <uint32_t>crc


cdef uint32_t _run(object data, uint32_t value, bint software) except? 0xFFFFFFFF:
    cdef Py_buffer view
    cdef const unsigned char *buf
    cdef size_t length
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        buf = <const unsigned char *>view.buf
        length = <size_t>view.len
        if software:
            with nogil:
                value = crc32c_extend_software(value, buf, length)
        elif view.len >= GIL_RELEASE_BYTES_MIN:
            with nogil:
                value = crc32c_extend(value, buf, length)
        else:
            value = crc32c_extend(value, buf, length)
    finally:
        PyBuffer_Release(&view)
    return value


def crc32c(data, crc=0):
    """Return the CRC32C of `data` (any contiguous buffer), continuing from `crc`."""
    return _run(data, _check_crc(crc), False)


def crc32c_software(data, crc=0):
    """The table path, whatever the CPU offers: for tests and comparisons."""
    return _run(data, _check_crc(crc), True)


# ---- CRC-64/NVME (S3's x-amz-checksum-crc64nvme): reflected, polynomial 0xAD93D23594C93659,
# init and final xor all ones; slicing by 8 (eight tables of 256 entries).
cdef uint64_t CRC64_REFLECTED = 0x9A6C9329AC4BC9B5
cdef uint64_t CRC64_TABLES[8][256]


cdef void _crc64_init():
    cdef int n, k
    cdef uint64_t crc
    for n in range(256):
        crc = n
        for k in range(8):
            crc = (crc >> 1) ^ CRC64_REFLECTED if crc & 1 else crc >> 1
        CRC64_TABLES[0][n] = crc
    for n in range(256):
        crc = CRC64_TABLES[0][n]
        for k in range(1, 8):
            crc = CRC64_TABLES[0][crc & 0xFF] ^ (crc >> 8)
            CRC64_TABLES[k][n] = crc


_crc64_init()


cdef uint64_t _crc64_extend(uint64_t crc, const unsigned char *buf, size_t length) noexcept nogil:
    cdef uint64_t value = ~crc
    cdef size_t i = 0
    cdef uint64_t word
    while length - i >= 8:
        word = value ^ (<uint64_t>buf[i] | (<uint64_t>buf[i + 1] << 8) | (<uint64_t>buf[i + 2] << 16)
                        | (<uint64_t>buf[i + 3] << 24) | (<uint64_t>buf[i + 4] << 32) | (<uint64_t>buf[i + 5] << 40)
                        | (<uint64_t>buf[i + 6] << 48) | (<uint64_t>buf[i + 7] << 56))
        value = (CRC64_TABLES[7][word & 0xFF] ^ CRC64_TABLES[6][(word >> 8) & 0xFF]
                 ^ CRC64_TABLES[5][(word >> 16) & 0xFF] ^ CRC64_TABLES[4][(word >> 24) & 0xFF]
                 ^ CRC64_TABLES[3][(word >> 32) & 0xFF] ^ CRC64_TABLES[2][(word >> 40) & 0xFF]
                 ^ CRC64_TABLES[1][(word >> 48) & 0xFF] ^ CRC64_TABLES[0][word >> 56])
        i += 8
    while i < length:
        value = CRC64_TABLES[0][(value ^ buf[i]) & 0xFF] ^ (value >> 8)
        i += 1
    return ~value


def crc64nvme(data, crc=0):
    """Return the CRC-64/NVME of `data` (any contiguous buffer), continuing from `crc`."""
    if not isinstance(crc, int):
        raise TypeError(f"crc must be an int, not {type(crc).__name__}")
    if crc < 0 or crc > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"crc must be in 0..0xFFFFFFFFFFFFFFFF, got {crc}")
    cdef uint64_t value = <uint64_t>crc
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len >= GIL_RELEASE_BYTES_MIN:
            with nogil:
                value = _crc64_extend(value, <const unsigned char *>view.buf, <size_t>view.len)
        else:
            value = _crc64_extend(value, <const unsigned char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return value
