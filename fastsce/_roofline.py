"""Memory-bandwidth rooflines: parallel kernels that move a workload's bytes
without computing, so "fraction of the roofline" says how close a loss
kernel gets to what the machine's memory allows. Numba, parallel."""
import numpy as np
from numba import prange

from ._numba_math import jit

_CHUNK = 1 << 16


@jit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def read2_write1(a, b, out):
    """Read a and b, write out (what a fused loss + gradient moves)."""
    n = a.size
    chunks = (n + _CHUNK - 1) // _CHUNK
    parts = np.zeros(chunks)
    for c in prange(chunks):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
        # slices indexed by range(hi - lo): plain vector loads and stores
        # (an index from range(lo, hi) makes Numba emit gathers)
        ac, bc, oc = a[lo:hi], b[lo:hi], out[lo:hi]
        s = 0.0
        for i in range(hi - lo):
            oc[i] = ac[i]
            s += np.float64(bc[i])
        parts[c] = s
    return parts.sum()


@jit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def read2(a, b):
    """Read a and b (what a loss-only pass moves)."""
    n = a.size
    chunks = (n + _CHUNK - 1) // _CHUNK
    parts = np.zeros(chunks)
    for c in prange(chunks):
        lo = c * _CHUNK
        hi = min(lo + _CHUNK, n)
        ac, bc = a[lo:hi], b[lo:hi]
        s = 0.0
        for i in range(hi - lo):
            s += np.float64(ac[i]) + np.float64(bc[i])
        parts[c] = s
    return parts.sum()
