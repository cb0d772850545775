/* Pieces shared by the kernel files: inlining and CPU-dispatch macros, the
 * offsets of a row of the strided walk (see fastsce/_layout.py), the fixed
 * blocks of a walk and the parallel loop over them, strided copies. */
#ifndef FASTSCE_WALK_H
#define FASTSCE_WALK_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fastsce.h"
#include "scratch.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The soft-target range check as one unsigned maximum: a float's bits order
 * like its value on [+0, inf] and lie above all of those for -0, negatives
 * and NaN (sign or exponent bits), and a code is its own key (a converted
 * chunk's codes are keyed as floats: the same test); so targets lie
 * in [0, scale] iff their largest key is at most that of the largest value
 * <= scale (-0 a false alarm: exactly, t is bad iff key > top && t != 0).
 * A max per element instead of two compares, a mask and an add (with its
 * count of n, the binary float32 loop: 74 -> 68 instructions per 16). The
 * int64 versions only let the softmax's hard-label build compile. */
#define RKEY_float uint32_t
#define RKEY_double uint64_t
#define RKEY_uint8_t uint32_t
#define RKEY_uint16_t uint32_t
#define RKEY_int64_t uint64_t
#define RKEY(T) RKEY_##T
ALWAYS_INLINE uint32_t rkey_float(float t) { uint32_t k; memcpy(&k, &t, 4); return k; }
ALWAYS_INLINE uint64_t rkey_double(double t) { uint64_t k; memcpy(&k, &t, 8); return k; }
ALWAYS_INLINE uint32_t rkey_uint8_t(uint8_t t) { return t; }
ALWAYS_INLINE uint32_t rkey_uint16_t(uint16_t t) { return t; }
ALWAYS_INLINE uint64_t rkey_int64_t(int64_t t) { return (uint64_t)t; }
static inline uint32_t rkey_top_float(double scale)
{
    if (scale >= 0x1.fffffep127) return rkey_float(0x1.fffffep127f); /* cast: UB above */
    float f = (float)scale;         /* rounded up past scale: the float below */
    return rkey_float(f) - ((double)f > scale);
}
static inline uint64_t rkey_top_double(double scale) { return rkey_double(scale); }
#define DEFINE_RKEY_TOP(T)                                                             \
static inline RKEY(T) rkey_top_##T(double scale)                                       \
{ return scale >= (double)(RKEY(T))-1 ? (RKEY(T))-1 : (RKEY(T))scale; }
DEFINE_RKEY_TOP(uint8_t)
DEFINE_RKEY_TOP(uint16_t)
DEFINE_RKEY_TOP(int64_t)

/* A read prefetch into L2, not L1 (locality 2: prefetcht1; a no-op where the
 * compiler has none). A gather's 256 lines ahead overran the L1's few misses
 * in flight: a C harness timing one (21, 512, 512) map at 1 thread ran 0.45
 * Gelem/s with them into L1 (locality 3), 0.54 into L2 (medians of 6
 * alternating runs; GCC had inlined its copies as rep movsq). */
#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch((p), 0, 2)
#else
#define PREFETCH(p) ((void)(p))
#endif

/* One portable build, fast on every x86-64: the hot loops are cloned for
 * AVX-512 (x86-64-v4), AVX2 (v3) and the baseline, and the loader picks one
 * at run time (an ifunc). AVX-512 ran 1.5-1.9x faster than AVX2 (PERF_NOTES). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(FASTSCE_NO_CLONES)
#define FASTSCE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTSCE_HAVE_CLONES 1
#else
#define FASTSCE_CLONES
#define FASTSCE_HAVE_CLONES 0
#endif

/* SIMD_OVER_<type>("omp simd ...") starts a vectorized loop over elements of
 * that type. For 8- and 16-bit codes GCC gets `ivdep` instead: an omp simd
 * loop is lowered before the clones above exist, for the default target, and
 * its lanes are capped at SSE's 16 bytes, so a loop of bytes beside floats
 * ran on 128-bit vectors in every clone (the binary loop over uint8 codes:
 * W2 0.36 against 0.55 Gelem/s converted first, Zen 2). Under ivdep each
 * clone picks its own width and GCC finds the integer reductions itself
 * (write `&`, not `&&`, and masks, not selects, where they feed one: else it
 * leaves the loop scalar). Clang keeps omp simd. */
#define SIMD_OVER_f32(omp) _Pragma(omp)
#define SIMD_OVER_f64(omp) _Pragma(omp)
#define SIMD_OVER_i64(omp) _Pragma(omp)
#if defined(__GNUC__) && !defined(__clang__)
#define SIMD_OVER_u8(omp) _Pragma("GCC ivdep")
#else
#define SIMD_OVER_u8(omp) _Pragma(omp)
#endif
#define SIMD_OVER_u16(omp) SIMD_OVER_u8(omp)

enum { SX, ST, SW, SM, SPW, SG, SL };   /* operand slots, as _layout.SLOTS */

/* A block's partial: the sum of its element losses, in 16 running float64
 * sums (lane j adds buf[j], buf[j + 16], ...) folded in halves. The order is
 * the source's, so the sum is the same whatever the vector width or the
 * buffer's alignment; GCC still vectorizes it. The binary loss keeps its
 * losses in its compute type (a float's double is itself, so the sum is the
 * same), the softmax in float64: see loss_item. */
#define DEFINE_BLOCK_SUM(NAME, T)                                                      \
FASTSCE_CLONES static double NAME(const T *buf, int64_t n)                             \
{                                                                                      \
    double lane[16] = {0.0};                                                           \
    int64_t i = 0;                                                                     \
    for (; i + 16 <= n; i += 16)                                                       \
        for (int j = 0; j < 16; j++) lane[j] += (double)buf[i + j];                    \
    for (int j = 0; i + j < n; j++) lane[j] += (double)buf[i + j];                     \
    for (int w = 8; w > 0; w /= 2)                                                     \
        for (int j = 0; j < w; j++) lane[j] += lane[j + w];                            \
    return lane[0];                                                                    \
}
DEFINE_BLOCK_SUM(block_sum_f32, float)
DEFINE_BLOCK_SUM(block_sum_f64, double)

/* Element offsets of every slot at (row, col) of a walk whose last dimension
 * is the row; `strides` is [nslots][nd]. */
static inline void row_offsets(int nd, const int64_t *shape, const int64_t *strides,
                               int nslots, int64_t row, int64_t col, int64_t *off)
{
    for (int s = 0; s < nslots; s++) off[s] = col * strides[s * nd + nd - 1];
    for (int d = nd - 2; d >= 0; d--) {
        int64_t idx = row % shape[d];
        row /= shape[d];
        for (int s = 0; s < nslots; s++) off[s] += idx * strides[s * nd + d];
    }
}

/* Blocks of a walk over n elements in groups of group_size: each group is cut
 * into FASTSCE_BLOCK-element blocks (fixed by these two numbers alone). */
static inline int64_t walk_blocks(int nd, const int64_t *shape, int64_t group_size)
{
    int64_t n = 1;
    for (int d = 0; d < nd; d++) n *= shape[d];
    return group_size ? n / group_size * ((group_size + FASTSCE_BLOCK - 1) / FASTSCE_BLOCK) : 0;
}

/* Flat range [*start, *stop) and group of block b. */
static inline int64_t block_range(int64_t b, int64_t group_size, int64_t *start, int64_t *stop)
{
    const int64_t per_group = (group_size + FASTSCE_BLOCK - 1) / FASTSCE_BLOCK;
    const int64_t grp = b / per_group;
    *start = grp * group_size + (b - grp * per_group) * FASTSCE_BLOCK;
    *stop = *start + FASTSCE_BLOCK < (grp + 1) * group_size ? *start + FASTSCE_BLOCK
                                                              : (grp + 1) * group_size;
    return grp;
}

/* A block's results, or a piece's: valid count, bad targets, first bad
 * flat index (-1 if none). */
typedef struct { int64_t count, bad, first; } range_sums;

/* Flat elements [lo, hi) of a block of group grp, writing their losses from
 * `losses` on: a kernel's walk is one of these per block, or per piece of a
 * block. */
typedef range_sums (*range_fn)(const void *ctx, int64_t grp, int64_t lo, int64_t hi,
                               char *losses, void *scratch);

/* A thread's scratch for ctx, with its loss buffer (FASTSCE_BLOCK * 8 bytes)
 * in *losses; NULL if out of memory. */
typedef void *(*alloc_fn)(const void *ctx, char **losses);

/* Where the blocks' partials go (loss NULL: the walk sums no losses, and
 * loss_item is not read), and the bytes of one element loss in the buffers:
 * 4 (float) or 8 (double). The binary loss's float32 losses, stored as
 * float64, had cost its loop a lane extract, two converts and a second store
 * per vector: stored as they are (as in Numba's twin), W1L in C at 1 thread
 * ran 14% faster, W1 17% (Zen 2, medians of 4 and 3 alternating runs). */
typedef struct { double *loss; int64_t *count, *bad, *first; int loss_item; } block_parts;

static inline void put_block(const block_parts *out, int64_t b, const char *losses,
                             int64_t n, range_sums r)
{
    if (out->loss)
        out->loss[b] = out->loss_item == 4 ? block_sum_f32((const float *)losses, n)
                                           : block_sum_f64((const double *)losses, n);
    out->count[b] = r.count;
    out->bad[b] = r.bad;
    out->first[b] = r.first;
}

/* Block b whole, in the thread's own loss buffer. */
static inline void whole_block(int64_t b, int64_t group_size, const void *ctx, range_fn range,
                               char *losses, void *scratch, const block_parts *out)
{
    int64_t start, stop;
    const int64_t grp = block_range(b, group_size, &start, &stop);
    put_block(out, b, losses, stop - start, range(ctx, grp, start, stop, losses, scratch));
}

/* Edge j of `pieces` in [start, stop): at multiples of 64 elements from the
 * block's start, so that threads share at most one cache line of an output
 * per edge (none of an aligned contiguous one). */
static inline int64_t piece_edge(int64_t start, int64_t stop, int64_t j, int64_t pieces)
{
    int64_t e = (stop - start) * j / pieces / 64 * 64;
    return j == pieces ? stop : start + e;
}

/* Run every block, each thread with its own scratch from alloc(ctx) (by
 * fastsce_scratch_get, handed back by fastsce_scratch_put). No float
 * reduction crosses threads, so results are bitwise the same for any thread
 * count:
 *  - blocks at least as many as the threads: threads take whole blocks in a
 *    static schedule; each block sums its own loss buffer;
 *  - fewer (a small map, or few groups): each block is cut into pieces that
 *    threads share; the pieces write their losses into one buffer per block
 *    (thread b's for block b), and each block is summed once they are all
 *    done: the same values, in the same order, by the same loop.
 * Returns FASTSCE_ENOMEM if a thread's scratch could not be had. One thread
 * never enters the OpenMP runtime: GNU libgomp hangs in a child forked after
 * its pool started, and such a child calls with one thread
 * (fastsce/_threads.py). */
/* Pieces per block when n_blocks < team: team / gcd(team, n_blocks), so that
 * the pieces (lcm(team, n_blocks) of them) split evenly over the team: 2
 * blocks on 3 threads in 3 pieces each, 2 per thread, not 2 pieces each of
 * which thread 0 would take both of block 0's. */
static inline int64_t block_pieces(int64_t n_blocks, int64_t team)
{
    int64_t a = team, b = n_blocks;
    while (b) { int64_t r = a % b; a = b; b = r; }
    return team / a;
}

static inline int parallel_blocks(int64_t n_blocks, int64_t group_size, int num_threads,
                                  const void *ctx, alloc_fn alloc, range_fn range,
                                  const block_parts *out)
{
    int failed = 0;
    if (num_threads <= 1) {
        char *losses;
        void *scratch = alloc(ctx, &losses);
        if (!scratch) return FASTSCE_ENOMEM;
        for (int64_t b = 0; b < n_blocks; b++)
            whole_block(b, group_size, ctx, range, losses, scratch, out);
        fastsce_scratch_put(scratch);
        return 0;
    }
    /* for pieces: each thread's loss buffer, and each piece's sums (at most
     * n_blocks x team pieces; none if these cannot be had: whole blocks) */
    char **bufs = NULL;
    range_sums *sums = NULL;
    if (n_blocks < num_threads) {
        bufs = malloc((size_t)num_threads * sizeof *bufs);
        sums = malloc((size_t)(n_blocks * num_threads) * sizeof *sums);
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
    {
        char *losses = NULL;
        void *scratch = alloc(ctx, &losses);
#ifdef _OPENMP
        const int team = omp_get_num_threads(), me = omp_get_thread_num();
#else
        const int team = 1, me = 0;
#endif
        /* the team may be smaller than asked; pieces need a buffer per block */
        const int64_t pieces = bufs && sums && 0 < n_blocks && n_blocks < team
                               ? block_pieces(n_blocks, team) : 1;
        if (!scratch) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
        int ok = 1;
        if (pieces > 1) {
            bufs[me] = losses;
#ifdef _OPENMP
#pragma omp barrier
#endif
            ok = !failed;       /* every write of it is before the barrier */
        }
        if (pieces == 1) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t b = 0; b < n_blocks; b++)
                if (scratch) whole_block(b, group_size, ctx, range, losses, scratch, out);
        } else if (ok) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t u = 0; u < n_blocks * pieces; u++) {
                const int64_t b = u / pieces, j = u % pieces;
                int64_t start, stop;
                const int64_t grp = block_range(b, group_size, &start, &stop);
                const int64_t lo = piece_edge(start, stop, j, pieces);
                const int64_t hi = piece_edge(start, stop, j + 1, pieces);
                sums[u] = range(ctx, grp, lo, hi, bufs[b] + (lo - start) * out->loss_item,
                                scratch);
            }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t b = 0; b < n_blocks; b++) {
                int64_t start, stop;
                block_range(b, group_size, &start, &stop);
                range_sums r = {0, 0, -1};
                for (int64_t j = 0; j < pieces; j++) {
                    const range_sums q = sums[b * pieces + j];
                    if (r.first < 0) r.first = q.first;
                    r.count += q.count;
                    r.bad += q.bad;
                }
                put_block(out, b, bufs[b], stop - start, r);
            }
        }
        fastsce_scratch_put(scratch);
    }
    free(bufs);
    free(sums);
    return failed ? FASTSCE_ENOMEM : 0;
}

