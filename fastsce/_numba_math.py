"""Branch-free exp, log and log1p in plain arithmetic, for Numba kernels.

Numba 0.68 has no SVML, so np.exp/np.log in a loop are scalar libm calls that
block vectorization (PERF_NOTES: ~20x slower). These polynomials vectorize.
They are compiled WITHOUT fast-math flags: `reassoc` would be free to fold
the two-constant range reduction x - k*ln2_hi - k*ln2_lo into one constant
(losing the low bits); the kernels that inline them add flags only to their
own accumulation. Same algorithms, constants and order of operations as
csrc/fastsce_math.h; the exact tests (tests/test_*_exact.py) hold the two to
the same results.

Sources: exp reduction and log kernel follow fdlibm/musl (e_exp.c, e_log.c,
e_logf.c); the float32 exp polynomial is Cephes expf's minimax fit.

Also here: `jit` (stable cache identities) and the few LLVM operations the
kernels need that Numba does not expose: fma, prefetch, memcpy, the
non-temporal copy and its fence, a block transpose.
"""
import hashlib
import pathlib
import platform
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

try:
    import fcntl
except ImportError:     # (Windows: Numba's own unlocked saves)
    fcntl = None


def jit(key="", **options):
    """njit with a stable identity, so Numba's disk cache hits in a new process.

    (The math helpers below are inlined at Numba-IR level, so the loops that
    use them are one function LLVM can vectorize; they and those loops carry
    no fast-math flags: `reassoc` would fold the rounding tricks.)

    A cached kernel's index key hashes the pickled contents of its closure;
    dispatchers pickle with a UUID that is random per process, so a kernel
    built by a factory (ours are) would miss the cache forever. Every
    dispatcher here gets a UUID from its module, name and variant `key`.
    """
    def wrap(fn):
        if key:
            # Numba names a function's machine code by qualname and a counter
            # that restarts in each process: two variants of one factory could
            # share a symbol, and a kernel from the disk cache then called the
            # other variant's code (wrong gradients, seen). A digest of the key
            # goes in the name (the key itself can be too long for the cache's
            # file names).
            fn.__qualname__ += "_" + hashlib.sha256(key.encode()).hexdigest()[:12]
        dispatcher = njit(**options)(fn)
        dispatcher._set_uuid(f"fastsce:{_SOURCE_DIGEST}:{fn.__module__}.{fn.__qualname__}:{key}")
        _lock_cache_saves(dispatcher)
        return dispatcher

    return wrap


def _lock_cache_saves(dispatcher):
    """Serialize a cached dispatcher's disk-cache saves across processes.

    Numba saves an entry by reading the kernel's index, taking the first free
    data-file number, rewriting the index and then writing the data, with no
    lock: two processes compiling different signatures of one kernel at once
    (pytest -n, dask workers) lose one entry, or leave one signature's index
    entry naming the other's machine code. Each save here holds an exclusive
    flock on a file beside the index."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if fcntl is None or cache_file is None:
        return
    save = cache_file.save

    def locked_save(key, data):
        try:
            lock = open(cache_file._index_path + ".lock", "a")
        except OSError:     # (no lock file, no lock: Numba's behaviour)
            return save(key, data)
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return save(key, data)

    cache_file.save = locked_save


#: Modules whose constants the kernels freeze at compile time (BLOCK, SWAPPED,
#: BUF_PAD; DENOM_FLOOR, LOG_CLAMP), besides the Numba sources themselves.
_FROZEN_FROM = ("_layout.py", "_reference.py")


def _source_digest():
    """Hash of every source a kernel is compiled from. Numba revalidates a
    cached kernel against its own file only; a kernel inlines helpers from the
    other Numba modules and freezes constants of _FROZEN_FROM, so an edit (or
    upgrade) of any of them must change every id."""
    here = pathlib.Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(here.glob("_numba_*.py")) + [here / n for n in _FROZEN_FROM]:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_SOURCE_DIGEST = _source_digest()

# ---------------------------------------------------------------- bit casts


def _bitcast(src, dst, dst_ir):
    @intrinsic
    def cast(typingctx, value):
        if value != src:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], dst_ir)

        return dst(src), codegen

    cast._set_uuid(f"fastsce:{_SOURCE_DIGEST}:bitcast:{src}->{dst}")  # stable, as `jit` (cache keys)
    return cast


f32_bits = _bitcast(types.float32, types.int32, ir.IntType(32))
bits_f32 = _bitcast(types.int32, types.float32, ir.FloatType())
f64_bits = _bitcast(types.float64, types.int64, ir.IntType(64))
bits_f64 = _bitcast(types.int64, types.float64, ir.DoubleType())


@intrinsic
def fma(typingctx, a, b, c):
    """a*b + c with one rounding: llvm.fma, which LLVM vectorizes as vfmadd
    (a libm call where the CPU has no FMA), as C's fmaf/fma in the twin."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


