"""Public functions: validate once, pick a backend, run, combine.

Everything a kernel trusts is established here: dtypes, shapes, broadcasting,
writability and aliasing of outputs, option ranges. Kernels then take raw
strided operands (see `_layout`) and never re-check.
"""
import math
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from . import _backends, _layout
from ._errors import FastSCETypeError, FastSCEValueError, TargetRangeError
from ._threads import resolve_threads

LossResult = namedtuple("LossResult", ["loss", "grad"])
LossResult.__doc__ = """Loss and gradient of one call.

loss : float for a full "sum"/"mean" reduction, else an ndarray.
grad : ndarray of the input's shape (and dtype), or None with ``grad=False``.
"""

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_INT_TARGETS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_REDUCTIONS = ("none", "sum", "mean")


@dataclass
class BinaryCall:
    """A validated binary call; arrays are native-endian, kernel dtypes."""

    shape: tuple
    x: np.ndarray
    z: np.ndarray
    w: object
    m: object
    pw: object
    from_logits: bool
    divergence: bool
    label_smoothing: float
    scale: float
    ignore_value: object
    check: bool
    threads: int
    grad: object = None      # output buffer (compute dtype) or None
    loss_map: object = None  # output buffer (compute dtype) or None
    gscale: float = 1.0      # multiplies every gradient element


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise FastSCETypeError(f"`{name}` must be True or False; got {value!r}")
    return bool(value)


def _real(name, value, lo=-math.inf, hi=math.inf):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FastSCETypeError(f"`{name}` must be a real number; got {value!r}") from None
    if not lo <= v <= hi:
        raise FastSCEValueError(f"`{name}` must lie in [{lo}, {hi}]; got {value!r}")
    return v


def _logits(logits):
    x = np.asarray(logits)
    if x.dtype.newbyteorder("=") not in _FLOATS:
        raise FastSCETypeError(
            f"`logits` must be float16, float32 or float64; got dtype {x.dtype}. "
            "Convert with logits.astype(np.float32)."
        )
    # float16 is read as float32 (SPEC §2); byte-swapped input is made native.
    native = x.dtype.newbyteorder("=")
    compute = np.dtype(np.float32) if native == np.float16 else native
    return x, _layout.native(x.astype(compute) if native == np.float16 else x), compute


def _targets(targets, shape):
    t = np.asarray(targets)
    native = t.dtype.newbyteorder("=")
    if native not in _FLOATS and native not in _INT_TARGETS:
        raise FastSCETypeError(
            "`targets` must be float16/32/64 probabilities or uint8/uint16 codes "
            f"(probability times target_scale); got dtype {t.dtype}"
        )
    _layout.broadcast_operand("targets", t, shape)
    return _layout.native(t.astype(np.float32) if native == np.float16 else t)


def _weight_like(name, value, shape, compute):
    """A non-negative weight array broadcastable to `shape`, in the compute dtype."""
    if value is None:
        return None
    a = np.asarray(value)
    if a.dtype.kind not in "fiub" or a.dtype.kind == "b" and name != "mask":
        raise FastSCETypeError(f"`{name}` must be a real number or array; got dtype {a.dtype}")
    _layout.broadcast_operand(name, a, shape)
    a = _layout.native(a.astype(compute, copy=False))
    if a.size and not np.min(a) >= 0:
        raise FastSCEValueError(
            f"`{name}` must be non-negative (and not NaN); got a minimum of {np.min(a)}"
        )
    return a


def _mask(mask, shape):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise FastSCETypeError(
            f"`mask` must be a boolean array (True = counted); got dtype {m.dtype}. "
            "Pass mask != 0 for a numeric mask."
        )
    _layout.broadcast_operand("mask", m, shape)
    return m


