"""The public multiclass call: identities, hard labels, layouts (NCHW, NHWC,
any class axis, strided, broadcast), outputs, sizes around BLOCK, thread
determinism, backend parity, finite differences of the reference and
PyTorch's formula (SPEC §1.2-§1.4, §2, §3, §4).

Numba compiles one kernel per combination of operand types (about 4 s each
here, and its disk cache does not hit for these kernels), so the tests share
a few combinations on purpose.  Float32 and float64: soft targets with no
options ("none" and "mean"), and (in test_softmax_exact.py) class weights,
divergence, probabilities with class weights, class indices.  Float64 only:
soft + weight + mask, class indices + class_weights + weight + mask (both
"none" and "mean"), class indices + ignore_value, uint8 codes, grad=False,
read-only logits or targets.  A neutral weight (ones) or mask (all True) is
passed where that lets a test reuse one of these.
"""
import sys

import numpy as np
import pytest

import fastsce
from conftest import require_backend
from exact_softmax import naive_softmax, pytorch_cross_entropy
from naive import check_misaligned_read_aligned, check_result, misaligned, packed_field

BLOCK = fastsce.BLOCK
DTYPES = [np.float32, np.float64]
dtype_ids = lambda d: np.dtype(d).name  # noqa: E731


def smx(*args, **kwargs):
    return fastsce.softmax_cross_entropy(*args, **kwargs)


