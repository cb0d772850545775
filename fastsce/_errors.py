"""Exception types. Each argument error is also a ValueError or TypeError, so
callers that catch the builtin types keep working."""


class FastSCEError(Exception):
    """Base class of every error fastsce raises on purpose."""


class FastSCEValueError(FastSCEError, ValueError):
    """An argument has the right type but a wrong value or shape."""


class FastSCETypeError(FastSCEError, TypeError):
    """An argument has an unsupported type or dtype."""


class TargetRangeError(FastSCEValueError):
    """Targets outside [0, 1] or NaN were found by the fused pass."""


class BackendUnavailableError(FastSCEError, RuntimeError):
    """The requested backend could not be loaded on this machine."""


def shown(value):
    """A given value as an error message shows it: arrays by shape and dtype, never
    their contents; anything else by a short repr."""
    if hasattr(value, "shape") and hasattr(value, "dtype") and getattr(value, "ndim", 0):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
