"""Numba backend: fused, parallel, blocked kernels (twin of csrc/sigmoid_ce.c).

Design
------
* Fused: one pass reads x, targets (and weight, mask, pos_weight if given)
  once and writes the gradient (and the loss map for "none") while summing
  the loss.
* Layout: every operand arrives as (flat 1-D array, offset, element strides)
  over one C-order iteration shape (see `_layout`). The iteration is cut into
  rows of the last dimension; a row's operands with unit stride are sliced
  in place, the others are gathered into per-block scratch (and outputs
  scattered back), so the inner `segment` loop always sees contiguous data
  and vectorizes. A float16 or byte-swapped input is gathered whatever its
  stride, converting (`_numba_convert`).
* Blocks: each reduction group is cut into blocks of BLOCK elements; one
  float64 partial per block, combined by the caller in a fixed order, so the
  result does not depend on the thread count. Threads take whole blocks, or
  pieces of them when there are fewer blocks than threads (`block_pieces`). The
  rows write their element losses, in the compute type (as C), to one
  block-wide buffer, summed in float64 once the block is done: a block's
  partial does not depend on where its rows or pieces break (a strided view
  and a contiguous copy of it sum alike).
* Specialization: absent operands are passed as None and pruned at compile
  time; `from_logits` and `divergence` are baked into a kernel by `_kernel`.
  Kernels are cached on disk (cache=True), so a second process does not
  recompile.
* Flags: only the kernels' own code carries `reassoc` (so the float64 sum
  vectorizes) and `nsz`; the math helpers carry none (see `_numba_math`).
* Trust: `_api` has checked dtypes, shapes, aliasing and option ranges.
"""
import collections
import functools
import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from . import _numba_math as M
from ._numba_math import jit
from ._layout import BLOCK, kernel_dtype, make_plan
from ._memory import check_softmax_scratch
from ._numba_convert import HALF_BITS, convert
from ._numba_threading import launch, layer, policy
from ._partials import block_arrays, from_blocks
from ._reference import DENOM_FLOOR, LOG_CLAMP

_ACC = {"reassoc", "nsz"}
_OPTS = dict(nogil=True, error_model="numpy")
# Element code says fastmath=False explicitly (a callee compiled from a
# fast-math caller would inherit its flags and fold the rounding tricks) and
# is inlined at IR level, so each loop is one function LLVM vectorizes. Only
# `_sum64` reassociates, so that the float64 sum vectorizes too.
_EXACT = dict(_OPTS, fastmath=False, inline="always")
_Math = collections.namedtuple("_Math", "exp_neg log1p_unit log log1p_01")
_MATH = {
    np.float32: _Math(M.exp_neg_f32, M.log1p_unit_f32, M.log_f32, M.log1p_01_f32),
    np.float64: _Math(M.exp_neg_f64, M.log1p_unit_f64, M.log_f64, M.log1p_01_f64),
}
#: the softmax's exp, its clamp and what undoes its scale, per compute type
_EXP_CLASS = {np.float32: (M.exp_class_f32, M.EXP_CLASS_MIN_F32, M.EXP_CLASS_UNSCALE_F32),
              np.float64: (M.exp_class_f64, M.EXP_CLASS_MIN_F64, M.EXP_CLASS_UNSCALE_F64)}


