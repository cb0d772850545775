/* libFuzzer target for every C entry point of csrc/fastsce.h (fuzz/run).
 *
 * An input picks an entry point (sigmoid, softmax or count-only, any dtype
 * pair), a shape of 1-4 dimensions (and a class count), a reduction group
 * size, the options, and for every operand a layout: the dimensions in any
 * order, with gaps and negative strides, and for inputs zero strides
 * (broadcast) and byte-swapped or float16 storage. Values are raw bits (NaN,
 * inf, subnormals) or ordinary numbers. Every buffer is exactly as large as
 * its layout reaches, so AddressSanitizer reports any access outside it.
 *
 * Checked after each call (a failed check aborts, and libFuzzer keeps the input):
 *  - status 0, and per block 0 <= count <= elements and 0 <= bad <= count
 *    (count * classes for soft softmax targets: bad ones are counted as
 *    elements), first == -1 when nothing is bad and inside the block otherwise;
 *  - the same call on dense, native-order copies of the operands (float16
 *    decoded here, independently of csrc/convert.h) gives the same partials,
 *    gradient and loss map, bitwise: no layout or storage changes a result;
 *  - with ordinary values everywhere (finite logits, targets in range,
 *    weights >= 0), every partial sum, gradient and loss is finite, and a
 *    plain sigmoid call (logits, float targets, no options) agrees with the
 *    textbook formula in float64 libm.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fastsce.h"

enum { SX, ST, SW, SM, SPW, SG, SL, NSLOTS };
enum { SIGMOID, SOFTMAX, COUNT };
enum { F32, F64, U8, U16, I64 };              /* element types */
#define MAXD 5                                /* 4 pixel dimensions + classes */
#define MAX_ELEMENTS 70000                    /* several 16384-element blocks */

static const int64_t type_size[] = {4, 8, 1, 2, 8};

/* ------------------------------------------------------------ input bytes */

typedef struct { const uint8_t *p; size_t n; uint64_t rng; } input;

