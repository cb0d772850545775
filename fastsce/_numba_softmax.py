"""Numba backend, multiclass: fused softmax cross-entropy (twin of csrc/softmax_ce.c).

Design
------
* Pixels are walked like the binary loss's elements (`_layout`, C order over
  the pixel shape); the class axis is a stride. Rows are cut into tiles of
  `softmax_tile(C)` pixels. A tile whose pixels are not contiguous (NHWC), or
  whose class rows would collide in cache (NCHW maps of 2^k pixels, see
  `_gathered`), is gathered into a [C][tile + 16] scratch first (the extra
  cache line keeps a pixel's classes out of one cache set; row-by-row gathers
  prefetch ahead), and its gradient written there and copied out (a big one
  by non-temporal stores, `_layout.stream_gradient`); so every layout runs
  the same class-outer, pixel-inner loops: they vectorize across pixels, and
  NCHW and NHWC give bitwise the same numbers. A float16 or byte-swapped
  input is gathered whatever its layout, converting (`_numba_convert`).
* Per tile: (1) stream whole class rows once for the per-pixel maximum and
  the largest target key (out-of-range ones are counted per pixel only if
  it is too large; this also brings the tile into
  cache). Then per chunk of pixels, with its per-pixel sums kept close:
  (2) exp(x - m) (the rounding of x - m put back, TwoSum), stored with w z
  for (4), and float64 sums r = sum of the exps of the classes below the
  maximum (the maxima's exps are exactly 1 and are counted), W = sum w z,
  A = sum w z (m - x), classes in pairs (a pair's terms added in the compute
  type first); (3) the pixel loss A + W log1p(r), every term
  non-negative, so full relative precision even for a dominant class;
  (4) the gradient W e / (1 + r) - w z. Each logit and target is read from
  memory once and each gradient element written once.
* Blocks of BLOCK pixels; each block keeps its pixel losses in a buffer and
  sums it in one fixed loop, so the total does not depend on how rows were
  cut into tiles (layout) or on the thread count (threads share a block in
  pieces when there are fewer blocks than threads).
"""
import functools

import numpy as np
from numba import prange

from . import _numba_math as M
from ._numba_math import (block_side, copy_elements, jit, prefetch, store_fence,
                          stream_elements, transpose_block)
from ._layout import BLOCK, BUF_PAD
from ._numba_convert import convert
from ._numba_kernels import (_EXACT, _EXP_CLASS, _MATH, _OPTS, _absent, _by_type, _out,
                              _rest, _scatter, _scratch, _sum64, _view, fold_pieces, piece_range,
                              piece_sums, put_piece, range_key, range_top, row_offsets)
from ._reference import DENOM_FLOOR, LOG_CLAMP

#: Pixels per chunk. The C twin uses 16 and keeps the per-pixel sums in
#: registers; here they live in arrays, and long chunks amortize the per-class
#: slices and calls (in-cache tile, 1 thread: 64 -> 512 pixels, 1.07 -> 1.47
#: Gelem/s; C = 150 no slower). Nothing computed depends on it.
CHUNK = 512


# Step (4) in a function of its own, not inlined: inside `tile`, LLVM left
# the loop scalar (W3 at 1 thread: ~20% of the time).
@jit(fastmath=False, **_OPTS)
def _gradient(g, go, gcs, np_, C, e, wzs, wf, isr, fac, ok, floor, from_logits):
    """(4): the chunk's gradient rows from g[go] on."""
    zero = g.dtype.type(0.0)
    for k in range(C):
        gk = g[go + k * gcs:go + k * gcs + np_]
        ek = e[k * CHUNK:k * CHUNK + np_]
        wzk = wzs[k * CHUNK:k * CHUNK + np_]
        for j in range(np_):
            if from_logits:
                gv = (wf[j] * (ek[j] * isr[j]) - wzk[j]) * fac[j]
            else:
                den = ek[j] if ek[j] > floor else floor
                gv = (-wzk[j] / den) * fac[j]
            gk[j] = gv if ok[j] != zero else zero


