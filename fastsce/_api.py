"""Public functions: validate once, pick a backend, run, combine.

Everything a kernel trusts is established here: dtypes, shapes, broadcasting,
writability and aliasing of outputs, option ranges. Kernels then take raw
strided operands (see `_layout`) and never re-check.
"""
import inspect
import math
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from . import _backends, _layout, _memory
from ._errors import FastSCETypeError, FastSCEValueError, TargetRangeError, shown
from ._groups import Grouping
from ._partials import GroupSums
from ._threads import resolve_threads

LossResult = namedtuple("LossResult", ["loss", "grad"])
LossResult.__doc__ = """Loss and gradient of one call.

loss : float for a full "sum"/"mean" reduction, else an ndarray (the loss map,
    or one loss per group with ``reduce_axes`` / ``tile_shape``).
grad : ndarray of the input's shape (and dtype), or None with ``grad=False``.
"""

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_INT_TARGETS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_REDUCTIONS = ("none", "sum", "mean")


@dataclass(kw_only=True)
class _Call:
    """What every loss's kernels take. Inputs may be byte-swapped or float16 (the
    kernels convert them block by block, see `_layout`); outputs are native."""

    shape: tuple             # the element (binary) or pixel (softmax) shape
    x: object
    z: np.ndarray
    w: object
    m: object
    from_logits: bool
    divergence: bool
    label_smoothing: float
    scale: float
    ignore_value: object
    check: bool
    threads: int
    grad: object = None      # output buffer (compute dtype) or None
    loss_map: object = None  # output buffer (compute dtype) or None
    group_size: int = 0      # elements (pixels) per group: runs of the C-order walk
    gscale: object = None    # float64[groups]: each group's gradient factor


@dataclass(kw_only=True)
class BinaryCall(_Call):
    pw: object = None


@dataclass(kw_only=True)
class SoftmaxCall(_Call):
    """x, z (soft) and grad have the class axis at `axis`; `shape` lacks it."""

    axis: int
    classes: int
    hard: bool               # z holds int64 class indices of the pixel shape
    cw: object = None


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise FastSCETypeError(f"`{name}` must be True or False; got {shown(value)}")
    return bool(value)


_NOT_REAL = (str, bytes, bool, np.bool_, complex, np.complexfloating)


def _real(name, value, lo=-math.inf, hi=math.inf):
    """A finite float in [lo, hi] from a Python or NumPy scalar."""
    try:
        if type(value) is not float and (isinstance(value, _NOT_REAL) or np.ndim(value) != 0):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise FastSCETypeError(
            f"`{name}` must be a real number; got {shown(value)} of type {type(value).__name__}"
        ) from None
    if not (math.isfinite(v) and lo <= v <= hi):
        within = "" if (lo, hi) == (-math.inf, math.inf) else f" in [{lo:g}, {hi:g}]"
        raise FastSCEValueError(f"`{name}` must be a finite number{within}; got {shown(value)}")
    return v


def _target_scale(value, default):
    """The divisor of the targets: `target_scale` if given (positive, finite), else `default`."""
    if value is None:
        return default
    scale = _real("target_scale", value)
    if scale <= 0:
        raise FastSCEValueError(f"`target_scale` must be positive and finite; got {shown(value)}")
    return scale