/* Copy C classes of n pixels between strided layouts (element strides: per
 * pixel, per class), e.g. a softmax tile into or out of its [C][bs] buffer.
 * By blocks (block_transpose, below) where one side has adjacent classes
 * and the other adjacent pixels; else (other strides, fewer than B classes
 * or pixels) by typed loops per item size (a memcpy per element would cost
 * more than the loss), STRIDED_PIXELS pixels of one class at a time (as
 * Numba's _transpose): in cache, on W4's tiles, before the blocks, the
 * scatter 0.55 -> 0.32 ns per element against pixel by pixel, every class,
 * and the gather 0.29 -> 0.25. */
#define STRIDED_PIXELS 16
#define DEFINE_TRANSPOSE(NAME, U)                                                      \
static inline void NAME(U *dst, int64_t dps, int64_t dcs, const U *src, int64_t sps,   \
                        int64_t scs, int64_t n, int64_t C)                             \
{                                                                                      \
    for (int64_t q0 = 0; q0 < n; q0 += STRIDED_PIXELS) {                               \
        const int64_t pn = n - q0 < STRIDED_PIXELS ? n - q0 : STRIDED_PIXELS;          \
        for (int64_t k = 0; k < C; k++)                                                \
            for (int64_t q = q0; q < q0 + pn; q++)                                     \
                dst[q * dps + k * dcs] = src[q * sps + k * scs];                       \
    }                                                                                  \
}
DEFINE_TRANSPOSE(transpose1, uint8_t)
DEFINE_TRANSPOSE(transpose2, uint16_t)
DEFINE_TRANSPOSE(transpose4, uint32_t)
DEFINE_TRANSPOSE(transpose8, uint64_t)

