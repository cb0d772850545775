"""Reduction groups: which elements each "sum"/"mean" result collects.

The kernels know one kind of group: a run of `group_size` consecutive
elements of their C-order walk, cut into fixed blocks that never cross a
group. Any other grouping is run as one or more *parts*: every operand seen
through the same view, of shape groups + members, so that each group is such
a run. Views only change strides (transposes, axis splits), so a part costs
no copy, and every element belongs to exactly one part: still one pass.

* full reduction: one part, the call as it is, one group;
* `reduce_axes`: one part, the kept axes moved to the front;
* `tile_shape=(th, tw)`: the last two axes cut into up to 3 x 3 regions
  (a partial head tile, whole tiles, a partial tail tile, per axis), each
  viewed as (..., tiles_h, tiles_w, th', tw').

`origin` places a chunk of a larger map (the Accumulator): groups and tiles
are those of the whole map, so a tile cut by a chunk edge is two partial
groups whose partials are summed exactly later (`_partials.GroupSums`).
Operands arrive with the pixel shape, plus a trailing class axis for the
softmax's logits, soft targets and gradient; views leave that axis alone.
"""
import math
from dataclasses import dataclass

import numpy as np

from ._errors import FastSCETypeError, FastSCEValueError, shown


@dataclass
class Part:
    shape: tuple          # groups + members, in pixels (elements for the binary loss)
    groups: int           # how many leading axes of `shape` index the groups
    group_size: int
    dest: tuple           # slices of the result array: this part's groups, in C order
    view: object          # operand -> its view of `shape` (+ trailing class axis)
    index: object         # part index tuple -> pixel index in the chunk

    def origin(self, flat):
        """Pixel index (in the chunk) of the part's flat element `flat`."""
        return self.index(np.unravel_index(flat, self.shape))


