"""Numba's threading layer: fastsce keeps Numba's choice and guards its hazards.

Numba starts one layer at the first parallel launch: NUMBA_THREADING_LAYER if
set, else the first of tbb, omp, workqueue that loads (pip's Numba on Linux
brings omp, GNU OpenMP; tbb needs Intel's TBB library where Numba finds it).
Their hazards, from Numba's documentation and checked by
tests/test_concurrency.py:

    layer       several Python threads at once     a child forked after a launch
    tbb         safe                               safe
    omp         safe                               GNU OpenMP: killed at its first launch
    workqueue   aborts the whole process           safe

So a launch takes a lock while the layer is workqueue or not started yet (the
first launch picks it), and a child forked after OpenMP ran (`_threads`) runs
twins of the kernels compiled without `parallel`, which launch nothing, unless
its layer is fork-safe (every omp counts as GNU's: a serial kernel is never
wrong, only slower).
"""
import contextlib
import functools
import threading
import types

import numba

from ._numba_math import jit
from ._threads import forked_after_openmp, mark_openmp_used

#: Layers whose pool a forked child may launch again.
FORK_SAFE = ("tbb", "workqueue")
_launch_lock = threading.Lock()


def layer():
    """The layer Numba started, or None before the first parallel launch."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def policy():
    """What fastsce does about the current layer, for `fastsce.info()`."""
    name = layer()
    if forked_after_openmp() and name not in FORK_SAFE:
        return "serial kernels: this process was forked after OpenMP ran"
    if name is None:
        return "no launch yet: the first takes a lock while Numba picks the layer"
    if name == "workqueue":
        return "launches serialized by a lock (workqueue is not thread-safe)"
    return "parallel launches from any thread"


@functools.lru_cache(maxsize=None)
def _serial(kernel):
    """`kernel` compiled without `parallel` (prange runs as range)."""
    fn = kernel.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    # Numba's disk-cache index ignores `parallel`: a name of its own keeps the twins apart.
    twin.__qualname__ = f"{fn.__qualname__}_serial"
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("nopython", "parallel")}
    return jit(kernel._uuid, cache=True, **options)(twin)


@contextlib.contextmanager
def launch(kernel, threads):
    """The kernel to call on `threads` threads, guarded for the current layer.

    Numba's thread count is per Python thread: set for the call, then restored.
    """
    if forked_after_openmp() and layer() not in FORK_SAFE:
        yield _serial(kernel)
        return
    with _launch_lock if layer() in (None, "workqueue") else contextlib.nullcontext():
        saved = numba.get_num_threads()   # (starts the layer on the first call)
        if layer() == "omp":
            mark_openmp_used()
        wanted = min(threads, numba.config.NUMBA_NUM_THREADS)
        if wanted != saved:  # (each set costs a small call 1-2%)
            numba.set_num_threads(wanted)
        try:
            yield kernel
        finally:
            if wanted != saved:
                numba.set_num_threads(saved)
