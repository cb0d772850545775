/* fastsce C ABI: declarations only. csrc/build_ffi.py hands the part between
 * the CDEF markers to cffi's cdef, so it must stay in the subset cffi parses
 * (no includes, no macros with arguments).
 *
 * Conventions shared with fastsce/_numba_kernels.py (same order, same names):
 *  - one iteration shape (ndim, shape) walked in C order; reduction groups are
 *    runs of `group_size` consecutive elements, cut into blocks of
 *    FASTSCE_BLOCK elements; one partial per block in part_* (IN/OUT);
 *  - operands x, t, w, m, pw (inputs) and g, l (outputs, last) point at
 *    element (0, ..., 0); NULL means absent; `strides` is [7][ndim] in
 *    elements (negative and zero allowed);
 *  - an input slot with a nonzero `convert` code (params) is stored as
 *    float16 bits (FASTSCE_HALF) and/or byte-swapped (FASTSCE_SWAPPED); its
 *    pointer is then raw storage, read only through csrc/convert.h;
 *  - return 0, or FASTSCE_ENOMEM if per-thread scratch could not be had.
 */
#ifndef FASTSCE_H
#define FASTSCE_H
#include <stdint.h>

/* CDEF BEGIN */
#define FASTSCE_BLOCK 16384
#define FASTSCE_NSLOTS 7
#define FASTSCE_ENOMEM 1
#define FASTSCE_SWAPPED 1
#define FASTSCE_HALF 2

typedef struct {
    double scale;          /* targets mean t / scale                        */
    double eps;            /* label smoothing                               */
    int64_t ignore;        /* integer code excluded when has_ignore          */
    int32_t has_ignore;
    int32_t from_logits;
    int32_t divergence;
    int32_t num_threads;
    int32_t convert[7];    /* per slot: FASTSCE_SWAPPED | FASTSCE_HALF bits  */
    int32_t stream_grad;   /* softmax: a buffered gradient goes out by
                              non-temporal stores (_layout.stream_gradient) */
} fastsce_params;

extern const int FASTSCE_HAVE_OPENMP;
extern const char FASTSCE_BUILD_FLAGS[];
const char *fastsce_cpu_path(void);   /* which clone of the loops this CPU runs */

int fastsce_sigmoid_ce_f32_f32(int ndim, const int64_t *shape, int64_t group_size, const float *x, const float *t, const float *w, const uint8_t *m, const float *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_sigmoid_ce_f32_f64(int ndim, const int64_t *shape, int64_t group_size, const float *x, const double *t, const float *w, const uint8_t *m, const float *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_sigmoid_ce_f32_u8(int ndim, const int64_t *shape, int64_t group_size, const float *x, const uint8_t *t, const float *w, const uint8_t *m, const float *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_sigmoid_ce_f32_u16(int ndim, const int64_t *shape, int64_t group_size, const float *x, const uint16_t *t, const float *w, const uint8_t *m, const float *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_sigmoid_ce_f64_f32(int ndim, const int64_t *shape, int64_t group_size, const double *x, const float *t, const double *w, const uint8_t *m, const double *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_sigmoid_ce_f64_f64(int ndim, const int64_t *shape, int64_t group_size, const double *x, const double *t, const double *w, const uint8_t *m, const double *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_sigmoid_ce_f64_u8(int ndim, const int64_t *shape, int64_t group_size, const double *x, const uint8_t *t, const double *w, const uint8_t *m, const double *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_sigmoid_ce_f64_u16(int ndim, const int64_t *shape, int64_t group_size, const double *x, const uint16_t *t, const double *w, const uint8_t *m, const double *pw, const int64_t *strides, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);

/* Softmax over a class axis: `shape` is the pixel shape; x, t (soft), g also
 * have `class_strides` [7]; t of i64 holds class indices of the pixel shape.
 * `tile` pixels per tile (_layout.softmax_tile(classes)); cw: C class weights. */
int fastsce_softmax_ce_f32_f32(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const float *x, const float *t, const float *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const float *cw, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f32_f64(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const float *x, const double *t, const float *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const float *cw, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f32_u8(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const float *x, const uint8_t *t, const float *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const float *cw, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f32_u16(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const float *x, const uint16_t *t, const float *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const float *cw, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f32_i64(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const float *x, const int64_t *t, const float *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const float *cw, const fastsce_params *p, const double *gscale, float *g, float *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f64_f32(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const double *x, const float *t, const double *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const double *cw, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f64_f64(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const double *x, const double *t, const double *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const double *cw, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f64_u8(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const double *x, const uint8_t *t, const double *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const double *cw, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f64_u16(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const double *x, const uint16_t *t, const double *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const double *cw, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_softmax_ce_f64_i64(int ndim, const int64_t *shape, int64_t group_size, int64_t classes, int64_t tile, const double *x, const int64_t *t, const double *w, const uint8_t *m, const int64_t *strides, const int64_t *class_strides, const double *cw, const fastsce_params *p, const double *gscale, double *g, double *l, double *part_loss, int64_t *part_count, int64_t *part_bad, int64_t *part_first);

/* Count and check only: the pre-pass of a masked "mean" gradient or an
 * in-place call. Operand slots as above; only t and m are read. */
int fastsce_count_valid_f32(int ndim, const int64_t *shape, int64_t group_size, const float *t, const uint8_t *m, const int64_t *strides, const fastsce_params *p, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_count_valid_f64(int ndim, const int64_t *shape, int64_t group_size, const double *t, const uint8_t *m, const int64_t *strides, const fastsce_params *p, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_count_valid_u8(int ndim, const int64_t *shape, int64_t group_size, const uint8_t *t, const uint8_t *m, const int64_t *strides, const fastsce_params *p, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_count_valid_i64(int ndim, const int64_t *shape, int64_t group_size, const int64_t *t, const uint8_t *m, const int64_t *strides, const fastsce_params *p, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
int fastsce_count_valid_u16(int ndim, const int64_t *shape, int64_t group_size, const uint16_t *t, const uint8_t *m, const int64_t *strides, const fastsce_params *p, int64_t *part_count, int64_t *part_bad, int64_t *part_first);
/* CDEF END */

#endif
