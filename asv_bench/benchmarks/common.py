"""Shared set-up: data, backends as a parameter, peers as values of it."""
import numpy as np

import fastsce

#: fastsce's fast backends, its reference, and peers, in one parameter so one
#: table compares them. A missing one raises NotImplementedError (asv: n/a).
BACKENDS = ["c", "numba", "numpy-peer", "pytorch"]


def binary_data(n, dtype, tdtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 3).astype(dtype)
    if tdtype == np.uint8:
        z = rng.integers(0, 256, n, dtype=np.uint8)
    else:
        z = rng.random(n).astype(tdtype)
    return x, z


def softmax_data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    z = rng.random(shape).astype(dtype)
    z /= z.sum(axis=axis, keepdims=True)
    return x, z


def require(backend):
    """Skip (asv shows n/a) when a backend or peer is not installed."""
    if backend in ("c", "numba", "numpy"):
        if not fastsce.info()["backends"][backend]["available"]:
            raise NotImplementedError(backend)
    elif backend == "pytorch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("pytorch not installed") from None


def runner(kind, backend, x, z, grad=True, axis=1):
    """A zero-argument callable computing loss (+ gradient) with `backend`."""
    require(backend)
    if backend in ("c", "numba", "numpy"):
        out = np.empty_like(x) if grad else None
        if kind == "binary":
            fastsce.sigmoid_cross_entropy(x, z, backend=backend, grad=grad, out=out)
            return lambda: fastsce.sigmoid_cross_entropy(x, z, backend=backend, grad=grad, out=out)
        fastsce.softmax_cross_entropy(x, z, axis=axis, backend=backend, out=out)
        return lambda: fastsce.softmax_cross_entropy(x, z, axis=axis, backend=backend, out=out)
    from fastsce import _bench

    wl = _bench.Workload("asv", "", kind, x.shape, tdtype=z.dtype.type, grad=grad, axis=axis)
    if backend == "numpy-peer":
        return _bench._numpy_runner(wl, x, z)
    fn, _ = _bench._torch_runner(wl, x, z)
    return fn
