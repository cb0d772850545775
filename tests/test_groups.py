"""Grouped reductions: `reduce_axes` and `tile_shape` (SPEC §1.4), both losses,
every backend, against loops of single-image / single-tile calls and against
reshapes of the loss map."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastsce

LOSSES = {
    "sigmoid": lambda x, z, **kw: fastsce.sigmoid_cross_entropy(x, z, **kw),
    "softmax": lambda x, z, **kw: fastsce.softmax_cross_entropy(x, z, axis=1, **kw),
}


def case(shape=(4, 3, 37, 29), seed=0, dtype=np.float64):
    """Logits, soft targets and a pixel mask with a different count per image;
    image 2 is fully masked."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    z = rng.random(shape).astype(dtype)
    n, _, h, w = shape
    m = rng.random((n, h, w)) < np.linspace(0.9, 0.2, n)[:, None, None]
    m[min(2, n - 1)] = False
    return x, z, m


def loss_mask(kind, m):
    """The mask as each loss takes it: per element (broadcast over channels) or per pixel."""
    return m[:, None] if kind == "sigmoid" else m


def rel_close(a, b, rtol=1e-12):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    ok = both_nan | (np.abs(a - b) <= rtol * np.maximum(np.abs(a), np.abs(b)))
    return bool(ok.all())


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_image_equals_loop(backend, kind, reduction):
    x, z, m = case()
    f = LOSSES[kind]
    mk = loss_mask(kind, m)
    axes = (1, 2, 3) if kind == "sigmoid" else (1, 2)
    got = f(x, z, mask=mk, reduction=reduction, reduce_axes=axes, backend=backend)
    assert got.loss.shape == (x.shape[0],) and got.loss.dtype == np.float64
    for i in range(x.shape[0]):
        one = f(x[i:i + 1], z[i:i + 1], mask=mk[i:i + 1], reduction=reduction,
                backend=backend)
        assert rel_close(got.loss[i], one.loss), (i, got.loss[i], one.loss)
        np.testing.assert_allclose(got.grad[i:i + 1], one.grad, rtol=1e-12, atol=0)
    # counts differ per image, and the fully masked image gives NaN / 0 with a zero gradient
    if reduction == "mean":
        assert math.isnan(got.loss[2])
    else:
        assert got.loss[2] == 0.0
    assert not got.grad[2].any()


@pytest.mark.parametrize("kind", LOSSES)
def test_per_image_equals_reshape(backend, kind):
    x, z, m = case(seed=1)
    f = LOSSES[kind]
    mk = loss_mask(kind, m)
    axes = (1, 2, 3) if kind == "sigmoid" else (-2, -1)
    got = f(x, z, mask=mk, reduce_axes=axes, backend=backend)
    lmap = f(x, z, mask=mk, reduction="none", backend=backend)
    total = f(x, z, mask=mk, reduction="sum", backend=backend)
    counts = np.broadcast_to(mk, lmap.loss.shape).reshape(len(x), -1).sum(axis=1)
    with np.errstate(invalid="ignore"):
        want = lmap.loss.reshape(len(x), -1).sum(axis=1) / counts
    assert rel_close(got.loss, want, 1e-12)
    scale = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    np.testing.assert_allclose(got.grad, total.grad * scale[:, None, None, None],
                               rtol=4e-16 * 4, atol=0)


def test_per_channel_sigmoid(backend):
    x, z, m = case(seed=2)
    got = fastsce.sigmoid_cross_entropy(x, z, reduction="sum", reduce_axes=(0, 2, 3),
                                        backend=backend, grad=False)
    lmap = fastsce.sigmoid_cross_entropy(x, z, reduction="none", backend=backend).loss
    assert got.loss.shape == (x.shape[1],)
    assert rel_close(got.loss, lmap.sum(axis=(0, 2, 3)), 1e-12)


def tile_loop(f, x, z, mk, tile, reduction, backend):
    """Per-tile losses by one call per tile on sliced views."""
    th, tw = tile
    H, W = x.shape[-2:]
    rows, cols = -(-H // th), -(-W // tw)
    out = np.empty((x.shape[0], rows, cols))
    for n in range(x.shape[0]):
        for i in range(rows):
            for j in range(cols):
                sl = (slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw))
                out[n, i, j] = f(x[n:n + 1][(..., *sl)], z[n:n + 1][(..., *sl)],
                                 mask=mk[n:n + 1][(..., *sl)], reduction=reduction,
                                 backend=backend, grad=False).loss
    return out


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("tile", [(16, 10), (37, 29), (8, 64), (1, 1)])
def test_per_tile_equals_loop(backend, kind, tile):
    x, z, m = case(shape=(3, 2, 37, 29), seed=3)
    f = LOSSES[kind]
    mk = loss_mask(kind, m)
    if kind == "sigmoid":
        # tiles of the last two axes, per (image, channel)
        got = f(x, z, mask=mk, tile_shape=tile, backend=backend)
        want = np.stack([tile_loop(f, x[:, c:c + 1], z[:, c:c + 1], mk, tile, "mean", backend)
                         for c in range(x.shape[1])], axis=1)
    else:
        got = f(x, z, mask=mk, tile_shape=tile, backend=backend)
        want = tile_loop(f, x, z, mk, tile, "mean", backend)
    assert got.loss.shape == want.shape
    assert rel_close(got.loss, want)