@functools.lru_cache(maxsize=None)
def _element(from_logits, divergence, ftype):
    """Per-element (loss, dloss) of SPEC §1.1, before weight and mask."""
    exp_neg, log1p_unit, log, log1p_01 = _MATH[ftype]
    fma = M.fma
    F = ftype
    key = f"{from_logits}-{divergence}-{ftype.__name__}"
    zero, half, one = F(0.0), F(0.5), F(1.0)
    clamp, floor = F(LOG_CLAMP), F(DENOM_FLOOR)

    @jit(key, **_EXACT)
    def neg_entropy(z, zc):
        """z log z + zc log zc; the larger one's log is log1p(-smaller) (as C)."""
        small = z <= half
        lz = log(z) if small else log1p_unit(-zc)[0]
        lzc = log1p_unit(-z)[0] if small else log(zc)
        return (z * lz if z > zero else zero) + (zc * lzc if zc > zero else zero)

    @jit(key, **_EXACT)
    def element(x, tf, sc, zs, shift, a, w, gs):
        """(w * loss, w * dloss * gs) for logit/probability x and raw target tf."""
        z = fma(tf, zs, shift)
        zc = fma(sc - tf, zs, shift)
        az = a * z
        if from_logits:
            ax = abs(x)
            e = exp_neg(-ax)
            lp, inv = log1p_01(e)
            pos = x >= zero
            coef = zc if pos else az
            # coef*|x| is 0 when coef is, even for |x| = inf (SPEC §2).
            lin = zero if coef == zero else coef * ax
            loss = fma(lp, az + zc, lin)
            # the sign selects the fma's operands, not its result (as C)
            dloss = fma(-az if pos else zc, e, zc if pos else -az) * inv
        else:
            lc = log(x)
            lc = clamp if lc < clamp else lc
            # log(1 - x) as log1p(-x) where 1 - x would round away x's bits.
            l1c = log1p_unit(-x)[0] if x <= half else log(one - x)
            l1c = clamp if l1c < clamp else l1c
            loss = -((zero if az == zero else az * lc) + (zero if zc == zero else zc * l1c))
            den = x * (one - x)
            den = floor if den < floor else den
            dloss = (zc * x - az * (one - x)) / den
        if divergence:
            loss = loss + neg_entropy(z, zc)
        return loss * w, dloss * w * gs

    return element


def range_key(t):
    """A target's range key (as csrc's rkey): unsigned, ordered like a float's
    value on [+0, inf] and above all of those for -0, negatives and NaN (its
    bits); an integer code is its own key."""


def valid_key(t, valid):
    """range_key(t) if valid, else 0: a product, not a select (LLVM left the
    loop of a masked row scalar, 10x slower, when a select fed the maximum)."""


def range_top(t, scale):
    """The key of the largest value of array t's type <= scale, and the key
    type's 0: a row holds a target outside [0, scale] iff its largest key is
    above the first (-0 is a false alarm the exact count clears). Numba widens
    integer arithmetic to 64 bits, so every key is cast back to its type: a
    64-bit maximum would make the loop 8 lanes wide instead of 16."""


_FLT_MAX = float(np.finfo(np.float32).max)


@overload(range_key, jit_options=_EXACT)
def _range_key(t):
    if t == types.float32:
        return lambda t: np.uint32(M.f32_bits(t))
    if t == types.float64:
        return lambda t: np.uint64(M.f64_bits(t))
    if t.bitwidth == 64:    # (int64 hard labels: only compiled, as in C)
        return lambda t: np.uint64(t)
    return lambda t: np.uint32(t)


@overload(valid_key, jit_options=_EXACT)
def _valid_key(t, valid):
    kt = np.uint64 if t.bitwidth == 64 else np.uint32
    return lambda t, valid: kt(range_key(t) * kt(valid))


@overload(range_top, jit_options=_EXACT)
def _range_top(t, scale):
    if t.dtype == types.float32:
        def top(t, scale):
            scale = min(scale, _FLT_MAX)    # as C, whose cast would be UB above
            f = np.float32(scale)       # rounded up past scale: the float below
            return np.uint32(M.f32_bits(f) - np.int32(np.float64(f) > scale)), np.uint32(0)
        return top
    if t.dtype == types.float64:
        return lambda t, scale: (np.uint64(M.f64_bits(scale)), np.uint64(0))
    if t.dtype.bitwidth == 64:
        def top64(t, scale):
            top = np.uint64(scale) if scale < 2.0 ** 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
            return top, np.uint64(0)
        return top64
    return lambda t, scale: (np.uint32(min(scale, 4294967295.0)), np.uint32(0))


