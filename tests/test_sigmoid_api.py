"""The public call: reductions, options, broadcasting, outputs, layouts, sizes,
backends against the reference, determinism, dispatch and info() (SPEC §1.3,
§1.4, §2, §3, §4)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastsce
from conftest import require_backend
from naive import (check_misaligned_read_aligned, check_result, expected, misaligned,
                   packed_field, pytorch_mean_bce_with_logits)

BLOCK = fastsce.BLOCK
DTYPES = [np.float32, np.float64]
dtype_ids = lambda d: np.dtype(d).name  # noqa: E731
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sce(*args, **kwargs):
    return fastsce.sigmoid_cross_entropy(*args, **kwargs)


def random_case(shape, dtype=np.float64, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    z = rng.random(shape).astype(dtype)
    return x, z


def ulp_close(a, b, dtype, scale, ulps=4.0):
    """|a-b| <= ulps * ulp(dtype at max(|a|, |b|, scale)), element-wise."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mag = np.maximum(np.maximum(np.abs(a), np.abs(b)), scale)
    tol = ulps * np.spacing(mag.astype(dtype)).astype(np.float64)
    ok = (np.abs(a - b) <= tol) | (a == b)
    return ok


# ---------------------------------------------------------------- reductions

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_reductions_agree(backend, dtype):
    x, z = random_case((37, 29), dtype, seed=1)
    none = sce(x, z, reduction="none", backend=backend)
    total = sce(x, z, reduction="sum", backend=backend)
    mean = sce(x, z, reduction="mean", backend=backend)
    assert type(total.loss) is float and type(mean.loss) is float
    assert none.loss.shape == x.shape
    rtol = 1e-13 if dtype == np.float64 else 1e-6
    assert total.loss == pytest.approx(np.sum(none.loss, dtype=np.float64), rel=rtol)
    assert mean.loss == pytest.approx(total.loss / x.size, rel=1e-15)
    np.testing.assert_array_equal(none.grad, total.grad)
    np.testing.assert_allclose(mean.grad, total.grad / x.size,
                               rtol=4 * np.finfo(dtype).eps, atol=0)
    for res, red in ((none, "none"), (total, "sum"), (mean, "mean")):
        check_result(res, expected(x, z, reduction=red), dtype, red)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mask_with_no_true_element(backend, reduction):
    x, z = random_case((3, 4), seed=2)
    res = sce(x, z, mask=np.zeros((3, 4), bool), reduction=reduction, backend=backend)
    if reduction == "mean":
        assert np.isnan(res.loss)
    elif reduction == "sum":
        assert res.loss == 0.0
    else:
        np.testing.assert_array_equal(res.loss, 0.0)
    np.testing.assert_array_equal(res.grad, 0.0)


