"""The float64 NumPy reference (backend="numpy") is the executable spec, so it
is tested on its own: hand-computed values, mpmath on random hard points,
gradients by fourth-order central differences, identities."""
import math

import numpy as np
import pytest

import fastsce
from exact import bce_prob_exact, sigmoid_ce_exact, ulp_error
from naive import check_result, expected

LOG2 = math.log(2.0)


def ref(x, z, **kw):
    return fastsce.sigmoid_cross_entropy(np.asarray(x, np.float64), np.asarray(z, np.float64),
                                         backend="numpy", **kw)


# ---------------------------------------------------------------- by hand

HAND = [
    # (x, z, options, loss, grad)
    (0.0, 0.5, {}, LOG2, 0.0),
    (0.0, 1.0, {}, LOG2, -0.5),
    (0.0, 0.0, {}, LOG2, 0.5),
    (2.0, 1.0, {}, 0.12692801104297263, -0.11920292202211755),
    (-2.0, 1.0, {}, 2.1269280110429727, -0.8807970779778824),
    (2.0, 0.25, {}, 1.6269280110429727, 0.6307970779778824),
    (0.0, 1.0, {"pos_weight": 3.0}, 3 * LOG2, -1.5),
    (1.0, 0.5, {"pos_weight": 0.5}, 0.5 * 0.5 * 0.31326168751822286 + 0.5 * 1.3132616875182228,
     0.7310585786300049 * 0.75 - 0.25),
    (0.0, 1.0, {"label_smoothing": 0.2}, LOG2, 0.5 - 0.9),
    (3.0, 0.0, {"label_smoothing": 1.0}, 0.5 * 0.04858735157374206 + 0.5 * 3.048587351573742,
     0.9525741268224334 - 0.5),
    (0.0, 0.5, {"divergence": True}, 0.0, 0.0),
    (0.0, 1.0, {"divergence": True}, LOG2, -0.5),
    (1.0, 0.25, {"divergence": True},
     0.25 * math.log(0.25 / 0.7310585786300049) + 0.75 * math.log(0.75 / 0.2689414213699951),
     0.7310585786300049 - 0.25),
    (0.5, 1.0, {"from_logits": False}, LOG2, -2.0),
    (0.25, 0.0, {"from_logits": False}, -math.log(0.75), 0.25 / 0.1875),
    (0.0, 0.5, {"from_logits": False}, 50.0, -0.5e12),
    (1.0, 0.0, {"from_logits": False}, 100.0, 1e12),
    (1.0, 1.0, {"from_logits": False}, 0.0, 0.0),
    (0.5, 1.0, {"from_logits": False, "pos_weight": 2.0}, 2 * LOG2, -4.0),
]


@pytest.mark.parametrize("x,z,opts,loss,grad", HAND)
def test_hand_computed(x, z, opts, loss, grad):
    res = ref([x], [z], reduction="none", **opts)
    assert res.loss[0] == pytest.approx(loss, rel=1e-14, abs=1e-300)
    assert res.grad[0] == pytest.approx(grad, rel=1e-14, abs=1e-15)


def test_hand_computed_reductions():
    x = [0.0, 0.0, 0.0, 2.0]
    z = [0.5, 1.0, 0.0, 1.0]
    w = [1.0, 2.0, 3.0, 0.0]
    m = np.array([True, True, False, True])
    s = ref(x, z, weight=w, mask=m, reduction="sum")
    assert s.loss == pytest.approx(3 * LOG2, rel=1e-15)
    np.testing.assert_allclose(s.grad, [0.0, -1.0, 0.0, 0.0], atol=1e-16)
    mean = ref(x, z, weight=w, mask=m, reduction="mean", grad_scale=2.0)
    assert mean.loss == pytest.approx(LOG2, rel=1e-15)  # 3 unmasked (weight 0 counts)
    np.testing.assert_allclose(mean.grad, [0.0, -2.0 / 3.0, 0.0, 0.0], atol=1e-16)
    none = ref(x, z, weight=w, mask=m, reduction="none")
    np.testing.assert_allclose(none.loss, [LOG2, 2 * LOG2, 0.0, 0.0], rtol=1e-15)
    assert none.loss[2] == 0.0


