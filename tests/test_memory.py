"""Peak memory of a fused call: the gradient plus O(threads x block), nothing full-size.

Measured in a fresh process from the kernel's point of view: tracemalloc sees
neither Numba's nor C's allocations, so the test reads the process's peak
resident set (VmHWM) after resetting it through /proc/self/clear_refs.
"""
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import require_backend
from procmem import PRELUDE

import fastsce

N = 100_000_000  # float32: 400 MB per array

SCRIPT = PRELUDE + textwrap.dedent("""
    backend, grad, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])

    x = np.ones(n, np.float32)
    z = np.full(n, 0.25, np.float32)
    fastsce.sigmoid_cross_entropy(x[:1000], z[:1000], backend=backend, grad=grad)  # compile
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    loss, g = fastsce.sigmoid_cross_entropy(x, z, backend=backend, grad=grad)
    peak = status("VmHWM")
    print(json.dumps({"extra": peak - before, "loss": loss}))
""")


def _peak_extra(backend, grad):
    res = subprocess.run([sys.executable, "-c", SCRIPT, backend, "1" if grad else "0", str(N)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("grad", [True, False], ids=["mean+grad", "loss-only"])
def test_peak_memory_100M(fast_backend, grad):
    out = _peak_extra(fast_backend, grad)
    gradient = 4 * N
    limit = 1.05 * gradient if grad else 0.05 * gradient
    assert out["extra"] <= limit, (
        f"{fast_backend}: a mean{'+grad' if grad else ''} call on {N:,} float32 elements "
        f"used {out['extra'] / 2**20:.1f} MiB beyond its inputs; limit {limit / 2**20:.1f} MiB"
    )
    # The loss itself is right: every element has x = 1, z = 0.25.
    assert abs(out["loss"] - (math.log1p(math.e) - 0.25)) < 1e-6


BIG = 2**31 + 7

BROADCAST = PRELUDE + textwrap.dedent("""
    backend, n = sys.argv[1], int(sys.argv[2])

    x = np.broadcast_to(np.float32(0.3), (n,))      # zero strides: 8.6 G elements of view
    z = np.broadcast_to(np.float32(0.25), (n,))
    one = fastsce.sigmoid_cross_entropy(x[:1], z[:1], backend=backend, reduction="sum").loss
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    total = fastsce.sigmoid_cross_entropy(x, z, backend=backend, reduction="sum", grad=False)
    peak = status("VmHWM")
    print(json.dumps({"extra": peak - before, "sum": total.loss, "one": one}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_broadcast_beyond_int32(fast_backend):
    """2**31 + 7 elements of a zero-stride view: 64-bit indexing, no copy."""
    res = subprocess.run([sys.executable, "-c", BROADCAST, fast_backend, str(BIG)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["extra"] < 100 * 2**20, f"{out['extra'] / 2**20:.1f} MiB beyond the inputs"
    # every element has the same float32 loss; the float64 block sums are exact
    # and fsum rounds their total once
    assert out["sum"] == pytest.approx(BIG * out["one"], rel=1e-15)


# ------------------------------------------------------------------ failed allocations

HUGE = 2**40  # elements of zero-stride views: nothing is really allocated


def test_softmax_scratch_bound_uses_both_kernels_constants():
    """fastsce._memory bounds either kernel's softmax scratch from their constants."""
    from fastsce import _layout, _memory, _numba_softmax
    with open(os.path.join(os.path.dirname(fastsce.__file__), "..", "csrc",
                           "softmax_ce.c")) as f:
        source = f.read()
    c_chunk = int(source.split("#define CHUNK ")[1].split()[0])
    c_pad = int(source.split("#define BUF_STRIDE(tsz) ((tsz) + ")[1].split(")")[0])
    assert _memory.BUF_PAD == _numba_softmax.BUF_PAD == c_pad
    assert _memory.CHUNK_BYTES >= max(2 * _numba_softmax.CHUNK * 8, c_chunk * 16)
    with open(os.path.join(os.path.dirname(fastsce.__file__), "..", "csrc", "walk.h")) as f:
        c_stage = int(f.read().split("#define STRIDED_PIXELS ")[1].split()[0])
    assert _memory.STAGE_BYTES >= max(_numba_softmax.STRIDED_PIXELS, c_stage) * 8
    assert _memory.FIXED_BYTES >= _layout.BLOCK * 8 + 14 * _numba_softmax.CHUNK * 8


@pytest.mark.parametrize("what", ["gradient", "loss map", "softmax scratch"])
def test_failed_allocation_names_array_and_size(backend, what):
    x = np.broadcast_to(np.float32(0.5), (1, HUGE, 1))
    if what == "gradient":
        call, kw, need = fastsce.sigmoid_cross_entropy, {}, 4 * HUGE
    elif what == "loss map":
        call, kw, need = fastsce.sigmoid_cross_entropy, dict(grad=False, reduction="none"), \
            4 * HUGE
    else:
        if backend == "numpy":
            pytest.skip("the reference has no scratch (its temporaries: tests/bad_inputs.py)")
        call, kw, need = fastsce.softmax_cross_entropy, dict(grad=False), None
    with pytest.raises(MemoryError) as info:
        call(x, x, backend=backend, **kw)
    msg = str(info.value)
    assert what.split()[-1] in msg and re.search(r"\d\.\d [TPE]iB \([\d,]+ bytes\)", msg), msg
    if need is not None:
        assert f"{need:,} bytes" in msg and "4.0 TiB" in msg, msg


def test_broadcast_operands_are_converted_without_expanding(fast_backend):
    """float32 weights for float64 logits, int32 labels: only distinct values copied."""
    x = np.broadcast_to(np.float64(0.3), (HUGE,))
    w = np.broadcast_to(np.float32(2.0), (HUGE,))
    with pytest.raises(MemoryError, match="the gradient"):  # reached past the weight
        fastsce.sigmoid_cross_entropy(x, x, weight=w, backend=fast_backend)
    labels = np.broadcast_to(np.int32(1), (HUGE,))
    with pytest.raises(MemoryError, match="the gradient"):
        fastsce.softmax_cross_entropy(np.broadcast_to(np.float64(0), (HUGE, 2)), labels,
                                      axis=1, backend=fast_backend)


# ------------------------------------------------------------------ nothing to compute

ZERO_SIZE = [(0,), (3, 0), (0, 4, 5), (2, 0, 6)]


@pytest.mark.parametrize("shape", [()] + ZERO_SIZE, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_size_and_0d_binary(backend, shape, reduction):
    """Every reduction and grouping of a 0-d or empty map: mean of nothing is NaN
    (SPEC §1.4), a sum 0, maps and gradients empty; every option accepted."""
    x = np.zeros(shape, np.float32)
    z = np.full(shape, 0.5, np.float32)
    opts = dict(weight=np.ones(shape[-1:], np.float32), mask=np.ones(shape, bool),
                pos_weight=2.0, label_smoothing=0.1, grad_scale=2.0, num_threads=3)
    groupings = [{}]
    if reduction != "none":
        groupings += [dict(reduce_axes=tuple(range(len(shape))))]
        groupings += [dict(tile_shape=(2, 3))] if len(shape) >= 2 else []
    for grouping in groupings:
        out = np.full(shape, 7.0, np.float32)
        res = fastsce.sigmoid_cross_entropy(x, z, reduction=reduction, out=out,
                                            backend=backend, **opts, **grouping)
        assert res.grad is out and res.grad.shape == shape
        _check_nothing(res.loss, shape, reduction, grouping)


@pytest.mark.parametrize("shape,axis", [((3,), 0), ((0, 3), 1), ((2, 3, 0, 4), 1),
                                        ((0, 5, 2), -1)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_size_softmax(backend, shape, axis, reduction):
    x = np.zeros(shape, np.float64)
    pixels = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]
    C = shape[axis]
    for targets in (np.full(shape, 1 / C), np.zeros(pixels, np.int64)):
        kw = dict(class_weights=np.ones(C), mask=np.ones(pixels, bool), label_smoothing=0.2)
        if targets.dtype.kind == "i":
            kw["ignore_value"] = -1
        res = fastsce.softmax_cross_entropy(x, targets, axis=axis, reduction=reduction,
                                            backend=backend, **kw)
        assert res.grad.shape == shape
        _check_nothing(res.loss, pixels, reduction, {}, value=np.log(C))


def _check_nothing(loss, shape, reduction, grouping, value=None):
    """The loss of a 0-d map (one element) or an empty one."""
    n = math.prod(shape)
    if reduction == "none":
        assert loss.shape == shape
        return
    if grouping:
        loss = np.asarray(loss)
        assert isinstance(loss, np.ndarray)
        if n == 0 and loss.size:
            assert np.isnan(loss).all() if reduction == "mean" else (loss == 0).all()
        return
    assert isinstance(loss, float)
    if n == 0:
        assert np.isnan(loss) if reduction == "mean" else loss == 0.0
    elif value is not None:
        assert loss == pytest.approx(value * (n if reduction == "sum" else 1))


# ------------------------------------------------------------------ kept scratch

def _scratch_cases():
    """Calls whose scratch differs in size and content: a 3-class softmax, a
    150-class one (bigger), a 5000-class one (past what a thread keeps: per
    call), and a binary loss with weights (neutral buffers of ones)."""
    rng = np.random.default_rng(5)
    cases = []
    for shape, axis in [((2, 3, 64, 64), 1), ((1, 150, 32, 32), 1), ((16, 5000), -1)]:
        x = rng.standard_normal(shape).astype(np.float32) * 4
        z = rng.random(shape).astype(np.float32)
        cases.append(lambda be, x=x, z=z, axis=axis, t=1: fastsce.softmax_cross_entropy(
            x, z, axis=axis, backend=be, num_threads=t))
    xb = rng.standard_normal((300, 301)).astype(np.float32)
    zb = rng.random(xb.shape).astype(np.float32)
    cases.append(lambda be, t=1: fastsce.sigmoid_cross_entropy(
        xb, zb, weight=np.float32(2.0), backend=be, num_threads=t))
    return cases


def test_scratch_kept_across_calls_kernels_and_threads(fast_backend):
    """Calls of other sizes and kernels on the same thread, in both orders, on
    threads that start and exit, and at 2 threads give bitwise the first
    results: in C a thread keeps its scratch between calls (csrc/scratch.c);
    Numba allocates per block (or piece of one), and must agree all the same."""
    cases = _scratch_cases()
    first = [case(fast_backend) for case in cases]

    def same(i, result):
        assert result.loss == first[i].loss and np.array_equal(result.grad, first[i].grad), i

    for order in (range(len(cases)), reversed(range(len(cases)))):
        for i in order:
            same(i, cases[i](fast_backend))
            same(i, cases[i](fast_backend, t=2))
    errors = []

    def worker(i):
        try:
            same(i, cases[i](fast_backend))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    for _ in range(3):       # short-lived threads: a kept scratch is freed at exit
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import fastsce

    threads = int(sys.argv[1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 21, 64, 64), dtype=np.float32)
    z = rng.random(x.shape, dtype=np.float32)
    out = np.empty_like(x)    # the gradient's own pages are not the kernel's
    call = lambda: fastsce.softmax_cross_entropy(x, z, backend="c", num_threads=threads, out=out)
    for _ in range(20):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        call()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, Linux")
@pytest.mark.parametrize("threads", [1, 2])
def test_c_scratch_is_not_refaulted_per_call(threads):
    """A small softmax call, after warm-up, touches no fresh pages. Its
    scratch (a few hundred KB) used to be malloc'ed and freed per call, and
    came back as fresh pages whenever the allocator had unmapped or trimmed
    it, which depends on the heap's history (forced here by mapping every
    block of 64 KiB or more): about 130 first-touch faults, 0.4 ms of a
    1.0 ms call. Kept per thread (csrc/scratch.c), none."""
    require_backend("c")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", FAULTS, str(threads)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    faults = float(res.stdout.strip().splitlines()[-1])
    assert faults < 10, f"{faults} minor page faults per call"
