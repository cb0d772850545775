"""Cross-entropy of dask arrays on fastsce's fused kernels (``pip install "fastsce[dask]"``).

:func:`sigmoid_cross_entropy` and :func:`softmax_cross_entropy` take a dask
array of logits and the keywords of the NumPy functions, except the buffers
``out`` and ``loss_out``, and return a :class:`fastsce.LossResult` of lazy
arrays: the loss (0-d; one per group with ``reduce_axes`` / ``tile_shape``;
the loss map for "none") and the gradient, chunked as the logits.
:func:`evaluate` is :func:`fastsce.evaluate` as a ``dask.delayed`` object.

How it works, and what it guarantees:

* One task per chunk runs the fused kernel on the chunk as a chunk of the
  whole map (`_api.Chunk`, as the Accumulator does: groups and tiles are the
  map's, a target error gives the map index). It returns the chunk's
  gradient and its per-block float64 partial sums and valid counts. One task
  merges the partials of all chunks, in block-index order, and sums each
  group's with math.fsum (`_partials.GroupSums`), which rounds their exact sum
  once: the loss does not depend on the scheduler, the number of workers or
  the order in which chunks finish. It is bitwise the NumPy call's when chunk
  edges fall on the block edges of that call's walk (every chunk a run of
  whole ``fastsce.BLOCK``-element blocks of the C-order map, e.g. chunks of
  whole rows holding a multiple of BLOCK elements); otherwise only the
  rounding of the block sums differs (~1e-15 relative).
* The gradient is the NumPy call's, bitwise: the same element-wise kernel and
  the same factor (``grad_scale``, over the group's valid count for "mean").
  Without a mask or ``ignore_value`` that count is the group's size. With
  one, each "mean" count must be known before any gradient is written: a
  first pass reads only the mask (and the targets, for ``ignore_value``)
  with the count kernel, its per-chunk counts are summed in one task, and
  that task is a dependency of every chunk's fused call (`_api.Chunk.counts`).
  Dask keeps the chunks that both passes read (the mask) in memory between them.
* The loss and the gradient come from the same task per chunk: compute them
  together, ``dask.compute(loss, grad)``, and each chunk is read and run
  once. Computed one after the other, the chunks run twice. With
  ``grad=False`` the tasks make no gradient.
* ``targets``, ``weight``, ``mask``, ``pos_weight`` may be dask arrays,
  NumPy arrays or numbers, broadcastable as in the NumPy functions. They are
  rechunked to the logits' chunks; a broadcast (size-1) axis stays one chunk
  that the kernel broadcasts, never copied to full size. The softmax's hard
  labels, ``weight`` and ``mask`` have the pixel shape: they get a size-1
  class axis so that they chunk like the logits' pixels.
* The softmax needs every class of a pixel in one chunk. A class axis split
  into several chunks is rechunked to one (``rejoin_classes=True``, the
  default: dask's rechunk, which joins the pieces of every pixel block in
  memory) or refused with an error (``rejoin_classes=False``). The gradient
  has the chunks after that rejoin.
* Arguments are checked when the graph is built, by the NumPy function
  itself run on stand-ins of every operand: zero-stride arrays of its dtype,
  of size 1 on every axis but the class axis. Errors name the argument as
  there. Values (targets out of range, negative weights) are checked by each
  chunk's call when it runs; the message gives the map index and counts that
  chunk's bad values only.
* ``backend`` is resolved when the graph is built (worker processes do not
  see a ``use_backend`` context). ``num_threads`` is per chunk and defaults
  to 1: dask's workers are the parallelism.
"""
try:
    import dask.array as da
except ImportError as exc:  # the extra is optional: say how to get it
    raise ImportError(
        'fastsce.dask needs dask; install it with: pip install "fastsce[dask]"'
    ) from exc

import math
import operator
from dataclasses import dataclass, replace

import numpy as np

from . import _api, _backends, _layout
from ._errors import FastSCETypeError, FastSCEValueError
from ._evaluate import EvaluationStream, evaluate as _evaluate
from ._groups import Grouping
from ._partials import GroupSums