def test_integer_targets_by_hand():
    x = np.zeros(3)
    res = fastsce.sigmoid_cross_entropy(x, np.array([0, 51, 255], np.uint8), reduction="none",
                                        backend="numpy")
    np.testing.assert_allclose(res.grad, [0.5, 0.5 - 0.2, -0.5], rtol=1e-15, atol=1e-16)
    res = fastsce.sigmoid_cross_entropy(x, np.array([0, 13107, 65535], np.uint16),
                                        reduction="none", backend="numpy")
    np.testing.assert_allclose(res.grad, [0.5, 0.5 - 0.2, -0.5], rtol=1e-15, atol=1e-16)
    res = fastsce.sigmoid_cross_entropy(x, np.array([0, 5, 10], np.uint8), target_scale=10,
                                        reduction="none", backend="numpy")
    np.testing.assert_allclose(res.grad, [0.5, 0.0, -0.5], rtol=1e-15, atol=1e-16)
    res = fastsce.sigmoid_cross_entropy(x, np.array([0.0, 1.0, 4.0]), target_scale=4.0,
                                        reduction="none", backend="numpy")
    np.testing.assert_allclose(res.grad, [0.5, 0.25, -0.5], rtol=1e-15, atol=1e-16)


# ---------------------------------------------------------------- mpmath, random points

def _random_hard_points(n, seed):
    rng = np.random.default_rng(seed)
    mags = np.exp(rng.uniform(np.log(1e-12), np.log(800), n))
    x = np.where(rng.random(n) < 0.5, -mags, mags)
    z = rng.random(n)
    z[rng.random(n) < 0.15] = 0.0
    z[rng.random(n) < 0.15] = 1.0
    z[rng.random(n) < 0.1] = 1e-9
    return x, z


@pytest.mark.parametrize("opts", [{}, {"pos_weight": 2.5}, {"divergence": True},
                                  {"label_smoothing": 0.3}], ids=["plain", "pos_weight",
                                                                   "divergence", "smoothing"])
def test_mpmath_random_points(opts):
    x, z = _random_hard_points(150, seed=len(opts) + 7 * bool(opts.get("divergence")))
    res = ref(x, z, reduction="none", **opts)
    worst = (0.0, 0.0)
    for i in range(x.size):
        e = sigmoid_ce_exact(x[i], z[i], **opts)
        el = ulp_error(res.loss[i], e.loss, np.float64, e.loss_scale)
        eg = ulp_error(res.grad[i], e.grad, np.float64, e.grad_scale)
        assert el <= 4 and eg <= 4, (x[i], z[i], res.loss[i], float(e.loss), el,
                                     res.grad[i], float(e.grad), eg)
        worst = max(worst[0], el), max(worst[1], eg)


def test_mpmath_probabilities():
    rng = np.random.default_rng(3)
    c = np.concatenate([rng.random(60), np.exp(-rng.uniform(0, 60, 20)),
                        1 - np.exp(-rng.uniform(1, 30, 20))])
    z = rng.random(c.size)
    z[::7] = 0.0
    z[::11] = 1.0
    res = ref(c, z, from_logits=False, reduction="none")
    for i in range(c.size):
        e = bce_prob_exact(c[i], z[i])
        assert ulp_error(res.loss[i], e.loss, np.float64, e.loss_scale) <= 4, (c[i], z[i])
        assert ulp_error(res.grad[i], e.grad, np.float64, e.grad_scale) <= 4, (c[i], z[i])


# ---------------------------------------------------------------- finite differences

def _fd4(f, x, i, h):
    def at(delta):
        xp = x.copy()
        xp.flat[i] += delta
        return f(xp)
    return (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)


FD_OPTIONS = {
    "plain": {},
    "weight+mask+pos_weight": {"weight": np.linspace(0.5, 2, 12).reshape(3, 4),
                               "mask": np.array([True, False, True, True]),
                               "pos_weight": np.array([[0.5], [1.0], [3.0]])},
    "smoothing+divergence": {"label_smoothing": 0.2, "divergence": True},
    "probabilities": {"from_logits": False, "pos_weight": 1.5},
}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", list(FD_OPTIONS))
def test_gradient_by_finite_differences(name, reduction):
    opts = FD_OPTIONS[name]
    rng = np.random.default_rng(4)
    if opts.get("from_logits", True):
        x = rng.uniform(-6, 6, (3, 4))
    else:
        x = rng.uniform(0.05, 0.95, (3, 4))
    z = rng.random((3, 4))
    z[0, 0], z[1, 1] = 0.0, 1.0

    def f(xp):
        return ref(xp, z, reduction=reduction, grad=False, **opts).loss

    res = ref(x, z, reduction=reduction, grad_scale=1.0, **opts)
    h = 1e-3 if opts.get("from_logits", True) else 1e-4
    for i in range(x.size):
        fd = _fd4(f, x, i, h)
        assert res.grad.flat[i] == pytest.approx(fd, rel=1e-7, abs=1e-8), (name, i)


# ---------------------------------------------------------------- identities

