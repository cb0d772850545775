"""Turn user arrays into the strided operands every kernel iterates over.

Both fast backends walk one iteration shape in C order and see each operand
as (flat, offset, element strides): `flat` is a 1-D view that starts at the
operand's lowest address, so negative and zero strides need no copy, and a
whole-array copy is never made for broadcasting. Dimensions that are
contiguous in every operand are merged first, so a contiguous call is one
long inner row. The flat order, the fixed BLOCK and the group size decide
where every partial sum starts, so results never depend on the layout's
coalescing or on the thread count.

Byte-swapped and float16 operands are passed as their raw bits with a
conversion code per slot (SWAPPED, HALF): the kernels convert them row by
row (tile by tile) in the gather step they use for strided rows, so they
are never copied whole either.
"""
import math
from dataclasses import dataclass

import numpy as np

from ._errors import FastSCEValueError

#: Elements per reduction block (C: FASTSCE_BLOCK). Block boundaries are fixed
#: by this number and the group size alone, never by the thread count.
BLOCK = 16384

#: A softmax gradient of at least this many bytes that is copied out of a
#: gather buffer goes by non-temporal stores: past the caches, the store skips
#: the line's read for ownership and leaves the inputs cached; a smaller one
#: stays in cache for whoever reads it next.
STREAM_BYTES = 1 << 22


def stream_gradient(grad):
    """Whether both backends copy this gradient (an array or None) out of
    their tile buffers by non-temporal stores."""
    return grad is not None and grad.nbytes >= STREAM_BYTES

#: Softmax gather buffers hold a tile's classes BUF_PAD elements more than a tile
#: apart (C: BUF_STRIDE), so a pixel's classes do not share one cache set.
BUF_PAD = 16


def softmax_tile(classes):
    """Pixels per softmax tile: a [classes][tile] working set stays in L2.

    At most 32768 values per operand: the float32 gather buffers of logits,
    targets and gradient then take 384 KiB of a 1 MiB L2 (W3 in C at 1
    thread, tiles of 1024 rather than 2048 pixels: 0.98 -> 1.05-1.08
    Gelem/s). A function of the class count only, never of the layout or
    threads.
    """
    tile = 4096
    while tile > 64 and tile * classes > 32768:
        tile //= 2
    return tile


#: Operand slots in the order every kernel takes them (inputs, then outputs).
SLOTS = ("x", "z", "w", "m", "pw", "g", "l")

#: Conversion codes (bits) of an operand's storage (C: FASTSCE_SWAPPED, FASTSCE_HALF).
SWAPPED, HALF = 1, 2
_HALF = np.dtype(np.float16)


@dataclass
class Plan:
    """The iteration every backend runs for one call."""

    shape: np.ndarray        # int64[ndim], coalesced iteration shape
    n: int                   # elements in the iteration
    group_size: int          # elements per reduction group (n for a full reduction)
    n_groups: int
    n_blocks: int
    flats: dict              # slot -> 1-D array from the operand's lowest address, or None
                             # (native dtype; float16 as its int16 bits)
    codes: np.ndarray        # int32[len(SLOTS)], SWAPPED | HALF bits of each slot's storage
    offsets: np.ndarray      # int64[len(SLOTS)], element offset of index (0, ..., 0)
    strides: np.ndarray      # int64[len(SLOTS), ndim], element strides
    class_strides: np.ndarray  # int64[len(SLOTS)], stride of the class axis (softmax)


def kernel_dtype(dtype):
    """The dtype a kernel computes an operand in: native order, float16 read as float32."""
    native = np.dtype(dtype).newbyteorder("=")
    return np.dtype(np.float32) if native == _HALF else native


def _storage(flat):
    """`flat` as kernels take it, and its conversion code: a view of the same
    bytes in native order (no float16 type in Numba or C: its int16 bits)."""
    if flat.dtype.isnative and flat.dtype != _HALF:
        return flat, 0
    native = flat.dtype.newbyteorder("=")
    code = 0 if flat.dtype.isnative else SWAPPED
    if native == _HALF:
        return flat.view(np.int16), code | HALF
    return flat.view(native), code


