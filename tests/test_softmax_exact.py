"""Multiclass accuracy on hard cases against the exact (mpmath) values, SPEC §1.2, §2.

Every backend, float32 and float64, C in {1, 2, 3, 21}, reduction="none":
the per-pixel loss within 4 ulp of the exact loss and every gradient element
within 4 ulp of max(W*softmax_k, w_k*z_k) (see exact_softmax.py for the
slack of rounded targets and of float64 class sums) over
extreme logits (+-1e30, +-100, +-88, 0, +-inf mixes, one dominant class, all
equal) and targets (exact 0/1, 1e-7, sums 0.5 and 2, all zero), with and
without class weights, label smoothing, divergence, probabilities; the limits
SPEC §2 prescribes for +-inf; NaN confined to its own pixel.
"""
from fractions import Fraction

import numpy as np
import pytest

import fastsce
from exact_softmax import allowed_slack, softmax_ce_exact, ulp_error_slack

MAX_ULP = 4.0
DTYPES = [np.float32, np.float64]
CLASSES = [1, 2, 3, 21]
dtype_ids = lambda d: np.dtype(d).name  # noqa: E731
INF = np.inf


def smx(*args, **kwargs):
    return fastsce.softmax_cross_entropy(*args, **kwargs)


def as_param(values, dtype):
    """Option values as the kernels see them: rounded to the working dtype once."""
    return [float(v) for v in np.asarray(values, dtype=dtype)]


def class_weights_for(C):
    # includes a zero weight (C >= 4) and weights < 1 and > 1
    return np.array([0.3, 4.0, 1.0, 0.0, 2.5])[np.arange(C) % 5]