/* dst[c * ds + r] = src[r * ss + c] (element strides) for r < rows, c < cols,
 * both >= B = 16 / item: B x B blocks, B rows of B adjacent elements loaded
 * as 16-byte vectors and transposed by log2(B) rounds of unpacks (each pairs
 * vector i with i + B/2 and interleaves their halves), B stores. A row or
 * column's last block overlaps the one before instead of leaving a rest (a
 * copy: those elements get the same bits twice). Numba's twin: _numba_math's
 * transpose_block. x86-64 only (SSE2, the baseline: strided_copy is not
 * cloned); elsewhere element by element. W4 (NHWC, C = 21) at 1 thread:
 * 0.26 -> 0.33 Gelem/s; with uint8 targets 0.24 -> 0.33 (medians of 9,
 * old and new builds alternating). Unlike the element loops, the blocks keep
 * the pre-allocation scheduler: without it W4 ran 3% slower. */
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_BLOCK_TRANSPOSE 1
#define DEFINE_BLOCK(NAME, B, LO, HI)                                                  \
static inline void NAME(char *d, int64_t ds, const char *s, int64_t ss)                \
{                                                                                      \
    __m128i v[B], u[B];                                                                \
    for (int i = 0; i < B; i++) v[i] = _mm_loadu_si128((const __m128i *)(s + i * ss)); \
    for (int round = 1; round < B; round *= 2) {                                       \
        for (int i = 0; i < B / 2; i++) {                                              \
            u[2 * i] = LO(v[i], v[i + B / 2]);                                         \
            u[2 * i + 1] = HI(v[i], v[i + B / 2]);                                     \
        }                                                                              \
        memcpy(v, u, sizeof v);                                                        \
    }                                                                                  \
    for (int i = 0; i < B; i++) _mm_storeu_si128((__m128i *)(d + i * ds), v[i]);       \
}
DEFINE_BLOCK(block1, 16, _mm_unpacklo_epi8, _mm_unpackhi_epi8)
DEFINE_BLOCK(block2, 8, _mm_unpacklo_epi16, _mm_unpackhi_epi16)
DEFINE_BLOCK(block4, 4, _mm_unpacklo_epi32, _mm_unpackhi_epi32)
DEFINE_BLOCK(block8, 2, _mm_unpacklo_epi64, _mm_unpackhi_epi64)

