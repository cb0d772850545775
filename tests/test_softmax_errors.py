"""Every bad multiclass argument raises the documented exception, naming the
argument (and both shapes for a shape mismatch), before anything is written
(SPEC §2, §4); a bad target, found inside the fused pass, leaves a separate
`out`/`loss_out` all NaN.  Every backend raises as the reference does."""
import re

import numpy as np
import pytest

import fastsce

SENTINEL = 12345.0
SHAPE = (2, 3, 4, 5)      # N, C, H, W
PIXELS = (2, 4, 5)


def smx(*args, **kwargs):
    return fastsce.softmax_cross_entropy(*args, **kwargs)


def case(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(SHAPE) * 3).astype(dtype)
    z = rng.random(SHAPE)
    return x, (z / z.sum(1, keepdims=True)).astype(dtype)


def raises_untouched(backend, exc_types, match, x, z, **kw):
    """Call with a sentinel-filled ``out``; check the error type and message and
    that neither ``out`` nor an input changed (argument errors: SPEC §2 says
    they are raised before anything is written)."""
    out = np.full(x.shape, SENTINEL, x.dtype)
    xc, zc = x.copy(), np.array(z, copy=True)
    with pytest.raises(exc_types, match=match) as info:
        smx(x, z, out=out, backend=backend, **kw)
    assert isinstance(info.value, fastsce.FastSCEError), type(info.value)
    np.testing.assert_array_equal(out, SENTINEL)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(z, zc)
    return info.value


BAD_OPTIONS = [
    ("axis-too-large", ValueError, r"axis", dict(axis=4)),
    ("axis-too-negative", ValueError, r"axis", dict(axis=-5)),
    ("axis-float", (ValueError, TypeError), r"axis", dict(axis=1.0)),
    ("axis-bool", (ValueError, TypeError), r"axis", dict(axis=True)),
    ("axis-none", (ValueError, TypeError), r"axis", dict(axis=None)),
    ("class_weights-too-long", ValueError, r"class_weights", dict(class_weights=np.ones(4))),
    ("class_weights-too-short", ValueError, r"class_weights", dict(class_weights=np.ones(2))),
    ("class_weights-2d", ValueError, r"class_weights", dict(class_weights=np.ones((1, 3)))),
    ("class_weights-scalar", ValueError, r"class_weights", dict(class_weights=2.0)),
    ("class_weights-negative", ValueError, r"class_weights",
     dict(class_weights=np.array([1.0, -0.5, 2.0]))),
    ("class_weights-nan", ValueError, r"class_weights",
     dict(class_weights=np.array([1.0, np.nan, 2.0]))),
    ("weight-negative", ValueError, r"weight", dict(weight=-1.0)),
    ("weight-shape", ValueError, r"weight", dict(weight=np.ones((3, 4, 5)))),
    ("weight-full-logits-shape", ValueError, r"weight", dict(weight=np.ones(SHAPE))),
    ("mask-shape", ValueError, r"mask", dict(mask=np.ones(SHAPE, bool))),
    ("mask-float", TypeError, r"mask", dict(mask=np.ones(PIXELS))),
    ("label_smoothing-negative", ValueError, r"label_smoothing", dict(label_smoothing=-0.1)),
    ("label_smoothing-above-1", ValueError, r"label_smoothing", dict(label_smoothing=1.1)),
    ("ignore_value-soft-targets", ValueError, r"ignore_value", dict(ignore_value=0)),
    ("reduction-unknown", ValueError, r"reduction", dict(reduction="batchmean")),
    ("loss_out-with-mean", ValueError, r"loss_out",
     dict(loss_out=np.full(PIXELS, SENTINEL))),
    ("loss_out-with-sum", ValueError, r"loss_out",
     dict(loss_out=np.full(PIXELS, SENTINEL), reduction="sum")),
    ("num_threads-0", ValueError, r"num_threads", dict(num_threads=0)),
]


@pytest.mark.parametrize("exc,match,kw", [c[1:] for c in BAD_OPTIONS],
                         ids=[c[0] for c in BAD_OPTIONS])
