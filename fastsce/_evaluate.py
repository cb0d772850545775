"""`fastsce.evaluate`: per-image (per-class, per-tile) scores of a stack of
predictions against soft targets, as a small report object.

Loss-only fused passes give the scores: cross-entropy and KL divergence of
the logits, and the same pair for a constant prediction (a zero-stride
float64 view, so it is computed in float64 and costs no memory), whose
difference is the target's entropy, independent of the logits (a NaN logit
does not make it NaN). A last pass counts non-finite logits, a bounded chunk
at a time. None of them makes a full-size temporary. `EvaluationStream`
makes the same passes over a map fed chunk by chunk (an Accumulator per
pass), for maps larger than memory.
"""
import csv
import math
from dataclasses import dataclass

import numpy as np

from . import _api
from ._accumulator import Accumulator
from ._errors import FastSCEValueError
from ._groups import Grouping

_SCORES = ("cross_entropy", "kl_divergence", "target_entropy", "valid", "nonfinite")
#: Elements per chunk of the non-finite count (a bool temporary of this size).
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Evaluation:
    """Scores per group (image, class, tile); every array has the shape `shape`.

    cross_entropy, kl_divergence, target_entropy : float64 arrays
        Means over the group's valid (unmasked) elements (binary) or pixels
        (softmax), weighted as the losses are; NaN for a group without any.
    valid : int64 array
        Count of valid elements / pixels.
    nonfinite : int64 array
        Count of NaN or infinite logits in the group (softmax: logit values,
        all classes of the group's pixels).
    index : tuple of str
        Name of each axis of `shape` ("image", "class", "tile_row", ...).
    """

    index: tuple
    cross_entropy: np.ndarray
    kl_divergence: np.ndarray
    target_entropy: np.ndarray
    valid: np.ndarray
    nonfinite: np.ndarray

    @property
    def shape(self):
        return self.valid.shape

    def as_dict(self):
        """Columns as 1-D arrays, groups in C order: the index columns, then the scores.

        ``pandas.DataFrame(ev.as_dict())`` makes a table of it.
        """
        grids = np.indices(self.shape).reshape(len(self.shape), -1)
        columns = dict(zip(self.index, grids))
        columns.update((name, getattr(self, name).ravel()) for name in _SCORES)
        return columns

    def rows(self):
        """CSV rows: a header, then one row of Python numbers per group."""
        columns = self.as_dict()
        yield list(columns)
        values = [c.tolist() for c in columns.values()]
        yield from (list(row) for row in zip(*values))

    def to_csv(self, file):
        """Write the rows to a path or an open text file."""
        if hasattr(file, "write"):
            csv.writer(file).writerows(self.rows())
            return
        with open(file, "w", newline="") as f:
            csv.writer(f).writerows(self.rows())