static uint64_t next_random(input *in)        /* splitmix64, seeded by the input */
{
    uint64_t z = (in->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The next byte of the input; when it runs out, bytes drawn from its hash. */
static uint8_t byte(input *in)
{
    if (in->n) { in->n--; return *in->p++; }
    return (uint8_t)next_random(in);
}

static int64_t pick(input *in, int64_t lo, int64_t hi)    /* in [lo, hi] */
{
    uint16_t v = (uint16_t)(byte(in) | byte(in) << 8);
    return lo + (int64_t)(v % (uint64_t)(hi - lo + 1));
}

/* ------------------------------------------------------------ operands */

typedef struct {
    int present, type, code;        /* code: FASTSCE_SWAPPED | FASTSCE_HALF bits */
    int ndim;                       /* pixel dimensions, + 1 if class-shaped */
    int64_t dims[MAXD], strides[MAXD];
    int64_t item;                   /* bytes per element in storage */
    int64_t bytes;                  /* of the buffer */
    char *alloc, *base;             /* base: element (0, ..., 0) */
} operand;

typedef struct {
    int kind, xtype, ttype, ndim, ordinary;
    int64_t shape[MAXD - 1], classes, group_size, n, n_blocks, n_groups;
    fastsce_params p;
    operand op[NSLOTS];
    double *gscale;
    void *cw;
} call;

/* Strides for `o`'s dimensions: a random order, gaps, signs, and (inputs)
 * zero strides; its buffer spans exactly the elements they reach. */
static void lay_out(input *in, operand *o, int input_slot)
{
    int order[MAXD];
    for (int d = 0; d < o->ndim; d++) order[d] = d;
    for (int d = o->ndim - 1; d > 0; d--) {    /* shuffle, innermost first */
        int j = (int)pick(in, 0, d), t = order[d];
        order[d] = order[j]; order[j] = t;
    }
    int dense = pick(in, 0, 3) == 0;
    int64_t run = 1, lo = 0, hi = 0;
    for (int k = 0; k < o->ndim; k++) {
        int d = order[k];
        int64_t s = run;
        if (!dense) {
            uint8_t b = byte(in);
            s *= 1 + (b & 1);                                 /* a gap */
            if (b & 2) s = -s;                                /* reversed */
            if (input_slot && (b & 12) == 12) s = 0;          /* broadcast */
        }
        o->strides[d] = s;
        run *= (o->dims[d] ? o->dims[d] : 1) * (s == 0 || dense ? 1 : 2);
        if (o->dims[d] > 0) {
            if (s < 0) lo += s * (o->dims[d] - 1);
            else hi += s * (o->dims[d] - 1);
        }
    }
    o->bytes = (hi - lo + 1) * o->item;
    o->alloc = malloc((size_t)o->bytes);
    o->base = o->alloc - lo * o->item;
}

/* Offset (elements) of logical index idx. */
static int64_t offset(const operand *o, const int64_t *idx)
{
    int64_t off = 0;
    for (int d = 0; d < o->ndim; d++) off += idx[d] * o->strides[d];
    return off;
}

/* Advance a C-order index over dims; 0 when done. */
static int step(int64_t *idx, const int64_t *dims, int ndim)
{
    for (int d = ndim - 1; d >= 0; d--) {
        if (++idx[d] < dims[d]) return 1;
        idx[d] = 0;
    }
    return 0;
}

static void swap_bytes(char *p, int64_t n)
{
    for (int64_t i = 0; i < n / 2; i++) { char t = p[i]; p[i] = p[n - 1 - i]; p[n - 1 - i] = t; }
}

/* An ordinary value of slot s: k / 64, exact in float16, float32 and float64. */
static double ordinary(input *in, const call *c, int s)
{
    uint64_t r = next_random(in);
    switch (s) {
    case SX: return c->p.from_logits ? (double)((int64_t)(r % 3841) - 1920) / 64.0
                                     : (double)(r % 65) / 64.0;
    case ST:
        if (c->ttype == I64)                      /* a class, or the ignored -1 */
            return (double)(int64_t)(r % (uint64_t)c->classes) - (c->p.has_ignore && r >> 32 & 1);
        if (c->ttype == U8 || c->ttype == U16) return (double)(r % (uint64_t)(c->p.scale + 1));
        return (double)(r % 65) / 64.0;
    case SM: return (double)(r & 1);
    default: return (double)(r % 257) / 64.0;     /* weights, pos_weight */
    }
}

/* IEEE half bits of v, which is k / 64 with |k| <= 1920 (so exact). */
static uint16_t half_bits(double v)
{
    uint16_t sign = v < 0 ? 0x8000 : 0;
    v = fabs(v);
    if (v == 0) return sign;
    int e;
    double f = frexp(v, &e);                      /* v = f 2^e, 0.5 <= f < 1 */
    if (e - 1 < -14)                              /* subnormal: m 2^-24 */
        return sign | (uint16_t)ldexp(v, 24);
    return sign | (uint16_t)((e - 1 + 15) << 10) | (uint16_t)((ldexp(f, 11) - 1024));
}

static void store(char *dst, int type, int code, double v)
{
    if (code & FASTSCE_HALF) { uint16_t h = half_bits(v); memcpy(dst, &h, 2); }
    else switch (type) {
        case F32: { float f = (float)v; memcpy(dst, &f, 4); break; }
        case F64: memcpy(dst, &v, 8); break;
        case U8: { uint8_t u = (uint8_t)v; memcpy(dst, &u, 1); break; }
        case U16: { uint16_t u = (uint16_t)v; memcpy(dst, &u, 2); break; }
        default: { int64_t i = (int64_t)v; memcpy(dst, &i, 8); break; }
    }
    if (code & FASTSCE_SWAPPED) swap_bytes(dst, code & FASTSCE_HALF ? 2 : type_size[type]);
}

/* Fill every element the layout reaches: raw input bytes or ordinary values. */
static void fill(input *in, call *c, int s, int raw)
{
    operand *o = &c->op[s];
    int64_t idx[MAXD] = {0};
    if (c->n == 0) return;
    do {
        char *dst = o->base + offset(o, idx) * o->item;
        if (raw) for (int64_t b = 0; b < o->item; b++) dst[b] = (char)byte(in);
        else store(dst, o->type, o->code, ordinary(in, c, s));
    } while (step(idx, o->dims, o->ndim));
}

/* ------------------------------------------------------------ the calls */

#define SIGMOID_CALL(XN, X, TN, T) \
    fastsce_sigmoid_ce_##XN##_##TN(c->ndim, c->shape, c->group_size, (const X *)b[SX],   \
        (const T *)b[ST], (const X *)b[SW], (const uint8_t *)b[SM], (const X *)b[SPW],    \
        st, &p, c->gscale, (X *)b[SG], (X *)b[SL], pl, pc, pb, pf)
#define SOFTMAX_CALL(XN, X, TN, T) \
    fastsce_softmax_ce_##XN##_##TN(c->ndim, c->shape, c->group_size, c->classes, tile,   \
        (const X *)b[SX], (const T *)b[ST], (const X *)b[SW], (const uint8_t *)b[SM],     \
        st, cst, (const X *)c->cw, &p, c->gscale, (X *)b[SG], (X *)b[SL], pl, pc, pb, pf)