__all__ = ["evaluate", "sigmoid_cross_entropy", "softmax_cross_entropy"]

#: The array keywords of each NumPy function (all of them must be passed).
_OPERANDS = {"sigmoid": ("targets", "weight", "mask", "pos_weight"),
             "softmax": ("targets", "weight", "mask")}


def sigmoid_cross_entropy(
    logits, targets, *, weight=None, mask=None, pos_weight=None, label_smoothing=0.0,
    divergence=False, from_logits=True, target_scale=None, ignore_value=None,
    reduction="mean", reduce_axes=None, tile_shape=None, grad=True, grad_scale=1.0,
    check=True, backend=None, num_threads=1,
):
    """:func:`fastsce.sigmoid_cross_entropy` of a dask array, lazily.

    Parameters
    ----------
    logits : dask array of float16, float32 or float64
        Any chunks (of known sizes).
    targets, weight, mask, pos_weight : dask arrays, ndarrays or numbers
        Broadcastable to ``logits`` as in :func:`fastsce.sigmoid_cross_entropy`;
        rechunked to the logits' chunks.
    label_smoothing, divergence, from_logits, target_scale, ignore_value, reduction,
    reduce_axes, tile_shape, grad, grad_scale, check, backend
        As in :func:`fastsce.sigmoid_cross_entropy`; ``backend`` is resolved now.
    num_threads : int
        Threads of each chunk's call (default 1: the scheduler runs chunks in parallel).

    Returns
    -------
    LossResult of dask arrays
        ``loss``: float64, 0-d for a full "mean"/"sum", one per group with
        ``reduce_axes`` / ``tile_shape`` (one chunk), or the loss map of
        "none" (chunked as the logits). ``grad``: of the logits' shape and
        chunks, or None with ``grad=False``. Compute both with
        ``dask.compute(loss, grad)`` to run each chunk once.
    """
    return _loss("sigmoid", logits, None, dict(
        targets=targets, weight=weight, mask=mask, pos_weight=pos_weight), dict(
        label_smoothing=label_smoothing, divergence=divergence, from_logits=from_logits,
        target_scale=target_scale, ignore_value=ignore_value, reduction=reduction,
        reduce_axes=reduce_axes, tile_shape=tile_shape, grad_scale=grad_scale, check=check,
        backend=backend, num_threads=num_threads), grad, rejoin_classes=True)


def softmax_cross_entropy(
    logits, targets, *, axis=1, class_weights=None, weight=None, mask=None,
    ignore_value=None, label_smoothing=0.0, divergence=False, from_logits=True,
    target_scale=None, reduction="mean", reduce_axes=None, tile_shape=None, grad=True,
    grad_scale=1.0, check=True, backend=None, num_threads=1, rejoin_classes=True,
):
    """:func:`fastsce.softmax_cross_entropy` of a dask array, lazily.

    Parameters
    ----------
    logits : dask array of float16, float32 or float64, shape (..., C, ...)
        Classes along ``axis``.
    targets : dask array or ndarray
        Soft targets of the logits' shape, or integer class indices of the
        pixel shape (the logits' without ``axis``); rechunked to the logits' chunks.
    weight, mask : dask arrays, ndarrays or numbers broadcastable to the pixel shape
    class_weights : array of shape (C,), optional
    axis, ignore_value, label_smoothing, divergence, from_logits, target_scale,
    reduction, reduce_axes, tile_shape, grad, grad_scale, check, backend, num_threads
        As in :func:`sigmoid_cross_entropy` and :func:`fastsce.softmax_cross_entropy`.
    rejoin_classes : bool
        If the class axis of ``logits`` is split into several chunks: True
        rechunks it to one chunk, False raises an error.

    Returns
    -------
    LossResult of dask arrays
        As :func:`sigmoid_cross_entropy`; the loss map of "none" has the pixel
        shape, the gradient the logits' chunks (with the class axis rejoined).
    """
    return _loss("softmax", logits, axis, dict(targets=targets, weight=weight, mask=mask), dict(
        class_weights=class_weights, ignore_value=ignore_value,
        label_smoothing=label_smoothing, divergence=divergence, from_logits=from_logits,
        target_scale=target_scale, reduction=reduction, reduce_axes=reduce_axes,
        tile_shape=tile_shape, grad_scale=grad_scale, check=check, backend=backend,
        num_threads=num_threads), grad, rejoin_classes)