def test_mean_divides_by_unmasked_count(backend):
    x, z = random_case((6, 5), seed=3)
    mask = np.zeros((6, 5), bool)
    mask[::2, 1::2] = True
    w = np.linspace(0.5, 2.0, 30).reshape(6, 5)
    res = sce(x, z, mask=mask, weight=w, backend=backend)
    n = mask.sum()
    full = sce(x, z, weight=w, reduction="none", backend=backend)
    assert res.loss == pytest.approx(np.sum(full.loss[mask]) / n, rel=1e-13)
    np.testing.assert_allclose(res.grad[mask], full.grad[mask] / n, rtol=1e-14)
    np.testing.assert_array_equal(res.grad[~mask], 0.0)
    check_result(res, expected(x, z, mask=mask, weight=w), np.float64, "mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_grad_scale_and_grad_false(backend, dtype):
    x, z = random_case((50,), dtype, seed=4)
    base = sce(x, z, backend=backend)
    scaled = sce(x, z, grad_scale=2.5, backend=backend)
    assert scaled.loss == base.loss  # grad_scale multiplies the gradient only
    np.testing.assert_allclose(scaled.grad, 2.5 * base.grad.astype(np.float64),
                               rtol=4 * np.finfo(dtype).eps)
    check_result(scaled, expected(x, z, grad_scale=2.5), dtype, "mean")
    fwd = sce(x, z, grad=False, backend=backend)
    assert fwd.grad is None
    assert fwd.loss == base.loss
    fwd_none = sce(x, z, grad=False, reduction="none", backend=backend)
    assert fwd_none.grad is None
    np.testing.assert_array_equal(fwd_none.loss, sce(x, z, reduction="none",
                                                     backend=backend).loss)


def test_loss_result_is_namedtuple(backend):
    x, z = random_case((5,), seed=5)
    res = sce(x, z, backend=backend)
    assert isinstance(res, fastsce.LossResult)
    loss, grad = res
    assert res.loss is loss and res.grad is grad
    assert res._fields == ("loss", "grad")


# ---------------------------------------------------------------- broadcasting

BROADCAST_CASES = {
    "weight(C,1,1)": dict(weight=(3, 1, 1)),
    "mask(N,1,H,W)": dict(mask=(2, 1, 4, 5)),
    "pos_weight(C,1,1)": dict(pos_weight=(3, 1, 1)),
    "targets(1,C,H,W)+weight(W)": dict(targets=(1, 3, 4, 5), weight=(5,)),
    "all": dict(targets=(3, 4, 5), weight=(2, 1, 1, 1), mask=(1, 3, 1, 5),
                pos_weight=(3, 1, 1)),
    "scalars": dict(weight=(), pos_weight=()),
}


def _broadcast_operands(case, dtype, seed=6):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 4, 5)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    spec = BROADCAST_CASES[case]
    z = rng.random(spec.get("targets", shape)).astype(dtype)
    kw = {}
    if "weight" in spec:
        kw["weight"] = rng.uniform(0, 2, spec["weight"]).astype(dtype)
    if "pos_weight" in spec:
        kw["pos_weight"] = rng.uniform(0.2, 3, spec["pos_weight"]).astype(dtype)
    if "mask" in spec:
        kw["mask"] = rng.random(spec["mask"]) < 0.6
    return x, z, kw


# Broadcasting is dtype- and reduction-independent logic: every case in
# float32 "mean", the full combination also in float64 and "none" (each extra
# combination is another Numba compilation).
BROADCAST_PARAMS = [(np.float32, case, "mean") for case in BROADCAST_CASES] + [
    (np.float64, "all", "mean"), (np.float32, "all", "none"), (np.float64, "all", "none")]


@pytest.mark.parametrize("dtype,case,reduction", BROADCAST_PARAMS,
                         ids=[f"{np.dtype(d).name}-{c}-{r}" for d, c, r in BROADCAST_PARAMS])
def test_broadcast_operands_equal_expanded(backend, dtype, case, reduction):
    x, z, kw = _broadcast_operands(case, dtype)
    res = sce(x, z, reduction=reduction, backend=backend, **kw)
    expanded = {k: np.broadcast_to(v, x.shape).copy() for k, v in kw.items()}
    ref = sce(x, np.broadcast_to(z, x.shape).copy(), reduction=reduction, backend="numpy",
              **expanded)
    exp = expected(x, z, reduction=reduction, **kw)
    check_result(res, exp, dtype, reduction)
    check_result(ref, exp, dtype, reduction)


# Every target type C reads in place, and float64 logits' codes (converted).
COMMON_CALL = [("float32", "float32", None), ("float32", "float64", None),
               ("float32", "uint8", 7), ("float32", "uint16", None),
               ("float64", "float64", None), ("float64", "float32", None),
               ("float64", "uint8", 7)]


@pytest.mark.parametrize("xdtype,tdtype,ignore", COMMON_CALL,
                         ids=[f"{x}-{t}-{'ignore' if i else 'all'}" for x, t, i in COMMON_CALL])
