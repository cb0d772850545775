/* Multiclass (softmax) soft-label cross-entropy: fused loss + gradient.
 * Twin of fastsce/_numba_softmax.py.
 *
 * Design
 *  - Pixels are walked like the binary loss's elements (C order over the
 *    pixel shape, fastsce/_layout.py); the class axis is a stride. Rows are
 *    cut into tiles of `tile` pixels (a function of C only). A tile whose
 *    pixels are not contiguous (NHWC), or whose class rows would collide in
 *    cache (NCHW maps of 2^k pixels, see gathered()), is gathered into a
 *    [C][tile + 16] scratch first (the extra cache line keeps a pixel's
 *    classes out of one cache set; gathers of whole rows and of pixel-major
 *    tiles prefetch ahead), and
 *    its gradient written there and copied out (a big one by non-temporal
 *    stores, _layout.stream_gradient); so every layout runs the
 *    same class-outer, pixel-inner loops: they vectorize across pixels, and
 *    NCHW and NHWC give bitwise the same numbers. A float16 or byte-swapped
 *    input is gathered whatever its layout, converting (csrc/convert.h);
 *    uint8/uint16 soft targets are widened to the compute type per tile
 *    (DEFINE_CODE_TILE).
 *  - Per tile: (1) stream whole class rows once for the per-pixel maximum and
 *    the largest target key (walk.h; out-of-range ones are counted per pixel
 *    only if it is too large), which also brings the tile into cache. Then
 *    per CHUNK of pixels, whose per-pixel sums stay in registers:
 *    (2) exp(x - m) (the rounding of x - m put back, TwoSum), stored with w z
 *    for (4), and float64 sums r = the exps of the classes below the maximum
 *    (the maxima's exps are exactly 1 and are counted), W = sum w z,
 *    A = sum w z (m - x), classes in pairs (a pair's terms added in the
 *    compute type first); (3) the loss A + W log1p(r), every term
 *    non-negative, so full relative precision even for a dominant class;
 *    (4) the gradient W e / (1 + r) - w z. Each logit and target is read from
 *    memory once and each gradient element written once.
 *  - Blocks of FASTSCE_BLOCK pixels; a block keeps its pixel losses in a
 *    buffer summed by one fixed loop, so the total depends neither on the
 *    layout's tiling nor on the thread count (nor on the pieces threads
 *    share a block in when there are fewer blocks than threads: walk.h).
 *  - Specialization: from_logits and divergence are compile-time (the inner
 *    loops change); gradient, loss map, weights and mask are tested per tile
 *    or per pixel, outside the per-class loops.
 *  - Trust: the Python layer has checked dtypes, shapes, aliasing and options.
 */
#include <stdlib.h>
#include <string.h>
#include "fastsce.h"
#include "fastsce_math.h"
#include "walk.h"
#include "convert.h"

/* Pixels per chunk: the per-pixel sums of a chunk stay in vector registers
 * while its classes stream past. Nothing computed depends on it (the Numba
 * twin uses longer chunks). */
#define CHUNK 16
#define SIMD _Pragma("omp simd")
#define SIMD_COUNTS _Pragma("omp simd reduction(+:count, bad)")

typedef struct {
    const void *x, *z;            /* class-shaped: element (k, p) at k*cs + p  */
    int64_t xcs, zcs;
    void *g;
    int64_t gcs;
    const void *w, *cw;
    const uint8_t *m;
    void *l;
    int64_t n, C;
    const fastsce_params *p;
    double gs;
    void *e;                      /* scratch: [2][C][CHUNK] exps and w z       */
    void *mx, *nbad;              /* scratch: [tile] maxima, bad-target counts */
    double *lbuf;                 /* this tile's place in the block's losses   */
    uint8_t *valid;               /* [tile]: pixel counted (for first_bad)     */
    void *zx;                     /* scratch: [C][zxs] codes widened to X      */
    int64_t zxs;
} tile_args;

typedef struct { int64_t count, bad; } tile_sums;
typedef tile_sums (*tile_fn)(const tile_args *);

#define IS_HARD_int64_t 1
#define IS_HARD_float 0
#define IS_HARD_double 0
#define IS_HARD_uint8_t 0
#define IS_HARD_uint16_t 0
#define IS_HARD(T) IS_HARD_##T

/* One class of one pixel in step (2): returns e = exp(x - m) for the
 * gradient; *es is what the sum r adds (e 2^S, 0 for a maximum: its exp is
 * exactly 1 and counted in *tie instead), *at = w z (m - x). Probabilities:
 * e = c, *at = -w z clog(c). */
#define DEFINE_CLASS(XN, X)                                                            \
ALWAYS_INLINE X class_##XN(X v, X mxj, X wz, int from_logits, X *es, X *tie, X *at)    \
{                                                                                      \
    if (!from_logits) {                                                                \
        X lc = log_##XN(v);                                                            \
        lc = lc < (X)-100 ? (X)-100 : lc;                                              \
        *es = *tie = (X)0;                                                             \
        *at = wz == (X)0 ? (X)0 : -(wz * lc);                                          \
        return v;                                                                      \
    }                                                                                  \
    X d = v == mxj ? (X)0 : v - mxj;            /* x = m = +inf: d = 0 */              \
    X bb = d - v;                               /* TwoSum: what rounding x - m lost */ \
    X err = (v - (d - bb)) + (-mxj - bb);                                              \
    /* 0 if d is clamped, or 0 (x = m; inf - inf is NaN): not err == err, which    */ \
    /* cost GCC's loop a third of its speed                                        */ \
    err = d > EXP_CLASS_MIN_##XN && d < (X)0 ? err : (X)0;                            \
    X ex = exp_class_##XN(d, err);                                                     \
    *tie = d == (X)0 ? (X)1 : (X)0;                                                    \
    *es = d == (X)0 ? (X)0 : ex;                                                       \
    *at = wz == (X)0 ? (X)0 : wz * -d;                                                 \
    return ex * EXP_CLASS_UNSCALE_##XN;                                                \
}
DEFINE_CLASS(f32, float)
DEFINE_CLASS(f64, double)