#define COUNT_CALL(unused, TN, T) \
    fastsce_count_valid_##TN(c->ndim, c->shape, c->group_size, (const T *)b[ST],         \
        (const uint8_t *)b[SM], st, &p, pc, pb, pf)
/* Float and small-integer targets; class indices (i64) in the callers. */
#define BY_TARGET(M, ...)                                                               \
    switch (c->ttype) {                                                                 \
    case F32: return M(__VA_ARGS__, f32, float);                                        \
    case F64: return M(__VA_ARGS__, f64, double);                                       \
    case U8: return M(__VA_ARGS__, u8, uint8_t);                                        \
    case U16: return M(__VA_ARGS__, u16, uint16_t);                                     \
    default: break;                                                                     \
    }

/* softmax_tile() of fastsce/_layout.py */
static int64_t softmax_tile(int64_t classes)
{
    int64_t tile = 4096;
    while (tile > 64 && tile * classes > 32768) tile /= 2;
    return tile;
}

/* Run c's entry point on operands `ops`; partials into pl, pc, pb, pf. */
static int run(const call *c, const operand *ops, double *pl, int64_t *pc, int64_t *pb,
               int64_t *pf)
{
    const int nd = c->ndim;
    const void *b[NSLOTS];
    int64_t st[NSLOTS * (MAXD - 1)] = {0}, cst[NSLOTS] = {0}, tile = softmax_tile(c->classes);
    fastsce_params p = c->p;
    for (int s = 0; s < NSLOTS; s++) {
        b[s] = ops[s].present ? ops[s].base : NULL;
        if (!ops[s].present) continue;
        memcpy(st + s * nd, ops[s].strides, (size_t)nd * sizeof *st);
        cst[s] = ops[s].ndim > nd ? ops[s].strides[nd] : 0;
        p.convert[s] = ops[s].code;
    }
    if (c->kind == COUNT) {
        BY_TARGET(COUNT_CALL, count)
        return COUNT_CALL(count, i64, int64_t);
    }
    if (c->kind == SIGMOID) {
        if (c->xtype == F32) { BY_TARGET(SIGMOID_CALL, f32, float) }
        BY_TARGET(SIGMOID_CALL, f64, double)
        abort();                                  /* no class indices for sigmoid */
    }
    if (c->xtype == F32) {
        BY_TARGET(SOFTMAX_CALL, f32, float)
        return SOFTMAX_CALL(f32, float, i64, int64_t);
    }
    BY_TARGET(SOFTMAX_CALL, f64, double)
    return SOFTMAX_CALL(f64, double, i64, int64_t);
}

/* ------------------------------------------------------------ the checks */

static void fail(const char *what, int64_t at)
{
    fprintf(stderr, "fuzz_kernels: check failed: %s (at %lld)\n", what, (long long)at);
    abort();
}