def test_weight_and_mask_equal_them_with_a_neutral_pos_weight(backend, xdtype, tdtype, ignore):
    """A weight, a mask or both without pos_weight (C's common call, "sum" or
    "mean" from logits, has loops of its own reading them in place) give the
    reference's numbers and, in C, bitwise those of the same call with a
    pos_weight of ones (its general loops), for every target type, with and
    without the gradient; strided, broadcast and float16 weights, strided and
    broadcast masks too, alone and together (gathered or converted by the
    walk). Numba specializes on each operand alike: compiling each pos_weight
    variant too made this test 1.9x as long with an empty cache."""
    rng = np.random.default_rng(9)
    shape = (4, 4271)          # more than a block; rows longer than C's converted chunk
    n = shape[0] * shape[1]
    x = (rng.standard_normal(shape) * 4).astype(xdtype)
    if tdtype.startswith("uint"):
        top = np.iinfo(tdtype).max
        z = rng.integers(0, top, shape, endpoint=True).astype(tdtype)
        z[:, ::5] = 7
    else:
        z = rng.random(shape).astype(tdtype)
    weights = (rng.uniform(0, 2, shape).astype(xdtype),
               rng.uniform(0, 2, 2 * n).astype(xdtype)[::2].reshape(shape),
               rng.uniform(0, 2, 1).astype(xdtype), rng.uniform(0, 2, shape).astype(np.float16))
    masks = (rng.random(shape) < 0.8, (rng.random(2 * n) < 0.8)[::2].reshape(shape),
             np.array([[True], [False], [True], [True]]))      # broadcast along rows
    extras = ([dict(weight=w) for w in weights] + [dict(mask=m) for m in masks]
              + [dict(weight=weights[0], mask=masks[0]), dict(weight=weights[1], mask=masks[2]),
                 dict(weight=weights[3], mask=masks[1])])
    for operands in extras:
        for grad, reduction in ((True, "mean"), (False, "sum")):
            kw = dict(operands, ignore_value=ignore, reduction=reduction)
            common = sce(x, z, grad=grad, backend=backend, **kw)
            if backend == "c":
                general = sce(x, z, pos_weight=np.ones(1, xdtype), grad=grad, backend="c", **kw)
                assert common.loss == general.loss
                if grad:
                    np.testing.assert_array_equal(common.grad, general.grad)
            check_result(common, expected(x, z, **kw), np.dtype(xdtype), reduction)


# ---------------------------------------------------------------- outputs

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_out_and_loss_out(backend, dtype):
    x, z = random_case((4, 33), dtype, seed=7)
    plain = sce(x, z, reduction="none", backend=backend)
    out = np.full(x.shape, 7.0, dtype)
    loss_out = np.full(x.shape, 7.0, dtype)
    res = sce(x, z, reduction="none", out=out, loss_out=loss_out, backend=backend)
    assert res.grad is out and res.loss is loss_out
    np.testing.assert_array_equal(out, plain.grad)
    np.testing.assert_array_equal(loss_out, plain.loss)
    # out for a reduced loss; a strided (non-contiguous) out buffer
    big = np.full((4, 66), 7.0, dtype)
    view = big[:, ::2]
    res = sce(x, z, reduction="sum", out=view, backend=backend)
    assert res.grad is view
    np.testing.assert_array_equal(view, plain.grad)
    np.testing.assert_array_equal(big[:, 1::2], 7.0)  # the gaps are not touched


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_out_memmap(backend, dtype, tmp_path):
    x, z = random_case((1000,), dtype, seed=8)
    mm = np.memmap(tmp_path / "grad.bin", dtype=dtype, mode="w+", shape=x.shape)
    res = sce(x, z, out=mm, backend=backend)
    assert res.grad is mm
    np.testing.assert_array_equal(np.asarray(mm), sce(x, z, backend=backend).grad)
    del mm


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_in_place_gradient(backend, dtype, reduction):
    x, z = random_case((3, 7, 11), dtype, seed=9)
    w = np.linspace(0, 1, 11).astype(dtype)
    want = sce(x.copy(), z, weight=w, reduction=reduction, backend=backend)
    x_inplace = x.copy()
    res = sce(x_inplace, z, weight=w, reduction=reduction, out=x_inplace, backend=backend)
    assert res.grad is x_inplace
    np.testing.assert_array_equal(x_inplace, want.grad)
    if reduction == "none":
        np.testing.assert_array_equal(res.loss, want.loss)
    else:
        assert res.loss == want.loss


