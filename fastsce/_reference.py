"""The float64 NumPy reference: the executable form of SPEC §1.

Plain, whole-array NumPy, written for clarity, not speed: it allocates
full-size temporaries. Every fast backend is tested against it, and it is the
"numpy" backend. It takes the validated call record built by `_api`.
"""
import numpy as np

from ._layout import BLOCK
from ._partials import Partials

#: PyTorch BCELoss's clamps for probability inputs (SPEC §1.1).
LOG_CLAMP = -100.0
DENOM_FLOOR = 1e-12


def clog(u):
    """log(u) clamped below at -100, as PyTorch's BCELoss does."""
    return np.maximum(np.log(u), LOG_CLAMP)


def clog1m(c):
    """log(1 - c) clamped at -100; log1p(-c) where 1 - c would round (c <= 1/2)."""
    return np.maximum(np.where(c <= 0.5, np.log1p(-np.minimum(c, 0.5)), np.log(1 - c)), LOG_CLAMP)


def neg_entropy(z, zc):
    """z log z + (1-z) log(1-z), with 0 log 0 = 0.

    The log of the larger of z, 1-z is taken as log1p(-smaller), so a target
    near 0 or 1 does not lose its low bits to the rounding of 1 - z.
    """
    small = z <= 0.5
    lz = np.where(small, np.log(np.where(z > 0, z, 1.0)), np.log1p(-zc))
    lzc = np.where(small, np.log1p(-z), np.log(np.where(zc > 0, zc, 1.0)))
    return np.where(z > 0, z * lz, 0.0) + np.where(zc > 0, zc * lzc, 0.0)


def _times(coef, value):
    """coef*value, but 0 where coef == 0 even if value is infinite (SPEC §2)."""
    return np.where(coef == 0, 0.0, coef * value)


def soft_targets(call):
    """(z, 1-z) in float64 from raw targets, scaled and smoothed.

    1-z is taken as (scale - t)/scale so integer codes near the top of the
    scale keep full precision.
    """
    t = np.asarray(call.z, dtype=np.float64)
    z, zc = t / call.scale, (call.scale - t) / call.scale
    eps = call.label_smoothing
    if eps:
        z, zc = z * (1 - eps) + eps / 2, zc * (1 - eps) + eps / 2
    return t, z, zc


def valid_mask(call, t):
    """True where an element counts: the mask, minus ignored target codes."""
    valid = np.ones(call.shape, dtype=bool)
    if call.m is not None:
        valid = valid & call.m
    if call.ignore_value is not None:
        valid = valid & (t != call.ignore_value)
    return np.broadcast_to(valid, call.shape)


def binary_elementwise(call):
    """Per-element loss and d loss / d input (before weight, mask and scaling)."""
    x = np.asarray(call.x, dtype=np.float64)
    t, z, zc = soft_targets(call)
    a = 1.0 if call.pw is None else np.asarray(call.pw, dtype=np.float64)
    az = a * z
    with np.errstate(all="ignore"):
        if call.from_logits:
            # e = exp(-|x|): loss = log1p(e)*(a z + 1-z) + |x|*(1-z or a z),
            # a sum of non-negative terms, so it keeps full relative precision.
            e = np.exp(-np.abs(x))
            pos = x >= 0
            loss = np.log1p(e) * (az + zc) + _times(np.where(pos, zc, az), np.abs(x))
            dloss = np.where(pos, zc - az * e, zc * e - az) / (1 + e)
        else:
            loss = -(_times(az, clog(x)) + _times(zc, clog1m(x)))
            dloss = (zc * x - az * (1 - x)) / np.maximum(x * (1 - x), DENOM_FLOOR)
        if call.divergence:
            loss = loss + neg_entropy(z, zc)
    return t, loss, dloss


def _bad_targets(call, t, valid):
    """Counted elements whose target is outside [0, 1] or NaN, as flat indices."""
    # t in [0, scale], compared as the kernels compare it (class indices of a
    # single class have scale 0: t / scale would be NaN for the valid label 0).
    return np.flatnonzero(np.broadcast_to(valid & ~((t >= 0) & (t <= call.scale)), call.shape))


