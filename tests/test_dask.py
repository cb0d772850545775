"""fastsce.dask: the NumPy functions' results from dask arrays in any chunking,
on any scheduler; the loss within 1e-12 relative (bitwise on block-aligned
chunks), the gradient bitwise; arguments checked when the graph is built."""
import os
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
fd = pytest.importorskip("fastsce.dask")
from dask.delayed import Delayed  # noqa: E402

import fastsce  # noqa: E402
from fastsce import _api  # noqa: E402

RTOL = 1e-12


def data(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(dtype), rng.random(shape).astype(dtype)


def check(result, reference, logits_chunks=None, rtol=RTOL):
    """A lazy LossResult against the NumPy call's: the loss within rtol (NaN where
    it is NaN), the gradient bitwise, of the logits' chunks."""
    loss, grad = dask.compute(*result)
    ref_loss = np.asarray(reference.loss)
    assert np.shape(loss) == ref_loss.shape
    assert np.array_equal(np.isnan(loss), np.isnan(ref_loss))
    ok = ~np.isnan(ref_loss)
    np.testing.assert_allclose(np.asarray(loss)[ok], ref_loss[ok], rtol=rtol, atol=0)
    if reference.grad is None:
        assert result.grad is None
        return loss
    assert grad.dtype == reference.grad.dtype
    np.testing.assert_array_equal(grad, reference.grad)
    if logits_chunks is not None:
        assert result.grad.chunks == logits_chunks
    return loss


SIGMOID_OPTIONS = {
    "plain": {},
    "mask": {"mask": "m"},
    "weights": {"weight": "w", "pos_weight": np.float32(2.5)},
    "smoothing-kl": {"label_smoothing": 0.1, "divergence": True, "grad_scale": 0.5},
    "per-image-masked": {"reduce_axes": (1, 2, 3), "mask": "m"},
    "tiles-masked": {"tile_shape": (8, 16), "mask": "m"},
    "per-channel": {"reduce_axes": (0, 2)},
}


def _operands(options, shape, seed=5):
    """Option values: "m" a mask, "w" a weight of (shape[-2], shape[-1]) (broadcast)."""
    rng = np.random.default_rng(seed)
    values = {"m": rng.random(shape[-2:]) < 0.7, "w": rng.random(shape[-2:]).astype(np.float32)}
    return {k: values[v] if isinstance(v, str) else v for k, v in options.items()}


def _with_reductions(cases):
    """(case, reduction) pairs: "none" only for cases without groups."""
    return [(name, r) for name, options in cases.items() for r in ("mean", "sum", "none")
            if r != "none" or not {"reduce_axes", "tile_shape"} & set(options)]


@pytest.mark.parametrize("name, reduction", _with_reductions(SIGMOID_OPTIONS))
def test_sigmoid_matches_numpy(fast_backend, reduction, name):
    shape = (3, 2, 37, 53)
    x, z = data(shape)
    options = _operands(SIGMOID_OPTIONS[name], shape)
    ref = fastsce.sigmoid_cross_entropy(x, z, reduction=reduction, backend=fast_backend,
                                        **options)
    X = da.from_array(x, chunks=(2, 1, 10, 20))          # uneven edge chunks
    Z = da.from_array(z, chunks=(1, 2, 37, 7))           # rechunked to the logits'
    options = {k: da.from_array(v, chunks=9) if isinstance(v, np.ndarray) and v.ndim else v
               for k, v in options.items()}
    res = fd.sigmoid_cross_entropy(X, Z, reduction=reduction, backend=fast_backend, **options)
    check(res, ref, X.chunks)
    if reduction == "none":
        assert res.loss.chunks == X.chunks


@pytest.mark.parametrize("chunks", [(3, 2, 37, 53), (1, 1, 1, 53), (2, 2, 36, 52), (3, 2, 5, 3)],
                         ids=["one-chunk", "rows", "uneven", "many"])
def test_sigmoid_chunkings(fast_backend, chunks):
    shape = (3, 2, 37, 53)
    x, z = data(shape, seed=1, dtype=np.float64)
    m = np.random.default_rng(2).random(shape) < 0.5
    for options in ({}, {"mask": m, "reduce_axes": (0, 2, 3)}):
        ref = fastsce.sigmoid_cross_entropy(x, z, backend=fast_backend, **options)
        res = fd.sigmoid_cross_entropy(da.from_array(x, chunks=chunks), z, backend=fast_backend,
                                       **options)
        check(res, ref, da.from_array(x, chunks=chunks).chunks)


def test_integer_targets_and_float16(fast_backend):
    shape = (2, 30, 41)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 4).astype(np.float16)
    t = rng.integers(0, 256, shape).astype(np.uint8)
    ref = fastsce.sigmoid_cross_entropy(x, t, ignore_value=255, backend=fast_backend)
    res = fd.sigmoid_cross_entropy(da.from_array(x, chunks=(1, 7, 20)),
                                   da.from_array(t, chunks=(2, 30, 41)),
                                   ignore_value=255, backend=fast_backend)
    assert res.grad.dtype == np.float16
    check(res, ref)


