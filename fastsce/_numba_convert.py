"""Reading byte-swapped and float16 operands in Numba (twin of csrc/convert.h).

An operand whose storage is not the kernel's type (`_layout`: SWAPPED,
HALF) is never used in place: each row (or tile) of it is converted into
the scratch the kernels already gather strided rows into, so it is never
copied whole. Numba has no float16 on the CPU, so float16 arrives as its
int16 bits; the conversions are exact, so results are bitwise those of a
native copy (and of the C kernels).
"""
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from ._layout import SWAPPED
from ._numba_math import _SOURCE_DIGEST, bits_f32, jit

#: The storage dtype of float16 operands (no other operand is int16).
HALF_BITS = types.int16


@intrinsic
def bswap(typingctx, value):
    """Reverse the bytes of an integer (llvm.bswap, as C's __builtin_bswap*)."""
    if not isinstance(value, types.Integer) or value.bitwidth < 16:
        return None

    def codegen(context, builder, signature, args):
        return builder.bswap(args[0])

    return value(value), codegen


bswap._set_uuid(f"fastsce:{_SOURCE_DIGEST}:bswap")  # stable, as `jit` (cache keys)


@jit(nogil=True, inline="always")
def half_to_f32(h):
    """IEEE half bits to float32, in integers: exact for every input,
    subnormals (normalized by shifting), infinities and NaNs (payload kept)."""
    bits = np.int64(h)
    sign = (bits & 0x8000) << 16
    em = bits & 0x7FFF                      # exponent and mantissa
    if em >= 0x7C00:                        # inf, NaN
        bits = 0x7F800000 | (em & 0x3FF) << 13
    elif em >= 0x0400:                      # normal: rebias 15 -> 127
        bits = (em << 13) + (112 << 23)
    elif em == 0:
        bits = 0
    else:                                   # subnormal m 2^-24
        e = 113
        while not em & 0x400:
            em <<= 1
            e -= 1
        bits = e << 23 | (em & 0x3FF) << 13
    return bits_f32(np.int32(bits | sign))


def convert(a, off, stride, n, buf, code):
    """buf[:n] = the n elements a[off + k * stride] of storage `code`, in buf's type."""


@overload(convert, jit_options=dict(nogil=True))
def _convert(a, off, stride, n, buf, code):
    if a.dtype == HALF_BITS and buf.dtype != HALF_BITS:
        def half(a, off, stride, n, buf, code):
            if code & SWAPPED:
                for k in range(n):
                    buf[k] = half_to_f32(bswap(a[off + k * stride]))
            else:
                for k in range(n):
                    buf[k] = half_to_f32(a[off + k * stride])
        return half
    if a.dtype != buf.dtype:
        return None
    if a.dtype in (types.boolean, types.uint8):     # one byte: nothing to swap
        def plain(a, off, stride, n, buf, code):
            for k in range(n):
                buf[k] = a[off + k * stride]
        return plain
    bits = np.dtype(f"u{a.dtype.bitwidth // 8}").type

    def same(a, off, stride, n, buf, code):
        if code & SWAPPED:
            src, dst = a.view(bits), buf.view(bits)
            for k in range(n):
                dst[k] = bswap(src[off + k * stride])
        else:
            for k in range(n):
                buf[k] = a[off + k * stride]
    return same
