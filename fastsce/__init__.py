"""fastsce: fused CPU kernels for cross-entropy with soft labels.

One public function per loss; every backend (Numba, C, the NumPy float64
reference) sits behind it. See ``info()`` for what this machine offers.
"""
from ._accumulator import Accumulator
from ._api import LossResult, sigmoid_cross_entropy, softmax_cross_entropy
from ._backends import use_backend
from ._evaluate import Evaluation, evaluate
from ._errors import (
    BackendUnavailableError,
    FastSCEError,
    FastSCETypeError,
    FastSCEValueError,
    TargetRangeError,
)
from ._info import info
from ._layout import BLOCK

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "BLOCK",
    "BackendUnavailableError",
    "Evaluation",
    "FastSCEError",
    "FastSCETypeError",
    "FastSCEValueError",
    "LossResult",
    "TargetRangeError",
    "evaluate",
    "info",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "use_backend",
]