def evaluate(logits, targets, *, loss="sigmoid", axis=1, tile_shape=None, mask=None,
             weight=None, class_weights=None, pos_weight=None, label_smoothing=0.0,
             from_logits=True, target_scale=None, ignore_value=None, check=True,
             backend=None, num_threads=1, rejoin_classes=True):
    """:func:`fastsce.evaluate` of dask arrays: per-image (per-tile) scores, lazily.

    Takes the arguments of :func:`fastsce.evaluate` (operands as in
    :func:`sigmoid_cross_entropy`), except ``per_class``, which this
    function does not offer; ``num_threads`` and ``rejoin_classes`` as in
    :func:`softmax_cross_entropy`. Each chunk runs the passes of
    ``fastsce.evaluate`` (an EvaluationStream of the whole map fed that
    chunk); one task merges them in block-index order.

    Returns
    -------
    dask.delayed.Delayed
        ``.compute()`` gives the :class:`fastsce.Evaluation` of the whole map,
        within 1e-12 relative of ``fastsce.evaluate`` on it (bitwise when chunk
        edges fall on block edges).
    """
    if loss not in ("sigmoid", "softmax"):
        raise FastSCEValueError(f"`loss` must be 'sigmoid' or 'softmax'; got {loss!r}")
    if loss == "softmax" and pos_weight is not None:
        raise FastSCEValueError("`pos_weight` applies to loss='sigmoid'; use `class_weights=`")
    x, class_axis, ops, arrays = _inputs(loss, logits, axis, dict(
        targets=targets, mask=mask, weight=weight, pos_weight=pos_weight), rejoin_classes)
    options = dict(label_smoothing=label_smoothing, from_logits=from_logits,
                   target_scale=target_scale, ignore_value=ignore_value, check=check,
                   backend=_backends.resolve_name(backend, loss), num_threads=num_threads)
    if class_weights is not None:
        class_weights = np.asarray(class_weights)
        options["class_weights"] = class_weights
    # The NumPy evaluate on stand-ins checks every argument, with its messages.
    stand_in, blocks = ops.stand_ins(x, arrays)
    index = _evaluate(stand_in, **ops.of(blocks, all_keywords=False), loss=loss, axis=axis,
                      tile_shape=tile_shape, **options).index
    stream = _Stream(loss, x.shape, class_axis, tile_shape, ops, options, index)
    per_chunk = da.map_blocks(_chunk_evaluation, x, *arrays, stream=stream,
                              chunks=_unit_chunks(x), dtype=object, meta=_objects(x.ndim))
    result = _merge(per_chunk, _merged_evaluation, (), object, stream=stream)
    return result.to_delayed().item()


def _loss(kind, logits, axis, given, options, grad, rejoin_classes):
    """The lazy LossResult of one of the loss functions."""
    want_grad = _api._flag("grad", grad)
    x, class_axis, ops, arrays = _inputs(kind, logits, axis, given, rejoin_classes)
    if class_axis is not None:
        options["axis"] = class_axis
    options["backend"] = _backends.resolve_name(options["backend"], kind)
    plan = _Plan(kind, ops, options, _pixels(x.shape, class_axis))
    # The NumPy function on stand-ins checks every argument, with its messages,
    # and gives the dtypes of the gradient and the loss map.
    stand_in, blocks = ops.stand_ins(x, arrays)
    (meta_loss, meta_grad), _ = plan.call(stand_in, blocks, grad=want_grad)
    grouping = plan.grouping()
    reduction = options["reduction"]
    masked = "mask" in ops.names or options["ignore_value"] is not None
    if want_grad and reduction == "mean" and masked:
        arrays = arrays + [_counts(x, ops, arrays, plan)]
    fused = da.map_blocks(_chunk_loss, x, *arrays, plan=plan, want_grad=want_grad,
                          map_dtype=None if reduction != "none" else meta_loss.dtype,
                          grad_dtype=None if meta_grad is None else meta_grad.dtype,
                          dtype=object, meta=_objects(x.ndim))
    gradient = None
    if want_grad:
        gradient = fused.map_blocks(operator.getitem, 1, dtype=meta_grad.dtype,
                                    meta=np.empty((0,) * x.ndim, meta_grad.dtype))
    if reduction == "none":
        # The softmax's map blocks keep a size-1 class axis (map_blocks cannot
        # drop an axis of blocks that are not arrays); it goes by indexing.
        chunks = [(1,) if d == class_axis else c for d, c in enumerate(x.chunks)]
        loss = fused.map_blocks(operator.getitem, 2, dtype=meta_loss.dtype, chunks=chunks,
                                meta=np.empty((0,) * x.ndim, meta_loss.dtype))
        if class_axis is not None:
            loss = loss[(slice(None),) * class_axis + (0,)]
    else:
        sums = fused.map_blocks(operator.getitem, 0, chunks=_unit_chunks(x), dtype=object,
                                meta=_objects(x.ndim))
        loss = _merge(sums, _merged_loss, grouping.result_shape, np.float64, plan=plan)
    return _api.LossResult(loss, gradient)