def evaluate(logits, targets, *, loss="sigmoid", axis=1, per_class=False, tile_shape=None,
             mask=None, weight=None, class_weights=None, pos_weight=None,
             label_smoothing=0.0, from_logits=True, target_scale=None, ignore_value=None,
             check=True, backend=None, num_threads=None):
    """Scores of a stack of predictions: one row per image (class, tile).

    Parameters
    ----------
    logits, targets : ndarrays, the first axis indexing images
        As :func:`sigmoid_cross_entropy` (``loss="sigmoid"``) or
        :func:`softmax_cross_entropy` (``loss="softmax"``, classes along ``axis``).
    loss : {"sigmoid", "softmax"}
    axis : int
        The class axis: the softmax's, or the channel axis of a multi-label
        sigmoid map (used by ``per_class``). Not 0 (the image axis).
    per_class : bool
        One row per image and class. Softmax: the class's terms
        ``w_k z_k log(z_k / q_k)`` of the per-pixel sum, one extra pair of
        passes per class.
    tile_shape : (int, int), optional
        One row per tile of the last two axes, every other axis kept (for an
        (N, C, H, W) sigmoid map: per image, channel and tile).
    mask, weight, class_weights, pos_weight, label_smoothing, from_logits,
    target_scale, ignore_value, check, backend, num_threads
        As in the loss functions. With ``pos_weight`` (sigmoid only) the
        cross-entropy is the re-weighted one and the KL divergence, not
        defined for it, is NaN; the target entropy does not depend on it.

    Returns
    -------
    Evaluation
        cross_entropy, kl_divergence, target_entropy (means per valid element
        or pixel), valid and nonfinite counts, each of the group shape;
        ``as_dict()`` and ``rows()`` / ``to_csv()`` for reports.
    """
    if loss not in ("sigmoid", "softmax"):
        raise FastSCEValueError(f"`loss` must be 'sigmoid' or 'softmax'; got {loss!r}")
    if loss == "softmax" and pos_weight is not None:
        raise FastSCEValueError("`pos_weight` applies to loss='sigmoid'; use `class_weights=`")
    x = np.asarray(logits)
    if x.ndim < 2:
        raise FastSCEValueError(
            f"`logits` must be a stack (images along axis 0) of at least 2-d; got shape {x.shape}")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) \
            or not -x.ndim <= axis < x.ndim or axis % x.ndim == 0:
        raise FastSCEValueError(
            f"`axis` must name a class axis other than the image axis 0, in [1, {x.ndim - 1}] "
            f"or [{-x.ndim + 1}, -1]; got {axis!r}")
    axis = int(axis) % x.ndim
    per_class = _api._flag("per_class", per_class)
    common = dict(weight=weight, mask=mask, label_smoothing=label_smoothing,
                  from_logits=from_logits, target_scale=target_scale, ignore_value=ignore_value,
                  grad=False, grad_scale=1.0, out=None, loss_out=None, check=check,
                  backend=backend, num_threads=num_threads, reduction="sum")
    names = ["image"] + ["class" if d == axis else f"axis{d}" for d in range(1, x.ndim)]
    if loss == "sigmoid":
        if class_weights is not None:
            raise FastSCEValueError("`class_weights` applies to loss='softmax'; use `weight=`")
        keep = {0, axis} if per_class else {0}
        grouping = _grouping(x.shape, keep, tile_shape)
        run = _runner(_api._sigmoid, x, targets, grouping, dict(common, pos_weight=None),
                      pos_weight)
        scores = run()
        nonfinite = _nonfinite(x, grouping)
        index = _names(names, keep, tile_shape)
    else:
        pixels = x.shape[:axis] + x.shape[axis + 1:]
        pixel_names = names[:axis] + names[axis + 1:]
        grouping = _grouping(pixels, {0}, tile_shape)
        kwargs = dict(common, axis=axis, class_weights=class_weights)
        run = _runner(_api._softmax, x, targets, grouping, kwargs)
        index = _names(pixel_names, {0}, tile_shape)
        if not per_class:
            scores = run()
            nonfinite = _nonfinite(np.moveaxis(x, axis, -1), grouping)
        else:
            C = x.shape[axis]
            base = np.ones(C) if class_weights is None else np.asarray(class_weights, np.float64)
            per = [run(class_weights=np.where(np.arange(C) == k, base, 0.0)) for k in range(C)]
            scores = [np.stack(s, axis=1) for s in zip(*per)]
            nonfinite = np.stack([_nonfinite(np.take(x, k, axis=axis), grouping)
                                  for k in range(C)], axis=1)
            index = index[:1] + ("class",) + index[1:]
    return _evaluation(index, *scores, nonfinite)


