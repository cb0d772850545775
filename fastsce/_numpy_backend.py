"""The "numpy" backend: the float64 reference behind the common interface."""
import functools

from . import _reference


def _full_size(kernel):
    """`kernel`, whose failed full-size temporary is a MemoryError that says so."""
    @functools.wraps(kernel)
    def run(call):
        try:
            return kernel(call)
        except MemoryError as exc:
            raise MemoryError(
                f"the numpy reference backend computes on full-size float64 temporaries "
                f"and could not allocate one: {exc}. Use backend='c' or 'numba', which "
                "make none."
            ) from None
    return run


binary = _full_size(_reference.binary)
count_valid = _full_size(_reference.count_valid)
softmax = _full_size(_reference.softmax)


def features():
    return {"precision": "float64 throughout", "threads": 1}
