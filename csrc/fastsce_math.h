/* Branch-free exp, log and log1p in plain arithmetic, static inline, so the
 * compiler vectorizes the loops that use them (glibc's scalar calls would not
 * vectorize; libmvec was slower and less accurate, PERF_NOTES).
 *
 * Twin of fastsce/_numba_math.py: same algorithms, constants and order of
 * operations. Built with -ffp-contract=off and without -ffast-math, so the
 * magic-constant rounding and the two-constant range reduction survive and
 * results match the Numba backend bit for bit.
 *
 * Sources: exp reduction and the log kernel follow fdlibm/musl (e_exp.c,
 * e_log.c, e_logf.c); the float32 exp polynomial is Cephes expf's fit.
 */
#ifndef FASTSCE_MATH_H
#define FASTSCE_MATH_H
#include <stdint.h>
#include <string.h>
#include <math.h>

/* Fused multiply-adds are C99 fmaf/fma (one rounding): vfmadd in the AVX2
 * and AVX-512 clones, a libm call (exact, scalar) in the baseline one. Numba
 * emits the same llvm.fma, so the twins agree bit for bit on every CPU. */

/* Forced: GCC's inlining budget runs out in the larger loops, and one call
 * left in a loop stops it from vectorizing (measured: 12x slower). */
#define MATH_INLINE static inline __attribute__((always_inline))

/* Per-type names, for code written once for both types (XN = f32, f64). */
MATH_INLINE float fma_f32(float a, float b, float c) { return fmaf(a, b, c); }
MATH_INLINE double fma_f64(double a, double b, double c) { return fma(a, b, c); }
MATH_INLINE float abs_f32(float a) { return fabsf(a); }
MATH_INLINE double abs_f64(double a) { return fabs(a); }

MATH_INLINE float bits_f32(int32_t i) { float f; memcpy(&f, &i, 4); return f; }
MATH_INLINE int32_t f32_bits(float f) { int32_t i; memcpy(&i, &f, 4); return i; }
MATH_INLINE double bits_f64(int64_t i) { double f; memcpy(&f, &i, 8); return f; }
MATH_INLINE int64_t f64_bits(double f) { int64_t i; memcpy(&i, &f, 8); return i; }

/* c ? a : b in bit operations. Written as a conditional, GCC threads the
 * branch through what follows and vectorizes both sides of it (the binary
 * loop's pos select: 94 -> 85 instructions per 16 elements, 5-8% faster);
 * Numba's LLVM does not, so its twin keeps the conditional. */
MATH_INLINE float pick_f32(int c, float a, float b)
{
    int32_t m = -(int32_t)(c != 0);
    return bits_f32((f32_bits(a) & m) | (f32_bits(b) & ~m));
}
MATH_INLINE double pick_f64(int c, double a, double b)
{
    int64_t m = -(int64_t)(c != 0);
    return bits_f64((f64_bits(a) & m) | (f64_bits(b) & ~m));
}

/* ------------------------------------------------------------ float32 */

/* exp(r) * s for the reduced argument r, |r| <= ln(2)/2 (Cephes expf's fit)
 * and a power of two s: s + (exp(r) - 1) * s, one rounding for the sum and
 * the scale (3 cycles shorter than rounding exp(r) first, W1 +3%). The fit in
 * fused multiply-adds and powers of r^2: 3 dependent fmas instead of 5.
 * exp(x) worst 1.03 ulp over every float32 x in [-150, 0]
 * (tests/exhaustive_f32.c; Horner's: 1.01). */
MATH_INLINE float exp_scaled_f32(float r, float s)
{
    float r2 = r * r;
    float p = fmaf(fmaf(fmaf(1.9875691500e-4f, r, 1.3981999507e-3f), r2,
                        fmaf(8.3334519073e-3f, r, 4.1665795894e-2f)), r2,
                   fmaf(1.6666665459e-1f, r, 5.0000001201e-1f));
    return fmaf(fmaf(p, r2, r), s, s);
}

/* The softmax's exp(d + err) * 2^64, for d = x - m <= 0 (and NaN) and err
 * what rounding x - m lost (|err| <= ulp(d) / 2, so it is added to the
 * reduced argument). d is clamped at -130: every result is then a normal
 * float32 and 2^(k + 64) a single factor. Below e^-130 of the maximum a
 * class cannot change a float32 loss (the smallest subnormal is e^-103). */
#define EXP_CLASS_MIN_f32 (-130.0f)
#define EXP_CLASS_UNSCALE_f32 0x1p-64f
MATH_INLINE float exp_class_f32(float d, float err)
{
    d = d < EXP_CLASS_MIN_f32 ? EXP_CLASS_MIN_f32 : d;
    float kb = fmaf(d, 1.44269504088896341f, 12582912.0f);    /* rint: + 1.5*2^23 */
    float k = kb - 12582912.0f;
    float r = fmaf(k, 2.12194440e-4f, fmaf(k, -0.693359375f, d) + err);
    /* unsigned: k from a NaN's bits is garbage (the product is NaN either way) */
    uint32_t ki = (uint32_t)(f32_bits(kb) - f32_bits(12582912.0f));
    return exp_scaled_f32(r, bits_f32((int32_t)((ki + 127u + 64u) << 23)));
}

