"""Exact (mpmath, 60 digits) oracle for the binary cross-entropy of SPEC §1.1.

Every float input is taken as the exact binary value it holds; integer-coded
targets are passed as ``fractions.Fraction(t, scale)`` so that ``t/255`` is
exact too.  Nothing here is vectorized or fast: the oracle is used on the few
hundred hard cases of ``test_sigmoid_exact.py`` and cached.

Error measure (SPEC §1.1): ``ulp_error(got, exact, dtype, scale)`` is
``|got - exact| / ulp(dtype at max(|exact|, scale))``.  For the loss the scale
is the loss itself (a sum of non-negative terms); for the gradient it is the
larger of the two terms ``(1-z)*sigmoid(x)`` and ``z*a*sigmoid(-x)``; for the
KL divergence it is the cross-entropy (KL is a difference).  Targets that the
implementation must round before use (integer codes t/255, label-smoothed
z' = z(1-eps)+eps/2) add the sensitivity to the target, |d/dz'|, to the
scale: one rounding of z' to the working dtype is then worth about one ulp.
"""

import functools
import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
from mpmath import mp, mpf

mp.dps = 60

# (precision in bits incl. the implicit one, emin, emax) of IEEE formats.
_FORMATS = {
    np.dtype(np.float16): (11, -14, 15),
    np.dtype(np.float32): (24, -126, 127),
    np.dtype(np.float64): (53, -1022, 1023),
}

_ONE_E_MINUS_12 = mpf("1e-12")  # SPEC: denominator floor of the probability gradient
_CLOG_FLOOR = mpf(-100)  # SPEC: clog(u) = max(log(u), -100)


def to_mpf(v):
    """The exact value of ``v`` (float, numpy scalar, int, Fraction, mpf)."""
    if isinstance(v, mpf):
        return v
    if isinstance(v, Fraction):
        return mpf(v.numerator) / mpf(v.denominator)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return mpf(int(v))
    f = float(v)  # exact for float16/32/64 values
    if math.isnan(f):
        raise ValueError("the oracle only takes finite values, got NaN")
    return mpf(f)


