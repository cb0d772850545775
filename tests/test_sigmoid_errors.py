"""Bad arguments beyond tests/bad_inputs.py's table (which has one row per
kind of bad input): messages naming both shapes, every unsupported dtype,
each way `out` can overlap an input, target errors' count and first index,
exclusions, in-place calls, unavailable backends (SPEC §2, §4)."""
import re

import numpy as np
import pytest

import fastsce

SENTINEL = 12345.0


def sce(*args, **kwargs):
    return fastsce.sigmoid_cross_entropy(*args, **kwargs)


def case(shape=(4, 9), dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(dtype), rng.random(shape).astype(dtype)


def sentinel_out(shape=(4, 9), dtype=np.float64):
    return np.full(shape, SENTINEL, dtype)


def raises_untouched(backend, exc_types, match, x, z, **kw):
    """Call with a sentinel-filled ``out``; check the error and that out is intact."""
    out = sentinel_out(x.shape, x.dtype)
    with pytest.raises(exc_types, match=match) as info:
        sce(x, z, out=out, backend=backend, **kw)
    assert isinstance(info.value, fastsce.FastSCEError)
    np.testing.assert_array_equal(out, SENTINEL)
    return info.value


def test_shape_mismatch_names_both_shapes(backend):
    x, _ = case((2, 3, 4))
    z = np.full((2, 5, 4), 0.5)
    err = raises_untouched(backend, ValueError, "targets", x, z)
    assert "(2, 5, 4)" in str(err) and "(2, 3, 4)" in str(err), str(err)
    # targets may broadcast to logits, never the other way round
    z2 = np.full((3, 2, 3, 4), 0.5)
    err = raises_untouched(backend, ValueError, "targets", x, z2)
    assert "(3, 2, 3, 4)" in str(err) and "(2, 3, 4)" in str(err), str(err)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex128, np.bool_, object],
                         ids=["int32", "int64", "complex128", "bool", "object"])
def test_unsupported_logits_dtype(backend, dtype):
    x = np.zeros((4, 9), dtype=dtype)
    z = np.full((4, 9), 0.5)
    out = sentinel_out()
    with pytest.raises(TypeError, match=re.escape(np.dtype(dtype).name)) as info:
        sce(x, z, out=out, backend=backend)
    assert "logits" in str(info.value)
    assert isinstance(info.value, fastsce.FastSCEError)
    np.testing.assert_array_equal(out, SENTINEL)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint32, np.complex64],
                         ids=["int32", "int8", "uint32", "complex64"])
def test_unsupported_targets_dtype(backend, dtype):
    x, _ = case()
    z = np.zeros((4, 9), dtype=dtype)
    err = raises_untouched(backend, TypeError, re.escape(np.dtype(dtype).name), x, z)
    assert "targets" in str(err)


@pytest.mark.parametrize("overlap", ["targets", "weight", "logits-reversed",
                                     "logits-partial", "out-is-loss_out"])
def test_out_overlapping_an_input(backend, overlap):
    x, z = case()
    w = np.ones((4, 9))
    kw = {}
    if overlap == "targets":
        out = z
    elif overlap == "weight":
        out = w
        kw["weight"] = w
    elif overlap == "logits-reversed":
        out = x[::-1]
    elif overlap == "logits-partial":
        big = np.concatenate([x.ravel(), x.ravel()])
        x = big[:36].reshape(4, 9)
        out = big[9:45].reshape(4, 9)
    else:
        out = np.full((4, 9), SENTINEL)
        kw["loss_out"] = out
        kw["reduction"] = "none"
    xs, zs, ws = x.copy(), z.copy(), w.copy()
    with pytest.raises(ValueError, match="out"):
        sce(x, z, out=out, backend=backend, **kw)
    np.testing.assert_array_equal(x, xs)
    np.testing.assert_array_equal(z, zs)
    np.testing.assert_array_equal(w, ws)


