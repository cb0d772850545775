"""The "numpy" backend: the float64 reference behind the common interface."""
from . import _reference

binary = _reference.binary
count_valid = _reference.count_valid
softmax = _reference.softmax


def features():
    return {"precision": "float64 throughout", "threads": 1}
