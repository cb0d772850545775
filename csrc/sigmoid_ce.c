/* Binary (sigmoid) soft-label cross-entropy: fused loss + gradient.
 * Twin of fastsce/_numba_kernels.py.
 *
 * Design
 *  - Fused: one pass reads x, targets (weight, mask, pos_weight if given)
 *    once, writes the gradient (and the loss map for "none") and sums the loss.
 *  - Layout: every operand is a base pointer plus element strides over one
 *    C-order iteration shape (fastsce/_layout.py coalesces it first). The
 *    walk goes row by row of the last dimension; a row's operand with unit
 *    stride is used in place, any other is gathered into per-thread scratch
 *    (outputs scattered back), so the segment loop always sees contiguous
 *    data and vectorizes. A float16 or byte-swapped input is gathered
 *    whatever its stride, converting (csrc/convert.h).
 *  - Blocks: each reduction group is cut into FASTSCE_BLOCK-element blocks,
 *    one float64 partial per block, combined by the caller in a fixed order:
 *    results do not depend on the thread count. Threads take whole blocks
 *    (`schedule(static)`), or share pieces of them when there are fewer
 *    blocks than threads (walk.h: parallel_blocks); no float reduction
 *    clause, no float atomics. The rows
 *    write their element losses, in the compute type, to one block-wide
 *    buffer, summed in float64 once the block is done (walk.h's block sums):
 *    a block's partial does not depend on where its rows break (a strided
 *    view and a contiguous copy of it sum alike).
 *  - Specialization: segment loops are instantiated for every combination of
 *    from_logits, divergence, extras (none, or any of weight/mask/pos_weight,
 *    an absent one reading a per-thread buffer of neutral values), gradient
 *    and loss map, and for integer targets whether there is an ignore_value,
 *    so the hot loops carry no run-time branches; plus, for the common call
 *    (logits, no divergence or loss map, no pos_weight), loops that read a
 *    weight, a mask or both in place.
 *  - Trust: the Python layer has checked dtypes, shapes, aliasing and option
 *    ranges; here only scratch allocation can fail.
 */
#include <stdlib.h>
#include <string.h>
#include "fastsce.h"
#include "fastsce_math.h"
#include "walk.h"
#include "convert.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef FASTSCE_BUILD_FLAGS_STR
#define FASTSCE_BUILD_FLAGS_STR ""
#endif
const char FASTSCE_BUILD_FLAGS[] = FASTSCE_BUILD_FLAGS_STR;
#ifdef _OPENMP
const int FASTSCE_HAVE_OPENMP = 1;
#else
const int FASTSCE_HAVE_OPENMP = 0;
#endif

#if FASTSCE_HAVE_CLONES
const char *fastsce_cpu_path(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2)";
    return "baseline";
}
#else
const char *fastsce_cpu_path(void) { return "baseline (no run-time dispatch in this build)"; }
#endif

/* A row's counts; `bad` is nonzero when the row holds a counted target outside
 * [0, scale] (the fused loops flag it; the walk counts them exactly). */
typedef struct { int64_t count, bad; } seg_sums;

/* One row of contiguous operands, as the segment loops see it. */
typedef struct {
    const void *x, *t, *w, *pw;
    const uint8_t *m;
    const void *mk;               /* the mask as 0/1 in the compute type (loops) */
    void *g, *l;
    void *losses;                 /* the row's place in its block's loss buffer */
    int64_t n;
    const fastsce_params *p;
    double gs;
} seg_args;

typedef seg_sums (*segment_fn)(const seg_args *);

/* ---------------------------------------------------- per-element formula */

/* (w * loss, w * dloss * gs) of SPEC §1.1 for raw target tf; same operations
 * in the same order as `element` in _numba_kernels.py. */
