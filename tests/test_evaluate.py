"""fastsce.evaluate: per-image / per-class / per-tile reports, against loops of
loss calls and NumPy counts; dict and CSV conversion."""
import csv
import io

import numpy as np
import pytest

import fastsce


def stack(seed=0, shape=(3, 4, 20, 13)):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    z = rng.random(shape).astype(np.float32)
    x[1, 2, 3, 4] = np.nan
    x[2, 0, 0, 0] = np.inf
    x[2, 3, 19, 12] = -np.inf
    m = rng.random((shape[0],) + shape[2:]) < np.linspace(0.9, 0.3, shape[0])[:, None, None]
    return x, z, m


def close(a, b, rtol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=0, equal_nan=True)


def test_sigmoid_per_image(backend):
    x, z, m = stack()
    ev = fastsce.evaluate(x, z, mask=m[:, None], backend=backend)
    assert ev.index == ("image",) and ev.shape == (3,)
    for i in range(3):
        ce = fastsce.sigmoid_cross_entropy(x[i], z[i], mask=m[i][None], grad=False,
                                           backend=backend).loss
        kl = fastsce.sigmoid_cross_entropy(x[i], z[i], mask=m[i][None], grad=False,
                                           divergence=True, backend=backend).loss
        close(ev.cross_entropy[i], ce, 1e-12)
        close(ev.kl_divergence[i], kl, 1e-12)
        zz = z[i].astype(np.float64)[np.broadcast_to(m[i][None], z[i].shape)]
        entropy = -np.mean(zz * np.log(zz) + (1 - zz) * np.log1p(-zz))
        close(ev.target_entropy[i], entropy, 1e-5)
    np.testing.assert_array_equal(ev.valid, 4 * m.reshape(3, -1).sum(axis=1))
    np.testing.assert_array_equal(ev.nonfinite, [0, 1, 2])


def test_sigmoid_per_class_and_tile(backend):
    x, z, m = stack(1)
    ev = fastsce.evaluate(x, z, per_class=True, backend=backend)
    assert ev.index == ("image", "class") and ev.shape == (3, 4)
    want = fastsce.sigmoid_cross_entropy(x, z, reduce_axes=(2, 3), grad=False,
                                         backend=backend).loss
    close(ev.cross_entropy, want, 1e-12)
    np.testing.assert_array_equal(ev.nonfinite, (~np.isfinite(x)).sum(axis=(2, 3)))
    ev = fastsce.evaluate(x, z, tile_shape=(8, 5), backend=backend)
    assert ev.index == ("image", "class", "tile_row", "tile_col") and ev.shape == (3, 4, 3, 3)
    bad = np.zeros((3, 4, 24, 15), bool)
    bad[..., :20, :13] = ~np.isfinite(x)
    np.testing.assert_array_equal(ev.nonfinite, bad.reshape(3, 4, 3, 8, 3, 5).sum(axis=(3, 5)))
    np.testing.assert_array_equal(ev.valid[0, 0], [[40, 40, 24], [40, 40, 24], [20, 20, 12]])


def test_softmax_per_image_and_class(backend):
    x, z, m = stack(2)
    ev = fastsce.evaluate(x, z, loss="softmax", mask=m, backend=backend)
    for i in range(3):
        ce = fastsce.softmax_cross_entropy(x[i:i + 1], z[i:i + 1], mask=m[i:i + 1],
                                           grad=False, backend=backend).loss
        close(ev.cross_entropy[i], ce, 1e-12)
    np.testing.assert_array_equal(ev.valid, m.reshape(3, -1).sum(axis=1))
    np.testing.assert_array_equal(ev.nonfinite, [0, 1, 2])
    per = fastsce.evaluate(x, z, loss="softmax", mask=m, per_class=True, backend=backend)
    assert per.shape == (3, 4) and per.index == ("image", "class")
    # the class terms add up to the per-pixel loss (image 0: all finite)
    close(per.cross_entropy[0].sum(), ev.cross_entropy[0], 1e-6)
    close(per.kl_divergence[0].sum(), ev.kl_divergence[0], 1e-5)
    np.testing.assert_array_equal(per.nonfinite, (~np.isfinite(x)).sum(axis=(2, 3)))


def test_softmax_channels_last_tiles(backend):
    x, z, m = stack(3)
    nhwc, zl = np.moveaxis(x, 1, -1), np.moveaxis(z, 1, -1)
    a = fastsce.evaluate(x, z, loss="softmax", tile_shape=(7, 7), backend=backend)
    b = fastsce.evaluate(nhwc, zl, loss="softmax", axis=-1, tile_shape=(7, 7), backend=backend)
    assert a.index == ("image", "tile_row", "tile_col")
    for name in ("cross_entropy", "kl_divergence", "valid", "nonfinite"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_dict_and_csv():
    x, z, m = stack(4)
    ev = fastsce.evaluate(x, z, per_class=True, backend="numpy")
    d = ev.as_dict()
    assert list(d) == ["image", "class", "cross_entropy", "kl_divergence", "target_entropy",
                       "valid", "nonfinite"]
    assert all(v.shape == (12,) for v in d.values())
    np.testing.assert_array_equal(d["class"], np.tile(np.arange(4), 3))
    f = io.StringIO()
    ev.to_csv(f)
    rows = list(csv.reader(io.StringIO(f.getvalue())))
    assert rows[0] == list(d) and len(rows) == 13
    assert float(rows[5][2]) == ev.cross_entropy[1, 0]
    assert int(rows[12][-1]) == ev.nonfinite[2, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="hinge"), "`loss`"),
    (dict(axis=0), "`axis`"),
    (dict(axis=9), "`axis`"),
    (dict(class_weights=[1, 2, 3, 4]), "class_weights"),
    (dict(tile_shape=(0, 1)), "tile_shape"),
])
def test_evaluate_errors(kwargs, match):
    x, z, _ = stack()
    with pytest.raises(fastsce.FastSCEError, match=match):
        fastsce.evaluate(x, z, backend="numpy", **kwargs)


def test_streams_of_disjoint_chunks_merge():
    """EvaluationStreams fed different images merge to `evaluate` of the whole stack."""
    from fastsce._evaluate import EvaluationStream

    x, z, m = stack(seed=3)
    ev = fastsce.evaluate(x, z, mask=m[:, None], tile_shape=(8, 8), backend="numpy")
    streams = []
    for i in range(x.shape[0]):
        s = EvaluationStream(x.shape, tile_shape=(8, 8), backend="numpy")
        s.add(x[i:i + 1], z[i:i + 1], (slice(i, i + 1),), mask=m[i:i + 1, None])
        streams.append(s)
    total = EvaluationStream(x.shape, tile_shape=(8, 8), backend="numpy")
    for s in streams[::-1]:
        total.merge(s)
    got = total.result()
    for name in ("cross_entropy", "kl_divergence", "target_entropy"):
        close(getattr(got, name), getattr(ev, name), 1e-12)
    np.testing.assert_array_equal(got.valid, ev.valid)
    np.testing.assert_array_equal(got.nonfinite, ev.nonfinite)
    with pytest.raises(fastsce.FastSCEValueError, match="same map and options"):
        total.merge(EvaluationStream(x.shape, with_pos_weight=True, backend="numpy"))
