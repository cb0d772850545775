/* Pieces shared by the kernel files: inlining and CPU-dispatch macros, and
 * the offsets of a row of the strided walk (see fastsce/_layout.py). */
#ifndef FASTSCE_WALK_H
#define FASTSCE_WALK_H
#include <stdint.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

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

enum { SX, ST, SW, SM, SPW, SG, SL };   /* operand slots, as _layout.SLOTS */

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

#endif
