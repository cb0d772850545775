"""`fastsce bench`: every fast backend beside its peers and the roofline, in one run.

For each workload it times fastsce's Numba and C kernels, a plain NumPy
implementation, PyTorch (forward + backward) and JAX (jit value_and_grad)
when installed, and a kernel that only moves the same bytes (the roofline),
at 1 thread and at all threads, and prints elements/s, GB/s, the fraction of
the roofline and the speed-up over each peer. Times are medians of repeats
(the machines are shared and noisy: compare ratios within one run).
"""
import json
import sys
import time

import numpy as np

from . import _backends, sigmoid_cross_entropy, softmax_cross_entropy
from ._threads import available_cpus


def _median(fn, repeat):
    fn()  # warm up: JIT compilation, page faults of fresh buffers
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class Workload:
    def __init__(self, name, title, kind, shape, tdtype=np.float32, grad=True, axis=1):
        self.name, self.title, self.kind = name, title, kind
        self.shape, self.tdtype, self.grad, self.axis = shape, tdtype, grad, axis

    def data(self, rng):
        x = rng.standard_normal(self.shape, dtype=np.float32) * 3
        if self.kind == "binary":
            if self.tdtype == np.uint8:
                z = rng.integers(0, 256, self.shape, dtype=np.uint8)
            else:
                z = rng.random(self.shape, dtype=np.float32)
        else:
            z = rng.random(self.shape, dtype=np.float32)
            z /= z.sum(axis=self.axis, keepdims=True)
        return x, z

    def bytes_per_element(self):
        t = np.dtype(self.tdtype).itemsize
        return 4 + t + (4 if self.grad else 0)


def workloads(scale=1.0):
    n = max(1, int((1 << 26) * scale))
    side = max(8, int(512 * scale ** 0.5))
    return [
        Workload("W1", f"binary f32, {n:,} elements, mean + grad", "binary", (n,)),
        Workload("W1L", f"binary f32, {n:,} elements, loss only", "binary", (n,), grad=False),
        Workload("W2", f"binary, uint8 targets, {n:,} elements, mean + grad", "binary", (n,),
                 tdtype=np.uint8),
        Workload("W3", f"softmax (2, 21, {side}, {side}) NCHW, mean + grad", "softmax",
                 (2, 21, side, side)),
        Workload("W4", f"softmax (2, {side}, {side}, 21) NHWC, mean + grad", "softmax",
                 (2, side, side, 21), axis=-1),
    ]


def _fastsce_runner(wl, backend, x, z, threads):
    out = np.empty_like(x) if wl.grad else None
    if wl.kind == "binary":
        return lambda: sigmoid_cross_entropy(x, z, backend=backend, grad=wl.grad, out=out,
                                             num_threads=threads)
    return lambda: softmax_cross_entropy(x, z, axis=wl.axis, backend=backend, out=out,
                                         num_threads=threads)


def _numpy_runner(wl, x, z):
    """What a careful NumPy user writes: stable formulas, float32, whole arrays."""
    zf = z.astype(np.float32) / 255 if z.dtype == np.uint8 else z

    def binary():
        loss = np.logaddexp(np.float32(0), x) - zf * x
        g = (1 / (1 + np.exp(-x)) - zf) / x.size if wl.grad else None
        return float(loss.mean(dtype=np.float64)), g

    def softmax():
        m = x.max(axis=wl.axis, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=wl.axis, keepdims=True)
        logp = x - m - np.log(s)
        loss = -(zf * logp).sum(axis=wl.axis)
        g = (zf.sum(axis=wl.axis, keepdims=True) * e / s - zf) / loss.size
        return float(loss.mean(dtype=np.float64)), g

    return binary if wl.kind == "binary" else softmax


def _torch_runner(wl, x, z):
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x)
    zt = torch.from_numpy(z.astype(np.float32) / 255 if z.dtype == np.uint8 else z)
    axis = wl.axis % x.ndim

    def run():
        xg = xt.detach().requires_grad_(wl.grad)
        if wl.kind == "binary":
            loss = F.binary_cross_entropy_with_logits(xg, zt)
        else:
            xm = xg if axis == 1 else xg.movedim(axis, 1)
            zm = zt if axis == 1 else zt.movedim(axis, 1)
            loss = F.cross_entropy(xm, zm)
        if wl.grad:
            loss.backward()
        return float(loss.detach())

    return run, torch