fma._set_uuid(f"fastsce:{_SOURCE_DIGEST}:fma")  # stable, as `jit` (cache keys)


@intrinsic
def prefetch(typingctx, arr, idx):
    """A read prefetch of arr[idx] into L2, not L1 (llvm.prefetch, locality 2,
    as C's PREFETCH in walk.h, which says why). No bounds check: a prefetch
    never faults."""
    if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(builder.gep(ary.data, [index]), i8p),
                          i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


prefetch._set_uuid(f"fastsce:{_SOURCE_DIGEST}:prefetch")  # stable, as `jit` (cache keys)


def _copy_typing(dst, doff, src, soff, n):
    """The signature of a copy intrinsic, or None for other arguments."""
    if isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype:
        return types.void(dst, doff, src, soff, n)
    return None


def _copy_operands(context, builder, signature, args):
    """Pointers to dst[doff] and src[soff], the element count and size."""
    d = context.make_array(signature.args[0])(context, builder, args[0])
    s = context.make_array(signature.args[2])(context, builder, args[2])
    idx = [context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3, 4)]
    size = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
    return builder.gep(d.data, [idx[0]]), builder.gep(s.data, [idx[1]]), idx[2], size


@intrinsic
def copy_elements(typingctx, dst, doff, src, soff, n):
    """dst[doff:doff + n] = src[soff:soff + n] by memcpy (llvm.memcpy), as C's
    row copies (C's gathers copy by rep movsq, csrc/softmax_ce.c copy_run):
    for rows of kilobytes libc's copy beats a loop of stores
    (x86: its string moves write whole lines without reading them first).
    No bounds check: the caller's slices are in range."""
    def codegen(context, builder, signature, args):
        cgutils.raw_memcpy(builder, *_copy_operands(context, builder, signature, args))
        return context.get_dummy_value()

    return _copy_typing(dst, doff, src, soff, n), codegen


copy_elements._set_uuid(f"fastsce:{_SOURCE_DIGEST}:copy_elements")  # stable, as `jit`

#: Non-temporal stores are emitted on x86-64 only, as the C twin's SSE2 ones.
_STREAMING = platform.machine().lower() in ("x86_64", "amd64") and sys.maxsize > 2 ** 32


