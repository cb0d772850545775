"""Exact (mpmath, 60 digits) oracle and an independent float64 statement of the
multiclass (softmax) cross-entropy of SPEC §1.2-§1.4.

Oracle: every float input is taken as the exact binary value it holds (the
class weights as the working dtype holds them, since the kernels compute in
it); integer-coded targets may be passed as ``fractions.Fraction``.
Non-finite logits get the limits of the formula (SPEC §2):

* a class with logit -inf has softmax 0 and ``lse - x = +inf``: it adds 0 to
  the loss when ``w*z == 0``, +inf otherwise; its gradient is ``-w*z``;
* one class with logit +inf has softmax 1 and ``lse - x = 0``; every other
  class has ``lse - x = +inf``.

Two or more +inf logits, or no finite logit and no +inf, have no limit (the
answer depends on the path) and are refused.

Error measure (SPEC §1.2): the loss against the loss itself (a sum of
non-negative terms; with ``divergence`` the larger of the cross-entropy and
the magnitude of the target's entropy term, since KL is their difference);
the gradient of class k against ``max(W*softmax_k, w_k*z_k)`` with
``W = sum_j w_j z_j``.  A target the kernel must round before use (label
smoothing ``z' = z(1-eps) + eps/C``, integer codes t/255) may add one ulp of
``z'_k`` per class times the result's sensitivity to ``z'_k``; that is
reported as an absolute ``slack`` added to the allowed error (see
``ulp_error_slack``), as exact.py widens its scales for the binary loss.

Both dtypes get the actual rounding error of each shift ``m - x_k`` in the
working dtype (SPEC §2: float32 inputs compute element-wise in float32), as
slack on exp(x_k - m) and what depends on it (``shift_slack``); it is zero
where the difference is exact.

Float64 inputs also get the rounding bound of one float64 sum of C terms,
``(C-1) * 2**-53`` times the scale, on the loss and on each gradient element
(SPEC §2: "every sum is accumulated in float64"; it asks for no compensated
sums).  That is at most (C-1)/2 ulp: nothing for C=1, at most half an ulp
for C=2.  It does not cover a ``log`` of the rounded sum ``1 + small`` (the
small part's relative precision is lost there, unbounded in ulps of a tiny
loss).  Float32 inputs get no such allowance: their sums are in float64.
"""

import functools
import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
from mpmath import mp, mpf

from exact import _key, overflow_threshold, rounds_to, to_mpf, ulp
from naive import UINT_SCALES, Expected

mp.dps = 60

_INF = mpf("inf")
_ONE_E_MINUS_12 = mpf("1e-12")
_CLOG_FLOOR = mpf(-100)


class ExactSoftmax(NamedTuple):
    """Exact loss (one pixel) and gradient (per class), with their error scales."""

    loss: mpf
    grad: tuple
    loss_scale: mpf
    grad_scale: tuple
    # sensitivities to the targets (for the slack of rounded targets)
    zs: tuple          # z'_k, exact
    dloss_dz: tuple    # |d loss / d z'_k|
    softmax: tuple     # softmax_k (exact), 0 for probabilities
    cw: tuple          # w_k
    from_logits: bool
    shift: tuple       # m - x_k, exact (inf for a -inf logit; 0 for probabilities)
    top: int           # the class whose logit is m (-1: a +inf logit, or probabilities)


def _smoothed(z, eps, C):
    eps = to_mpf(eps)
    return tuple(to_mpf(v) * (1 - eps) + eps / C for v in z)


def _times(coef, value):
    """coef*value with 0*inf = 0 (a zero-target class contributes nothing)."""
    return mpf(0) if coef == 0 else coef * value


