"""An independent float64 NumPy statement of SPEC §1.1, §1.3, §1.4 (finite inputs).

Written from the spec, not from fastsce's reference, so the reference can be
checked against it (test_reference.py).  Also the comparison helpers the other
test files share.  Operands are broadcast explicitly to the logits' shape.
"""
import importlib

import numpy as np

UINT_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def softplus(t):
    # logaddexp(0, t) = max(t, 0) + log1p(exp(-|t|)): full relative precision.
    return np.logaddexp(0.0, t)


def sigmoid(t):
    # exp(-softplus(-t)): full relative precision in both tails.
    return np.exp(-softplus(-t))


def xlogx(u):
    safe = np.where(u > 0, u, 1.0)
    return np.where(u > 0, u * np.log(safe), 0.0)


def clog(u):
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(u), -100.0)


def targets_as_prob(targets, target_scale=None):
    t = np.asarray(targets)
    if t.dtype in UINT_SCALES:
        scale = UINT_SCALES[t.dtype] if target_scale is None else float(target_scale)
        return t.astype(np.float64) / scale
    scale = 1.0 if target_scale is None else float(target_scale)
    return t.astype(np.float64) / scale


class Expected:
    """Loss/grad of one call plus the element-wise error scales."""

    def __init__(self, loss, grad, loss_elem, loss_scale, grad_scale, count):
        self.loss = loss              # float, or the loss map for "none"
        self.grad = grad              # float64 array
        self.loss_elem = loss_elem    # w*m*loss per element (float64)
        self.loss_scale = loss_scale  # per-element magnitude the loss error is measured by
        self.grad_scale = grad_scale  # per-element magnitude for the gradient error
        self.count = count


def expected(logits, targets, *, weight=None, mask=None, pos_weight=None,
             label_smoothing=0.0, divergence=False, from_logits=True, target_scale=None,
             ignore_value=None, reduction="mean", grad_scale=1.0):
    x = np.asarray(logits).astype(np.float64)
    shape = x.shape
    raw_t = np.broadcast_to(np.asarray(targets), shape)
    z = targets_as_prob(raw_t, target_scale)
    w = np.ones(shape) if weight is None else np.broadcast_to(
        np.asarray(weight, dtype=np.float64), shape)
    m = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), shape)
    if ignore_value is not None:
        m = m & (raw_t != ignore_value)
    a = np.ones(shape) if pos_weight is None else np.broadcast_to(
        np.asarray(pos_weight, dtype=np.float64), shape)
    eps = float(label_smoothing)
    zs = z * (1 - eps) + eps / 2
    omz = (1 - z) * (1 - eps) + eps / 2
    # A target that must be rounded to the working dtype (integer codes,
    # smoothing) makes one ulp of z' worth |d/dz'| in the result.
    # Wider float targets (float64 targets, float32 logits) are rounded too.
    work = np.float64 if np.asarray(logits).dtype == np.float64 else np.float32
    rounded_target = (bool(eps) or raw_t.dtype in UINT_SCALES or target_scale is not None
                      or raw_t.dtype.itemsize > np.dtype(work).itemsize)
    if from_logits:
        sp_p, sp_n = softplus(x), softplus(-x)
        ce = a * zs * sp_n + omz * sp_p
        s_p, s_n = sigmoid(x), sigmoid(-x)
        g1, g2 = omz * s_p, a * zs * s_n
        dl_dz = np.abs(a * sp_n - sp_p)
        dg_dz = s_p + a * s_n
    else:
        c = x
        lc, l1c = clog(c), clog(1 - c)
        ce = -(a * zs * lc) - omz * l1c
        den = np.maximum(c * (1 - c), 1e-12)
        g1, g2 = omz * c / den, a * zs * (1 - c) / den
        dl_dz = np.abs(-a * lc + l1c)
        dg_dz = (a * (1 - c) + c) / den
    loss = ce + (xlogx(zs) + xlogx(omz) if divergence else 0.0)
    grad = g1 - g2
    lsc = np.maximum(np.abs(loss), ce)
    gsc = np.maximum(g1, g2)
    if rounded_target:
        lsc = np.maximum(lsc, dl_dz)
        gsc = np.maximum(gsc, dg_dz)
    loss_elem = np.where(m, w * loss, 0.0)
    grad_elem = np.where(m, w * grad, 0.0)
    lsc = np.where(m, w * lsc, 0.0)
    gsc = np.where(m, w * gsc, 0.0)
    count = int(np.count_nonzero(m))
    total = float(np.sum(loss_elem))
    if reduction == "none":
        out_loss = loss_elem
        factor = 1.0
    elif reduction == "sum":
        out_loss = total
        factor = 1.0
    elif reduction == "mean":
        out_loss = total / count if count else float("nan")
        factor = 1.0 / count if count else 0.0
    else:
        raise ValueError(reduction)
    factor *= grad_scale
    return Expected(out_loss, grad_elem * factor, loss_elem, lsc,
                    gsc * abs(factor), count)