class Grouping:
    """A validated reduce_axes / tile_shape (or neither) over a pixel shape."""

    def __init__(self, shape, reduce_axes=None, tile_shape=None, reduction="mean"):
        self.shape = tuple(shape)
        self.ndim = len(shape)
        self.axes = self.tile = None
        if reduce_axes is not None and tile_shape is not None:
            raise FastSCEValueError(
                "pass `reduce_axes` or `tile_shape`, not both; got "
                f"reduce_axes={shown(reduce_axes)} and tile_shape={shown(tile_shape)}")
        if (reduce_axes is not None or tile_shape is not None) and reduction == "none":
            raise FastSCEValueError(
                "`reduce_axes` and `tile_shape` group a 'sum' or 'mean' reduction; got "
                "reduction='none' (which returns the whole loss map)")
        if reduce_axes is not None:
            self.axes = _axes(reduce_axes, self.ndim)
        if tile_shape is not None:
            self.tile = _tile(tile_shape, self.ndim)
        self.result_shape = self.result(shape)

    @property
    def grouped(self):
        return self.axes is not None or self.tile is not None

    def result(self, shape):
        """Shape of the loss array for a map of pixel shape `shape`."""
        if self.axes is not None:
            return tuple(n for d, n in enumerate(shape) if d not in self.axes)
        if self.tile is not None:
            (H, W), (th, tw) = shape[-2:], self.tile
            return tuple(shape[:-2]) + (-(-H // th), -(-W // tw))
        return ()

    def sizes(self):
        """Elements (pixels) of each group of the whole map: its count when none is masked."""
        if self.axes is not None:
            return np.full(self.result_shape, math.prod(self.shape[d] for d in self.axes),
                           np.int64)
        if self.tile is not None:
            (H, W), (th, tw) = self.shape[-2:], self.tile
            rows = np.minimum(th, H - th * np.arange(self.result_shape[-2]))
            cols = np.minimum(tw, W - tw * np.arange(self.result_shape[-1]))
            return np.broadcast_to(np.multiply.outer(rows, cols), self.result_shape).astype(np.int64)
        return np.array(math.prod(self.shape), np.int64)

    def parts(self, shape, origin=None):
        """Parts of a chunk of pixel shape `shape` starting at `origin` in the map."""
        origin = tuple(origin or (0,) * len(shape))
        n = math.prod(shape)
        if self.axes is not None:
            return [self._transposed(shape, origin)]
        if self.tile is not None:
            return self._tiles(shape, origin)
        return [Part(tuple(shape), 0, n, (), lambda a: a, lambda idx: idx)]

    def _transposed(self, shape, origin):
        kept = [d for d in range(len(shape)) if d not in self.axes]
        perm = kept + list(self.axes)
        inverse = np.argsort(perm)

        def view(a):
            return a.transpose(perm + list(range(len(shape), a.ndim)))

        return Part(tuple(shape[d] for d in perm), len(kept),
                    math.prod(shape[d] for d in self.axes),
                    tuple(slice(origin[d], origin[d] + shape[d]) for d in kept), view,
                    lambda idx: tuple(idx[i] for i in inverse))

    def _tiles(self, shape, origin):
        lead = tuple(slice(o, o + n) for o, n in zip(origin[:-2], shape[:-2]))
        rows = _runs(shape[-2], origin[-2], self.tile[0])
        cols = _runs(shape[-1], origin[-1], self.tile[1])
        return [_tile_part(shape, lead, r, c) for r in rows for c in cols]


def _runs(n, start, t):
    """Cut [0, n) (at `start` of the map) at the map's tile lines: runs of
    (offset, tiles, tile length, first tile index) with equal tile lengths."""
    runs, i = [], 0
    head = min(-start % t, n)
    if head:
        runs.append((0, 1, head, start // t))
        i = head
    whole = (n - i) // t
    if whole:
        runs.append((i, whole, t, (start + i) // t))
        i += whole * t
    if i < n:
        runs.append((i, 1, n - i, (start + i) // t))
    return runs


def _tile_part(shape, lead, rows, cols):
    (r0, a, hh, ti), (c0, b, ww, tj) = rows, cols
    k = len(shape) - 2

    def view(arr):
        sub = arr[(slice(None),) * k + (slice(r0, r0 + a * hh), slice(c0, c0 + b * ww))]
        st = sub.strides
        split = np.lib.stride_tricks.as_strided(
            sub, sub.shape[:k] + (a, hh, b, ww) + sub.shape[k + 2:],
            st[:k] + (st[k] * hh, st[k], st[k + 1] * ww, st[k + 1]) + st[k + 2:],
            writeable=sub.flags.writeable)
        order = list(range(k)) + [k, k + 2, k + 1, k + 3] + list(range(k + 4, split.ndim))
        return split.transpose(order)

    def index(idx):
        i, j, u, v = idx[k:]
        return tuple(idx[:k]) + (r0 + i * hh + u, c0 + j * ww + v)

    return Part(tuple(shape[:k]) + (a, b, hh, ww), k + 2, hh * ww,
                lead + (slice(ti, ti + a), slice(tj, tj + b)), view, index)


def _axes(value, ndim):
    items = (value,) if isinstance(value, (int, np.integer)) else value
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if items is None or any(isinstance(d, bool) or not isinstance(d, (int, np.integer))
                            for d in items):
        raise FastSCETypeError(
            f"`reduce_axes` must be an int or a tuple of ints; got {shown(value)}")
    if any(not -ndim <= d < ndim for d in items):
        raise FastSCEValueError(
            f"`reduce_axes` must name axes of the {ndim}-d pixel shape (in [{-ndim}, "
            f"{ndim - 1}]); got {shown(value)}")
    axes = sorted(int(d) % ndim for d in items)
    if len(set(axes)) != len(axes):
        raise FastSCEValueError(f"`reduce_axes` names an axis twice; got {shown(value)}")
    return tuple(axes)


def _tile(value, ndim):
    try:
        th, tw = value
    except (TypeError, ValueError):
        raise FastSCETypeError(
            f"`tile_shape` must be a pair (th, tw); got {shown(value)}") from None
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in (th, tw)):
        raise FastSCETypeError(f"`tile_shape` must be two positive integers; got {shown(value)}")
    if th < 1 or tw < 1:
        raise FastSCEValueError(f"`tile_shape` must be two positive integers; got {shown(value)}")
    if ndim < 2:
        raise FastSCEValueError(
            f"`tile_shape` tiles the last two axes; got a {ndim}-d pixel shape")
    return int(th), int(tw)