def test_hard_labels_are_the_usual_log_loss():
    x = np.linspace(-20, 20, 81)
    sig = 1 / (1 + np.exp(-x))  # sigmoid(x), full relative precision
    sig_neg = 1 / (1 + np.exp(x))  # 1 - sigmoid(x) = sigmoid(-x), likewise
    one = ref(x, np.ones_like(x), reduction="none")
    zero = ref(x, np.zeros_like(x), reduction="none")
    # -log q = log1p(1/q - 1) = log1p(exp(-x)); -log(1 - q) = log1p(exp(x))
    np.testing.assert_allclose(one.loss, np.log1p(np.exp(-x)), rtol=1e-12)
    np.testing.assert_allclose(zero.loss, np.log1p(np.exp(x)), rtol=1e-12)
    mid = np.abs(x) < 3  # where the plain formulas lose nothing
    np.testing.assert_allclose(one.loss[mid], -np.log(sig[mid]), rtol=1e-13)
    np.testing.assert_allclose(zero.loss[mid], -np.log(sig_neg[mid]), rtol=1e-13)
    np.testing.assert_allclose(one.grad, -sig_neg, rtol=1e-12)
    np.testing.assert_allclose(zero.grad, sig, rtol=1e-12)


def test_symmetry_and_probability_form():
    rng = np.random.default_rng(5)
    x = rng.uniform(-15, 15, 200)
    z = rng.random(200)
    a = ref(x, z, reduction="none")
    b = ref(-x, 1 - z, reduction="none")  # L(x, z) = L(-x, 1-z), g -> -g
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    np.testing.assert_allclose(a.grad, -b.grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.grad, 1 / (1 + np.exp(-x)) - z, rtol=1e-12, atol=1e-15)
    # from probabilities c = sigmoid(x): the same loss; dL/dc = dL/dx / (c(1-c))
    xm = rng.uniform(-8, 8, 200)
    c = 1 / (1 + np.exp(-xm))
    p = ref(c, z, from_logits=False, reduction="none")
    lgt = ref(xm, z, reduction="none")
    np.testing.assert_allclose(p.loss, lgt.loss, rtol=1e-9)
    np.testing.assert_allclose(p.grad * c * (1 - c), lgt.grad, rtol=1e-8, atol=1e-12)


def test_divergence_is_zero_at_the_target_and_nonnegative():
    z = np.linspace(0.01, 0.99, 99)
    x = np.log(z) - np.log1p(-z)  # sigmoid(x) = z: a perfect prediction
    res = ref(x, z, divergence=True, reduction="none")
    np.testing.assert_allclose(res.loss, 0.0, atol=1e-14)
    np.testing.assert_allclose(res.grad, 0.0, atol=1e-15)
    rng = np.random.default_rng(6)
    y = rng.uniform(-10, 10, 500)
    t = rng.random(500)
    kl = ref(y, t, divergence=True, reduction="none")
    ce = ref(y, t, reduction="none")
    assert np.all(kl.loss >= -1e-15)
    ent = -(t * np.log(t) + (1 - t) * np.log1p(-t))
    np.testing.assert_allclose(kl.loss, ce.loss - ent, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(kl.grad, ce.grad)  # gradient unchanged


def test_label_smoothing_equals_smoothed_targets():
    rng = np.random.default_rng(7)
    x = rng.uniform(-10, 10, 300)
    z = rng.random(300)
    eps = 0.3
    a = ref(x, z, label_smoothing=eps, reduction="none")
    b = ref(x, z * (1 - eps) + eps / 2, reduction="none")
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-13)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_pos_weight_one_is_plain_and_weight_scales():
    rng = np.random.default_rng(8)
    x = rng.uniform(-10, 10, 300)
    z = rng.random(300)
    plain = ref(x, z, reduction="none")
    np.testing.assert_array_equal(ref(x, z, pos_weight=1.0, reduction="none").loss, plain.loss)
    w = ref(x, z, weight=3.0, reduction="none")
    np.testing.assert_allclose(w.loss, 3 * plain.loss, rtol=1e-15)
    np.testing.assert_allclose(w.grad, 3 * plain.grad, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["plain", "options"])
def test_reference_matches_naive_statement(dtype, case):
    rng = np.random.default_rng(9)
    shape = (4, 6, 5)
    x = (rng.standard_normal(shape) * 6).astype(dtype)
    z = rng.random(shape).astype(dtype)
    kw = {}
    if case == "options":
        kw = dict(weight=rng.random((6, 1)).astype(dtype), mask=rng.random(shape) < 0.5,
                  pos_weight=rng.uniform(0.1, 3, (5,)).astype(dtype), label_smoothing=0.1)
    for red in ("none", "sum", "mean"):
        res = fastsce.sigmoid_cross_entropy(x, z, reduction=red, backend="numpy", **kw)
        check_result(res, expected(x, z, reduction=red, **kw), dtype, red)