def _jax_runner(wl, x, z):
    import jax
    import jax.numpy as jnp

    zf = z.astype(np.float32) / 255 if z.dtype == np.uint8 else z

    def loss_fn(xx, zz):
        if wl.kind == "binary":
            return jnp.mean(jax.nn.softplus(xx) - zz * xx)
        return jnp.mean(-(zz * jax.nn.log_softmax(xx, axis=wl.axis)).sum(axis=wl.axis))

    f = jax.jit(jax.value_and_grad(loss_fn) if wl.grad else loss_fn)
    xj, zj = jnp.asarray(x), jnp.asarray(zf)
    return lambda: jax.block_until_ready(f(xj, zj))


def _roofline_runner(wl, x, z, threads):
    import numba

    from . import _roofline

    a, b = x.reshape(-1), np.ascontiguousarray(z).reshape(-1)
    out = np.empty_like(a)

    def run():
        saved = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            if wl.grad:
                return _roofline.read2_write1(a, b, out)
            return _roofline.read2(a, b)
        finally:
            numba.set_num_threads(saved)

    return run


def run(scale=1.0, repeat=5, threads=None, names=None, peers=True, stream=sys.stdout):
    rng = np.random.default_rng(0)
    thread_counts = sorted({1, threads or available_cpus()})
    results = []
    for wl in workloads(scale):
        if names and wl.name not in names:
            continue
        x, z = wl.data(rng)
        n = x.size
        print(f"\n{wl.name}: {wl.title}", file=stream)
        for nt in thread_counts:
            row = {"workload": wl.name, "threads": nt, "elements": n,
                   "bytes_per_element": wl.bytes_per_element(), "seconds": {}, "skipped": {}}
            contenders = {}
            for name in ("numba", "c"):
                if _backends.BACKENDS[name].available:
                    contenders[name] = _fastsce_runner(wl, name, x, z, nt)
                else:
                    row["skipped"][name] = _backends.BACKENDS[name].reason
            if _backends.BACKENDS["numba"].available:
                contenders["roofline"] = _roofline_runner(wl, x, z, nt)
            if peers:
                contenders["numpy"] = _numpy_runner(wl, x, z)
                try:
                    fn, torch = _torch_runner(wl, x, z)
                    torch.set_num_threads(nt)
                    contenders["pytorch"] = fn
                except ImportError as exc:
                    row["skipped"]["pytorch"] = str(exc)
                try:
                    contenders["jax"] = _jax_runner(wl, x, z)
                except ImportError as exc:
                    row["skipped"]["jax"] = str(exc)
            for name, fn in contenders.items():
                row["seconds"][name] = _median(fn, 3 if name in ("numpy", "jax") else repeat)
            results.append(row)
            _print_row(row, stream)
    return results


def _print_row(row, stream):
    n, bpe, sec = row["elements"], row["bytes_per_element"], row["seconds"]
    roof = sec.get("roofline")
    peers = [p for p in ("numpy", "pytorch", "jax") if p in sec]
    print(f"  threads={row['threads']}", file=stream)
    print(f"    {'':10} {'Gelem/s':>8} {'GB/s':>7} {'of roofline':>12} "
          + " ".join(f"{'x ' + p:>10}" for p in peers), file=stream)
    for name, s in sec.items():
        rate = n / s
        frac = f"{roof / s:12.2f}" if roof else f"{'-':>12}"
        speed = " ".join(f"{sec[p] / s:10.1f}" for p in peers)
        print(f"    {name:10} {rate / 1e9:8.3f} {rate * bpe / 1e9:7.2f} {frac} {speed}",
              file=stream)
    for name, why in row["skipped"].items():
        print(f"    {name:10} skipped: {why}", file=stream)


def main(args):
    results = run(scale=args.scale, repeat=args.repeat, threads=args.threads,
                  names=set(args.workloads) if args.workloads else None, peers=not args.no_peers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0
