"""Numba backend, multiclass: fused softmax cross-entropy (twin of csrc/softmax_ce.c).

Design
------
* Pixels are walked like the binary loss's elements (`_layout`, C order over
  the pixel shape); the class axis is a stride. Rows are cut into tiles of
  `softmax_tile(C)` pixels. A tile whose pixels are not contiguous (NHWC) is
  gathered into a [C][tile] scratch first, so every layout runs the same
  class-outer, pixel-inner loops: they vectorize across pixels, and NCHW and
  NHWC give bitwise the same numbers.
* Per tile, four passes over data in cache: (1) max over classes and the
  first class reaching it; (2) exp(x - m) (with the rounding of x - m put
  back, TwoSum) and the per-pixel float64 sums r = sum of the other classes'
  exps, W = sum w z, A = sum w z (m - x); (3) the per-pixel loss
  A + W log1p(r), every term non-negative, so full relative precision even
  for a dominant class; (4) the gradient W e / (1 + r) - w z. Each logit and target is
  read from memory once, each gradient element written once.
* Blocks of BLOCK pixels; each block keeps its pixel losses in a buffer and
  sums it in one fixed loop, so the total does not depend on how rows were
  cut into tiles (layout) or on the thread count.
"""
import functools

import numpy as np
from numba import prange

from . import _numba_math as M
from ._numba_math import jit
from ._numba_kernels import (_ACC, _EXACT, _EXP_SCALED, _MATH, _OPTS, _out, _scatter, _scratch,
                              _view, block_range, row_offsets)
from ._reference import DENOM_FLOOR, LOG_CLAMP

_TWO_M64 = 2.0 ** -64


