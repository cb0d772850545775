/* Multiclass (softmax) soft-label cross-entropy: fused loss + gradient.
 * Twin of fastsce/_numba_softmax.py.
 *
 * Design
 *  - Pixels are walked like the binary loss's elements (C order over the
 *    pixel shape, fastsce/_layout.py); the class axis is a stride. Rows are
 *    cut into tiles of `tile` pixels (a function of C only). A tile whose
 *    pixels are not contiguous (NHWC) is gathered into a [C][tile] scratch
 *    first, so every layout runs the same class-outer, pixel-inner loops:
 *    they vectorize across pixels, and NCHW and NHWC give bitwise the same
 *    numbers.
 *  - Per tile, four passes over data in cache: (1) max over classes and the
 *    first class reaching it; (2) exp(x - m) (the rounding of x - m put back,
 *    TwoSum) and the per-pixel float64 sums r = the other classes' exps,
 *    W = sum w z, A = sum w z (m - x); (3) the loss A + W log1p(r), every term
 *    non-negative, so full relative precision even for a dominant class;
 *    (4) the gradient W e / (1 + r) - w z. Each logit and target is read from
 *    memory once and each gradient element written once.
 *  - Blocks of FASTSCE_BLOCK pixels; a block keeps its pixel losses in a
 *    buffer summed by one fixed loop, so the total depends neither on the
 *    layout's tiling nor on the thread count.
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

typedef struct {
    const void *x, *z;            /* class-shaped: element (k, p) at k*cs + p  */
    int64_t xcs, zcs;
    void *g;
    int64_t gcs;
    const void *w, *cw;
    const uint8_t *m;
    void *l;
    int64_t n, C, tsz;
    const fastsce_params *p;
    double gs;
    void *e, *mx;                 /* scratch: [C][tsz] exps, [tsz] maxima      */
    int64_t *am;                  /* [tsz] first class reaching the maximum    */
    double *s, *W, *A, *H, *lbuf; /* per pixel; lbuf: the block's pixel losses */
    uint8_t *valid;
} tile_args;

typedef struct { int64_t count, bad; } tile_sums;
typedef tile_sums (*tile_fn)(const tile_args *);

#define IS_HARD_int64_t 1
#define IS_HARD_float 0
#define IS_HARD_double 0
#define IS_HARD_uint8_t 0
#define IS_HARD_uint16_t 0
#define IS_HARD(T) IS_HARD_##T

/* log1p(r) for r >= 0 in float64. */
MATH_INLINE double log1p_pos_f64(double r)
{
    double iu;
    return r <= 1.0 ? log1p_unit_f64(r, &iu) : log_f64(1.0 + r);
}