#define DEFINE_ELEMENT(XN, X)                                                          \
/* z log z + zc log zc; the larger one's log is log1p(-smaller) (as Numba). */  \
ALWAYS_INLINE X neg_entropy_##XN(X z, X zc)                                            \
{                                                                                      \
    X iu;                                                                              \
    int small = z <= (X)0.5;                                                           \
    X lz = small ? log_##XN(z) : log1p_unit_##XN(-zc, &iu);                            \
    X lzc = small ? log1p_unit_##XN(-z, &iu) : log_##XN(zc);                           \
    return (z > (X)0 ? z * lz : (X)0) + (zc > (X)0 ? zc * lzc : (X)0);                 \
}                                                                                      \
ALWAYS_INLINE X element_##XN(X x, X tf, X sc, X zs, X shift, X a, X w, X gs,            \
                             int from_logits, int divergence, X *grad)                 \
{                                                                                      \
    X z = fma_##XN(tf, zs, shift);                                                     \
    X zc = fma_##XN(sc - tf, zs, shift);                                               \
    X az = a * z, loss, dloss;                                                         \
    if (from_logits) {                                                                 \
        X ax = abs_##XN(x);                                                            \
        X e = exp_neg_##XN(-ax), iu;                                                   \
        X lp = log1p_01_##XN(e, &iu);                                                  \
        int pos = x >= (X)0;                                                           \
        X coef = pick_##XN(pos, zc, az);                                               \
        X lin = coef == (X)0 ? (X)0 : coef * ax;   /* 0 * inf is 0 here (SPEC §2) */   \
        loss = fma_##XN(lp, az + zc, lin);                                             \
        /* the sign selects the fma's operands, not its result: one fma (W1 +7%) */  \
        dloss = fma_##XN(pick_##XN(pos, -az, zc), e, pick_##XN(pos, zc, -az)) * iu;   \
    } else {                                                                           \
        X lc = log_##XN(x);                                                            \
        lc = lc < (X)-100 ? (X)-100 : lc;                                              \
        X iu; /* log(1 - x) as log1p(-x) where 1 - x would round away x's bits */      \
        X l1c = x <= (X)0.5 ? log1p_unit_##XN(-x, &iu) : log_##XN((X)1 - x);           \
        l1c = l1c < (X)-100 ? (X)-100 : l1c;                                           \
        loss = -((az == (X)0 ? (X)0 : az * lc) + (zc == (X)0 ? (X)0 : zc * l1c));       \
        X den = x * ((X)1 - x);                                                        \
        den = den < (X)1e-12 ? (X)1e-12 : den;                                         \
        dloss = (zc * x - az * ((X)1 - x)) / den;                                      \
    }                                                                                  \
    if (divergence)                                                                    \
        loss = loss + neg_entropy_##XN(z, zc);                                         \
    *grad = dloss * w * gs;                                                            \
    return loss * w;                                                                   \
}
DEFINE_ELEMENT(f32, float)
DEFINE_ELEMENT(f64, double)

/* ---------------------------------------------------------- segment loops */

#define IS_INT_uint8_t 1
#define IS_INT_uint16_t 1
#define IS_INT_int64_t 1
#define IS_INT_float 0
#define IS_INT_double 0
#define IS_INT(T) IS_INT_##T
#define IS_UNSIGNED(T) ((T)-1 > (T)0)      /* uint8/uint16 codes; (T)-1 their top */

/* One element of a row's loop (DEFINE_LOOP), its flags compile-time. */
#define LOOP_STEP(XN, X, TN, T)                                                        \
    {                                                                                  \
        X tf = (X)t[i];                                                                \
        int valid = (extras ? mk[i] != (X)0 : bytes ? m[i] != 0 : 1)                   \
                    & !(has_ignore && tf == ignore);                                   \
        RKEY(T) key = rkey_##T(t[i]) & (RKEY(T))-(RKEY(T))valid;                       \
        top = key > top ? key : top;                                                   \
        X dl;                                                                          \
        X loss = element_##XN(x[i], tf, sc, zs, shift, extras ? pw[i] : (X)1,          \
                              weighted ? w[i] : (X)1, gs, from_logits, divergence,     \
                              &dl);                                                    \
        loss = valid ? loss : (X)0;                                                    \
        losses[i] = loss;                                                              \
        count += valid;                                                                \
        if (want_g) g[i] = valid ? dl : (X)0;                                          \
        if (want_l) l[i] = loss;                                                       \
    }

/* The contiguous loop over one row: float targets, or integer codes read in
 * place (under EX_ALL, or float64 logits, they arrive converted to X:
 * DEFINE_SEGMENT); flags are compile-time in every caller:
 * `extras`, the mask (as X) and pos_weight are read; `bytes`, the mask read
 * in place (as uint8); `weighted`, the weight.
 * Numba reads codes in place in every case; a code's conversion is exact, so
 * the two agree bitwise. Codes in place:
 * W2 in C at 1 thread 0.55 (converted in chunks) -> 0.65 Gelem/s, Zen 2
 * (walk.h: SIMD_OVER). */