def pytorch_mean_bce_with_logits(x, z, weight=None, pos_weight=None):
    """PyTorch's BCEWithLogitsLoss(reduction="mean") formula, by hand in float64.

    torch: log_weight = 1 + (pos_weight - 1) * target
           loss = (1 - target) * input + log_weight * (log1p(exp(-|input|)) + max(-input, 0))
           loss = loss * weight; mean over all elements.
    """
    x = np.asarray(x, np.float64)
    z = np.asarray(z, np.float64)
    if pos_weight is None:
        loss = (1 - z) * x + (np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0))
    else:
        lw = 1 + (np.asarray(pos_weight, np.float64) - 1) * z
        loss = (1 - z) * x + lw * (np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0))
    if weight is not None:
        loss = loss * weight
    return float(np.mean(loss))


# --------------------------------------------------------------------------
# comparison helpers


def assert_elementwise(got, exp, scale, dtype, *, rtol64=1e-13, ulps32=8.0, what="value"):
    """|got - exp| <= tol * max(|exp|, scale) element-wise.

    float64: tol = rtol64 relative; float32 (and float16 logits, which compute
    in float32): ``ulps32`` ulp of float32 at max(|exp|, scale).  NaN/inf must
    match exactly.
    """
    got = np.asarray(got, dtype=np.float64)
    exp = np.asarray(exp, dtype=np.float64)
    scale = np.maximum(np.abs(exp), np.asarray(scale, dtype=np.float64))
    assert got.shape == exp.shape, (what, got.shape, exp.shape)
    finite = np.isfinite(exp)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(exp), err_msg=f"{what}: NaN pattern")
    np.testing.assert_array_equal(got[~finite], exp[~finite], err_msg=f"{what}: non-finite")
    if np.dtype(dtype) == np.float64:
        tol = rtol64 * scale
    else:
        tol = ulps32 * np.spacing(scale.astype(np.float32)).astype(np.float64)
        tol = np.maximum(tol, ulps32 * np.float64(np.finfo(np.float32).smallest_subnormal))
    err = np.abs(got - exp)
    bad = finite & ~(err <= tol)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        detail = [(tuple(i), got[tuple(i)], exp[tuple(i)], tol[tuple(i)]) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements off; "
                             f"(index, got, expected, tol): {detail}")


def assert_total(got, exp, scale_total, dtype, *, rtol64=1e-13, rtol32=1e-6, what="loss"):
    """A reduced loss against the float64 expectation, relative to sum of scales."""
    assert isinstance(got, float), f"{what} should be a Python float, got {type(got)}"
    if np.isnan(exp):
        assert np.isnan(got), (what, got, exp)
        return
    rtol = rtol64 if np.dtype(dtype) == np.float64 else rtol32
    assert abs(got - exp) <= rtol * max(abs(exp), scale_total) + 1e-300, (what, got, exp)