static void block_transpose(char *dst, int64_t ds, const char *src, int64_t ss, int64_t rows,
                            int64_t cols, int64_t item)
{
    const int64_t B = 16 / item, dsb = ds * item, ssb = ss * item;
    for (int64_t r = 0; r < rows; r += B) {
        const int64_t r0 = r + B <= rows ? r : rows - B;
        for (int64_t c = 0; c < cols; c += B) {
            const int64_t c0 = c + B <= cols ? c : cols - B;
            char *d = dst + (c0 * ds + r0) * item;
            const char *s = src + (r0 * ss + c0) * item;
            switch (item) {
            case 1: block1(d, dsb, s, ssb); break;
            case 2: block2(d, dsb, s, ssb); break;
            case 4: block4(d, dsb, s, ssb); break;
            default: block8(d, dsb, s, ssb);
            }
        }
    }
}
#else
#define HAVE_BLOCK_TRANSPOSE 0
#endif

/* GCC's pre-allocation scheduler (build_ffi.py turns it on) made the element
 * loops slower: W4 at 1 thread 4% slower with it, as fast as before without. */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_PRE_SCHEDULE __attribute__((optimize("no-schedule-insns")))
#else
#define NO_PRE_SCHEDULE
#endif

/* The copy for elements of `item` bytes (a memcpy each for an odd size).
 * Not inlined: inlined in the softmax's walk, the row copies cost W4 (which
 * never makes them) 6-8% in C. */