#define DEFINE_LOOP(XN, X, TN, T)                                                      \
ALWAYS_INLINE seg_sums loop_##XN##_##TN(const seg_args *s, int from_logits,             \
        int divergence, int extras, int bytes, int weighted, int want_g, int want_l,   \
        int has_ignore)                                                                \
{                                                                                      \
    const X *x = (const X *)s->x, *w = (const X *)s->w, *pw = (const X *)s->pw;        \
    const T *t = (const T *)s->t;                                                      \
    const X *mk = (const X *)s->mk;                                                    \
    const uint8_t *m = s->m;                                                           \
    X *g = (X *)s->g, *l = (X *)s->l;                                                  \
    X *losses = (X *)s->losses;                                                        \
    const fastsce_params *p = s->p;                                                    \
    /* z = tf * zs + shift: the target scaled to [0, 1] and smoothed, one fma */        \
    const X sc = (X)p->scale, zs = (X)((1.0 - p->eps) / p->scale);                     \
    const X shift = (X)(p->eps * 0.5), gs = (X)s->gs;                                  \
    /* has_ignore: integer codes (in place or converted) with an ignore_value, */     \
    /* compared as X: exact, as codes are (the API keeps ignore_value in the  */     \
    /* dtype's range). Compile-time, as in Numba: W2 at 1 thread 0.77 -> 0.81 */     \
    const X ignore = (X)p->ignore;                                                     \
    const RKEY(T) top_ok = rkey_top_##T(p->scale);                                     \
    const int64_t n = s->n;                                                            \
    int32_t count = 0;              /* n <= FASTSCE_BLOCK: 32-bit lanes suffice */     \
    RKEY(T) top = 0;                                                                   \
    /* mask bytes beside floats vectorize under GCC's ivdep, not omp simd (10x  */     \
    /* slower than Numba's once); the other loops keep omp simd (unmasked, 16M  */     \
    /* float32 at 1 thread, Zen 2: 0.555-0.572 Gelem/s, under ivdep 0.543-0.547) */    \
    if (bytes) {                                                                       \
        SIMD_OVER_u8("omp simd reduction(+:count) reduction(max:top)")                 \
        for (int64_t i = 0; i < n; i++) LOOP_STEP(XN, X, TN, T)                        \
    } else {                                                                           \
        SIMD_OVER_##TN("omp simd reduction(+:count) reduction(max:top)")               \
        for (int64_t i = 0; i < n; i++) LOOP_STEP(XN, X, TN, T)                        \
    }                                                                                  \
    /* every element counts unless masked or ignored: no sum needed then     */    \
    seg_sums r = {extras || bytes || has_ignore ? count : n, top > top_ok};            \
    return r;                                                                          \
}
DEFINE_LOOP(f32, float, f32, float)
DEFINE_LOOP(f64, double, f64, double)
DEFINE_LOOP(f32, float, f64, double)
DEFINE_LOOP(f64, double, f32, float)
DEFINE_LOOP(f32, float, u8, uint8_t)
DEFINE_LOOP(f32, float, u16, uint16_t)
/* Named by DEFINE_SEGMENT's branch for float64 logits, which is compiled out. */
DEFINE_LOOP(f64, double, u8, uint8_t)
DEFINE_LOOP(f64, double, u16, uint16_t)
/* The loop a converted chunk runs: integer codes go through X's own. */
#define LOOP_f32(XN) loop_##XN##_f32
#define LOOP_f64(XN) loop_##XN##_f64
#define LOOP_u8(XN) loop_##XN##_##XN
#define LOOP_u16(XN) loop_##XN##_##XN
#define LOOP(XN, TN) LOOP_##TN(XN)

/* A segment's extra operands: none; a weight, a mask or both, read in place
 * (the common call only, SEGMENT_TABLE); or any of weight, mask and
 * pos_weight (an absent one reads a neutral buffer). EX_NONE and EX_ALL are 0
 * and 1: the table's flag. */
enum { EX_NONE, EX_ALL, EX_WEIGHT, EX_MASK, EX_WEIGHT_MASK };