def check_result(res, exp, logits_dtype, reduction, *, rtol64=1e-13, ulps32=8.0,
                 rtol32=1e-6):
    """A LossResult against an Expected (from ``expected``)."""
    loss, grad = res
    dtype = np.dtype(logits_dtype)
    work = np.float64 if dtype == np.float64 else np.float32
    if reduction == "none":
        assert isinstance(loss, np.ndarray)
        assert loss.shape == exp.loss.shape
        if loss.dtype == np.float16:
            # a float16 loss map (float16 logits): one more rounding, to float16
            mag = np.maximum(np.abs(exp.loss), exp.loss_scale)
            tol = np.spacing(mag.astype(np.float16)).astype(np.float64) + 1e-7 * mag
            assert np.all(np.abs(loss.astype(np.float64) - exp.loss) <= tol), "f16 loss map"
        else:
            assert_elementwise(loss, exp.loss, exp.loss_scale, work, rtol64=rtol64,
                               ulps32=ulps32, what="loss map")
    else:
        n = exp.loss_scale.size
        denom = exp.count if (reduction == "mean" and exp.count) else 1
        # float32 elements rounded once each: allow n ulp-sized errors at worst
        assert_total(loss, exp.loss, float(np.sum(exp.loss_scale)) / denom, work,
                     rtol64=rtol64 * max(1.0, np.log2(max(n, 2))), rtol32=rtol32,
                     what=f"{reduction} loss")
    if grad is not None:
        check_grad(grad, exp, dtype, rtol64=rtol64, ulps32=ulps32)


def check_grad(grad, exp, logits_dtype, *, rtol64=1e-13, ulps32=8.0):
    """A gradient (in the logits' dtype) against an Expected's grad and grad_scale."""
    dtype = np.dtype(logits_dtype)
    assert isinstance(grad, np.ndarray)
    assert grad.dtype == dtype, (grad.dtype, dtype)
    assert grad.shape == exp.grad.shape
    if dtype == np.float16:
        # float16 output: one rounding to float16 on top of float32 work; beyond
        # float16's range only the sign (of the overflowed value) is checked
        g = grad.astype(np.float64)
        mag = np.maximum(np.abs(exp.grad), exp.grad_scale)
        inside = mag < 60000
        tol = np.spacing(np.where(inside, mag, 0).astype(np.float16)).astype(np.float64)
        assert np.all(~inside | (np.abs(g - exp.grad) <= tol + 1e-7)), "f16 grad"
        assert np.all(inside | (np.sign(g) == np.sign(exp.grad)) | (exp.grad == 0)), "f16 sign"
    else:
        work = np.float64 if dtype == np.float64 else np.float32
        assert_elementwise(grad, exp.grad, exp.grad_scale, work, rtol64=rtol64,
                           ulps32=ulps32, what="grad")


def misaligned(a):
    """A writable copy of ``a`` (C order) whose address is one byte past an
    item boundary, as np.frombuffer with an offset gives."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(a.dtype).reshape(a.shape)
    assert a.dtype.itemsize == 1 or not out.flags.aligned
    out[...] = a
    return out


def packed_field(a):
    """A copy of ``a`` as the field of a packed structured array: its strides
    are not whole items (one byte of padding each)."""
    rec = np.zeros(a.shape, [("v", a.dtype), ("pad", np.uint8)])
    rec["v"] = a
    return rec["v"]


def check_misaligned_read_aligned(monkeypatch, backend, loss, *args, **kwargs):
    """`loss(*args, **kwargs)` on `backend` gives bitwise the same result with
    every array argument misaligned, and the backend plans its kernels over
    aligned arrays only (make_plan copies the others)."""
    module = importlib.import_module(f"fastsce._{backend}_kernels")
    want = loss(*args, backend=backend, **kwargs)
    seen = []
    real = module.make_plan

    def spy(*a, **k):
        plan = real(*a, **k)
        seen.extend(f for f in plan.flats.values() if f is not None)
        return plan
    monkeypatch.setattr(module, "make_plan", spy)
    mis = lambda v: misaligned(v) if isinstance(v, np.ndarray) else v  # noqa: E731
    got = loss(*map(mis, args), backend=backend, **{k: mis(v) for k, v in kwargs.items()})
    assert len(seen) >= 4 and all(a.flags.aligned for a in seen)
    assert got.loss == want.loss
    np.testing.assert_array_equal(got.grad, want.grad)
