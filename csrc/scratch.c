/* Each thread's kernel scratch, kept from one call to the next.
 *
 * Freed after every call, a few hundred KB of scratch came back as fresh
 * pages on the next (glibc trims or unmaps them): a (1, 21, 64, 64) softmax
 * with its gradient took 130 first-touch page faults per call in C, none in
 * Numba, and 1.0 ms against Numba's 0.64. So a thread keeps the largest
 * scratch it asked for, up to KEEP_MAX, in a pthread key whose destructor
 * frees it when the thread exits; anything bigger, or without pthreads, is
 * malloc'ed and freed per call as before (its faults are a small part of
 * the work it carries). The kernels never nest, so one buffer per thread
 * serves both losses. Numba's twins still take theirs per block (or piece
 * of one) from NRT (malloc): no faults in that script, 45 per call when
 * glibc is made to map every block of 64 KiB or more
 * (MALLOC_MMAP_THRESHOLD_=65536).
 */
#include <stdlib.h>
#include "scratch.h"

#define KEEP_MAX ((size_t)4 << 20)

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>

/* The kept buffer: its size, then the scratch on a 64-byte boundary of it. */
typedef union { size_t size; char line[64]; } kept;

static pthread_key_t key;
static int key_ok;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static void make_key(void) { key_ok = pthread_key_create(&key, free) == 0; }

void *fastsce_scratch_get(size_t bytes)
{
    if (bytes > KEEP_MAX) return malloc(bytes);
    pthread_once(&once, make_key);
    if (!key_ok) return malloc(bytes);
    kept *h = pthread_getspecific(key);
    if (h && h->size >= bytes) return h + 1;
    pthread_setspecific(key, NULL);
    free(h);
    h = malloc(sizeof *h + bytes);
    if (!h) return NULL;
    if (pthread_setspecific(key, h) != 0) { free(h); return malloc(bytes); }
    h->size = bytes;
    return h + 1;
}

void fastsce_scratch_put(void *p)
{
    kept *h = key_ok ? pthread_getspecific(key) : NULL;
    if (!h || p != (void *)(h + 1)) free(p);
}
#else
void *fastsce_scratch_get(size_t bytes) { return malloc(bytes); }
void fastsce_scratch_put(void *p) { free(p); }
#endif