static __attribute__((noinline)) NO_PRE_SCHEDULE
void strided_copy(char *dst, int64_t dps, int64_t dcs, const char *src, int64_t sps,
                  int64_t scs, int64_t n, int64_t C, int64_t item)
{
#if HAVE_BLOCK_TRANSPOSE
    if ((item == 1 || item == 2 || item == 4 || item == 8) && n >= 16 / item
        && C >= 16 / item) {
        if (scs == 1 && dps == 1) {         /* pixel-major into class rows */
            block_transpose(dst, dcs, src, sps, n, C, item);
            return;
        }
        if (sps == 1 && dcs == 1) {         /* class rows into pixel-major */
            block_transpose(dst, dps, src, scs, C, n, item);
            return;
        }
    }
#endif
    switch (item) {
    case 1: transpose1((uint8_t *)dst, dps, dcs, (const uint8_t *)src, sps, scs, n, C); break;
    case 2: transpose2((uint16_t *)dst, dps, dcs, (const uint16_t *)src, sps, scs, n, C); break;
    case 4: transpose4((uint32_t *)dst, dps, dcs, (const uint32_t *)src, sps, scs, n, C); break;
    case 8: transpose8((uint64_t *)dst, dps, dcs, (const uint64_t *)src, sps, scs, n, C); break;
    default:
        for (int64_t q = 0; q < n; q++)
            for (int64_t k = 0; k < C; k++)
                memcpy(dst + (q * dps + k * dcs) * item, src + (q * sps + k * scs) * item,
                       (size_t)item);
    }
}

/* n elements of `item` bytes from src (element stride sps) to dst (dps): a
 * strided row into or out of a contiguous buffer. */
static inline void strided_row(char *dst, int64_t dps, const char *src, int64_t sps, int64_t n,
                               int64_t item)
{
    strided_copy(dst, dps, 0, src, sps, 0, n, 1, item);
}

#endif