def test_bad_options(backend, exc, match, kw):
    x, z = case()
    kw = dict(kw)
    loss_out = kw.get("loss_out")
    raises_untouched(backend, exc, match, x, z, **kw)
    if loss_out is not None:
        np.testing.assert_array_equal(loss_out, SENTINEL)


def test_bad_axis_message(backend):
    x, z = case()
    err = raises_untouched(backend, ValueError, "axis", x, z, axis=7)
    assert "7" in str(err) and str(SHAPE) in str(err), str(err)


def test_class_weights_message_names_classes(backend):
    x, z = case()
    err = raises_untouched(backend, ValueError, "class_weights", x, z,
                           class_weights=np.ones(5))
    assert "(3,)" in str(err) and "(5,)" in str(err), str(err)
    # the class axis decides C: with axis=-1 C is 5 and five weights are right
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    zl = np.ascontiguousarray(np.moveaxis(z, 1, -1))
    err = raises_untouched(backend, ValueError, "class_weights", xl, zl, axis=-1,
                           class_weights=np.ones(5))
    assert "(3,)" in str(err), str(err)
    smx(np.ascontiguousarray(x[:, :, :, :3]), np.ascontiguousarray(z[:, :, :, :3]), axis=-1,
        class_weights=np.ones(3), reduction="none", backend=backend)


def test_soft_targets_shape_mismatch_names_both_shapes(backend):
    x, _ = case()
    for zshape in [(2, 4, 4, 5), (3, 3, 4, 5), (2, 3, 4, 5, 1)]:
        z = np.full(zshape, 1 / 3)
        err = raises_untouched(backend, ValueError, "targets", x, z)
        assert str(zshape) in str(err) and str(SHAPE) in str(err), str(err)


@pytest.mark.parametrize("lshape", [(2, 4, 6), (3, 4, 5), (2, 5, 4)])
def test_label_shape_mismatch_names_both_shapes(backend, lshape):
    x, _ = case()
    labels = np.zeros(lshape, np.int64)
    err = raises_untouched(backend, (ValueError, TypeError), "targets", x, labels)
    msg = str(err)
    assert str(lshape) in msg and (str(PIXELS) in msg or str(SHAPE) in msg), msg


@pytest.mark.parametrize("lshape", [(2, 4), (2, 3, 4, 5, 1), (4, 5, 2)])
def test_int_targets_of_wrong_rank(backend, lshape):
    x, _ = case()
    labels = np.zeros(lshape, np.int64)
    err = raises_untouched(backend, (ValueError, TypeError), "targets", x, labels)
    assert str(lshape) in str(err), str(err)


def test_int_targets_of_logits_shape_that_are_not_codes(backend):
    # int64 of the full logits shape: neither class indices nor uint8/uint16 codes
    x, _ = case()
    err = raises_untouched(backend, (ValueError, TypeError), "targets", x,
                           np.zeros(SHAPE, np.int64))
    assert "int64" in str(err) or str(PIXELS) in str(err), str(err)


@pytest.mark.parametrize("tdtype", [np.float64, np.float32, np.uint8])
def test_ignore_value_with_soft_targets(backend, tdtype):
    x, z = case()
    t = (z * 255).astype(tdtype) if tdtype == np.uint8 else z.astype(tdtype)
    raises_untouched(backend, ValueError, "ignore_value", x, t, ignore_value=255)


@pytest.mark.parametrize("dtype", [np.int32, np.complex128, np.bool_, object],
                         ids=["int32", "complex128", "bool", "object"])
def test_unsupported_logits_dtype(backend, dtype):
    x = np.zeros(SHAPE, dtype=dtype)
    labels = np.zeros(PIXELS, np.int64)
    out = np.full(SHAPE, SENTINEL)
    with pytest.raises(TypeError, match=re.escape(np.dtype(dtype).name)) as info:
        smx(x, labels, out=out, backend=backend)
    assert "logits" in str(info.value)
    np.testing.assert_array_equal(out, SENTINEL)


def test_zero_d_logits(backend):
    with pytest.raises(ValueError, match="logits"):
        smx(np.array(1.0), np.array(1.0), backend=backend)


# ---------------------------------------------------------------- labels out of range


