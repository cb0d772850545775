"""fastsce.Accumulator: chunks in any order give what one call gives (bitwise
when chunk edges fall on block edges), gradients written chunk by chunk into
a memmap, coverage errors, and the anonymous memory of a streamed memmap."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from naive import misaligned
from procmem import PRELUDE

import fastsce

BLOCK = fastsce.BLOCK


def data(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3).astype(dtype), rng.random(shape).astype(dtype)


def row_chunks(n_images, rows, step, seed=0):
    """(image, row-slice) chunks in a shuffled order."""
    chunks = [(slice(i, i + 1), slice(r, min(r + step, rows)))
              for i in range(n_images) for r in range(0, rows, step)]
    order = np.random.default_rng(seed).permutation(len(chunks))
    return [chunks[k] for k in order]


@pytest.mark.parametrize("options", [{}, {"reduce_axes": (1, 2)}, {"tile_shape": (16, 512)},
                                     {"reduction": "sum", "reduce_axes": 2}],
                         ids=["full", "per-image", "tiles", "sum-per-row"])
def test_sigmoid_aligned_chunks_bitwise(backend, options, tmp_path):
    shape = (3, 64, 1024)            # 16 rows = one block
    x, z = data(shape)
    one = fastsce.sigmoid_cross_entropy(x, z, backend=backend, **options)
    g = np.lib.format.open_memmap(tmp_path / "g.npy", "w+", np.float32, shape)
    acc = fastsce.Accumulator("sigmoid", shape, out=g, backend=backend, **options)
    for index in row_chunks(3, 64, 16):
        acc.add(x[index], z[index], index=index)
    loss, grad = acc.result()
    assert grad is g
    np.testing.assert_array_equal(loss, one.loss)
    np.testing.assert_array_equal(g, one.grad)


@pytest.mark.parametrize("options", [{}, {"reduce_axes": (1, 2)}, {"tile_shape": (20, 300)},
                                     {"reduction": "sum", "reduce_axes": 0}],
                         ids=["full", "per-image", "tiles", "sum-per-pixel"])
def test_unaligned_chunks_close(backend, options):
    shape = (2, 50, 777)
    x, z = data(shape, seed=1, dtype=np.float64)
    m = np.random.default_rng(2).random(shape) < 0.6
    one = fastsce.sigmoid_cross_entropy(x, z, mask=m, backend=backend, grad=False, **options)
    acc = fastsce.Accumulator("sigmoid", shape, backend=backend, **options)
    for i, rows in row_chunks(2, 50, 7, seed=3):
        for cols in (slice(0, 123), slice(123, None)):
            acc.add(x[i, rows, cols], z[i, rows, cols], index=(i, rows, cols),
                    mask=m[i, rows, cols])
    loss, grad = acc.result()
    assert grad is None
    np.testing.assert_allclose(loss, one.loss, rtol=1e-12, atol=0)


def test_softmax_chunks(backend):
    shape = (2, 5, 40, 1000)
    x, z = data(shape, seed=4)
    one = fastsce.softmax_cross_entropy(x, z, reduce_axes=(1, 2), backend=backend)
    g = np.zeros_like(x)
    acc = fastsce.Accumulator("softmax", shape, axis=1, reduce_axes=(1, 2), out=g,
                              backend=backend)
    for i in (1, 0):
        for rows in (slice(20, 40), slice(0, 20)):
            index = (slice(i, i + 1), slice(None), rows)
            acc.add(x[index], z[index], index=index)
    loss, _ = acc.result()
    np.testing.assert_allclose(loss, one.loss, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(g, one.grad)


def test_coverage_and_argument_errors():
    x, z = data((4, 10))
    acc = fastsce.Accumulator("sigmoid", (4, 10), backend="numpy")
    acc.add(x[:2], z[:2], index=(slice(0, 2),))
    with pytest.raises(fastsce.FastSCEValueError, match="overlaps"):
        acc.add(x[1:3], z[1:3], index=(slice(1, 3),))
    with pytest.raises(fastsce.FastSCEValueError, match="20 of the map's 40"):
        acc.result()
    with pytest.raises(fastsce.FastSCEValueError, match="shape of map"):
        acc.add(x[2:], z[2:], index=(slice(2, 3),))
    with pytest.raises(fastsce.FastSCETypeError, match="slices"):
        acc.add(x[2:], z[2:], index=(2,))
    acc.add(x[2:], z[2:], index=(slice(2, 4),))
    assert acc.result().loss == fastsce.sigmoid_cross_entropy(x, z, backend="numpy").loss
    with pytest.raises(fastsce.FastSCEValueError, match="reduction"):
        fastsce.Accumulator("sigmoid", (4, 10), reduction="none")
    with pytest.raises(fastsce.FastSCEValueError, match="every class"):
        fastsce.Accumulator("softmax", (4, 10)).add(x[:, :5], z[:, :5], index=(slice(None),
                                                                          slice(0, 5)))
    g = np.zeros((4, 10), np.float32)
    acc = fastsce.Accumulator("sigmoid", (4, 10), out=g)
    with pytest.raises(fastsce.FastSCEValueError, match="reduction='sum'"):
        acc.add(x, z, mask=x > 0)
    assert not g.any()
    with pytest.raises(fastsce.FastSCEValueError, match="`out` must be aligned"):
        fastsce.Accumulator("sigmoid", (4, 10), out=misaligned(g))


def test_in_place_mean_gradient_divides_by_the_map_count(backend):
    x, z = data((4, 100), seed=6, dtype=np.float64)
    one = fastsce.sigmoid_cross_entropy(x, z, backend=backend)
    g = x.copy()                                   # each chunk's gradient over its logits
    acc = fastsce.Accumulator("sigmoid", g.shape, out=g, backend=backend)
    for i in range(4):
        acc.add(g[i:i + 1], z[i:i + 1], index=(slice(i, i + 1),))
    np.testing.assert_allclose(acc.result().loss, one.loss, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(g, one.grad)


def test_bad_chunk_fills_its_part_of_out_with_nan_and_is_not_added(backend):
    x, z = data((4, 100), seed=7, dtype=np.float64)
    one = fastsce.sigmoid_cross_entropy(x, z, reduction="sum", backend=backend)
    g = np.full(x.shape, 7.0)
    acc = fastsce.Accumulator("sigmoid", g.shape, reduction="sum", out=g, backend=backend)
    acc.add(x[:2], z[:2], index=(slice(0, 2),))
    bad = z[2:].copy()
    bad[0, 5] = 1.5
    with pytest.raises(fastsce.TargetRangeError, match=r"first at index \(2, 5\)") as info:
        acc.add(x[2:], bad, index=(slice(2, 4),))
    assert "`out[2:4, 0:100]` (this chunk's part) held partial results" in str(info.value)
    assert np.isnan(g[2:]).all()
    np.testing.assert_array_equal(g[:2], one.grad[:2])      # earlier chunks intact
    acc.add(x[2:], z[2:], index=(slice(2, 4),))             # the fixed chunk
    assert acc.result().loss == pytest.approx(one.loss, rel=1e-12)
    np.testing.assert_array_equal(g, one.grad)


def test_merge_collects_what_one_accumulator_would(backend):
    """Accumulators fed disjoint chunks (in threads or processes) merge to the whole map."""
    shape = (3, 40, 300)
    x, z = data(shape, seed=5, dtype=np.float64)
    one = fastsce.sigmoid_cross_entropy(x, z, tile_shape=(16, 128), backend=backend, grad=False)
    parts = []
    for i in range(3):
        acc = fastsce.Accumulator("sigmoid", shape, tile_shape=(16, 128), backend=backend)
        acc.add(x[i:i + 1], z[i:i + 1], index=(slice(i, i + 1),))
        parts.append(acc)
    total = fastsce.Accumulator("sigmoid", shape, tile_shape=(16, 128), backend=backend)
    for acc in parts[::-1]:
        total.merge(acc)
    np.testing.assert_allclose(total.result().loss, one.loss, rtol=1e-12, atol=0)
    with pytest.raises(fastsce.FastSCEValueError, match="overlaps"):
        total.merge(parts[0])
    for other in (fastsce.Accumulator("sigmoid", shape, backend=backend),
                  fastsce.Accumulator("sigmoid", shape, tile_shape=(16, 128), backend=backend,
                                      label_smoothing=0.1), "not an accumulator"):
        with pytest.raises(fastsce.FastSCEValueError, match="same map and options"):
            total.merge(other)


# ---------------------------------------------------------------- memmaps

SCRIPT = PRELUDE + textwrap.dedent("""
    import threading, time

    folder, n, h, w, backend = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    shape, step = (n, h, w), 1024

    def maps(mode):
        return [np.memmap(f"{folder}/{name}.f32", np.float32, mode, shape=shape)
                for name in ("x", "z")]

    x, z = maps("w+")
    rng = np.random.default_rng(0)
    for i in range(n):
        for r in range(0, h, step):
            x[i, r:r + step] = rng.standard_normal((min(step, h - r), w), np.float32) * 3
            z[i, r:r + step] = rng.random((min(step, h - r), w), np.float32)
    x.flush(); z.flush()
    del x, z
    x, z = maps("r")
    small = (slice(0, 1), slice(0, 2 * step))
    fastsce.sigmoid_cross_entropy(x[small], z[small], backend=backend)  # compile, warm up

    peak, done = [status("RssAnon")], threading.Event()
    def watch():
        while not done.is_set():
            peak.append(status("RssAnon"))
            time.sleep(0.005)
    baseline = status("RssAnon")
    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    acc = fastsce.Accumulator("sigmoid", shape, reduce_axes=(1, 2), backend=backend)
    for i in range(n):
        for r in range(0, h, step):
            index = (slice(i, i + 1), slice(r, r + step))
            acc.add(x[index], z[index], index=index)
    loss, _ = acc.result()
    seconds = time.perf_counter() - t0
    done.set(); watcher.join()

    # the same chunks of a smaller slice, against one in-memory call on it
    xs, zs = np.array(x[small]), np.array(z[small])
    one = fastsce.sigmoid_cross_entropy(xs, zs, reduce_axes=(1, 2), backend=backend,
                                        grad=False).loss
    acc = fastsce.Accumulator("sigmoid", xs.shape, reduce_axes=(1, 2), backend=backend)
    for r in (step, 0):
        acc.add(x[0:1, r:r + step], z[0:1, r:r + step], index=(slice(0, 1), slice(r, r + step)))
    print(json.dumps({"bytes": 2 * x.nbytes, "baseline": baseline, "peak": max(peak),
                      "seconds": seconds, "loss": loss.tolist(), "slice_one": one.tolist(),
                      "slice_acc": acc.result().loss.tolist()}))
""")


def stream_memmap(folder, n, h, w, backend):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(n), str(h), str(w),
                          backend], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_stream(out, n):
    assert out["peak"] < 2**30, f"RssAnon peaked at {out['peak'] / 2**20:.0f} MiB"
    # nothing of the map's size became anonymous memory
    assert out["peak"] - out["baseline"] < 0.1 * out["bytes"] + 64 * 2**20, out
    assert len(out["loss"]) == n and all(0.5 < v < 5 for v in out["loss"])
    assert out["slice_acc"] == out["slice_one"]    # bitwise


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_memmap_stream_200mb(fast_backend, tmp_path):
    out = stream_memmap(tmp_path, 2, 3072, 4096, fast_backend)   # 2 x 100 MB
    check_stream(out, 2)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_memmap_stream_6gb(tmp_path):
    out = stream_memmap(tmp_path, 12, 8192, 8192, "c")           # 2 x 3.2 GB
    assert out["bytes"] >= 6e9
    check_stream(out, 12)
    print(f"\n6 GB memmap: RssAnon peak {out['peak'] / 2**20:.0f} MiB "
          f"(baseline {out['baseline'] / 2**20:.0f} MiB), {out['seconds']:.1f} s")
