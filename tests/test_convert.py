"""Float16 and byte-swapped operands: converted block by block, never copied whole.

Every result must equal, bit for bit, that of a native copy (float16 read as
float32): the conversions are exact, so there is no tolerance to hide behind.
Peak memory is measured as in test_memory.py (VmHWM in a fresh process).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from procmem import PRELUDE

import fastsce

SHAPE = (2, 3, 67, 97)            # 39k elements: more than two blocks


def swapped(a):
    return a.astype(a.dtype.newbyteorder("S"))


def native(a):
    """The copy fastsce used to make: native order, float16 as float32."""
    if a is None:
        return None
    dtype = a.dtype.newbyteorder("=")
    return np.ascontiguousarray(a, dtype=np.float32 if dtype == np.float16 else dtype)


def assert_same(got, want, what):
    loss = np.asarray(got.loss)
    np.testing.assert_array_equal(loss, np.asarray(want.loss).astype(loss.dtype), what)
    if want.grad is not None:
        np.testing.assert_array_equal(got.grad, want.grad.astype(got.grad.dtype), what)


def _random(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, SHAPE)
    z = rng.uniform(0, 1, SHAPE)
    w = rng.uniform(0, 2, SHAPE)
    m = rng.random(SHAPE) < 0.8
    return rng, x, z, w, m


def _binary_cases():
    rng, x, z, w, m = _random(1)
    codes = rng.integers(0, 65536, SHAPE).astype(np.uint16)
    f16, f32 = np.float16, np.float32
    yield "f16 logits, f16 weight", dict(logits=x.astype(f16), targets=z.astype(f32),
                                         weight=w.astype(f16), mask=m)
    yield "f16 targets, f64 logits, f16 weight", dict(logits=x, targets=z.astype(f16),
                                                      weight=w.astype(f16))
    yield "swapped f64, swapped weight and pos_weight", dict(
        logits=swapped(x), targets=swapped(z), weight=swapped(w), pos_weight=swapped(w), mask=m)
    yield "swapped f16 logits and targets", dict(logits=swapped(x.astype(f16)),
                                                 targets=swapped(z.astype(f16)))
    yield "swapped uint16 codes, F-order f32", dict(
        logits=np.asfortranarray(swapped(x.astype(f32))), targets=swapped(codes),
        ignore_value=7)
    yield "negative strides, swapped and f16", dict(
        logits=swapped(x.astype(f32))[:, ::-1, :, ::-2],
        targets=z.astype(f16)[:, ::-1, :, ::-2], weight=swapped(w)[:, ::-1, :, ::-2])


@pytest.mark.parametrize("case", list(_binary_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_binary_equals_native_copy(backend, case, reduction):
    what, args = case
    want = fastsce.sigmoid_cross_entropy(
        **{k: native(v) if isinstance(v, np.ndarray) else v for k, v in args.items()},
        reduction=reduction, backend=backend)
    before = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    got = fastsce.sigmoid_cross_entropy(**args, reduction=reduction, backend=backend)
    assert_same(got, want, what)
    assert got.grad.dtype == (np.float16 if args["logits"].dtype.itemsize == 2
                              else args["logits"].dtype.newbyteorder("="))
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v)  # inputs untouched


def _softmax_cases(axis):
    rng, x, z, w, m = _random(2)
    C = SHAPE[1]
    if axis == -1:
        x, z = np.moveaxis(x, 1, -1).copy(), np.moveaxis(z, 1, -1).copy()
    pixels = m.shape[:1] + m.shape[2:]
    pw, pm = w[:, 0], m[:, 0]
    labels = rng.integers(0, C + 1, pixels)      # C: ignored below
    codes = rng.integers(0, 65536, x.shape).astype(np.uint16)
    f16 = np.float16
    yield "f16 logits, f16 soft targets, f16 weight", dict(
        logits=x.astype(f16), targets=z.astype(f16), weight=pw.astype(f16), mask=pm)
    yield "swapped f32 logits, swapped uint16 codes", dict(
        logits=swapped(x.astype(np.float32)), targets=swapped(codes), weight=swapped(pw))
    yield "swapped f64 logits, swapped int64 labels", dict(
        logits=swapped(x), targets=swapped(labels), weight=swapped(pw), mask=pm,
        ignore_value=C)
    yield "f16 logits, swapped int64 labels, strided", dict(
        logits=x.astype(f16)[..., ::-1], targets=swapped(labels)[..., ::-1],
        ignore_value=C)


@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softmax_equals_native_copy(backend, axis, case, reduction):
    what, args = list(_softmax_cases(axis))[case]
    want = fastsce.softmax_cross_entropy(
        **{k: native(v) if isinstance(v, np.ndarray) else v for k, v in args.items()},
        axis=axis, reduction=reduction, backend=backend)
    got = fastsce.softmax_cross_entropy(**args, axis=axis, reduction=reduction, backend=backend)
    assert_same(got, want, what)


@pytest.mark.parametrize("order", ["native", "swapped"])
def test_every_float16_value(backend, order):
    """All 65536 float16 bit patterns (subnormals, infinities, NaNs), as
    targets and as logits, read exactly as float32 (targets unchecked)."""
    h = np.arange(65536, dtype=np.uint16).view(np.float16)
    h = swapped(h) if order == "swapped" else h
    x = np.linspace(-3, 3, h.size).astype(np.float32)
    z = np.full(h.size, 0.25, np.float32)
    with np.errstate(invalid="ignore"):  # the reference's NumPy on signalling NaNs
        as_targets = [fastsce.sigmoid_cross_entropy(x, t, reduction="none", check=False,
                                                    backend=backend) for t in (h, native(h))]
        as_logits = [fastsce.sigmoid_cross_entropy(v, z, reduction="none", backend=backend)
                     for v in (h, native(h))]
    assert_same(*as_targets, "float16 targets")
    assert_same(*as_logits, "float16 logits")


@pytest.mark.parametrize("name", ["out", "loss_out"])
def test_swapped_output_rejected(backend, name):
    x = np.zeros((4, 5), np.float32)
    buf = swapped(np.zeros_like(x))
    with pytest.raises(TypeError, match=f"`{name}` must be in native byte order"):
        fastsce.sigmoid_cross_entropy(x, x, reduction="none", backend=backend, **{name: buf})


MEMORY = PRELUDE + textwrap.dedent("""
    backend, n = sys.argv[1], int(sys.argv[2])

    def swapped(a):
        return a.astype(a.dtype.newbyteorder("S"))

    # (name, loss, make(rows) -> (logits, targets)); rows x 1024 elements
    def full(shape, value, dtype=np.float32):
        return np.full(shape, value, dtype)
    def sliced(r):
        return full((r, 2048), 1.0)[:, ::2], full((r, 2048), 0.25)[:, 1::2]
    def f_order(r):
        return np.asfortranarray(full((r, 1024), 1.0)), full((1024, r), 0.25).T
    def negative(r):
        return full((r, 1024), 1.0)[::-1, ::-1], full((r, 1024), 0.25)[::-1]
    def byte_swapped(r):
        return swapped(full((r, 1024), 1.0, np.float64)), swapped(full((r, 1024), 0.25))
    def half(r):
        return full((r, 1024), 1.0, np.float16), full((r, 1024), 0.25, np.float16)
    def nhwc_half(r):  # 8 classes last
        return full((r * 128, 8), 1.0, np.float16), full((r * 128, 8), 0.125, np.float16)
    def nhwc_swapped(r):
        return swapped(full((r * 128, 8), 1.0)), swapped(full((r * 128, 8), 0.125))

    sig, smx = fastsce.sigmoid_cross_entropy, fastsce.softmax_cross_entropy
    def smx_last(x, z, **kw):
        return smx(x, z, axis=-1, **kw)
    out = {}
    for name, loss, make in [("sliced", sig, sliced), ("F-order", sig, f_order),
                             ("negative-strides", sig, negative),
                             ("byte-swapped", sig, byte_swapped), ("float16", sig, half),
                             ("softmax NHWC float16", smx_last, nhwc_half),
                             ("softmax NHWC byte-swapped", smx_last, nhwc_swapped)]:
        loss(*make(64), backend=backend, grad=False)          # compile
        x, z = make(n // 1024)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        got = loss(x, z, backend=backend, grad=False).loss
        extra = status("VmHWM") - before
        want = loss(np.ascontiguousarray(x, x.dtype.newbyteorder("=")),
                    np.ascontiguousarray(z, z.dtype.newbyteorder("=")), backend=backend,
                    grad=False).loss
        out[name] = {"extra": extra, "bytes": x.nbytes, "got": got, "want": want}
        del x, z
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_no_operand_copied_whole(fast_backend):
    """Loss-only calls on 20-80 MB inputs in every layout that once meant a
    copy (or could): peak extra memory under 5% of the logits' size."""
    n = 10 * 2**20
    res = subprocess.run([sys.executable, "-c", MEMORY, fast_backend, str(n)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name, r in out.items():
        assert r["extra"] < 0.05 * r["bytes"], (
            f"{fast_backend} {name}: {r['extra'] / 2**20:.1f} MiB extra for "
            f"{r['bytes'] / 2**20:.0f} MiB of logits")
        assert r["got"] == r["want"], f"{fast_backend} {name}: loss differs from a native copy"