def _counts(x, ops, arrays, plan):
    """The map's valid count per group (a 0-d object array holding them): the
    count kernel on every chunk, then one task that sums them."""
    # The count kernel reads the mask, and the targets only for ignore_value:
    # the other operands (and the logits) are zero-stride stand-ins, so dask
    # makes no chunk of them, nor keeps it in memory until the fused pass.
    read = {"mask"} | ({"targets"} if plan.options["ignore_value"] is not None else set())
    counting = [a if name in read else _zeros_like(a) for name, a in zip(ops.names, arrays)]
    counted = da.map_blocks(_chunk_counts, _zeros_like(x), *counting, plan=plan,
                            chunks=_unit_chunks(x), dtype=object, meta=_objects(x.ndim))
    return _merge(counted, _merged_counts, (), object, plan=plan)


def _inputs(kind, logits, axis, given, rejoin_classes):
    """(logits, class axis or None, _Operands, the operands' dask arrays): the
    logits with whole classes per chunk, the operands on their axes and chunks."""
    x = _dask_logits(logits)
    class_axis = None
    if kind == "softmax":
        class_axis = _api.class_axis(axis, x.shape)
        x = _whole_classes(x, class_axis, rejoin_classes)
    return (x, class_axis) + _align(kind, x, class_axis, given)


def _dask_logits(logits):
    if not isinstance(logits, da.Array):
        raise FastSCETypeError(
            f"`logits` must be a dask array; got {type(logits).__name__} (NumPy arrays go "
            "to fastsce.sigmoid_cross_entropy / softmax_cross_entropy)")
    if any(math.isnan(n) for sizes in logits.chunks for n in sizes):
        raise FastSCEValueError(
            "`logits` has chunks of unknown size; call logits.compute_chunk_sizes() first")
    return logits


def _whole_classes(x, axis, rejoin):
    """The logits with the class axis in one chunk (rechunked, or an error)."""
    rejoin = _api._flag("rejoin_classes", rejoin)
    if len(x.chunks[axis]) <= 1:
        return x
    if not rejoin:
        raise FastSCEValueError(
            f"`logits` has its class axis {axis} split into {len(x.chunks[axis])} chunks "
            f"{x.chunks[axis]}; the softmax needs every class of a pixel in one chunk. "
            f"Rechunk it, logits.rechunk({{{axis}: -1}}), or pass rejoin_classes=True")
    return x.rechunk({axis: -1})


def _pixels(shape, axis):
    return tuple(shape) if axis is None else tuple(shape[:axis]) + tuple(shape[axis + 1:])