/* Element `idx` of o as a double (float16 decoded with ldexp, not convert.h). */
static double load(const operand *o, const int64_t *idx)
{
    unsigned char e[8];
    memcpy(e, o->base + offset(o, idx) * o->item, (size_t)o->item);
    if (o->code & FASTSCE_SWAPPED) swap_bytes((char *)e, o->item);
    if (o->code & FASTSCE_HALF) {
        uint16_t h;
        memcpy(&h, e, 2);
        int ex = h >> 10 & 0x1f, m = h & 0x3ff;
        double v = ex == 0 ? ldexp(m, -24) : ex == 31 ? (m ? NAN : INFINITY)
                                                      : ldexp(m + 1024, ex - 25);
        return h & 0x8000 ? -v : v;
    }
    switch (o->type) {
    case F32: { float f; memcpy(&f, e, 4); return f; }
    case F64: { double d; memcpy(&d, e, 8); return d; }
    case U8: return e[0];
    case U16: { uint16_t u; memcpy(&u, e, 2); return u; }
    default: { int64_t i; memcpy(&i, e, 8); return (double)i; }
    }
}

/* A dense, C-order, native copy of o (float16 becomes the computed type). */
static operand dense_copy(const operand *o, int64_t n)
{
    operand d = *o;
    d.code = 0;
    d.item = type_size[o->type];
    int64_t run = 1;
    for (int k = o->ndim - 1; k >= 0; k--) { d.strides[k] = run; run *= o->dims[k]; }
    d.alloc = d.base = calloc((size_t)(run ? run : 1), (size_t)d.item);
    int64_t idx[MAXD] = {0};
    if (o->present && n) {
        do {
            char *dst = d.base + offset(&d, idx) * d.item;
            if (o->type == I64 && !(o->code & FASTSCE_HALF)) {   /* keep all 64 bits */
                memcpy(dst, o->base + offset(o, idx) * o->item, 8);
                if (o->code & FASTSCE_SWAPPED) swap_bytes(dst, 8);
            } else {
                store(dst, o->type, 0, load(o, idx));
            }
        } while (step(idx, o->dims, o->ndim));
    }
    return d;
}

static int same(double a, double b) { return a == b || (a != a && b != b); }

static void check_partials(const call *c, const int64_t *pc, const int64_t *pb,
                           const int64_t *pf)
{
    const int64_t per_group = (c->group_size + FASTSCE_BLOCK - 1) / FASTSCE_BLOCK;
    for (int64_t b = 0; b < c->n_blocks; b++) {
        int64_t grp = b / per_group;
        int64_t start = grp * c->group_size + (b - grp * per_group) * FASTSCE_BLOCK;
        int64_t stop = start + FASTSCE_BLOCK < (grp + 1) * c->group_size
                       ? start + FASTSCE_BLOCK : (grp + 1) * c->group_size;
        if (pc[b] < 0 || pc[b] > stop - start) fail("count outside [0, block size]", b);
        const int64_t per = c->kind == SOFTMAX && c->ttype != I64 ? c->classes : 1;
        if (pb[b] < 0 || pb[b] > pc[b] * per) fail("bad outside [0, count * per]", b);
        if (pb[b] == 0 ? pf[b] != -1 : pf[b] < start || pf[b] >= stop)
            fail("first bad element outside its block", b);
    }
}

/* Plain sigmoid: the block sums and gradient against
 * max(x, 0) - x t + log1p(exp(-|x|)) and (sigmoid(x) - t) * gscale. */