def _put(C, default, **at):
    row = [default] * C
    for pos, value in at.items():
        row[{"first": 0, "last": C - 1, "mid": C // 2}[pos]] = value
    return row


def logit_rows(C):
    """Logit vectors of length C: all equal, one dominant, spreads, +-inf mixes."""
    rows = [[v] * C for v in (0.0, 100.0, -100.0, 88.0, -88.0, 1e30, -1e30)]
    if C == 1:
        return rows + [[INF], [17.0], [1e-7]]
    for d in (100.0, 88.0, 1e30):
        rows.append(_put(C, 0.0, first=d))
        rows.append(_put(C, -d, last=0.0))
    rows.append(_put(C, 0.0, mid=-100.0))
    # a moderately dominant class: log(sum) = log(1 + small), where log of the
    # rounded sum would lose the small part's relative precision
    rows.append(_put(C, 0.0, first=8.0))
    rows.append(_put(C, -30.0, first=5.0, last=2.0))
    k = np.arange(C, dtype=np.float64)
    rows.append(list(np.linspace(-1e30, 1e30, C)))
    rows.append(list(np.linspace(-100.0, 100.0, C)))
    rows.append(list(88.0 * (-1.0) ** k))
    rows.append(list(1e-7 * (k - C / 2)))
    rows.append(list(17.0 + 0.5 * k))
    # random logits: x_j - m is not exact in float32 (small softmax entries
    # then need the difference taken exactly, e.g. in float64)
    rows.append(list(np.random.default_rng(100 + C).standard_normal(C) * 12))
    rows.append(_put(C, -15.426183700561523, first=16.576175689697266))
    # +-inf mixes (never two +inf: no limit)
    rows.append(_put(C, 0.0, first=INF))
    rows.append(_put(C, -1e30, last=INF))
    rows.append(_put(C, 0.0, first=-INF))
    rows.append(_put(C, -INF, last=3.0))
    if C >= 3:
        rows.append(_put(C, 1.0, first=INF, last=-INF))
        rows.append(_put(C, -INF, first=100.0, mid=-100.0))
    return rows


def target_rows(C):
    """Target vectors: one-hot, uniform, tiny, sum 0.5 and 2, all zero, mixed."""
    rows = [_put(C, 0.0, first=1.0), [0.0] * C, [1e-7] * C]
    if C == 1:
        return rows + [[0.5]]
    rows.append(_put(C, 0.0, last=1.0))
    rows.append([1.0 / C] * C)
    rows.append(_put(C, 1e-7, first=1 - (C - 1) * 1e-7))
    rows.append(_put(C, 0.0, last=1e-7))
    rows.append(_put(C, 0.0, first=0.5))                  # sums to 0.5
    rows.append(_put(C, 0.0, first=1.0, last=1.0))        # sums to 2
    rows.append(_put(C, 0.0, first=0.5, last=0.5))
    if C >= 3:
        rows.append(_put(C, 0.0, mid=1.0))
        rng = np.random.default_rng(C)
        p = rng.random(C)
        rows.append(list(p / p.sum()))
    return rows


def grid(C, dtype, xrows=None, zrows=None):
    """(P, C) logits and targets: every logit row with every target row."""
    xrows = logit_rows(C) if xrows is None else xrows
    zrows = target_rows(C) if zrows is None else zrows
    x = np.array([xr for xr in xrows for _ in zrows], dtype=dtype)
    z = np.array([zr for _ in xrows for zr in zrows], dtype=dtype)
    return np.ascontiguousarray(x), np.ascontiguousarray(z)


def assert_pixels_ulp(res, x, z, dtype, oracle, *, rounded_targets=False, max_ulp=MAX_ULP):
    """Every pixel (rows of x/z, classes along axis 1) within ``max_ulp``."""
    assert res.loss.shape == x.shape[:1]
    assert res.grad.shape == x.shape and res.grad.dtype == np.dtype(dtype)
    problems = []
    worst = [0.0, 0.0]

    def show(a):
        return np.array2string(np.asarray(a, dtype=np.float64), threshold=8, precision=17)

    for i in range(x.shape[0]):
        e = oracle(x[i], z[i])
        ls, gs = allowed_slack(e, dtype, rounded_targets)
        err = ulp_error_slack(res.loss[i], e.loss, dtype, e.loss_scale, ls)
        worst[0] = max(worst[0], err)
        if not err <= max_ulp:
            problems.append(f"loss x={show(x[i])} z={show(z[i])}: got {res.loss[i]!r}, "
                            f"exact {float(e.loss)!r} ({err:.3g} ulp)")
        for k in range(x.shape[1]):
            err = ulp_error_slack(res.grad[i, k], e.grad[k], dtype, e.grad_scale[k], gs[k])
            worst[1] = max(worst[1], err)
            if not err <= max_ulp:
                problems.append(f"grad[{k}] x={show(x[i])} z={show(z[i])}: got "
                                f"{res.grad[i, k]!r}, exact {float(e.grad[k])!r} ({err:.3g} ulp)")
    assert not problems, f"{len(problems)} bad values:\n" + "\n".join(problems[:12])
    return worst


LOGIT_OPTIONS = {
    "plain": {},
    "class_weights": {"class_weights": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "divergence": {"divergence": True},
}


def _call_and_oracle(options, C, dtype):
    kw = dict(options)
    oracle_kw = {}
    if kw.pop("class_weights", False):
        cw = class_weights_for(C).astype(dtype)
        kw["class_weights"] = cw
        oracle_kw["class_weights"] = as_param(cw, dtype)
    oracle_kw["label_smoothing"] = kw.get("label_smoothing", 0.0)
    oracle_kw["divergence"] = kw.get("divergence", False)
    oracle_kw["from_logits"] = kw.get("from_logits", True)
    return kw, oracle_kw


@pytest.mark.parametrize("opts", list(LOGIT_OPTIONS))
@pytest.mark.parametrize("C", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_logits_hard_cases(backend, dtype, C, opts):
    kw, oracle_kw = _call_and_oracle(LOGIT_OPTIONS[opts], C, dtype)
    x, z = grid(C, dtype)
    xc, zc = x.copy(), z.copy()
    res = smx(x, z, axis=1, reduction="none", backend=backend, **kw)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(z, zc)
    assert_pixels_ulp(res, x, z, dtype,
                      lambda xi, zi: softmax_ce_exact(xi, zi, **oracle_kw),
                      rounded_targets=bool(oracle_kw["label_smoothing"]))


@pytest.mark.parametrize("C", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_probabilities_hard_cases(backend, dtype, C):
    # with class weights only: one kernel variant per dtype (the weights
    # include 1 and, for C >= 4, 0)
    kw, oracle_kw = _call_and_oracle(LOGIT_OPTIONS["class_weights"], C, dtype)
    oracle_kw["from_logits"] = False
    values = [0.0, 1e-30, 1e-7, 0.3, 0.5, 1 - 1e-7, 1.0]
    if dtype == np.float64:
        values.append(1e-50)  # log(1e-50) = -115: clamped at -100
    xrows = [[values[(i + k) % len(values)] for k in range(C)] for i in range(len(values))]
    xrows.append(_put(C, 0.0, first=1.0))
    x, z = grid(C, dtype, xrows=xrows)
    res = smx(x, z, from_logits=False, reduction="none", backend=backend, **kw)
    assert_pixels_ulp(res, x, z, dtype,
                      lambda xi, zi: softmax_ce_exact(xi, zi, **oracle_kw))
    # the clamps of SPEC §1.2 by hand: clog(0) = -100, 1/max(0, 1e-12)
    i = next(i for i in range(x.shape[0]) if x[i, 0] == 0 and z[i, 0] == 1)
    w0 = oracle_kw.get("class_weights", [1.0])[0]
    assert res.loss[i] == pytest.approx(w0 * 100.0, rel=1e-6)
    assert res.grad[i, 0] == pytest.approx(-w0 * 1e12, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["plain", "label_smoothing"])
@pytest.mark.parametrize("C", [2, 21], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_hard_labels_hard_cases(backend, dtype, C, eps):
    # class indices mean one-hot targets, smoothed like soft ones (SPEC §1.2, §1.3)
    xrows = logit_rows(C)
    labels = np.array([lab for _ in xrows for lab in (0, C // 2, C - 1)], dtype=np.int64)
    x = np.array([xr for xr in xrows for _ in range(3)], dtype=dtype)
    res = smx(x, labels, label_smoothing=eps, reduction="none", backend=backend)
    z = np.eye(C)[labels]
    assert_pixels_ulp(res, x, z, dtype,
                      lambda xi, zi: softmax_ce_exact(xi, zi, label_smoothing=eps),
                      rounded_targets=bool(eps))


@pytest.mark.parametrize("dtype", [np.float64], ids=dtype_ids)
def test_uint8_soft_targets(backend, dtype):
    # integer codes are exact fractions t/255, rounded once by the kernel
    codes = [[0, 0, 255], [85, 85, 85], [1, 254, 0], [128, 127, 0], [3, 0, 0], [255, 255, 0]]
    xrows = [[0.0, 0.0, 0.0], [-30.0, 2.0, 5.0], [100.0, -100.0, 0.5], [-INF, 1.0, 2.0]]
    x = np.array([xr for xr in xrows for _ in codes], dtype=dtype)
    t = np.array([c for _ in xrows for c in codes], dtype=np.uint8)
    res = smx(x, t, reduction="none", backend=backend)
    zfrac = np.array([[Fraction(int(v), 255) for v in row] for row in t], dtype=object)
    assert_pixels_ulp(res, x, zfrac, dtype, lambda xi, zi: softmax_ce_exact(xi, zi),
                      rounded_targets=True)


# ---------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_infinite_logit_limits_by_hand(backend, dtype):
    rows = [
        # (logits, targets, loss, grad)
        ([INF, 0.0, -1.0], [1.0, 0.0, 0.0], 0.0, [0.0, 0.0, 0.0]),     # confident, correct
        ([-INF, 0.0, 0.0], [0.0, 0.5, 0.5], np.log(2.0), [0.0, 0.0, 0.0]),  # masked class
        ([-INF, -INF, 5.0], [0.0, 0.0, 1.0], 0.0, [0.0, 0.0, 0.0]),
        ([INF, 0.0, -1.0], [0.5, 0.5, 0.0], INF, [0.5, -0.5, 0.0]),
        ([-INF, 0.0, 0.0], [0.5, 0.5, 0.0], INF, [-0.5, 0.0, 0.5]),
        ([INF, -INF, 0.0], [1.0, 0.0, 0.0], 0.0, [0.0, 0.0, 0.0]),
    ]
    x = np.array([r[0] for r in rows], dtype=dtype)
    z = np.array([r[1] for r in rows], dtype=dtype)
    res = smx(x, z, reduction="none", backend=backend)
    for i, (_, _, loss, grad) in enumerate(rows):
        assert res.loss[i] == pytest.approx(loss, rel=1e-6, abs=0), (i, res.loss[i])
        np.testing.assert_allclose(res.grad[i], grad, rtol=1e-6, atol=0, err_msg=str(i))
    assert not np.isnan(res.loss).any() and not np.isnan(res.grad).any()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_confident_correct_infinities_reduce_to_finite(backend, reduction):
    x = np.array([[INF, 0.0, -2.0], [-INF, 1.0, 2.0], [0.5, -1.0, 3.0]])
    z = np.array([[1.0, 0.0, 0.0], [0.0, 0.25, 0.75], [0.2, 0.3, 0.5]])
    res = smx(x, z, reduction=reduction, backend=backend)
    finite = smx(x[1:], z[1:], reduction="none", backend=backend)
    total = float(np.sum(finite.loss))
    assert np.isfinite(res.loss)
    assert res.loss == pytest.approx(total if reduction == "sum" else total / 3, rel=1e-13)
    np.testing.assert_array_equal(res.grad[0], 0.0)
    assert res.grad[1, 0] == 0.0
    assert np.all(np.isfinite(res.grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_nan_propagates_to_its_pixel_only(backend, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3, 5)).astype(dtype)
    z = rng.random((2, 4, 3, 5)).astype(dtype)
    x[1, 2, 0, 3] = np.nan
    res = smx(x, z, reduction="mean", backend=backend)
    assert np.isnan(res.loss)
    assert np.all(np.isnan(res.grad[1, :, 0, 3]))
    others = np.ones((2, 3, 5), bool)
    others[1, 0, 3] = False
    assert np.all(np.isfinite(np.moveaxis(res.grad, 1, -1)[others]))
    none = smx(x, z, reduction="none", backend=backend)
    assert np.isnan(none.loss[1, 0, 3]) and np.all(np.isfinite(none.loss[others]))
    # the other pixels' gradients are those of the same mean (same count) without the NaN
    x2 = x.copy()
    x2[1, 2, 0, 3] = 0.0
    clean = smx(x2, z, reduction="mean", backend=backend)
    g, gc = np.moveaxis(res.grad, 1, -1), np.moveaxis(clean.grad, 1, -1)
    np.testing.assert_array_equal(g[others], gc[others])
    if dtype == np.float64:  # (one kernel variant fewer for float32)
        # masked out, the NaN pixel is simply excluded
        mask = np.ones((2, 3, 5), bool)
        mask[1, 0, 3] = False
        masked = smx(x, z, weight=np.ones((2, 3, 5)), mask=mask, reduction="sum",
                     backend=backend)
        assert np.isfinite(masked.loss)
        np.testing.assert_array_equal(masked.grad[1, :, 0, 3], 0.0)