@functools.lru_cache(maxsize=None)
def _tile(from_logits, divergence, hard, ftype):
    """Loss and gradient of n pixels; x, z, g as (array, offset, class stride)."""
    _, _, log = _MATH[ftype]
    exp_scaled, I = _EXP_SCALED[ftype]
    F = ftype
    key = f"{from_logits}-{divergence}-{hard}-{ftype.__name__}"
    single = ftype is np.float32
    zero, one = F(0.0), F(1.0)
    clamp, floor = F(LOG_CLAMP), F(DENOM_FLOOR)

    @jit(key, **_EXACT)
    def target(z, zo, zcs, k, p, inv, keep, shift):
        """z_k of pixel p, scaled and smoothed."""
        if hard:
            return (keep if z[p] == k else zero) + shift
        return F(z[zo + k * zcs + p]) * inv * keep + shift

    @jit(key, **_EXACT)
    def class_terms(v, mx, zv, cwk):
        """(e, e as float64, w z, w z (m - x), w z log z) of one class."""
        wz = cwk * zv
        e = zero
        e64 = 0.0
        if from_logits:
            d = zero if v == mx else v - mx       # x = m = +inf: the limit, d = 0
            # TwoSum: err is what rounding x - m lost; exp(d + err) = e (1 + err)
            # keeps a far-below-max class's probability to the last bits.
            bb = d - v
            err = (v - (d - bb)) + (-mx - bb)
            err = err if err == err else zero
            # A float32 exp below ~e^-87 is subnormal and loses bits; take it
            # 2^64 larger for the float64 sum and scale only the stored value.
            low = single and d < F(-80.0)
            e = exp_scaled(d, I(64) if low else I(0))
            e = e + e * err
            e64 = np.float64(e) * (_TWO_M64 if low else 1.0)
            e = e * F(_TWO_M64) if low else e
            a = zero if wz == zero else wz * -d
        else:
            lc = log(v)
            lc = clamp if lc < clamp else lc
            a = zero if wz == zero else -(wz * lc)
        h = zero
        if divergence:
            h = zero if wz == zero else wz * log(zv)
        return e, e64, wz, a, h

    @jit(key, **_EXACT)
    def class_grad(v, ev, wf, isf, wz, fac):
        if from_logits:
            return (wf * (ev * isf) - wz) * fac
        den = v if v > floor else floor
        return (-wz / den) * fac

    @jit(key, **_EXACT)
    def log1p_pos(r):
        """log1p(r) for r >= 0 in float64."""
        return M.log1p_unit_f64(r)[0] if r <= 1.0 else M.log_f64(1.0 + r)

    @jit(key, fastmath=False, **_OPTS)   # its sums are per pixel, not reductions
    def tile(x, xo, xcs, z, zo, zcs, w, m, g, go, gcs, l, n, C, cw, scale, eps, ignore,
             gs, e, tsz, mx, am, s, W, A, H, valid, lbuf, lo):
        sc = F(scale)
        inv = F(1.0 / scale)
        keep = F(1.0 - eps)
        shift = F(eps / C)
        # (1) max over classes and its first class
        for p in range(n):
            am[p] = 0
        if from_logits:
            for p in range(n):
                mx[p] = x[xo + p]
            for k in range(1, C):
                xk = x[xo + k * xcs: xo + k * xcs + n]
                for p in range(n):
                    up = xk[p] > mx[p]
                    mx[p] = xk[p] if up else mx[p]
                    am[p] = k if up else am[p]
        # (2) per-class terms, summed per pixel in float64; s sums the classes
        # other than the first max (whose exp is 1), so log(1 + s) = log1p(s).
        for p in range(n):
            s[p] = 0.0
            W[p] = 0.0
            A[p] = 0.0
            H[p] = 0.0
        for k in range(C):
            xk = x[xo + k * xcs: xo + k * xcs + n]
            ek = e[k * tsz: k * tsz + n]
            cwk = one if cw is None else cw[k]
            for p in range(n):
                zv = target(z, zo, zcs, k, p, inv, keep, shift)
                ev, e64, wz, a, h = class_terms(xk[p], mx[p], zv, cwk)
                ek[p] = ev
                s[p] += 0.0 if k == am[p] else e64
                W[p] += np.float64(wz)
                A[p] += np.float64(a)
                H[p] += np.float64(h)
        # (3) per-pixel loss; valid, 1/s and the gradient factor kept for (4)
        count = 0
        bad = 0
        for p in range(n):
            ok = True
            if m is not None:
                ok = m[p]
            if hard:
                if ignore is not None:
                    ok = ok and z[p] != ignore
                bad += ok and not (z[p] >= 0 and z[p] < C)
            loss64 = A[p] + H[p]
            if from_logits:
                loss64 += 0.0 if W[p] == 0.0 else W[p] * log1p_pos(s[p])
            loss = F(loss64)
            wp = one if w is None else w[p]
            loss = loss * wp if ok else zero
            lbuf[lo + p] = np.float64(loss)
            if l is not None:
                l[p] = loss
            count += ok
            valid[p] = ok
            s[p] = 1.0 / (1.0 + s[p])
            H[p] = wp * F(gs)
        if not hard:
            for k in range(C):
                for p in range(n):
                    t = F(z[zo + k * zcs + p])
                    bad += valid[p] and not (t >= zero and t <= sc)
        # (4) gradient
        if g is not None:
            for k in range(C):
                xk = x[xo + k * xcs: xo + k * xcs + n]
                ek = e[k * tsz: k * tsz + n]
                gk = g[go + k * gcs: go + k * gcs + n]
                cwk = one if cw is None else cw[k]
                for p in range(n):
                    zv = target(z, zo, zcs, k, p, inv, keep, shift)
                    gv = class_grad(xk[p], ek[p], F(W[p]), F(s[p]), cwk * zv, F(H[p]))
                    gk[p] = gv if valid[p] else zero
        return count, bad

    return tile


@jit(**_OPTS)
def _gather_classes(flat, off, pstride, cstride, n, C, buf, tsz):
    for k in range(C):
        for p in range(n):
            buf[k * tsz + p] = flat[off + k * cstride + p * pstride]


@jit(**_OPTS)
def _scatter_classes(flat, off, pstride, cstride, n, C, buf, tsz):
    for k in range(C):
        for p in range(n):
            flat[off + k * cstride + p * pstride] = buf[k * tsz + p]


