"""Thread-count resolution: argument > FASTSCE_NUM_THREADS > CPU affinity."""
import os
import warnings

from ._errors import FastSCEValueError


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


def resolve_threads(num_threads):
    """The thread count for one call, validated."""
    if num_threads is None:
        return _env_threads() or available_cpus()
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int,)) and not hasattr(num_threads, "__index__"):
        raise FastSCEValueError(
            f"`num_threads` must be a positive integer or None; got {num_threads!r}"
        )
    value = int(num_threads)
    if value <= 0:
        raise FastSCEValueError(
            f"`num_threads` must be a positive integer or None; got {num_threads!r}"
        )
    return value