def _check_output(name, buf, shape, dtypes, inputs):
    if not isinstance(buf, np.ndarray):
        raise FastSCETypeError(f"`{name}` must be a numpy array; got {type(buf).__name__}")
    if buf.shape != tuple(shape):
        raise FastSCEValueError(
            f"`{name}` must have the shape of `logits`; got {name}.shape={buf.shape} "
            f"and logits.shape={tuple(shape)}"
        )
    if buf.dtype not in dtypes:
        raise FastSCETypeError(
            f"`{name}` must have dtype {' or '.join(str(d) for d in dtypes)}; got {buf.dtype}"
        )
    if not buf.flags.writeable:
        raise FastSCEValueError(f"`{name}` must be writeable; got a read-only array")
    if not buf.dtype.isnative:
        raise FastSCETypeError(f"`{name}` must be in native byte order; got {buf.dtype}")
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


def _same_view(a, b):
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
    )


def _overlaps(a, b):
    try:
        return bool(np.shares_memory(a, b, max_work=10000))
    except np.exceptions.TooHardError:
        return True


def sigmoid_cross_entropy(
    logits, targets, *, weight=None, mask=None, pos_weight=None, label_smoothing=0.0,
    divergence=False, from_logits=True, target_scale=None, ignore_value=None,
    reduction="mean", grad=True, grad_scale=1.0, out=None, loss_out=None, check=True,
    backend=None, num_threads=None,
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
        ``ValueError`` with their number and first index.
    backend : {"auto", "numba", "c", "numpy"}, optional
        Default: the ``use_backend`` context, then ``FASTSCE_BACKEND``, then "auto".
    num_threads : int, optional
        Threads to use; default ``FASTSCE_NUM_THREADS`` or the CPUs of this
        process's affinity.

    Returns
    -------
    LossResult
        ``(loss, grad)``: loss a float ("mean", "sum") or an ndarray ("none").

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
    thread count. Float16 logits or targets, and weights of another dtype
    than the logits, are converted (copied) first.
    """
    if reduction not in _REDUCTIONS:
        raise FastSCEValueError(f"`reduction` must be one of {_REDUCTIONS}; got {reduction!r}")
    impl = _backends.resolve(backend)
    threads = resolve_threads(num_threads)
    want_grad = _flag("grad", grad)
    raw_x, x, compute = _logits(logits)
    shape = x.shape
    z = _targets(targets, shape)
    integer_targets = z.dtype.newbyteorder("=") in _INT_TARGETS
    scale = _INT_TARGETS.get(z.dtype.newbyteorder("="), 1.0) if target_scale is None else \
        _real("target_scale", target_scale, 0.0)
    if not 0 < scale < math.inf:
        raise FastSCEValueError(f"`target_scale` must be positive and finite; got {target_scale!r}")
    if ignore_value is not None:
        if not integer_targets:
            raise FastSCEValueError(
                f"`ignore_value` applies to integer (uint8/uint16) targets only; got targets "
                f"of dtype {z.dtype}. Use `mask=` with float targets."
            )
        info = np.iinfo(z.dtype)
        if isinstance(ignore_value, bool) or not isinstance(ignore_value, (int, np.integer)) \
                or not info.min <= int(ignore_value) <= info.max:
            raise FastSCEValueError(
                f"`ignore_value` must be an integer code of targets.dtype={z.dtype} "
                f"(in [{info.min}, {info.max}]); got {ignore_value!r}"
            )
        ignore_value = int(ignore_value)
    eps = _real("label_smoothing", label_smoothing, 0.0, 1.0)
    divergence = _flag("divergence", divergence)
    from_logits = _flag("from_logits", from_logits)
    check = _flag("check", check)
    gs = _real("grad_scale", grad_scale)
    w = _weight_like("weight", weight, shape, compute)
    pw = _weight_like("pos_weight", pos_weight, shape, compute)
    if pw is not None and pw.ndim == 0 and pw == 1:
        pw = None  # a == 1 is the plain loss; skip the operand
    if divergence and pw is not None:
        raise FastSCEValueError(
            "`divergence=True` is defined only with pos_weight == 1 (the KL divergence "
            "of a re-weighted loss is not a divergence); drop pos_weight or divergence"
        )
    m = _mask(mask, shape)
    inputs = [("logits", raw_x), ("targets", np.asarray(targets)), ("weight", weight),
              ("mask", mask), ("pos_weight", pos_weight)]
    grad_dtypes = (np.dtype(np.float16), compute) if compute != raw_x.dtype.newbyteorder("=") \
        else (compute,)
    if out is not None:
        if not want_grad:
            raise FastSCEValueError("`out` was given but grad=False; drop one of them")
        _check_output("out", out, shape, grad_dtypes, inputs)
    if loss_out is not None:
        if reduction != "none":
            raise FastSCEValueError(
                f"`loss_out` is the loss map of reduction='none'; got reduction={reduction!r}"
            )
        _check_output("loss_out", loss_out, shape, grad_dtypes, inputs + [("out", out)])

    call = BinaryCall(
        shape=shape, x=x, z=z, w=w, m=m, pw=pw, from_logits=from_logits,
        divergence=divergence, label_smoothing=eps, scale=scale, ignore_value=ignore_value,
        check=check, threads=threads,
    )
    in_place = out is not None and _same_view(out, raw_x)
    out_dtype = np.dtype(np.float16) if raw_x.dtype.newbyteorder("=") == np.float16 else compute
    return _run_binary(impl, call, reduction, want_grad, gs, out, loss_out, compute, out_dtype, in_place)


def _buffer(given, shape, compute):
    """A buffer the kernel can write in the compute dtype (given or new)."""
    if given is not None and given.dtype == compute:
        return given
    return np.empty(shape, dtype=compute)


def _raise_targets(call, totals, wrote):
    index = np.unravel_index(totals.first_bad, call.shape) if call.shape else ()
    raise TargetRangeError(
        f"`targets` must be probabilities in [0, 1]; found {totals.bad} value(s) outside "
        f"[0, 1] or NaN (after dividing by target_scale={call.scale:g}), the first at "
        f"index {tuple(int(i) for i in index)}. Fix the targets, mask them out, or pass "
        f"check=False." + (" `out`/`loss_out` may hold partial results." if wrote else "")
    )


def _run_binary(impl, call, reduction, want_grad, grad_scale, out, loss_out, compute, out_dtype, in_place):
    n = int(np.prod(call.shape, dtype=np.int64))
    masked = call.m is not None or call.ignore_value is not None
    count = n
    if (want_grad and reduction == "mean" and masked) or (in_place and call.check):
        # The "mean" gradient needs the count before it is written; an in-place
        # gradient needs the targets checked before the logits are overwritten.
        pre = impl.count_valid(call)
        if call.check and pre.bad:
            _raise_targets(call, pre, wrote=False)
        count = pre.count
    if want_grad:
        call.grad = _buffer(out, call.shape, compute)
        call.gscale = grad_scale / count if reduction == "mean" and count else (
            0.0 if reduction == "mean" else grad_scale)
    if reduction == "none":
        call.loss_map = _buffer(loss_out, call.shape, compute)
    totals = impl.binary(call)
    if call.check and totals.bad:
        _raise_targets(call, totals, wrote=want_grad or reduction == "none")
    result_dtype = out_dtype
    gradient = _deliver(call.grad, out, result_dtype) if want_grad else None
    if reduction == "none":
        return LossResult(_deliver(call.loss_map, loss_out, result_dtype), gradient)
    if reduction == "sum":
        return LossResult(totals.loss, gradient)
    return LossResult(totals.loss / totals.count if totals.count else math.nan, gradient)


def _deliver(buf, given, dtype):
    """The caller's buffer (filled from ours if they differ) or ours in `dtype`."""
    if given is not None:
        if given is not buf:
            given[...] = buf
        return given
    return buf if buf.dtype == dtype else buf.astype(dtype)
