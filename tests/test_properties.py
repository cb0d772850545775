"""Property tests: each fast backend against the reference and the naive
statement of the spec over shapes (0-d, empty, 1..4 dims), strides (steps,
negative), dtypes and broadcast weight/mask.

The option space is kept to a few kernel variants per test on purpose: every
new combination of operand types costs Numba a compilation (seconds), while
shapes, strides and values are free to vary.
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import fastsce
from naive import check_result, expected

LAYOUTS = ["C", "F", "step", "reversed", "broadcast"]
TARGET_DTYPES = ["same", "float32", "float64", "uint8", "uint16"]


@st.composite
def shapes(draw):
    ndim = draw(st.integers(0, 4))
    dims = []
    for _ in range(ndim):
        dims.append(draw(st.one_of(st.integers(0, 4), st.integers(5, 40))))
    shape = tuple(dims)
    if int(np.prod(shape, dtype=np.int64)) > 6000:  # keep examples cheap
        shape = tuple(min(d, 6) for d in shape)
    return shape


def _broadcast_shape(draw, shape):
    """A shape that broadcasts to ``shape``: axes set to 1, leading axes dropped."""
    keep = [draw(st.booleans()) for _ in shape]
    b = tuple(d if k else 1 for d, k in zip(shape, keep))
    drop = draw(st.integers(0, len(b)))
    return b[drop:]


def _in_layout(values, layout, rng):
    """An array equal to ``values`` laid out as ``layout`` (never a whole copy's layout)."""
    if values.ndim == 0 or layout == "C":
        return values.copy(order="C")  # (np.ascontiguousarray would make 0-d 1-d)
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "step":
        big_shape = tuple(2 * d + 1 for d in values.shape)
        big = np.zeros(big_shape, values.dtype)
        sl = tuple(slice(1, 1 + 2 * d, 2) for d in values.shape)
        big[sl] = values
        return big[sl]
    if layout == "reversed":
        rev = np.ascontiguousarray(values[(slice(None, None, -1),) * values.ndim])
        return rev[(slice(None, None, -1),) * values.ndim]
    # "broadcast": a zero-stride view (constant along axis 0).  Made writeable
    # with as_strided so it differs from the other layouts only in its strides
    # (np.broadcast_to's read-only views are tested in test_sigmoid_api.py).
    if values.shape[0] > 1:
        row = values[:1].copy()
        return np.lib.stride_tricks.as_strided(row, values.shape,
                                               (0,) + row.strides[1:])
    return values


def _logits(rng, shape, dtype, from_logits):
    if from_logits:
        x = rng.standard_normal(shape) * rng.choice([1.0, 8.0, 40.0])
        if x.size:
            flat = x.reshape(-1)
            k = rng.integers(0, x.size, size=min(3, x.size))
            flat[k] = rng.choice([0.0, 30.0, -30.0, 90.0, -90.0], size=k.size)
            x = flat.reshape(shape)
    else:
        x = rng.random(shape)
        if x.size:
            flat = x.reshape(-1)
            flat[rng.integers(0, x.size, size=min(2, x.size))] = rng.choice([0.0, 1.0])
            x = flat.reshape(shape)
    return np.asarray(x).astype(dtype)


def _targets(rng, shape, tdtype, xdtype):
    if tdtype in ("uint8", "uint16"):
        hi = 255 if tdtype == "uint8" else 65535
        t = rng.integers(0, hi + 1, shape)
        if t.size:
            flat = t.reshape(-1)
            flat[rng.integers(0, t.size, size=min(2, t.size))] = rng.choice([0, hi])
        return np.asarray(t).astype(tdtype)
    z = rng.random(shape)
    if z.size:
        flat = z.reshape(-1)
        flat[rng.integers(0, z.size, size=min(3, z.size))] = rng.choice([0.0, 1.0])
    return np.asarray(z).astype(xdtype if tdtype == "same" else tdtype)


@st.composite
def layout_cases(draw):
    shape = draw(shapes())
    xdtype = draw(st.sampled_from([np.float32, np.float64]))
    tdtype = draw(st.sampled_from(TARGET_DTYPES))
    x_layout = draw(st.sampled_from(LAYOUTS))
    t_layout = draw(st.sampled_from(LAYOUTS))
    t_shape = _broadcast_shape(draw, shape) if draw(st.booleans()) else shape
    w_shape = _broadcast_shape(draw, shape)
    m_shape = _broadcast_shape(draw, shape)
    reduction = draw(st.sampled_from(["mean", "none"]))
    seed = draw(st.integers(0, 2**32 - 1))
    threads = draw(st.sampled_from([None, 1, 3]))
    return shape, xdtype, tdtype, x_layout, t_layout, t_shape, w_shape, m_shape, reduction, \
        seed, threads


@given(case=layout_cases())
def test_shapes_layouts_dtypes(fast_backend, case):
    (shape, xdtype, tdtype, x_layout, t_layout, t_shape, w_shape, m_shape, reduction, seed,
     threads) = case
    rng = np.random.default_rng(seed)
    x = _in_layout(_logits(rng, shape, xdtype, True), x_layout, rng)
    z = _in_layout(_targets(rng, t_shape, tdtype, xdtype), t_layout, rng)
    w = rng.uniform(0, 2, w_shape).astype(xdtype)
    m = rng.random(m_shape) < 0.75
    kw = dict(weight=w, mask=m, reduction=reduction)
    snapshot = [np.array(a, copy=True) for a in (x, z, w, m)]
    res = fastsce.sigmoid_cross_entropy(x, z, backend=fast_backend, num_threads=threads, **kw)
    ref = fastsce.sigmoid_cross_entropy(x, z, backend="numpy", **kw)
    exp = expected(x, z, **kw)
    check_result(res, exp, xdtype, reduction)
    check_result(ref, exp, xdtype, reduction)
    assert res.grad.shape == shape
    for a, b in zip((x, z, w, m), snapshot):
        np.testing.assert_array_equal(a, b)


OPTION_PROFILES = {
    "plain": {},
    "pos_weight": "pos_weight",
    "smoothing": {"label_smoothing": 0.1},
    "divergence": {"divergence": True},
    "probabilities": {"from_logits": False},
}


@st.composite
def option_cases(draw):
    shape = draw(shapes())
    xdtype = draw(st.sampled_from([np.float32, np.float64]))
    profile = draw(st.sampled_from(list(OPTION_PROFILES)))
    eps = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    grad_scale = draw(st.sampled_from([1.0, 0.5, 3.0]))
    reduction = draw(st.sampled_from(["mean", "none"]))
    seed = draw(st.integers(0, 2**32 - 1))
    layout = draw(st.sampled_from(["C", "step"]))
    return shape, xdtype, profile, eps, grad_scale, reduction, seed, layout


@given(case=option_cases())
def test_options(fast_backend, case):
    shape, xdtype, profile, eps, grad_scale, reduction, seed, layout = case
    rng = np.random.default_rng(seed)
    opts = OPTION_PROFILES[profile]
    if opts == "pos_weight":
        opts = {"pos_weight": rng.uniform(0, 4, _pw_shape(shape)).astype(xdtype)}
    opts = dict(opts)
    if profile in ("smoothing", "divergence"):
        opts["label_smoothing"] = eps
    from_logits = opts.get("from_logits", True)
    x = _in_layout(_logits(rng, shape, xdtype, from_logits), layout, rng)
    z = _in_layout(_targets(rng, shape, "same", xdtype), layout, rng)
    kw = dict(opts, reduction=reduction, grad_scale=grad_scale)
    res = fastsce.sigmoid_cross_entropy(x, z, backend=fast_backend, **kw)
    ref = fastsce.sigmoid_cross_entropy(x, z, backend="numpy", **kw)
    exp = expected(x, z, **kw)
    check_result(res, exp, xdtype, reduction)
    check_result(ref, exp, xdtype, reduction)


def _pw_shape(shape):
    return shape[-1:] if shape else ()
