/*
 * CRC32C (Castagnoli, reflected polynomial 0x82F63B78), two paths:
 *
 *  - hardware: the SSE4.2 crc32 instruction. One instruction has a latency of
 *    three cycles but a throughput of one per cycle, so the buffer is split in
 *    three lanes computed independently and combined afterwards by "shifting"
 *    a lane's CRC over the length of the lanes after it (a linear operator on
 *    GF(2), precomputed as four byte tables). This is the method of Mark
 *    Adler's crc32c.c, also used by Google's crc32c library.
 *  - software: slicing-by-8 tables, for CPUs without SSE4.2.
 *
 * The path is chosen once at run time (crc32c_init) by CPU detection, so one
 * binary runs anywhere. All functions here are static: each extension module
 * that includes the header gets its own copy and must call crc32c_init()
 * once, under the GIL, before use. Nothing here touches Python objects, so
 * the callers may release the GIL around crc32c_extend().
 */
#ifndef REPLICATOR_CRC32C_H
#define REPLICATOR_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define REPLICATOR_CRC32C_X86 1
#include <nmmintrin.h>
#endif

#define CRC32C_POLY 0x82f63b78u
#define CRC32C_LONG 8192
#define CRC32C_MEDIUM 1360 /* three lanes of this cover a 4 KiB buffer in one round */
#define CRC32C_SHORT 256

static uint32_t crc32c_table[8][256];
static uint32_t crc32c_long_shift[4][256];
static uint32_t crc32c_medium_shift[4][256];
static uint32_t crc32c_short_shift[4][256];
static int crc32c_use_hw = 0;
static int crc32c_ready = 0;

static uint32_t crc32c_gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    while (vec) {
        if (vec & 1) sum ^= *mat;
        vec >>= 1;
        mat++;
    }
    return sum;
}

static void crc32c_gf2_square(uint32_t *square, const uint32_t *mat) {
    for (int n = 0; n < 32; n++) square[n] = crc32c_gf2_times(mat, mat[n]);
}

/* Operator that appends len zero bytes to a CRC (len a power of two). */
static void crc32c_zeros_operator(uint32_t *even, size_t len) {
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = CRC32C_POLY;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    crc32c_gf2_square(even, odd); /* two zero bits */
    crc32c_gf2_square(odd, even); /* four zero bits */
    do {
        crc32c_gf2_square(even, odd);
        len >>= 1;
        if (len == 0) return;
        crc32c_gf2_square(odd, even);
        len >>= 1;
    } while (len);
    for (int n = 0; n < 32; n++) even[n] = odd[n];
}

static void crc32c_zeros_tables(uint32_t zeros[4][256], size_t len) {
    uint32_t op[32];
    crc32c_zeros_operator(op, len);
    for (uint32_t n = 0; n < 256; n++) {
        zeros[0][n] = crc32c_gf2_times(op, n);
        zeros[1][n] = crc32c_gf2_times(op, n << 8);
        zeros[2][n] = crc32c_gf2_times(op, n << 16);
        zeros[3][n] = crc32c_gf2_times(op, n << 24);
    }
}

/* Tables for any length: run each basis value through `len` zero bytes. */
static void crc32c_zeros_tables_any(uint32_t zeros[4][256], size_t len) {
    for (int k = 0; k < 4; k++) {
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t v = n << (8 * k);
            for (size_t i = 0; i < len; i++) v = crc32c_table[0][v & 0xff] ^ (v >> 8);
            zeros[k][n] = v;
        }
    }
}

static inline uint32_t crc32c_shift(uint32_t zeros[4][256], uint32_t crc) {
    return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
           zeros[3][crc >> 24];
}