@functools.lru_cache(maxsize=None)
def _segment(from_logits, divergence, ftype):
    """The contiguous inner loop: n elements of every present operand."""
    element = _element(from_logits, divergence, ftype)
    F = ftype
    key = f"{from_logits}-{divergence}-{ftype.__name__}"
    zero, one = F(0.0), F(1.0)

    @jit(key, fastmath=False, **_OPTS)
    def segment(x, t, w, m, pw, g, l, n, scale, eps, ignore, gs, losses):
        # (losses: where this row's element losses go in its block's buffer)
        # Per-call constants, rounded to the compute type once (as in C).
        sc = F(scale)
        zs = F((1.0 - eps) / scale)     # z = tf * zs + shift, one fma
        shift = F(eps * 0.5)
        gsf = F(gs)
        # 32-bit counters (n <= BLOCK): 64-bit ones make LLVM vectorize the
        # loop 8 floats wide instead of 16 (half speed with AVX-512).
        count = np.int32(0)
        top_ok, top = range_top(t, scale)
        for i in range(n):
            ti = t[i]
            valid = _valid(m, t, i, ignore)
            top = max(top, valid_key(ti, valid))
            tf = F(ti)
            a = one if pw is None else pw[i]
            wi = one if w is None else w[i]
            loss, dloss = element(x[i], tf, sc, zs, shift, a, wi, gsf)
            loss = loss if valid else zero
            losses[i] = loss
            count = np.int32(count + valid)
            if g is not None:
                g[i] = dloss if valid else zero
            if l is not None:
                l[i] = loss
        # every element counts unless masked or ignored (as C)
        every = m is None and ignore is None
        return n if every else count, top > top_ok

    return segment


@jit(**_OPTS)
def _count_segment(x, t, w, m, pw, g, l, n, scale, eps, ignore, gs, losses):
    """Count and check only (the pre-pass of a masked "mean" gradient or of an
    in-place out=logits); no losses (x and losses are None)."""
    count = np.int32(0)     # n <= BLOCK (as C)
    bad = np.int32(0)
    for i in range(n):
        count = np.int32(count + _valid(m, t, i, ignore))
        bad = np.int32(bad + _is_bad(t, m, i, scale, ignore))
    return count, bad


@jit(fastmath=_ACC, **_OPTS)
def _sum64(values, n):
    """Float64 sum of values[:n], reassociated so that it vectorizes."""
    total = 0.0
    for i in range(n):
        total += np.float64(values[i])
    return total


@jit(**_OPTS)
def _is_bad(t, m, i, scale, ignore):
    """Whether element i counts and lies outside [0, scale], compared exactly
    (in float64)."""
    tf = np.float64(t[i])
    inside = (tf >= 0.0) & (tf <= scale)
    return _valid(m, t, i, ignore) & (not inside)


@jit(**_OPTS)
def _bad_targets(t, m, n, scale, ignore, want_first):
    """The rare path of a flagged row: how many, and the first one's index if
    wanted (else -1). A vectorized count: with check=False, or -0 targets,
    every row of a map may be flagged."""
    bad = 0
    for i in range(n):
        bad += _is_bad(t, m, i, scale, ignore)
    if want_first and bad:
        for i in range(n):
            if _is_bad(t, m, i, scale, ignore):
                return bad, i
    return bad, -1


@jit(**_OPTS)
def block_range(b, group_size):
    """Group and flat range [start, stop) of block b (as walk.h's block_range)."""
    per_group = (group_size + BLOCK - 1) // BLOCK
    grp = b // per_group
    start = grp * group_size + (b - grp * per_group) * BLOCK
    return grp, start, min(start + BLOCK, (grp + 1) * group_size)