@functools.lru_cache(maxsize=None)
def _tile(from_logits, divergence, hard, ftype):
    """Loss and gradient of n pixels; x, z, g as (array, offset, class stride)."""
    log = _MATH[ftype].log
    exp_class, dmin, unscale = _EXP_CLASS[ftype]
    F = ftype
    key = f"{from_logits}-{divergence}-{hard}-{ftype.__name__}"
    zero, one = F(0.0), F(1.0)
    clamp, floor = F(LOG_CLAMP), F(DENOM_FLOOR)

    @jit(key, **_EXACT)
    def target(zr, k, j, inv, keep, shift):
        """z_k of pixel j, scaled and smoothed; zr: the tile's class-k row
        (soft) or the chunk's int32 class labels (hard)."""
        if hard:
            return (keep if zr[j] == np.int32(k) else zero) + shift
        return F(zr[j]) * inv * keep + shift

    @jit(key, **_EXACT)
    def class_terms(v, mx, wz):
        """(e = exp(x - m); what the sum r adds: e 2^S, or 0 for a maximum,
        whose exp is exactly 1 and counted instead; the tie count; w z (m - x))
        of one class. Probabilities: (c, 0, 0, -w z clog(c))."""
        if from_logits:
            d = zero if v == mx else v - mx       # x = m = +inf: the limit, d = 0
            # TwoSum: err is what rounding x - m lost; exp(d + err) keeps a
            # far-below-max class's probability to the last bits.
            bb = d - v
            err = (v - (d - bb)) + (-mx - bb)
            # 0 if d is clamped or 0 (x = m = inf: inf - inf is NaN); as in C,
            # not err == err (a third of GCC's loop time)
            err = err if (d > dmin and d < zero) else zero
            ex = exp_class(d, err)
            # the maxima's exps are exactly 1: counted, not summed, so the
            # sum is r, the other classes', and log(1 + r) = log1p(r)
            tie = one if d == zero else zero
            es = zero if d == zero else ex
            a = zero if wz == zero else wz * -d
            return ex * unscale, es, tie, a
        lc = log(v)
        lc = clamp if lc < clamp else lc
        return v, zero, zero, (zero if wz == zero else -(wz * lc))

    @jit(key, **_EXACT)
    def one_class(xr, zr, k, j, cwk, mxj, inv, keep, shift):
        """Class k of pixel j in step (2): (e, w z, and the sums' terms es, tie,
        a, and w z log z for the divergence)."""
        zv = target(zr, k, j, inv, keep, shift)
        wz = cwk * zv
        ev, es, tie, a = class_terms(xr[j], mxj, wz)
        h = (zero if wz == zero else wz * log(zv)) if divergence else zero
        return ev, wz, es, tie, a, h

    def make_classes(two):
        @jit(f"{key}-{two}", **_EXACT)
        def classes(x, xo, xcs, z, zo, zcs, lab, k, q0, np_, cw, mxc, e, wzs, inv, keep, shift,
                    ties, esb, wzb, ab, hb, s, W, A, H):
            """Step (2) for class k, and k + 1 if `two`: stores e and w z for
            (4) and adds to the per-pixel sums. A pair's terms (non-negative)
            are added in the compute type, one rounding, then to the float64
            sums: half the converts."""
            k1 = k + 1 if two else k
            cw0 = one if cw is None else cw[k]
            cw1 = one if cw is None else cw[k1]
            x0 = x[xo + k * xcs + q0:xo + k * xcs + q0 + np_]
            x1 = x[xo + k1 * xcs + q0:xo + k1 * xcs + q0 + np_]
            z0 = lab if hard else z[zo + k * zcs + q0:zo + k * zcs + q0 + np_]
            z1 = lab if hard else z[zo + k1 * zcs + q0:zo + k1 * zcs + q0 + np_]
            e0 = e[k * CHUNK:k * CHUNK + np_]
            e1 = e[k1 * CHUNK:k1 * CHUNK + np_]
            wz0 = wzs[k * CHUNK:k * CHUNK + np_]
            wz1 = wzs[k1 * CHUNK:k1 * CHUNK + np_]
            for j in range(np_):
                ev, wz, es, t, a, h = one_class(x0, z0, k, j, cw0, mxc[j], inv, keep, shift)
                e0[j] = ev
                wz0[j] = wz
                es1 = t1 = a1 = wz1v = h1 = zero
                if two:
                    ev, wz1v, es1, t1, a1, h1 = one_class(x1, z1, k1, j, cw1, mxc[j], inv, keep,
                                                          shift)
                    e1[j] = ev
                    wz1[j] = wz1v
                ties[j] += t + t1
                esb[j] = es + es1
                wzb[j] = wz + wz1v
                ab[j] = a + a1
                hb[j] = h + h1
            # The float64 sums in a loop of their own: mixed with the float32
            # work above, LLVM vectorized all of it 8 wide (ymm) instead of 16
            # (W3 at 1 thread: 0.48 -> 0.55 Gelem/s). The same numbers.
            for j in range(np_):
                s[j] += np.float64(esb[j])
                W[j] += np.float64(wzb[j])
                A[j] += np.float64(ab[j])
                if divergence:
                    H[j] += np.float64(hb[j])
        return classes

    pair, last = make_classes(True), make_classes(False)

    # Every loop indexes a row slice with its range variable: Numba then knows
    # the index is not negative and emits plain vector loads (a computed
    # index costs a wraparound test and gathers).
    @jit(key, fastmath=False, **_OPTS)
    def tile(x, xo, xcs, z, zo, zcs, w, m, g, go, gcs, l, n, C, cw, scale, eps, ignore,
             gs, sc, valid, lb):
        """(1) streaming whole class rows, then steps (2)-(4) chunk by chunk."""
        mx, nbad, e, wzs, s, W, A, H, ties, ok, wf, isr, fac, esb, wzb, ab, hb, lab = sc
        if from_logits:
            x0 = x[xo:xo + n]
            for q in range(n):
                mx[q] = x0[q]
            for k in range(1, C):
                xk = x[xo + k * xcs:xo + k * xcs + n]
                for q in range(n):
                    mx[q] = xk[q] if xk[q] > mx[q] else mx[q]
        if not hard:
            # soft targets against [0, scale] by their largest key (as C)
            top_ok, top = range_top(z, scale)
            for k in range(C):
                zk = z[zo + k * zcs:zo + k * zcs + n]
                rt = top                    # the row's own running max vectorizes
                for q in range(n):
                    key = range_key(zk[q])
                    rt = key if key > rt else rt
                top = rt
            for q in range(n):
                nbad[q] = zero
            if top > top_ok:        # rare: which pixels, exactly (masks apply in (3))
                for k in range(C):
                    zk = z[zo + k * zcs:zo + k * zcs + n]
                    for q in range(n):
                        t = zk[q]
                        nbad[q] += one if range_key(t) > top_ok and t != 0 else zero
        inv = F(1.0 / scale)
        keep = F(1.0 - eps)
        shift = F(eps / C)
        fgs = F(gs)
        count = np.int32(0)          # 32-bit: 64-bit counters halve LLVM's vector width
        bad = np.int32(0)
        for q0 in range(0, n, CHUNK):
            np_ = min(CHUNK, n - q0)
            for j in range(np_):
                s[j] = 0.0
                W[j] = 0.0
                A[j] = 0.0
                H[j] = 0.0
                ties[j] = zero
            mxc = mx[q0:q0 + np_]
            zp = z[q0:q0 + np_]                    # hard: the class indices
            # hard: the labels as int32 (-1 out of range), so (2) compares
            # them at the float32 vectors' width (as int64: 0.25 against 0.31
            # Gelem/s, (1, 21, 256, 512) at 1 thread); as C
            lc32 = lab[:np_]
            if hard:
                for j in range(np_):
                    t = zp[j]
                    lc32[j] = np.int32(t) if t >= 0 and t < C else np.int32(-1)
            for k in range(0, C - 1, 2):           # (2) exps and sums, in pairs
                pair(x, xo, xcs, z, zo, zcs, lc32, k, q0, np_, cw, mxc, e, wzs, inv, keep,
                     shift, ties, esb, wzb, ab, hb, s, W, A, H)
            if C % 2:
                last(x, xo, xcs, z, zo, zcs, lc32, C - 1, q0, np_, cw, mxc, e, wzs, inv, keep,
                     shift, ties, esb, wzb, ab, hb, s, W, A, H)
            vc = valid[q0:q0 + np_]
            for j in range(np_):
                v = True
                if m is not None:
                    v = m[q0 + j] != 0
                if hard and ignore is not None:
                    v = v and zp[j] != ignore
                ok[j] = one if v else zero
                vc[j] = v
            nb = nbad[q0:q0 + np_]
            lc = lb[q0:q0 + np_]
            for j in range(np_):                   # (3) pixel losses
                v = ok[j] != zero
                if hard:
                    bad = np.int32(bad + (v and lc32[j] < 0))     # out of range
                else:
                    bad = np.int32(bad + (np.int32(nb[j]) if v else np.int32(0)))
                count = np.int32(count + v)
                loss64 = A[j] + H[j] if divergence else A[j]
                rr = s[j] * np.float64(unscale) + (np.float64(ties[j]) - 1.0)
                lr, iu = M.log1p_pos_f64(rr)
                if from_logits:
                    loss64 += 0.0 if W[j] == 0.0 else W[j] * lr
                wp = one if w is None else w[q0 + j]
                lc[j] = np.float64(F(loss64) * wp) if v else 0.0
                wf[j] = F(W[j])
                isr[j] = F(iu)
                fac[j] = wp * fgs
            if l is not None:
                for j in range(np_):
                    l[q0 + j] = F(lc[j])
            if g is not None:                      # (4) gradient
                _gradient(g, go + q0, gcs, np_, C, e, wzs, wf, isr, fac, ok, floor, from_logits)
        return count, bad

    return tile