/* Same operations in the same order as _tile in _numba_softmax.py. */
#define DEFINE_TILE(XN, X, TN, T)                                                      \
ALWAYS_INLINE X target_##XN##_##TN(const T *z, const int32_t *lab, int64_t zcs,        \
                                   int64_t k, int64_t p, X inv, X keep, X shift)       \
{                                                                                      \
    if (IS_HARD(T)) return (lab[p] == (int32_t)k ? keep : (X)0) + shift;               \
    return (X)z[k * zcs + p] * inv * keep + shift;                                     \
}                                                                                      \
/* Class k of pixel j in step (2): stores e and w z for (4) (rows of CHUNK);           \
 * returns w z and the sums' terms (es, tie, at, and w z log z for the                 \
 * divergence). */                                                                     \
ALWAYS_INLINE X one_##XN##_##TN(const X *x, int64_t xcs, const T *z,                   \
        const int32_t *lab, int64_t zcs, X *e, X *wzs, int64_t k, int64_t j, X cwk,    \
        X mxj, X inv, X keep, X shift, X *es, X *tie, X *at, X *h, int from_logits,    \
        int divergence)                                                                \
{                                                                                      \
    X zv = target_##XN##_##TN(z, lab, zcs, k, j, inv, keep, shift), wz = cwk * zv;     \
    e[k * CHUNK + j] = class_##XN(x[k * xcs + j], mxj, wz, from_logits, es, tie, at);  \
    wzs[k * CHUNK + j] = wz;                                                           \
    *h = divergence && wz != (X)0 ? wz * log_##XN(zv) : (X)0;                          \
    return wz;                                                                         \
}                                                                                      \
/* Step (2) for class k, and k + 1 if `two`, of pixels q0 .. q0+np-1; a pair's         \
 * terms (non-negative) are added in X, one rounding, then to the float64              \
 * sums: half the converts. */                                                         \
ALWAYS_INLINE void classes_##XN##_##TN(const tile_args *a, const X *x, const T *z,     \
        const int32_t *lab, int64_t k, int two, int64_t q0, int64_t np, double *s,     \
        double *W, double *A, double *H, X *ties, int from_logits, int divergence)     \
{                                                                                      \
    const X *cw = (const X *)a->cw, *mx = (const X *)a->mx + q0;                       \
    X *e = (X *)a->e, *wzs = e + a->C * CHUNK;                                         \
    const int64_t xcs = a->xcs, zcs = a->zcs;                                          \
    const fastsce_params *p = a->p;                                                    \
    const X inv = (X)(1.0 / p->scale), keep = (X)(1.0 - p->eps);                       \
    const X shift = (X)(p->eps / (double)a->C);                                        \
    const X cw0 = cw ? cw[k] : (X)1, cw1 = cw && two ? cw[k + 1] : (X)1;               \
    SIMD for (int64_t j = 0; j < np; j++) {                                            \
        X es0, t0, a0, h0, es1 = (X)0, t1 = (X)0, a1 = (X)0, h1 = (X)0, wz1 = (X)0;    \
        X wz0 = one_##XN##_##TN(x, xcs, z, lab, zcs, e, wzs, k, j, cw0, mx[j], inv,    \
                                keep, shift, &es0, &t0, &a0, &h0, from_logits,         \
                                divergence);                                           \
        if (two)                                                                       \
            wz1 = one_##XN##_##TN(x, xcs, z, lab, zcs, e, wzs, k + 1, j, cw1, mx[j],   \
                                  inv, keep, shift, &es1, &t1, &a1, &h1, from_logits,  \
                                  divergence);                                         \
        s[j] += (double)(es0 + es1);                                                   \
        W[j] += (double)(wz0 + wz1);                                                   \
        A[j] += (double)(a0 + a1);                                                     \
        if (divergence) H[j] += (double)(h0 + h1);                                     \
        ties[j] += t0 + t1;                                                            \
    }                                                                                  \
}                                                                                      \
/* Steps (2)-(4) for pixels q0 .. q0+np-1; np == CHUNK except at the tile's            \
 * end, so the main case has a constant trip count and its per-pixel sums              \
 * stay in registers. */                                                               \