def _align(kind, x, axis, given):
    """The given operands as dask arrays on the logits' axes and chunks:
    (_Operands, their arrays in _Operands.names order)."""
    names, on_pixels, arrays = [], [], []
    targets = given["targets"]
    if not isinstance(targets, da.Array):
        targets = np.asarray(targets)
    hard = axis is not None and _api.hard_labels(targets, x.shape)
    given = dict(given, targets=targets)
    for name, value in given.items():
        if value is None:
            continue
        pixelwise = axis is not None and (name != "targets" or hard)
        names.append(name)
        if pixelwise:
            on_pixels.append(name)
        arrays.append(_aligned(name, value, x, axis if pixelwise else None))
    return _Operands(kind, tuple(names), tuple(on_pixels), axis), arrays


def _aligned(name, value, x, insert_axis):
    """`value` as a dask array with the logits' axes (a size-1 class axis inserted
    at `insert_axis` if it has the pixel shape), chunked as the logits where it
    is not broadcast."""
    a = value if isinstance(value, da.Array) else np.asarray(value)
    shape, what = x.shape, "the shape of `logits`"
    if insert_axis is not None:
        shape = _pixels(x.shape, insert_axis)
        what = "the pixel shape of `logits` (without the class axis)"
    _layout.broadcast_operand(name, a, shape, what)
    a = a[(None,) * (len(shape) - a.ndim) + (Ellipsis,)]
    if insert_axis is not None:
        a = a[(slice(None),) * insert_axis + (None, Ellipsis)]
    chunks = tuple(c if n == m else (n,) for n, m, c in zip(a.shape, x.shape, x.chunks))
    return a.rechunk(chunks) if isinstance(a, da.Array) else da.from_array(a, chunks=chunks)


@dataclass(frozen=True)
class _Operands:
    """Which operands come with each chunk, and how their blocks become the
    NumPy function's arguments."""

    kind: str
    names: tuple       # the operands given, in the order their blocks come
    on_pixels: tuple   # those of the pixel shape (a size-1 class axis was inserted)
    axis: object       # the softmax's class axis; None for the sigmoid

    def of(self, blocks, all_keywords=True):
        """Keyword arguments of the NumPy function (every one it requires if
        `all_keywords`) from the blocks, in their own shapes."""
        ops = dict.fromkeys(_OPERANDS[self.kind]) if all_keywords else {}
        for name, b in zip(self.names, blocks):
            ops[name] = np.squeeze(b, self.axis) if name in self.on_pixels else b
        return ops

    def stand_ins(self, x, arrays):
        """Zero-stride stand-ins of the logits and operands, of size 1 on every
        axis but the class axis: what the NumPy function checks, with no data."""
        def stand_in(a):
            shape = tuple(n if d == self.axis else 1 for d, n in enumerate(a.shape))
            return np.broadcast_to(np.zeros((), a.dtype), shape)

        return stand_in(x), [stand_in(a) for a in arrays]

    def origin(self, block_info):
        """(First index of the chunk in the map, the same in the pixel shape)."""
        start = tuple(a for a, _ in block_info[0]["array-location"])
        return start, _pixels(start, self.axis)


@dataclass(frozen=True)
class _Plan:
    """The NumPy function and its keywords, the same for every chunk."""

    kind: str
    operands: _Operands
    options: dict      # every other keyword but grad, out, loss_out
    pixels: tuple      # the map's pixel shape

    def grouping(self):
        o = self.options
        return Grouping(self.pixels, o["reduce_axes"], o["tile_shape"], o["reduction"])

    def call(self, x, blocks, **keywords):
        """The NumPy function (its internal form, which takes a chunk) on blocks."""
        function = _api._sigmoid if self.kind == "sigmoid" else _api._softmax
        ops = self.operands.of(blocks)
        keywords = {"out": None, "loss_out": None, **keywords}
        return function(x, ops.pop("targets"), **ops, **self.options, **keywords)

    def chunk(self, block_info, **fields):
        """The Chunk of the map that this block is, with fresh sums."""
        grouping = self.grouping()
        return _api.Chunk(grouping, self.operands.origin(block_info)[1],
                          GroupSums(math.prod(grouping.result_shape)), **fields)


