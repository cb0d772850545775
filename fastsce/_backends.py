"""One record per backend: name, whether it loads, why not, and what it offers.

Backends load lazily (importing Numba costs a few hundred ms), once per
process. `backend=` beats the `use_backend` context beats FASTSCE_BACKEND
beats "auto".
"""
import contextlib
import contextvars
import importlib
import os
import warnings

from ._errors import BackendUnavailableError, FastSCETypeError, FastSCEValueError, shown

NAMES = ("numba", "c", "numpy")
#: "auto" takes the first available backend of its call kind's order: the faster
#: one first, as measured by `fastsce bench` (README, "Choosing a backend").
#: Numba's AVX-512 binary loop beat GCC's (W1/W2 at 1 thread on a Zen 5:
#: 1.3-1.5x; on a Zen 4 since GCC's scheduler and bit selects: W1 even, W2
#: 1.2x); C's softmax beat Numba's (W3/W4: 1.1-1.25x; even on the Zen 4).
AUTO_ORDER = {"sigmoid": ("numba", "c", "numpy"), "softmax": ("c", "numba", "numpy")}


class Backend:
    """A backend module loaded on first use; `reason` says why it failed."""

    def __init__(self, name, module):
        self.name = name
        self._module_name = module
        self._module = None
        self.reason = None
        self._tried = False

    def load(self):
        if not self._tried:
            self._tried = True
            try:
                self._module = importlib.import_module(self._module_name, __package__)
            except Exception as exc:  # any import failure makes the backend unavailable
                self.reason = f"{type(exc).__name__}: {exc}"
        return self._module

    @property
    def available(self):
        return self.load() is not None

    def features(self):
        module = self.load()
        return module.features() if module is not None else {}


BACKENDS = {
    "numba": Backend("numba", "._numba_kernels"),
    "c": Backend("c", "._c_kernels"),
    "numpy": Backend("numpy", "._numpy_backend"),
}


def _check_name(name, source):
    if name not in NAMES and name != "auto":
        raise FastSCEValueError(
            f"{source} must be one of 'auto', 'numba', 'c', 'numpy'; got {shown(name)}"
        )
    return name


def _env_default():
    raw = os.environ.get("FASTSCE_BACKEND", "").strip().lower()
    if not raw:
        return "auto"
    if raw not in NAMES and raw != "auto":
        warnings.warn(
            f"FASTSCE_BACKEND={raw!r} is not one of auto, numba, c, numpy; using 'auto'",
            RuntimeWarning,
            stacklevel=2,
        )
        return "auto"
    return raw


_ENV_DEFAULT = _env_default()
_current = contextvars.ContextVar("fastsce_backend", default=None)


@contextlib.contextmanager
def use_backend(name):
    """Context manager: calls in this block use backend `name` by default.

    >>> with fastsce.use_backend("numba"):
    ...     loss, grad = fastsce.sigmoid_cross_entropy(x, z)
    """
    token = _current.set(_check_name(name, "`use_backend(name)`"))
    try:
        yield
    finally:
        _current.reset(token)


def default_name():
    return _current.get() or _ENV_DEFAULT


def resolve(name, kind):
    """The backend module for a `backend=` argument (None: the default) of a
    `kind` ("sigmoid" or "softmax") call."""
    if name is None:
        name = default_name()
    else:
        if not isinstance(name, str):
            raise FastSCETypeError(
                f"`backend` must be one of 'auto', 'numba', 'c', 'numpy'; got {shown(name)}"
            )
        _check_name(name, "`backend`")
    if name == "auto":
        for candidate in AUTO_ORDER[kind]:
            if BACKENDS[candidate].available:
                return BACKENDS[candidate].load()
    record = BACKENDS[name]
    if not record.available:
        raise BackendUnavailableError(
            f"backend {name!r} is not available on this machine: {record.reason}. "
            f"Use backend='auto' or one of {[n for n in NAMES if BACKENDS[n].available]}; "
            "fastsce.info() shows every backend's status."
        )
    return record.load()


def resolve_name(name, kind):
    """The name of the backend `resolve(name, kind)` picks: fixed before work is
    sent to other processes, where the `use_backend` context does not reach."""
    impl = resolve(name, kind)
    return next(n for n, record in BACKENDS.items() if record.load() is impl)