ALWAYS_INLINE tile_sums chunk_##XN##_##TN(const tile_args *a, int64_t q0, int64_t np,  \
                                          int from_logits, int divergence)             \
{                                                                                      \
    const X *x = (const X *)a->x + q0, *w = (const X *)a->w;                           \
    const X *nbad = (const X *)a->nbad + q0;                                           \
    const T *z = (const T *)a->z + q0;                                                 \
    X *e = (X *)a->e, *wzs = e + a->C * CHUNK;                                         \
    const uint8_t *m = a->m ? a->m + q0 : NULL;     /* fields read once: stores */     \
    uint8_t *valid = a->valid + q0;                 /* below could alias *a     */     \
    double *lb = a->lbuf + q0;                                                         \
    const X gs = (X)a->gs;                                                             \
    const int64_t C = a->C;                                                            \
    const fastsce_params *p = a->p;                                                    \
    X ties[CHUNK];                                                                     \
    double s[CHUNK], W[CHUNK], A[CHUNK], H[CHUNK];                                     \
    /* hard: the labels as int32 (-1 out of range), so (2) compares them at the   */ \
    /* float32 vectors' width (as int64: 0.35 against 0.37 Gelem/s)                */ \
    int32_t lab[CHUNK];                                                                \
    SIMD for (int64_t j = 0; j < np; j++) {                                            \
        s[j] = W[j] = A[j] = H[j] = 0.0;                                               \
        ties[j] = (X)0;                                                                \
        if (IS_HARD(T)) lab[j] = z[j] >= 0 && z[j] < (T)C ? (int32_t)z[j] : -1;        \
    }                                                                                  \
    for (int64_t k = 0; k + 1 < C; k += 2)             /* (2) exps and sums */        \
        classes_##XN##_##TN(a, x, z, lab, k, 1, q0, np, s, W, A, H, ties, from_logits, \
                            divergence);                                               \
    if (C & 1)                                                                         \
        classes_##XN##_##TN(a, x, z, lab, C - 1, 0, q0, np, s, W, A, H, ties,          \
                            from_logits, divergence);                                  \
    X fac[CHUNK], wf[CHUNK], is[CHUNK], ok[CHUNK], wt[CHUNK];                          \
    int64_t count = 0, bad = 0;                                                        \
    /* Apart from (3): byte loads would widen its vectors past np, and there      */ \
    /* GCC read `w ? w[j] : 1` by a masked load, all-off if w is NULL: an assist,  */ \
    /* 15% of W3's time.                                                           */ \
    for (int64_t j = 0; j < np; j++) {                                                 \
        int v = m ? m[j] != 0 : 1;                                                     \
        if (IS_HARD(T) && p->has_ignore) v = v && z[j] != (T)p->ignore;                \
        ok[j] = v ? (X)1 : (X)0;                                                       \
        valid[j] = (uint8_t)v;                                                         \
        wt[j] = w ? w[q0 + j] : (X)1;                                                  \
    }                                                                                  \
    SIMD_COUNTS for (int64_t j = 0; j < np; j++) {      /* (3) pixel losses */         \
        int v = ok[j] != (X)0;                                                         \
        bad += IS_HARD(T) ? v && lab[j] < 0                 /* out of range */         \
                          : v ? (int32_t)nbad[j] : 0;      /* elements */              \
        count += v;                                                                    \
        double loss64 = divergence ? A[j] + H[j] : A[j];                               \
        double rr = s[j] * EXP_CLASS_UNSCALE_##XN + ((double)ties[j] - 1.0);           \
        double iu, lr = log1p_pos_f64(rr, &iu);                                        \
        if (from_logits) loss64 += W[j] == 0.0 ? 0.0 : W[j] * lr;                      \
        X wp = wt[j];                                                                  \
        lb[j] = v ? (double)((X)loss64 * wp) : 0.0;                                    \
        wf[j] = (X)W[j];                                                               \
        is[j] = (X)iu;                                                                 \
        fac[j] = wp * gs;                                                              \
    }                                                                                  \
    if (a->l)                                                                          \
        SIMD for (int64_t j = 0; j < np; j++) ((X *)a->l)[q0 + j] = (X)lb[j];          \
    if (a->g) {                                         /* (4) gradient */             \
        X *g = (X *)a->g + q0;                                                         \
        for (int64_t k = 0; k < C; k++) {                                              \
            const X *ek = e + k * CHUNK, *wzk = wzs + k * CHUNK;                       \
            SIMD for (int64_t j = 0; j < np; j++) {                                    \
                X gv;                                                                  \
                if (from_logits) {                                                     \
                    gv = (wf[j] * (ek[j] * is[j]) - wzk[j]) * fac[j];                  \
                } else {                                                               \
                    X den = ek[j] > (X)1e-12 ? ek[j] : (X)1e-12;                       \
                    gv = (-wzk[j] / den) * fac[j];                                     \
                }                                                                      \
                g[k * a->gcs + j] = ok[j] != (X)0 ? gv : (X)0;                         \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
    tile_sums r = {count, bad};                                                        \
    return r;                                                                          \
}                                                                                      \
/* (1), streaming whole class rows of the tile: the maxima, and per pixel              \
 * how many of its soft targets lie outside [0, scale] (walk.h's keys). */             \
ALWAYS_INLINE void rows_##XN##_##TN(const tile_args *a, int from_logits)               \
{                                                                                      \
    const X *x = (const X *)a->x;                                                      \
    const T *z = (const T *)a->z;                                                      \
    X *mx = (X *)a->mx, *nbad = (X *)a->nbad;                                          \
    const int64_t n = a->n, C = a->C;                                                  \
    if (from_logits) {                                                                 \
        SIMD for (int64_t q = 0; q < n; q++) mx[q] = x[q];                             \
        for (int64_t k = 1; k < C; k++)                                                \
            SIMD for (int64_t q = 0; q < n; q++) {                                     \
                X v = x[k * a->xcs + q];                                               \
                mx[q] = v > mx[q] ? v : mx[q];                                         \
            }                                                                          \
    }                                                                                  \
    if (!IS_HARD(T)) {                                                                 \
        const RKEY(T) top_ok = rkey_top_##T(a->p->scale);                              \
        RKEY(T) top = 0;                                                               \
        for (int64_t k = 0; k < C; k++) {                                              \
            const T *zk = z + k * a->zcs;                                              \
            RKEY(T) rt = 0;                                                            \
            _Pragma("omp simd reduction(max:rt)")                                      \
            for (int64_t q = 0; q < n; q++) {                                          \
                RKEY(T) key = rkey_##T(zk[q]);                                         \
                rt = key > rt ? key : rt;                                              \
            }                                                                          \
            top = rt > top ? rt : top;                                                 \
        }                                                                              \
        SIMD for (int64_t q = 0; q < n; q++) nbad[q] = (X)0;                           \
        if (top > top_ok)       /* rare: which pixels, exactly (masks apply in (3)) */ \
            for (int64_t k = 0; k < C; k++)                                            \
                SIMD for (int64_t q = 0; q < n; q++) {                                 \
                    T t = z[k * a->zcs + q];                                           \
                    nbad[q] += rkey_##T(t) > top_ok && t != (T)0 ? (X)1 : (X)0;        \
                }                                                                      \
    }                                                                                  \
}                                                                                      \
ALWAYS_INLINE tile_sums tile_##XN##_##TN(const tile_args *a, int from_logits,          \
                                         int divergence)                               \
{                                                                                      \
    rows_##XN##_##TN(a, from_logits);                                                  \
    tile_sums r = {0, 0};                                                              \
    for (int64_t q0 = 0; q0 < a->n; q0 += CHUNK) {                                     \
        tile_sums c = a->n - q0 >= CHUNK                                               \
            ? chunk_##XN##_##TN(a, q0, CHUNK, from_logits, divergence)                 \
            : chunk_##XN##_##TN(a, q0, a->n - q0, from_logits, divergence);            \
        r.count += c.count;                                                            \
        r.bad += c.bad;                                                                \
    }                                                                                  \
    return r;                                                                          \
}                                                                                      \
DEFINE_TILE_FNS(XN, TN)

/* uint8/uint16 soft targets (codes): the tile's codes widened to X (exact, so
 * the numbers are the X tile's and Numba's, which reads them in place), then
 * the X tile. Read in place, bytes beside floats in the chunk's loops of 16
 * pixels set GCC's vectors at 16 bytes, and every X ran on 128-bit vectors:
 * uint8 targets at 1 thread, (1, 21, 256, 512) float32 logits 0.25 -> 0.33
 * Gelem/s, NHWC 0.19 -> 0.24, (1, 21, 250, 520) 0.26 -> 0.37, float64 logits
 * 0.11 -> 0.17 (Zen 2). */
#define DEFINE_CODE_TILE(XN, X, TN, T)                                                 \
ALWAYS_INLINE tile_sums tile_##XN##_##TN(const tile_args *a, int from_logits,          \
                                         int divergence)                               \
{                                                                                      \
    tile_args w = *a;                                                                  \
    X *zx = (X *)a->zx;                                                                \
    for (int64_t k = 0; k < a->C; k++) {                                               \
        const T *zk = (const T *)a->z + k * a->zcs;                                    \
        X *d = zx + k * a->zxs;                                                        \
        SIMD_OVER_##TN("omp simd") for (int64_t q = 0; q < a->n; q++) d[q] = (X)zk[q]; \
    }                                                                                  \
    w.z = zx;                                                                          \
    w.zcs = a->zxs;                                                                    \
    return tile_##XN##_##XN(&w, from_logits, divergence);                              \
}                                                                                      \
DEFINE_TILE_FNS(XN, TN)