@jit(**_OPTS)
def _first_bad_pixel(valid, z, zo, zcs, n, C, scale, hard):
    """First pixel of a tile with a bad target (rare path, scalar)."""
    for p in range(n):
        if not valid[p]:
            continue
        if hard:
            if not (z[p] >= 0 and z[p] < C):
                return p
        else:
            for k in range(C):
                t = np.float64(z[zo + k * zcs + p])
                if not (t >= 0.0 and t <= scale):
                    return p
    return -1


@jit(fastmath=_ACC, **_OPTS)
def _block_sum(buf, n):
    total = 0.0
    for i in range(n):
        total += buf[i]
    return total


@functools.lru_cache(maxsize=None)
def _driver(from_logits, divergence, hard, ftype):
    tile = _tile(from_logits, divergence, hard, ftype)

    @jit(tile._uuid, parallel=True, cache=True, **_OPTS)
    def run(shape, group_size, C, tsz, x, z, w, m, g, l, offsets, strides, cstrides, cw,
            scale, eps, ignore, gscale, part_loss, part_count, part_bad, part_first):
        ndim = shape.size
        inner = shape[ndim - 1]
        for b in prange(part_loss.size):
            grp, start, stop = block_range(b, group_size)
            e = np.empty(C * tsz, x.dtype)
            xs = np.empty(C * tsz if strides[0, ndim - 1] != 1 else 0, x.dtype)
            zs = np.empty(C * tsz if not hard and strides[1, ndim - 1] != 1 else 0, z.dtype)
            zp = np.empty(tsz if hard else 0, z.dtype)
            gb = _scratch(g, C * tsz if strides[5, ndim - 1] != 1 else 0)
            wb = _scratch(w, tsz)
            mb = _scratch(m, tsz)
            lb = _scratch(l, tsz)
            mx = np.empty(tsz, x.dtype)
            am = np.empty(tsz, np.int64)
            s = np.empty(tsz)
            W = np.empty(tsz)
            A = np.empty(tsz)
            H = np.empty(tsz)
            valid = np.empty(tsz, np.bool_)
            lbuf = np.empty(stop - start)
            count = 0
            bad = 0
            first = -1
            i = start
            while i < stop:
                off, col = row_offsets(shape, offsets, strides, i)
                n = min(inner - col, stop - i, tsz)
                # class-shaped operands: in place if pixels are contiguous, else gathered
                xa, xo, xcs = x, off[0], cstrides[0]
                if strides[0, ndim - 1] != 1:
                    _gather_classes(x, off[0], strides[0, ndim - 1], cstrides[0], n, C, xs, tsz)
                    xa, xo, xcs = xs, 0, tsz
                if hard:
                    za, zo, zcs = _view(z, off[1], strides[1, ndim - 1], n, zp), 0, 0
                else:
                    za, zo, zcs = z, off[1], cstrides[1]
                    if strides[1, ndim - 1] != 1:
                        _gather_classes(z, off[1], strides[1, ndim - 1], cstrides[1], n, C,
                                        zs, tsz)
                        za, zo, zcs = zs, 0, tsz
                ga, go, gcs = g, off[5], cstrides[5]
                if g is not None and strides[5, ndim - 1] != 1:
                    ga, go, gcs = gb, 0, tsz
                wv = _view(w, off[2], strides[2, ndim - 1], n, wb)
                mv = _view(m, off[3], strides[3, ndim - 1], n, mb)
                lv = _out(l, off[6], strides[6, ndim - 1], n, lb)
                c, bd = tile(xa, xo, xcs, za, zo, zcs, wv, mv, ga, go, gcs, lv, n, C, cw,
                             scale, eps, ignore, gscale[grp], e, tsz, mx, am, s, W, A, H, valid,
                             lbuf, i - start)
                if g is not None and strides[5, ndim - 1] != 1:
                    _scatter_classes(g, off[5], strides[5, ndim - 1], cstrides[5], n, C, gb, tsz)
                _scatter(l, off[6], strides[6, ndim - 1], n, lb)
                if bd and first < 0:
                    first = i + _first_bad_pixel(valid, za, zo, zcs, n, C, scale, hard)
                count += c
                bad += bd
                i += n
            part_loss[b] = _block_sum(lbuf, stop - start)
            part_count[b] = count
            part_bad[b] = bad
            part_first[b] = first

    return run