#define DEFINE_SEGMENT(XN, X, TN, T)                                                   \
/* Except under EX_ALL the weight and the mask's bytes are read in place      */     \
/* (16M float32 logits, mean + grad, C at 1 thread, Zen 2: weight alone 0.36  */     \
/* -> 0.45 Gelem/s, mask alone 0.33 -> 0.37, uint8 codes and a mask 0.36 ->   */     \
/* 0.46), and so are float targets and float32 logits' integer codes;         */     \
/* float64 logits' codes are converted to X in chunks (in place, 32 lanes of  */     \
/* doubles per step, they made this file's compile 1.6x as long for 0.115 ->  */     \
/* 0.185 Gelem/s on a rare case). Under EX_ALL integer targets and the mask   */     \
/* are converted in chunks (in place there too made this file's compile 3x as */     \
/* long, for at most 10% with all three extras).                               */     \
ALWAYS_INLINE seg_sums segment_##XN##_##TN(const seg_args *s, int from_logits,          \
        int divergence, int ex, int want_g, int want_l)                                \
{                                                                                      \
    const int with_ignore = IS_INT(T) && s->p->has_ignore;                             \
    const int all = ex == EX_ALL, bytes = ex == EX_MASK || ex == EX_WEIGHT_MASK;       \
    const int weighted = all || ex == EX_WEIGHT || ex == EX_WEIGHT_MASK;               \
    if (!all && (!IS_INT(T) || sizeof(X) == 4))                                        \
        return with_ignore ? loop_##XN##_##TN(s, from_logits, divergence, 0, bytes,    \
                                              weighted, want_g, want_l, 1)             \
                           : loop_##XN##_##TN(s, from_logits, divergence, 0, bytes,    \
                                              weighted, want_g, want_l, 0);            \
    const T *t = (const T *)s->t;                                                      \
    X tb[TARGET_CHUNK], mb[TARGET_CHUNK];                                              \
    seg_sums r = {0, 0};                                                               \
    for (int64_t c = 0; c < s->n; c += TARGET_CHUNK) {                                 \
        const int64_t k = s->n - c < TARGET_CHUNK ? s->n - c : TARGET_CHUNK;           \
        seg_args sub = *s;                                                             \
        sub.x = (const X *)s->x + c;                                                   \
        sub.t = t + c;                                                                 \
        sub.losses = (X *)s->losses + c;                                               \
        sub.n = k;                                                                     \
        if (IS_INT(T)) {                                                               \
            for (int64_t j = 0; j < k; j++) tb[j] = (X)t[c + j];                       \
            sub.t = tb;                                                                \
        }                                                                              \
        if (weighted) sub.w = (const X *)s->w + c;                                     \
        if (bytes) sub.m = s->m + c;                                                   \
        if (all) {                                                                     \
            for (int64_t j = 0; j < k; j++) mb[j] = s->m[c + j] ? (X)1 : (X)0;         \
            sub.mk = mb;                                                               \
            sub.pw = (const X *)s->pw + c;                                             \
        }                                                                              \
        if (want_g) sub.g = (X *)s->g + c;                                             \
        if (want_l) sub.l = (X *)s->l + c;                                             \
        seg_sums q = with_ignore ? LOOP(XN, TN)(&sub, from_logits, divergence, all,    \
                                                bytes, weighted, want_g, want_l, 1)    \
                                 : LOOP(XN, TN)(&sub, from_logits, divergence, all,    \
                                                bytes, weighted, want_g, want_l, 0);   \
        r.count += q.count;                                                            \
        r.bad += q.bad;                                                                \
    }                                                                                  \
    return r;                                                                          \
}

/* Elements per converted chunk: 8 KiB of float32 stays in L1 beside the
 * streams; 512 left uint8 targets (W2, when it was converted) at 1 thread 10%
 * slower (1.29 against 1.41 Gelem/s), 4096 as slow. */
#define TARGET_CHUNK 2048

