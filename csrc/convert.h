/* Reading byte-swapped and float16 operands: the converting gather.
 * Twin of fastsce/_numba_convert.py.
 *
 * An operand whose storage is not the kernel's type (fastsce/_layout.py:
 * FASTSCE_SWAPPED, FASTSCE_HALF in fastsce_params.convert) is never used in
 * place: each row (or tile) of it is converted into the scratch the kernels
 * already gather strided rows into, so it is never copied whole. The
 * conversions are exact, so results are bitwise those of a native copy. */
#ifndef FASTSCE_CONVERT_H
#define FASTSCE_CONVERT_H
#include <stdint.h>
#include <string.h>
#include "fastsce.h"

#if defined(__GNUC__) || defined(__clang__)
#define BSWAP16(v) __builtin_bswap16(v)
#define BSWAP32(v) __builtin_bswap32(v)
#define BSWAP64(v) __builtin_bswap64(v)
#else
static inline uint16_t BSWAP16(uint16_t v) { return (uint16_t)(v << 8 | v >> 8); }
static inline uint32_t BSWAP32(uint32_t v)
{ return (uint32_t)BSWAP16((uint16_t)v) << 16 | BSWAP16((uint16_t)(v >> 16)); }
static inline uint64_t BSWAP64(uint64_t v)
{ return (uint64_t)BSWAP32((uint32_t)v) << 32 | BSWAP32((uint32_t)(v >> 32)); }
#endif

/* IEEE half bits to float, in integers: exact for every input, subnormals
 * (normalized by shifting), infinities and NaNs (payload kept) included. */
static inline float half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu, bits;            /* exponent and mantissa */
    if (em >= 0x7c00u)                          /* inf, NaN */
        bits = 0x7f800000u | (em & 0x3ffu) << 13;
    else if (em >= 0x0400u)                     /* normal: rebias 15 -> 127 */
        bits = (em << 13) + (112u << 23);
    else if (em == 0)
        bits = 0;
    else {                                      /* subnormal m 2^-24 */
        uint32_t e = 113;
        while (!(em & 0x400u)) { em <<= 1; e--; }
        bits = e << 23 | (em & 0x3ffu) << 13;
    }
    bits |= sign;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Bytes per element of slot s in storage, for `size` bytes in the kernel's type. */
static inline int64_t storage_item(const fastsce_params *p, int s, int64_t size)
{
    return p->convert[s] & FASTSCE_HALF ? 2 : size;
}

#define DEFINE_SWAP_ROW(NAME, U, SWAP)                                                 \
static void NAME(U *dst, const U *src, int64_t st, int64_t n)                          \
{                                                                                      \
    for (int64_t j = 0; j < n; j++) dst[j] = SWAP(src[j * st]);                        \
}
DEFINE_SWAP_ROW(swap_row2, uint16_t, BSWAP16)
DEFINE_SWAP_ROW(swap_row4, uint32_t, BSWAP32)
DEFINE_SWAP_ROW(swap_row8, uint64_t, BSWAP64)

#define DEFINE_HALF_ROW(NAME, D)                                                       \
static void NAME(D *dst, const uint16_t *src, int64_t st, int64_t n, int swapped)      \
{                                                                                      \
    if (swapped)                                                                       \
        for (int64_t j = 0; j < n; j++) dst[j] = (D)half_to_float(BSWAP16(src[j * st]));\
    else                                                                               \
        for (int64_t j = 0; j < n; j++) dst[j] = (D)half_to_float(src[j * st]);        \
}
DEFINE_HALF_ROW(half_row_f32, float)
DEFINE_HALF_ROW(half_row_f64, double)

/* n elements of stride st from src (storage `code`, `item` bytes each) into
 * contiguous dst of `size`-byte elements (the kernel's type). */
static inline void convert_row(char *dst, int64_t size, const char *src, int64_t item,
                               int64_t st, int64_t n, int code)
{
    if (code & FASTSCE_HALF) {
        if (size == 4) half_row_f32((float *)dst, (const uint16_t *)src, st, n, code & FASTSCE_SWAPPED);
        else half_row_f64((double *)dst, (const uint16_t *)src, st, n, code & FASTSCE_SWAPPED);
        return;
    }
    switch (item) {                             /* FASTSCE_SWAPPED, same type */
    case 2: swap_row2((uint16_t *)dst, (const uint16_t *)src, st, n); break;
    case 4: swap_row4((uint32_t *)dst, (const uint32_t *)src, st, n); break;
    default: swap_row8((uint64_t *)dst, (const uint64_t *)src, st, n); break;
    }
}

#endif
