"""Property tests: each fast backend against the reference and the naive
statement of the spec over shapes (0-d, empty, 1..4 dims), strides (steps,
negative), dtypes and broadcast weight/mask.

The option space is kept to a few kernel variants per test on purpose: every
new combination of operand types costs Numba a compilation (seconds), while
shapes, strides and values are free to vary.
"""
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import fastsce
from exact_softmax import naive_softmax
from naive import Expected, check_grad, check_result, expected

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


# ------------------------------------------------------------------ every option, both losses
#
# Each backend against the float64 reference and the naive statement of the
# spec, over shapes (0-d, empty, huge-aspect), layouts (F-order, steps,
# negative and zero strides), byte order, float16, broadcast operands and
# every option. Numba compiles a kernel per combination of operand types
# (dtypes, which operands are present, read-only or not), so those are tied
# together in a few profiles (inputs other than the logits are passed
# read-only, as broadcast views are); everything else is drawn freely:
# reduction, reduce_axes, tile_shape, grad_scale, label_smoothing,
# target_scale, num_threads, axis, out/loss_out given or not.

HUGE_ASPECT = [(1, 100000), (50000, 2), (3, 1, 20000), (60000,), (2, 30000, 1)]

#: x/z dtypes, the operands present, baked-in flags; grad=False or "none" if set.
SIGMOID_PROFILES = {
    "f32": dict(x="float32", z="float32"),
    "f64 weight mask": dict(x="float64", z="float64", weight=True, mask=True),
    "f32 uint8 pos_weight ignore": dict(x="float32", z="uint8", pos_weight=True, ignore=True),
    "f64 uint16 divergence none": dict(x="float64", z="uint16", divergence=True, none=True),
    "f16 probabilities": dict(x="float16", z="float16", from_logits=False),
    "byte-swapped f64 weight loss-only": dict(x=">f8", z=">f4", weight=True, grad=False),
    "f32 mask none loss-only": dict(x="float32", z="float32", mask=True, none=True, grad=False),
}
SOFTMAX_PROFILES = {
    "f32 soft": dict(x="float32", z="float32"),
    "f64 labels cw weight mask ignore": dict(x="float64", z="labels", class_weights=True,
                                             weight=True, mask=True, ignore=True),
    "f64 uint8 divergence none loss-only": dict(x="float64", z="uint8", divergence=True,
                                                none=True, grad=False),
    "f32 probabilities cw none": dict(x="float32", z="float32", from_logits=False,
                                      class_weights=True, none=True),
    "f16 soft mask": dict(x="float16", z="float16", mask=True),
    "byte-swapped f32 labels loss-only": dict(x=">f4", z="labels", grad=False),
}