def _groups(call, a):
    """Per-group, per-block sums of a (shape-sized) array: groups are runs of
    group_size elements cut into blocks of BLOCK, as the fast kernels cut them,
    so chunks of an Accumulator that fall on block edges sum the same blocks."""
    per = -(-call.group_size // BLOCK)
    if per == 1:
        return np.reshape(a, (-1, call.group_size)).sum(axis=1, keepdims=True, dtype=np.float64)
    groups = np.zeros((a.size // call.group_size, per * BLOCK))
    groups[:, :call.group_size] = np.reshape(a, (-1, call.group_size))
    return groups.reshape(len(groups), per, BLOCK).sum(axis=2)


def _per_element(call):
    """Each element's gradient scale: its group's entry of call.gscale."""
    return np.repeat(call.gscale, call.group_size).reshape(call.shape)


def binary(call):
    """Run one binary call: fills call.grad / call.loss_map, returns partials."""
    t, loss, dloss = binary_elementwise(call)
    valid = valid_mask(call, t)
    flat_bad = _bad_targets(call, t, valid)
    w = 1.0 if call.w is None else np.asarray(call.w, dtype=np.float64)
    # inf and NaN are legitimate values here (SPEC §2), and so is a float32
    # result that overflows: no warnings.
    with np.errstate(all="ignore"):
        wloss = np.where(valid, w * loss, 0.0)
        if call.grad is not None:
            call.grad[...] = np.where(valid, dloss * (w * _per_element(call)), 0.0)
        if call.loss_map is not None:
            call.loss_map[...] = wloss
        loss = _groups(call, wloss)
    return Partials(loss, _groups(call, valid).astype(np.int64), int(flat_bad.size),
                    int(flat_bad[0]) if flat_bad.size else -1)


def count_valid(call):
    """Count and check without computing the loss (the pre-pass of `_api`)."""
    t = np.asarray(call.z, dtype=np.float64)
    valid = valid_mask(call, t)
    flat_bad = _bad_targets(call, t, valid)
    count = _groups(call, valid).astype(np.int64)
    return Partials(np.zeros(count.shape), count, int(flat_bad.size),
                    int(flat_bad[0]) if flat_bad.size else -1)


# ------------------------------------------------------------------ softmax


def _class_last(a, axis):
    """float64, the class axis last and contiguous, whatever the input's
    layout: its sums then run in one order, so NCHW and NHWC agree bitwise."""
    return np.moveaxis(np.asarray(a), axis, -1).astype(np.float64, order="C")


def softmax_targets(call):
    """(raw, z) in float64 with the class axis last; z scaled and smoothed."""
    C = call.classes
    if call.hard:
        labels = np.broadcast_to(call.z, call.shape).astype(np.int64)
        raw = labels
        z = (labels[..., None] == np.arange(C)).astype(np.float64)
    else:
        raw = _class_last(np.broadcast_to(call.z, call.x.shape), call.axis)
        z = raw / call.scale
    eps = call.label_smoothing
    if eps:
        z = z * (1 - eps) + eps / C
    return raw, z


def softmax_elementwise(call):
    """Per-pixel loss and per-class d loss / d input (before pixel weight and mask)."""
    x = _class_last(call.x, call.axis)
    raw, z = softmax_targets(call)
    cw = 1.0 if call.cw is None else np.asarray(call.cw, dtype=np.float64)
    wz = cw * z
    with np.errstate(all="ignore"):
        if call.from_logits:
            m = np.max(x, axis=-1, keepdims=True)
            e = softmax_exps(x, m)
            # s = 1 + r, r the other classes' exps (first argmax excluded), and
            # log s = log1p(r): a dominant class keeps the small loss exactly.
            first = np.argmax(x, axis=-1)[..., None] == np.arange(x.shape[-1])
            r = np.sum(np.where(first, 0.0, e), axis=-1)
            d = np.where(x == m, 0.0, x - m)
            # Each term wz*((m - x) + log s) is non-negative: full relative precision.
            loss = np.sum(_times(wz, -d), axis=-1) + np.sum(wz, axis=-1) * np.log1p(r)
            dloss = np.sum(wz, axis=-1, keepdims=True) * (e / (1 + r[..., None])) - wz
        else:
            loss = -np.sum(_times(wz, clog(x)), axis=-1)
            dloss = -wz / np.maximum(x, DENOM_FLOOR)
        if call.divergence:
            loss = loss + np.sum(_times(wz, np.log(np.where(z > 0, z, 1.0))), axis=-1)
    return raw, loss, dloss


def softmax_exps(x, m):
    """exp(x - m) with the rounding of x - m put back (TwoSum), so a class far
    below the maximum keeps its probability's low bits; x == m gives 1 even
    for m = +inf (the limit, SPEC §2)."""
    d = np.where(x == m, 0.0, x - m)
    bb = d - x
    err = (x - (d - bb)) + (-m - bb)
    err = np.where(np.isnan(err), 0.0, err)
    e = np.exp(d)
    return e + e * err


def softmax(call):
    """Run one softmax call: fills call.grad / call.loss_map, returns totals."""
    raw, loss, dloss = softmax_elementwise(call)
    C = call.classes
    valid = np.ones(call.shape, dtype=bool)
    if call.m is not None:
        valid = valid & call.m
    if call.hard:
        if call.ignore_value is not None:
            valid = valid & (raw != call.ignore_value)
        bad = valid & ((raw < 0) | (raw >= C))
    else:
        r = raw / call.scale
        bad_el = np.broadcast_to(valid[..., None], r.shape) & ~((r >= 0) & (r <= 1))
        bad = bad_el.any(axis=-1)
    valid = np.broadcast_to(valid, call.shape)
    w = 1.0 if call.w is None else np.asarray(call.w, dtype=np.float64)
    with np.errstate(all="ignore"):
        wloss = np.where(valid, w * loss, 0.0)
        if call.grad is not None:
            w_pixel = np.asarray(w)[..., None] if np.ndim(w) else w
            scale = _per_element(call)[..., None]
            g = np.where(valid[..., None], dloss * (w_pixel * scale), 0.0)
            call.grad[...] = np.moveaxis(g, -1, call.axis)
        if call.loss_map is not None:
            call.loss_map[...] = wloss
        loss = _groups(call, wloss)
    flat_bad = np.flatnonzero(bad)
    return Partials(loss, _groups(call, valid).astype(np.int64),
                    int(np.count_nonzero(bad_el) if not call.hard else flat_bad.size),
                    int(flat_bad[0]) if flat_bad.size else -1)