def _integer_code(value, dtype, what):
    """`ignore_value` as an int: an integer (TypeError otherwise) in `dtype`'s range."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise FastSCETypeError(
            f"`ignore_value` must be an integer {what}; got {shown(value)} of type "
            f"{type(value).__name__}"
        )
    info = np.iinfo(dtype)
    if not info.min <= int(value) <= info.max:
        raise FastSCEValueError(
            f"`ignore_value` must be an integer {what} of targets.dtype={dtype} (in "
            f"[{info.min}, {info.max}]); got {shown(value)}"
        )
    return int(value)


def _logits(logits):
    x = np.asarray(logits)
    if x.dtype.newbyteorder("=") not in _FLOATS:
        raise FastSCETypeError(
            f"`logits` must be float16, float32 or float64; got dtype {x.dtype}. "
            "Convert with logits.astype(np.float32)."
        )
    # float16 is read as float32 (SPEC §2), block by block, as byte-swapped input is.
    return x, _layout.kernel_dtype(x.dtype)


def _targets(targets, shape):
    t = np.asarray(targets)
    native = t.dtype.newbyteorder("=")
    if native not in _FLOATS and native not in _INT_TARGETS:
        raise FastSCETypeError(
            "`targets` must be float16/32/64 probabilities or uint8/uint16 codes "
            f"(probability times target_scale); got dtype {t.dtype}"
        )
    _layout.broadcast_operand("targets", t, shape)
    return t


def _weight_like(name, value, shape, compute, what="the shape of `logits`"):
    """A non-negative weight array broadcastable to `shape`: in the compute dtype,
    or float16 or byte-swapped (converted by the kernels block by block)."""
    if value is None:
        return None
    a = np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise FastSCETypeError(f"`{name}` must be a real number or array; got dtype {a.dtype}")
    _layout.broadcast_operand(name, a, shape, what)
    if a.dtype.newbyteorder("=") not in (compute, np.dtype(np.float16)):
        a = _memory.converted(name, a, compute,
                              f"Pass `{name}` as {compute} (or float16) to avoid the copy.")
    low = np.min(_layout.compact(a)) if a.size else 0.0
    if not low >= 0:
        raise FastSCEValueError(
            f"`{name}` must be non-negative (and not NaN); got a minimum of {low}"
        )
    return a


def _mask(mask, shape, what="the shape of `logits`"):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise FastSCETypeError(
            f"`mask` must be a boolean array (True = counted); got dtype {m.dtype}. "
            "Pass mask != 0 for a numeric mask."
        )
    _layout.broadcast_operand("mask", m, shape, what)
    return m


def check_aligned(name, buf):
    """An output must be aligned (the kernels store whole elements); inputs
    that are not are read from a copy (`_layout.make_plan`)."""
    if not buf.flags.aligned:
        raise FastSCEValueError(
            f"`{name}` must be aligned to its {buf.dtype.itemsize}-byte items in address and "
            f"strides; got strides {buf.strides} and an address "
            f"{buf.ctypes.data % buf.dtype.itemsize} bytes past an item boundary (np.frombuffer "
            "with an offset, or a structured array's field?). Pass a fresh array."
        )


def _check_output(name, buf, shape, dtypes, inputs, what="the shape of `logits`"):
    if not isinstance(buf, np.ndarray):
        raise FastSCETypeError(f"`{name}` must be a numpy array; got {type(buf).__name__}")
    if buf.shape != tuple(shape):
        raise FastSCEValueError(
            f"`{name}` must have {what} {tuple(shape)}; got {name}.shape={buf.shape}"
        )
    if not buf.dtype.isnative:
        raise FastSCETypeError(
            f"`{name}` must be in native byte order ({buf.dtype.newbyteorder('=').str}); got "
            f"{buf.dtype.str}. Pass a native array and byte-swap the result if needed."
        )
    if buf.dtype not in dtypes:
        raise FastSCETypeError(
            f"`{name}` must have dtype {' or '.join(str(d) for d in dtypes)}; got {buf.dtype}"
        )
    if not buf.flags.writeable:
        raise FastSCEValueError(f"`{name}` must be writeable; got a read-only array")
    check_aligned(name, buf)
    if _self_overlapping(buf):
        raise FastSCEValueError(
            f"`{name}` must have one place in memory per element; got strides "
            f"{buf.strides} for shape {buf.shape} (a zero-stride or as_strided view). "
            "Pass a fresh array."
        )
    for other_name, other in inputs:
        if other is None or not isinstance(other, np.ndarray):
            continue
        if other_name == "logits" and name == "out" and _same_view(buf, other):
            continue  # the in-place gradient SPEC §3 allows
        if _overlaps(buf, other):
            raise FastSCEValueError(
                f"`{name}` overlaps `{other_name}` in memory; pass a separate array"
                + (" (or `out=logits` itself for an in-place gradient)" if name == "out" else "")
            )


def _self_overlapping(a):
    """Whether elements of `a` may share memory: sorted by stride, each axis must
    step past all that the smaller ones span (exotic interleaved layouts that
    never overlap are refused too)."""
    if not a.size:
        return False
    span = a.itemsize
    for n, stride in sorted(((n, abs(s)) for n, s in zip(a.shape, a.strides) if n > 1),
                            key=lambda ns: ns[1]):
        if stride < span:
            return True
        span += (n - 1) * stride
    return False


def _same_view(a, b):
    return a is b or (
        a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _overlaps(a, b):
    try:
        return bool(np.shares_memory(a, b, max_work=10000))
    except np.exceptions.TooHardError:
        return True


def sigmoid_cross_entropy(
    logits, targets, *, weight=None, mask=None, pos_weight=None, label_smoothing=0.0,
    divergence=False, from_logits=True, target_scale=None, ignore_value=None,
    reduction="mean", reduce_axes=None, tile_shape=None, grad=True, grad_scale=1.0, out=None,
    loss_out=None, check=True, backend=None, num_threads=None,
):
    r"""Binary (sigmoid) cross-entropy with soft targets, loss and gradient in one pass.

    Parameters
    ----------
    logits : ndarray of float16, float32 or float64, any shape and layout
        Logits ``x`` (or probabilities ``c`` in [0, 1] with ``from_logits=False``).
        float16 is computed in float32.
    targets : ndarray of float16/32/64, uint8 or uint16, broadcastable to ``logits``
        Soft targets ``z`` in [0, 1]; integer codes mean ``t / target_scale``.
    weight : float or ndarray broadcastable to ``logits``, optional
        Non-negative per-element weight; multiplies loss and gradient.
    mask : bool ndarray broadcastable to ``logits``, optional
        False excludes an element: loss 0, gradient 0, not counted by "mean".
    pos_weight : float or ndarray broadcastable to ``logits``, optional
        Weight ``a`` of the positive term, as PyTorch's ``pos_weight``.
    label_smoothing : float in [0, 1]
        ``z' = z (1 - eps) + eps / 2``.
    divergence : bool
        Return the KL divergence (cross-entropy minus the smoothed target's own
        entropy) so a perfect prediction scores 0; the gradient is unchanged.
        Not defined with ``pos_weight`` != 1.
    from_logits : bool
        False: ``logits`` are probabilities; log is clamped at -100 and the
        gradient's denominator at 1e-12, as PyTorch's ``BCELoss``.
    target_scale : float, optional
        Divisor of the targets: default 255 for uint8, 65535 for uint16, 1 for floats.
    ignore_value : int, optional
        Integer targets equal to this code are excluded, as ``mask=False``.
    reduction : {"mean", "sum", "none"}
        "mean" divides the weighted sum by the count of unmasked elements (NaN,
        with a zero gradient, when there are none); "none" returns the loss map.
    reduce_axes : int or tuple of int, optional
        "sum"/"mean" over these axes only: one loss per index of the other axes
        (per image, per channel). Each element's gradient is divided by its own
        group's count; a group without unmasked elements has loss NaN ("mean")
        and gradient 0.
    tile_shape : (int, int), optional
        "sum"/"mean" per tile of the last two axes (edge tiles smaller): a loss
        of shape ``shape[:-2] + (ceil(H / th), ceil(W / tw))``. Not with
        ``reduce_axes``.
    grad : bool
        False skips the gradient (forward only, faster).
    grad_scale : float
        Multiplies the gradient (the upstream gradient of a chain rule).
    out : ndarray, optional
        Gradient buffer of ``logits.shape`` and dtype (float32 for float16
        logits also accepted); may be ``logits`` itself (in-place).
    loss_out : ndarray, optional
        Loss-map buffer for ``reduction="none"``.
    check : bool
        Count targets outside [0, 1] or NaN inside the fused pass and raise
        ``ValueError`` with their number and first index. A separate ``out`` or
        ``loss_out`` that the pass had begun to write is then filled with NaN
        (the message says so); an in-place ``out=logits`` is left untouched:
        its targets are checked by a read-only pass first.
    backend : {"auto", "numba", "c", "numpy"}, optional
        Default: the ``use_backend`` context, then ``FASTSCE_BACKEND``, then "auto".
    num_threads : int, optional
        Threads to use; default ``FASTSCE_NUM_THREADS`` or the CPUs of this
        process's affinity.

    Returns
    -------
    LossResult
        ``(loss, grad)``: loss a float ("mean", "sum"), or an ndarray ("none", or
        a float64 array of group losses with ``reduce_axes`` / ``tile_shape``).

    Notes
    -----
    Per element, with ``e = exp(-|x|)``::

        loss = log1p(e) * (a z + 1 - z) + (x >= 0 ? (1 - z) x : -a z x)
        dloss/dx = sigmoid(x) (1 + (a - 1) z) - a z

    Both terms of the loss are non-negative, so tiny losses keep full relative
    precision (float32 and float64 within 4 ulp). ``x = +inf, z = 1`` and
    ``x = -inf, z = 0`` give loss 0 and gradient 0. The returned gradient is
    that of the returned loss: weighted, masked, divided by the count for
    "mean", times ``grad_scale``. Sums are taken in float64 over fixed blocks
    of ``fastsce.BLOCK`` elements, so results are bitwise identical for any
    thread count. Float16 and byte-swapped operands are converted block by
    block; weights of another dtype than the logits (other than float16)
    are converted (copied) first.
    """
    return _sigmoid(**locals())[0]


def _sigmoid(logits, targets, *, weight, mask, pos_weight, label_smoothing,
             divergence, from_logits, target_scale, ignore_value, reduction, reduce_axes,
             tile_shape, grad, grad_scale, out, loss_out, check, backend, num_threads,
             chunk=None, fresh_out=False):
    """The work of the public function: its result and each group's valid count
    (or, for a `chunk` of an Accumulator's map, its partials added to the map's).
    `fresh_out=True`: after a target error `out`/`loss_out` are the caller's
    business, not filled with NaN here (new buffers no one sees: `into_new_buffer`,
    fastsce.dask; an Accumulator fills its chunk's part itself)."""
    impl, threads, want_grad, x, compute = _start("sigmoid", reduction, backend, num_threads,
                                                  grad, logits)
    shape = x.shape
    chunk = chunk or _whole(shape, reduce_axes, tile_shape, reduction)
    z = _targets(targets, shape)
    integer_targets = z.dtype.newbyteorder("=") in _INT_TARGETS
    scale = _target_scale(target_scale, _INT_TARGETS.get(z.dtype.newbyteorder("="), 1.0))
    if ignore_value is not None:
        if not integer_targets:
            raise FastSCEValueError(
                f"`ignore_value` applies to integer (uint8/uint16) targets only; got targets "
                f"of dtype {z.dtype}. Use `mask=` with float targets."
            )
        ignore_value = _integer_code(ignore_value, z.dtype.newbyteorder("="), "code")
    eps, divergence, from_logits, check, gs = _scalars(label_smoothing, divergence,
                                                        from_logits, check, grad_scale)
    w = _weight_like("weight", weight, shape, compute)
    pw = _weight_like("pos_weight", pos_weight, shape, compute)
    if pw is not None and pw.ndim == 0 and pw == 1:
        pw = None  # a == 1 is the plain loss; skip the operand
    if divergence and pw is not None:
        raise FastSCEValueError(
            "`divergence=True` is defined only with `pos_weight` == 1 (the KL divergence "
            "of a re-weighted loss is not a divergence); drop `pos_weight` or `divergence`"
        )
    m = _mask(mask, shape)
    inputs = [("logits", x), ("targets", np.asarray(targets)), ("weight", weight),
              ("mask", mask), ("pos_weight", pos_weight)]
    out_dtype, in_place = _outputs(out, loss_out, want_grad, reduction, x, compute,
                                   shape, inputs)

    call = BinaryCall(
        shape=shape, x=x, z=z, w=w, m=m, pw=pw, from_logits=from_logits,
        divergence=divergence, label_smoothing=eps, scale=scale, ignore_value=ignore_value,
        check=check, threads=threads,
    )
    return _run(impl, impl.binary, call, reduction, want_grad, gs, out, loss_out, compute,
                out_dtype, in_place, shape, lambda impl, c: impl.count_valid(c), chunk,
                fresh_out)


def _whole(shape, reduce_axes, tile_shape, reduction):
    """A whole map as its own single chunk."""
    grouping = Grouping(shape, reduce_axes, tile_shape, reduction)
    return Chunk(grouping, None, GroupSums(math.prod(grouping.result_shape)))


def _start(kind, reduction, backend, num_threads, grad, logits):
    """What every loss validates first: reduction, backend, threads, logits."""
    if reduction not in _REDUCTIONS:
        raise FastSCEValueError(f"`reduction` must be one of {_REDUCTIONS}; got {shown(reduction)}")
    impl = _backends.resolve(backend, kind)
    threads = resolve_threads(num_threads)
    return (impl, threads, _flag("grad", grad)) + _logits(logits)


def _scalars(label_smoothing, divergence, from_logits, check, grad_scale):
    return (_real("label_smoothing", label_smoothing, 0.0, 1.0),
            _flag("divergence", divergence), _flag("from_logits", from_logits),
            _flag("check", check), _real("grad_scale", grad_scale))


def _outputs(out, loss_out, want_grad, reduction, x, compute, loss_shape, inputs,
             what="the shape of `logits`"):
    """Check `out` (logits' shape) and `loss_out` (`loss_shape`); the results'
    dtype and whether the gradient is computed in place."""
    float16 = x.dtype.newbyteorder("=") == np.float16
    dtypes = (np.dtype(np.float16), compute) if float16 else (compute,)
    if out is not None:
        if not want_grad:
            raise FastSCEValueError("`out` was given but grad=False; drop one of them")
        _check_output("out", out, x.shape, dtypes, inputs)
    if loss_out is not None:
        if reduction != "none":
            raise FastSCEValueError(
                f"`loss_out` is the loss map of reduction='none'; got reduction={shown(reduction)}"
            )
        _check_output("loss_out", loss_out, loss_shape, dtypes, inputs + [("out", out)], what)
    in_place = out is not None and _same_view(out, x)
    return (np.dtype(np.float16) if float16 else compute), in_place


def _buffer(given, shape, compute, what, hint):
    """A buffer the kernel can write in the compute dtype (given or new)."""
    if given is not None and given.dtype == compute:
        return given
    return _memory.empty(what, shape, compute, hint)


def _raise_targets(call, bad, index, what="index"):
    if getattr(call, "hard", False):
        expected = f"class indices in [0, {call.classes - 1}]"
    else:
        expected = (f"probabilities in [0, 1] (after dividing by "
                    f"target_scale={call.scale:g})")
    raise TargetRangeError(
        f"`targets` must be {expected}; found {bad} value(s) outside that range "
        f"or NaN, the first at {what} {tuple(int(i) for i in index)}. Fix the targets, "
        "mask them out, or pass check=False."
    )


def _canonical(call):
    """The call with every input of the pixel shape (smaller ones broadcast as
    zero-stride views) and the softmax's class-shaped operands with the class
    axis last: the form `_groups` views take."""
    def pix(a):
        return None if a is None else _layout.broadcast_view(a, call.shape)

    if isinstance(call, SoftmaxCall):
        ndim = call.x.ndim
        last_axis = [d for d in range(ndim) if d != call.axis] + [call.axis]

        def last(a):
            return None if a is None else a.transpose(last_axis)

        z = pix(call.z) if call.hard else last(_layout.broadcast_view(call.z, call.x.shape))
        return _with(call, x=last(call.x), z=z, w=pix(call.w), m=pix(call.m),
                     grad=last(call.grad), axis=ndim - 1)
    return _with(call, z=pix(call.z), w=pix(call.w), m=pix(call.m), pw=pix(call.pw))


def _with(call, **fields):
    """A copy of `call` with `fields` changed: dataclasses.replace without
    running __init__ again, which cost a small call 5% of its time."""
    new = object.__new__(type(call))
    new.__dict__.update(call.__dict__, **fields)
    return new


def _split(call, parts):
    """(part, the canonical call seen through the part's view) for non-empty parts."""
    out = []
    for part in parts:
        if not math.prod(part.shape):
            continue

        def view(a):
            return None if a is None else part.view(a)

        fields = dict(shape=part.shape, group_size=part.group_size, x=view(call.x),
                      z=view(call.z), w=view(call.w), m=view(call.m), grad=view(call.grad),
                      loss_map=view(call.loss_map))
        if isinstance(call, SoftmaxCall):
            fields["axis"] = len(part.shape)
        else:
            fields["pw"] = view(call.pw)
        out.append((part, _with(call, **fields)))
    return out


@dataclass
class Chunk:
    """A chunk of a larger map (the Accumulator's, a dask array's): its groups are the map's."""

    grouping: Grouping     # of the whole map
    origin: tuple          # the chunk's first pixel in the map
    sums: GroupSums        # the map's per-group partials, added to by every chunk
    counts: object = None  # the map's valid count per group, if counted beforehand:
                           # what a "mean" gradient divides by (fastsce.dask's count pass)
    count_only: bool = False  # add only the chunk's valid counts (and check targets)


def _totals(call, results, chunk, what):
    """Add (part, Partials) pairs to the chunk's group sums (checking targets first)."""
    if call.check:
        bad = sum(p.bad for _, p in results)
        for part, p in results:
            if p.bad:
                index = part.origin(p.first_bad)
                if chunk.origin is not None:
                    index = tuple(i + o for i, o in zip(index, chunk.origin))
                _raise_targets(call, bad, index, what)
    shape = chunk.grouping.result_shape
    ids = np.arange(math.prod(shape)).reshape(shape) if chunk.sums.size > 1 else None
    for part, p in results:
        chunk.sums.add(None if ids is None else ids[part.dest].ravel(), p)


def _group_scales(parts, reduction, grad_scale, counts):
    """Each part's per-group gradient factor: grad_scale, over the group's count for "mean"."""
    if counts.ndim == 0:  # one group, in Python floats (NumPy's 0-d calls cost more)
        factor = float(grad_scale)
        if reduction == "mean":
            factor = factor / int(counts) if counts > 0 else 0.0
        for _, c in parts:
            c.gscale = np.array([factor])
        return
    scale = np.full(counts.shape, float(grad_scale))
    if reduction == "mean":
        scale = np.divide(scale, counts, out=np.zeros(counts.shape), where=counts > 0)
    for part, c in parts:
        c.gscale = np.ascontiguousarray(scale[part.dest], dtype=np.float64).ravel()


def _run(impl, kernel, call, reduction, want_grad, grad_scale, out, loss_out, compute,
         out_dtype, in_place, grad_shape, precount, chunk, fresh_out, what="index"):
    """Shared tail of every loss: pre-pass if needed, the kernel on every part of
    the grouping, checks; the LossResult and each group's valid count. A chunk
    of an Accumulator's map only adds its partials (and writes its gradient)."""
    if want_grad:
        call.grad = _buffer(out, grad_shape, compute, "the gradient",
                            "Pass grad=False for the loss alone, or out= a buffer of your "
                            "own (an np.memmap works).")
    if reduction == "none":
        call.loss_map = _buffer(loss_out, call.shape, compute, "the loss map of "
                                "reduction='none'", "Use reduction='mean' or 'sum' (with "
                                "reduce_axes or tile_shape for smaller maps), or pass "
                                "loss_out= a buffer of your own.")
    grouping = chunk.grouping
    parts = _split(_canonical(call), grouping.parts(call.shape, chunk.origin))
    if chunk.count_only:
        _totals(call, [(p, precount(impl, c)) for p, c in parts], chunk, what)
        return None, None
    masked = call.m is not None or call.ignore_value is not None
    # The "mean" gradient needs each group's count before it is written (unless
    # the chunk brings its map's). (An Accumulator refuses masked "mean"
    # gradients: its counts are the map's.)
    needs_counts = want_grad and reduction == "mean" and masked and chunk.counts is None
    # Targets are checked inside the fused pass (SPEC §2). Only an in-place
    # gradient needs them checked first, by a read-only pass: the kernel would
    # overwrite the logits before it found a bad target. (float16 logits are
    # computed in a float32 buffer of ours, copied back only after success.)
    guards = call.check and in_place and call.grad is out and _may_be_bad(call)
    counts = grouping.sizes() if chunk.counts is None else chunk.counts
    if needs_counts or guards:
        pre = Chunk(grouping, chunk.origin, GroupSums(math.prod(grouping.result_shape)))
        _totals(call, [(p, precount(impl, c)) for p, c in parts], pre, what)
        if needs_counts:
            counts = pre.sums.totals()[1].reshape(grouping.result_shape)
    _group_scales(parts, reduction, grad_scale, counts)
    try:
        _totals(call, [(p, kernel(c)) for p, c in parts], chunk, what)
    except TargetRangeError as err:
        if fresh_out:
            raise
        _poison(err, (("`out`", out, call.grad), ("`loss_out`", loss_out, call.loss_map)))
    gradient = _deliver(call.grad, out, out_dtype) if want_grad else None
    if chunk.origin is not None:
        return None, None
    if reduction == "none":
        return LossResult(_deliver(call.loss_map, loss_out, out_dtype), gradient), None
    loss, count = reduced(chunk, reduction)
    return LossResult(loss, gradient), count


def _poison(err, outputs, note=""):
    """Re-raise a target error after filling with NaN each caller's buffer (label,
    given, written) that the kernel wrote into: no half-written result is left
    that could pass for a whole one. The message names them (and adds `note`)."""
    filled = [(label, given) for label, given, written in outputs
              if given is not None and given is written]
    if not filled:
        raise err
    with np.errstate(invalid="ignore"):
        for _, given in filled:
            given[...] = np.nan
    verb = "were" if len(filled) > 1 else "was"
    raise TargetRangeError(f"{err} {' and '.join(label for label, _ in filled)} held partial "
                           f"results and {verb} filled with NaN{note}.") from None


def _may_be_bad(call):
    """Whether a target of `call` can lie outside its range: not for soft targets
    of an unsigned dtype whose every code is within [0, target_scale] (uint8 at
    the default scale 255), so a pass that only looks for bad targets (the one
    that guards an in-place `out=logits`, the softmax pre-count's element check)
    would find none."""
    z = call.z
    if getattr(call, "hard", False) or z.dtype.kind != "u":
        return True
    return call.scale < np.iinfo(z.dtype).max


def reduced(chunk, reduction):
    """(loss, valid count) of a map's group sums: a float and an int for a full
    reduction, else arrays of the group shape; "mean" divides by the count (NaN
    for none)."""
    grouping = chunk.grouping
    if not grouping.grouped:  # in Python numbers (NumPy's 0-d calls cost more)
        total, count = chunk.sums.total()
        if reduction == "mean":
            total = total / count if count > 0 else math.nan
        return total, count
    loss, count = (a.reshape(grouping.result_shape) for a in chunk.sums.totals())
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(count > 0, loss / np.maximum(count, 1), math.nan)
    return loss, count


def _deliver(buf, given, dtype):
    """The caller's buffer (filled from ours if they differ) or ours in `dtype`."""
    if given is buf or (given is None and buf.dtype == dtype):
        return buf  # before np.errstate, which costs a small call 3%
    # A float16 result may overflow to inf, a legitimate value here (SPEC §2).
    with np.errstate(over="ignore"):
        if given is not None:
            given[...] = buf
            return given
        return buf.astype(dtype)


_LABEL_KINDS = "iu"


def class_axis(axis, shape):
    """The softmax's `axis` for logits of `shape`, validated and made non-negative."""
    ndim = len(shape)
    if ndim == 0:
        raise FastSCEValueError("`logits` must have a class axis; got a 0-d array")
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    expected = f"an integer in [{-ndim}, {ndim - 1}] for logits.shape={tuple(shape)}"
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise FastSCETypeError(
            f"`axis` must be {expected}; got {shown(axis)} of type {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise FastSCEValueError(f"`axis` must be {expected}; got {shown(axis)}")
    return int(axis) % ndim


def hard_labels(targets, shape):
    """Whether softmax `targets` (anything with dtype and shape) are class indices of
    the pixel shape, rather than soft targets of the logits' `shape`."""
    return (targets.dtype.kind in _LABEL_KINDS and tuple(targets.shape) != tuple(shape)
            and len(targets.shape) == len(shape) - 1)


def softmax_cross_entropy(
    logits, targets, *, axis=1, class_weights=None, weight=None, mask=None,
    ignore_value=None, label_smoothing=0.0, divergence=False, from_logits=True,
    target_scale=None, reduction="mean", reduce_axes=None, tile_shape=None, grad=True,
    grad_scale=1.0, out=None, loss_out=None, check=True, backend=None, num_threads=None,
):
    r"""Multiclass (softmax) cross-entropy with soft targets over a class axis, fused.

    Parameters
    ----------
    logits : ndarray of float16, float32 or float64, shape (..., C, ...)
        Logits ``x`` with the classes along ``axis`` (or probabilities with
        ``from_logits=False``). Any layout: NCHW, NHWC, strided; never transposed.
    targets : ndarray
        Soft targets of the logits' shape (float16/32/64, or uint8/uint16 codes
        divided by ``target_scale``), a distribution per pixel (not required
        to sum to 1); or integer class indices of the shape without the class
        axis (hard labels, meaning one-hot; copied to int64 if of another dtype).
    axis : int
        The class axis (default 1: N, C, H, W; -1 for channels-last).
    class_weights : array of shape (C,), optional
        Non-negative weight ``w_k`` of each class.
    weight, mask : arrays broadcastable to the pixel shape (logits without the class axis)
        Per-pixel weight; False in ``mask`` excludes a pixel (loss 0, gradient 0,
        not counted).
    ignore_value : int, optional
        With integer class indices: pixels with this label are excluded.
    label_smoothing : float in [0, 1]
        ``z' = z (1 - eps) + eps / C``.
    divergence : bool
        Return the KL divergence: adds ``sum_k w_k z_k log z_k`` (the target's
        own negative entropy, class-weighted) so a perfect prediction scores 0.
    from_logits : bool
        False: inputs are probabilities; ``log`` clamped at -100 and the
        gradient's denominator at 1e-12, as PyTorch's ``NLLLoss(log(p))``.
    target_scale : float, optional
        Divisor of integer soft targets (default 255 for uint8, 65535 for uint16).
    reduction, reduce_axes, tile_shape, grad, grad_scale, out, loss_out, check, backend, num_threads
        As in :func:`sigmoid_cross_entropy`; "mean" divides by the count of
        unmasked pixels; ``loss_out`` has the pixel shape; ``reduce_axes`` and
        ``tile_shape`` name axes of the pixel shape (logits without the class axis).

    Returns
    -------
    LossResult
        ``(loss, grad)``; grad has the logits' shape and dtype.

    Notes
    -----
    Per pixel, with ``m = max_k x_k``::

        loss = sum_k w_k z_k ((m - x_k) + log(sum_j exp(x_j - m)))
        dloss/dx_k = (sum_j w_j z_j) softmax(x)_k - w_k z_k

    Each term of the loss is non-negative, so the loss keeps full relative
    precision (sums over classes in float64). The gradient is the general
    one: exact for smoothed, masked or unnormalized targets. A class with
    logit -inf and target 0 contributes 0 and gets gradient 0. NCHW and
    NHWC layouts of the same data give bitwise the same results.
    """
    return _softmax(**locals())[0]


def _softmax(logits, targets, *, axis, class_weights, weight, mask, ignore_value,
             label_smoothing, divergence, from_logits, target_scale, reduction, reduce_axes,
             tile_shape, grad, grad_scale, out, loss_out, check, backend, num_threads,
             chunk=None, fresh_out=False):
    """The work of the public function (see _sigmoid)."""
    impl, threads, want_grad, x, compute = _start("softmax", reduction, backend, num_threads,
                                                  grad, logits)
    axis = class_axis(axis, x.shape)
    C = x.shape[axis]
    if C == 0:
        raise FastSCEValueError(
            f"`logits` must have at least one class along axis {axis} (a softmax over no "
            f"classes is undefined); got logits.shape={x.shape}"
        )
    pixel_shape = x.shape[:axis] + x.shape[axis + 1:]
    chunk = chunk or _whole(pixel_shape, reduce_axes, tile_shape, reduction)
    t = np.asarray(targets)
    native_t = t.dtype.newbyteorder("=")
    hard = hard_labels(t, x.shape)
    if hard:
        _layout.broadcast_operand("targets", t, pixel_shape, what="the pixel shape of `logits`")
        z = t if native_t == np.int64 else _memory.converted(
            "targets", t, np.int64, "Pass class indices as int64 to avoid the copy.")
        if target_scale is not None:
            raise FastSCEValueError("`target_scale` applies to soft targets, not class indices")
        scale = float(C - 1)
    else:
        if t.dtype.kind in "iu" and native_t not in _INT_TARGETS:
            raise FastSCETypeError(
                f"`targets` of integer dtype {t.dtype} must be class indices of the shape "
                f"without the class axis {pixel_shape}; got targets.shape={t.shape} and "
                f"logits.shape={x.shape}"
            )
        z = _targets(t, x.shape)
        scale = _target_scale(target_scale, _INT_TARGETS.get(native_t, 1.0))
    if ignore_value is not None:
        if not hard:
            raise FastSCEValueError(
                "`ignore_value` applies to integer class-index targets only; use `mask=` "
                f"with soft targets (got targets of shape {t.shape} and dtype {t.dtype})"
            )
        ignore_value = _integer_code(ignore_value, np.int64, "label")
    eps, divergence, from_logits, check, gs = _scalars(label_smoothing, divergence,
                                                        from_logits, check, grad_scale)
    cw = None
    if class_weights is not None:
        cw = np.asarray(class_weights)
        if cw.shape != (C,):
            raise FastSCEValueError(
                f"`class_weights` must have shape ({C},) (one per class along axis {axis}); "
                f"got class_weights.shape={cw.shape}"
            )
        cw = _weight_like("class_weights", cw, (C,), compute)
        cw = np.array(cw, dtype=compute, order="C")  # C values: an (aligned) copy costs nothing
    pixels = "the pixel shape of `logits` (without the class axis)"
    w = _weight_like("weight", weight, pixel_shape, compute, pixels)
    m = _mask(mask, pixel_shape, pixels)
    inputs = [("logits", x), ("targets", t), ("weight", weight), ("mask", mask),
              ("class_weights", class_weights)]
    out_dtype, in_place = _outputs(out, loss_out, want_grad, reduction, x, compute,
                                   pixel_shape, inputs, what="the pixel shape of `logits`")
    call = SoftmaxCall(
        shape=pixel_shape, x=x, axis=axis, classes=C, z=z, hard=hard, w=w, m=m, cw=cw,
        from_logits=from_logits, divergence=divergence, label_smoothing=eps, scale=scale,
        ignore_value=ignore_value, check=check, threads=threads,
    )
    return _run(impl, impl.softmax, call, reduction, want_grad, gs, out, loss_out, compute,
                out_dtype, in_place, x.shape, _softmax_precount, chunk, fresh_out,
                what="pixel")


def into_new_buffer(public):
    """`public` (a loss function) for a caller whose `out` is a new buffer that no one
    sees if the call fails (fastsce.torch's gradient tensor): not filled with NaN
    after a target error, and the message does not mention it."""
    work = {sigmoid_cross_entropy: _sigmoid, softmax_cross_entropy: _softmax}[public]
    defaults = {name: p.default for name, p in inspect.signature(public).parameters.items()
                if p.kind is p.KEYWORD_ONLY}

    def call(logits, targets, **options):
        return work(logits, targets, **{**defaults, **options}, fresh_out=True)[0]

    return call


def _softmax_precount(impl, call):
    """Valid-pixel count (and label check) of a softmax call, by the count kernel.

    Hard labels are checked as codes in [0, C-1]; soft targets are checked
    element by element with the pixel mask spread along the class axis.
    """
    common = dict(x=None, w=None, pw=None, from_logits=True, divergence=False,
                  label_smoothing=0.0, check=call.check, threads=call.threads)
    pixel_groups = dict(common, group_size=call.group_size)
    if call.hard:
        return impl.count_valid(BinaryCall(shape=call.shape, z=call.z, m=call.m,
                                           scale=call.scale, ignore_value=call.ignore_value,
                                           **pixel_groups))
    codes = np.broadcast_to(np.zeros((), np.uint8), call.shape)  # every pixel a valid code
    pixels = impl.count_valid(BinaryCall(shape=call.shape, z=codes, m=call.m, scale=1.0,
                                         ignore_value=None, **pixel_groups))
    if not call.check or not _may_be_bad(call):
        return pixels
    # Count bad elements in the targets' memory order (the call holds the class
    # axis last; walking NCHW that way strides across the map: 3x the fused pass).
    z = np.broadcast_to(call.z, call.x.shape)
    m = None if call.m is None else np.expand_dims(np.broadcast_to(call.m, call.shape), -1)
    order = sorted(range(z.ndim), key=lambda a: -abs(z.strides[a]))
    elements = impl.count_valid(BinaryCall(
        shape=tuple(z.shape[a] for a in order), z=z.transpose(order),
        m=None if m is None else m.transpose(order), scale=call.scale, ignore_value=None,
        **common, group_size=z.size))
    if elements.bad:
        # Rare path: walk again class axis last, so the first bad element belongs
        # to the first bad pixel, as the fused pass reports it.
        elements = impl.count_valid(BinaryCall(shape=z.shape, z=z, m=m, scale=call.scale,
                                               ignore_value=None, **common,
                                               group_size=call.group_size * call.classes))
    first = elements.first_bad // call.classes if elements.bad else -1
    pixels.bad, pixels.first_bad = elements.bad, first
    return pixels
