"""`fastsce.Accumulator`: one loss over a map fed chunk by chunk, in any order.

A map too large for memory (a memmap, a TIFF read tile by tile) is evaluated
a chunk at a time. Each chunk runs the same fused kernels, with the groups
of the whole map (`_groups` with an origin), and adds its per-block float64
partials to the map's; `result()` sums each group's partials with math.fsum,
which rounds their exact sum once, so the order of the chunks does not
matter. When chunk edges fall on the block edges of the one-shot walk the
partials are the same numbers and the result is bitwise that of one call;
otherwise only the rounding of the block sums differs (~1e-15 relative).
Memory: the partials (8 bytes per BLOCK elements) and the chunk in hand.
"""
import math

import numpy as np

from . import _api
from ._errors import FastSCETypeError, FastSCEValueError, TargetRangeError
from ._groups import Grouping
from ._partials import GroupSums


class Accumulator:
    """Sum or mean of a loss over a map added chunk by chunk.

    Parameters
    ----------
    kind : {"sigmoid", "softmax"}
    shape : tuple of int
        Shape of the whole logits map (softmax: with the class axis).
    axis : int
        The softmax's class axis; chunks must hold every class.
    reduction : {"mean", "sum"}
    reduce_axes, tile_shape
        As in the loss functions: one loss per group of the whole map.
    out : ndarray, optional
        Gradient of the whole map (e.g. an ``np.memmap``), written chunk by
        chunk. With reduction="mean" each group's count must be known before
        its first chunk, so masks and ``ignore_value`` then need "sum". A chunk
        with a bad target leaves its part of ``out`` all NaN and is not added.
    grad_scale, label_smoothing, divergence, from_logits, target_scale,
    ignore_value, class_weights, check, backend, num_threads
        As in the loss functions, the same for every chunk.

    Examples
    --------
    >>> acc = fastsce.Accumulator("sigmoid", big.shape, tile_shape=(512, 512))
    >>> for rows in np.array_split(np.arange(big.shape[0]), 8):
    ...     sl = slice(rows[0], rows[-1] + 1)
    ...     acc.add(big[sl], targets[sl], index=(sl,))
    >>> loss, _ = acc.result()       # the same as one call on the whole map
    """

    def __init__(self, kind, shape, *, axis=1, reduction="mean", reduce_axes=None,
                 tile_shape=None, out=None, grad_scale=1.0, label_smoothing=0.0,
                 divergence=False, from_logits=True, target_scale=None, ignore_value=None,
                 class_weights=None, check=True, backend=None, num_threads=None):
        if kind not in ("sigmoid", "softmax"):
            raise FastSCEValueError(f"`kind` must be 'sigmoid' or 'softmax'; got {kind!r}")
        try:
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            raise FastSCETypeError(f"`shape` must be a tuple of ints; got {shape!r}") from None
        if any(n < 0 for n in shape):
            raise FastSCEValueError(f"`shape` must be non-negative; got {shape!r}")
        if reduction not in ("mean", "sum"):
            raise FastSCEValueError(
                f"`reduction` must be 'mean' or 'sum' for an Accumulator; got {reduction!r}")
        self.shape, self.kind, self.reduction = shape, kind, reduction
        self.axis = None
        pixels = shape
        if kind == "softmax":
            if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) \
                    or not -len(shape) <= axis < len(shape):
                raise FastSCEValueError(
                    f"`axis` must be an integer in [{-len(shape)}, {len(shape) - 1}] for "
                    f"shape={shape}; got {axis!r}")
            self.axis = int(axis) % len(shape)
            pixels = shape[:self.axis] + shape[self.axis + 1:]
        elif class_weights is not None:
            raise FastSCEValueError("`class_weights` applies to kind='softmax'")
        self.grouping = Grouping(pixels, reduce_axes, tile_shape, reduction)
        _api._scalars(label_smoothing, divergence, from_logits, check, grad_scale)
        if out is not None:
            if not isinstance(out, np.ndarray) or out.shape != shape:
                raise FastSCEValueError(
                    f"`out` must be an array of the map's shape {shape}; got "
                    f"{getattr(out, 'shape', type(out).__name__)}")
            if not out.flags.writeable:
                raise FastSCEValueError("`out` must be writeable; got a read-only array")
            _api.check_aligned("out", out)
        self.out = out
        self.options = dict(
            grad=out is not None, grad_scale=grad_scale, label_smoothing=label_smoothing,
            divergence=divergence, from_logits=from_logits, target_scale=target_scale,
            ignore_value=ignore_value, check=check, backend=backend, num_threads=num_threads,
            reduction=reduction, reduce_axes=None, tile_shape=None, loss_out=None)
        if kind == "softmax":
            self.options.update(axis=self.axis, class_weights=class_weights)
        self.sums = GroupSums(math.prod(self.grouping.result_shape))
        self.boxes = np.zeros((0, 2, len(shape)), np.int64)

    def add(self, logits, targets, index=None, *, weight=None, mask=None, pos_weight=None):
        """Add one chunk: `logits[...]` is the map's `index` (a tuple of slices,
        missing trailing axes meaning whole axes; None: the whole map).

        `targets`, `weight`, `mask` (and the sigmoid's `pos_weight`) are the
        chunk's, broadcastable to it as in the loss functions. Chunks must not
        overlap. Writes the chunk's gradient into `out[index]` if `out` was given.
        """
        x = np.asarray(logits)
        box = self._box(index, x.shape)
        masked = mask is not None or self.options["ignore_value"] is not None
        if self.out is not None and self.reduction == "mean" and masked:
            raise FastSCEValueError(
                "a 'mean' gradient written chunk by chunk needs each group's count before "
                "its first chunk; with `mask` or `ignore_value` use reduction='sum' (and "
                "divide by the counts) or evaluate the counts first")
        start = box[0]
        origin = tuple(start) if self.axis is None else \
            tuple(np.delete(start, self.axis))
        chunk = _api.Chunk(self.grouping, origin, self.sums)
        region = tuple(slice(a, b) for a, b in box.T)
        out = None if self.out is None else self.out[region]
        if pos_weight is not None and self.kind != "sigmoid":
            raise FastSCEValueError("`pos_weight` applies to kind='sigmoid'")
        extra = {} if self.kind != "sigmoid" else {"pos_weight": pos_weight}
        work = _api._sigmoid if self.kind == "sigmoid" else _api._softmax
        try:
            work(x, targets, weight=weight, mask=mask, out=out, chunk=chunk, **extra,
                 **self.options, fresh_out=True)
        except TargetRangeError as err:
            if out is None:
                raise
            # Only this chunk's part of `out` is filled; its sums were not added.
            shown = ", ".join(f"{s.start}:{s.stop}" for s in region)
            _api._poison(err, ((f"`out[{shown}]` (this chunk's part)", out, out),),
                         "; the chunk was not added")
        self.boxes = np.concatenate([self.boxes, box[None]])

    def merge(self, other):
        """Add the chunks that `other`, an Accumulator of the same map and options,
        collected (in another thread or process), as if they had been added here.

        Gradients stay where each Accumulator wrote them (one memmap given to
        every Accumulator as `out` gathers them).
        """
        mine, theirs = self._identity(), getattr(other, "_identity", lambda: None)()
        if theirs != mine:
            raise FastSCEValueError(
                "`other` must be an Accumulator of the same map and options; got "
                f"{theirs} for {mine}")
        for box in other.boxes:
            self._check_overlap(box)
        self.sums.merge(other.sums)
        self.boxes = np.concatenate([self.boxes, other.boxes])

    def _identity(self):
        """What two Accumulators must share to be merged."""
        options = dict(self.options, grad=None)  # `out` may differ
        if options.get("class_weights") is not None:
            options["class_weights"] = tuple(np.asarray(options["class_weights"]).tolist())
        return dict(options, kind=self.kind, shape=self.shape, groups=self.grouping.axes,
                    tiles=self.grouping.tile)

    def result(self):
        """LossResult(loss, out) of the whole map, as one call would return it.

        Raises if some of the map was never added.
        """
        volumes = np.prod(self.boxes[:, 1] - self.boxes[:, 0], axis=1)
        covered, total = int(volumes.sum()), math.prod(self.shape)
        if covered != total:
            raise FastSCEValueError(
                f"chunks cover {covered:,} of the map's {total:,} elements; add the "
                "missing chunks before result()")
        loss, _ = _api.reduced(_api.Chunk(self.grouping, None, self.sums), self.reduction)
        return _api.LossResult(loss, self.out)

    def _box(self, index, chunk_shape):
        """[start, stop) per axis of the map for `index`; checks shape and overlap."""
        if index is None:
            index = ()
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > len(self.shape) or not all(isinstance(s, slice) for s in index):
            raise FastSCETypeError(
                f"`index` must be a tuple of at most {len(self.shape)} slices of the map; "
                f"got {index!r}")
        index = index + (slice(None),) * (len(self.shape) - len(index))
        bounds = [s.indices(n) for s, n in zip(index, self.shape)]
        if any(step != 1 for _, _, step in bounds):
            raise FastSCEValueError(f"`index` slices must have step 1; got {index!r}")
        box = np.array([[a for a, _, _ in bounds], [max(a, b) for a, b, _ in bounds]],
                       np.int64)
        extent = tuple(int(n) for n in box[1] - box[0])
        if extent != tuple(chunk_shape):
            raise FastSCEValueError(
                f"`logits` must have the shape of map[index], {extent}; got "
                f"logits.shape={tuple(chunk_shape)}")
        if self.axis is not None and extent[self.axis] != self.shape[self.axis]:
            raise FastSCEValueError(
                f"a softmax chunk must hold every class (axis {self.axis}); got "
                f"{extent[self.axis]} of {self.shape[self.axis]}")
        self._check_overlap(box)
        return box

    def _check_overlap(self, box):
        if np.prod(box[1] - box[0]) and len(self.boxes):
            hit = np.all((np.maximum(self.boxes[:, 0], box[0]) <
                          np.minimum(self.boxes[:, 1], box[1])), axis=1)
            if hit.any():
                prev = self.boxes[np.argmax(hit)]
                raise FastSCEValueError(
                    f"chunk {_slices(box)} overlaps the chunk added as {_slices(prev)}")


def _slices(box):
    return "[" + ", ".join(f"{a}:{b}" for a, b in box.T) + "]"