#: Lines a gather prefetches ahead of its copy (as csrc/softmax_ce.c).
PREFETCH_LINES = 256
#: Lines copied per run of prefetches.
COPY_BLOCK = 16
#: Pixels of one class `_transpose` copies at a time (as C).
STRIDED_PIXELS = 16


@jit(**_OPTS)
def _block_transpose(dst, do, ds, src, so, ss, rows, cols):
    """dst[do + c * ds + r] = src[so + r * ss + c] for r < rows, c < cols (both
    >= B) by transpose_block; a row or column's last block overlaps the one
    before (as C's block_transpose)."""
    B = block_side(dst)
    for r in range(0, rows, B):
        r0 = r if r + B <= rows else rows - B
        for c in range(0, cols, B):
            c0 = c if c + B <= cols else cols - B
            transpose_block(dst, do + c0 * ds + r0, ds, src, so + r0 * ss + c0, ss)


@jit(**_OPTS)
def _transpose(dst, do, dps, dcs, src, so, sps, scs, n, C):
    """C classes of n pixels from src to dst, each at offset + pixel * ps +
    class * cs: a strided (NHWC) tile into or out of its [C][bs] buffer (or
    a staging block of STRIDED_PIXELS pixels on its way out), as
    C's strided_copy (csrc/walk.h): by B x B blocks where one side has
    adjacent classes and the other adjacent pixels, else element by element.
    Unsigned indices (wrapping where a stride is negative, the sum in range):
    Numba tests a signed one for wraparound. In cache, per element, W4's
    classes 16 pixels at a time: element by element 0.31 ns in, 0.21 out;
    by blocks 0.13 both (W4 at 1 thread 0.24 -> 0.29 Gelem/s)."""
    B = block_side(dst)
    if n >= B and C >= B:
        if scs == 1 and dps == 1:           # pixel-major into class rows
            _block_transpose(dst, do, dcs, src, so, sps, n, C)
            return
        if sps == 1 and dcs == 1:           # class rows into pixel-major
            _block_transpose(dst, do, dps, src, so, scs, C, n)
            return
    udo, udps, udcs = np.uint64(do), np.uint64(dps), np.uint64(dcs)
    uso, usps, uscs = np.uint64(so), np.uint64(sps), np.uint64(scs)
    un, step = np.uint64(n), np.uint64(STRIDED_PIXELS)
    for q0 in range(np.uint64(0), un, step):
        for k in range(np.uint64(C)):
            for q in range(q0, min(q0 + step, un)):
                dst[udo + q * udps + k * udcs] = src[uso + q * usps + k * uscs]