/* exp(x) for x <= 0 (and NaN); 0 below the subnormal range. k is read from
 * the bits of the rounding sum instead of converted: with no NaN guard to
 * select on, GCC stops evaluating the loss loop twice (once per side of the
 * guard; 20% of the binary loop's instructions). The scale 2^(k + 100) is a
 * normal float32 for every k here (k >= -217), so only a subnormal result is
 * rounded twice (a 2^(k/2) in two factors took 6 more instructions per 16
 * elements). */
MATH_INLINE float exp_neg_f32(float x)
{
    x = x < -150.0f ? -150.0f : x;
    float kb = fmaf(x, 1.44269504088896341f, 12582912.0f);
    float k = kb - 12582912.0f;
    float r = fmaf(k, 2.12194440e-4f, fmaf(k, -0.693359375f, x));
    /* unsigned: k from a NaN's bits is garbage (the product is NaN either way) */
    uint32_t ki = (uint32_t)(f32_bits(kb) - f32_bits(12582912.0f));
    return exp_scaled_f32(r, bits_f32((int32_t)((ki + 127u + 100u) << 23))) * 0x1p-100f;
}

/* log(2^k (1 + f)) for 1 + f in [sqrt(2)/2, sqrt(2)) (fdlibm's kernel). */
MATH_INLINE float log_reduced_f32(float f, float k)
{
    float s = f / (2.0f + f);
    float z = s * s;
    float w = z * z;
    float r = z * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
    float hfsq = 0.5f * f * f;
    return s * (hfsq + r) + k * 9.0580006145e-06f - hfsq + f + k * 6.9313812256e-01f;
}

/* log1p(e) for e in [-0.5, 1] (and NaN); *inv = 1 / (1 + e). */
MATH_INLINE float log1p_unit_f32(float e, float *inv)
{
    float u = 1.0f + e;
    int big = u > 1.41421356237f;
    int small = u < 0.707106781187f;
    float f = big ? u * 0.5f - 1.0f : (small ? u * 2.0f - 1.0f : u - 1.0f);
    float k = big ? 1.0f : (small ? -1.0f : 0.0f);
    *inv = 1.0f / u;
    /* u = 1 + e rounded; (e - (u - 1)) / u restores what the rounding lost. */
    return log_reduced_f32(f, k) + (e - (u - 1.0f)) * *inv;
}

/* log1p(e) for e in [0, 1] (and NaN) as e + e^2 h(e), h a degree-8 fit of
 * (log1p(e) - e) / e^2 in e: no division and no range reduction, for the
 * binary loss's log1p(exp(-|x|)). h is evaluated Estrin-like in powers of
 * e^2, which the result needs anyway: 4 dependent fmas instead of Horner's 8
 * (the shorter chain ran W1 10% faster on an AVX-512 machine). The fit is a
 * minimax of the result's relative error (Lawson's iteration in float64),
 * rounded to float32: worst 1.43 ulp over every float32 e in [0, 1]
 * (tests/exhaustive_f32.c). The earlier degree-9 fit in e - 1/2 took 2 more
 * instructions for 1.65 ulp, W1 -5%. *inv = 1 / (1 + e). */
MATH_INLINE float log1p_01_f32(float e, float *inv)
{
    float e2 = e * e, e4 = e2 * e2;
    float p01 = fmaf(3.333050907e-01f, e, -4.999993145e-01f);
    float p23 = fmaf(1.969535649e-01f, e, -2.495857924e-01f);
    float p45 = fmaf(1.068033427e-01f, e, -1.535526812e-01f);
    float p67 = fmaf(2.020336874e-02f, e, -5.766221508e-02f);
    float h = fmaf(fmaf(-3.318195930e-03f, e4, fmaf(p67, e2, p45)), e4, fmaf(p23, e2, p01));
    *inv = 1.0f / (1.0f + e);
    return fmaf(e2, h, e);
}

/* log(u) for any float32: -inf at 0, NaN below 0, subnormals exact. */
MATH_INLINE float log_f32(float u)
{
    int tiny = u < 1.1754944e-38f;
    float v = tiny ? u * 33554432.0f : u;           /* 2^25 lifts subnormals */
    uint32_t ix = (uint32_t)f32_bits(v) + (0x3F800000u - 0x3F3504F3u);
    int32_t k = (int32_t)(ix >> 23) - 127;
    ix = (ix & 0x007FFFFFu) + 0x3F3504F3u;
    float f = bits_f32((int32_t)ix) - 1.0f;
    float kf = (float)k - (tiny ? 25.0f : 0.0f);
    float r = log_reduced_f32(f, kf);
    r = u < INFINITY ? r : u;                       /* inf and NaN pass through */
    r = u == 0.0f ? -INFINITY : r;
    return u < 0.0f ? NAN : r;
}

/* ------------------------------------------------------------ float64 */

