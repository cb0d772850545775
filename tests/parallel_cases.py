"""Scenarios that test_concurrency.py runs in a fresh Python process each, so
that an abort or a hang fails one test (with its output) instead of pytest.

    python tests/parallel_cases.py threads
    python tests/parallel_cases.py fork BACKEND

The layer is whatever NUMBA_THREADING_LAYER asks for. Each prints a JSON
summary on its last line and exits non-zero on any mismatch or hang.
"""
import hashlib
import json
import multiprocessing
import queue
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import fastsce

THREADS = 8
CALLS_PER_THREAD = 40
CHILD_TIMEOUT = 60   # seconds: a hung child fails the scenario instead of CI
BACKENDS = ("c", "numba")
LOSSES = ("sigmoid", "softmax")


def _inputs(loss, dtype, seed):
    """Logits and soft targets big enough for several blocks (so, threads)."""
    rng = np.random.default_rng(seed)
    shape = (2, 5, 128, 128) if loss == "softmax" else (4, 64, 1024)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    z = rng.random(shape).astype(dtype)
    if loss == "softmax":
        z /= z.sum(axis=1, keepdims=True)
    return x, z


def compute(loss, backend, dtype, num_threads, reduction="mean", seed=0):
    """Digest of one call's loss and gradient bytes: equal means bitwise equal."""
    x, z = _inputs(loss, np.dtype(dtype), seed)
    fn = fastsce.sigmoid_cross_entropy if loss == "sigmoid" else fastsce.softmax_cross_entropy
    loss_value, grad = fn(x, z, backend=backend, num_threads=num_threads, reduction=reduction)
    return hashlib.sha256(np.asarray(loss_value).tobytes() + grad.tobytes()).hexdigest()


def threads():
    """THREADS Python threads, each making many calls of every kind at once."""
    cases = [(loss, backend, dtype, nt, reduction)
             for loss in LOSSES for backend in BACKENDS
             for dtype in ("float32", "float64") for nt in (1, 2, 3)
             for reduction in (("mean", "none") if nt == 2 else ("mean",))]
    serial = [compute(*case) for case in cases]

    def worker(k):
        wrong = []
        for i in range(CALLS_PER_THREAD):
            j = (k * 7 + i * 5) % len(cases)   # each thread walks the cases in its own order
            if compute(*cases[j]) != serial[j]:
                wrong.append(cases[j])
        return wrong

    with ThreadPoolExecutor(THREADS) as pool:
        wrong = [case for found in pool.map(worker, range(THREADS)) for case in found]
    return {"calls": THREADS * CALLS_PER_THREAD, "cases": len(cases), "wrong": wrong,
            "layer": fastsce.info()["numba_threading_layer"]}, not wrong


def _child(results):
    # Both backends, whichever ran in the parent: C's OpenMP pool poisons
    # Numba's omp layer in the child too (one libgomp), and the reverse.
    info = fastsce.info()
    got = {(b, loss): compute(loss, b, "float32", 2) for b in BACKENDS for loss in LOSSES}
    results.put({**got, "forked_after_openmp": info["forked_after_openmp"],
                 "num_threads": info["num_threads"]})


def _in_child(method):
    """What a child started by `method` computes, or None if it hung or died."""
    ctx = multiprocessing.get_context(method)
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(results,))
    proc.start()
    try:
        got = results.get(timeout=CHILD_TIMEOUT)
    except queue.Empty:
        got = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return got if proc.exitcode == 0 else None


def fork(backend):
    """Children by fork before and after a 2-thread call of `backend`, by
    spawn and by forkserver; the other backend runs in the parent last."""
    results = {"fork before any call": _in_child("fork")}
    expected = {(backend, loss): compute(loss, backend, "float32", 2) for loss in LOSSES}
    for method in ("fork", "spawn", "forkserver"):
        results[method] = _in_child(method)
    info = fastsce.info()
    # The C kernels' OpenMP pool, or Numba's omp layer, ran in this process:
    # a fork now leaves a child that must run on one thread.
    openmp_ran = info["openmp"] if backend == "c" else info["numba_threading_layer"] == "omp"
    expected.update({(b, loss): compute(loss, b, "float32", 2)
                     for b in BACKENDS if b != backend for loss in LOSSES})
    summary, ok = {"layer": info["numba_threading_layer"]}, True
    for name, got in results.items():
        after_openmp = name == "fork" and openmp_ran
        good = (got is not None and all(got[k] == expected[k] for k in expected)
                and got["forked_after_openmp"] == after_openmp
                and got["num_threads"] == (1 if after_openmp else info["num_threads"]))
        summary[name] = "ok" if good else "hung or died" if got is None else {
            str(k): got[k] == expected[k] if k in expected else got[k] for k in got}
        ok = ok and good
    return summary, ok


if __name__ == "__main__":
    summary, ok = threads() if sys.argv[1] == "threads" else fork(sys.argv[2])
    print(json.dumps(summary, default=str))
    sys.exit(0 if ok else 1)
