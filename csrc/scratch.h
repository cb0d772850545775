/* Per-thread kernel scratch (csrc/scratch.c). */
#ifndef FASTSCE_SCRATCH_H
#define FASTSCE_SCRATCH_H
#include <stddef.h>

#if defined(__GNUC__)
#define FASTSCE_HIDDEN __attribute__((visibility("hidden")))
#else
#define FASTSCE_HIDDEN
#endif

/* A thread's scratch of `bytes`, kept for its next call if small; NULL if
 * out of memory. Hand it back with fastsce_scratch_put. */
FASTSCE_HIDDEN void *fastsce_scratch_get(size_t bytes);
FASTSCE_HIDDEN void fastsce_scratch_put(void *p);

#endif