@functools.lru_cache(maxsize=None)
def _softmax_ce_exact(x, z, cw, eps, divergence, from_logits):
    C = len(x)
    zs = _smoothed(z, eps, C)
    w = tuple(to_mpf(v) for v in cw) if cw is not None else (mpf(1),) * C
    wz = tuple(a * b for a, b in zip(w, zs))
    W = sum(wz, mpf(0))
    if from_logits:
        xs = [mpf(v) for v in x]  # floats, possibly +-inf
        pos = [k for k, v in enumerate(x) if v == math.inf]
        fin = [k for k, v in enumerate(x) if math.isfinite(v)]
        if len(pos) > 1:
            raise ValueError("two +inf logits in one pixel have no limit")
        if pos:
            p = pos[0]
            sm = tuple(mpf(1) if k == p else mpf(0) for k in range(C))
            gap = tuple(mpf(0) if k == p else _INF for k in range(C))  # lse - x_k
            shift, top = (mpf(0),) * C, -1
        else:
            if not fin:
                raise ValueError("a pixel without a finite logit has no limit")
            m = max(xs[k] for k in fin)
            top = next(k for k in fin if xs[k] == m)
            # log(sum) = log1p(sum of the others): 1 + 1e-87 is 1 even at 60 digits
            rest = sum((mp.exp(xs[k] - m) for k in fin if k != top), mpf(0))
            ls = mp.log1p(rest)
            gap = tuple((m - xs[k]) + ls if k in fin else _INF for k in range(C))
            shift = tuple(m - xs[k] if k in fin else _INF for k in range(C))
            sm = tuple(mp.exp(-g) if k in fin else mpf(0) for k, g in enumerate(gap))
        terms = tuple(_times(a, g) for a, g in zip(wz, gap))
        ce = sum(terms, mpf(0))
        grad = tuple(W * s_k - a for s_k, a in zip(sm, wz))
        gscale = tuple(max(W * s_k, a) for s_k, a in zip(sm, wz))
        dl = [w_k * g for w_k, g in zip(w, gap)]
    else:
        c = tuple(to_mpf(v) for v in x)
        clog = tuple(_CLOG_FLOOR if v <= 0 else max(mp.log(v), _CLOG_FLOOR) for v in c)
        ce = -sum((a * lc for a, lc in zip(wz, clog)), mpf(0))
        grad = tuple(-a / max(v, _ONE_E_MINUS_12) for a, v in zip(wz, c))
        gscale = tuple(abs(g) for g in grad)
        dl = [w_k * -lc for w_k, lc in zip(w, clog)]
        sm = (mpf(0),) * C
        shift, top = (mpf(0),) * C, -1
    loss = ce
    lscale = ce
    if divergence:
        neg_ent = sum((a * mp.log(v) for a, v in zip(wz, zs) if v > 0), mpf(0))
        loss = ce + neg_ent
        lscale = max(ce, abs(neg_ent))
        dl = [d + (w_k * (mp.log(v) + 1) if v > 0 else 0) for d, w_k, v in zip(dl, w, zs)]
    return ExactSoftmax(loss, grad, lscale, gscale, zs, tuple(abs(d) for d in dl), sm, w,
                        from_logits, shift, top)


def softmax_ce_exact(x, z, *, class_weights=None, label_smoothing=0.0, divergence=False,
                     from_logits=True):
    """Exact loss and gradient of one pixel; ``x``, ``z`` sequences of length C.

    ``class_weights`` must already be the values the kernel uses (rounded to
    the working dtype).  ``z`` entries may be Fractions (integer codes).
    """
    xk = tuple(float(v) for v in x)
    if any(math.isnan(v) for v in xk):
        raise ValueError("the oracle takes no NaN")
    zk = tuple(_key(v) for v in z)
    cw = None if class_weights is None else tuple(float(v) for v in class_weights)
    return _softmax_ce_exact(xk, zk, cw, float(label_smoothing), bool(divergence),
                             bool(from_logits))


def target_slack(e, dtype):
    """Absolute slack of one rounding of each z'_k to ``dtype``: (loss, grads)."""
    uz = [ulp(v, dtype) if v > 0 else mpf(0) for v in e.zs]
    loss_slack = sum((d * u for d, u in zip(e.dloss_dz, uz) if d != _INF), mpf(0))
    if e.from_logits:
        wu = sum((w * u for w, u in zip(e.cw, uz)), mpf(0))
        grad_slack = tuple(s * wu + w * u for s, w, u in zip(e.softmax, e.cw, uz))
    else:
        grad_slack = tuple(abs(g) * u / v if v > 0 else mpf(0)
                           for g, u, v in zip(e.grad, uz, e.zs))
    return loss_slack, grad_slack


def shift_slack(e, dtype):
    """Slack of one rounding of each m - x_k to ``dtype`` (SPEC §2: float32 inputs
    compute element-wise in float32): |fl(d) - d| is the actual rounding error
    of d = m - x_k, zero where the difference is exact.  exp(x_k - m) is then
    off by that relative error, which reaches softmax_k, the sum in the log
    and, through the sum, every other class."""
    C = len(e.grad)
    if not e.from_logits:
        return mpf(0), (mpf(0),) * C
    delta = [mpf(0) if d == _INF or d == 0 else abs(to_mpf(rounds_to(d, dtype)) - d)
             for d in e.shift]
    W = sum((w * z for w, z in zip(e.cw, e.zs)), mpf(0))
    spread = sum((sk * dk for sk, dk in zip(e.softmax, delta)), mpf(0))
    loss_slack = W * spread + sum((w * z * dk for w, z, dk in zip(e.cw, e.zs, delta)), mpf(0))
    grad_slack = tuple(W * sk * (dk + spread) for sk, dk in zip(e.softmax, delta))
    return loss_slack, grad_slack