def test_block_aligned_chunks_give_the_loss_bitwise(fast_backend):
    # Rows of 2 * BLOCK elements: every chunk is whole blocks of the NumPy call's walk.
    shape = (4, 8, 2 * fastsce.BLOCK)
    x, z = data(shape, seed=4)
    ref = fastsce.sigmoid_cross_entropy(x, z, backend=fast_backend)
    res = fd.sigmoid_cross_entropy(da.from_array(x, chunks=(1, 3, -1)), z, backend=fast_backend)
    assert check(res, ref) == ref.loss


def test_unaligned_chunks_within_1e12(fast_backend):
    shape = (3, 70, 1111)       # chunks cut blocks: the block sums round differently
    x, z = data(shape, seed=6, dtype=np.float64)
    ref = fastsce.sigmoid_cross_entropy(x, z, backend=fast_backend, grad=False)
    res = fd.sigmoid_cross_entropy(da.from_array(x, chunks=(2, 33, 500)), z, grad=False,
                                   backend=fast_backend)
    check(res, ref)


SOFTMAX_CASES = {
    "soft": dict(),
    "soft-uint8-class-weights": dict(targets="uint8", class_weights=np.array([1, 0.5, 2, 1, 3.])),
    "hard-ignore-masked": dict(targets="labels", ignore_value=2, mask="m"),
    "hard-weight-smoothing": dict(targets="labels", weight="w", label_smoothing=0.2),
    "soft-kl-per-image": dict(divergence=True, mask="m", reduce_axes=(1, 2)),
    "hard-tiles": dict(targets="labels", mask="m", tile_shape=(8, 8)),
}


def _softmax_inputs(case, axis, seed=7):
    """NumPy logits (N, C, H, W) or channels-last (N, H, W, C), targets and options."""
    N, C, H, W = 3, 5, 19, 23
    rng = np.random.default_rng(seed)
    options = dict(SOFTMAX_CASES[case])
    x = (rng.standard_normal((N, C, H, W)) * 3).astype(np.float32)
    z = rng.random((N, C, H, W)).astype(np.float32)
    kind = options.pop("targets", "float")
    if kind == "uint8":
        z = (z * 255).astype(np.uint8)
    elif kind == "labels":
        z = rng.integers(0, C, (N, H, W))
    if axis == -1:
        x = np.moveaxis(x, 1, -1).copy()
        if kind != "labels":
            z = np.moveaxis(z, 1, -1).copy()
    values = {"m": rng.random((H, W)) < 0.7, "w": rng.random((N, 1, W)).astype(np.float32)}
    return x, z, {k: values[v] if isinstance(v, str) else v for k, v in options.items()}


@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("case, reduction", _with_reductions(SOFTMAX_CASES))
def test_softmax_matches_numpy(fast_backend, case, reduction, axis):
    x, z, options = _softmax_inputs(case, axis)
    ref = fastsce.softmax_cross_entropy(x, z, axis=axis, reduction=reduction,
                                        backend=fast_backend, **options)
    # The class axis split in two chunks: rejoined.
    chunks = (2, 3, 10, 9) if axis == 1 else (2, 10, 9, 3)
    X = da.from_array(x, chunks=chunks)
    Z = da.from_array(z, chunks=(1,) + z.shape[1:]) if z.ndim == 4 else da.from_array(z, chunks=7)
    res = fd.softmax_cross_entropy(X, Z, axis=axis, reduction=reduction,
                                   backend=fast_backend, **options)
    joined = X.rechunk({axis % 4: -1}).chunks
    check(res, ref, joined)
    if reduction == "none":
        assert res.loss.chunks == tuple(c for d, c in enumerate(joined) if d != axis % 4)