@pytest.mark.parametrize("dtype", [np.float32], ids=dtype_ids)
def test_inputs_never_modified(backend, dtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 6)).astype(dtype)
    x[0, 0] = np.inf
    z = rng.random((5, 6)).astype(dtype)
    z[1, 1] = 1.0
    w = rng.random((5, 1)).astype(dtype)
    a = rng.uniform(0.5, 2, (6,)).astype(dtype)
    m = rng.random((5, 6)) < 0.7
    t8 = rng.integers(0, 256, (5, 6)).astype(np.uint8)
    copies = [v.copy() for v in (x, z, w, a, m, t8)]
    sce(x, z, weight=w, pos_weight=a, mask=m, reduction="none", backend=backend)
    sce(x, t8, weight=w, mask=m, ignore_value=3, label_smoothing=0.2, reduction="mean",
        backend=backend)
    for v, c in zip((x, z, w, a, m, t8), copies):
        np.testing.assert_array_equal(v, c)


# ---------------------------------------------------------------- layouts

def _layouts(x, tmp_path):
    """(name, array) views equal in value to ``x`` (2-d), in odd layouts."""
    yield "F-order", np.asfortranarray(x)
    big = np.zeros((x.shape[0] * 2, x.shape[1] * 3), x.dtype)
    big[::2, 1::3] = x
    yield "sliced", big[::2, 1::3]
    rev = np.ascontiguousarray(x[::-1, ::-1])
    yield "negative-strides", rev[::-1, ::-1]
    ro = x.copy()
    ro.flags.writeable = False
    yield "read-only", ro
    mm = np.memmap(tmp_path / f"in{x.dtype}{x.shape}.bin", dtype=x.dtype, mode="w+",
                   shape=x.shape)
    mm[...] = x
    mm.flush()
    yield "memmap", np.memmap(tmp_path / f"in{x.dtype}{x.shape}.bin", dtype=x.dtype,
                              mode="r", shape=x.shape)
    yield "byte-swapped", x.astype(x.dtype.newbyteorder(">" if sys.byteorder == "little"
                                                          else "<"))
    yield "misaligned", misaligned(x)       # read from an aligned copy
    yield "packed-field", packed_field(x)   # so is this


def _assert_results_close(a, b, dtype, reduction, what):
    if reduction == "none":
        ok = ulp_close(a.loss, b.loss, dtype, 0.0, ulps=2)
        assert ok.all(), f"{what}: loss map differs"
    else:
        assert a.loss == pytest.approx(b.loss, rel=1e-12 if dtype == np.float64 else 1e-6), what
    scale = np.max(np.abs(b.grad)) * 1e-3
    ok = ulp_close(a.grad, b.grad, dtype, scale, ulps=2)
    assert ok.all(), f"{what}: grad differs at {np.argwhere(~ok)[:5].tolist()}"


# Weight and mask get fewer layouts: their strided walk is the logits' walk.
ROLE_LAYOUTS = {
    "logits": None,  # all
    "targets": None,
    "weight": ("F-order", "sliced", "negative-strides", "read-only"),
    "mask": ("sliced", "negative-strides"),
}