/* One non-inlined function per flag combination, and their table. */
#define V(XN, TN, FL, DV, EX, WG, WL)                                                  \
FASTSCE_CLONES static seg_sums seg_##XN##_##TN##_##FL##DV##EX##WG##WL(const seg_args *s)              \
{ return segment_##XN##_##TN(s, FL, DV, EX, WG, WL); }
#define V2(XN, TN, FL, DV, EX, WG) V(XN, TN, FL, DV, EX, WG, 0) V(XN, TN, FL, DV, EX, WG, 1)
#define V4(XN, TN, FL, DV, EX) V2(XN, TN, FL, DV, EX, 0) V2(XN, TN, FL, DV, EX, 1)
#define V8(XN, TN, FL, DV) V4(XN, TN, FL, DV, 0) V4(XN, TN, FL, DV, 1)
#define V16(XN, TN, FL) V8(XN, TN, FL, 0) V8(XN, TN, FL, 1)
#define V32(XN, TN) V16(XN, TN, 0) V16(XN, TN, 1)
#define E(XN, TN, FL, DV, EX, WG, WL) seg_##XN##_##TN##_##FL##DV##EX##WG##WL,
#define E2(XN, TN, FL, DV, EX, WG) E(XN, TN, FL, DV, EX, WG, 0) E(XN, TN, FL, DV, EX, WG, 1)
#define E4(XN, TN, FL, DV, EX) E2(XN, TN, FL, DV, EX, 0) E2(XN, TN, FL, DV, EX, 1)
#define E8(XN, TN, FL, DV) E4(XN, TN, FL, DV, 0) E4(XN, TN, FL, DV, 1)
#define E16(XN, TN, FL) E8(XN, TN, FL, 0) E8(XN, TN, FL, 1)
#define E32(XN, TN) E16(XN, TN, 0) E16(XN, TN, 1)
/* table: index = from_logits<<4 | divergence<<3 | (ex == EX_ALL)<<2 | want_g<<1 |
 * want_l; common: the common call only, logits without divergence, loss map or
 * pos_weight, index [ex - EX_WEIGHT][want_g] (every set of loops costs compile
 * time: all 32 for a weight alone made this file's compile 1.7x as long; the
 * two for a weight cost about 8%, the four for a mask 2% and 14% more text). */
#define SEGMENT_TABLE(XN, X, TN, T)                                                    \
    DEFINE_SEGMENT(XN, X, TN, T)                                                       \
    V32(XN, TN)                                                                        \
    static const segment_fn table_##XN##_##TN[32] = { E32(XN, TN) };                   \
    V(XN, TN, 1, 0, EX_WEIGHT, 0, 0) V(XN, TN, 1, 0, EX_WEIGHT, 1, 0)                  \
    V(XN, TN, 1, 0, EX_MASK, 0, 0) V(XN, TN, 1, 0, EX_MASK, 1, 0)                      \
    V(XN, TN, 1, 0, EX_WEIGHT_MASK, 0, 0) V(XN, TN, 1, 0, EX_WEIGHT_MASK, 1, 0)        \
    static const segment_fn common_##XN##_##TN[3][2] = {                               \
        {E(XN, TN, 1, 0, EX_WEIGHT, 0, 0) E(XN, TN, 1, 0, EX_WEIGHT, 1, 0)},           \
        {E(XN, TN, 1, 0, EX_MASK, 0, 0) E(XN, TN, 1, 0, EX_MASK, 1, 0)},               \
        {E(XN, TN, 1, 0, EX_WEIGHT_MASK, 0, 0) E(XN, TN, 1, 0, EX_WEIGHT_MASK, 1, 0)}};

/* -------------------------------------------------------- scalar helpers */

/* Whether element i of a row counts and lies outside [0, scale], compared
 * exactly (in float64). */
