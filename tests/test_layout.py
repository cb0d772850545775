"""The plan's flat views (`_layout._flat_view`): every element of an operand
is at flat[offset + sum(index * stride)], for dense arrays in any axis order
(viewed by ravel) and for any other strides (viewed by as_strided), without
a copy, writable only when asked, a plain 1-D ndarray for any subclass."""
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastsce
from fastsce import _layout


@st.composite
def strided_arrays(draw):
    """A view of a fresh array: axes permuted, stepped, reversed, broadcast or size 1."""
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=4)))
    base = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
    a = base.transpose(draw(st.permutations(range(base.ndim))))
    index = []
    for n in a.shape:
        step = draw(st.sampled_from([1, 1, 2, -1]))
        index.append(slice(None, None, step))
    a = a[tuple(index) + (Ellipsis,)]  # (a 0-d view, not a scalar, for no axes)
    if a.ndim and draw(st.booleans()):  # a zero-stride axis, as a broadcast operand has
        a = np.broadcast_to(a[..., :1], a.shape)
    return a


def _check(a, writeable):
    strides = _layout._element_strides(a)
    flat, offset = _layout._flat_view(a, strides, writeable)
    assert flat.ndim == 1 and np.shares_memory(flat, a)
    assert flat.flags.writeable == (writeable and a.flags.writeable)
    for idx in itertools.product(*(range(n) for n in a.shape)):
        assert flat[offset + sum(i * s for i, s in zip(idx, strides))] == a[idx]
    span = sum((n - 1) * abs(s) for n, s in zip(a.shape, strides)) + 1
    assert flat.size == span
    return flat


@given(strided_arrays(), st.booleans())
def test_flat_view_reaches_every_element(a, writeable):
    _check(a, writeable)


def test_dense_views_by_ravel_are_exact():
    """C, F and moved-axis arrays (the ravel path) and the cases it must refuse."""
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    for a in (x, np.asfortranarray(x), np.moveaxis(x, 0, -1), x[1:], x[:1, :1], x.reshape(-1)):
        assert _layout._dense(a.shape, _layout._element_strides(a))
        _check(a, False)
    for a in (x[:, ::2], x[::-1], x[:, :1], x[:, :1, :1], np.broadcast_to(x[:1], x.shape),
              np.lib.stride_tricks.as_strided(x, (2, 2, 2), (8, 8, 40))):
        assert not _layout._dense(a.shape, _layout._element_strides(a))
    own = x.reshape(-1)
    flat = _check(own, False)
    assert own.flags.writeable and not flat.flags.writeable  # the caller's flag untouched


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_subclass_outputs_are_viewed_as_plain_arrays():
    """An np.matrix or np.memmap `out=` gets a 1-D plain ndarray view (a matrix's
    ravel stays 2-D), and both backends write the same gradient into it."""
    m = np.matrix(np.zeros((3, 4), np.float32))
    flat, offset = _layout._flat_view(m, _layout._element_strides(m), True)
    assert type(flat) is np.ndarray and flat.shape == (12,) and offset == 0
    assert np.shares_memory(flat, m) and flat.flags.writeable


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kind", ["matrix", "memmap"])
def test_subclass_out_gets_the_gradient(fast_backend, kind, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    z = rng.random((5, 7)).astype(np.float32)
    want = fastsce.sigmoid_cross_entropy(x, z, backend=fast_backend)
    if kind == "matrix":
        out = np.matrix(np.full(x.shape, np.nan, np.float32))
    else:
        out = np.memmap(tmp_path / "g.bin", np.float32, "w+", shape=x.shape)
    got = fastsce.sigmoid_cross_entropy(x, z, backend=fast_backend, out=out)
    assert got.loss == want.loss
    np.testing.assert_array_equal(np.asarray(out), want.grad)