def test_labels_out_of_range_name_count_and_first_pixel(backend):
    x, _ = case()
    labels = np.random.default_rng(1).integers(0, 3, PIXELS)
    labels[0, 2, 1] = 3      # first bad pixel in C order
    labels[1, 0, 4] = -1
    labels[1, 3, 3] = 99
    with pytest.raises(ValueError, match="targets") as info:
        smx(x, labels, reduction="none", backend=backend)
    err, msg = info.value, str(info.value)
    assert isinstance(err, fastsce.TargetRangeError)
    assert re.search(r"\b3\b", msg) and re.search(r"\[0, 2\]|0\.\.2|0 and 2", msg), msg
    flat = np.ravel_multi_index((0, 2, 1), PIXELS)
    assert "(0, 2, 1)" in msg or re.search(rf"\b{flat}\b", msg), msg


def test_label_errors_exclude_masked_and_ignored(backend):
    x, _ = case()
    labels = np.zeros(PIXELS, np.int64)
    labels[1, 1, 1] = 3
    mask = np.ones(PIXELS, bool)
    mask[1, 1, 1] = False
    neutral = dict(class_weights=np.ones(3), weight=np.ones(PIXELS))
    smx(x, labels, mask=mask, reduction="none", backend=backend, **neutral)  # masked: fine
    smx(x, labels, ignore_value=3, reduction="none", backend=backend)  # ignored: fine
    res = smx(x, labels, check=False, reduction="none", backend=backend)  # no check
    assert res.grad.shape == SHAPE
    with pytest.raises(ValueError, match="targets"):
        smx(x, labels, ignore_value=-100, reduction="none", backend=backend)
    uint = labels.astype(np.uint8)
    uint[0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"(?s)targets.*\b2\b"):
        smx(x, uint, reduction="none", backend=backend)
    uint[1, 1, 1] = 255
    smx(x, uint, ignore_value=255, reduction="none", backend=backend)  # all bad ones ignored


# ---------------------------------------------------------------- soft targets out of range


def test_soft_targets_out_of_range_name_count_and_first_pixel(backend):
    x, z = case()
    # all bad elements in class 1, so the first bad pixel is the same whether
    # pixels or elements are scanned in C order
    z[0, 1, 2, 3] = 1.5
    z[1, 1, 0, 0] = -0.25
    z[1, 1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="targets") as info:
        smx(x, z, backend=backend)
    err, msg = info.value, str(info.value)
    assert isinstance(err, fastsce.TargetRangeError)
    assert re.search(r"\b3\b", msg), msg
    flat = np.ravel_multi_index((0, 2, 3), PIXELS)
    assert "(0, 2, 3)" in msg or re.search(rf"\b{flat}\b", msg), msg


def _first_pixel(msg):
    found = re.findall(r"\((\d+, \d+, \d+)\)", msg)
    return found[-1] if found else msg


def _layouts_and_paths(x, z, hidden):
    """(name, args, options) of one NCHW call in every layout and path that
    finds bad targets: NCHW and NHWC data, the fused pass (with and without a
    mask), the pre-pass of a masked mean gradient and of an in-place call.
    The mask hides pixel `hidden`; names of masked calls hold "mask"."""
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    zl = np.ascontiguousarray(np.moveaxis(z, 1, -1))
    mask = np.ones(PIXELS, bool)
    mask[hidden] = False
    xc = x.copy()
    return (("NCHW", (x, z), {}), ("NHWC", (xl, zl), {"axis": -1}),
            ("NCHW+mask", (x, z), {"mask": mask}),
            ("NHWC+mask", (xl, zl), {"axis": -1, "mask": mask}),
            ("NCHW+mask grad=False", (x, z), {"mask": mask, "grad": False}),
            ("NCHW grad=False", (x, z), {"grad": False}),
            ("in place", (xc, z), {"out": xc}))


def test_first_bad_pixel_does_not_depend_on_layout_or_path(backend):
    # pixel (0, 1, 4) holds a bad element in class 2 and pixel (0, 2, 0) one in
    # class 0: in NCHW element order the latter comes first, in pixel order
    # the former.  The report must name the same pixel for NCHW and NHWC
    # data, and with or without the pre-pass a masked "mean" gradient needs.
    x, z = case()
    z[0, 2, 1, 4] = 2.0
    z[0, 0, 2, 0] = -1.0
    msgs = {}
    for name, args, kw in _layouts_and_paths(x, z, hidden=(1, 0, 0)):
        with pytest.raises(ValueError, match="targets") as info:
            smx(*args, backend=backend, **kw)
        msgs[name] = _first_pixel(str(info.value))
    assert len(set(msgs.values())) == 1, msgs
    assert msgs["NHWC"] == "0, 1, 4", msgs