#define DEFINE_BAD_TARGETS(TN, T)                                                      \
ALWAYS_INLINE int is_bad_##TN(const T *t, const uint8_t *m, int64_t i,                 \
                              const fastsce_params *p)                                 \
{                                                                                      \
    int valid = m ? m[i] != 0 : 1;                                                     \
    if (IS_INT(T) && p->has_ignore && t[i] == (T)p->ignore) valid = 0;                 \
    double tf = (double)t[i];                                                          \
    return valid && !(tf >= 0.0 && tf <= p->scale);                                    \
}                                                                                      \
/* The rare path of a flagged row: how many, and the first one's index in    */      \
/* *first if asked (else NULL). A vectorized count: with check=False, or -0   */      \
/* targets, every row of a map may be flagged.                                */      \
static int64_t bad_targets_##TN(const T *t, const uint8_t *m, int64_t n,               \
                                const fastsce_params *p, int64_t *first)               \
{                                                                                      \
    int64_t bad = 0;                                                                   \
    _Pragma("omp simd reduction(+:bad)")                                               \
    for (int64_t i = 0; i < n; i++) bad += is_bad_##TN(t, m, i, p);                    \
    if (first) {                                                                       \
        *first = -1;                                                                   \
        for (int64_t i = 0; bad && i < n; i++)                                         \
            if (is_bad_##TN(t, m, i, p)) { *first = i; break; }                        \
    }                                                                                  \
    return bad;                                                                        \
}
DEFINE_BAD_TARGETS(f32, float)
DEFINE_BAD_TARGETS(f64, double)
DEFINE_BAD_TARGETS(u8, uint8_t)
DEFINE_BAD_TARGETS(u16, uint16_t)
DEFINE_BAD_TARGETS(i64, int64_t)

/* ------------------------------------------------------------- the walk */

typedef int64_t (*bad_targets_fn)(const void *, const uint8_t *, int64_t,
                                  const fastsce_params *, int64_t *);

typedef struct {
    int ndim;
    const int64_t *shape, *strides;
    int64_t group_size;
    const char *base[FASTSCE_NSLOTS];
    int64_t item[FASTSCE_NSLOTS];       /* bytes per element in storage     */
    int64_t size[FASTSCE_NSLOTS];       /* bytes per element as computed    */
    int neutral[FASTSCE_NSLOTS];        /* absent but read: neutral values  */
    segment_fn segment;
    bad_targets_fn bad_targets;
    const fastsce_params *p;
    const double *gscale;
    double *part_loss;
    int64_t *part_count, *part_bad, *part_first;
} walk;

/* Per-thread scratch: a row buffer per slot, plus neutral buffers (ones), and
 * the block's element losses (which parallel_blocks hands out). */
typedef struct { char *buf[FASTSCE_NSLOTS]; } walk_scratch;

static void *scratch_alloc(const void *ctx, char **losses)
{
    const walk *k = ctx;
    const size_t per = (size_t)FASTSCE_BLOCK * 8;
    walk_scratch *sc = fastsce_scratch_get(sizeof *sc + per * (FASTSCE_NSLOTS + 1));
    if (!sc) return NULL;
    *losses = (char *)(sc + 1) + per * FASTSCE_NSLOTS;
    for (int s = 0; s < FASTSCE_NSLOTS; s++) {
        sc->buf[s] = (char *)(sc + 1) + per * s;
        if (k->neutral[s]) {
            for (int64_t i = 0; i < FASTSCE_BLOCK; i++) {
                if (k->size[s] == 1) ((uint8_t *)sc->buf[s])[i] = 1;
                else if (k->size[s] == 4) ((float *)sc->buf[s])[i] = 1.0f;
                else ((double *)sc->buf[s])[i] = 1.0;
            }
        }
    }
    return sc;
}

static range_sums run_range(const void *ctx, int64_t grp, int64_t lo, int64_t hi,
                            char *losses, void *scratch)
{
    const walk *k = ctx;
    char **buf = ((walk_scratch *)scratch)->buf;
    const int nd = k->ndim;
    const int64_t inner = k->shape[nd - 1];
    int64_t count = 0, bad = 0, first = -1;
    for (int64_t i = lo; i < hi;) {
        int64_t row = i / inner, col = i - row * inner;
        int64_t n = inner - col < hi - i ? inner - col : hi - i;
        const void *ptr[FASTSCE_NSLOTS];
        int64_t off[FASTSCE_NSLOTS];
        row_offsets(nd, k->shape, k->strides, FASTSCE_NSLOTS, row, col, off);
        for (int s = 0; s < FASTSCE_NSLOTS; s++) {
            int64_t st = k->strides[s * nd + nd - 1], it = k->item[s];
            int conv = k->p->convert[s];
            if (k->neutral[s]) ptr[s] = buf[s];
            else if (!k->base[s]) ptr[s] = NULL;
            else if (st == 1 && !conv) ptr[s] = k->base[s] + off[s] * it;
            else if (s >= SG) ptr[s] = buf[s];      /* output: scatter below */
            else if (conv) {                        /* input: converting gather */
                convert_row(buf[s], k->size[s], k->base[s] + off[s] * it, it, st, n, conv);
                ptr[s] = buf[s];
            } else {                                /* input: gather */
                strided_row(buf[s], 1, k->base[s] + off[s] * it, st, n, it);
                ptr[s] = buf[s];
            }
        }
        seg_args a = {ptr[SX], ptr[ST], ptr[SW], ptr[SPW], (const uint8_t *)ptr[SM], NULL,
                      (void *)ptr[SG], (void *)ptr[SL], losses + (i - lo) * k->size[SX], n,
                      k->p, k->gscale ? k->gscale[grp] : 0.0};
        seg_sums r = k->segment(&a);
        for (int s = SG; s <= SL; s++) {
            int64_t st = k->strides[s * nd + nd - 1], it = k->item[s];
            if (k->base[s] && st != 1)
                strided_row((char *)k->base[s] + off[s] * it, st, buf[s], 1, n, it);
        }
        if (r.bad) {
            int64_t f = -1;
            bad += k->bad_targets(ptr[ST], k->base[SM] ? (const uint8_t *)ptr[SM] : NULL, n,
                                  k->p, first < 0 ? &f : NULL);
            if (f >= 0) first = i + f;
        }
        count += r.count;
        i += n;
    }
    range_sums r = {count, bad, first};
    return r;
}

static int run_walk(const walk *k, int num_threads)
{
    /* losses in the compute type (none in the count pass, whose size[SX] is 0) */
    const block_parts out = {k->part_loss, k->part_count, k->part_bad, k->part_first,
                             (int)k->size[SX]};
    return parallel_blocks(walk_blocks(k->ndim, k->shape, k->group_size), k->group_size,
                           num_threads, k, scratch_alloc, run_range, &out);
}

/* ------------------------------------------------------------ entry points */

static void fill_walk(walk *k, int ndim, const int64_t *shape, int64_t group_size,
                      const int64_t *strides, const fastsce_params *p)
{
    memset(k, 0, sizeof *k);
    k->ndim = ndim;
    k->shape = shape;
    k->strides = strides;
    k->group_size = group_size;
    k->p = p;
}

/* Slot s at `base`, `size` bytes per element as computed (2 in storage if float16). */
static void set_slot(walk *k, int s, const void *base, int64_t size)
{
    k->base[s] = (const char *)base;
    k->size[s] = size;
    k->item[s] = storage_item(k->p, s, size);
}

#define DEFINE_BINARY(XN, X, TN, T)                                                    \
SEGMENT_TABLE(XN, X, TN, T)                                                            \
int fastsce_sigmoid_ce_##XN##_##TN(int ndim, const int64_t *shape, int64_t group_size,  \
        const X *x, const T *t, const X *w, const uint8_t *m, const X *pw,             \
        const int64_t *strides, const fastsce_params *p, const double *gscale,  \
        X *g, X *l, double *part_loss, int64_t *part_count, int64_t *part_bad,         \
        int64_t *part_first)                                                           \
{                                                                                      \
    walk k;                                                                            \
    fill_walk(&k, ndim, shape, group_size, strides, p);                                \
    const void *bases[FASTSCE_NSLOTS] = {x, t, w, m, pw, g, l};                        \
    const int64_t sizes[FASTSCE_NSLOTS] = {sizeof(X), sizeof(T), sizeof(X), 1,         \
                                           sizeof(X), sizeof(X), sizeof(X)};           \
    int ex = pw ? EX_ALL : w && m ? EX_WEIGHT_MASK : w ? EX_WEIGHT : m ? EX_MASK       \
                                                                     : EX_NONE;        \
    if (ex >= EX_WEIGHT && !(p->from_logits && !p->divergence && !l)) ex = EX_ALL;     \
    for (int s = 0; s < FASTSCE_NSLOTS; s++) {                                         \
        set_slot(&k, s, bases[s], sizes[s]);                                           \
        k.neutral[s] = ex == EX_ALL && !bases[s] && (s == SW || s == SM || s == SPW);  \
    }                                                                                  \
    int index = (p->from_logits != 0) << 4 | (p->divergence != 0) << 3                 \
                | (ex == EX_ALL) << 2 | (g != NULL) << 1 | (l != NULL);                \
    k.segment = ex >= EX_WEIGHT ? common_##XN##_##TN[ex - EX_WEIGHT][g != NULL]        \
                                : table_##XN##_##TN[index];                            \
    k.bad_targets = (bad_targets_fn)bad_targets_##TN;                                  \
    k.gscale = gscale;                                                                 \
    k.part_loss = part_loss;                                                           \
    k.part_count = part_count;                                                         \
    k.part_bad = part_bad;                                                             \
    k.part_first = part_first;                                                         \
    return run_walk(&k, p->num_threads);                                               \
}
DEFINE_BINARY(f32, float, f32, float)
DEFINE_BINARY(f64, double, f64, double)
DEFINE_BINARY(f32, float, f64, double)
DEFINE_BINARY(f32, float, u8, uint8_t)
DEFINE_BINARY(f32, float, u16, uint16_t)
DEFINE_BINARY(f64, double, f32, float)
DEFINE_BINARY(f64, double, u8, uint8_t)
DEFINE_BINARY(f64, double, u16, uint16_t)