static void check_sigmoid_formula(const call *c, const double *pl)
{
    const operand *x = &c->op[SX], *t = &c->op[ST], *g = &c->op[SG];
    const double tol = c->xtype == F32 ? 1e-5 : 1e-12;
    const int64_t per_group = (c->group_size + FASTSCE_BLOCK - 1) / FASTSCE_BLOCK;
    double *sum = calloc((size_t)c->n_blocks * 2, sizeof *sum), *mag = sum + c->n_blocks;
    int64_t idx[MAXD] = {0}, i = 0;
    do {
        const double xv = load(x, idx), tv = load(t, idx);
        const double loss = fmax(xv, 0) - xv * tv + log1p(exp(-fabs(xv)));
        const int64_t grp = i / c->group_size;
        const int64_t b = grp * per_group + (i - grp * c->group_size) / FASTSCE_BLOCK;
        sum[b] += loss;
        mag[b] += fabs(loss);
        if (g->present) {
            const double want = (1 / (1 + exp(-xv)) - tv) * c->gscale[grp];
            if (fabs(load(g, idx) - want) > tol * (1 + fabs(want))) fail("gradient formula", i);
        }
        i++;
    } while (step(idx, x->dims, x->ndim));
    for (int64_t b = 0; b < c->n_blocks; b++)
        if (fabs(pl[b] - sum[b]) > tol * (1 + mag[b])) fail("loss formula", b);
    free(sum);
}

/* ------------------------------------------------------------ one input */

static void build(input *in, call *c)
{
    memset(c, 0, sizeof *c);
    c->kind = (int)pick(in, 0, 2);
    c->xtype = (int)pick(in, F32, F64);
    c->ttype = c->kind == SOFTMAX ? (int)pick(in, F32, I64)
             : c->kind == COUNT ? (int)pick(in, F32, I64) : (int)pick(in, F32, U16);
    c->ndim = (int)pick(in, 1, 4);
    c->classes = c->kind == SOFTMAX ? pick(in, 1, 40) : 1;
    c->n = 1;
    for (int d = 0; d < c->ndim; d++) {
        /* mostly small; sometimes long rows that cross blocks */
        c->shape[d] = byte(in) < 230 ? pick(in, 0, 7) : pick(in, 8, 40000);
        /* capped past MAX_ELEMENTS, so that four long dimensions cannot
         * overflow the product (a later 0 still empties it) */
        c->n = (c->n > MAX_ELEMENTS ? MAX_ELEMENTS + 1 : c->n) * c->shape[d];
    }
    if (c->n > MAX_ELEMENTS / c->classes) { c->n = 0; return; }
    int reduced = (int)pick(in, 0, c->ndim);       /* trailing dimensions per group */
    c->group_size = 1;
    for (int d = c->ndim - reduced; d < c->ndim; d++) c->group_size *= c->shape[d];
    if (c->n == 0 || c->group_size == 0) { c->n = 0; return; }
    c->n_groups = c->n / c->group_size;
    c->n_blocks = c->n_groups * ((c->group_size + FASTSCE_BLOCK - 1) / FASTSCE_BLOCK);

    uint8_t o = byte(in);
    c->p.from_logits = o & 1;
    c->p.divergence = (o >> 1) & 1;
    c->p.eps = (o >> 2 & 3) == 3 ? byte(in) / 255.0 : (o >> 2 & 3) * 0.25;
    c->p.scale = c->ttype == U8 ? (o & 32 ? 255 : 100)
               : c->ttype == U16 ? (o & 32 ? 65535 : 1000) : 1;
    c->p.has_ignore = (c->ttype >= U8) && (o & 64);
    c->p.ignore = c->ttype == I64 ? -1 : c->ttype == U8 ? 255 : 65535;
    c->p.num_threads = (int)pick(in, 1, 3);
    c->p.stream_grad = (o >> 4) & 1;
    c->ordinary = !(o & 128);

    const int64_t xsize = type_size[c->xtype];
    const int class_shaped[NSLOTS] = {c->kind == SOFTMAX, c->kind == SOFTMAX && c->ttype != I64,
                                      0, 0, 0, c->kind == SOFTMAX, 0};
    uint8_t present = byte(in);
    for (int s = 0; s < NSLOTS; s++) {
        operand *op = &c->op[s];
        op->present = s == ST || (c->kind != COUNT && s == SX)
                      || (s == SM && present & 1)
                      || (c->kind != COUNT && ((s == SW && present & 2) || (s == SG && present & 8)
                                              || (s == SL && present & 16)))
                      || (c->kind == SIGMOID && s == SPW && present & 4);
        if (!op->present) continue;
        op->type = s == ST ? c->ttype : s == SM ? U8 : c->xtype;
        int is_float = op->type == F32 || op->type == F64;
        uint8_t code = s < SG ? byte(in) : 0;      /* outputs stay native */
        op->code = (op->type != U8 && code & 1 ? FASTSCE_SWAPPED : 0)
                   | (is_float && s != SM && code & 2 ? FASTSCE_HALF : 0);
        op->item = op->code & FASTSCE_HALF ? 2 : type_size[op->type];
        op->ndim = c->ndim + class_shaped[s];
        memcpy(op->dims, c->shape, sizeof c->shape);
        op->dims[c->ndim] = c->classes;
        lay_out(in, op, s < SG);
        if (s < SG) fill(in, c, s, !c->ordinary && (code & 4));
        else memset(op->alloc, 0x55, (size_t)op->bytes);   /* unwritten: differs from dense zeros */
    }
    c->gscale = malloc((size_t)c->n_groups * sizeof *c->gscale);
    for (int64_t g = 0; g < c->n_groups; g++) c->gscale[g] = 1.0 / (double)(1 + g % 7);
    if (c->kind == SOFTMAX && present & 32) {      /* class weights */
        c->cw = malloc((size_t)(c->classes * xsize));
        for (int64_t k = 0; k < c->classes; k++)
            store((char *)c->cw + k * xsize, c->xtype, 0, (double)(next_random(in) % 257) / 64.0);
    }
}