@pytest.mark.parametrize("targets", ["float64", "float32", "uint8"])
def test_bad_targets_are_counted_as_elements_on_every_path(backend, targets):
    # pixel (1, 3, 4) holds two bad classes, pixels (0, 0, 1) and (0, 0, 0)
    # one each, (0, 0, 0) masked where there is a mask: the fused pass, the
    # pre-pass of an in-place call or of a masked mean gradient, any layout
    # give the reference's message (values, not pixels, are counted).
    x, z = case(np.float32 if targets != "float64" else np.float64)
    kw0 = {}
    bad = {(1, 0, 3, 4): 1.5, (1, 2, 3, 4): np.nan, (0, 1, 0, 1): -0.5, (0, 2, 0, 0): 2.0}
    if targets == "uint8":
        z = np.round(z * 100).astype(np.uint8)
        bad = {k: 101 + i for i, k in enumerate(bad)}
        kw0 = {"target_scale": 100}
    for at, value in bad.items():
        z[at] = value
    messages = {}
    for name, args, kw in _layouts_and_paths(x, z, hidden=(0, 0, 0)):
        got = []
        for b in ("numpy", backend):
            with pytest.raises(fastsce.TargetRangeError) as info:
                smx(*args, backend=b, **kw0, **kw)
            got.append(str(info.value).split(". Fix")[0])
        assert got[1] == got[0], name
        messages[name] = got[0]
    for name, msg in messages.items():
        found, first = (3, "(0, 0, 1)") if "mask" in name else (4, "(0, 0, 0)")
        assert f"found {found} value(s)" in msg and first in msg, (name, msg)


def test_soft_target_range_is_exact(backend):
    """[0, scale] is compared in the targets' precision, not after rounding to
    the logits' type; -0 (the fast kernels' false alarm: its sign bit) is in
    range and gives the numbers +0 gives."""
    x, z = case()
    x = x.astype(np.float32)
    z[1, 2, 3, 4] = 1.0 + 2.0 ** -40    # float64 target, float32 logits: 1.0f
    with pytest.raises(ValueError, match=r"found 1 value.*\(1, 3, 4\)"):
        smx(x, z, backend=backend)
    z = np.zeros(SHAPE)
    z[:, 0] = 1.0
    zn = z.copy()
    zn[:, 1:] = -0.0
    got = smx(x, zn, reduction="none", backend=backend)
    ref = smx(x, z, reduction="none", backend=backend)
    np.testing.assert_array_equal(got.loss, ref.loss)
    np.testing.assert_array_equal(got.grad, ref.grad)


def test_soft_target_errors_exclude_masked_pixels(backend):
    x, z = case()
    z[1, 2, 3, 4] = 1.25
    mask = np.ones(PIXELS, bool)
    mask[1, 3, 4] = False
    smx(x, z, weight=np.ones(PIXELS), mask=mask, backend=backend)
    smx(x, z, check=False, backend=backend)
    t = np.full(SHAPE, 30, np.uint8)
    t[0, 0, 0, 0] = 150
    with pytest.raises(ValueError, match="targets"):
        smx(x, t, target_scale=100, reduction="none", backend=backend)
    smx(x, t, target_scale=150, reduction="none", backend=backend)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("bad", ["pixel-shape", "transposed", "float32", "int64", "read-only",
                                 "list"])