/* exp(hi - lo) given r = hi - lo, |r| <= ln(2)/2 (fdlibm's e_exp.c). */
MATH_INLINE double exp_poly_f64(double hi, double lo)
{
    double r = hi - lo;
    double t = r * r;
    double c = r - t * (1.66666666666666019037e-01 + t * (-2.77777777770155933842e-03
               + t * (6.61375632143793436117e-05 + t * (-1.65339022054652515390e-06
               + t * 4.13813679705723846039e-08))));
    return 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);
}

/* 1.5 * 2^52: x + RINT_F64 is x rounded to an integer k (|k| < 2^51),
 * and its bits are RINT_F64's plus k. */
#define RINT_F64 6755399441055744.0

/* As exp_class_f32: exp(d + err) * 2^140, d clamped at -800, every result a
 * normal float64 (the smallest subnormal is e^-745). */
#define EXP_CLASS_MIN_f64 (-800.0)
#define EXP_CLASS_UNSCALE_f64 0x1p-140
MATH_INLINE double exp_class_f64(double d, double err)
{
    d = d < EXP_CLASS_MIN_f64 ? EXP_CLASS_MIN_f64 : d;
    double kb = d * 1.44269504088896338700e+00 + RINT_F64;
    double k = kb - RINT_F64;
    double p = exp_poly_f64(d - k * 6.93147180369123816490e-01,
                            k * 1.90821492927058770002e-10 - err);
    uint64_t ki = (uint64_t)(f64_bits(kb) - f64_bits(RINT_F64));
    return p * bits_f64((int64_t)((ki + 1023u + 140u) << 52));
}

/* As exp_neg_f32: k from the bits, 2^(k + 60) normal for k >= -1077. */
MATH_INLINE double exp_neg_f64(double x)
{
    x = x < -746.0 ? -746.0 : x;
    double kb = x * 1.44269504088896338700e+00 + RINT_F64;
    double k = kb - RINT_F64;
    double p = exp_poly_f64(x - k * 6.93147180369123816490e-01, k * 1.90821492927058770002e-10);
    uint64_t ki = (uint64_t)(f64_bits(kb) - f64_bits(RINT_F64));
    return p * bits_f64((int64_t)((ki + 1023u + 60u) << 52)) * 0x1p-60;
}

MATH_INLINE double log_reduced_f64(double f, double k)
{
    double s = f / (2.0 + f);
    double z = s * s;
    double w = z * z;
    double r = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01
               + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)))
             + w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01
               + w * 1.531383769920937332e-01));
    double hfsq = 0.5 * f * f;
    return s * (hfsq + r) + k * 1.90821492927058770002e-10 - hfsq + f
           + k * 6.93147180369123816490e-01;
}

MATH_INLINE double log1p_unit_f64(double e, double *inv)
{
    double u = 1.0 + e;
    int big = u > 1.4142135623730951;
    int small = u < 0.7071067811865476;
    double f = big ? u * 0.5 - 1.0 : (small ? u * 2.0 - 1.0 : u - 1.0);
    double k = big ? 1.0 : (small ? -1.0 : 0.0);
    *inv = 1.0 / u;
    return log_reduced_f64(f, k) + (e - (u - 1.0)) * *inv;
}

/* log1p(e) for e in [0, 1] (and NaN); *inv = 1 / (1 + e). Float64 keeps the
 * reduced log: a polynomial in e alone would need degree ~21 for 2^-53. */
MATH_INLINE double log1p_01_f64(double e, double *inv) { return log1p_unit_f64(e, inv); }

MATH_INLINE double log_f64(double u)
{
    int tiny = u < 2.2250738585072014e-308;
    double v = tiny ? u * 18014398509481984.0 : u;  /* 2^54 lifts subnormals */
    uint64_t ix = (uint64_t)f64_bits(v) + ((uint64_t)(0x3FF00000u - 0x3FE6A09Eu) << 32);
    /* the exponent as a double by RINT_F64's bits, the exp's rounding in
     * reverse: AVX2 has no int64 -> double conversion, and with one the loops
     * calling this stayed scalar (the softmax's per-pixel loss: a third of
     * its tile's time) */
    double kf = bits_f64(f64_bits(RINT_F64) + (int64_t)(ix >> 52)) - (RINT_F64 + 1023.0)
                - (tiny ? 54.0 : 0.0);
    ix = (ix & 0x000FFFFFFFFFFFFFull) + ((uint64_t)0x3FE6A09Eu << 32);
    double f = bits_f64((int64_t)ix) - 1.0;
    double r = log_reduced_f64(f, kf);
    r = u < INFINITY ? r : u;
    r = u == 0.0 ? -INFINITY : r;
    return u < 0.0 ? NAN : r;
}

/* log1p(r) for r >= 0 (and +inf, NaN): log(u) of u = 1 + r, the rounding of
 * 1 + r put back as (r - (u - 1)) / u (fdlibm's log1p); *inv = 1 / u, which
 * the softmax's gradient needs too. */
MATH_INLINE double log1p_pos_f64(double r, double *inv)
{
    double u = 1.0 + r;
    *inv = 1.0 / u;
    return log_f64(u) + (u < INFINITY ? (r - (u - 1.0)) * *inv : 0.0);
}

#endif