def random_case(shape, dtype=np.float64, seed=0, axis=1, scale=4.0, normalized=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    z = rng.random(shape)
    if normalized:
        z /= z.sum(axis=axis, keepdims=True)
    return x, z.astype(dtype)


def labels_for(shape, C, seed=0):
    """Class indices of the pixel ``shape``, int64."""
    return np.random.default_rng(seed).integers(0, C, shape)


def assert_same(a, b, what=""):
    """Bitwise equal LossResults (loss float or array, grad array or None)."""
    if isinstance(a.loss, np.ndarray):
        np.testing.assert_array_equal(a.loss, b.loss, err_msg=f"{what}: loss map")
    else:
        assert (a.loss == b.loss) or (np.isnan(a.loss) and np.isnan(b.loss)), \
            (what, a.loss, b.loss)
    if a.grad is None:
        assert b.grad is None, what
    else:
        np.testing.assert_array_equal(a.grad, b.grad, err_msg=f"{what}: grad")


def ulp_close(a, b, dtype, scale, ulps=4.0):
    """|a-b| <= ulps * ulp(dtype at max(|a|, |b|, scale)), element-wise."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mag = np.maximum(np.maximum(np.abs(a), np.abs(b)), scale)
    tol = ulps * np.spacing(mag.astype(dtype)).astype(np.float64)
    return (np.abs(a - b) <= tol) | (a == b)


# ---------------------------------------------------------------- reductions


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_reductions_agree(backend, dtype):
    x, z = random_case((2, 5, 3, 7), dtype, seed=1)
    none = smx(x, z, reduction="none", backend=backend)
    total = smx(x, z, reduction="sum", backend=backend)
    mean = smx(x, z, reduction="mean", backend=backend)
    assert type(total.loss) is float and type(mean.loss) is float
    assert none.loss.shape == (2, 3, 7) and none.grad.shape == x.shape
    assert none.grad.dtype == np.dtype(dtype) and none.loss.dtype == np.dtype(dtype)
    rtol = 1e-13 if dtype == np.float64 else 1e-6
    assert total.loss == pytest.approx(np.sum(none.loss, dtype=np.float64), rel=rtol)
    assert mean.loss == pytest.approx(total.loss / 42, rel=1e-15)
    np.testing.assert_array_equal(none.grad, total.grad)
    np.testing.assert_allclose(mean.grad, total.grad / 42, rtol=4 * np.finfo(dtype).eps,
                               atol=0)
    for res, red in ((none, "none"), (total, "sum"), (mean, "mean")):
        check_result(res, naive_softmax(x, z, reduction=red), dtype, red)


def test_loss_result_and_grad_scale(backend):
    x, z = random_case((3, 4, 5), seed=2)
    res = smx(x, z, backend=backend)
    assert isinstance(res, fastsce.LossResult) and res._fields == ("loss", "grad")
    scaled = smx(x, z, grad_scale=-2.5, backend=backend)
    assert scaled.loss == res.loss  # grad_scale multiplies the gradient only
    np.testing.assert_allclose(scaled.grad, -2.5 * res.grad, rtol=4e-16, atol=0)
    check_result(scaled, naive_softmax(x, z, grad_scale=-2.5), np.float64, "mean")


def test_grad_false(backend):
    x, z = random_case((2, 6, 9), np.float64, seed=3)
    for red in ("mean", "sum"):
        full = smx(x, z, reduction=red, backend=backend)
        fwd = smx(x, z, reduction=red, grad=False, backend=backend)
        assert fwd.grad is None
        if red == "none":
            np.testing.assert_array_equal(fwd.loss, full.loss)
        else:
            assert fwd.loss == full.loss


OPTION_CASES = ["plain", "hard+cw+weight+mask", "soft+weight+mask", "smoothing+divergence",
                "probabilities+cw", "uint8-soft", "hard+ignore+smoothing", "float16-logits",
                "target_scale", "unnormalized"]
MEAN_TOO = ("plain", "hard+cw+weight+mask", "soft+weight+mask")


def _option_case(name, dtype=np.float64, seed=4):
    rng = np.random.default_rng(seed)
    shape = (2, 6, 5, 9)
    C, pshape = shape[1], (2, 5, 9)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    z = rng.random(shape)
    z = (z / z.sum(1, keepdims=True)).astype(dtype)
    kw = {}
    if name == "hard+cw+weight+mask":
        z = labels_for(pshape, C, seed)
        kw = dict(class_weights=rng.uniform(0, 3, C), weight=rng.uniform(0, 2, pshape),
                  mask=rng.random(pshape) < 0.7)
    elif name == "soft+weight+mask":
        kw = dict(weight=rng.uniform(0, 2, pshape), mask=rng.random(pshape) < 0.7)
    elif name == "smoothing+divergence":
        kw = dict(label_smoothing=0.1, divergence=True)
    elif name == "probabilities+cw":
        x = rng.random(shape)
        x.flat[::13] = 0.0
        x.flat[::17] = 1.0
        kw = dict(from_logits=False, class_weights=rng.uniform(0, 3, C))
    elif name == "uint8-soft":
        z = rng.integers(0, 256, shape).astype(np.uint8)
    elif name == "hard+ignore+smoothing":
        z = labels_for(pshape, C, seed).astype(np.int32)
        z[:, 1, ::2] = -100
        kw = dict(ignore_value=-100, label_smoothing=0.2)
    elif name == "float16-logits":
        x = x.astype(np.float16)  # computed in float32
        z = z.astype(np.float32)
    elif name == "target_scale":
        z = rng.integers(0, 201, shape).astype(np.uint8)
        kw = dict(target_scale=200)
    elif name == "unnormalized":
        z = rng.random(shape) * rng.choice([0.0, 0.5, 1.0], (1, C, 1, 1))
    return x, z, kw


@pytest.mark.parametrize("case", OPTION_CASES)
def test_backend_matches_naive(backend, case):
    x, z, kw = _option_case(case)
    for red in ("none", "mean") if case in MEAN_TOO else ("none",):
        res = smx(x, z, reduction=red, backend=backend, **kw)
        check_result(res, naive_softmax(x, z, reduction=red, **kw), x.dtype, red)
        assert res.grad.dtype == x.dtype


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_shift_invariance_is_exact(backend, dtype):
    # x + c (c per pixel) with every value a multiple of 1/8 below 2**10: the
    # shifts are exact, so m - x_k and softmax are the same numbers and the
    # SPEC's (m - x_k) + log(sum exp(x_j - m)) gives bitwise the same results.
    rng = np.random.default_rng(5)
    x = (rng.integers(-160, 160, (2, 5, 4, 6)) / 8).astype(dtype)
    z = rng.random(x.shape).astype(dtype)
    c = rng.integers(-500, 500, (2, 1, 4, 6)).astype(dtype)
    for red in ("none", "mean"):
        a = smx(x, z, reduction=red, backend=backend)
        b = smx(x + c, z, reduction=red, backend=backend)
        assert_same(a, b, f"shift {red}")
    # large shifts (1e4 and -1e5 per pixel, still exact): the same again
    c2 = np.where(rng.random((2, 1, 4, 6)) < 0.5, 1e4, -1e5).astype(dtype)
    assert_same(smx(x + c2, z, reduction="none", backend=backend),
                smx(x, z, reduction="none", backend=backend), "large shift")


def test_one_hot_soft_targets_equal_hard_labels(backend):
    rng = np.random.default_rng(6)
    C = 7
    x = rng.standard_normal((3, C, 4, 5)) * 4
    labels = labels_for((3, 4, 5), C, seed=6)
    onehot = np.moveaxis(np.eye(C)[labels], -1, 1)
    cw = rng.uniform(0.1, 3, C)
    neutral = dict(weight=np.ones((3, 4, 5)), mask=np.ones((3, 4, 5), bool))
    for hard_kw, soft_kw in (({}, {}),
                             (dict(class_weights=cw, **neutral), dict(class_weights=cw)),
                             (dict(label_smoothing=0.15), dict(label_smoothing=0.15))):
        hard = smx(x, labels, reduction="none", backend=backend, **hard_kw)
        soft = smx(x, onehot, reduction="none", backend=backend, **soft_kw)
        assert ulp_close(hard.loss, soft.loss, np.float64, 0.0, ulps=2).all(), soft_kw
        scale = np.max(np.abs(soft.grad)) * 1e-6
        assert ulp_close(hard.grad, soft.grad, np.float64, scale, ulps=2).all(), soft_kw
        check_result(hard, naive_softmax(x, labels, reduction="none", **hard_kw), np.float64,
                     "none")


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.int16, np.int8,
                                         np.uint8, np.uint16, np.uint32, np.uint64],
                         ids=dtype_ids)
def test_label_dtypes_are_all_class_indices(backend, label_dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 3, 5))
    labels = labels_for((2, 3, 5), 4, seed=7)
    want = smx(x, labels, reduction="none", backend=backend)
    got = smx(x, labels.astype(label_dtype), reduction="none", backend=backend)
    assert_same(got, want, np.dtype(label_dtype).name)


def test_ignore_value_equals_mask(backend):
    rng = np.random.default_rng(8)
    C = 5
    x = rng.standard_normal((2, C, 6, 7)) * 3
    labels = labels_for((2, 6, 7), C, seed=8)
    labels[:, ::3, 1::2] = 255
    keep = labels != 255
    cleaned = np.where(keep, labels, 0)
    onehot = np.moveaxis(np.eye(C)[cleaned], -1, 1)
    ones = np.ones((2, 6, 7))
    for red in ("mean", "sum", "none"):
        a = smx(x, labels, ignore_value=255, reduction=red, backend=backend)
        b = smx(x, cleaned, class_weights=np.ones(C), weight=ones, mask=keep, reduction=red,
                backend=backend)
        c = smx(x, onehot, weight=ones, mask=keep, reduction=red, backend=backend)
        for other, name in ((b, "mask"), (c, "soft+mask")):
            if red == "none":
                np.testing.assert_allclose(a.loss, other.loss, rtol=1e-15, atol=0,
                                           err_msg=name)
            else:
                assert a.loss == pytest.approx(other.loss, rel=1e-14), name
            np.testing.assert_allclose(a.grad, other.grad, rtol=1e-14, atol=1e-300,
                                       err_msg=name)
        np.testing.assert_array_equal(np.moveaxis(a.grad, 1, -1)[~keep], 0.0)
        if red == "none":
            np.testing.assert_array_equal(a.loss[~keep], 0.0)
    mean = smx(x, labels, ignore_value=255, backend=backend)
    assert mean.loss == pytest.approx(
        smx(x, labels, ignore_value=255, reduction="sum", backend=backend).loss / keep.sum(),
        rel=1e-15)
    check_result(mean, naive_softmax(x, labels, ignore_value=255), np.float64, "mean")


def test_single_class(backend):
    # C = 1: softmax is 1, every finite pixel has loss 0 and gradient 0
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 1, 4, 5)) * 50
    z = rng.random((3, 1, 4, 5))
    tiny = 4 * np.finfo(np.float64).smallest_subnormal
    for red in ("none", "sum", "mean"):
        res = smx(x, z, reduction=red, backend=backend)
        assert np.all(np.abs(res.loss) <= tiny), red
        assert np.all(np.abs(res.grad) <= tiny), red
        assert res.grad.shape == x.shape
    labels = np.zeros((3, 4, 5), np.int64)
    res = smx(x, labels, reduction="none", backend=backend)
    assert np.all(np.abs(res.loss) <= tiny) and np.all(np.abs(res.grad) <= tiny)


def test_two_classes_equal_the_binary_loss(backend):
    # softmax over [0, x] is sigmoid(x): with targets [1-z, z] the loss is the
    # binary cross-entropy of (x, z) and d/dx_1 its gradient (d/dx_0 = -that).
    rng = np.random.default_rng(10)
    x = np.concatenate([np.linspace(-60, 60, 41), rng.standard_normal(40) * 5,
                        [-745.0, -40.0, 17.0, 36.0, 700.0]]).reshape(1, -1)
    z = np.concatenate([rng.random(x.size - 6), [0.0, 1.0, 0.0, 1.0, 0.5, 0.25]])
    z = z.reshape(1, -1)
    logits = np.stack([np.zeros_like(x), x], axis=1)       # (1, 2, P)
    targets = np.stack([1 - z, z], axis=1)
    soft = smx(logits, targets, reduction="none", backend=backend)
    binary = fastsce.sigmoid_cross_entropy
    ref = binary(x, z, reduction="none", backend=backend)
    sig = np.exp(-np.logaddexp(0.0, -x))  # sigmoid(x) without overflow
    loss_ok = np.abs(soft.loss - ref.loss) <= 1e-12 * np.abs(ref.loss)
    bad = np.flatnonzero(~loss_ok)
    assert loss_ok.all(), [(x.flat[i], z.flat[i], soft.loss.flat[i], ref.loss.flat[i])
                           for i in bad[:6]]
    gscale = np.maximum(sig, z)
    grad_ok = np.abs(soft.grad[:, 1] - ref.grad) <= 1e-12 * gscale
    bad = np.flatnonzero(~grad_ok)
    assert grad_ok.all(), [(x.flat[i], z.flat[i], soft.grad[0, 1].flat[i], ref.grad.flat[i])
                           for i in bad[:6]]
    np.testing.assert_allclose(soft.grad[:, 0], -soft.grad[:, 1], rtol=0,
                               atol=1e-15 * np.max(gscale))
    mean = smx(logits, targets, backend=backend)
    assert mean.loss == pytest.approx(binary(x, z, backend=backend).loss, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_150_classes(backend, dtype):
    # ADE20K-sized class count, small maps, both layouts
    x, z = random_case((2, 150, 3, 5), dtype, seed=11, scale=6.0)
    labels = labels_for((2, 3, 5), 150, seed=11)
    for red in ("mean", "none"):
        check_result(smx(x, z, reduction=red, backend=backend),
                     naive_softmax(x, z, reduction=red), dtype, red)
    check_result(smx(x, labels, reduction="none", backend=backend),
                 naive_softmax(x, labels, reduction="none"), dtype, "none")
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    znhwc = np.ascontiguousarray(np.moveaxis(z, 1, -1))
    res = smx(nhwc, znhwc, axis=-1, reduction="none", backend=backend)
    check_result(res, naive_softmax(nhwc, znhwc, axis=-1, reduction="none"), dtype, "none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mask_with_no_true_pixel(backend, reduction):
    x, z = random_case((2, 3, 4, 5), seed=12)
    res = smx(x, z, weight=np.ones((2, 4, 5)), mask=np.zeros((2, 4, 5), bool),
              reduction=reduction, backend=backend)
    if reduction == "mean":
        assert np.isnan(res.loss)
    elif reduction == "sum":
        assert res.loss == 0.0
    else:
        np.testing.assert_array_equal(res.loss, 0.0)
    np.testing.assert_array_equal(res.grad, 0.0)
    labels = np.full((2, 4, 5), 7, np.int64)  # all ignored (7 is out of range too)
    res = smx(x, labels, ignore_value=7, reduction=reduction, backend=backend)
    if reduction == "mean":
        assert np.isnan(res.loss)
    np.testing.assert_array_equal(res.grad, 0.0)


def test_empty_and_single_pixel(backend):
    for shape, axis in (((0, 3), 1), ((2, 3, 0), 1), ((4,), 0)):
        x, z = random_case(shape, seed=13, axis=axis)
        for red in ("mean", "sum", "none"):
            res = smx(x, z, axis=axis, reduction=red, backend=backend)
            assert res.grad.shape == shape
            check_result(res, naive_softmax(x, z, axis=axis, reduction=red), np.float64, red)
            if red == "none":
                assert res.loss.shape == shape[:axis] + shape[axis + 1:]
    e = np.empty((0, 3))
    assert np.isnan(smx(e, e, backend=backend).loss)
    assert smx(e, e, reduction="sum", backend=backend).loss == 0.0


def test_float16_logits(backend):
    x, z = random_case((2, 4, 3, 5), np.float16, seed=14)
    res = smx(x, z, reduction="none", backend=backend)
    assert res.grad.dtype == np.float16 and res.loss.dtype == np.float16
    check_result(res, naive_softmax(x, z, reduction="none"), np.float16, "none")


# ---------------------------------------------------------------- layouts


def _nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _axis2(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, 2))


LAYOUT_CASES = {
    "soft": lambda rng, C, p: ({}, None),
    "hard+cw+weight+mask": lambda rng, C, p: (
        dict(class_weights=rng.uniform(0, 3, C), weight=rng.uniform(0, 2, p),
             mask=rng.random(p) < 0.8), labels_for(p, C, 15)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_nchw_nhwc_axis2_bitwise(backend, case, reduction):
    C = 5
    shape = (2, C, 37, 250)  # 18500 pixels: crosses a BLOCK boundary
    x, z = random_case(shape, seed=15, scale=6.0)
    rng = np.random.default_rng(15)
    kw, labels = LAYOUT_CASES[case](rng, C, (2, 37, 250))
    t_nchw = z if labels is None else labels
    a = smx(x, t_nchw, axis=1, reduction=reduction, backend=backend, **kw)
    b = smx(_nhwc(x), _nhwc(z) if labels is None else labels, axis=-1,
            reduction=reduction, backend=backend, **kw)
    c = smx(_axis2(x), _axis2(z) if labels is None else labels, axis=2,
            reduction=reduction, backend=backend, **kw)
    for other, name, back in ((b, "NHWC", lambda g: np.moveaxis(g, -1, 1)),
                              (c, "axis=2", lambda g: np.moveaxis(g, 2, 1))):
        if reduction == "none":
            np.testing.assert_array_equal(other.loss, a.loss, err_msg=name)
        else:
            assert other.loss == a.loss, (name, other.loss, a.loss)
        np.testing.assert_array_equal(back(other.grad), a.grad, err_msg=name)
    check_result(a, naive_softmax(x, t_nchw, reduction=reduction, **kw), np.float64,
                 reduction)



@pytest.mark.parametrize("C", [3, 4, 9, 17, 21])
@pytest.mark.parametrize("xdtype,tdtype", [(np.float64, np.float64), (np.float32, np.uint8),
                                           (np.float64, np.uint16), (np.float32, np.float64)])
def test_nchw_nhwc_bitwise_per_dtype(backend, xdtype, tdtype, C):
    # The NHWC gathers and the gradient scatter are typed per item size, and
    # go by blocks of 16 bytes square (4 x 4 float32, 16 x 16 uint8) where
    # there are classes enough, a row's last block overlapping the one before
    x, z = random_case((2, C, 9, 70), xdtype, seed=16, scale=6.0)
    if tdtype in (np.uint8, np.uint16):
        top = np.iinfo(tdtype).max
        z = (z * top).round().astype(tdtype)
    else:
        z = z.astype(tdtype)
    a = smx(x, z, axis=1, reduction="none", backend=backend)
    b = smx(_nhwc(x), _nhwc(z), axis=-1, reduction="none", backend=backend)
    np.testing.assert_array_equal(b.loss, a.loss)
    np.testing.assert_array_equal(np.moveaxis(b.grad, -1, 1), a.grad)
    assert b.grad.dtype == xdtype


@pytest.mark.parametrize("C", [3, 4, 9, 17, 21])
@pytest.mark.parametrize("xdtype,tdtype", [(np.float32, np.uint8), (np.float64, np.float32)])
def test_class_padded_nhwc_equals_nchw(backend, xdtype, tdtype, C):
    # Classes adjacent but pixels further apart than C (views of a wider class
    # axis, and such an `out`): the blocks' rows are strided, and the
    # gradient goes straight into `out`
    x, z = random_case((2, C, 5, 33), xdtype, seed=18, scale=6.0)
    if tdtype == np.uint8:
        z = (z * 255).round().astype(np.uint8)
    else:
        z = z.astype(tdtype)

    def padded(a, fill):
        wide = np.full(a.shape[:1] + a.shape[2:] + (C + 3,), fill, a.dtype)
        wide[..., :C] = np.moveaxis(a, 1, -1)
        return wide[..., :C]

    out = np.full((2, 5, 33, C + 3), 7.0, xdtype)
    a = smx(x, z, axis=1, reduction="none", backend=backend)
    b = smx(padded(x, 9.0), padded(z, 0), axis=-1, reduction="none", backend=backend,
            out=out[..., :C])
    np.testing.assert_array_equal(b.loss, a.loss)
    np.testing.assert_array_equal(np.moveaxis(out[..., :C], -1, 1), a.grad)
    assert (out[..., C:] == 7.0).all()


def _placed_out(shape, dtype, aligned):
    """An empty `out` 64-byte aligned, or one item past that (misaligned-out:
    not 16-byte aligned, yet whole items)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + (0 if aligned else np.dtype(dtype).itemsize)
    return raw[start:start + nbytes].view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned-out"])
@pytest.mark.parametrize("width", [512, 515])
def test_streamed_gradient_equals_scattered(backend, dtype, aligned, width):
    # A gradient past STREAM_BYTES leaves the tile buffer by non-temporal
    # stores (memcpy where `out` is not 16-byte aligned): in NCHW with a class
    # stride of whole pages (width 512) row by row, in NHWC transposed 16
    # pixels at a time through a staging block. The NHWC `out` has padded
    # rows, so tiles end with its rows: at width 515 each ends in a 3-pixel
    # block, and rows 517 x 5 items apart start misaligned.
    from fastsce._layout import STREAM_BYTES
    shape = (1, 5, 1024, width)     # C = 5: float32's 4 x 4 blocks reach the stage
    assert np.prod(shape) * np.dtype(dtype).itemsize >= STREAM_BYTES
    x, z = random_case(shape, dtype, seed=17, scale=6.0)
    out = _placed_out(shape, dtype, aligned)
    out_nhwc = _placed_out((1, 1024, width + 2, 5), dtype, aligned)[:, :, :width]
    a = smx(x, z, axis=1, reduction="sum", backend=backend, out=out)
    b = smx(_nhwc(x), _nhwc(z), axis=-1, reduction="sum", backend=backend, out=out_nhwc)
    assert a.grad is out and b.grad is out_nhwc
    assert a.loss == b.loss
    np.testing.assert_array_equal(np.moveaxis(out_nhwc, -1, 1), out)
    if width == 515:        # NCHW written in place, not streamed: both against the reference
        c = smx(x, z, axis=1, reduction="sum", backend="numpy")
        np.testing.assert_allclose(out, c.grad, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-7 if dtype == np.float32 else 1e-15)


def test_stream_elements_copies_every_case():
    # Numba's non-temporal row copy: aligned whole 16-byte runs by streaming
    # stores (on x86-64), every other run by memcpy; each must copy exactly.
    pytest.importorskip("numba")
    from numba import njit
    from fastsce._numba_math import _STREAMING, store_fence, stream_elements

    @njit
    def copy(dst, doff, src, soff, n):
        stream_elements(dst, doff, src, soff, n)
        store_fence()

    src = np.arange(1, 301, dtype=np.float32)
    raw = np.zeros(1024 + 64, np.uint8)
    base = (-raw.ctypes.data) % 64
    for doff, soff, n in [(0, 0, 256), (0, 3, 256), (1, 0, 8), (0, 0, 7), (0, 0, 0), (4, 9, 100)]:
        dst = raw[base:base + 1024].view(np.float32)
        dst[:] = 0
        copy(dst, doff, src, soff, n)
        expected = np.zeros(256, np.float32)
        expected[doff:doff + n] = src[soff:soff + n]
        np.testing.assert_array_equal(dst, expected, err_msg=str((doff, soff, n)))
    asm = "".join(copy.inspect_asm().values())
    assert ("movnt" in asm) == _STREAMING


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_numba_transpose_copies_every_case(dtype):
    # Numba's tile copy, directly: blocks of 16 bytes square where one side is
    # unit-stride (a last block overlapping the one before), element by
    # element otherwise; pixel counts and class counts around B = 16 / item,
    # pixels forwards and backwards. Nothing outside the copy may change.
    pytest.importorskip("numba")
    from fastsce._numba_softmax import _transpose
    rng = np.random.default_rng(19)
    B = 16 // np.dtype(dtype).itemsize
    for n in sorted({1, B - 1, B, B + 1, 2 * B + 3, 37}):
        for C in sorted({1, 3, B - 1, B, B + 5, 21}):
            for ps in (C, -C, C + 2):   # per pixel in the pixel-major side
                src = rng.integers(1, 250, n * abs(ps) + 8).astype(dtype)
                so = 3 + (n - 1) * abs(ps) if ps < 0 else 3
                bs = n + 5
                dst = np.zeros(C * bs + 4, dtype)
                expected = dst.copy()
                q, k = np.meshgrid(np.arange(n), np.arange(C), indexing="ij")
                expected[2 + k * bs + q] = src[so + q * ps + k]
                _transpose(dst, 2, 1, bs, src, so, ps, 1, n, C)      # into class rows
                np.testing.assert_array_equal(dst, expected, err_msg=f"in {n} {C} {ps}")
                back = np.zeros_like(src)
                _transpose(back, so, ps, 1, dst, 2, 1, bs, n, C)     # and out again
                kept = np.zeros_like(src)
                kept[so + q * ps + k] = src[so + q * ps + k]
                np.testing.assert_array_equal(back, kept, err_msg=f"out {n} {C} {ps}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reversed_nhwc_equals_nchw(backend, dtype):
    # Classes adjacent, pixels walked backwards (a negative pixel stride):
    # gathered by blocks from the end of each row; an odd row of 33 pixels
    # leaves a last block overlapping the one before
    C = 9
    x, z = random_case((2, C, 5, 33), dtype, seed=20, scale=6.0)
    a = smx(x[:, :, :, ::-1], z[:, :, :, ::-1], axis=1, reduction="none", backend=backend)
    b = smx(_nhwc(x)[:, :, ::-1], _nhwc(z)[:, :, ::-1], axis=-1, reduction="none",
            backend=backend)
    np.testing.assert_array_equal(b.loss, a.loss)
    np.testing.assert_array_equal(np.moveaxis(b.grad, -1, 1), a.grad)


def _variants(a, tmp_path, name):
    """(layout, array) equal in value to ``a`` (any ndim >= 1)."""
    yield "F-order", np.asfortranarray(a)
    big = np.zeros(tuple(2 * d + 1 for d in a.shape), a.dtype)
    sl = tuple(slice(1, 1 + 2 * d, 2) for d in a.shape)
    big[sl] = a
    yield "strided", big[sl]
    rev = np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])
    yield "negative-strides", rev[(slice(None, None, -1),) * a.ndim]
    ro = a.copy()
    ro.flags.writeable = False
    yield "read-only", ro
    path = tmp_path / f"{name}.bin"
    mm = np.memmap(path, dtype=a.dtype, mode="w+", shape=a.shape)
    mm[...] = a
    mm.flush()
    yield "memmap", np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape)
    yield "byte-swapped", a.astype(a.dtype.newbyteorder(">" if sys.byteorder == "little"
                                                        else "<"))
    if a.dtype.itemsize > 1:                # (bytes are always aligned)
        yield "misaligned", misaligned(a)   # read from an aligned copy
        yield "packed-field", packed_field(a)