def test_bad_out(backend, bad):
    x, z = case()
    if bad == "pixel-shape":
        out, exc = np.full(PIXELS, SENTINEL), ValueError
    elif bad == "transposed":
        out, exc = np.full((2, 4, 5, 3), SENTINEL), ValueError
    elif bad == "float32":
        out, exc = np.full(SHAPE, SENTINEL, np.float32), TypeError
    elif bad == "int64":
        out, exc = np.full(SHAPE, 7, np.int64), TypeError
    elif bad == "read-only":
        out, exc = np.full(SHAPE, SENTINEL), ValueError
        out.flags.writeable = False
    else:
        out, exc = np.full(SHAPE, SENTINEL).tolist(), TypeError
    before = np.array(out, copy=True)
    with pytest.raises(exc, match="out") as info:
        smx(x, z, out=out, backend=backend)
    assert isinstance(info.value, fastsce.FastSCEError)
    np.testing.assert_array_equal(np.asarray(out), before)
    if bad in ("pixel-shape", "transposed"):
        assert str(SHAPE) in str(info.value) and str(np.shape(out)) in str(info.value)


@pytest.mark.parametrize("bad", ["logits-shape", "float32", "read-only"])
def test_bad_loss_out(backend, bad):
    x, z = case()
    if bad == "logits-shape":
        loss_out, exc = np.full(SHAPE, SENTINEL), ValueError
    elif bad == "float32":
        loss_out, exc = np.full(PIXELS, SENTINEL, np.float32), TypeError
    else:
        loss_out, exc = np.full(PIXELS, SENTINEL), ValueError
        loss_out.flags.writeable = False
    out = np.full(SHAPE, SENTINEL)
    with pytest.raises(exc, match="loss_out"):
        smx(x, z, reduction="none", out=out, loss_out=loss_out, backend=backend)
    np.testing.assert_array_equal(loss_out, SENTINEL)
    np.testing.assert_array_equal(out, SENTINEL)


def test_out_with_grad_false(backend):
    x, z = case()
    raises_untouched(backend, ValueError, "out", x, z, grad=False)


@pytest.mark.parametrize("overlap", ["targets", "logits-reversed", "loss_out-in-out"])
def test_out_overlapping_an_input(backend, overlap):
    x, z = case()
    kw = {}
    if overlap == "targets":
        out = z
    elif overlap == "logits-reversed":
        out = x[:, ::-1]
    else:
        out = np.full(SHAPE, SENTINEL)
        kw = dict(reduction="none", loss_out=out[:, 0])
    xc, zc = x.copy(), z.copy()
    with pytest.raises(ValueError, match="out"):
        smx(x, z, out=out, backend=backend, **kw)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(z, zc)


# ---------------------------------------------------------------- no data lost


@pytest.mark.parametrize("what", ["soft", "labels"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_in_place_target_error_leaves_logits(backend, what, reduction):
    x, z = case()
    if what == "soft":
        z[1, 2, 3, 1] = 1.01
        t = z
    else:
        t = np.zeros(PIXELS, np.int64)
        t[1, 3, 1] = 3
    x_before = x.copy()
    with pytest.raises(ValueError, match="targets"):
        smx(x, t, out=x, reduction=reduction, backend=backend)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_error_fills_a_separate_out_with_nan(backend, reduction):
    # The targets are checked inside the fused pass (SPEC §2); a caller's
    # `out` / `loss_out` that it wrote comes back all NaN, and the message says so.
    x, z = case()
    z[1, 2, 3, 1] = 1.01
    out = np.full(SHAPE, SENTINEL)
    loss_out = np.full(PIXELS, SENTINEL) if reduction == "none" else None
    with pytest.raises(ValueError, match="targets") as info:
        smx(x, z, out=out, loss_out=loss_out, reduction=reduction, backend=backend)
    assert "filled with NaN" in str(info.value)
    assert np.isnan(out).all()
    if loss_out is not None:
        assert np.isnan(loss_out).all()


def test_errors_are_the_same_on_every_backend(backend):
    x, z = case()
    z[0, 0, 0, 0] = 3.0
    labels = np.zeros(PIXELS, np.int64)
    labels[0, 0, 0] = 7
    for args, kw in (((x, z), {}), ((x, labels), {"reduction": "none"}),
                     ((x, z), {"class_weights": -np.ones(3)}), ((x, z), {"axis": 9})):
        with pytest.raises(Exception) as ref:
            smx(*args, backend="numpy", **kw)
        with pytest.raises(Exception) as got:
            smx(*args, backend=backend, **kw)
        assert type(got.value) is type(ref.value)
        assert str(got.value) == str(ref.value)