def _element_strides(a):
    """Strides in items (whole: make_plan copies any input that is not aligned)."""
    return [s // a.dtype.itemsize for s in a.strides]


def _dense(shape, strides):
    """Whether the elements fill their address range once, in some axis order
    with positive strides (else ravel("K") would copy them)."""
    step = 1
    for stride, n in sorted((s, n) for n, s in zip(shape, strides) if n > 1):
        if stride != step:
            return False
        step *= n
    return True


def _flat_view(a, strides, writeable):
    """1-D view from the lowest address of `a` to its highest, and the offset of a[0,...,0]."""
    if a.flags.c_contiguous or a.flags.f_contiguous or _dense(a.shape, strides):
        # Dense in some axis order (C, F, a moved axis): ravel views it in
        # memory order, without as_strided's cost (a tenth of a small call).
        # (As a plain ndarray: np.matrix would stay 2-D, a memmap type anew.)
        flat = a.view(np.ndarray).ravel("K")
        if not writeable:
            flat.flags.writeable = False
        return flat, 0
    lowest = sum((n - 1) * s for n, s in zip(a.shape, strides) if s < 0)
    highest = sum((n - 1) * s for n, s in zip(a.shape, strides) if s > 0)
    start = tuple(n - 1 if s < 0 else 0 for n, s in zip(a.shape, strides))
    corner = a[tuple(slice(i, i + 1) for i in start)] if a.ndim else a.reshape(1)
    flat = np.lib.stride_tricks.as_strided(
        corner, shape=(highest - lowest + 1,), strides=(a.dtype.itemsize,),
        writeable=writeable,
    )
    return flat, -lowest


def _coalesce(shape, strides):
    """Merge neighbouring dims that are contiguous in every operand; drop size-1 dims."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    out_shape, out_strides = [], [[] for _ in strides]
    for d in dims:
        if out_shape and all(st[-1] == s[d] * shape[d] for st, s in zip(out_strides, strides)):
            out_shape[-1] *= shape[d]
            for st, s in zip(out_strides, strides):
                st[-1] = s[d]
            continue
        out_shape.append(shape[d])
        for st, s in zip(out_strides, strides):
            st.append(s[d])
    if not out_shape:
        out_shape = [1]
        out_strides = [[0] for _ in strides]
    return out_shape, out_strides


def make_plan(shape, operands, group_size=None, class_axis=None, full_shape=None):
    """Plan a C-order walk of `shape` over `operands` (slot -> array or None).

    Every array must already broadcast to `shape`; inputs are broadcast here as
    zero-stride views, outputs must have exactly `shape`. With `class_axis`,
    `shape` is the pixel shape and operands of `full_shape` (the logits')
    also get a class stride; the walk covers their class-0 elements.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    present, wholes, pixel_strides, class_strides = [], [], [], [0] * len(SLOTS)
    for slot in SLOTS:
        a = operands.get(slot)
        if a is None:
            continue
        if not a.flags.aligned:
            # An address or a stride that is not a whole number of items
            # (np.frombuffer with an offset, a structured array's field): the
            # kernels load whole elements, so such an input is read from an
            # aligned copy of its distinct values. The API rejects such outputs.
            assert slot not in ("g", "l"), slot
            copy = np.array(compact(a), order="C")
            a = copy if copy.shape == a.shape else np.broadcast_to(copy, a.shape)
        full = class_axis is not None and a.ndim == len(full_shape) and a.shape != shape
        target = tuple(full_shape) if full else shape
        whole = broadcast_view(a, target)
        strides = _element_strides(whole)
        pixel = strides[:class_axis] + strides[class_axis + 1:] if full else strides
        if full:
            class_strides[SLOTS.index(slot)] = strides[class_axis]
        present.append(slot)
        wholes.append((whole, strides))
        pixel_strides.append(pixel)
    merged_shape, merged = _coalesce(shape, pixel_strides)
    ndim = len(merged_shape)
    strides, offsets, codes = [[0] * ndim for _ in SLOTS], [0] * len(SLOTS), [0] * len(SLOTS)
    flats = dict.fromkeys(SLOTS)
    for slot, st, (whole, whole_strides) in zip(present, merged, wholes):
        i = SLOTS.index(slot)
        strides[i] = st
        if n:
            # Inputs are always read-only views: a writable and a read-only
            # caller's array (a broadcast, a dask chunk from another process)
            # would otherwise be two Numba types, each kernel compiled twice.
            flat, offsets[i] = _flat_view(whole, whole_strides, writeable=slot in ("g", "l"))
            flats[slot], codes[i] = _storage(flat)
    if group_size is None:
        group_size = n
    n_groups = n // group_size if group_size else 0
    per_group = -(-group_size // BLOCK) if group_size else 0
    # One array for the int64 fields (each np.array costs a small call ~1%).
    ints = np.array(merged_shape + offsets + class_strides + sum(strides, []), dtype=np.int64)
    k = len(SLOTS)
    return Plan(
        shape=ints[:ndim], n=n, group_size=group_size, n_groups=n_groups,
        n_blocks=n_groups * per_group, flats=flats, codes=np.array(codes, dtype=np.int32),
        offsets=ints[ndim:ndim + k], class_strides=ints[ndim + k:ndim + 2 * k],
        strides=ints[ndim + 2 * k:].reshape(k, ndim),
    )


def broadcast_view(a, shape):
    """`a` itself if of `shape`, else its zero-stride broadcast view."""
    return a if a.shape == shape else np.broadcast_to(a, shape)


def compact(a):
    """`a` with its broadcast (zero-stride) axes cut to length 1: its distinct values.

    Converting this and broadcasting the result back copies only those.
    """
    return a[tuple(slice(0, 1) if s == 0 and n > 1 else slice(None)
                   for n, s in zip(a.shape, a.strides))]


def broadcast_operand(name, a, shape, what="the shape of `logits`"):
    """Check that `a` broadcasts to `shape` without changing it."""
    if a.shape == tuple(shape):
        return
    try:
        b = np.broadcast_shapes(a.shape, shape)
    except ValueError:
        b = None
    if b != tuple(shape):
        raise FastSCEValueError(
            f"`{name}` must broadcast to {what} {tuple(shape)}; got {name}.shape={a.shape}"
        )