def test_target_out_of_range_names_count_and_first_index(backend):
    x, z = case()
    bad = [(1, 4), (2, 0), (3, 8)]
    z[1, 4] = 1.5
    z[2, 0] = -0.25
    z[3, 8] = np.nan
    with pytest.raises(ValueError, match="targets") as info:
        sce(x, z, backend=backend)
    msg = str(info.value)
    assert isinstance(info.value, fastsce.FastSCEError)
    assert re.search(r"\b3\b", msg), msg
    flat = np.ravel_multi_index(bad[0], x.shape)
    assert re.search(r"\(1, 4\)", msg) or re.search(rf"\b{flat}\b", msg), msg


@pytest.mark.parametrize("zdtype", [np.float32, np.float64])
def test_target_range_counts_exactly_in_long_rows(backend, zdtype):
    """The fast kernels flag a row by its largest target key and count in a
    rare path: the count and first index stay exact, masked ones excluded."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5000)).astype(np.float32)
    z = rng.random(x.shape).astype(zdtype)
    flat = np.sort(rng.choice(z.size, 100, replace=False))
    z.flat[flat] = rng.choice([1.5, -0.5, np.nan, np.inf, -np.inf], flat.size)
    mask = np.ones(x.shape, bool)
    mask.flat[flat[:7]] = False
    with pytest.raises(ValueError, match=rf"found 93 value.*at index \({flat[7] // 5000}, "
                                          rf"{flat[7] % 5000}\)"):
        sce(x, z, mask=mask, grad=True, backend=backend)


@pytest.mark.parametrize("zdtype", [np.float32, np.float64])
def test_negative_zero_targets_are_in_range(backend, zdtype):
    """-0 has the sign bit (the fast kernels' false alarm): never an error, and
    the same numbers as +0."""
    x, _ = case((3, 700), np.float32)
    z = np.full(x.shape, -0.0, zdtype)
    got = sce(x, z, reduction="none", grad=True, backend=backend)
    ref = sce(x, np.abs(z), reduction="none", grad=True, backend=backend)
    np.testing.assert_array_equal(got.loss, ref.loss)
    np.testing.assert_array_equal(got.grad, ref.grad)


def test_target_range_is_checked_in_the_targets_precision(backend):
    """[0, scale] is compared exactly, not after rounding to the logits' type."""
    x, _ = case((2, 300), np.float32)
    z = np.full(x.shape, 1.0)
    z[1, 17] = 1.0 + 2.0 ** -40         # float64 target, float32 logits: 1.0f
    with pytest.raises(ValueError, match=r"found 1 value.*\(1, 17\)"):
        sce(x, z, backend=backend)
    z32 = np.full(x.shape, np.float32(0.1), np.float32)   # 0.1f > 0.1
    with pytest.raises(ValueError, match=r"found 600 value.*\(0, 0\)"):
        sce(x, z32, target_scale=0.1, backend=backend)
    sce(x, z32, target_scale=float(np.float32(0.1)), backend=backend)


def test_target_range_edges(backend):
    """The key order's edges: a NaN with its sign bit, +inf under a scale
    above float32's largest value, codes under a scale below 1."""
    x, _ = case((2, 40), np.float32)
    z = np.full(x.shape, 0.5, np.float32)
    z[1, 3] = -np.float32("nan")
    z[1, 9] = np.nan
    with pytest.raises(ValueError, match=r"found 2 value.*\(1, 3\)"):
        sce(x, z, backend=backend)
    big = np.full(x.shape, np.finfo(np.float32).max, np.float32)
    sce(x, big, target_scale=1e39, check=True, backend=backend)
    big[0, 5] = np.inf
    with pytest.raises(ValueError, match=r"found 1 value.*\(0, 5\)"):
        sce(x, big, target_scale=1e39, backend=backend)
    codes = np.zeros(x.shape, np.uint8)
    sce(x, codes, target_scale=0.5, backend=backend)
    codes[1, 39] = 1
    with pytest.raises(ValueError, match=r"found 1 value.*\(1, 39\)"):
        sce(x, codes, target_scale=0.5, backend=backend)


def test_target_errors_are_element_wise_exclusions(backend):
    x, z = case()
    z[0, 0] = 2.0
    mask = np.ones(x.shape, bool)
    mask[0, 0] = False
    sce(x, z, mask=mask, backend=backend)  # a masked-out bad target is not an error
    res = sce(x, z, check=False, backend=backend)  # check=False: no error
    assert res.grad.shape == x.shape
    # integer codes: with target_scale 100, code 150 is 1.5
    t = np.full(x.shape, 50, np.uint8)
    t[2, 3] = 150
    with pytest.raises(ValueError, match=r"(?s)targets.*\b1\b"):
        sce(x, t, target_scale=100, backend=backend)
    sce(x, t, target_scale=100, ignore_value=150, backend=backend)  # ignored code: fine


def test_in_place_target_error_leaves_logits(backend):
    x, z = case()
    z[2, 5] = 1.01
    x_before = x.copy()
    with pytest.raises(ValueError, match="targets"):
        sce(x, z, out=x, backend=backend)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("out_dtype", [np.float64, np.float16])
def test_target_error_fills_a_separate_out_with_nan(backend, reduction, out_dtype):
    # Checked inside the fused pass (SPEC §2): a separate buffer the pass wrote
    # comes back all NaN, and the message says so; one the kernel did not write
    # (float16 results are computed in a float32 buffer of ours) is untouched.
    x, z = case()
    x = x.astype(out_dtype)
    z[2, 5] = 1.01
    out = sentinel_out(x.shape, out_dtype)
    loss_out = sentinel_out(x.shape, out_dtype) if reduction == "none" else None
    with pytest.raises(ValueError, match="targets") as info:
        sce(x, z, out=out, loss_out=loss_out, reduction=reduction, backend=backend)
    msg = str(info.value)
    if out_dtype == np.float64:
        assert np.isnan(out).all()
        assert ("`out` and `loss_out` held partial results and were filled with NaN"
                if loss_out is not None else "`out` held partial results and was") in msg, msg
        if loss_out is not None:
            assert np.isnan(loss_out).all()
    else:
        np.testing.assert_array_equal(out, sentinel_out(x.shape, out_dtype))
        if loss_out is not None:
            np.testing.assert_array_equal(loss_out, sentinel_out(x.shape, out_dtype))
        assert "filled with NaN" not in msg, msg


@pytest.mark.parametrize("how", ["loss_out-only", "in-place+loss_out", "masked-mean"])
def test_target_error_buffers_by_call(backend, how):
    # loss_out alone is filled; an in-place call and a masked "mean" gradient
    # find the bad target in their read-only pass, before anything is written.
    x, z = case()
    z[1, 3] = -0.5
    loss_out = sentinel_out()
    kw = {"loss_out-only": dict(grad=False, reduction="none", loss_out=loss_out),
          "in-place+loss_out": dict(out=x, reduction="none", loss_out=loss_out),
          "masked-mean": dict(out=loss_out, mask=np.ones(x.shape, bool))}[how]
    x_before = x.copy()
    with pytest.raises(fastsce.TargetRangeError, match=r"first at index \(1, 3\)") as info:
        sce(x, z, backend=backend, **kw)
    np.testing.assert_array_equal(x, x_before)
    if how == "loss_out-only":
        assert "`loss_out` held partial results and was filled with NaN" in str(info.value)
        assert np.isnan(loss_out).all()
    else:
        assert "filled with NaN" not in str(info.value)
        np.testing.assert_array_equal(loss_out, SENTINEL)


def test_unavailable_backend_raises_with_reason():
    info = fastsce.info()["backends"]
    missing = [n for n, rec in info.items() if not rec["available"]]
    if missing:
        name = missing[0]
        with pytest.raises(fastsce.BackendUnavailableError) as exc:
            sce(np.zeros(2), np.zeros(2), backend=name)
        assert isinstance(exc.value, RuntimeError)
        assert info[name]["reason"] in str(exc.value)
    # The subprocess form (numba blocked) is in test_sigmoid_api.test_works_without_numba.
    assert issubclass(fastsce.BackendUnavailableError, RuntimeError)
    assert issubclass(fastsce.BackendUnavailableError, fastsce.FastSCEError)


def test_exception_hierarchy():
    assert issubclass(fastsce.FastSCEError, Exception)
    with pytest.raises(fastsce.FastSCEError):
        sce(np.zeros(2), np.zeros(3))
    with pytest.raises(fastsce.FastSCEError):
        sce(np.zeros(2, np.int32), np.zeros(2))