@jit(**_OPTS)
def _copy_rows(flat, off, cstride, n, C, buf, bs, nxt, noff, ncs, nlines):
    """C rows of n elements (class stride cstride) into buf (class stride bs),
    prefetching PREFETCH_LINES lines ahead through them, then through nxt's
    C rows of nlines lines at noff (class stride ncs; none if noff < 0), as
    csrc/softmax_ce.c copy_rows. The walk is written out here: through a
    helper returning the cursor, W3 ran 7-15% slower at 2 threads."""
    per = 64 // flat.itemsize
    nper = 64 // nxt.itemsize
    lines = n // per
    rows = C if lines > 0 else 0
    nrows = C if noff >= 0 and nlines > 0 else 0
    pk, pl = 0, 0                     # the line ahead: row pk (then nxt's), line pl
    for _ in range(PREFETCH_LINES):   # starts PREFETCH_LINES ahead
        if pk == rows + nrows:
            break
        pl += 1
        if pl == (lines if pk < rows else nlines):
            pl = 0
            pk += 1
    for k in range(C):
        for b in range(0, n, COPY_BLOCK * per):
            for _ in range(min(COPY_BLOCK, lines - b // per)):    # lines it copies
                if pk == rows + nrows:
                    break
                if pk < rows:
                    prefetch(flat, off + pk * cstride + pl * per)
                    row_lines = lines
                else:
                    prefetch(nxt, noff + (pk - rows) * ncs + pl * nper)
                    row_lines = nlines
                pl += 1
                if pl == row_lines:
                    pl = 0
                    pk += 1
            copy_elements(buf, k * bs + b, flat, off + k * cstride + b,
                          min(COPY_BLOCK * per, n - b))


@jit(**_OPTS)
def _pixel_major(pstride, cstride, C):
    """A tile with classes adjacent and pixels C apart (NHWC): one run of C n
    (csrc/softmax_ce.c pixel_major)."""
    return cstride == 1 and pstride == C


@jit(**_OPTS)
def _gather_classes(flat, off, pstride, cstride, n, C, buf, bs, nxt, noff, ncs, nlines):
    if pstride == 1:                # contiguous rows
        _copy_rows(flat, off, cstride, n, C, buf, bs, nxt, noff, ncs, nlines)
    else:
        # strided and pixel-major (NHWC) tiles, without prefetches: C's
        # gather_pixels prefetches a pixel-major one's lines ahead, which
        # here ran W4 at 2 threads 8% slower, inline or not
        _transpose(buf, 0, 1, bs, flat, off, pstride, cstride, n, C)


@jit(**_OPTS)
def _convert_classes(flat, off, pstride, cstride, n, C, buf, bs, code):
    for k in range(C):
        convert(flat, off + k * cstride, pstride, n, buf[k * bs:(k + 1) * bs], code)


def _tile_present(a, *args):
    """A tile of a class-shaped input as (array, offset, class stride): in place
    unless `gather` (see `_gathered`), else gathered (converted if `code`) into
    the [C][bs] buffer; a gather prefetches on into the rows read next, nxt's
    C rows of nlines lines at noff (class stride ncs; none if noff < 0)."""
    off, pstride, cstride, n, C, buf, bs, code, gather, nxt, noff, ncs, nlines = args
    if code == 0:
        if not gather:
            return a, off, cstride
        _gather_classes(a, off, pstride, cstride, n, C, buf, bs, nxt, noff, ncs, nlines)
    else:
        _convert_classes(a, off, pstride, cstride, n, C, buf, bs, code)
    return buf, 0, bs


def _tile_half(a, *args):
    """float16 bits: always converted."""
    off, pstride, cstride, n, C, buf, bs, code, gather, nxt, noff, ncs, nlines = args
    _convert_classes(a, off, pstride, cstride, n, C, buf, bs, code)
    return buf, 0, bs


_tile_view = _by_type(_tile_present, _absent, _tile_half)


@jit(**_OPTS)
def _gathered(pstride, code, cstride_bytes):
    """Whether a class-shaped operand goes through a [C][tile] buffer,
    gathered in or (the gradient) copied out (C: gathered()): pixels strided
    (NHWC), converting, or a class stride of whole pages (NCHW maps of 2^k
    pixels), whose rows would all fall in the same cache sets and evict each
    other before the tile is done with them."""
    return pstride != 1 or code != 0 or cstride_bytes % 4096 == 0


@jit(**_OPTS)
def _scatter_classes(flat, off, pstride, cstride, n, C, buf, bs, stream, stage):
    """`stage` holds STRIDED_PIXELS pixels of C classes."""
    if pstride == 1:                # contiguous rows: row by row, not interleaved
        for k in range(C):
            if stream:
                stream_elements(flat, off + k * cstride, buf, k * bs, n)
            else:
                copy_elements(flat, off + k * cstride, buf, k * bs, n)
    elif stream and _pixel_major(pstride, cstride, C):
        # pixel-major: transposed into the stage (in cache), streamed out whole
        for q0 in range(0, n, STRIDED_PIXELS):
            pn = min(STRIDED_PIXELS, n - q0)
            _transpose(stage, 0, C, 1, buf, q0, 1, bs, pn, C)
            stream_elements(flat, off + q0 * C, stage, 0, pn * C)
    else:
        _transpose(flat, off, pstride, cstride, buf, 0, 1, bs, n, C)


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


@functools.lru_cache(maxsize=None)
def _driver(from_logits, divergence, hard, ftype):
    tile = _tile(from_logits, divergence, hard, ftype)
    F = ftype

    @jit(tile._uuid, parallel=True, cache=True, **_OPTS)
    def run(shape, group_size, pieces, C, tsz, x, z, w, m, g, l, offsets, strides, codes,
            cstrides, cw, scale, eps, ignore, stream, gscale, part_loss, part_count, part_bad,
            part_first):
        ndim = shape.size
        inner = shape[ndim - 1]
        bs = tsz + BUF_PAD
        # [C][bs] buffers for the class-shaped inputs read through them
        x_gathered = _gathered(strides[0, ndim - 1], codes[0], cstrides[0] * x.itemsize)
        z_gathered = not hard and _gathered(strides[1, ndim - 1], codes[1],
                                            cstrides[1] * z.itemsize)
        # copied row by row (and prefetched: x, then z, then the next tile's x)
        x_rows = x_gathered and codes[0] == 0 and strides[0, ndim - 1] == 1
        z_rows = z_gathered and codes[1] == 0 and strides[1, ndim - 1] == 1
        # the gradient through a buffer too when its rows would collide in cache
        g_buffered = g is not None and _gathered(strides[5, ndim - 1], 0,
                                                 cstrides[5] * g.itemsize)
        # and copied out by non-temporal stores when bigger than the caches
        g_stream = g_buffered and stream
        # pieces of a block (fewer blocks than threads) write their pixel
        # losses to its share of one buffer, and their sums to their own
        nb = part_loss.size
        split = pieces > 1
        shared = np.empty(nb * BLOCK if split else 0)
        sums = piece_sums(pieces, part_count, part_bad, part_first)
        for u in prange(nb * pieces):
            b = u // pieces
            grp, lo, hi, start = piece_range(b, group_size, pieces, u - b * pieces)
            xs = _scratch(x, C * bs if x_gathered else 0, F)
            zs = _scratch(z, C * bs if z_gathered else 0, np.float32)  # float16: as float32
            zp = _scratch(z, tsz if hard else 0, np.float32)
            gb = _scratch(g, C * bs if g_buffered else 0, F)
            wb = _scratch(w, tsz, F)
            mb = _scratch(m, tsz, F)
            lb = _scratch(l, tsz, F)
            stage = np.empty(STRIDED_PIXELS * C if g_stream else 0, F)
            valid = np.empty(tsz, np.bool_)
            lbuf = _rest(shared, b * BLOCK + lo - start) if split else np.empty(hi - lo)
            # the tile's working set: per tile, per chunk of classes, per chunk
            sc = (np.empty(tsz, F), np.empty(tsz, F),
                  np.empty(C * CHUNK, F), np.empty(C * CHUNK, F),
                  np.empty(CHUNK), np.empty(CHUNK), np.empty(CHUNK), np.empty(CHUNK),
                  np.empty(CHUNK, F), np.empty(CHUNK, F), np.empty(CHUNK, F),
                  np.empty(CHUNK, F), np.empty(CHUNK, F),
                  np.empty(CHUNK, F), np.empty(CHUNK, F), np.empty(CHUNK, F), np.empty(CHUNK, F),
                  np.empty(CHUNK if hard else 0, np.int32))
            count = 0
            bad = 0
            first = -1
            i = lo
            while i < hi:
                off, col = row_offsets(shape, offsets, strides, i)
                n = min(inner - col, hi - i, tsz)     # tiles never cross a row
                # class-shaped inputs: in place, or gathered (see _gathered)
                nxo, nxl = -1, 0               # the next tile's x rows: offset, lines
                if x_rows and i + n < hi:
                    off2, col2 = row_offsets(shape, offsets, strides, i + n)
                    nxo = off2[0]
                    nxl = min(inner - col2, hi - i - n, tsz) * x.itemsize // 64  # its n
                if z_rows:
                    xa, xo, xcs = _tile_view(x, off[0], strides[0, ndim - 1], cstrides[0], n, C,
                                             xs, bs, codes[0], x_gathered, z, off[1], cstrides[1],
                                             n * z.itemsize // 64)
                else:
                    xa, xo, xcs = _tile_view(x, off[0], strides[0, ndim - 1], cstrides[0], n, C,
                                             xs, bs, codes[0], x_gathered, x, nxo, cstrides[0],
                                             nxl)
                if hard:
                    za, zo, zcs = _view(z, off[1], strides[1, ndim - 1], n, zp, codes[1]), 0, 0
                else:
                    za, zo, zcs = _tile_view(z, off[1], strides[1, ndim - 1], cstrides[1], n, C,
                                             zs, bs, codes[1], z_gathered, x, nxo, cstrides[0],
                                             nxl)
                ga, go, gcs = g, off[5], cstrides[5]
                if g_buffered:
                    ga, go, gcs = gb, 0, bs
                wv = _view(w, off[2], strides[2, ndim - 1], n, wb, codes[2])
                mv = _view(m, off[3], strides[3, ndim - 1], n, mb, codes[3])
                lv = _out(l, off[6], strides[6, ndim - 1], n, lb)
                c, bd = tile(xa, xo, xcs, za, zo, zcs, wv, mv, ga, go, gcs, lv, n, C, cw,
                             scale, eps, ignore, gscale[grp], sc, valid,
                             lbuf[i - lo:i - lo + n])
                if g_buffered:
                    _scatter_classes(g, off[5], strides[5, ndim - 1], cstrides[5], n, C, gb, bs,
                                     g_stream, stage)
                _scatter(l, off[6], strides[6, ndim - 1], n, lb)
                if bd and first < 0:
                    first = i + _first_bad_pixel(valid, za, zo, zcs, n, C, scale, hard)
                count += c
                bad += bd
                i += n
            if g_stream:
                store_fence()
            if not split:
                part_loss[b] = _sum64(lbuf, hi - lo)
            put_piece(sums, u, count, bad, first)
        fold_pieces(shared, pieces, group_size, sums, part_loss, part_count, part_bad, part_first)

    return run