@st.composite
def fuzz_shapes(draw):
    """Shapes of 0-4 dims (0 in any axis allowed), or now and then a huge-aspect one."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.sampled_from(HUGE_ASPECT))
    return draw(shapes())


def _grouping(draw, shape, reduction):
    """reduce_axes / tile_shape / neither, valid for `shape` (pixel shape)."""
    if reduction == "none":
        return None, None
    kind = draw(st.sampled_from(["full", "axes", "tiles"] if len(shape) >= 2 else
                                ["full", "axes"]))
    if kind == "axes":
        axes = draw(st.lists(st.integers(0, max(len(shape) - 1, 0)), unique=True,
                             max_size=len(shape)))
        negative = draw(st.booleans())
        return tuple(a - len(shape) if negative else a for a in axes), None
    if kind == "tiles":
        return None, (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    return None, None


def _readonly(a):
    a = np.asarray(a)
    a.flags.writeable = False
    return a


def _options(draw, profile, pixels):
    """The drawn keyword arguments common to both losses (beyond operands)."""
    none = profile.get("none", False)
    reduction = "none" if none else draw(st.sampled_from(["mean", "sum"]))
    reduce_axes, tile_shape = _grouping(draw, pixels, reduction)
    return dict(
        reduction=reduction, reduce_axes=reduce_axes, tile_shape=tile_shape,
        grad=profile.get("grad", True),
        grad_scale=draw(st.sampled_from([1.0, -0.5, 3.0, 1e-3])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        divergence=profile.get("divergence", False),
        from_logits=profile.get("from_logits", True),
        num_threads=draw(st.sampled_from([None, 1, 3])),
    )


def _native(a):
    a = np.asarray(a)
    return a.astype(a.dtype.newbyteorder("="))


def _codes(rng, shape, dtype, scale):
    hi = int(scale)
    t = rng.integers(0, hi + 1, shape)
    if t.size:
        t.reshape(-1)[rng.integers(0, t.size, size=min(2, t.size))] = rng.choice([0, hi])
    return t.astype(dtype)


def _fuzz_targets(rng, draw, shape, profile, xdtype, ignore):
    """Targets of `shape` (or a shape that broadcasts to it) in the profile's dtype,
    target_scale and ignore_value."""
    zdtype = profile["z"]
    t_shape = _broadcast_shape(draw, shape) if draw(st.booleans()) else shape
    if zdtype in ("uint8", "uint16"):
        # keep the logits' rank: integer targets of the softmax's pixel rank are labels
        t_shape = (1,) * (len(shape) - len(t_shape)) + t_shape
    kw = {}
    if zdtype in ("uint8", "uint16"):
        scale = {"uint8": 255, "uint16": 65535}[zdtype]
        if draw(st.booleans()):
            scale = kw["target_scale"] = draw(st.sampled_from([100, 250]))
        t = _codes(rng, t_shape, zdtype, scale)
        if ignore and t.size:
            code = kw["ignore_value"] = int(np.iinfo(zdtype).max)
            t.reshape(-1)[rng.integers(0, t.size, size=min(3, t.size))] = code
        z = t
    else:
        z = _targets(rng, t_shape, "same", np.dtype(xdtype).newbyteorder("="))
        z = z.astype(np.dtype(zdtype))
    return _readonly(_in_layout(z, draw(st.sampled_from(LAYOUTS)), rng)), kw


def _sigmoid_case(draw):
    name = draw(st.sampled_from(list(SIGMOID_PROFILES)))
    profile = SIGMOID_PROFILES[name]
    shape = draw(fuzz_shapes())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xdtype = np.dtype(profile["x"])
    kw = _options(draw, profile, shape)
    x = _logits(rng, shape, xdtype.newbyteorder("="), kw["from_logits"]).astype(xdtype)
    x = _in_layout(x, draw(st.sampled_from(LAYOUTS)), rng)
    z, extra = _fuzz_targets(rng, draw, shape, profile, xdtype, profile.get("ignore"))
    kw.update(extra)
    compute = np.dtype(np.float64 if xdtype.itemsize == 8 else np.float32)
    if profile.get("weight"):
        kw["weight"] = _readonly(rng.uniform(0, 2, _broadcast_shape(draw, shape)).astype(
            compute.newbyteorder(xdtype.byteorder)))
    if profile.get("mask"):
        kw["mask"] = _readonly(rng.random(_broadcast_shape(draw, shape)) < 0.7)
    if profile.get("pos_weight"):
        kw["pos_weight"] = _readonly(rng.uniform(0, 4, _broadcast_shape(draw, shape))
                                     .astype(compute))
    return name, x, z, kw, shape


def _pixel_axes(draw, ndim):
    axis = draw(st.integers(0, ndim - 1))
    return axis if draw(st.booleans()) else axis - ndim


def _softmax_case(draw):
    name = draw(st.sampled_from(list(SOFTMAX_PROFILES)))
    profile = SOFTMAX_PROFILES[name]
    # C = 17: enough classes for the NHWC gathers' 16 x 16 blocks of uint8
    C = draw(st.sampled_from([1, 2, 3, 7, 17]))
    pixels = draw(fuzz_shapes())
    cap = 20000 if C < 17 else 3000
    if math.prod(pixels) > cap:
        pixels = tuple(min(d, cap) if d > 2 else d for d in pixels)
    where = draw(st.integers(0, len(pixels)))
    shape = pixels[:where] + (C,) + pixels[where:]
    axis = where if draw(st.booleans()) else where - len(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xdtype = np.dtype(profile["x"])
    kw = _options(draw, profile, pixels)
    kw["axis"] = axis
    x = _logits(rng, shape, np.float64, kw["from_logits"])
    if not kw["from_logits"]:  # probabilities: a distribution per pixel
        x = np.moveaxis(x, where, -1)
        x = np.moveaxis(x / np.maximum(x.sum(-1, keepdims=True), 1e-300), -1, where)
    x = _in_layout(x.astype(xdtype), draw(st.sampled_from(LAYOUTS)), rng)
    compute = np.dtype(np.float64 if xdtype.itemsize == 8 else np.float32)
    if profile["z"] == "labels":
        # class indices have the pixel shape's rank; they may broadcast along it
        l_shape = _broadcast_shape(draw, pixels)
        labels = rng.integers(0, C, (1,) * (len(pixels) - len(l_shape)) + l_shape)
        if profile.get("ignore") and labels.size:
            labels.reshape(-1)[rng.integers(0, labels.size, size=min(3, labels.size))] = -100
            kw["ignore_value"] = -100
        z = _readonly(labels)
    else:
        z, extra = _fuzz_targets(rng, draw, shape, profile, xdtype, False)
        kw.update(extra)
    if profile.get("class_weights"):
        kw["class_weights"] = rng.uniform(0, 3, C)
    if profile.get("weight"):
        kw["weight"] = _readonly(rng.uniform(0, 2, _broadcast_shape(draw, pixels))
                                 .astype(compute))
    if profile.get("mask"):
        kw["mask"] = _readonly(rng.random(_broadcast_shape(draw, pixels)) < 0.7)
    return name, x, z, kw, pixels


@st.composite
def every_option_cases(draw, loss):
    name, x, z, kw, pixels = (_sigmoid_case if loss == "sigmoid" else _softmax_case)(draw)
    native = np.asarray(x).dtype.newbyteorder("=")
    if kw["grad"] and draw(st.booleans()):
        kw["out"] = np.zeros(np.shape(x), native, order=draw(st.sampled_from("CF")))
    if kw["reduction"] == "none" and draw(st.booleans()):
        kw["loss_out"] = np.zeros(pixels, native)
    return name, x, z, kw, pixels


LOSSES = {"sigmoid": fastsce.sigmoid_cross_entropy, "softmax": fastsce.softmax_cross_entropy}


@given(case=every_option_cases("sigmoid"))
def test_sigmoid_every_option(fast_backend, case):
    _check_every_option("sigmoid", fast_backend, case)


@given(case=every_option_cases("softmax"))
def test_softmax_every_option(fast_backend, case):
    _check_every_option("softmax", fast_backend, case)


def _check_every_option(loss, backend, case):
    name, x, z, kw, pixels = case
    inputs = {k: np.array(v, copy=True) for k, v in dict(kw, x=x, z=z).items()
              if isinstance(v, np.ndarray) and k not in ("out", "loss_out")}
    res = LOSSES[loss](x, z, backend=backend, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("out", "loss_out")}
    ref = LOSSES[loss](x, z, backend="numpy", **ref_kw)
    if "out" in kw:
        assert res.grad is kw["out"]
    if "loss_out" in kw:
        assert res.loss is kw["loss_out"]
    exp, valid, class_axis = _spec(loss, x, z, ref_kw, pixels)
    for got in (res, ref):
        _check_grouped(got, exp, valid, pixels, kw, np.asarray(x).dtype, class_axis)
    for k, before in inputs.items():
        after = dict(kw, x=x, z=z)[k]
        assert np.asarray(after).tobytes() == before.tobytes(), f"{k} was modified"


def _spec(loss, x, z, kw, pixels):
    """The naive statement's "none" result (grad_scale 1), the valid elements (pixels)
    and the class axis (None for the binary loss)."""
    opts = {k: (_native(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()
            if k not in ("reduction", "reduce_axes", "tile_shape", "grad", "grad_scale",
                         "num_threads", "axis")}
    xn, zn = _native(x), _native(z)
    valid = np.ones(pixels, bool)
    if opts.get("mask") is not None:
        valid &= np.broadcast_to(opts["mask"], pixels)
    if loss == "sigmoid":
        if opts.get("ignore_value") is not None:
            valid &= np.broadcast_to(zn, pixels) != opts["ignore_value"]
        return expected(xn, zn, reduction="none", **opts), valid, None
    axis = kw["axis"] % xn.ndim
    hard = zn.dtype.kind in "iu" and zn.shape != xn.shape and zn.ndim == len(pixels)
    if hard and opts.get("ignore_value") is not None:
        valid &= np.broadcast_to(zn, pixels) != opts["ignore_value"]
    return naive_softmax(xn, zn, axis=axis, reduction="none", **opts), valid, axis


def _group_ids(pixels, reduce_axes, tile_shape):
    """Each pixel's group (flat index into the loss array) and the loss array's shape."""
    idx = [i.ravel() for i in np.indices(pixels)]
    if reduce_axes is not None:
        axes = {int(a) % len(pixels) for a in np.atleast_1d(reduce_axes)} if pixels else set()
        kept = [d for d in range(len(pixels)) if d not in axes]
        shape = tuple(pixels[d] for d in kept)
        coords = [idx[d] for d in kept]
    elif tile_shape is not None:
        (th, tw), (H, W) = tile_shape, pixels[-2:]
        shape = tuple(pixels[:-2]) + (-(-H // th), -(-W // tw))
        coords = idx[:-2] + [idx[-2] // th, idx[-1] // tw]
    else:
        return np.zeros(math.prod(pixels), np.int64), ()
    if not coords or not math.prod(pixels):
        return np.zeros(math.prod(pixels), np.int64), shape
    return np.ravel_multi_index(coords, shape), shape


def _check_grouped(res, exp, valid, pixels, kw, xdtype, class_axis):
    """A LossResult against the naive "none" result, grouped and scaled as `kw` says."""
    dtype = xdtype.newbyteorder("=")
    work = np.float64 if dtype == np.float64 else np.float32
    gs = kw["grad_scale"]
    if kw["reduction"] == "none":
        check_result((res.loss, None), exp, dtype, "none")
        factor = np.full(pixels, gs)
    else:
        ids, shape = _group_ids(pixels, kw["reduce_axes"], kw["tile_shape"])
        size = math.prod(shape)
        total = np.bincount(ids, exp.loss_elem.ravel(), size)
        scale = np.bincount(ids, exp.loss_scale.ravel(), size)
        count = np.bincount(ids, valid.ravel(), size)
        denom = np.maximum(count, 1) if kw["reduction"] == "mean" else np.ones(size)
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.where(count > 0, total / denom, np.nan) \
                if kw["reduction"] == "mean" else total
        per_group = np.where(count > 0, gs / denom, 0.0) if kw["reduction"] == "mean" \
            else np.full(size, gs)
        factor = per_group[ids].reshape(pixels)
        rtol = (1e-13 * max(1.0, np.log2(max(valid.size, 2))) if work == np.float64
                else 1e-6)
        got = np.asarray(res.loss, np.float64)
        if kw["reduce_axes"] is None and kw["tile_shape"] is None:
            assert isinstance(res.loss, float), type(res.loss)
        assert got.shape == shape, (got.shape, shape)
        np.testing.assert_array_equal(np.isnan(got.ravel()), np.isnan(want))
        # float32 elements below its smallest subnormal round to 0 (8 of them each)
        tiny = 0.0 if work == np.float64 else 8 * float(np.finfo(np.float32).smallest_subnormal)
        tol = rtol * np.maximum(np.abs(want), scale / denom) + tiny * count / denom + 1e-300
        ok = np.isnan(want) | (np.abs(got.ravel() - want) <= tol)
        assert ok.all(), (got.ravel()[~ok], want[~ok], tol[~ok])
    if res.grad is None:
        assert not kw["grad"]
        return
    if class_axis is not None:
        factor = np.expand_dims(factor, class_axis)
    scaled = Expected(exp.loss, exp.grad * factor, exp.loss_elem, exp.loss_scale,
                      exp.grad_scale * np.abs(factor), exp.count)
    check_grad(res.grad, scaled, dtype)