def allowed_slack(e, dtype, rounded_targets=False):
    """(loss, grads) absolute slack: rounded targets, rounded shifts m - x_k,
    float64 class sums (module doc)."""
    C = len(e.grad)
    if rounded_targets:
        loss_slack, grad_slack = target_slack(e, dtype)
    else:
        loss_slack, grad_slack = mpf(0), (mpf(0),) * C
    ls, gs = shift_slack(e, dtype)
    loss_slack += ls
    grad_slack = tuple(a + b for a, b in zip(grad_slack, gs))
    if np.dtype(dtype) == np.float64 and C > 1:
        f = (C - 1) * mpf(2) ** -53
        if e.loss_scale != _INF:
            loss_slack += f * e.loss_scale
        grad_slack = tuple(g + f * sc for g, sc in zip(grad_slack, e.grad_scale))
    return loss_slack, grad_slack


def ulp_error_slack(got, exact, dtype, scale, slack=0):
    """max(|got - exact| - slack, 0) / ulp(dtype at max(|exact|, scale)).

    An exact value that rounds to infinity in ``dtype`` (or is infinite)
    demands exactly that infinity; NaN or an unexpected infinity in ``got``
    is an infinite error.
    """
    got = float(got)
    ex = to_mpf(exact)
    if math.isnan(got):
        return math.inf
    if abs(ex) >= overflow_threshold(dtype):
        return 0.0 if got == math.copysign(math.inf, ex) else math.inf
    if math.isinf(got):
        return math.inf
    s = max(abs(ex), abs(to_mpf(scale)))
    err = max(abs(mpf(got) - ex) - to_mpf(slack), mpf(0))
    return float(err / ulp(s, dtype))


# --------------------------------------------------------------------------
# an independent float64 statement (finite inputs), for the API tests


def _class_last(a, axis):
    return np.moveaxis(np.asarray(a), axis, -1)