/* The tile's four specializations, and their table. */
#define DEFINE_TILE_FNS(XN, TN)                                                        \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_00(const tile_args *a)              \
{ return tile_##XN##_##TN(a, 0, 0); }                                                  \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_01(const tile_args *a)              \
{ return tile_##XN##_##TN(a, 0, 1); }                                                  \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_10(const tile_args *a)              \
{ return tile_##XN##_##TN(a, 1, 0); }                                                  \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_11(const tile_args *a)              \
{ return tile_##XN##_##TN(a, 1, 1); }                                                  \
/* index = from_logits << 1 | divergence */                                            \
static const tile_fn tiles_##XN##_##TN[4] = {                                          \
    tile_##XN##_##TN##_00, tile_##XN##_##TN##_01, tile_##XN##_##TN##_10,               \
    tile_##XN##_##TN##_11};

/* Which tile each target type gets. */
#define DEFINE_TILE_f32 DEFINE_TILE
#define DEFINE_TILE_f64 DEFINE_TILE
#define DEFINE_TILE_i64 DEFINE_TILE
#define DEFINE_TILE_u8 DEFINE_CODE_TILE
#define DEFINE_TILE_u16 DEFINE_CODE_TILE

/* First pixel of a tile with a bad target (rare path, scalar). */
#define DEFINE_FIRST_BAD_PIXEL(TN, T)                                                  \
static int64_t first_bad_pixel_##TN(const uint8_t *valid, const T *z, int64_t zcs,      \
                                    int64_t n, int64_t C, double scale)                \
{                                                                                      \
    for (int64_t q = 0; q < n; q++) {                                                  \
        if (!valid[q]) continue;                                                       \
        if (IS_HARD(T)) {                                                              \
            if (!(z[q] >= 0 && z[q] < (T)C)) return q;                                 \
        } else {                                                                       \
            for (int64_t k = 0; k < C; k++) {                                          \
                double t = (double)z[k * zcs + q];                                     \
                if (!(t >= 0.0 && t <= scale)) return q;                               \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
    return -1;                                                                         \
}
DEFINE_FIRST_BAD_PIXEL(f32, float)
DEFINE_FIRST_BAD_PIXEL(f64, double)
DEFINE_FIRST_BAD_PIXEL(u8, uint8_t)
DEFINE_FIRST_BAD_PIXEL(u16, uint16_t)
DEFINE_FIRST_BAD_PIXEL(i64, int64_t)

typedef int64_t (*first_bad_pixel_fn)(const uint8_t *, const void *, int64_t, int64_t,
                                      int64_t, double);

/* Class stride of the gather buffers: a tile plus one cache line, so that a
 * pixel's classes do not all fall in one cache set (a power-of-two stride). */
#define BUF_STRIDE(tsz) ((tsz) + 16)

/* What a gather reads, as rows of whole 64-byte lines: `rows` rows of `lines`
 * lines at base + k * cs. A tile copied row by row is C rows; a pixel-major
 * (NHWC) tile is one row of C * n elements. */
typedef struct { const char *base; int64_t cs, rows, lines; } row_set;

/* Lines a gather prefetches ahead of its copy (16 KB): measured best of
 * 64-512; the hardware prefetcher alone restarts at every row and 4 KB page
 * (NCHW rows are a tile long), at about half the bandwidth. */
#define PREFETCH_LINES 256
#define COPY_BLOCK 16                /* lines copied per run of prefetches */

/* memcpy of a run of prefetched lines; on x86-64 by `rep movsq`. glibc copies
 * runs this short by vector moves: W3 in C at 1 thread, with the L2 prefetch,
 * ran 0.44 Gelem/s that way and 0.48 so (one (21, 512, 512) map through the
 * package, medians of 5 alternating runs; rep movsb was between). Not under
 * AddressSanitizer, which does not see inside asm. */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTSCE_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define FASTSCE_ASAN 1
#endif
static void copy_run(char *dst, const char *src, int64_t bytes)
{
#if defined(__GNUC__) && defined(__x86_64__) && defined(__LP64__) && !defined(FASTSCE_ASAN)
    size_t n = (size_t)bytes / 8, tail = (size_t)bytes % 8;
    __asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    memcpy(dst, src, tail);
#else
    memcpy(dst, src, (size_t)bytes);
#endif
}

/* A gather's prefetches, PREFETCH_LINES lines ahead of its copy: through the
 * lines of its own rows (a), then of the next gather's (b). Inlined: called
 * out of line, the pixel-major gather kept the 1-thread W4 time it had
 * without prefetches. */
typedef struct { row_set a, b; int64_t k, l; } prefetcher;   /* ahead: row k, line l */

/* Moves the line ahead by `count` lines (of a's rows, then b's as rows
 * a.rows + ...), prefetching them if `issue`. */
ALWAYS_INLINE void prefetch_lines(prefetcher *f, int64_t count, int issue)
{
    for (; count > 0 && f->k < f->a.rows + f->b.rows; count--) {
        const int in_a = f->k < f->a.rows;
        const row_set *r = in_a ? &f->a : &f->b;
        if (issue) PREFETCH(r->base + (in_a ? f->k : f->k - f->a.rows) * r->cs + f->l * 64);
        if (++f->l == r->lines) { f->l = 0; f->k++; }
    }
}

ALWAYS_INLINE prefetcher prefetch_start(row_set a, row_set b)
{
    if (!a.base || a.lines == 0) a.rows = 0;
    if (!b.base || b.lines == 0) b.rows = 0;
    prefetcher f = {a, b, 0, 0};
    prefetch_lines(&f, PREFETCH_LINES, 0);
    return f;
}

/* Copy C rows of `bytes` (class strides scs, dbs), prefetching ahead. */
static void copy_rows(char *dst, int64_t dbs, const char *src, int64_t scs, int64_t C,
                      int64_t bytes, prefetcher *f)
{
    for (int64_t k = 0; k < C; k++) {
        for (int64_t b = 0; b < bytes; b += COPY_BLOCK * 64) {
            const int64_t m = bytes - b < COPY_BLOCK * 64 ? bytes - b : COPY_BLOCK * 64;
            prefetch_lines(f, m / 64, 1);           /* as many lines as it copies */
            copy_run(dst + k * dbs + b, src + k * scs + b, m);
        }
    }
}

/* Whether a class-shaped tile is pixel-major and dense (NHWC): classes
 * adjacent, pixels C elements apart; its n pixels are one run of C * n. */
static int pixel_major(int64_t ps, int64_t cs, int64_t C) { return cs == 1 && ps == C; }

/* A pixel-major tile into [C][bs], STRIDED_PIXELS pixels at a time, its
 * lines prefetched ahead: the loads of the transpose, stride C, missed in
 * perf. With the streamed scatter below, W4 in C (best of 15 runs, 3
 * alternating pairs): 1 thread 0.36 -> 0.44 Gelem/s. Numba's twin ran 8%
 * slower with these prefetches and gathers without them. */
static void gather_pixels(char *buf, int64_t bs, const char *src, int64_t n, int64_t C,
                          int64_t item, prefetcher *f)
{
    int64_t done = 0;                                   /* lines prefetched for */
    for (int64_t q0 = 0; q0 < n; q0 += STRIDED_PIXELS) {
        const int64_t pn = n - q0 < STRIDED_PIXELS ? n - q0 : STRIDED_PIXELS;
        const int64_t upto = (q0 + pn) * C * item / 64;
        prefetch_lines(f, upto - done, 1);
        done = upto;
        strided_copy(buf + q0 * item, 1, bs, src + q0 * C * item, C, 1, pn, C, item);
    }
}

static void gather_classes(const char *base, int64_t off, int64_t ps, int64_t cs, int64_t n,
                           int64_t C, int64_t item, int64_t size, int code, char *buf,
                           int64_t bs, row_set next)
{
    const char *src = base + off * item;
    if (code) {                     /* converting: class row by class row */
        for (int64_t k = 0; k < C; k++)
            convert_row(buf + k * bs * size, size, src + k * cs * item, item, ps, n, code);
        return;
    }
    if (ps == 1) {                  /* contiguous rows */
        row_set own = {src, cs * item, C, n * item / 64};
        prefetcher f = prefetch_start(own, next);
        copy_rows(buf, bs * item, src, cs * item, C, n * item, &f);
    } else if (pixel_major(ps, cs, C)) {
        row_set own = {src, 0, 1, n * C * item / 64};
        prefetcher f = prefetch_start(own, next);
        gather_pixels(buf, bs, src, n, C, item, &f);
    } else {
        strided_copy(buf, 1, bs, src, ps, cs, n, C, item);
    }
}

/* memcpy, but by non-temporal 16-byte stores when dst is 16-byte aligned and
 * bytes a multiple of 16 (x86): a gradient bigger than the caches goes to
 * memory without the read for ownership and without evicting the inputs
 * (W3 at 1 thread: 0.84 -> 0.97 Gelem/s). store_fence() orders them before
 * the data is handed to another thread. x86-64 only, as Numba's
 * stream_elements. */
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
static void stream_copy(char *dst, const char *src, int64_t bytes)
{
    if (((uintptr_t)dst | (uintptr_t)bytes) & 15) { memcpy(dst, src, (size_t)bytes); return; }
    for (int64_t b = 0; b < bytes; b += 16)
        _mm_stream_si128((__m128i *)(dst + b), _mm_loadu_si128((const __m128i *)(src + b)));
}
static void store_fence(void) { _mm_sfence(); }
#else
static void stream_copy(char *dst, const char *src, int64_t bytes) { memcpy(dst, src, (size_t)bytes); }
static void store_fence(void) {}
#endif

/* `stage` holds STRIDED_PIXELS pixels of C classes. */
static void scatter_classes(char *base, int64_t off, int64_t ps, int64_t cs, int64_t n,
                            int64_t C, int64_t item, const char *buf, int64_t bs, int stream,
                            char *stage)
{
    char *dst = base + off * item;
    if (ps == 1) {                  /* contiguous rows: row by row, not interleaved */
        for (int64_t k = 0; k < C; k++) {
            if (stream) stream_copy(dst + k * cs * item, buf + k * bs * item, n * item);
            else memcpy(dst + k * cs * item, buf + k * bs * item, (size_t)(n * item));
        }
    } else if (stream && pixel_major(ps, cs, C)) {
        /* pixel-major: transposed into the stage (in cache), streamed out whole */
        for (int64_t q0 = 0; q0 < n; q0 += STRIDED_PIXELS) {
            const int64_t pn = n - q0 < STRIDED_PIXELS ? n - q0 : STRIDED_PIXELS;
            strided_copy(stage, C, 1, buf + q0 * item, 1, bs, pn, C, item);
            stream_copy(dst + q0 * C * item, stage, pn * C * item);
        }
    } else {
        strided_copy(dst, ps, cs, buf, 1, bs, n, C, item);
    }
}

/* A pixel-shaped input row of stride st: in place if contiguous and native,
 * else gathered (converted if `code`) into buf. */
static const char *input_row(char *buf, const char *src, int64_t st, int64_t n, int64_t item,
                             int64_t size, int code)
{
    if (code) convert_row(buf, size, src, item, st, n, code);
    else if (st != 1) strided_row(buf, 1, src, st, n, item);
    else return src;
    return buf;
}

typedef struct {
    int ndim;
    const int64_t *shape, *strides, *cstrides;
    int64_t group_size, C, tsz;
    const char *base[FASTSCE_NSLOTS];
    int64_t item[FASTSCE_NSLOTS];       /* bytes per element in storage  */
    int64_t size[FASTSCE_NSLOTS];       /* bytes per element as computed */
    int hard;
    int stream_g;                       /* buffered gradient copied out by stream_copy */
    tile_fn tile;
    first_bad_pixel_fn first_bad;
    const void *cw;
    const fastsce_params *p;
    const double *gscale;
    double *part_loss;
    int64_t *part_count, *part_bad, *part_first;
} softmax_walk;

/* Per-thread scratch, carved from one allocation after this header (with
 * the block's loss buffer, which parallel_blocks hands out). */
typedef struct {
    char *xs, *zs, *gs, *stage, *zx, *e, *mx, *nbad, *row[FASTSCE_NSLOTS];
    uint8_t *valid;
} softmax_scratch;

/* Whether a class-shaped operand goes through a [C][tile] buffer (gathered
 * in, or for the gradient copied out): when its pixels are strided (NHWC),
 * when it needs converting, or when its class stride is a whole number of
 * pages (NCHW maps of 2^k pixels): a pixel's classes then all fall in the
 * same cache sets and evict each other before the tile is done with them
 * (and the gradient's rows, written 16 pixels at a time, run at half the
 * bandwidth of its whole rows copied out). */
static int gathered(const softmax_walk *k, int s)
{
    const int nd = k->ndim;
    return k->strides[s * nd + nd - 1] != 1 || k->p->convert[s]
           || (k->cstrides[s] * k->item[s]) % 4096 == 0;
}

/* Whether the targets are uint8/uint16 codes (DEFINE_CODE_TILE widens them). */
static int codes(const softmax_walk *k) { return !k->hard && k->size[ST] < 4; }

static void *softmax_scratch_alloc(const void *ctx, char **losses)
{
    const softmax_walk *k = ctx;
    /* [C][tile] buffers only for the class-shaped operands that need them */
    size_t ct[3] = {0, 0, 0};
    if (k->base[SX] && gathered(k, SX)) ct[0] = (size_t)(k->C * BUF_STRIDE(k->tsz) * k->size[SX]);
    if (k->base[ST] && !k->hard && gathered(k, ST))
        ct[1] = (size_t)(k->C * BUF_STRIDE(k->tsz) * k->size[ST]);
    if (k->base[SG] && gathered(k, SG))
        ct[2] = (size_t)(k->C * BUF_STRIDE(k->tsz) * k->size[SG]);
    const size_t t = (size_t)k->tsz * 8, ce = (size_t)(k->C * CHUNK) * 16;
    const size_t st = k->stream_g ? (size_t)(k->C * STRIDED_PIXELS) * 8 : 0;
    const size_t zx = codes(k) ? (size_t)(k->C * BUF_STRIDE(k->tsz) * k->size[SX]) : 0;
    softmax_scratch *sc = fastsce_scratch_get(sizeof *sc + ct[0] + ct[1] + ct[2] + st + zx + ce
                                              + (FASTSCE_NSLOTS + 2) * t
                                              + (size_t)FASTSCE_BLOCK * 8 + (size_t)k->tsz);
    if (!sc) return NULL;
    char *c = (char *)(sc + 1);
    sc->xs = c; c += ct[0];
    sc->zs = c; c += ct[1];
    sc->gs = c; c += ct[2];
    sc->stage = c; c += st;
    sc->zx = c; c += zx;
    sc->e = c; c += ce;
    sc->mx = c; c += t;
    sc->nbad = c; c += t;
    for (int s = 0; s < FASTSCE_NSLOTS; s++) { sc->row[s] = c; c += t; }
    *losses = c; c += (size_t)FASTSCE_BLOCK * 8;
    sc->valid = (uint8_t *)c;
    return sc;
}

/* A tile of class-shaped input slot s at element offset `off`: in place if its
 * pixels are contiguous and native, else gathered (converted if needed) into
 * the [C][BUF_STRIDE] buf; *cs is its class stride. */
static const char *class_input(const softmax_walk *k, int s, int64_t off, int64_t n, char *buf,
                               int64_t *cs, row_set next)
{
    const int64_t ps = k->strides[s * k->ndim + k->ndim - 1], bs = BUF_STRIDE(k->tsz);
    if (!gathered(k, s)) {
        *cs = k->cstrides[s];
        return k->base[s] + off * k->item[s];
    }
    gather_classes(k->base[s], off, ps, k->cstrides[s], n, k->C, k->item[s], k->size[s],
                   k->p->convert[s], buf, bs, next);
    *cs = bs;
    return buf;
}

/* Slot s's tile of n pixels at element offset off as a prefetching gather
 * reads it (for the prefetches of the gather before it), or nothing. */
static row_set gather_rows(const softmax_walk *k, int s, int64_t off, int64_t n)
{
    const int nd = k->ndim;
    const int64_t ps = k->strides[s * nd + nd - 1], cs = k->cstrides[s], item = k->item[s];
    row_set r = {NULL, 0, 0, 0};
    if (!k->base[s] || (s == ST && k->hard) || !gathered(k, s) || k->p->convert[s]) return r;
    if (ps != 1) return r;      /* pixel-major tiles: their own gather's prefetches */
    r.base = k->base[s] + off * item;
    r.cs = cs * item; r.rows = k->C; r.lines = n * item / 64;
    return r;
}

/* Pixels in the tile at column col of a row of `inner`, `left` pixels before
 * the block's end: tiles never cross a row. */
static int64_t tile_pixels(int64_t inner, int64_t col, int64_t left, int64_t tsz)
{
    int64_t n = inner - col < left ? inner - col : left;
    return n < tsz ? n : tsz;
}

static range_sums softmax_range(const void *ctx, int64_t grp, int64_t lo, int64_t hi,
                                char *losses, void *scratch)
{
    const softmax_walk *k = ctx;
    softmax_scratch *sc = scratch;
    const int nd = k->ndim;
    const int64_t inner = k->shape[nd - 1], C = k->C, tsz = k->tsz, bs = BUF_STRIDE(tsz);
    const int64_t *st = k->strides, *cst = k->cstrides;
    int64_t count = 0, bad = 0, first = -1;
#define PSTRIDE(s) st[(s) * nd + nd - 1]
    for (int64_t i = lo; i < hi;) {
        int64_t row = i / inner, col = i - row * inner;
        const int64_t n = tile_pixels(inner, col, hi - i, tsz);
        int64_t off[FASTSCE_NSLOTS];
        row_offsets(nd, k->shape, st, FASTSCE_NSLOTS, row, col, off);
        tile_args a;
        memset(&a, 0, sizeof a);
        a.n = n; a.C = C; a.p = k->p; a.cw = k->cw;
        a.gs = k->gscale[grp];
        a.e = sc->e; a.mx = sc->mx; a.nbad = sc->nbad; a.valid = sc->valid;
        a.zx = sc->zx; a.zxs = bs;
        a.lbuf = (double *)losses + (i - lo);
        /* the gathers prefetch ahead: x, then z, then the next tile's x */
        row_set next_x = {NULL, 0, 0, 0};
        if (i + n < hi) {
            int64_t off2[FASTSCE_NSLOTS], row2 = (i + n) / inner, col2 = i + n - row2 * inner;
            row_offsets(nd, k->shape, st, FASTSCE_NSLOTS, row2, col2, off2);
            next_x = gather_rows(k, SX, off2[SX], tile_pixels(inner, col2, hi - i - n, tsz));
        }
        row_set after_x = gather_rows(k, ST, off[ST], n);
        a.x = class_input(k, SX, off[SX], n, sc->xs, &a.xcs, after_x.base ? after_x : next_x);
        if (k->hard)
            a.z = input_row(sc->row[ST], k->base[ST] + off[ST] * k->item[ST], PSTRIDE(ST), n,
                            k->item[ST], k->size[ST], k->p->convert[ST]);
        else
            a.z = class_input(k, ST, off[ST], n, sc->zs, &a.zcs, next_x);
        if (k->base[SG]) {
            if (!gathered(k, SG)) { a.g = (char *)k->base[SG] + off[SG] * k->item[SG]; a.gcs = cst[SG]; }
            else { a.g = sc->gs; a.gcs = bs; }
        }
        for (int s = SW; s <= SM; s++) {            /* pixel-shaped inputs */
            if (!k->base[s]) continue;
            const char *r = input_row(sc->row[s], k->base[s] + off[s] * k->item[s], PSTRIDE(s),
                                      n, k->item[s], k->size[s], k->p->convert[s]);
            if (s == SW) a.w = r; else a.m = (const uint8_t *)r;
        }
        if (k->base[SL])
            a.l = PSTRIDE(SL) == 1 ? (char *)k->base[SL] + off[SL] * k->item[SL] : sc->row[SL];
        tile_sums r = k->tile(&a);
        if (k->base[SG] && gathered(k, SG))
            scatter_classes((char *)k->base[SG], off[SG], PSTRIDE(SG), cst[SG], n, C, k->item[SG],
                            sc->gs, bs, k->stream_g, sc->stage);
        if (k->base[SL] && PSTRIDE(SL) != 1)
            strided_row((char *)k->base[SL] + off[SL] * k->item[SL], PSTRIDE(SL), sc->row[SL], 1, n,
                        k->item[SL]);
        if (r.bad && first < 0) first = i + k->first_bad(sc->valid, a.z, a.zcs, n, C, k->p->scale);
        count += r.count;
        bad += r.bad;
        i += n;
    }
#undef PSTRIDE
    if (k->stream_g) store_fence();
    range_sums r = {count, bad, first};
    return r;
}

static int softmax_run(const softmax_walk *k, int num_threads)
{
    const block_parts out = {k->part_loss, k->part_count, k->part_bad, k->part_first, 8};
    return parallel_blocks(walk_blocks(k->ndim, k->shape, k->group_size), k->group_size,
                           num_threads, k, softmax_scratch_alloc, softmax_range, &out);
}

#define DEFINE_SOFTMAX(XN, X, TN, T)                                                   \
DEFINE_TILE_##TN(XN, X, TN, T)                                                         \
int fastsce_softmax_ce_##XN##_##TN(int ndim, const int64_t *shape, int64_t group_size,  \
        int64_t classes, int64_t tile, const X *x, const T *t, const X *w,             \
        const uint8_t *m, const int64_t *strides, const int64_t *class_strides,        \
        const X *cw, const fastsce_params *p, const double *gscale, X *g, X *l,        \
        double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first) \
{                                                                                      \
    softmax_walk k;                                                                    \
    memset(&k, 0, sizeof k);                                                           \
    k.ndim = ndim; k.shape = shape; k.strides = strides; k.cstrides = class_strides;   \
    k.group_size = group_size; k.C = classes; k.tsz = tile;                            \
    const void *bases[FASTSCE_NSLOTS] = {x, t, w, m, NULL, g, l};                      \
    const int64_t sizes[FASTSCE_NSLOTS] = {sizeof(X), sizeof(T), sizeof(X), 1, 0,      \
                                           sizeof(X), sizeof(X)};                      \
    k.p = p;                                                                           \
    for (int s = 0; s < FASTSCE_NSLOTS; s++) {                                         \
        k.base[s] = (const char *)bases[s];                                            \
        k.size[s] = sizes[s];                                                          \
        k.item[s] = storage_item(p, s, sizes[s]);                                      \
    }                                                                                  \
    k.hard = IS_HARD(T);                                                               \
    k.stream_g = g && p->stream_grad && gathered(&k, SG);                              \
    k.tile = tiles_##XN##_##TN[(p->from_logits != 0) << 1 | (p->divergence != 0)];     \
    k.first_bad = (first_bad_pixel_fn)first_bad_pixel_##TN;                            \
    k.cw = cw; k.gscale = gscale;                                             \
    k.part_loss = part_loss; k.part_count = part_count;                                \
    k.part_bad = part_bad; k.part_first = part_first;                                  \
    return softmax_run(&k, p->num_threads);                                            \
}
DEFINE_SOFTMAX(f32, float, f32, float)
DEFINE_SOFTMAX(f32, float, f64, double)
DEFINE_SOFTMAX(f32, float, u8, uint8_t)
DEFINE_SOFTMAX(f32, float, u16, uint16_t)
DEFINE_SOFTMAX(f32, float, i64, int64_t)
DEFINE_SOFTMAX(f64, double, f32, float)
DEFINE_SOFTMAX(f64, double, f64, double)
DEFINE_SOFTMAX(f64, double, u8, uint8_t)
DEFINE_SOFTMAX(f64, double, u16, uint16_t)
DEFINE_SOFTMAX(f64, double, i64, int64_t)
