"""Accuracy on hard cases against the exact (mpmath) values, SPEC §1.1 and §2.

Every backend, float32 and float64, reduction="none": loss and gradient
within 4 ulp by the measures of SPEC §1.1 (see exact.py) over the whole
finite range of x and z; the limits SPEC §2 prescribes for +-inf; NaN
confined to its own element; integer-coded targets against exact t/255.
"""
from fractions import Fraction

import numpy as np
import pytest

import fastsce
from exact import bce_prob_exact, sigmoid_ce_exact, ulp_error

MAX_ULP = 4.0
DTYPES = [np.float32, np.float64]

_X_MAGNITUDES = [1e-30, 1e-7, 0.5, 1.0, 10.0, 17.0, 30.0, 50.0, 88.0, 100.0, 700.0, 1e30]
Z_VALUES = [0.0, 1e-7, 0.25, 0.5, 1 - 1e-7, 1.0]
C_VALUES = [0.0, 1e-30, 1e-7, 0.3, 0.5, 1 - 1e-7, 1.0]


def hard_x(dtype):
    mags = [np.dtype(dtype).type(v) for v in _X_MAGNITUDES] + [np.finfo(dtype).max]
    return np.array([0.0] + [s * m for m in mags for s in (1, -1)], dtype=dtype)


def grid(xs, zs, dtype):
    """Contiguous (len(xs), len(zs)) logits and targets of ``dtype``."""
    x = np.array(xs, dtype=dtype)[:, None] * np.ones(len(zs), dtype=dtype)
    z = np.ones(len(xs), dtype=dtype)[:, None] * np.array(zs, dtype=dtype)
    return np.ascontiguousarray(x), np.ascontiguousarray(z)


def as_param(value, dtype):
    """A scalar option as the kernels see it: rounded to the working dtype once."""
    return float(np.dtype(dtype).type(value))


def assert_ulp(got_loss, got_grad, exacts, x, z, dtype, max_ulp=MAX_ULP):
    """Every element of loss and grad within ``max_ulp`` by the SPEC measures."""
    loss_err = np.empty(x.shape)
    grad_err = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        e = exacts[idx]
        loss_err[idx] = ulp_error(got_loss[idx], e.loss, dtype, e.loss_scale)
        grad_err[idx] = ulp_error(got_grad[idx], e.grad, dtype, e.grad_scale)
    problems = []
    for name, err, got in (("loss", loss_err, got_loss), ("grad", grad_err, got_grad)):
        bad = np.argwhere(~(err <= max_ulp))
        for idx in bad[:8]:
            idx = tuple(idx)
            ex = getattr(exacts[idx], name)
            problems.append(f"{name} x={x[idx]!r} z={z[idx]!r}: got {got[idx]!r}, "
                            f"exact {float(ex)!r} ({err[idx]:.3g} ulp)")
        if len(bad) > 8:
            problems.append(f"... {len(bad)} {name} elements in all")
    assert not problems, "\n".join(problems)
    return loss_err.max(initial=0), grad_err.max(initial=0)


LOGIT_OPTIONS = {
    "plain": {},
    "pos_weight=0.3": {"pos_weight": 0.3},
    "pos_weight=4": {"pos_weight": 4.0},
    "label_smoothing=0.1": {"label_smoothing": 0.1},
    "divergence": {"divergence": True},
}


