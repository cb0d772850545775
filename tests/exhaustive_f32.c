/* Every float32 input of the binary loss's polynomials against double libm:
 * exp_neg_f32 over [-150, 0] and log1p_01_f32 over [0, 1] (csrc/fastsce_math.h).
 * Prints "exp <worst ulp> <at x>" and "log1p_01 <worst ulp> <at e>";
 * tests/test_exhaustive.py builds and runs it (pytest -m slow, ~40 s). */
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include "fastsce_math.h"

static double ulp32(double v)   /* float32's ulp at |v|, subnormal spacing below */
{
    int e;
    frexp(v, &e);
    double u = ldexp(1.0, e - 24), tiny = ldexp(1.0, -149);
    return u > tiny ? u : tiny;
}

static float from_bits(uint32_t b)
{
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

int main(void)
{
    double worst = 0.0;
    float at = 0.0f;
    for (uint32_t b = 0x80000000u; b <= 0xC3160000u; b++) {   /* -0 .. -150 */
        float x = from_bits(b);
        double exact = exp((double)x), err = fabs((double)exp_neg_f32(x) - exact) / ulp32(exact);
        if (err > worst) { worst = err; at = x; }
    }
    printf("exp %.4f %a\n", worst, at);
    worst = 0.0;
    for (uint32_t b = 0; b <= 0x3F800000u; b++) {               /* 0 .. 1 */
        float e = from_bits(b), inv;
        double exact = log1p((double)e);
        double err = fabs((double)log1p_01_f32(e, &inv) - exact) / ulp32(exact);
        if (err > worst) { worst = err; at = e; }
    }
    printf("log1p_01 %.4f %a\n", worst, at);
    return 0;
}