@intrinsic
def stream_elements(typingctx, dst, doff, src, soff, n):
    """As copy_elements, but by non-temporal 16-byte stores when dst[doff] is
    16-byte aligned and the run a whole number of 16 bytes (x86; else, and
    elsewhere, memcpy), as C's stream_copy: a gradient bigger than the caches
    goes to memory without the read for ownership and without evicting the
    inputs. Call store_fence() before the data is handed to another thread."""
    def codegen(context, builder, signature, args):
        dp, sp, n, size = _copy_operands(context, builder, signature, args)
        ity = n.type                                 # intp
        nbytes = builder.mul(n, ity(size))
        misaligned = builder.and_(builder.or_(builder.ptrtoint(dp, ity), nbytes), ity(15))
        aligned = builder.and_(builder.icmp_unsigned("==", misaligned, ity(0)),
                               ir.Constant(ir.IntType(1), int(_STREAMING)))
        with builder.if_else(aligned) as (then, otherwise):
            with then:
                vec = ir.VectorType(ir.IntType(64), 2)
                dv, sv = builder.bitcast(dp, vec.as_pointer()), builder.bitcast(sp, vec.as_pointer())
                nt = builder.module.add_metadata([ir.IntType(32)(1)])
                with cgutils.for_range(builder, builder.udiv(nbytes, ity(16))) as loop:
                    v = builder.load(builder.gep(sv, [loop.index]), align=1)
                    st = builder.store(v, builder.gep(dv, [loop.index]), align=16)
                    st.set_metadata("nontemporal", nt)
            with otherwise:
                cgutils.raw_memcpy(builder, dp, sp, n, size)
        return context.get_dummy_value()

    return _copy_typing(dst, doff, src, soff, n), codegen


stream_elements._set_uuid(f"fastsce:{_SOURCE_DIGEST}:stream_elements")  # stable, as `jit`


def _block_elements(arr):
    """B, the elements of a 16-byte vector, for an array of integers or
    floats of 1, 2, 4 or 8 bytes; else None."""
    if (isinstance(arr, types.Array) and isinstance(arr.dtype, (types.Integer, types.Float))
            and arr.dtype.bitwidth in (8, 16, 32, 64)):
        return 128 // arr.dtype.bitwidth
    return None