@jit(**_OPTS)
def row_offsets(shape, offsets, strides, i):
    """Element offsets of every slot at flat index i (C order), and i's column."""
    ndim = shape.size
    row = i // shape[ndim - 1]
    col = i - row * shape[ndim - 1]
    off = offsets.copy()
    for s in range(off.size):
        off[s] += col * strides[s, ndim - 1]
    for d in range(ndim - 2, -1, -1):
        idx = row % shape[d]
        row //= shape[d]
        for s in range(off.size):
            off[s] += idx * strides[s, d]
    return off, col


@jit(**_OPTS)
def _valid(m, t, i, ignore):
    """Whether element i counts: its mask, and a target code other than `ignore`
    (`&`, not `and`, which LLVM would leave as branches)."""
    ok = True
    if m is not None:
        ok = m[i] != 0
    if ignore is not None:
        ok = ok & (t[i] != ignore)
    return ok


# Helpers on an operand that may be absent (None) or float16 bits. They are
# dispatched on the operand's type with @overload, so an absent one compiles
# to None and a present one to the array path: a branch on `a is None` would
# type the result Optional and keep the inner loops from vectorizing (and
# float16 bits are never a slice of the kernel's type).


def block_pieces(n_blocks, threads):
    """How many pieces each block is cut into on `threads` (as many as Numba
    runs): 1, unless there are fewer blocks than threads (a small map, few
    groups); then threads / gcd(threads, n_blocks), so that the pieces split
    evenly over the threads (as walk.h's block_pieces)."""
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    return threads // math.gcd(threads, n_blocks) if 0 < n_blocks < threads else 1


@jit(**_OPTS)
def _piece_edge(start, stop, j, pieces):
    """Edge j of `pieces` in [start, stop) (as walk.h's piece_edge): at
    multiples of 64 elements from the block's start, so that threads share at
    most one cache line of an output per edge (none of an aligned contiguous
    one)."""
    return stop if j == pieces else start + (stop - start) * j // pieces // 64 * 64


@jit(**_OPTS)
def piece_range(b, group_size, pieces, j):
    """Group and flat range [lo, hi) of piece j of block b, and the block's start."""
    grp, start, stop = block_range(b, group_size)
    return (grp, _piece_edge(start, stop, j, pieces), _piece_edge(start, stop, j + 1, pieces),
            start)


def _by_type(present, absent, half=None):
    """A function whose jitted form is `present` for arrays, `absent` for None
    and `half` (if given) for float16 bits."""
    def dispatch(a, *args):
        return absent(a, *args) if a is None else present(a, *args)

    @overload(dispatch, jit_options=_OPTS)
    def _typed(a, *args):
        if isinstance(a, types.NoneType):
            return absent
        return half if half is not None and a.dtype == HALF_BITS else present

    return dispatch


def _absent(a, *args):
    return None


# (Overloads need the typing function's exact `(a, *args)` signature.)
def _scratch_present(a, *args):
    size, _ = args
    return np.empty(size, a.dtype)


def _scratch_half(a, *args):
    """float16 bits are read as `ftype`."""
    size, ftype = args
    return np.empty(size, ftype)


def _view_present(a, *args):
    """The n elements of a row: an in-place slice if contiguous and native, else
    gathered (converted if `code`) into buf."""
    off, stride, n, buf, code = args
    if stride == 1 and code == 0:
        return a[off:off + n]
    convert(a, off, stride, n, buf, code)
    return buf[:n]


def _view_half(a, *args):
    off, stride, n, buf, code = args
    convert(a, off, stride, n, buf, code)
    return buf[:n]


def _out_present(a, *args):
    """Where a row's output goes: in place if contiguous, else scratch to scatter."""
    off, stride, n, buf = args
    if stride == 1:
        return a[off:off + n]
    return buf[:n]


def _rest_present(a, *args):
    return a[args[0]:]


def _sum_present(a, *args):
    return _sum64(a, args[0])


def _no_sum(a, *args):
    return 0.0


def _scatter_present(a, *args):
    off, stride, n, buf = args
    if stride != 1:
        for k in range(n):
            a[off + k * stride] = buf[k]