@pytest.mark.parametrize("kind", LOSSES)
def test_per_tile_gradient_divided_by_own_count(backend, kind):
    x, z, m = case(shape=(2, 3, 20, 13), seed=4)
    f = LOSSES[kind]
    mk = loss_mask(kind, m)
    tile = (8, 5)
    got = f(x, z, mask=mk, tile_shape=tile, backend=backend)
    total = f(x, z, mask=mk, reduction="sum", backend=backend)
    pix = np.broadcast_to(mk, x.shape if kind == "sigmoid" else m.shape).astype(np.int64)
    counts = np.add.reduceat(np.add.reduceat(pix, np.arange(0, 20, 8), axis=-2),
                             np.arange(0, 13, 5), axis=-1)
    per_pixel = np.repeat(np.repeat(counts, 8, axis=-2)[..., :20, :], 5, axis=-1)[..., :13]
    scale = np.where(per_pixel > 0, 1.0 / np.maximum(per_pixel, 1), 0.0)
    if kind == "softmax":
        scale = scale[:, None]
    np.testing.assert_allclose(got.grad, total.grad * scale, rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind", LOSSES)
def test_groups_agree_across_backends_and_threads(fast_backend, kind):
    x, z, m = case(shape=(3, 4, 200, 190), seed=5, dtype=np.float32)
    f = LOSSES[kind]
    mk = loss_mask(kind, m)
    runs = [f(x, z, mask=mk, tile_shape=(64, 50), backend=fast_backend, num_threads=t)
            for t in (1, 2, 3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.loss, runs[0].loss)
        np.testing.assert_array_equal(r.grad, runs[0].grad)
    ref = f(x, z, mask=mk, tile_shape=(64, 50), backend="numpy")
    assert rel_close(runs[0].loss, ref.loss, 1e-6)
    np.testing.assert_allclose(runs[0].grad, ref.grad, rtol=1e-5, atol=1e-9)


def test_groups_cross_blocks(fast_backend):
    """Groups larger than a block, not a multiple of it: blocks never cross a group."""
    rng = np.random.default_rng(6)
    n = fastsce.BLOCK + 3
    x = rng.standard_normal((3, n))
    z = rng.random((3, n))
    got = fastsce.sigmoid_cross_entropy(x, z, reduce_axes=1, backend=fast_backend)
    for i in range(3):
        one = fastsce.sigmoid_cross_entropy(x[i], z[i], backend=fast_backend)
        assert got.loss[i] == one.loss
        np.testing.assert_array_equal(got.grad[i], one.grad)


@given(h=st.integers(1, 40), w=st.integers(1, 40), th=st.integers(1, 45),
       tw=st.integers(1, 45), seed=st.integers(0, 2**16))
def test_tiles_property(backend, h, w, th, tw, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, h, w)) * 4
    z = rng.random((2, h, w))
    m = rng.random((2, h, w)) < 0.7
    got = fastsce.sigmoid_cross_entropy(x, z, mask=m, reduction="sum", tile_shape=(th, tw),
                                        backend=backend, grad=False).loss
    lmap = fastsce.sigmoid_cross_entropy(x, z, mask=m, reduction="none", backend=backend,
                                         grad=False).loss
    rows, cols = -(-h // th), -(-w // tw)
    pad = np.zeros((2, rows * th, cols * tw))
    pad[:, :h, :w] = lmap
    want = pad.reshape(2, rows, th, cols, tw).sum(axis=(2, 4))
    assert got.shape == (2, rows, cols)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)


def test_empty_groups(backend):
    x = np.zeros((3, 0, 4))
    z = np.zeros((3, 0, 4))
    got = fastsce.sigmoid_cross_entropy(x, z, reduce_axes=(1, 2), backend=backend)
    assert got.loss.shape == (3,) and np.isnan(got.loss).all() and got.grad.shape == x.shape
    got = fastsce.sigmoid_cross_entropy(x, z, reduce_axes=1, reduction="sum", backend=backend)
    assert got.loss.shape == (3, 4) and not got.loss.any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduce_axes=3), "reduce_axes"),
    (dict(reduce_axes=(0, 0)), "twice"),
    (dict(reduce_axes="a"), "reduce_axes"),
    (dict(tile_shape=(0, 3)), "tile_shape"),
    (dict(tile_shape=4), "tile_shape"),
    (dict(reduce_axes=1, tile_shape=(2, 2)), "not both"),
    (dict(reduce_axes=1, reduction="none"), "reduction='none'"),
])
def test_group_errors(backend, kwargs, match):
    x = np.zeros((2, 3, 4))
    out = np.full(x.shape, 7.0)
    with pytest.raises(fastsce.FastSCEError, match=match):
        fastsce.sigmoid_cross_entropy(x, x, out=out, backend=backend, **kwargs)
    assert (out == 7.0).all()


def test_bad_target_index_is_original(backend):
    x = np.zeros((2, 5, 6))
    z = np.full(x.shape, 0.5)
    z[1, 3, 4] = 2.0
    with pytest.raises(fastsce.TargetRangeError, match=r"\(1, 3, 4\)"):
        fastsce.sigmoid_cross_entropy(x, z, tile_shape=(4, 4), backend=backend)
    with pytest.raises(fastsce.TargetRangeError, match=r"\(1, 3, 4\)"):
        fastsce.sigmoid_cross_entropy(x, z, reduce_axes=0, backend=backend)
