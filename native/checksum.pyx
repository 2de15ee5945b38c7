"""CRC32C for Python buffers, without copying (native path).

The pure-Python twin is replicator/_pure/checksum.py; replicator.checksum picks
one of them. Both take any object that exports a contiguous buffer and an
optional running CRC, so crc32c(b, crc32c(a)) == crc32c(a + b).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t

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