_scratch = _by_type(_scratch_present, _absent, _scratch_half)
_view = _by_type(_view_present, _absent, _view_half)
_out = _by_type(_out_present, _absent)
_scatter = _by_type(_scatter_present, _absent)
_rest = _by_type(_rest_present, _absent)
_block_sum = _by_type(_sum_present, _no_sum)


@jit(**_OPTS)
def piece_sums(pieces, part_count, part_bad, part_first):
    """Where the pieces' counts, bad counts and first bad indices go: the
    blocks' own partials if whole."""
    if pieces == 1:
        return part_count, part_bad, part_first
    n = part_count.size * pieces
    return np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)


@jit(**_OPTS)
def put_piece(sums, u, count, bad, first):
    """Piece u's sums, where piece_sums keeps them."""
    sums[0][u] = count
    sums[1][u] = bad
    sums[2][u] = first


@jit(**_OPTS)
def fold_pieces(shared, pieces, group_size, sums, part_loss, part_count, part_bad, part_first):
    """Each block's partials from its pieces' once they are all done (nothing
    if whole): its losses summed whole, as a block a thread took whole is."""
    if pieces == 1:
        return
    for b in range(part_loss.size):
        _, start, stop = block_range(b, group_size)
        part_loss[b] = _block_sum(_rest(shared, b * BLOCK), stop - start)
        count = 0
        bad = 0
        first = -1
        for u in range(b * pieces, (b + 1) * pieces):
            count += sums[0][u]
            bad += sums[1][u]
            if first < 0:
                first = sums[2][u]
        part_count[b] = count
        part_bad[b] = bad
        part_first[b] = first


@functools.lru_cache(maxsize=None)
def _driver(segment, ftype):
    """The parallel blocked walk over a strided iteration, around `segment`
    (whose float operands are `ftype`)."""
    F = ftype

    @jit(f"{segment._uuid}-{ftype.__name__}", parallel=True, cache=True, **_OPTS)
    def run(shape, group_size, pieces, x, t, w, m, pw, g, l, offsets, strides, codes, scale,
            eps, ignore, gscale, part_loss, part_count, part_bad, part_first):
        ndim = shape.size
        inner = shape[ndim - 1]
        # Scratch is needed only for operands whose rows are not contiguous
        # or that need converting.
        gather = False
        for s in range(strides.shape[0]):
            gather = gather or strides[s, ndim - 1] != 1 or codes[s] != 0
        # pieces of a block write their losses to its share of one buffer,
        # and their sums to their own
        nb = part_loss.size
        split = pieces > 1
        shared = _scratch(x, nb * BLOCK if split else 0, F)
        sums = piece_sums(pieces, part_count, part_bad, part_first)
        for u in prange(nb * pieces):
            b = u // pieces
            grp, lo, hi, start = piece_range(b, group_size, pieces, u - b * pieces)
            gs = gscale[grp]
            size = hi - lo if gather else 0        # a row is at most the range
            tb = _scratch(t, size, np.float32)     # float16 targets are read as float32
            xb = _scratch(x, size, F)
            wb = _scratch(w, size, F)
            mb = _scratch(m, size, F)
            pb = _scratch(pw, size, F)
            gb = _scratch(g, size, F)
            lb = _scratch(l, size, F)
            losses = _rest(shared, b * BLOCK + lo - start) if split else _scratch(x, hi - lo, F)
            count = 0
            bad = 0
            first = -1
            i = lo
            while i < hi:
                off, col = row_offsets(shape, offsets, strides, i)
                n = min(inner - col, hi - i)
                tv = _view(t, off[1], strides[1, ndim - 1], n, tb, codes[1])
                xv = _view(x, off[0], strides[0, ndim - 1], n, xb, codes[0])
                wv = _view(w, off[2], strides[2, ndim - 1], n, wb, codes[2])
                mv = _view(m, off[3], strides[3, ndim - 1], n, mb, codes[3])
                pv = _view(pw, off[4], strides[4, ndim - 1], n, pb, codes[4])
                gv = _out(g, off[5], strides[5, ndim - 1], n, gb)
                lv = _out(l, off[6], strides[6, ndim - 1], n, lb)
                s_count, s_bad = segment(xv, tv, wv, mv, pv, gv, lv, n, scale, eps, ignore,
                                         gs, _rest(losses, i - lo))
                _scatter(g, off[5], strides[5, ndim - 1], n, gb)
                _scatter(l, off[6], strides[6, ndim - 1], n, lb)
                if s_bad:
                    r_bad, r_first = _bad_targets(tv, mv, n, scale, ignore, first < 0)
                    bad += r_bad
                    if r_first >= 0:
                        first = i + r_first
                count += s_count
                i += n
            if not split:
                part_loss[b] = _block_sum(losses, hi - lo)
            put_piece(sums, u, count, bad, first)
        fold_pieces(shared, pieces, group_size, sums, part_loss, part_count, part_bad, part_first)

    return run