def naive_softmax(logits, targets, *, axis=1, class_weights=None, weight=None, mask=None,
                  ignore_value=None, label_smoothing=0.0, divergence=False,
                  from_logits=True, target_scale=None, reduction="mean", grad_scale=1.0):
    """SPEC §1.2-§1.4 in plain float64 NumPy, written from the spec.

    Returns a ``naive.Expected`` (loss, grad and error scales), so that
    ``naive.check_result`` compares a LossResult with it.  Loss map and
    scales have the pixel shape, the gradient the logits' shape.
    """
    x_raw = np.asarray(logits)
    ax = axis % x_raw.ndim
    x = _class_last(x_raw.astype(np.float64), ax)
    C = x.shape[-1]
    pshape = x.shape[:-1]
    t = np.asarray(targets)
    valid = np.ones(pshape, bool)
    if t.dtype.kind in "iu" and t.shape != x_raw.shape and t.ndim == len(pshape):
        labels = np.broadcast_to(t, pshape).astype(np.int64)
        if ignore_value is not None:
            valid &= labels != ignore_value
        z = (labels[..., None] == np.arange(C)).astype(np.float64)
    else:
        tb = _class_last(np.broadcast_to(t, x_raw.shape), ax).astype(np.float64)
        scale = UINT_SCALES.get(t.dtype, 1.0) if target_scale is None else float(target_scale)
        z = tb / scale
    eps = float(label_smoothing)
    z = z * (1 - eps) + eps / C
    w = np.ones(C) if class_weights is None else np.asarray(class_weights, np.float64)
    if mask is not None:
        valid &= np.broadcast_to(mask, pshape)
    pw = np.ones(pshape) if weight is None else np.broadcast_to(
        np.asarray(weight, np.float64), pshape)
    wz = w * z
    W = wz.sum(-1, keepdims=True)
    if from_logits:
        m = x.max(-1, keepdims=True)
        e = np.exp(x - m)
        top = np.argmax(x, axis=-1)[..., None] == np.arange(C)
        rest = np.where(top, 0.0, e).sum(-1, keepdims=True)
        s = 1.0 + rest
        # log1p of the others: a dominant class's tiny loss keeps its precision
        gap = (m - x) + np.log1p(rest)
        ce = (wz * gap).sum(-1)
        sm = e / s
        grad = W * sm - wz
        gsc = np.maximum(W * sm, wz)
    else:
        with np.errstate(divide="ignore"):
            lc = np.maximum(np.log(x), -100.0)
        ce = -(wz * lc).sum(-1)
        grad = -wz / np.maximum(x, 1e-12)
        gsc = np.abs(grad)
    if from_logits and x_raw.dtype != np.float64:
        # one rounding of m - x_k in float32 (see shift_slack): as an absolute
        # slack, turned into scale for check_result's 8 float32 ulps (x 2**21)
        d = m - x
        delta = np.abs(d.astype(np.float32).astype(np.float64) - d)
        spread = (sm * delta).sum(-1, keepdims=True)
        gsc = gsc + W * sm * (delta + spread) * 2.0 ** 21
        shift_loss = (W * spread)[..., 0] + (wz * delta).sum(-1)
    else:
        shift_loss = 0.0
    loss = ce
    lsc = ce + shift_loss * 2.0 ** 21
    if divergence:
        neg = (np.where(z > 0, wz * np.log(np.where(z > 0, z, 1.0)), 0.0)).sum(-1)
        loss = ce + neg
        lsc = np.maximum(lsc, np.abs(neg))
    loss_elem = np.where(valid, pw * loss, 0.0)
    lsc = np.where(valid, pw * lsc, 0.0)
    count = int(np.count_nonzero(valid))
    total = float(np.sum(loss_elem))
    if reduction == "none":
        out_loss, factor = loss_elem, 1.0
    elif reduction == "sum":
        out_loss, factor = total, 1.0
    elif reduction == "mean":
        out_loss = total / count if count else math.nan
        factor = 1.0 / count if count else 0.0
    else:
        raise ValueError(reduction)
    factor *= grad_scale
    gpix = (np.where(valid, pw, 0.0) * factor)[..., None]
    g = np.moveaxis(grad * gpix, -1, ax)
    gs = np.moveaxis(gsc * np.abs(gpix), -1, ax)
    return Expected(out_loss, g, loss_elem, lsc, gs, count)


def pytorch_cross_entropy(x, target, *, weight=None, ignore_index=-100, label_smoothing=0.0):
    """PyTorch's ``F.cross_entropy(reduction="mean")`` by hand in float64 (N, C, ...).

    torch (aten/src/ATen/native/LossNLL.cpp, cross_entropy):
    * probability targets: ``loss_n = -sum_c w_c z'_c log_softmax(x)_c`` with
      ``z' = z (1 - eps) + eps / C``; "mean" divides by the number of
      samples N*d1*..., whatever the weights.
    * class indices: ``-w_y log_softmax(x)_y``; "mean" divides by the sum
      of ``w_y`` over the non-ignored samples (smoothing not modelled here).
    Returns (mean loss, d mean / d x).
    """
    x = np.asarray(x, np.float64)
    C = x.shape[1]
    m = x.max(1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(1, keepdims=True))
    logp = x - lse
    p = np.exp(logp)
    wshape = (1, C) + (1,) * (x.ndim - 2)
    w = np.ones(wshape) if weight is None else np.asarray(weight, np.float64).reshape(wshape)
    target = np.asarray(target)
    if target.shape == x.shape:  # probabilities
        z = target.astype(np.float64) * (1 - label_smoothing) + label_smoothing / C
        per = -(w * z * logp).sum(1)
        n = per.size
        grad = ((w * z).sum(1, keepdims=True) * p - w * z) / n
        return float(per.sum() / n), grad
    if label_smoothing:
        raise NotImplementedError("class indices with label smoothing: not needed here")
    keep = target != ignore_index
    y = np.where(keep, target, 0)
    onehot = (np.expand_dims(y, 1) == np.arange(C).reshape(wshape)).astype(np.float64)
    onehot *= np.expand_dims(keep, 1)
    wz = w * onehot
    per = -(wz * logp).sum(1)
    denom = wz.sum()  # sum of w_y over the non-ignored samples
    grad = (wz.sum(1, keepdims=True) * p - wz) / denom
    return float(per.sum() / denom), grad


__all__ = ["ExactSoftmax", "Fraction", "naive_softmax", "pytorch_cross_entropy",
           "softmax_ce_exact", "allowed_slack", "target_slack", "ulp_error_slack"]