def test_softmax_class_axis_split_can_be_refused():
    x, z, _ = _softmax_inputs("soft", 1)
    X = da.from_array(x, chunks=(3, 2, 19, 23))
    with pytest.raises(fastsce.FastSCEValueError,
                       match=r"class axis 1 split into 3 chunks .*rejoin_classes=True"):
        fd.softmax_cross_entropy(X, z, rejoin_classes=False)
    ok = fd.softmax_cross_entropy(X.rechunk({1: -1}), z, rejoin_classes=False)
    check(ok, fastsce.softmax_cross_entropy(x, z))


def test_grad_false_and_numpy_operands():
    x, z = data((2, 3, 40))
    w = np.float32(0.5)
    ref = fastsce.sigmoid_cross_entropy(x, z, weight=w, grad=False)
    res = fd.sigmoid_cross_entropy(da.from_array(x, chunks=(1, 2, 15)), z, weight=w, grad=False)
    assert res.grad is None
    assert res.loss.shape == () and res.loss.dtype == np.float64
    check(res, ref)


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(_api, name)

    def counted(*args, chunk=None, **kwargs):
        calls.append("count" if chunk is not None and chunk.count_only else "fused")
        return real(*args, chunk=chunk, **kwargs)

    monkeypatch.setattr(_api, name, counted)
    return calls


def test_loss_and_grad_computed_together_run_each_chunk_once(monkeypatch):
    x, z = data((4, 6, 30))
    m = np.random.default_rng(8).random(x.shape) < 0.5
    X = da.from_array(x, chunks=(1, 3, 30))         # 8 chunks
    ref = fastsce.sigmoid_cross_entropy(x, z, mask=m)
    res = fd.sigmoid_cross_entropy(X, z, mask=m)    # a masked mean: a count pass first
    calls = _count_calls(monkeypatch, "_sigmoid")
    check(res, ref)
    assert sorted(calls) == ["count"] * 8 + ["fused"] * 8


SCHEDULERS = [dict(scheduler="sync"), dict(scheduler="threads", num_workers=1),
              dict(scheduler="threads", num_workers=2), dict(scheduler="threads", num_workers=5)]


def test_schedule_independent():
    """Every scheduler and worker count finishes the 120 chunks in another order;
    the loss and gradient are bitwise the same (also on a process pool)."""
    shape = (6, 20, 3000)
    x, z = data(shape, seed=9, dtype=np.float64)
    m = np.random.default_rng(10).random(shape[1:]) < 0.8
    X = da.from_array(x, chunks=(1, 3, 1000))
    results = []
    for kwargs in SCHEDULERS + [dict(scheduler="processes", num_workers=2)]:
        for options in ({"mask": m}, {"reduce_axes": 2, "reduction": "sum"}):
            res = fd.sigmoid_cross_entropy(X, z, **options)
            results.append((str(options.keys()), dask.compute(*res, **kwargs)))
    for key, (loss, grad) in results:
        first_loss, first_grad = next(r for k, r in results if k == key)
        np.testing.assert_array_equal(loss, first_loss)
        np.testing.assert_array_equal(grad, first_grad)