def _evaluation(index, ce, kl, entropy, valid, nonfinite):
    """The Evaluation of per-group sums: means over each group's valid count."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = [np.where(valid > 0, s / np.maximum(valid, 1), np.nan) for s in (ce, kl, entropy)]
    return Evaluation(tuple(index), *means, valid, nonfinite)


def _grouping(shape, keep, tile_shape):
    if tile_shape is not None:
        return Grouping(shape, tile_shape=tile_shape, reduction="sum")
    return Grouping(shape, reduce_axes=tuple(d for d in range(len(shape)) if d not in keep),
                    reduction="sum")


def _names(names, keep, tile_shape):
    if tile_shape is not None:
        return tuple(names[:-2]) + ("tile_row", "tile_col")
    return tuple(n for d, n in enumerate(names) if d in keep)


def _flat(x, from_logits):
    """A constant prediction of x's shape: it has CE - KL = the target's entropy."""
    return np.broadcast_to(np.float64(0.0 if from_logits else 0.5), np.shape(x))


def _runner(fn, x, targets, grouping, kwargs, pos_weight=None):
    """A function giving (cross-entropy, KL, target entropy) sums and valid counts per group."""
    options = dict(reduce_axes=grouping.axes, tile_shape=grouping.tile)
    flat = _flat(x, kwargs["from_logits"])

    def run(**extra):
        args = dict(kwargs, **options, **extra)
        if pos_weight is None:
            ce, count = fn(x, targets, divergence=False, **args)
            kl = fn(x, targets, divergence=True, **args)[0].loss
        else:
            ce, count = fn(x, targets, divergence=False, **dict(args, pos_weight=pos_weight))
            kl = np.full(np.shape(ce.loss), np.nan)
        ce0, _ = fn(flat, targets, divergence=False, **args)
        kl0, _ = fn(flat, targets, divergence=True, **args)
        return ce.loss, kl, ce0.loss - kl0.loss, count

    return run


class EvaluationStream:
    """`evaluate` of a stack of images fed chunk by chunk (a map larger than memory).

    Takes `evaluate`'s arguments, except that the map's ``shape`` replaces the
    arrays, and ``mask``, ``weight`` and ``pos_weight`` come with each chunk
    (``with_pos_weight=True`` says that they will: no KL pass).
    Each pass of `evaluate` is an Accumulator, so `result()` equals
    `evaluate` on the whole map: bitwise when chunk edges fall on block edges
    (see Accumulator), within 1e-12 relative otherwise.
    """

    def __init__(self, shape, *, loss="sigmoid", axis=1, tile_shape=None, with_pos_weight=False,
                 **options):
        shape = tuple(shape)
        self.loss, self.axis = loss, axis % len(shape)
        pixels = shape if loss == "sigmoid" else shape[:self.axis] + shape[self.axis + 1:]
        names = ["image"] + [f"axis{d}" for d in range(1, len(pixels))]
        self.index = _names(names, {0}, tile_shape)
        self.grouping = _grouping(pixels, {0}, tile_shape)
        groups = dict(reduce_axes=self.grouping.axes, tile_shape=self.grouping.tile,
                      reduction="sum", **options)
        if loss == "softmax":
            groups["axis"] = self.axis
        # (prediction is the logits?, divergence) per pass; no KL with a pos_weight.
        passes = [(True, False), (False, False), (False, True)]
        if not with_pos_weight:
            passes.insert(1, (True, True))
        self.passes = {p: Accumulator(loss, shape, divergence=p[1], **groups) for p in passes}
        self.nonfinite = np.zeros(self.grouping.result_shape, np.int64)

    def add(self, logits, targets, index, *, mask=None, weight=None, pos_weight=None):
        """Add the chunk `index` (a tuple of slices of the map) of logits and targets;
        `mask`, `weight` and `pos_weight` are the chunk's, as in Accumulator.add."""
        flat = _flat(logits, self.passes[True, False].options["from_logits"])
        for (own, divergence), acc in self.passes.items():
            extra = dict(pos_weight=pos_weight) if own and self.loss == "sigmoid" else {}
            acc.add(logits if own else flat, targets, index, mask=mask, weight=weight, **extra)
        box = self.passes[True, False].boxes[-1]
        x = np.asarray(logits)
        if self.loss == "softmax":
            x, box = np.moveaxis(x, self.axis, -1), np.delete(box, self.axis, axis=1)
        self.nonfinite += _nonfinite(x, self.grouping, tuple(box[0]))

    def merge(self, other):
        """Add the chunks that `other`, a stream of the same map and options, collected."""
        if not isinstance(other, EvaluationStream) or other.passes.keys() != self.passes.keys():
            raise FastSCEValueError(
                "`other` must be an EvaluationStream of the same map and options; got "
                f"{type(other).__name__}")
        for key, acc in self.passes.items():
            acc.merge(other.passes[key])
        self.nonfinite += other.nonfinite

    def result(self):
        """The Evaluation of the whole map (raises if part of it was never added)."""
        sums = {}
        for key, acc in self.passes.items():
            acc.result()  # checks that the chunks cover the map
            sums[key] = _api.reduced(_api.Chunk(acc.grouping, None, acc.sums), "sum")
        ce, valid = sums[True, False]
        kl = sums[True, True][0] if (True, True) in sums else np.full(ce.shape, np.nan)
        entropy = sums[False, False][0] - sums[False, True][0]
        return _evaluation(self.index, ce, kl, entropy, valid, self.nonfinite)


def _nonfinite(x, grouping, origin=None):
    """Non-finite values per group of `x` (the pixel shape, plus trailing classes),
    a chunk at `origin` of the grouping's map."""
    out = np.zeros(grouping.result_shape, np.int64)
    for part in grouping.parts(x.shape[:grouping.ndim], origin):
        if math.prod(part.shape):
            out[part.dest] += _count_nonfinite(part.view(x), part.groups)
    return out


def _count_nonfinite(v, lead):
    """Non-finite entries of `v` per index of its first `lead` axes.

    Walks `v` in slabs of at most _CHUNK elements (split along the first axis
    that makes them small enough), so the temporary stays small for any layout.
    """
    out = np.zeros(v.shape[:lead], np.int64)

    def visit(prefix):
        sub = v[prefix]
        d = len(prefix)
        if sub.size <= _CHUNK or d == v.ndim:
            out[prefix[:lead]] += np.count_nonzero(~np.isfinite(sub),
                                                   axis=tuple(range(lead, v.ndim)))
            return
        step = max(1, _CHUNK // (sub.size // sub.shape[d]))
        for i in range(0, sub.shape[d], step):
            visit(prefix + (slice(i, i + step),))

    visit(())
    return out