def _chunk_loss(x, *blocks, plan, want_grad, map_dtype, grad_dtype, block_info=None):
    """One chunk's fused call: (its GroupSums, its gradient, its loss map)."""
    n = len(plan.operands.names)
    counts = blocks[n] if len(blocks) > n else None
    pixels = _pixels(x.shape, plan.operands.axis)
    chunk = plan.chunk(block_info, counts=counts)
    grad = np.empty(x.shape, grad_dtype) if want_grad else None
    loss_map = None if map_dtype is None else np.empty(pixels, map_dtype)
    # (fresh buffers no caller sees if the call fails)
    plan.call(x, blocks[:n], grad=want_grad, out=grad, loss_out=loss_map, chunk=chunk,
              fresh_out=True)
    if loss_map is not None and plan.operands.axis is not None:
        loss_map = np.expand_dims(loss_map, plan.operands.axis)
    return chunk.sums, grad, loss_map


def _chunk_counts(zeros, *blocks, plan, block_info=None):
    """One chunk's valid counts per group (its targets and mask only)."""
    chunk = plan.chunk(block_info, count_only=True)
    plan.call(zeros, blocks, grad=False, chunk=chunk)
    return chunk.sums


def _merged_counts(nested, plan):
    """The map's valid count per group, from every chunk's counts."""
    grouping = plan.grouping()
    return _merged_sums(nested, grouping).totals()[1].reshape(grouping.result_shape)


def _merged_loss(nested, plan):
    """The map's loss (float64, of the result shape), from every chunk's partials."""
    grouping = plan.grouping()
    loss, _ = _api.reduced(_api.Chunk(grouping, None, _merged_sums(nested, grouping)),
                           plan.options["reduction"])
    return loss if grouping.grouped else np.float64(loss)  # as dask's own reductions


def _merged_sums(nested, grouping):
    sums = GroupSums(math.prod(grouping.result_shape))
    for part in _leaves(nested):
        sums.merge(part)
    return sums


@dataclass(frozen=True)
class _Stream:
    """How each chunk makes the EvaluationStream of the whole map."""

    loss: str
    shape: tuple
    axis: object
    tile_shape: object
    operands: _Operands
    options: dict
    index: tuple       # the axis names fastsce.evaluate gives

    def new(self):
        # (The sigmoid's stream ignores its axis: it has no per-class rows.)
        return EvaluationStream(self.shape, loss=self.loss, axis=self.axis or 0,
                                tile_shape=self.tile_shape,
                                with_pos_weight="pos_weight" in self.operands.names,
                                **self.options)


def _chunk_evaluation(x, *blocks, stream, block_info=None):
    """One chunk's EvaluationStream: the whole map's, fed this chunk."""
    start, _ = stream.operands.origin(block_info)
    index = tuple(slice(a, a + n) for a, n in zip(start, x.shape))
    ops = stream.operands.of(blocks, all_keywords=False)
    s = stream.new()
    s.add(x, ops.pop("targets"), index, **ops)
    return s


def _merged_evaluation(nested, stream):
    """The Evaluation of the whole map, from every chunk's stream."""
    total = stream.new()
    for part in _leaves(nested):
        total.merge(part)
    return replace(total.result(), index=stream.index)


def _merge(per_chunk, function, shape, dtype, **kwargs):
    """One task: `function` of every chunk's result (nested lists in block-index
    order) and kwargs, giving an array of `shape` and `dtype` (one chunk; an
    object array holds any one object as its block)."""
    inner = tuple(f"c{d}" for d in range(per_chunk.ndim))
    outer = tuple(f"g{d}" for d in range(len(shape)))
    return da.blockwise(function, outer, per_chunk, inner, concatenate=False,
                        new_axes=dict(zip(outer, shape)), dtype=dtype,
                        meta=np.empty((0,) * len(shape), dtype), **kwargs)


def _leaves(nested):
    if isinstance(nested, list):
        for item in nested:
            yield from _leaves(item)
    else:
        yield nested


def _zeros_like(a):
    """Zeros of `a`'s shape, chunks and dtype: zero-stride blocks, no data."""
    return da.zeros(a.shape, chunks=a.chunks, dtype=a.dtype)


def _unit_chunks(x):
    """One element per chunk of `x`: a task's small result per chunk."""
    return tuple((1,) * len(sizes) for sizes in x.chunks)


def _objects(ndim):
    return np.empty((0,) * ndim, object)