# read-only views (np.broadcast_to, memmap mode "r", flags.writeable=False):
# only logits and targets get them, with reduction="none" (the kernels see
# every input read-only, so these check that the API passes them through)
READ_ONLY = ("read-only", "memmap")


@pytest.mark.parametrize("role", ["logits", "targets", "labels", "weight", "mask",
                                  "class_weights"])
def test_layouts_equal_contiguous(backend, role, tmp_path):
    C = 4
    shape = (3, C, 11, 2 * BLOCK // 33 + 7)  # > 1 block of pixels
    x, z = random_case(shape, seed=16)
    rng = np.random.default_rng(16)
    pshape = (3, 11, shape[3])
    args = {"logits": x, "weight": rng.uniform(0, 2, pshape), "mask": rng.random(pshape) < 0.8}
    if role in ("labels", "class_weights"):
        args.update(labels=labels_for(pshape, C, 16), class_weights=rng.uniform(0.5, 2, C))
    else:
        args.update(targets=z, class_weights=None)

    def call(a, red):
        t = a["labels"] if "labels" in a else a["targets"]
        return smx(a["logits"], t, weight=a["weight"], mask=a["mask"],
                   class_weights=a["class_weights"], reduction=red, backend=backend)

    def read_only(a):
        a = a.copy()
        a.flags.writeable = False
        return a

    want = {red: call(args, red) for red in ("mean", "none")}
    for layout, arr in _variants(args[role], tmp_path, role):
        if layout in READ_ONLY and role not in ("logits", "targets"):
            continue
        if role == "mask" and layout == "byte-swapped":
            continue
        before = np.array(arr, copy=True)
        new = {**args, role: arr}
        if layout in READ_ONLY:
            # every operand read-only: the kernel variant of test_broadcast_operands
            new = {k: v if k == role or not isinstance(v, np.ndarray) else read_only(v)
                   for k, v in new.items()}
        for red in ("none",) if layout in READ_ONLY else ("mean", "none"):
            got = call(new, red)
            assert_same(got, want[red], f"{role} {layout} {red}")
        np.testing.assert_array_equal(arr, before)


def _zero_stride(a, shape):
    """A writeable zero-stride view of ``a`` broadcast to ``shape``."""
    b = np.broadcast_to(a, shape)
    return np.lib.stride_tricks.as_strided(a, shape, b.strides, writeable=True)


def test_broadcast_operands_equal_expanded(backend):
    rng = np.random.default_rng(17)
    C = 3
    shape, pshape = (2, C, 9, 40), (2, 9, 40)
    row = rng.standard_normal((1, C, 1, 40)) * 3
    zc = rng.random((C, 1, 1))
    w = rng.random((9, 1))
    m = rng.random((1, 9, 40)) < 0.7
    lab = labels_for((1, 1, 40), C, 17)
    xfull = np.ascontiguousarray(np.broadcast_to(row, shape))
    cases = [
        # np.broadcast_to views (read-only, zero strides), and weight and mask
        # broadcast by the call itself
        ("broadcast_to", np.broadcast_to(row, shape), np.broadcast_to(zc, shape), w, m, {},
         ("none",)),
        # writeable zero-stride views (one kernel variant with the contiguous case)
        ("zero-stride targets", xfull, _zero_stride(zc, shape), _zero_stride(w, pshape),
         _zero_stride(m, pshape), {}, ("none", "mean")),
        ("zero-stride labels", xfull, _zero_stride(lab, pshape), _zero_stride(w, pshape),
         _zero_stride(m, pshape), {"class_weights": np.array([0.5, 1.0, 2.0])},
         ("none", "mean")),
    ]
    for name, x, t, wv, mv, kw, reds in cases:
        for red in reds:
            got = smx(x, t, weight=wv, mask=mv, reduction=red, backend=backend, **kw)
            want = smx(np.array(x), np.array(t), weight=np.broadcast_to(w, pshape).copy(),
                       mask=np.broadcast_to(m, pshape).copy(), reduction=red,
                       backend=backend, **kw)
            assert_same(got, want, f"{name} {red}")
            assert got.grad.flags.writeable and got.grad.strides[0] != 0
            check_result(got, naive_softmax(x, t, weight=w, mask=m, reduction=red, **kw),
                         np.float64, red)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_out_and_loss_out(backend, dtype):
    x, z = random_case((2, 4, 3, 5), dtype, seed=18)
    plain = smx(x, z, reduction="none", backend=backend)
    out = np.full(x.shape, 7.0, dtype)
    loss_out = np.full((2, 3, 5), 7.0, dtype)
    res = smx(x, z, reduction="none", out=out, loss_out=loss_out, backend=backend)
    assert res.grad is out and res.loss is loss_out
    assert_same(res, plain, "out/loss_out")
    big = np.full((2, 8, 3, 10), 7.0, dtype)
    view = big[:, ::2, :, 1::2]  # strided gradient buffer
    res = smx(x, z, reduction="sum", out=view, backend=backend)
    assert res.grad is view
    np.testing.assert_array_equal(view, plain.grad)
    np.testing.assert_array_equal(big[:, 1::2], 7.0)  # the gaps are untouched
    np.testing.assert_array_equal(big[:, :, :, ::2], 7.0)
    nhwc_out = np.full((2, 3, 5, 4), 7.0, dtype)  # an NHWC buffer for NHWC logits
    res = smx(_nhwc(x), _nhwc(z), axis=-1, out=nhwc_out, backend=backend)
    assert res.grad is nhwc_out
    np.testing.assert_array_equal(np.moveaxis(nhwc_out, -1, 1),
                                  smx(x, z, backend=backend).grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_in_place_gradient(backend, reduction):
    x, z = random_case((2, 5, 4, 6), seed=19)
    w = np.ones((2, 4, 1)) * np.linspace(0, 1, 6)
    m = np.random.default_rng(19).random((2, 4, 6)) < 0.8
    want = smx(x.copy(), z, weight=w, mask=m, reduction=reduction, backend=backend)
    xi = x.copy()
    res = smx(xi, z, weight=w, mask=m, reduction=reduction, out=xi, backend=backend)
    assert res.grad is xi
    assert_same(res, want, "in place")
    labels = labels_for((2, 4, 6), 5, 19)
    cw = np.linspace(0.5, 2, 5)
    want = smx(x.copy(), labels, class_weights=cw, weight=w, mask=m, reduction=reduction,
               backend=backend)
    xi = x.copy()
    res = smx(xi, labels, class_weights=cw, weight=w, mask=m, reduction=reduction, out=xi,
              backend=backend)
    assert_same(res, want, "in place, labels")


def test_inputs_never_modified(backend):
    rng = np.random.default_rng(20)
    x = rng.standard_normal((2, 4, 3, 5))
    x[0, 1, 2, 3] = -np.inf
    x[1, 0, 0, 0] = np.inf
    z = rng.random(x.shape)
    z[0, 1, 2, 3] = 0.0
    cw = rng.uniform(0.5, 2, 4)
    w = rng.random((2, 3, 5))
    m = rng.random((2, 3, 5)) < 0.7
    labels = labels_for((2, 3, 5), 4, 20)
    labels[0, 0, 0] = -1
    t8 = rng.integers(0, 256, x.shape).astype(np.uint8)
    arrays = (x, z, cw, w, m, labels, t8)
    copies = [a.copy() for a in arrays]
    smx(x, z, weight=w, mask=m, reduction="none", backend=backend)
    smx(x, z, divergence=True, reduction="none", backend=backend)
    smx(x, labels, ignore_value=-1, label_smoothing=0.1, backend=backend)
    smx(x, labels, class_weights=cw, weight=w, mask=labels >= 0, backend=backend)
    smx(x, t8, reduction="none", backend=backend)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("pixels", [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3],
                         ids=["1", "BLOCK-1", "BLOCK", "BLOCK+1", "2BLOCK+3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_sizes_around_block_edges(backend, dtype, pixels):
    x, z = random_case((1, 3, pixels), dtype, seed=pixels)
    for red in ("mean", "none"):
        a = smx(x, z, reduction=red, backend=backend)
        check_result(a, naive_softmax(x, z, reduction=red), dtype, red)
        b = smx(_nhwc(x), _nhwc(z), axis=-1, reduction=red, backend=backend)
        assert b.loss == a.loss if red == "mean" else np.array_equal(b.loss, a.loss)
        np.testing.assert_array_equal(np.moveaxis(b.grad, -1, 1), a.grad)
    if dtype == np.float64:
        m = np.arange(pixels).reshape(1, pixels) % 3 != 0
        w = np.ones((1, pixels))
        check_result(smx(x, z, weight=w, mask=m, reduction="sum", backend=backend),
                     naive_softmax(x, z, mask=m, reduction="sum"), dtype, "sum")


# ---------------------------------------------------------------- fast backends


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_bitwise_determinism_across_threads(fast_backend, dtype):
    P = 4 * BLOCK + 17
    x, z = random_case((1, 4, P), dtype, seed=21, scale=10.0)
    kw = {}
    if dtype == np.float64:
        rng = np.random.default_rng(22)
        kw = dict(weight=rng.random((1, P)), mask=rng.random((1, P)) < 0.9)
    for red in ("mean", "none"):
        runs = [smx(x, z, reduction=red, backend=fast_backend, num_threads=t, **kw)
                for t in (1, 2, 3, 1, 3, 2)]
        for t, r in zip((2, 3, 1, 3, 2), runs[1:]):
            assert_same(r, runs[0], f"{red} threads={t}")
    labels = labels_for((1, P), 4, 21)
    runs = [smx(x, labels, reduction="none", backend=fast_backend, num_threads=t)
            for t in (1, 3, 2)]
    for r in runs[1:]:
        assert_same(r, runs[0], "labels")


def _parity_case(dtype, C=5):
    rng = np.random.default_rng(23)
    P = 2 * BLOCK // 3 + 1
    x = (rng.standard_normal((3, C, P)) * np.exp(rng.uniform(-10, 5, (3, C, P)))).astype(dtype)
    z = rng.random((3, C, P))
    z[:, 0, ::5] = 0.0
    z[:, 1, 1::5] = 1.0
    return x, z.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_numba_and_c_agree(dtype):
    require_backend("numba")
    require_backend("c")
    x, z = _parity_case(dtype)
    a = smx(x, z, reduction="none", backend="numba")
    b = smx(x, z, reduction="none", backend="c")
    exp = naive_softmax(x, z, reduction="none")
    ok_loss = ulp_close(a.loss, b.loss, dtype, exp.loss_scale)
    ok_grad = ulp_close(a.grad, b.grad, dtype, exp.grad_scale)
    assert ok_loss.all(), np.argwhere(~ok_loss)[:5].tolist()
    assert ok_grad.all(), np.argwhere(~ok_grad)[:5].tolist()
    ma = smx(x, z, backend="numba").loss
    mb = smx(x, z, backend="c").loss
    assert ma == pytest.approx(mb, rel=1e-12)
    labels = labels_for((3, x.shape[2]), 5, 23)
    la = smx(x, labels, reduction="none", backend="numba")
    lb = smx(x, labels, reduction="none", backend="c")
    exp = naive_softmax(x, labels, reduction="none")
    assert ulp_close(la.loss, lb.loss, dtype, exp.loss_scale).all()
    assert ulp_close(la.grad, lb.grad, dtype, exp.grad_scale).all()


BITWISE_OPTIONS = {"plain": {}, "class_weights": {"class_weights": "random"},
                   "divergence": {"divergence": True}, "smoothing": {"label_smoothing": 0.1}}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("C", [4, 21])          # even and odd: class pairs and the last one alone
@pytest.mark.parametrize("option", BITWISE_OPTIONS)
def test_numba_and_c_bitwise(dtype, C, option):
    # same algorithm in both (STYLE "Numba and C in lockstep"): pixel losses
    # and gradients are expected to be bitwise equal, not just within 4 ulp
    require_backend("numba")
    require_backend("c")
    x, z = _parity_case(dtype, C)
    x[0, 0, :3] = [-np.inf, np.inf, np.finfo(dtype).max]  # a class at -inf; a maximum at
    x[1, :, 0] = np.inf                                    # +inf, alone and tied; a huge one
    kw = dict(BITWISE_OPTIONS[option])
    if "class_weights" in kw:
        kw["class_weights"] = np.random.default_rng(C).random(C) + 0.25
    a = smx(x, z, reduction="none", backend="numba", **kw)
    b = smx(x, z, reduction="none", backend="c", **kw)
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.grad, b.grad)


# ---------------------------------------------------------------- the reference itself


def _fd4(f, x, i, h):
    def at(delta):
        xp = x.copy()
        xp.flat[i] += delta
        return f(xp)
    return (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)


FD_OPTIONS = {
    "plain": {},
    "cw+weight+mask": {"class_weights": np.array([0.5, 2.0, 1.0, 0.0]),
                       "weight": np.array([0.5, 1.5]),
                       "mask": np.array([[True, False], [True, True], [False, True]])},
    "smoothing+divergence": {"label_smoothing": 0.2, "divergence": True},
    "probabilities": {"from_logits": False, "class_weights": np.array([1.0, 2.0, 0.5, 3.0])},
    "labels+ignore": {"labels": True, "ignore_value": 3},
}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", list(FD_OPTIONS))
def test_reference_gradient_by_finite_differences(name, reduction):
    opts = dict(FD_OPTIONS[name])
    rng = np.random.default_rng(24)
    shape = (3, 4, 2)  # classes on axis 1, pixel shape (3, 2)
    if opts.get("from_logits", True):
        x = rng.uniform(-4, 4, shape)
    else:
        x = rng.uniform(0.05, 0.95, shape)
    if opts.pop("labels", False):
        z = np.array([[0, 3], [2, 1], [3, 0]])
    else:
        z = rng.random(shape)
        z[0, :, 0] = [1.0, 0.0, 0.0, 0.0]

    def f(xp):
        return smx(xp, z, reduction=reduction, grad=False, backend="numpy", **opts).loss

    res = smx(x, z, reduction=reduction, backend="numpy", **opts)
    h = 1e-3 if opts.get("from_logits", True) else 1e-4
    for i in range(x.size):
        fd = _fd4(f, x, i, h)
        assert res.grad.flat[i] == pytest.approx(fd, rel=1e-7, abs=1e-9), (name, i)


def test_reference_by_hand():
    ln3 = np.log(3.0)
    x = np.array([[0.0, 0.0, 0.0], [np.log(2.0), 0.0, 0.0]])
    z = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    res = smx(x, z, axis=1, reduction="none", backend="numpy")
    np.testing.assert_allclose(res.loss, [ln3, np.log(4.0) - 0.5 * np.log(2.0)], rtol=1e-15)
    np.testing.assert_allclose(res.grad, [[1 / 3 - 1, 1 / 3, 1 / 3], [0.0, -0.25, 0.25]],
                               rtol=1e-15, atol=1e-16)
    kl = smx(x, z, divergence=True, reduction="none", backend="numpy")
    np.testing.assert_allclose(kl.loss, [ln3, np.log(4.0) - 0.5 * np.log(2.0) - np.log(2.0)],
                               rtol=1e-14)
    prob = smx(np.array([[0.5, 0.25, 0.0]]), np.array([[0.5, 0.0, 0.5]]), from_logits=False,
               reduction="none", backend="numpy")
    np.testing.assert_allclose(prob.loss, [0.5 * np.log(2.0) + 50.0], rtol=1e-15)
    np.testing.assert_allclose(prob.grad, [[-1.0, 0.0, -0.5e12]], rtol=1e-15)


# ---------------------------------------------------------------- PyTorch


def test_matches_pytorch_cross_entropy(backend):
    rng = np.random.default_rng(25)
    C = 6
    x = rng.standard_normal((4, C, 5, 7)) * 4
    p = rng.random(x.shape)
    p = p / p.sum(1, keepdims=True)
    cw = rng.uniform(0.2, 3, C)
    n = 4 * 5 * 7
    rtol = 1e-6
    # probability targets: torch's "mean" divides by the N*H*W samples
    for kw in ({}, {"class_weights": cw}, {"label_smoothing": 0.1},
               {"class_weights": cw, "label_smoothing": 0.1}):
        want, wgrad = pytorch_cross_entropy(x, p, weight=kw.get("class_weights"),
                                            label_smoothing=kw.get("label_smoothing", 0.0))
        if "class_weights" in kw:  # (as the mean of the loss map: a shared kernel variant)
            none = smx(x, p, reduction="none", backend=backend, **kw)
            loss, grad = float(np.sum(none.loss)) / n, none.grad / n
        else:
            loss, grad = smx(x, p, backend=backend, **kw)
        assert loss == pytest.approx(want, rel=rtol), kw
        np.testing.assert_allclose(grad, wgrad, rtol=rtol, atol=rtol * np.abs(wgrad).max(),
                                   err_msg=str(kw))
    # class indices with ignore_index: "mean" over the non-ignored pixels
    labels = labels_for((4, 5, 7), C, 25)
    labels[:, 0, :] = -100
    want, wgrad = pytorch_cross_entropy(x, labels)
    got = smx(x, labels, ignore_value=-100, backend=backend)
    assert got.loss == pytest.approx(want, rel=rtol)
    np.testing.assert_allclose(got.grad, wgrad, rtol=rtol, atol=rtol * np.abs(wgrad).max())
    # with class weights torch divides by sum(w_y); fastsce's sum is comparable
    want, _ = pytorch_cross_entropy(x, labels, weight=cw)
    keep = labels != -100
    wsum = float(np.sum(cw[labels[keep]]))
    got = smx(x, np.where(keep, labels, 0), class_weights=cw, weight=np.ones(keep.shape),
              mask=keep, reduction="sum", backend=backend)
    assert got.loss == pytest.approx(want * wsum, rel=rtol)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "labels"])
def test_misaligned_operands_are_read_aligned(monkeypatch, fast_backend, hard):
    """Misaligned inputs reach the loops (typed loads) only as aligned copies."""
    x, z = random_case((2, 5, 3, 4), np.float32, seed=7)
    t = labels_for((2, 3, 4), 5, 7) if hard else z
    w = np.linspace(0.5, 2.0, 4, dtype=np.float32)
    cw = np.linspace(1.0, 2.0, 5, dtype=np.float32)
    check_misaligned_read_aligned(monkeypatch, fast_backend, smx, x, t, weight=w,
                                  class_weights=cw)
