"""Maps of fewer blocks than threads: threads share each block in pieces
(csrc/walk.h's parallel_blocks, the Numba drivers' piece_range). Whatever the
thread count, the results must be bitwise those of one thread taking every
block whole: the same losses summed in the same order, the same counts and
the same first bad target."""
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest

import fastsce
from conftest import require_backend
from fastsce._layout import BLOCK
from fastsce._numba_kernels import block_pieces

THREADS = (2, 3, 5, 8)
# pieces of 64-element steps: empty ones, ragged ends, one or two blocks
SIZES = (1, 63, 65, 129, 1000, 4097, BLOCK - 1, BLOCK + 700)


def sigmoid(x, z, **kw):
    return fastsce.sigmoid_cross_entropy(x, z, **kw)


def softmax(x, z, **kw):
    return fastsce.softmax_cross_entropy(x, z, axis=1, **kw)


def assert_bitwise(got, want, what):
    np.testing.assert_array_equal(np.asarray(got.loss), np.asarray(want.loss), err_msg=what)
    np.testing.assert_array_equal(got.grad, want.grad, err_msg=what)


def in_place(x, z, **kw):
    """The gradient written over a copy of x (its pre-pass: a walk that only
    counts and checks)."""
    g = x.copy()
    return sigmoid(g, z, out=g, **kw)


def per_thread_count(f, x, z, **kw):
    """f's results at 1 thread, and each of THREADS' results against them."""
    one = f(x, z, num_threads=1, **kw)
    for t in THREADS:
        assert_bitwise(f(x, z, num_threads=t, **kw), one, f"threads={t}")
    return one


def test_block_pieces(monkeypatch):
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 64)
    assert block_pieces(0, 8) == 1
    assert block_pieces(1, 1) == 1
    assert block_pieces(1, 2) == 2
    assert block_pieces(2, 3) == 3      # 6 pieces, 2 per thread (not 2 and 0)
    assert block_pieces(2, 4) == 2
    assert block_pieces(3, 8) == 8
    assert block_pieces(5, 5) == 1
    assert block_pieces(9, 2) == 1
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)   # as many as Numba runs
    assert block_pieces(1, 8) == 1


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_sigmoid_small_maps(fast_backend, n, dtype):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 8).astype(dtype)
    z = rng.random(n).astype(dtype)
    w = rng.random(n).astype(dtype)
    m = rng.random(n) < 0.7
    kw = dict(backend=fast_backend)
    for red in ("mean", "sum", "none"):
        one = per_thread_count(sigmoid, x, z, weight=w, mask=m, reduction=red, **kw)
        ref = sigmoid(x, z, weight=w, mask=m, reduction=red, backend="numpy")
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(one.loss, ref.loss, rtol=tol, atol=0)
    # rows gathered into scratch (a stepped view) and an in-place gradient
    # (its pre-pass counts and checks, a walk without losses)
    wide = np.repeat(x, 3)
    per_thread_count(sigmoid, wide[::3], z, **kw)
    per_thread_count(in_place, x, z, mask=m, **kw)


@pytest.mark.parametrize("n", SIZES)
def test_softmax_small_maps(fast_backend, n):
    rng = np.random.default_rng(n)
    C = 5
    x = (rng.standard_normal((1, C, n)) * 6).astype(np.float32)
    z = rng.random((1, C, n)).astype(np.float32)
    z /= z.sum(axis=1, keepdims=True)
    w = rng.random((1, n)).astype(np.float32)
    m = rng.random((1, n)) < 0.7
    kw = dict(backend=fast_backend)
    for red in ("mean", "none"):
        one = per_thread_count(softmax, x, z, weight=w, mask=m, reduction=red, **kw)
        ref = softmax(x, z, weight=w, mask=m, reduction=red, backend="numpy")
        np.testing.assert_allclose(one.loss, ref.loss, rtol=1e-5, atol=0)
    # pixel-major (NHWC) tiles, gathered; hard labels
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    per_thread_count(lambda x, z, **k: fastsce.softmax_cross_entropy(x, z, axis=-1, **k),
                     nhwc, np.ascontiguousarray(np.moveaxis(z, 1, -1)), **kw)
    labels = rng.integers(0, C, (1, n))
    per_thread_count(softmax, x, labels, **kw)


def test_groups_fewer_than_threads(fast_backend):
    # two images of one block each, on up to 8 threads: pieces of both
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 40, 41)) * 4).astype(np.float32)
    z = rng.random((2, 3, 40, 41)).astype(np.float32)
    m = rng.random((2, 40, 41)) < 0.6
    one = per_thread_count(sigmoid, x, z, mask=m[:, None], reduce_axes=(1, 2, 3),
                           backend=fast_backend)
    ref = sigmoid(x, z, mask=m[:, None], reduce_axes=(1, 2, 3), backend="numpy")
    np.testing.assert_allclose(one.loss, ref.loss, rtol=1e-5, atol=0)
    z /= z.sum(axis=1, keepdims=True)
    one = per_thread_count(softmax, x, z, mask=m, reduce_axes=(1, 2), backend=fast_backend)
    ref = softmax(x, z, mask=m, reduce_axes=(1, 2), backend="numpy")
    np.testing.assert_allclose(one.loss, ref.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n, bad", [(5000, [2000, 4801, 4999]),
                                    (BLOCK + 700, [BLOCK + 300, BLOCK + 600])],
                         ids=["one-block", "second-block"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_first_bad_target_in_a_later_piece(fast_backend, kind, n, bad):
    # bad targets in two or more pieces, after the first piece or block: each
    # thread count names the same first one, and counts them all
    rng = np.random.default_rng(4)
    values = [1.5, -0.5, np.nan][:len(bad)]
    if kind == "sigmoid":
        x, z = rng.standard_normal(n), rng.random(n)
        z[bad] = values
        f = sigmoid
    else:
        x, z = rng.standard_normal((1, 3, n)), np.full((1, 3, n), 1 / 3)
        z[0, 1, bad] = values
        f = softmax
    messages = set()
    for t in (1,) + THREADS:
        with pytest.raises(fastsce.TargetRangeError) as info:
            f(x, z, backend=fast_backend, num_threads=t)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    msg = messages.pop()
    assert re.search(rf"\b{bad[0]}\b", msg) and f"found {len(bad)} value" in msg, msg


SMALLER_TEAM = """
import numpy as np, fastsce
rng = np.random.default_rng(5)
for n in (3000, fastsce.BLOCK + 5):
    x = rng.standard_normal((1, 4, n)).astype(np.float32)
    z = rng.random((1, 4, n)).astype(np.float32)
    z /= z.sum(axis=1, keepdims=True)
    for f in (fastsce.sigmoid_cross_entropy, fastsce.softmax_cross_entropy):
        one = f(x, z, backend="c", num_threads=1)
        many = f(x, z, backend="c", num_threads=8)
        assert one.loss == many.loss and np.array_equal(one.grad, many.grad), (n, f)
print("ok")
"""


@pytest.mark.parametrize("limit", ["1", "2", "3"])
def test_openmp_team_smaller_than_asked(limit):
    # OpenMP may run fewer threads than asked: the C walk cuts pieces for the
    # team it got (3 threads: 3 pieces of 1 block; 2 on 2 blocks: whole ones)
    require_backend("c")
    env = dict(os.environ, OMP_THREAD_LIMIT=limit)
    done = subprocess.run([sys.executable, "-c", SMALLER_TEAM], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