def _launch(run, call, x, g, l):
    plan = make_plan(call.shape, {"x": x, "z": call.z, "w": call.w, "m": call.m,
                                  "pw": call.pw, "g": g, "l": l}, group_size=call.group_size)
    nb = plan.n_blocks
    parts = block_arrays(nb)
    if nb:
        f = plan.flats
        ignore = None if call.ignore_value is None else call.z.dtype.type(call.ignore_value)
        with launch(run, call.threads) as kernel:
            kernel(plan.shape, plan.group_size, block_pieces(nb, call.threads), f["x"], f["z"],
                   f["w"], None if f["m"] is None else f["m"], f["pw"], f["g"], f["l"],
                   plan.offsets, plan.strides, plan.codes, float(call.scale),
                   float(call.label_smoothing), ignore,
                   np.ones(plan.n_groups) if call.gscale is None else call.gscale, *parts)
    return from_blocks(*parts, plan.n_groups)


def binary(call):
    ftype = kernel_dtype(call.x.dtype).type
    run = _driver(_segment(call.from_logits, call.divergence, ftype), ftype)
    return _launch(run, call, call.x, call.grad, call.loss_map)


def count_valid(call):
    # (no float operands: any ftype)
    return _launch(_driver(_count_segment, np.float64), call, None, None, None)


def features():
    return {
        "version": numba.__version__,
        # before the first launch: what was asked for ("default": tbb, omp, workqueue)
        "threading_layer": layer() or numba.config.THREADING_LAYER,
        "threading_policy": policy(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,
        "vectorized_math": "inlined polynomial exp/log with llvm.fma (Numba has no SVML here)",
    }


def softmax(call):
    from ._layout import softmax_tile, stream_gradient
    from ._numba_softmax import _driver as softmax_driver

    C = call.classes
    plan = make_plan(call.shape, {"x": call.x, "z": call.z, "w": call.w, "m": call.m,
                                  "g": call.grad, "l": call.loss_map},
                     group_size=call.group_size, class_axis=call.axis, full_shape=call.x.shape)
    nb = plan.n_blocks
    parts = block_arrays(nb)
    if nb:
        # An allocation failing inside the parallel loop would surface as a
        # SystemError after some blocks ran: find out before.
        check_softmax_scratch(C, call.threads)
        f = plan.flats
        run = softmax_driver(call.from_logits, call.divergence, call.hard,
                             kernel_dtype(call.x.dtype).type)
        with launch(run, call.threads) as kernel:
            kernel(plan.shape, plan.group_size, block_pieces(nb, call.threads), C,
                   softmax_tile(C), f["x"], f["z"], f["w"], f["m"], f["g"], f["l"], plan.offsets,
                   plan.strides, plan.codes, plan.class_strides, call.cw, float(call.scale),
                   float(call.label_smoothing), call.ignore_value, stream_gradient(call.grad),
                   call.gscale, *parts)
    return from_blocks(*parts, plan.n_groups)