def _fmt(dtype):
    try:
        return _FORMATS[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no ulp for dtype {np.dtype(dtype)}") from None


def ulp(value, dtype):
    """ulp of ``dtype`` at magnitude ``|value|`` (smallest subnormal below normal)."""
    p, emin, emax = _fmt(dtype)
    v = abs(to_mpf(value))
    if v == 0:
        e = emin
    else:
        _, e2 = mp.frexp(v)  # v = m * 2**e2, 0.5 <= m < 1
        e = max(int(e2) - 1, emin)
    e = min(e, emax)
    return mpf(2) ** (e - p + 1)


def overflow_threshold(dtype):
    """Smallest magnitude that rounds to infinity in ``dtype`` (round to nearest)."""
    p, _, emax = _fmt(dtype)
    return (2 - mpf(2) ** (-p)) * mpf(2) ** emax


def rounds_to(value, dtype):
    """``value`` correctly rounded to ``dtype``, as a Python float (for asserting)."""
    v = to_mpf(value)
    if abs(v) >= overflow_threshold(dtype):
        return math.copysign(math.inf, v)
    return float(np.dtype(dtype).type(float(v)))  # float64 rounding then dtype: fine for tests


def _ulp_error_scalar(got, exact, dtype, scale):
    got = float(got)
    ex = to_mpf(exact)
    if math.isnan(got):
        return math.inf
    if abs(ex) >= overflow_threshold(dtype):
        return 0.0 if got == math.copysign(math.inf, ex) else math.inf
    if math.isinf(got):
        return math.inf
    s = abs(ex) if scale is None else max(abs(ex), abs(to_mpf(scale)))
    return float(abs(mpf(got) - ex) / ulp(s, dtype))


def ulp_error(got, exact, dtype, scale=None):
    """|got - exact| / ulp(dtype at max(|exact|, scale)).

    ``got`` a float or array; ``exact``/``scale`` an mpf/float or a sequence
    (object array) of them of the same shape.  An exact value that rounds to
    infinity in ``dtype`` demands exactly that infinity (error 0, else inf).
    A NaN or an unexpected infinity in ``got`` is an infinite error.  Returns a
    float, or a float64 array for array input.
    """
    if np.ndim(got) == 0 and np.ndim(exact) == 0:
        return _ulp_error_scalar(got, exact, dtype, scale)
    got = np.asarray(got)
    exact = np.asarray(exact, dtype=object)
    sc = None if scale is None else np.asarray(scale, dtype=object)
    out = np.empty(np.broadcast_shapes(got.shape, exact.shape), dtype=np.float64)
    for idx in np.ndindex(out.shape):
        g = got[idx] if got.ndim else got[()]
        e = exact[idx] if exact.ndim else exact[()]
        s = None if sc is None else (sc[idx] if sc.ndim else sc[()])
        out[idx] = _ulp_error_scalar(g, e, dtype, s)
    return out


# --------------------------------------------------------------------------
# the losses


def softplus(t):
    """log(1 + exp(t)), exact to the working precision for any t."""
    t = to_mpf(t)
    if t > 0:
        return t + mp.log1p(mp.exp(-t))
    return mp.log1p(mp.exp(t))


def sigmoid(t):
    t = to_mpf(t)
    if t >= 0:
        return 1 / (1 + mp.exp(-t))
    e = mp.exp(t)
    return e / (1 + e)


def _xlogx(u):
    return mpf(0) if u == 0 else u * mp.log(u)


def _clog(u):
    if u <= 0:
        return _CLOG_FLOOR
    return max(mp.log(u), _CLOG_FLOOR)


class Exact(NamedTuple):
    """Exact loss and gradient with the scales their errors are measured by."""

    loss: mpf
    grad: mpf
    loss_scale: mpf
    grad_scale: mpf


def _smoothed(z, eps):
    """z' and 1 - z' computed exactly (both, to avoid cancellation)."""
    z = to_mpf(z)
    eps = to_mpf(eps)
    return z * (1 - eps) + eps / 2, (1 - z) * (1 - eps) + eps / 2


@functools.lru_cache(maxsize=None)
def _sigmoid_ce_exact(x, z, a, eps, divergence, target_rounding):
    x = to_mpf(x)
    a = to_mpf(a)
    zs, omz = _smoothed(z, eps)
    sp_pos = softplus(x)
    sp_neg = softplus(-x)
    ce = a * zs * sp_neg + omz * sp_pos
    loss = ce
    dl_dz = a * sp_neg - sp_pos
    if divergence:
        loss = ce + _xlogx(zs) + _xlogx(omz)
        if 0 < zs < 1:
            dl_dz += mp.log(zs) - mp.log(omz)
    s_pos = sigmoid(x)
    s_neg = sigmoid(-x)
    g1 = omz * s_pos
    g2 = a * zs * s_neg
    grad = g1 - g2
    loss_scale = ce
    grad_scale = max(g1, g2)
    if target_rounding:
        loss_scale = max(loss_scale, abs(dl_dz))
        grad_scale = max(grad_scale, s_pos + a * s_neg)
    return Exact(loss, grad, loss_scale, grad_scale)


def _key(v):
    """Hashable exact key for the cache (floats by value, Fractions as is)."""
    if isinstance(v, Fraction):
        return v
    if isinstance(v, mpf):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    return float(v)


def sigmoid_ce_exact(x, z, *, pos_weight=1.0, label_smoothing=0.0, divergence=False,
                     target_rounding=None):
    """Exact per-element binary cross-entropy from logits, SPEC §1.1 and §1.3.

    loss = a*z'*sp(-x) + (1-z')*sp(x)   [- H(z') with divergence]
    grad = (1-z')*sigmoid(x) - a*z'*sigmoid(-x)

    ``target_rounding`` (default: on when label_smoothing != 0 or z is a
    Fraction) widens the scales by the sensitivity to z' (see module doc).
    """
    if target_rounding is None:
        target_rounding = bool(label_smoothing) or isinstance(z, Fraction)
    return _sigmoid_ce_exact(_key(x), _key(z), _key(pos_weight), _key(label_smoothing),
                             bool(divergence), bool(target_rounding))


@functools.lru_cache(maxsize=None)
def _bce_prob_exact(c, z, a, eps, target_rounding):
    c = to_mpf(c)
    a = to_mpf(a)
    zs, omz = _smoothed(z, eps)
    lc = _clog(c)
    l1c = _clog(1 - c)
    t1 = -(a * zs * lc)
    t2 = -(omz * l1c)
    loss = t1 + t2
    den = max(c * (1 - c), _ONE_E_MINUS_12)
    g1 = omz * c / den
    g2 = a * zs * (1 - c) / den
    grad = g1 - g2
    loss_scale = loss
    grad_scale = max(g1, g2)
    if target_rounding:
        loss_scale = max(loss_scale, abs(-a * lc + l1c))
        grad_scale = max(grad_scale, (a * (1 - c) + c) / den)
    return Exact(loss, grad, loss_scale, grad_scale)


def bce_prob_exact(c, z, *, pos_weight=1.0, label_smoothing=0.0, target_rounding=None):
    """Exact binary cross-entropy from probabilities (``from_logits=False``).

    loss = -(a*z'*clog(c) + (1-z')*clog(1-c)),  clog(u) = max(log(u), -100)
    grad = (-(a*z')*(1-c) + (1-z')*c) / max(c*(1-c), 1e-12)
    """
    if target_rounding is None:
        target_rounding = bool(label_smoothing) or isinstance(z, Fraction)
    return _bce_prob_exact(_key(c), _key(z), _key(pos_weight), _key(label_smoothing),
                           bool(target_rounding))
