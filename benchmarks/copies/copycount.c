/* Counts the bytes that memcpy and memmove copy in large pieces (LD_PRELOAD shim for
   benchmarks/copies: `python -m benchmarks.copies`). Built by that module with the system cc;
   the counters are read and reset through ctypes. Copies made inside glibc (realloc, the
   kernel's socket copies) are not seen: the module says so in what it prints. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

static void *(*real_memcpy)(void *, const void *, size_t);
static void *(*real_memmove)(void *, const void *, size_t);
static size_t threshold = (size_t)-1;
static int counting;
static unsigned long long copied_bytes;
static unsigned long long copy_calls;

static void resolve(void) {
    if (!real_memcpy) real_memcpy = dlsym(RTLD_NEXT, "memcpy");
    if (!real_memmove) real_memmove = dlsym(RTLD_NEXT, "memmove");
}

static inline void note(size_t n) {
    if (counting && n >= threshold) {
        copied_bytes += n;
        copy_calls += 1;
    }
}

void *memcpy(void *dst, const void *src, size_t n) {
    if (!real_memcpy) resolve();
    note(n);
    return real_memcpy(dst, src, n);
}

void *memmove(void *dst, const void *src, size_t n) {
    if (!real_memmove) resolve();
    note(n);
    return real_memmove(dst, src, n);
}

void copycount_start(size_t minimum) { threshold = minimum; copied_bytes = 0; copy_calls = 0; counting = 1; }
void copycount_pause(void) { counting = 0; }
void copycount_resume(void) { counting = 1; }
unsigned long long copycount_bytes(void) { return copied_bytes; }
unsigned long long copycount_calls(void) { return copy_calls; }