def test_evaluate_matches_numpy(fast_backend):
    x, z = data((3, 2, 33, 40), seed=11)
    m = np.random.default_rng(12).random((33, 40)) < 0.7
    X = da.from_array(x, chunks=(2, 1, 16, 17))
    for options in ({}, {"mask": m, "pos_weight": 2.0}, {"tile_shape": (16, 16), "mask": m}):
        lazy = fd.evaluate(X, z, backend=fast_backend, **options)
        assert isinstance(lazy, Delayed)
        _same_evaluation(lazy.compute(), fastsce.evaluate(x, z, backend=fast_backend, **options))
    # Softmax with hard labels and the class axis last, split (rejoined).
    xs = np.moveaxis(x, 1, -1).copy()
    labels = np.random.default_rng(13).integers(0, 2, (3, 33, 40))
    options = dict(loss="softmax", axis=-1, ignore_value=1, class_weights=[1.0, 2.0])
    lazy = fd.evaluate(da.from_array(xs, chunks=(1, 20, 20, 1)), labels, backend=fast_backend,
                       **options)
    _same_evaluation(lazy.compute(), fastsce.evaluate(xs, labels, backend=fast_backend,
                                                      **options))


def _same_evaluation(got, ref):
    assert got.index == ref.index
    for name in ("cross_entropy", "kl_divergence", "target_entropy"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=RTOL, atol=0)
    np.testing.assert_array_equal(got.valid, ref.valid)
    np.testing.assert_array_equal(got.nonfinite, ref.nonfinite)


def test_errors_name_the_argument():
    x, z = data((2, 3, 8))
    X = da.from_array(x, chunks=(1, 3, 4))
    with pytest.raises(fastsce.FastSCETypeError, match=r"`logits` must be a dask array; got ndarray"):
        fd.sigmoid_cross_entropy(x, z)
    with pytest.raises(fastsce.FastSCEValueError,
                       match=r"`targets` must broadcast to the shape of `logits` \(2, 3, 8\); "
                             r"got targets.shape=\(2, 3, 7\)"):
        fd.sigmoid_cross_entropy(X, z[..., :7])
    with pytest.raises(fastsce.FastSCETypeError, match=r"`logits` must be float16, float32"):
        fd.sigmoid_cross_entropy(X.astype(np.int32), z)
    with pytest.raises(fastsce.FastSCEValueError, match=r"`weight` must broadcast to the pixel"):
        fd.softmax_cross_entropy(X, z, weight=np.ones((2, 3, 8)))
    with pytest.raises(fastsce.FastSCEValueError, match=r"`label_smoothing` must be a finite number in \[0, 1\]"):
        fd.sigmoid_cross_entropy(X, z, label_smoothing=2)
    with pytest.raises(fastsce.FastSCEValueError, match=r"`reduce_axes` must name axes"):
        fd.sigmoid_cross_entropy(X, z, reduce_axes=5)
    with pytest.raises(fastsce.FastSCEValueError, match=r"`class_weights` must have shape \(3,\)"):
        fd.softmax_cross_entropy(X, z, class_weights=[1.0, 2.0])
    with pytest.raises(fastsce.FastSCEValueError, match=r"`backend` must be one of"):
        fd.sigmoid_cross_entropy(X, z, backend="gpu")
    with pytest.raises(fastsce.FastSCEValueError, match=r"unknown size"):
        fd.sigmoid_cross_entropy(X[X[:, 0, 0] > -100], z)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'out'"):
        fd.sigmoid_cross_entropy(X, z, out=np.empty_like(x))
    with pytest.raises(fastsce.FastSCEValueError, match=r"`pos_weight` applies to loss='sigmoid'"):
        fd.evaluate(X, z, loss="softmax", pos_weight=2.0)
    with pytest.raises(fastsce.FastSCEValueError, match=r"`axis` must name a class axis"):
        fd.evaluate(X, z, loss="softmax", axis=0)


def test_target_errors_give_the_map_index():
    x, z = data((2, 3, 8))
    z[1, 2, 5] = 1.5
    res = fd.sigmoid_cross_entropy(da.from_array(x, chunks=(1, 2, 4)), z)
    with pytest.raises(fastsce.TargetRangeError, match=r"first at index \(1, 2, 5\)") as info:
        dask.compute(*res)
    assert "filled with NaN" not in str(info.value)  # the chunks' buffers are our own


# -- dask.distributed: a LocalCluster of two worker processes on loopback ------------------

