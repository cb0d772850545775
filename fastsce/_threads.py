"""Thread-count resolution: argument > FASTSCE_NUM_THREADS > CPU affinity,
except in a process forked after OpenMP ran here: one thread there.

GNU OpenMP (libgomp, which the C kernels and Numba's "omp" layer share) is not
fork-safe: the child inherits a thread pool whose threads were not copied, and
its next parallel region hangs (C) or is killed by Numba ("fork() called from
a process already using GNU OpenMP"). One thread never enters the pool
(csrc/walk.h; `_numba_threading` runs serial kernels), so such a child
computes the same results, serially. spawn and forkserver children start
clean and keep their threads.
"""
import operator
import os
import warnings

import numpy as np

from ._errors import FastSCETypeError, FastSCEValueError, shown

_openmp_used = False      # this process ran a kernel that may have started an OpenMP pool
_forked_after_openmp = False


def mark_openmp_used():
    global _openmp_used
    _openmp_used = True


def _after_fork_in_child():
    global _forked_after_openmp
    _forked_after_openmp = _forked_after_openmp or _openmp_used


os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_after_openmp():
    """True in a process forked (at any depth) after OpenMP threads ran."""
    return _forked_after_openmp


def available_cpus():
    """CPUs this process may run on (its affinity, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env_threads():
    raw = os.environ.get("FASTSCE_NUM_THREADS", "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
        if value <= 0:
            raise ValueError
    except ValueError:
        # A malformed variable must not break every call: warn and ignore it.
        warnings.warn(
            f"FASTSCE_NUM_THREADS={raw!r} is not a positive integer; ignoring it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return value


#: Threads beyond this many times the CPUs only add overhead, and an OpenMP
#: runtime asked for tens of thousands crashes the process: they are capped.
OVERSUBSCRIPTION = 4


def resolve_threads(num_threads):
    """The thread count for one call, validated (at most OVERSUBSCRIPTION x the
    CPUs; 1 after an unsafe fork)."""
    cpus = available_cpus()
    if num_threads is None:
        value = _env_threads() or cpus
    else:
        try:
            if isinstance(num_threads, (bool, np.bool_)):
                raise TypeError
            value = operator.index(num_threads)
        except TypeError:
            raise FastSCETypeError(
                f"`num_threads` must be a positive integer or None; got {shown(num_threads)} "
                f"of type {type(num_threads).__name__}"
            ) from None
        if value <= 0:
            raise FastSCEValueError(
                f"`num_threads` must be a positive integer or None; got {shown(num_threads)}"
            )
    return 1 if _forked_after_openmp else min(value, OVERSUBSCRIPTION * cpus)