static inline uint64_t crc32c_load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Slicing-by-8 on a pre-conditioned CRC (no inversion here). */
static uint32_t crc32c_software_raw(uint32_t crc, const unsigned char *next, size_t len) {
    while (len && ((uintptr_t)next & 7) != 0) {
        crc = crc32c_table[0][(crc ^ *next++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t word = crc32c_load64(next) ^ crc;
        crc = crc32c_table[7][word & 0xff] ^ crc32c_table[6][(word >> 8) & 0xff] ^
              crc32c_table[5][(word >> 16) & 0xff] ^ crc32c_table[4][(word >> 24) & 0xff] ^
              crc32c_table[3][(word >> 32) & 0xff] ^ crc32c_table[2][(word >> 40) & 0xff] ^
              crc32c_table[1][(word >> 48) & 0xff] ^ crc32c_table[0][word >> 56];
        next += 8;
        len -= 8;
    }
    while (len) {
        crc = crc32c_table[0][(crc ^ *next++) & 0xff] ^ (crc >> 8);
        len--;
    }
    return crc;
}

static uint32_t crc32c_extend_software(uint32_t crc, const unsigned char *data, size_t len) {
    return ~crc32c_software_raw(~crc, data, len);
}

#ifdef REPLICATOR_CRC32C_X86
__attribute__((target("sse4.2"))) static uint32_t crc32c_extend_hardware(uint32_t crc, const unsigned char *next,
                                                                          size_t len) {
    uint64_t crc0 = (uint32_t)~crc, crc1, crc2;
    const unsigned char *end;

    while (len && ((uintptr_t)next & 7) != 0) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    /* Three lanes of CRC32C_LONG bytes each, then of CRC32C_SHORT bytes. */
    while (len >= CRC32C_LONG * 3) {
        crc1 = 0;
        crc2 = 0;
        end = next + CRC32C_LONG;
        do {
            crc0 = _mm_crc32_u64(crc0, crc32c_load64(next));
            crc1 = _mm_crc32_u64(crc1, crc32c_load64(next + CRC32C_LONG));
            crc2 = _mm_crc32_u64(crc2, crc32c_load64(next + 2 * CRC32C_LONG));
            next += 8;
        } while (next < end);
        crc0 = crc32c_shift(crc32c_long_shift, (uint32_t)crc0) ^ crc1;
        crc0 = crc32c_shift(crc32c_long_shift, (uint32_t)crc0) ^ crc2;
        next += CRC32C_LONG * 2;
        len -= CRC32C_LONG * 3;
    }
    while (len >= CRC32C_MEDIUM * 3) {
        crc1 = 0;
        crc2 = 0;
        end = next + CRC32C_MEDIUM;
        do {
            crc0 = _mm_crc32_u64(crc0, crc32c_load64(next));
            crc1 = _mm_crc32_u64(crc1, crc32c_load64(next + CRC32C_MEDIUM));
            crc2 = _mm_crc32_u64(crc2, crc32c_load64(next + 2 * CRC32C_MEDIUM));
            next += 8;
        } while (next < end);
        crc0 = crc32c_shift(crc32c_medium_shift, (uint32_t)crc0) ^ crc1;
        crc0 = crc32c_shift(crc32c_medium_shift, (uint32_t)crc0) ^ crc2;
        next += CRC32C_MEDIUM * 2;
        len -= CRC32C_MEDIUM * 3;
    }
    while (len >= CRC32C_SHORT * 3) {
        crc1 = 0;
        crc2 = 0;
        end = next + CRC32C_SHORT;
        do {
            crc0 = _mm_crc32_u64(crc0, crc32c_load64(next));
            crc1 = _mm_crc32_u64(crc1, crc32c_load64(next + CRC32C_SHORT));
            crc2 = _mm_crc32_u64(crc2, crc32c_load64(next + 2 * CRC32C_SHORT));
            next += 8;
        } while (next < end);
        crc0 = crc32c_shift(crc32c_short_shift, (uint32_t)crc0) ^ crc1;
        crc0 = crc32c_shift(crc32c_short_shift, (uint32_t)crc0) ^ crc2;
        next += CRC32C_SHORT * 2;
        len -= CRC32C_SHORT * 3;
    }
    end = next + (len - (len & 7));
    while (next < end) {
        crc0 = _mm_crc32_u64(crc0, crc32c_load64(next));
        next += 8;
    }
    len &= 7;
    while (len) {
        crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
        len--;
    }
    return ~(uint32_t)crc0;
}
#endif

/* Build the tables and pick the path. Idempotent; call under the GIL. */
static void crc32c_init(void) {
    if (crc32c_ready) return;
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++) crc = crc & 1 ? (crc >> 1) ^ CRC32C_POLY : crc >> 1;
        crc32c_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc32c_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = crc32c_table[0][crc & 0xff] ^ (crc >> 8);
            crc32c_table[k][n] = crc;
        }
    }
    crc32c_zeros_tables(crc32c_long_shift, CRC32C_LONG);
    crc32c_zeros_tables(crc32c_short_shift, CRC32C_SHORT);
    crc32c_zeros_tables_any(crc32c_medium_shift, CRC32C_MEDIUM);
#ifdef REPLICATOR_CRC32C_X86
    __builtin_cpu_init();
    crc32c_use_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
    crc32c_ready = 1;
}

static inline int crc32c_hardware_enabled(void) { return crc32c_use_hw; }

/* crc32c_extend(crc32c_extend(0, a), b) == crc32c of a followed by b. */
static inline uint32_t crc32c_extend(uint32_t crc, const unsigned char *data, size_t len) {
#ifdef REPLICATOR_CRC32C_X86
    if (crc32c_use_hw) return crc32c_extend_hardware(crc, data, len);
#endif
    return crc32c_extend_software(crc, data, len);
}

#endif /* REPLICATOR_CRC32C_H */