/* Same operations in the same order as _tile in _numba_softmax.py. */
#define DEFINE_TILE(XN, X, TN, T)                                                      \
ALWAYS_INLINE X target_##XN##_##TN(const T *z, int64_t zcs, int64_t k, int64_t p,       \
                                   X inv, X keep, X shift)                             \
{                                                                                      \
    if (IS_HARD(T)) return (z[p] == (T)k ? keep : (X)0) + shift;                       \
    return (X)z[k * zcs + p] * inv * keep + shift;                                     \
}                                                                                      \
ALWAYS_INLINE tile_sums tile_##XN##_##TN(const tile_args *a, int from_logits,          \
                                         int divergence)                               \
{                                                                                      \
    const X *x = (const X *)a->x;                                                      \
    const T *z = (const T *)a->z;                                                      \
    const X *w = (const X *)a->w, *cw = (const X *)a->cw;                              \
    X *g = (X *)a->g, *l = (X *)a->l, *e = (X *)a->e, *mx = (X *)a->mx;                \
    double *s = a->s, *W = a->W, *A = a->A, *H = a->H;                                 \
    const int64_t n = a->n, C = a->C, tsz = a->tsz, xcs = a->xcs, zcs = a->zcs;         \
    const fastsce_params *p = a->p;                                                    \
    const X sc = (X)p->scale, inv = (X)(1.0 / p->scale), keep = (X)(1.0 - p->eps);     \
    const X shift = (X)(p->eps / (double)C);                                           \
    int64_t *am = a->am;                                                               \
    for (int64_t q = 0; q < n; q++) am[q] = 0;                         /* (1) */       \
    if (from_logits) {                                                                 \
        for (int64_t q = 0; q < n; q++) mx[q] = x[q];                                  \
        for (int64_t k = 1; k < C; k++) {                                              \
            const X *xk = x + k * xcs;                                                 \
            for (int64_t q = 0; q < n; q++) {                                          \
                int up = xk[q] > mx[q];                                                \
                mx[q] = up ? xk[q] : mx[q];                                            \
                am[q] = up ? k : am[q];                                                \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
    for (int64_t q = 0; q < n; q++) s[q] = W[q] = A[q] = H[q] = 0.0;   /* (2) */       \
    for (int64_t k = 0; k < C; k++) {                                                  \
        const X *xk = x + k * xcs;                                                     \
        X *ek = e + k * tsz;                                                           \
        const X cwk = cw ? cw[k] : (X)1;                                               \
        for (int64_t q = 0; q < n; q++) {                                              \
            X zv = target_##XN##_##TN(z, zcs, k, q, inv, keep, shift);                 \
            X v = xk[q], wz = cwk * zv, ev = (X)0, at, h = (X)0;                       \
            double e64 = 0.0;                                                          \
            if (from_logits) {                                                         \
                X d = v == mx[q] ? (X)0 : v - mx[q];    /* x = m = +inf: d = 0 */      \
                X bb = d - v;       /* TwoSum: what rounding x - m lost */             \
                X err = (v - (d - bb)) + (-mx[q] - bb);                                \
                err = err == err ? err : (X)0;                                         \
                /* a float32 exp below ~e^-87 is subnormal: take it 2^64 larger   */  \
                /* for the float64 sum and scale only the stored value            */  \
                int low = sizeof(X) == 4 && d < (X)-80;                                \
                ev = exp_neg_scaled_##XN(d, low ? 64 : 0);                             \
                ev = ev + ev * err;                                                    \
                e64 = (double)ev * (low ? 0x1p-64 : 1.0);                              \
                ev = low ? ev * (X)0x1p-64 : ev;                                       \
                at = wz == (X)0 ? (X)0 : wz * -d;                                      \
            } else {                                                                   \
                X lc = log_##XN(v);                                                    \
                lc = lc < (X)-100 ? (X)-100 : lc;                                      \
                at = wz == (X)0 ? (X)0 : -(wz * lc);                                   \
            }                                                                          \
            if (divergence) h = wz == (X)0 ? (X)0 : wz * log_##XN(zv);                 \
            ek[q] = ev;                                                                \
            s[q] += k == am[q] ? 0.0 : e64;          /* the first max's exp is 1 */   \
            W[q] += (double)wz;                                                        \
            A[q] += (double)at;                                                        \
            H[q] += (double)h;                                                         \
        }                                                                              \
    }                                                                                  \
    int64_t count = 0, bad = 0;                                        /* (3) */       \
    for (int64_t q = 0; q < n; q++) {                                                  \
        int ok = a->m ? a->m[q] != 0 : 1;                                              \
        if (IS_HARD(T)) {                                                              \
            if (p->has_ignore) ok = ok && z[q] != (T)p->ignore;                        \
            bad += ok && !(z[q] >= 0 && z[q] < (T)C);                                  \
        }                                                                              \
        double loss64 = A[q] + H[q];                                                   \
        if (from_logits) loss64 += W[q] == 0.0 ? 0.0 : W[q] * log1p_pos_f64(s[q]);     \
        X loss = (X)loss64;                                                            \
        X wp = w ? w[q] : (X)1;                                                        \
        loss = ok ? loss * wp : (X)0;                                                  \
        a->lbuf[q] = (double)loss;                                                     \
        if (l) l[q] = loss;                                                            \
        count += ok;                                                                   \
        a->valid[q] = (uint8_t)ok;                                                     \
        s[q] = 1.0 / (1.0 + s[q]);                                                     \
        H[q] = (double)(wp * (X)a->gs);                                                \
    }                                                                                  \
    if (!IS_HARD(T))                                                                   \
        for (int64_t k = 0; k < C; k++)                                                \
            for (int64_t q = 0; q < n; q++) {                                          \
                X t = (X)z[k * zcs + q];                                               \
                bad += a->valid[q] && !(t >= (X)0 && t <= sc);                         \
            }                                                                          \
    if (g) {                                                           /* (4) */       \
        for (int64_t k = 0; k < C; k++) {                                              \
            const X *xk = x + k * xcs, *ek = e + k * tsz;                              \
            X *gk = g + k * a->gcs;                                                    \
            const X cwk = cw ? cw[k] : (X)1;                                           \
            for (int64_t q = 0; q < n; q++) {                                          \
                X wz = cwk * target_##XN##_##TN(z, zcs, k, q, inv, keep, shift), gv;   \
                X fac = (X)H[q];                                                       \
                if (from_logits) {                                                     \
                    gv = ((X)W[q] * (ek[q] * (X)s[q]) - wz) * fac;                     \
                } else {                                                               \
                    X den = xk[q] > (X)1e-12 ? xk[q] : (X)1e-12;                       \
                    gv = (-wz / den) * fac;                                            \
                }                                                                      \
                gk[q] = a->valid[q] ? gv : (X)0;                                       \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
    tile_sums r = {count, bad};                                                        \
    return r;                                                                          \
}                                                                                      \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_00(const tile_args *a)               \
{ return tile_##XN##_##TN(a, 0, 0); }                                                  \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_01(const tile_args *a)               \
{ return tile_##XN##_##TN(a, 0, 1); }                                                  \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_10(const tile_args *a)               \
{ return tile_##XN##_##TN(a, 1, 0); }                                                  \
FASTSCE_CLONES static tile_sums tile_##XN##_##TN##_11(const tile_args *a)               \
{ return tile_##XN##_##TN(a, 1, 1); }                                                  \
/* index = from_logits << 1 | divergence */                                            \
static const tile_fn tiles_##XN##_##TN[4] = {                                          \
    tile_##XN##_##TN##_00, tile_##XN##_##TN##_01, tile_##XN##_##TN##_10,               \
    tile_##XN##_##TN##_11};

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

/* Copy a tile between (pixel stride ps, class stride cs) and [C][tsz]. */
static void gather_classes(const char *base, int64_t off, int64_t ps, int64_t cs, int64_t n,
                           int64_t C, int64_t item, char *buf, int64_t tsz)
{
    for (int64_t k = 0; k < C; k++)
        for (int64_t q = 0; q < n; q++)
            memcpy(buf + (k * tsz + q) * item, base + (off + k * cs + q * ps) * item, (size_t)item);
}

static void scatter_classes(char *base, int64_t off, int64_t ps, int64_t cs, int64_t n,
                            int64_t C, int64_t item, const char *buf, int64_t tsz)
{
    for (int64_t k = 0; k < C; k++)
        for (int64_t q = 0; q < n; q++)
            memcpy(base + (off + k * cs + q * ps) * item, buf + (k * tsz + q) * item, (size_t)item);
}

/* Gather (or scatter) one pixel-shaped row with stride st. */
static void move_row(char *dst, const char *src, int64_t dst_st, int64_t src_st, int64_t n,
                     int64_t item)
{
    for (int64_t q = 0; q < n; q++)
        memcpy(dst + q * dst_st * item, src + q * src_st * item, (size_t)item);
}

typedef struct {
    int ndim;
    const int64_t *shape, *strides, *cstrides;
    int64_t group_size, C, tsz;
    const char *base[FASTSCE_NSLOTS];
    int64_t item[FASTSCE_NSLOTS];
    int hard;
    tile_fn tile;
    first_bad_pixel_fn first_bad;
    const void *cw;
    const fastsce_params *p;
    const double *gscale;
    double *part_loss;
    int64_t *part_count, *part_bad, *part_first;
} softmax_walk;

/* Per-thread scratch, carved from one allocation after this header. */
typedef struct {
    char *xs, *zs, *gs, *e, *mx, *row[FASTSCE_NSLOTS];
    int64_t *am;
    double *s, *W, *A, *H, *lbuf;
    uint8_t *valid;
} softmax_scratch;

static void *softmax_scratch_alloc(const void *ctx)
{
    const softmax_walk *k = ctx;
    const size_t ct = (size_t)(k->C * k->tsz) * 8, t = (size_t)k->tsz * 8;
    softmax_scratch *sc = malloc(sizeof *sc + 4 * ct + (2 + FASTSCE_NSLOTS + 4) * t
                                 + (size_t)FASTSCE_BLOCK * 8 + (size_t)k->tsz);
    if (!sc) return NULL;
    char *c = (char *)(sc + 1);
    sc->xs = c; c += ct;
    sc->zs = c; c += ct;
    sc->gs = c; c += ct;
    sc->e = c; c += ct;
    sc->mx = c; c += t;
    sc->am = (int64_t *)c; c += t;
    for (int s = 0; s < FASTSCE_NSLOTS; s++) { sc->row[s] = c; c += t; }
    sc->s = (double *)c; c += t;
    sc->W = (double *)c; c += t;
    sc->A = (double *)c; c += t;
    sc->H = (double *)c; c += t;
    sc->lbuf = (double *)c; c += (size_t)FASTSCE_BLOCK * 8;
    sc->valid = (uint8_t *)c;
    return sc;
}

FASTSCE_CLONES static double block_sum(const double *buf, int64_t n)
{
    double total = 0.0;
#pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < n; i++) total += buf[i];
    return total;
}

static void softmax_block(const void *ctx, int64_t b, void *scratch)
{
    const softmax_walk *k = ctx;
    softmax_scratch *sc = scratch;
    const int nd = k->ndim;
    const int64_t inner = k->shape[nd - 1], C = k->C, tsz = k->tsz;
    const int64_t *st = k->strides, *cst = k->cstrides;
    int64_t start, stop;
    const int64_t grp = block_range(b, k->group_size, &start, &stop);
    int64_t count = 0, bad = 0, first = -1;
#define PSTRIDE(s) st[(s) * nd + nd - 1]
    for (int64_t i = start; i < stop;) {
        int64_t row = i / inner, col = i - row * inner;
        int64_t n = inner - col < stop - i ? inner - col : stop - i;
        if (n > tsz) n = tsz;
        int64_t off[FASTSCE_NSLOTS];
        row_offsets(nd, k->shape, st, FASTSCE_NSLOTS, row, col, off);
        tile_args a;
        memset(&a, 0, sizeof a);
        a.n = n; a.C = C; a.tsz = tsz; a.p = k->p; a.cw = k->cw;
        a.gs = k->gscale[grp];
        a.e = sc->e; a.mx = sc->mx; a.am = sc->am; a.s = sc->s; a.W = sc->W; a.A = sc->A; a.H = sc->H;
        a.valid = sc->valid; a.lbuf = sc->lbuf + (i - start);
        /* class-shaped operands: in place if pixels are contiguous, else gathered */
        if (PSTRIDE(SX) == 1) { a.x = k->base[SX] + off[SX] * k->item[SX]; a.xcs = cst[SX]; }
        else {
            gather_classes(k->base[SX], off[SX], PSTRIDE(SX), cst[SX], n, C, k->item[SX], sc->xs, tsz);
            a.x = sc->xs; a.xcs = tsz;
        }
        if (k->hard) {
            const char *zr = k->base[ST] + off[ST] * k->item[ST];
            if (PSTRIDE(ST) != 1) { move_row(sc->row[ST], zr, 1, PSTRIDE(ST), n, k->item[ST]); zr = sc->row[ST]; }
            a.z = zr;
        } else if (PSTRIDE(ST) == 1) { a.z = k->base[ST] + off[ST] * k->item[ST]; a.zcs = cst[ST]; }
        else {
            gather_classes(k->base[ST], off[ST], PSTRIDE(ST), cst[ST], n, C, k->item[ST], sc->zs, tsz);
            a.z = sc->zs; a.zcs = tsz;
        }
        if (k->base[SG]) {
            if (PSTRIDE(SG) == 1) { a.g = (char *)k->base[SG] + off[SG] * k->item[SG]; a.gcs = cst[SG]; }
            else { a.g = sc->gs; a.gcs = tsz; }
        }
        for (int s = SW; s <= SM; s++) {            /* pixel-shaped inputs */
            if (!k->base[s]) continue;
            const char *r = k->base[s] + off[s] * k->item[s];
            if (PSTRIDE(s) != 1) { move_row(sc->row[s], r, 1, PSTRIDE(s), n, k->item[s]); r = sc->row[s]; }
            if (s == SW) a.w = r; else a.m = (const uint8_t *)r;
        }
        if (k->base[SL])
            a.l = PSTRIDE(SL) == 1 ? (char *)k->base[SL] + off[SL] * k->item[SL] : sc->row[SL];
        tile_sums r = k->tile(&a);
        if (k->base[SG] && PSTRIDE(SG) != 1)
            scatter_classes((char *)k->base[SG], off[SG], PSTRIDE(SG), cst[SG], n, C, k->item[SG], sc->gs, tsz);
        if (k->base[SL] && PSTRIDE(SL) != 1)
            move_row((char *)k->base[SL] + off[SL] * k->item[SL], sc->row[SL], PSTRIDE(SL), 1, n, k->item[SL]);
        if (r.bad && first < 0) first = i + k->first_bad(sc->valid, a.z, a.zcs, n, C, k->p->scale);
        count += r.count;
        bad += r.bad;
        i += n;
    }
#undef PSTRIDE
    k->part_loss[b] = block_sum(sc->lbuf, stop - start);
    k->part_count[b] = count;
    k->part_bad[b] = bad;
    k->part_first[b] = first;
}

static int softmax_run(const softmax_walk *k, int num_threads)
{
    return parallel_blocks(walk_blocks(k->ndim, k->shape, k->group_size), num_threads, k,
                           softmax_scratch_alloc, softmax_block);
}

#define DEFINE_SOFTMAX(XN, X, TN, T)                                                   \
DEFINE_TILE(XN, X, TN, T)                                                              \
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
    const int64_t items[FASTSCE_NSLOTS] = {sizeof(X), sizeof(T), sizeof(X), 1, 0,      \
                                           sizeof(X), sizeof(X)};                      \
    for (int s = 0; s < FASTSCE_NSLOTS; s++) {                                         \
        k.base[s] = (const char *)bases[s];                                            \
        k.item[s] = items[s];                                                          \
    }                                                                                  \
    k.hard = IS_HARD(T);                                                               \
    k.tile = tiles_##XN##_##TN[(p->from_logits != 0) << 1 | (p->divergence != 0)];     \
    k.first_bad = (first_bad_pixel_fn)first_bad_pixel_##TN;                            \
    k.cw = cw; k.p = p; k.gscale = gscale;                                             \
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
