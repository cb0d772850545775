"""Allocations that can fail, and the MemoryError that says what was asked for.

A gradient or loss map of a huge (say zero-stride, broadcast) input, a copy
of a converted operand, or the per-thread scratch of a softmax over a huge
class axis may not fit. The error then names the array, its shape and
dtype, and the bytes asked for (exact and human readable), and says what to
do, before any output is written.
"""
import math

import numpy as np

from ._layout import BLOCK, BUF_PAD, SLOTS, compact, softmax_tile

#: Softmax scratch below this many bytes (all threads) is not probed: a
#: malloc that small fails only in a process that is already out of memory.
PROBE_FROM = 1 << 26
#: Either fast kernel's softmax scratch per thread (C) or block (Numba), at
#: most: per class, four [C][tile + BUF_PAD] buffers of 8-byte values
#: (logits, soft targets and gradient gathered, and C's uint8/uint16 targets
#: widened), the chunk arrays (C: CHUNK 16 x 16 bytes; Numba: 2 x CHUNK 512
#: x 8 bytes) and a streamed gradient's staging block (STRIDED_PIXELS 16 x 8
#: bytes); per pixel of a tile, len(SLOTS) + 4 rows of 8 bytes; and a BLOCK
#: of float64 losses, Numba's 14 per-pixel chunk arrays (CHUNK x at most 8
#: bytes) and small fixed arrays.
#: tests/test_memory.py checks the constants against both kernels'.
GATHER_BUFFERS, CHUNK_BYTES, STAGE_BYTES = 4, 2 * 512 * 8, 16 * 8
FIXED_BYTES = BLOCK * 8 + 14 * 512 * 8 + 8192


def human(nbytes):
    """``nbytes`` in binary units: "512 B", "1.5 KiB", ..., "2.0 EiB"."""
    value, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def size_text(nbytes):
    return f"{human(nbytes)} ({nbytes:,} bytes)"


def empty(what, shape, dtype, hint):
    """np.empty(shape, dtype), or a MemoryError naming `what` and the bytes asked for."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        return np.empty(shape, dtype)
    except (MemoryError, ValueError):
        # (NumPy raises ValueError when the size does not even fit in an intp.)
        raise MemoryError(
            f"fastsce could not allocate {what}: {size_text(nbytes)} for shape "
            f"{tuple(shape)} and dtype {dtype}. {hint}"
        ) from None


def converted(name, a, dtype, hint):
    """`a` in `dtype`, its broadcast axes kept as views (only distinct values copied)."""
    values = compact(a)
    copy = empty(f"a {np.dtype(dtype)} copy of `{name}`", values.shape, dtype, hint)
    copy[...] = values
    return copy if copy.shape == a.shape else np.broadcast_to(copy, a.shape)


def softmax_scratch_bytes(classes):
    """Bytes of softmax scratch one thread (C) or one block (Numba) may use at most."""
    tile = softmax_tile(classes)
    per_class = GATHER_BUFFERS * (tile + BUF_PAD) * 8 + CHUNK_BYTES + STAGE_BYTES
    return classes * per_class + (len(SLOTS) + 4) * tile * 8 + FIXED_BYTES


def check_softmax_scratch(classes, threads):
    """Raise MemoryError, before any kernel runs, if the scratch of a softmax over
    `classes` classes on `threads` threads cannot be had."""
    per_thread = softmax_scratch_bytes(classes)
    total = per_thread * threads
    if total < PROBE_FROM:
        return
    try:
        np.empty(total, np.uint8)  # untouched, freed at once: reserves nothing
    except (MemoryError, ValueError):
        raise MemoryError(
            f"fastsce could not allocate the softmax kernel's scratch for {classes:,} classes: "
            f"up to {size_text(per_thread)} per thread, {size_text(total)} for "
            f"num_threads={threads}. Use fewer threads, or fewer classes per call."
        ) from None
