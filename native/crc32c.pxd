# C-level CRC32C for the other extension modules (framing): `from crc32c cimport
# crc32c_extend` calls the header's inline function with no Python call. A
# module that cimports this must call crc32c_init() once at import time.
from libc.stdint cimport uint32_t


cdef extern from "crc32c.h" nogil:
    void crc32c_init()
    int crc32c_hardware_enabled()
    uint32_t crc32c_extend(uint32_t crc, const unsigned char *data, size_t length)
    uint32_t crc32c_extend_software(uint32_t crc, const unsigned char *data, size_t length)
