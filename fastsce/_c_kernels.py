"""C backend: the only module that touches the compiled cffi library.

It turns a validated call into raw pointers, int64 shapes and strides and a
params struct, runs the kernel (cffi releases the GIL during the call) and
returns the block partials per group (`_partials`) as the Numba backend does.
"""
import numpy as np

from . import _cffi_kernels
from ._layout import (BLOCK, HALF, SLOTS, SWAPPED, kernel_dtype, make_plan, softmax_tile,
                      stream_gradient)
from ._memory import check_softmax_scratch, size_text, softmax_scratch_bytes
from ._partials import block_arrays, from_blocks
from ._threads import mark_openmp_used

ffi, lib = _cffi_kernels.ffi, _cffi_kernels.lib

# One value per language for each shared constant, and they must agree.
for _name, _value in (("BLOCK", BLOCK), ("SWAPPED", SWAPPED), ("HALF", HALF)):
    if getattr(lib, f"FASTSCE_{_name}") != _value:
        raise ImportError(f"C kernels built with FASTSCE_{_name}="
                          f"{getattr(lib, f'FASTSCE_{_name}')}, Python has {_value}")

_CODES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
          np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16", np.dtype(np.int64): "i64"}
_CTYPES = {"f32": "float *", "f64": "double *", "u8": "uint8_t *", "u16": "uint16_t *",
           "i64": "int64_t *"}


def _code(a):
    return _CODES[kernel_dtype(a.dtype)]


def _ptr(plan, slot, code):
    """Pointer of the kernel's type to element (0, ..., 0) of a slot (in its
    storage, which differs if converted), or NULL."""
    flat = plan.flats[slot]
    if flat is None:
        return ffi.NULL
    buf = ffi.from_buffer(flat, require_writable=slot in ("g", "l"))
    return ffi.cast(_CTYPES[code], buf + int(plan.offsets[SLOTS.index(slot)]) * flat.itemsize)


def _params(call, plan):
    p = ffi.new("fastsce_params *")
    p.convert = plan.codes.tolist()
    p.scale = call.scale
    p.eps = call.label_smoothing
    p.has_ignore = call.ignore_value is not None
    p.ignore = call.ignore_value or 0
    p.from_logits = call.from_logits
    p.divergence = call.divergence
    p.num_threads = call.threads
    p.stream_grad = stream_gradient(call.grad)
    if call.threads > 1 and lib.FASTSCE_HAVE_OPENMP:  # one thread stays out of OpenMP
        mark_openmp_used()
    return p


def _i64(a):
    return ffi.from_buffer("int64_t *", a)


def _f64(a):
    return ffi.from_buffer("double *", a)


#: Bytes of a binary walk's per-thread scratch: a BLOCK-long row buffer per
#: slot and the block's element losses (compute type, 8 bytes at most).
WALK_SCRATCH = (len(SLOTS) + 1) * 8 * BLOCK


def _check(status, what, per_thread, threads):
    if status == lib.FASTSCE_ENOMEM:
        raise MemoryError(
            f"fastsce C kernel {what}: could not allocate its per-thread scratch, up to "
            f"{size_text(per_thread)} per thread for num_threads={threads}. Use fewer threads."
        )


def binary(call):
    x, t = _code(call.x), _code(call.z)
    plan = make_plan(call.shape, {"x": call.x, "z": call.z, "w": call.w, "m": call.m,
                                  "pw": call.pw, "g": call.grad, "l": call.loss_map},
                     group_size=call.group_size)
    parts = block_arrays(plan.n_blocks)
    if plan.n_blocks:
        strides = np.ascontiguousarray(plan.strides)
        fn = getattr(lib, f"fastsce_sigmoid_ce_{x}_{t}")
        _check(fn(len(plan.shape), _i64(plan.shape), plan.group_size,
                  _ptr(plan, "x", x), _ptr(plan, "z", t), _ptr(plan, "w", x),
                  _ptr(plan, "m", "u8"), _ptr(plan, "pw", x), _i64(strides), _params(call, plan),
                  _f64(call.gscale), _ptr(plan, "g", x), _ptr(plan, "l", x),
                  _f64(parts[0]), _i64(parts[1]), _i64(parts[2]), _i64(parts[3])),
               "sigmoid_cross_entropy", WALK_SCRATCH, call.threads)
    return from_blocks(*parts, plan.n_groups)


def softmax(call):
    x, t = _code(call.x), _code(call.z)
    plan = make_plan(call.shape, {"x": call.x, "z": call.z, "w": call.w, "m": call.m,
                                  "g": call.grad, "l": call.loss_map},
                     group_size=call.group_size, class_axis=call.axis, full_shape=call.x.shape)
    parts = block_arrays(plan.n_blocks)
    if plan.n_blocks:
        check_softmax_scratch(call.classes, call.threads)
        strides = np.ascontiguousarray(plan.strides)
        cw = ffi.NULL if call.cw is None else ffi.from_buffer(_CTYPES[x], call.cw)
        fn = getattr(lib, f"fastsce_softmax_ce_{x}_{t}")
        _check(fn(len(plan.shape), _i64(plan.shape), plan.group_size, call.classes,
                  softmax_tile(call.classes), _ptr(plan, "x", x), _ptr(plan, "z", t),
                  _ptr(plan, "w", x), _ptr(plan, "m", "u8"), _i64(strides),
                  _i64(plan.class_strides), cw, _params(call, plan), _f64(call.gscale),
                  _ptr(plan, "g", x), _ptr(plan, "l", x),
                  _f64(parts[0]), _i64(parts[1]), _i64(parts[2]), _i64(parts[3])),
               "softmax_cross_entropy", softmax_scratch_bytes(call.classes), call.threads)
    return from_blocks(*parts, plan.n_groups)


def count_valid(call):
    t = _code(call.z)
    plan = make_plan(call.shape, {"z": call.z, "m": call.m}, group_size=call.group_size)
    parts = block_arrays(plan.n_blocks)
    if plan.n_blocks:
        strides = np.ascontiguousarray(plan.strides)
        fn = getattr(lib, f"fastsce_count_valid_{t}")
        _check(fn(len(plan.shape), _i64(plan.shape), plan.group_size,
                  _ptr(plan, "z", t), _ptr(plan, "m", "u8"), _i64(strides), _params(call, plan),
                  _i64(parts[1]), _i64(parts[2]), _i64(parts[3])), "count_valid",
               WALK_SCRATCH, call.threads)
    return from_blocks(*parts, plan.n_groups)


def features():
    return {
        "openmp": bool(lib.FASTSCE_HAVE_OPENMP),
        "build_flags": ffi.string(lib.FASTSCE_BUILD_FLAGS).decode(),
        "cpu_path": ffi.string(lib.fastsce_cpu_path()).decode(),
        "vectorized_math": ("inlined polynomial exp/log with fused multiply-adds (vfmadd on "
                            "the AVX2/AVX-512 paths; libm fmaf, exact but slow, on baseline)"),
    }