@intrinsic
def transpose_block(typingctx, dst, doff, ds, src, soff, ss):
    """dst[doff + c * ds + r] = src[soff + r * ss + c] for r, c < B = 16 /
    itemsize: B rows of B adjacent elements loaded as 16-byte vectors,
    transposed by log2(B) rounds of shuffles (each pairs vector i with
    i + B/2 and interleaves their halves), B stores; as C's block_transpose
    (csrc/walk.h) does with SSE2 unpacks. No bounds check."""
    if _copy_typing(dst, doff, src, soff, ss) is None or _block_elements(dst) is None:
        return None
    sig = types.void(dst, doff, ds, src, soff, ss)

    def codegen(context, builder, signature, args):
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[3])(context, builder, args[3])
        doff, ds, soff, ss = (context.cast(builder, args[i], signature.args[i], types.intp)
                              for i in (1, 2, 4, 5))
        elem = context.get_data_type(signature.args[0].dtype)
        B = _block_elements(signature.args[0])
        vec = ir.VectorType(elem, B)
        ity = doff.type
        row = [builder.load(builder.bitcast(builder.gep(s.data, [builder.add(
                   soff, builder.mul(ss, ity(i)))]), vec.as_pointer()), align=1)
               for i in range(B)]
        i32 = ir.IntType(32)
        lo = ir.Constant(ir.VectorType(i32, B), [j // 2 + B * (j % 2) for j in range(B)])
        hi = ir.Constant(ir.VectorType(i32, B), [B // 2 + j // 2 + B * (j % 2) for j in range(B)])
        for _ in range(B.bit_length() - 1):
            pairs = [(row[i], row[i + B // 2]) for i in range(B // 2)]
            row = [builder.shuffle_vector(a, b, m) for a, b in pairs for m in (lo, hi)]
        for i in range(B):
            ptr = builder.gep(d.data, [builder.add(doff, builder.mul(ds, ity(i)))])
            builder.store(row[i], builder.bitcast(ptr, vec.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


transpose_block._set_uuid(f"fastsce:{_SOURCE_DIGEST}:transpose_block")  # stable, as `jit`


@intrinsic
def block_side(typingctx, arr):
    """transpose_block's B for arr's elements, as a compile-time constant:
    as a runtime step it cost the loops around it divisions and registers
    (Numba's block gather 0.20 -> 0.13 ns per element)."""
    if _block_elements(arr) is None:
        return None

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, _block_elements(signature.args[0]))

    return types.intp(arr), codegen


block_side._set_uuid(f"fastsce:{_SOURCE_DIGEST}:block_side")  # stable, as `jit`


@intrinsic
def store_fence(typingctx):
    """Orders the non-temporal stores before it (a full fence; C: _mm_sfence)."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


store_fence._set_uuid(f"fastsce:{_SOURCE_DIGEST}:store_fence")  # stable, as `jit`

# ---------------------------------------------------------------- float32

F32 = np.float32
_E32_LOG2E = F32(1.44269504088896341)
_E32_LN2HI = F32(0.693359375)
_E32_LN2LO = F32(-2.12194440e-4)
_E32_P = tuple(F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_L32_LG = tuple(F32(c) for c in (0.66666662693, 0.40000972152, 0.28498786688, 0.24279078841))
_LP32_H = tuple(F32(c) for c in (-4.999993145e-01, 3.333050907e-01, -2.495857924e-01,
                                  1.969535649e-01, -1.535526812e-01, 1.068033427e-01,
                                  -5.766221508e-02, 2.020336874e-02, -3.318195930e-03))
_L32_LN2HI = F32(6.9313812256e-01)
_L32_LN2LO = F32(9.0580006145e-06)
_SQRT2_32 = F32(1.41421356237)
_RSQRT2_32 = F32(0.707106781187)
_RINT32 = F32(12582912.0)                  # 1.5 * 2^23: adding it rounds to an integer
_RINT32_BITS = np.int32(0x4B400000)        # its bits: k is the difference of the bits


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def exp_scaled_f32(r, s):
    """exp(r) * s for the reduced argument r, |r| <= ln(2)/2 (Cephes expf's
    fit), and a power of two s: one rounding for the sum and the scale."""
    p0, p1, p2, p3, p4, p5 = _E32_P
    r2 = r * r                         # in powers of r^2: half the dependent fmas
    p = fma(fma(fma(p0, r, p1), r2, fma(p2, r, p3)), r2, fma(p4, r, p5))
    return fma(fma(p, r2, r), s, s)


#: exp_class_f32's clamp and scale (exp_class_f64's below)
EXP_CLASS_MIN_F32 = F32(-130.0)
EXP_CLASS_UNSCALE_F32 = F32(2.0 ** -64)


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def exp_class_f32(d, err):
    """The softmax's exp(d + err) * 2^64, for d = x - m <= 0 (and NaN) and err
    what rounding x - m lost (added to the reduced argument). d is clamped at
    -130: every result is then a normal float32 and 2^(k + 64) one factor.
    Below e^-130 of the maximum a class cannot change a float32 loss."""
    d = EXP_CLASS_MIN_F32 if d < EXP_CLASS_MIN_F32 else d
    kb = fma(d, _E32_LOG2E, _RINT32)
    k = kb - _RINT32
    r = fma(k, -_E32_LN2LO, fma(k, -_E32_LN2HI, d) + err)
    ki = np.int32(f32_bits(kb) - _RINT32_BITS)
    return exp_scaled_f32(r, bits_f32(np.int32((ki + np.int32(127 + 64)) << 23)))


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def exp_neg_f32(x):
    """exp(x) for x <= 0 (and NaN); 0 below the subnormal range. k is read
    from the bits of the rounding sum instead of converted (no NaN guard;
    why: csrc/fastsce_math.h). The scale 2^(k + 100) is normal for every k
    here: only a subnormal result is rounded twice."""
    x = F32(-150.0) if x < F32(-150.0) else x
    kb = fma(x, _E32_LOG2E, _RINT32)
    k = kb - _RINT32
    r = fma(k, -_E32_LN2LO, fma(k, -_E32_LN2HI, x))
    ki = np.int32(f32_bits(kb) - _RINT32_BITS)
    return exp_scaled_f32(r, bits_f32(np.int32((ki + np.int32(127 + 100)) << 23))) * F32(2.0 ** -100)


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log_reduced_f32(f, k):
    """log(2^k * (1 + f)) for 1 + f in [sqrt(2)/2, sqrt(2)) (fdlibm's kernel)."""
    g1, g2, g3, g4 = _L32_LG
    s = f / (F32(2.0) + f)
    z = s * s
    w = z * z
    r = z * (g1 + w * g3) + w * (g2 + w * g4)
    hfsq = F32(0.5) * f * f
    return s * (hfsq + r) + k * _L32_LN2LO - hfsq + f + k * _L32_LN2HI


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log1p_unit_f32(e):
    """(log1p(e), 1/(1+e)) for e in [-0.5, 1] (and NaN)."""
    u = F32(1.0) + e
    big = u > _SQRT2_32
    small = u < _RSQRT2_32
    f = u * F32(0.5) - F32(1.0) if big else (u * F32(2.0) - F32(1.0) if small else u - F32(1.0))
    k = F32(1.0) if big else (F32(-1.0) if small else F32(0.0))
    inv = F32(1.0) / u
    # u = 1 + e rounded; (e - (u - 1)) / u restores what the rounding lost.
    return log_reduced_f32(f, k) + (e - (u - F32(1.0))) * inv, inv


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log1p_01_f32(e):
    """(log1p(e), 1/(1+e)) for e in [0, 1] (and NaN): e + e^2 h(e), h a
    degree-8 fit of (log1p(e) - e) / e^2 in e (why and how accurate:
    csrc/fastsce_math.h)."""
    h0, h1, h2, h3, h4, h5, h6, h7, h8 = _LP32_H
    e2 = e * e
    e4 = e2 * e2                       # Estrin-like: 4 dependent fmas, not 8
    h = fma(fma(h8, e4, fma(fma(h7, e, h6), e2, fma(h5, e, h4))), e4,
            fma(fma(h3, e, h2), e2, fma(h1, e, h0)))
    return fma(e2, h, e), F32(1.0) / (F32(1.0) + e)


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log_f32(u):
    """log(u) for any float32 u: -inf at 0, NaN below 0, subnormals exact."""
    tiny = u < F32(1.1754944e-38)
    v = u * F32(33554432.0) if tiny else u      # 2^25 lifts subnormals
    ix = f32_bits(v) + np.int32(0x3F800000 - 0x3F3504F3)
    k = np.int32((ix >> 23) - 127)
    ix = np.int32((ix & 0x007FFFFF) + 0x3F3504F3)
    f = bits_f32(ix) - F32(1.0)
    kf = F32(k) - (F32(25.0) if tiny else F32(0.0))
    r = log_reduced_f32(f, kf)
    r = r if u < F32(np.inf) else u              # inf and NaN pass through
    r = F32(-np.inf) if u == F32(0.0) else r
    return F32(np.nan) if u < F32(0.0) else r

# ---------------------------------------------------------------- float64

_E64_LOG2E = 1.44269504088896338700e+00
_E64_LN2HI = 6.93147180369123816490e-01
_E64_LN2LO = 1.90821492927058770002e-10
_E64_P = (1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05,
          -1.65339022054652515390e-06, 4.13813679705723846039e-08)
_L64_LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01,
           2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01,
           1.479819860511658591e-01)
_SQRT2_64 = 1.4142135623730951
_RSQRT2_64 = 0.7071067811865476
_RINT64 = 6755399441055744.0                # 1.5 * 2^52
_RINT64_BITS = np.int64(0x4338000000000000)


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def exp_poly_f64(hi, lo):
    """exp(hi - lo) given r = hi - lo, |r| <= ln(2)/2 (fdlibm's e_exp.c)."""
    p1, p2, p3, p4, p5 = _E64_P
    r = hi - lo
    t = r * r
    c = r - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))))
    return 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)


EXP_CLASS_MIN_F64 = -800.0
EXP_CLASS_UNSCALE_F64 = 2.0 ** -140


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def exp_class_f64(d, err):
    """As exp_class_f32: exp(d + err) * 2^140, d clamped at -800, every result
    a normal float64."""
    d = EXP_CLASS_MIN_F64 if d < EXP_CLASS_MIN_F64 else d
    kb = d * _E64_LOG2E + _RINT64
    k = kb - _RINT64
    p = exp_poly_f64(d - k * _E64_LN2HI, k * _E64_LN2LO - err)
    return p * bits_f64((f64_bits(kb) - _RINT64_BITS + (1023 + 140)) << 52)


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def exp_neg_f64(x):
    """exp(x) for x <= 0 (and NaN): as exp_neg_f32, k from the bits,
    2^(k + 60) normal for k >= -1077."""
    x = -746.0 if x < -746.0 else x
    kb = x * _E64_LOG2E + _RINT64
    k = kb - _RINT64
    p = exp_poly_f64(x - k * _E64_LN2HI, k * _E64_LN2LO)
    return p * bits_f64((f64_bits(kb) - _RINT64_BITS + (1023 + 60)) << 52) * 2.0 ** -60


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log_reduced_f64(f, k):
    """log(2^k * (1 + f)) for 1 + f in [sqrt(2)/2, sqrt(2)) (fdlibm's kernel)."""
    g1, g2, g3, g4, g5, g6, g7 = _L64_LG
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (g1 + w * (g3 + w * (g5 + w * g7))) + w * (g2 + w * (g4 + w * g6))
    hfsq = 0.5 * f * f
    return s * (hfsq + r) + k * _E64_LN2LO - hfsq + f + k * _E64_LN2HI


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log1p_unit_f64(e):
    """(log1p(e), 1/(1+e)) for e in [-0.5, 1] (and NaN)."""
    u = 1.0 + e
    big = u > _SQRT2_64
    small = u < _RSQRT2_64
    f = u * 0.5 - 1.0 if big else (u * 2.0 - 1.0 if small else u - 1.0)
    k = 1.0 if big else (-1.0 if small else 0.0)
    inv = 1.0 / u
    return log_reduced_f64(f, k) + (e - (u - 1.0)) * inv, inv


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log1p_01_f64(e):
    """(log1p(e), 1/(1+e)) for e in [0, 1] (and NaN): the reduced log (a
    polynomial in e alone would need degree ~21 for float64)."""
    return log1p_unit_f64(e)


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log_f64(u):
    """log(u) for any float64 u: -inf at 0, NaN below 0, subnormals exact."""
    tiny = u < 2.2250738585072014e-308
    v = u * 18014398509481984.0 if tiny else u   # 2^54 lifts subnormals
    ix = f64_bits(v) + np.int64((0x3FF00000 - 0x3FE6A09E) << 32)
    # the exponent as a double by _RINT64's bits, as C (where AVX2's lack of
    # an int64 -> double conversion kept the calling loops scalar)
    kf = bits_f64(_RINT64_BITS + (ix >> 52)) - (_RINT64 + 1023.0) - (54.0 if tiny else 0.0)
    ix = (ix & 0x000FFFFFFFFFFFFF) + np.int64(0x3FE6A09E << 32)
    f = bits_f64(ix) - 1.0
    r = log_reduced_f64(f, kf)
    r = r if u < np.inf else u
    r = -np.inf if u == 0.0 else r
    return np.nan if u < 0.0 else r


@jit(nogil=True, fastmath=False, inline="always")  # explicit: see `jit`
def log1p_pos_f64(r):
    """(log1p(r), 1/(1+r)) for r >= 0 (and +inf, NaN): log(u) of u = 1 + r, the
    rounding of 1 + r put back as (r - (u - 1)) / u (fdlibm's log1p)."""
    u = 1.0 + r
    inv = 1.0 / u
    return log_f64(u) + ((r - (u - 1.0)) * inv if u < np.inf else 0.0), inv