static void release(call *c)
{
    for (int s = 0; s < NSLOTS; s++) free(c->op[s].present ? c->op[s].alloc : NULL);
    free(c->gscale);
    free(c->cw);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    input in = {data, size, 0};
    for (size_t i = 0; i < size; i++) in.rng = in.rng * 131 + data[i];
    call c;
    build(&in, &c);
    if (c.n == 0) { release(&c); return 0; }

    const int64_t nb = c.n_blocks;
    double *pl = calloc((size_t)nb * 2, sizeof *pl);
    int64_t *pi = calloc((size_t)nb * 6, sizeof *pi);
    if (run(&c, c.op, pl, pi, pi + nb, pi + 2 * nb)) fail("kernel returned an error", 0);
    check_partials(&c, pi, pi + nb, pi + 2 * nb);

    operand dense[NSLOTS];
    for (int s = 0; s < NSLOTS; s++) dense[s] = dense_copy(&c.op[s], c.n);
    if (run(&c, dense, pl + nb, pi + 3 * nb, pi + 4 * nb, pi + 5 * nb))
        fail("kernel returned an error on dense copies", 0);
    for (int64_t b = 0; b < nb; b++) {
        if (c.kind != COUNT && !same(pl[b], pl[nb + b])) fail("loss partial depends on layout", b);
        for (int k = 0; k < 3; k++)
            if (pi[k * nb + b] != pi[(k + 3) * nb + b]) fail("count partials depend on layout", b);
        if (c.ordinary && c.kind != COUNT && !isfinite(pl[b])) fail("non-finite loss", b);
    }
    static const char *const differs[] = {"gradient depends on layout",
                                          "loss map depends on layout"};
    static const char *const not_finite[] = {"non-finite gradient", "non-finite loss map"};
    for (int s = SG; s <= SL; s++) {               /* outputs: every element */
        if (!c.op[s].present) continue;
        int64_t idx[MAXD] = {0};
        do {
            double a = load(&c.op[s], idx), d = load(&dense[s], idx);
            int64_t at = offset(&dense[s], idx);
            if (!same(a, d)) fail(differs[s - SG], at);
            if (c.ordinary && !isfinite(a)) fail(not_finite[s - SG], at);
        } while (step(idx, c.op[s].dims, c.op[s].ndim));
    }
    if (c.ordinary && c.kind == SIGMOID && c.p.from_logits && !c.p.divergence && c.p.eps == 0
        && c.ttype <= F64 && !c.op[SW].present && !c.op[SM].present && !c.op[SPW].present)
        check_sigmoid_formula(&c, pl);
    for (int s = 0; s < NSLOTS; s++) free(dense[s].alloc);
    free(pl);
    free(pi);
    release(&c);
    return 0;
}