@pytest.mark.parametrize("opts", list(LOGIT_OPTIONS), ids=list(LOGIT_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_logits_hard_cases(backend, dtype, opts):
    options = LOGIT_OPTIONS[opts]
    x, z = grid(hard_x(dtype), Z_VALUES, dtype)
    xc, zc = x.copy(), z.copy()
    res = fastsce.sigmoid_cross_entropy(x, z, reduction="none", backend=backend, **options)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(z, zc)
    assert res.loss.shape == x.shape and res.grad.shape == x.shape
    assert res.grad.dtype == np.dtype(dtype)
    oracle = {
        "pos_weight": as_param(options.get("pos_weight", 1.0), dtype),
        "label_smoothing": options.get("label_smoothing", 0.0),
        "divergence": options.get("divergence", False),
    }
    exacts = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape):
        exacts[idx] = sigmoid_ce_exact(x[idx], z[idx], **oracle)
    assert_ulp(res.loss, res.grad, exacts, x, z, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_logits_dense_sweep(backend, dtype):
    """|x| <= 18, where log1p(exp(-|x|)) is a polynomial in e = exp(-|x|) (float32:
    fastsce_math.h's log1p_01_f32), densely, with the exhaustive checks' worst
    cases among the points: the polynomial's (1.43 ulp at e = 0x1.e5adap-1) and
    the float32 exp's (1.03 ulp at x = -0x1.33a33ap+5)."""
    worst = [-np.log(float.fromhex("0x1.e5adap-1")), float.fromhex("0x1.33a33ap+5")]
    xs = np.concatenate([np.linspace(-18, 18, 1201), worst, np.negative(worst)]).astype(dtype)
    x, z = grid(xs, Z_VALUES, dtype)
    res = fastsce.sigmoid_cross_entropy(x, z, reduction="none", backend=backend)
    exacts = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape):
        exacts[idx] = sigmoid_ce_exact(x[idx], z[idx])
    assert_ulp(res.loss, res.grad, exacts, x, z, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tiny_loss_is_not_flushed(backend, dtype):
    # PyTorch float32 returns 0 here; the exact loss is 1.93e-22 (SPEC §1.1).
    x = np.array([-50.0, -30.0, 17.0], dtype=dtype)
    z = np.array([0.0, 0.0, 1.0], dtype=dtype)
    res = fastsce.sigmoid_cross_entropy(x, z, reduction="none", backend=backend)
    assert res.loss[0] == pytest.approx(1.9287498479639178e-22, rel=1e-6)
    assert res.loss[1] == pytest.approx(9.357622968839299e-14, rel=1e-6)
    assert res.loss[2] == pytest.approx(4.139937633089560e-08, rel=1e-6)
    assert res.grad[0] == pytest.approx(1.9287498479639178e-22, rel=1e-6)
    assert res.grad[2] == pytest.approx(-4.139937633089560e-08, rel=1e-6)


PROB_OPTIONS = {"plain": {}, "pos_weight=4": {"pos_weight": 4.0}}


@pytest.mark.parametrize("opts", list(PROB_OPTIONS), ids=list(PROB_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_probabilities_hard_cases(backend, dtype, opts):
    options = PROB_OPTIONS[opts]
    c, z = grid(C_VALUES, Z_VALUES, dtype)
    res = fastsce.sigmoid_cross_entropy(c, z, from_logits=False, reduction="none",
                                        backend=backend, **options)
    exacts = np.empty(c.shape, dtype=object)
    for idx in np.ndindex(c.shape):
        exacts[idx] = bce_prob_exact(c[idx], z[idx],
                                     pos_weight=as_param(options.get("pos_weight", 1.0), dtype))
    assert_ulp(res.loss, res.grad, exacts, c, z, dtype)
    # the clamps of SPEC §1.1, by hand: clog(0) = -100, 1/max(0, 1e-12)
    i0 = C_VALUES.index(0.0)
    j = Z_VALUES.index(0.5)
    a = options.get("pos_weight", 1.0)
    assert res.loss[i0, j] == pytest.approx(a * 0.5 * 100.0, rel=1e-6)
    assert res.grad[i0, j] == pytest.approx(-a * 0.5 * 1e12, rel=1e-6)


# ---------------------------------------------------------------- non-finite

def _limit(x, z, a, eps):
    """SPEC §2 limits for x = +-inf; NaN propagates."""
    zs = z * (1 - eps) + eps / 2
    omz = (1 - z) * (1 - eps) + eps / 2
    if np.isnan(x):
        return np.nan, np.nan
    if x > 0:
        return (np.inf if omz > 0 else 0.0), omz
    return (np.inf if a * zs > 0 else 0.0), -a * zs


NONFINITE_OPTIONS = {
    "plain": {},
    "pos_weight=4": {"pos_weight": 4.0},
    "label_smoothing=0.1": {"label_smoothing": 0.1},
    "divergence": {"divergence": True},
}


@pytest.mark.parametrize("opts", list(NONFINITE_OPTIONS), ids=list(NONFINITE_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nonfinite_logits(backend, dtype, opts):
    options = NONFINITE_OPTIONS[opts]
    xs = [np.inf, -np.inf, np.nan, 1.5]
    zs = [0.0, 0.5, 1.0]
    x, z = grid(xs, zs, dtype)
    res = fastsce.sigmoid_cross_entropy(x, z, reduction="none", backend=backend, **options)
    a = options.get("pos_weight", 1.0)
    eps = options.get("label_smoothing", 0.0)
    for i in range(3):
        for j, zv in enumerate(zs):
            want_loss, want_grad = _limit(xs[i], zv, a, eps)
            got = (float(res.loss[i, j]), float(res.grad[i, j]))
            if np.isnan(want_loss):
                assert np.isnan(got[0]) and np.isnan(got[1]), (xs[i], zv, got)
            else:
                assert got[0] == want_loss, (xs[i], zv, got, want_loss)
                assert got[1] == pytest.approx(want_grad, rel=1e-6, abs=0), (xs[i], zv, got)
    # the finite row is untouched by its non-finite neighbours
    alone = fastsce.sigmoid_cross_entropy(x[3:], z[3:], reduction="none", backend=backend,
                                          **options)
    np.testing.assert_array_equal(res.loss[3:], alone.loss)
    np.testing.assert_array_equal(res.grad[3:], alone.grad)
    assert np.all(np.isfinite(res.loss[3])) and np.all(np.isfinite(res.grad[3]))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_confident_correct_infinities_reduce_to_finite(backend, reduction):
    # x=+inf,z=1 and x=-inf,z=0 are perfect predictions: loss 0, grad 0.
    x = np.array([np.inf, -np.inf, 0.0, 2.0])
    z = np.array([1.0, 0.0, 0.5, 0.25])
    res = fastsce.sigmoid_cross_entropy(x, z, reduction=reduction, backend=backend)
    finite = fastsce.sigmoid_cross_entropy(x[2:], z[2:], reduction="sum", backend=backend)
    total = finite.loss if reduction == "sum" else finite.loss / 4
    assert res.loss == pytest.approx(total, rel=1e-13)
    assert res.grad[0] == 0.0 and res.grad[1] == 0.0
    assert np.all(np.isfinite(res.grad))


def test_nan_propagates_to_its_element_only(backend):
    x = np.linspace(-3, 3, 11)
    z = np.linspace(0, 1, 11)
    x[4] = np.nan
    res = fastsce.sigmoid_cross_entropy(x, z, reduction="mean", backend=backend)
    assert np.isnan(res.loss)
    assert np.isnan(res.grad[4])
    others = np.delete(np.arange(11), 4)
    assert np.all(np.isfinite(res.grad[others]))
    ref = fastsce.sigmoid_cross_entropy(x, z, reduction="none", backend=backend)
    assert np.isnan(ref.loss[4]) and np.all(np.isfinite(ref.loss[others]))
    # the other gradients are those of the same mean (count 11) without the NaN
    x2 = x.copy()
    x2[4] = 0.0
    clean = fastsce.sigmoid_cross_entropy(x2, z, reduction="mean", backend=backend)
    np.testing.assert_array_equal(res.grad[others], clean.grad[others])


def test_masked_nonfinite_logits_are_excluded(backend):
    x = np.array([np.nan, np.inf, -np.inf, 0.5])
    z = np.array([0.5, 0.0, 1.0, 0.5])
    mask = np.array([False, False, False, True])
    res = fastsce.sigmoid_cross_entropy(x, z, mask=mask, reduction="mean", backend=backend)
    one = fastsce.sigmoid_cross_entropy(x[3:], z[3:], reduction="mean", backend=backend)
    assert res.loss == one.loss
    np.testing.assert_array_equal(res.grad, [0.0, 0.0, 0.0, one.grad[0]])


# ---------------------------------------------------------------- integer targets

UINT_X = [-20.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0]


def _uint_check(backend, dtype, codes, scale):
    x, _ = grid(UINT_X, codes, dtype)
    t = np.broadcast_to(np.asarray(codes), x.shape).copy()
    res = fastsce.sigmoid_cross_entropy(x, t, reduction="none", backend=backend)
    exacts = np.empty(x.shape, dtype=object)
    zfrac = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape):
        zfrac[idx] = Fraction(int(t[idx]), scale)
        exacts[idx] = sigmoid_ce_exact(x[idx], zfrac[idx])
    assert_ulp(res.loss, res.grad, exacts, x, zfrac, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_uint8_targets_all_codes(backend, dtype):
    _uint_check(backend, dtype, np.arange(256, dtype=np.uint8), 255)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_uint16_targets(backend, dtype):
    rng = np.random.default_rng(16)
    codes = np.concatenate([[0, 1, 2, 255, 256, 32767, 32768, 65533, 65534, 65535],
                            rng.integers(0, 65536, 30)]).astype(np.uint16)
    _uint_check(backend, dtype, codes, 65535)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_uint8_endpoints_are_exact_hard_labels(backend, dtype):
    # codes 0 and 255 are exactly z=0 and z=1: identical to float targets.
    x = np.array([-30.0, -2.0, 0.0, 3.0, 40.0], dtype=dtype)
    for code, zval in ((0, 0.0), (255, 1.0)):
        a = fastsce.sigmoid_cross_entropy(x, np.full(5, code, np.uint8), reduction="none",
                                          backend=backend)
        b = fastsce.sigmoid_cross_entropy(x, np.full(5, zval, dtype), reduction="none",
                                          backend=backend)
        np.testing.assert_allclose(a.loss, b.loss, rtol=4 * np.finfo(dtype).eps, atol=0)
        np.testing.assert_allclose(a.grad, b.grad, rtol=4 * np.finfo(dtype).eps, atol=0)