@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_distributed_matches_numpy(client):
    x, z, options = _softmax_inputs("hard-ignore-masked", 1)
    X = da.from_array(x, chunks=(1, 5, 10, 12))
    for reduction in ("mean", "none"):
        ref = fastsce.softmax_cross_entropy(x, z, reduction=reduction, **options)
        check(fd.softmax_cross_entropy(X, z, reduction=reduction, **options), ref, X.chunks)
    lazy = fd.evaluate(X, z, loss="softmax", mask=options["mask"])
    _same_evaluation(lazy.compute(), fastsce.evaluate(x, z, loss="softmax", mask=options["mask"]))


# -- the must-show: 2 GiB of float32 logits in 64 chunks -----------------------------------

BIG_SHAPE = (4, 1, 16384, 8192)          # 2**29 float32 elements: 2 GiB
BIG_CHUNKS = (1, 1, 1024, 8192)          # 64 chunks of 32 MiB


def _random_block(block, seed, block_id=None):
    """A chunk of the big map, from its own seed: the same values wherever it is made."""
    rng = np.random.default_rng([seed, *block_id])
    if block.dtype == np.float32:   # logits in [-8, 8)
        out = rng.random(block.shape, np.float32)
        out *= 16
        out -= 8
        return out
    if block.dtype == np.uint8:     # soft targets
        return rng.integers(0, 256, block.shape, np.uint8)
    return rng.random(block.shape) < 0.9


def _big(seed, dtype, shape=BIG_SHAPE):
    """The logits (float32), targets (uint8) or an (H, W) mask (bool), made chunk by chunk."""
    grid = da.zeros(shape, chunks=BIG_CHUNKS[-len(shape):], dtype=dtype)
    return grid.map_blocks(_random_block, seed, dtype=dtype)


def _mismatches(grad, path, block_info=None):
    """Elements of a gradient block that differ from the reference memmap at `path`."""
    ref = np.load(path, mmap_mode="r")
    index = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    return np.full((1,) * grad.ndim, np.count_nonzero(grad != ref[index]))


@pytest.fixture(scope="module")
def big_reference(tmp_path_factory):
    """The NumPy call on the whole 2 GiB map: (loss, path of its gradient as .npy)."""
    path = str(tmp_path_factory.mktemp("big") / "grad.npy")
    x = np.empty(BIG_SHAPE, np.float32)
    t = np.empty(BIG_SHAPE, np.uint8)
    mask = np.empty(BIG_SHAPE[2:], bool)
    da.store([_big(0, np.float32), _big(1, np.uint8), _big(2, bool, BIG_SHAPE[2:])],
             [x, t, mask], scheduler="threads")
    grad = np.lib.format.open_memmap(path, "w+", np.float32, BIG_SHAPE)
    start = time.perf_counter()
    loss, _ = fastsce.sigmoid_cross_entropy(x, t, mask=mask, out=grad)
    print(f"\nNumPy call on {x.nbytes / 2**30:.0f} GiB: {time.perf_counter() - start:.1f} s")
    grad.flush()
    del grad, x, t
    return loss, path


def _big_check(big_reference, **compute):
    loss_ref, path = big_reference
    res = fd.sigmoid_cross_entropy(_big(0, np.float32), _big(1, np.uint8),
                                   mask=_big(2, bool, BIG_SHAPE[2:]))
    assert res.grad.chunks == da.zeros(BIG_SHAPE, chunks=BIG_CHUNKS).chunks
    assert res.grad.npartitions == 64
    wrong = res.grad.map_blocks(_mismatches, path, chunks=(1,) * 4, dtype=np.int64)
    start = time.perf_counter()
    loss, wrong = dask.compute(res.loss, wrong.sum(), **compute)
    print(f"dask {compute or 'on the cluster'}: {time.perf_counter() - start:.1f} s, "
          f"loss {loss!r}, NumPy's {loss_ref!r}")
    assert abs(loss - loss_ref) <= RTOL * abs(loss_ref)
    assert wrong == 0


def test_2gib_threads(big_reference):
    _big_check(big_reference, scheduler="threads")


def test_2gib_local_cluster(big_reference, client):
    _big_check(big_reference)
    peaks = client.run(_peak_rss)
    print("workers' peak resident memory:", [f"{p / 2**20:.0f} MiB" for p in peaks.values()])


def _peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_cluster_workers_are_separate_processes(client):
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