/* Count and check only: the pre-pass that guards an in-place out=logits (and
 * counts a masked "mean"), as vectorized as the loss loops (it reads as many
 * bytes). */
#define DEFINE_COUNT(TN, T)                                                            \
ALWAYS_INLINE seg_sums count_loop_##TN(const seg_args *s, int masked)                  \
{                                                                                      \
    const T *t = (const T *)s->t;                                                      \
    const uint8_t *m = s->m;                                                           \
    const fastsce_params *p = s->p;                                                    \
    const int has_ignore = IS_INT(T) && p->has_ignore;                                 \
    const T ignore = (T)p->ignore;                                                     \
    const double sc = p->scale;                                                        \
    /* unsigned codes are compared as codes: widening bytes to float64 made the */     \
    /* loop 5x slower than Numba's (the same test: code > floor(scale))         */     \
    const double top = IS_UNSIGNED(T) ? (double)(T)-1 : 0.0;                           \
    const T limit = (T)(sc < top ? sc : top);                                          \
    const int64_t n = s->n;                                                            \
    int32_t count = 0, bad = 0;     /* n <= FASTSCE_BLOCK */                           \
    /* `&`, not `&&`: with && GCC left the masked loop scalar (0.25 Gelem/s  */      \
    /* on a random mask; 5.4 with &, uint8 codes, Zen 2)                       */      \
    SIMD_OVER_##TN("omp simd reduction(+:count,bad)")                                  \
    for (int64_t i = 0; i < n; i++) {                                                  \
        int valid = (masked ? m[i] != 0 : 1) & !(has_ignore && t[i] == ignore);        \
        if (IS_UNSIGNED(T)) {                                                          \
            bad += valid & (t[i] > limit);                                             \
        } else {                                                                       \
            double tf = (double)t[i];                                                  \
            bad += valid & !((tf >= 0.0) & (tf <= sc));                                \
        }                                                                              \
        count += valid;                                                                \
    }                                                                                  \
    seg_sums r = {count, bad};                                                         \
    return r;                                                                          \
}                                                                                      \
FASTSCE_CLONES static seg_sums count_##TN(const seg_args *s)                           \
{ return s->m ? count_loop_##TN(s, 1) : count_loop_##TN(s, 0); }                       \
int fastsce_count_valid_##TN(int ndim, const int64_t *shape, int64_t group_size,        \
        const T *t, const uint8_t *m, const int64_t *strides,                          \
        const fastsce_params *p, int64_t *part_count, int64_t *part_bad,        \
        int64_t *part_first)                                                           \
{                                                                                      \
    walk k;                                                                            \
    fill_walk(&k, ndim, shape, group_size, strides, p);                                \
    set_slot(&k, ST, t, sizeof(T));                                                    \
    set_slot(&k, SM, m, 1);                                                            \
    k.segment = count_##TN;                                                            \
    k.bad_targets = (bad_targets_fn)bad_targets_##TN;                                  \
    k.part_count = part_count;                                                         \
    k.part_bad = part_bad;                                                             \
    k.part_first = part_first;                                                         \
    return run_walk(&k, p->num_threads);                                               \
}
DEFINE_COUNT(f32, float)
DEFINE_COUNT(f64, double)
DEFINE_COUNT(u8, uint8_t)
DEFINE_COUNT(u16, uint16_t)
DEFINE_COUNT(i64, int64_t)