@pytest.mark.parametrize("reduction", ["mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_layouts_equal_contiguous(backend, dtype, reduction, tmp_path):
    shape = (67, 3 * BLOCK // 64 + 5)  # a few blocks, odd sizes
    x, z = random_case(shape, dtype, seed=11)
    rng = np.random.default_rng(12)
    w = rng.random(shape).astype(dtype)
    m = rng.random(shape) < 0.8
    want = sce(x, z, weight=w, mask=m, reduction=reduction, backend=backend)
    roles = ROLE_LAYOUTS
    for role, names in roles.items():
        base = {"logits": x, "targets": z, "weight": w, "mask": m}[role]
        for name, arr in _layouts(base, tmp_path):
            if names is not None and name not in names:
                continue
            args = {"logits": x, "targets": z, "weight": w, "mask": m, role: arr}
            before = np.array(arr, copy=True)
            got = sce(args["logits"], args["targets"], weight=args["weight"],
                      mask=args["mask"], reduction=reduction, backend=backend)
            _assert_results_close(got, want, dtype, reduction, f"{role} {name}")
            np.testing.assert_array_equal(arr, before)
            assert got.grad.shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_broadcast_to_views(backend, dtype):
    # zero-stride operands (np.broadcast_to), including the logits themselves
    rng = np.random.default_rng(13)
    row = (rng.standard_normal(BLOCK // 8 + 3) * 3).astype(dtype)
    col = rng.random((40, 1)).astype(dtype)
    x = np.broadcast_to(row, (40, row.size))
    z = np.broadcast_to(col, (40, row.size))
    got = sce(x, z, backend=backend)
    want = sce(x.copy(), z.copy(), backend=backend)
    _assert_results_close(got, want, dtype, "mean", "broadcast_to")
    assert got.grad.flags.writeable and got.grad.strides[0] != 0
    check_result(got, expected(x, z), dtype, "mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_zero_d_and_empty(backend, dtype):
    x = np.array(0.75, dtype)
    z = np.array(0.25, dtype)
    for red in ("none", "sum", "mean"):
        res = sce(x, z, reduction=red, backend=backend)
        assert res.grad.shape == () and res.grad.dtype == np.dtype(dtype)
        check_result(res, expected(x, z, reduction=red), dtype, red)
    for shape in [(0,), (3, 0, 2)]:
        e = np.empty(shape, dtype)
        res = sce(e, e, reduction="mean", backend=backend)
        assert np.isnan(res.loss) and res.grad.shape == shape
        res = sce(e, e, reduction="sum", backend=backend)
        assert res.loss == 0.0 and type(res.loss) is float
        res = sce(e, e, reduction="none", backend=backend)
        assert res.loss.shape == shape and res.grad.shape == shape


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5],
                         ids=["0", "1", "BLOCK-1", "BLOCK", "BLOCK+1", "3BLOCK+5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_sizes_around_block_edges(backend, dtype, size):
    x, z = random_case((size,), dtype, seed=size)
    for red in ("mean", "none"):
        check_result(sce(x, z, reduction=red, backend=backend), expected(x, z, reduction=red),
                     dtype, red)
    m = np.arange(size) % 3 != 0
    check_result(sce(x, z, mask=m, reduction="sum", backend=backend),
                 expected(x, z, mask=m, reduction="sum"), dtype, "sum")


# ---------------------------------------------------------------- options vs reference

def _option_case(name, dtype, seed=14):
    rng = np.random.default_rng(seed)
    shape = (3, 5, 47)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    z = rng.random(shape).astype(dtype)
    z.flat[::17] = 0.0
    z.flat[::19] = 1.0
    kw = {}
    if name == "weight+mask":
        kw = dict(weight=rng.uniform(0, 3, shape[1:]).astype(dtype),
                  mask=rng.random(shape) < 0.7)
    elif name == "pos_weight":
        kw = dict(pos_weight=rng.uniform(0, 5, (5, 1)).astype(dtype))
    elif name == "label_smoothing":
        kw = dict(label_smoothing=0.15)
    elif name == "divergence+smoothing":
        kw = dict(divergence=True, label_smoothing=0.05)
    elif name == "probabilities":
        x = rng.random(shape).astype(dtype)
        x.flat[::23] = 0.0
        x.flat[::29] = 1.0
        kw = dict(from_logits=False, pos_weight=2.0)
    elif name == "uint8+ignore_value":
        z = rng.integers(0, 256, shape).astype(np.uint8)
        kw = dict(ignore_value=255)
    elif name == "uint16+target_scale":
        z = rng.integers(0, 1001, shape).astype(np.uint16)
        kw = dict(target_scale=1000)
    elif name == "float_target_scale":
        z = (rng.random(shape) * 2).astype(dtype)
        kw = dict(target_scale=2.0)
    elif name == "float16_logits":
        x = x.astype(np.float16)
        kw = dict(weight=0.5)
    elif name == "float16_targets":
        z = z.astype(np.float16)
    return x, z, kw


OPTION_CASES = ["plain", "weight+mask", "pos_weight", "label_smoothing",
                "divergence+smoothing", "probabilities", "uint8+ignore_value",
                "uint16+target_scale", "float_target_scale", "float16_logits",
                "float16_targets"]


# The loss-map ("none") path is checked for the cases whose element code differs.
NONE_CASES = {"plain", "probabilities", "divergence+smoothing", "uint8+ignore_value",
              "float16_logits"}
REFERENCE_PARAMS = [(d, c, r) for d in DTYPES for c in OPTION_CASES for r in ("mean", "none")
                    if r == "mean" or c in NONE_CASES]


@pytest.mark.parametrize("dtype,case,reduction", REFERENCE_PARAMS,
                         ids=[f"{np.dtype(d).name}-{c}-{r}" for d, c, r in REFERENCE_PARAMS])
def test_backend_matches_reference(backend, dtype, case, reduction):
    x, z, kw = _option_case(case, dtype)
    res = sce(x, z, reduction=reduction, backend=backend, **kw)
    ref = sce(x, z, reduction=reduction, backend="numpy", **kw)
    exp = expected(x, z, reduction=reduction, **kw)
    check_result(res, exp, x.dtype, reduction)
    check_result(ref, exp, x.dtype, reduction)
    if x.dtype == np.float16:
        assert res.grad.dtype == np.float16


def test_ignore_value_equals_mask(backend):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((4, 50))
    t = rng.integers(0, 256, (4, 50)).astype(np.uint8)
    t[:, ::7] = 255
    a = sce(x, t, ignore_value=255, backend=backend)
    b = sce(x, t, mask=t != 255, backend=backend)
    assert a.loss == pytest.approx(b.loss, rel=1e-14)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(a.grad[t == 255], 0.0)


def test_mean_matches_pytorch_formula(backend):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((8, 3, 10)) * 4
    z = rng.random((8, 3, 10))
    w = rng.uniform(0, 2, (3, 1))
    a = rng.uniform(0.5, 3, (10,))
    assert sce(x, z, backend=backend).loss == pytest.approx(
        pytorch_mean_bce_with_logits(x, z), rel=1e-12)
    got = sce(x, z, weight=w, pos_weight=a, backend=backend).loss
    assert got == pytest.approx(pytorch_mean_bce_with_logits(
        x, z, weight=np.broadcast_to(w, x.shape), pos_weight=np.broadcast_to(a, x.shape)),
        rel=1e-12)


# ---------------------------------------------------------------- fast backends

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_bitwise_determinism_across_threads(fast_backend, dtype, reduction):
    n = 4 * BLOCK + 17
    x, z = random_case((n,), dtype, seed=17, scale=10)
    w = np.random.default_rng(18).random(n).astype(dtype)
    runs = []
    for threads in (1, 2, 3, 1, 3, 2):
        runs.append(sce(x, z, weight=w, reduction=reduction, backend=fast_backend,
                        num_threads=threads))
    for r in runs[1:]:
        assert r.loss == runs[0].loss  # bitwise: same blocks, same order
        np.testing.assert_array_equal(r.grad, runs[0].grad)


def _rows_of(a, rows):
    """a's values as `rows` rows of a wider array: a view whose rows the kernels
    cannot merge into one (as a dask chunk of a larger map)."""
    wide = np.zeros((rows, a.size // rows + 24), a.dtype)
    wide[:, :a.size // rows] = a.reshape(rows, -1)
    return wide[:, :a.size // rows]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_loss_independent_of_row_breaks(fast_backend, dtype, masked):
    # A block's partial is one sum of its element losses wherever its rows
    # break: the same values as one row, as 3 rows (which cross a block's end)
    # or as 33 rows of a wider array give bitwise the same loss. (They did not:
    # a dask chunk pickled to another process summed 1 ulp away from the view.)
    n = 33000
    x, z = random_case((n,), dtype, seed=21, scale=10)
    m = np.random.default_rng(22).random(n) < 0.8 if masked else None
    for reduction in ("sum", "mean"):
        losses = []
        for rows in (1, 3, 33):
            cut = (lambda a: a) if rows == 1 else (lambda a: _rows_of(a, rows))
            r = sce(cut(x), cut(z), mask=None if m is None else cut(m), reduction=reduction,
                    backend=fast_backend)
            losses.append(r.loss)
            np.testing.assert_array_equal(r.grad.ravel(), sce(x, z, mask=m, backend=fast_backend,
                                                              reduction=reduction).grad)
        assert losses[1] == losses[0] and losses[2] == losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_bitwise_determinism_10m(fast_backend, dtype):
    n = 10_000_000
    rng = np.random.default_rng(19)
    x = (rng.standard_normal(n) * 10).astype(dtype)
    z = rng.random(n).astype(dtype)
    first = sce(x, z, backend=fast_backend, num_threads=1)
    for threads in (2, 3, 2):
        r = sce(x, z, backend=fast_backend, num_threads=threads)
        assert r.loss == first.loss
        np.testing.assert_array_equal(r.grad, first.grad)
    ref = sce(x, z, backend="numpy", grad=False).loss
    assert first.loss == pytest.approx(ref, rel=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_numba_and_c_agree_elementwise(dtype):
    require_backend("numba")
    require_backend("c")
    rng = np.random.default_rng(20)
    n = 2 * BLOCK + 3
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 6, n))).astype(dtype)
    z = rng.random(n).astype(dtype)
    z[::5] = 0.0
    z[1::5] = 1.0
    x[:1201] = np.linspace(-18, 18, 1201)  # the range of the float32 log1p polynomial
    a = sce(x, z, reduction="none", backend="numba")
    b = sce(x, z, reduction="none", backend="c")
    # The twins run the same operations in the same order (fma where one has it):
    # element by element, bitwise the same.
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.grad, b.grad)
    sa = sce(x, z, reduction="sum", backend="numba").loss
    sb = sce(x, z, reduction="sum", backend="c").loss
    assert sa == pytest.approx(sb, rel=1e-6 if dtype == np.float32 else 1e-13)


# ---------------------------------------------------------------- dispatch

def _distinguishing_case():
    # float32 sums: the float64 reference and a float32 kernel differ in the
    # last bits, which shows which backend ran.
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(5000) * 7).astype(np.float32)
    z = rng.random(5000).astype(np.float32)
    return x, z


def test_use_backend_context(fast_backend):
    x, z = _distinguishing_case()
    ref = sce(x, z, backend="numpy").loss
    fast = sce(x, z, backend=fast_backend).loss
    assert ref != fast, "case does not tell the backends apart"
    with fastsce.use_backend("numpy"):
        assert sce(x, z).loss == ref
        with fastsce.use_backend(fast_backend):
            assert sce(x, z).loss == fast
            assert sce(x, z, backend="numpy").loss == ref  # backend= beats the context
        assert sce(x, z).loss == ref  # restored on exit
    with fastsce.use_backend(fast_backend):
        assert sce(x, z).loss == fast


def test_use_backend_restores_after_error():
    with pytest.raises(KeyError):
        with fastsce.use_backend("numpy"):
            raise KeyError("boom")
    with pytest.raises(ValueError, match="backend"):
        with fastsce.use_backend("no-such-backend"):
            pass


def _run_python(code, env_extra=None, remove=()):
    env = {k: v for k, v in os.environ.items() if k not in remove}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_fastsce_backend_env_var():
    x, z = _distinguishing_case()
    ref = sce(x, z, backend="numpy").loss
    code = """
        import numpy as np, fastsce
        rng = np.random.default_rng(21)
        x = (rng.standard_normal(5000) * 7).astype(np.float32)
        z = rng.random(5000).astype(np.float32)
        print(repr(fastsce.sigmoid_cross_entropy(x, z).loss))
        print(fastsce.info()["default_backend"])
    """
    proc = _run_python(code, {"FASTSCE_BACKEND": "numpy"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert float(lines[0]) == ref
    assert lines[1] == "numpy"
    bad = _run_python(code, {"FASTSCE_BACKEND": "bogus"})
    assert bad.returncode == 0, bad.stderr  # malformed: warn and fall back
    assert "FASTSCE_BACKEND" in bad.stderr


def test_info_contents():
    info = fastsce.info()
    assert set(info["backends"]) >= {"numba", "c", "numpy"}
    for name, rec in info["backends"].items():
        assert isinstance(rec["available"], bool)
        if rec["available"]:
            assert rec["reason"] is None
        else:
            assert isinstance(rec["reason"], str) and rec["reason"]
    assert info["backends"]["numpy"]["available"] is True
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    if not os.environ.get("FASTSCE_NUM_THREADS") and hasattr(os, "sched_getaffinity"):
        assert info["num_threads"] == len(os.sched_getaffinity(0))
    layer = info["numba_threading_layer"]
    assert layer is None or isinstance(layer, str)
    if info["backends"]["numba"]["available"]:
        sce(np.zeros(3), np.zeros(3), backend="numba")
        assert isinstance(fastsce.info()["numba_threading_layer"], str)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_default_threads_follow_affinity():
    code = """
        import os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        import fastsce
        print(fastsce.info()["num_threads"])
    """
    proc = _run_python(code, remove=("FASTSCE_NUM_THREADS",))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_works_without_numba():
    # SPEC §4: a broken or missing Numba leaves import fastsce working, "auto"
    # on C (or the reference), and info() saying why.
    code = """
        import sys
        sys.modules["numba"] = None  # import numba now raises ImportError
        import numpy as np, fastsce
        info = fastsce.info()
        rec = info["backends"]["numba"]
        assert rec["available"] is False, rec
        assert rec["reason"] and "numba" in rec["reason"].lower(), rec
        x = np.linspace(-3, 3, 7); z = np.linspace(0, 1, 7)
        auto = fastsce.sigmoid_cross_entropy(x, z, backend="auto")
        ref = fastsce.sigmoid_cross_entropy(x, z, backend="numpy")
        assert abs(auto.loss - ref.loss) <= 1e-13 * abs(ref.loss), (auto.loss, ref.loss)
        try:
            fastsce.sigmoid_cross_entropy(x, z, backend="numba")
        except fastsce.BackendUnavailableError as exc:
            assert isinstance(exc, RuntimeError)
            assert "numba" in str(exc).lower()
        else:
            raise AssertionError("backend='numba' did not raise")
        print(",".join(sorted(set(info["auto_resolves_to"].values()))))
    """
    proc = _run_python(code, remove=("FASTSCE_BACKEND",))
    assert proc.returncode == 0, proc.stderr
    if fastsce.info()["backends"]["c"]["available"]:
        assert proc.stdout.strip() == "c"


def test_misaligned_operands_are_read_aligned(monkeypatch, fast_backend):
    """Misaligned inputs reach the loops (typed loads) only as aligned copies."""
    x, z = random_case((5, 7), np.float32, seed=3)
    w = np.linspace(0.5, 2.0, 7, dtype=np.float32)
    pw = np.full((5, 1), 1.5, np.float32)
    check_misaligned_read_aligned(monkeypatch, fast_backend, sce, x, z, weight=w, pos_weight=pw)
