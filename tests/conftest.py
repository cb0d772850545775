"""Shared fixtures: the backend matrix and the hypothesis profiles.

A backend that cannot load here is skipped with the reason ``fastsce.info()``
records, unless ``FASTSCE_REQUIRE_BACKENDS`` (comma list; CI sets
"numba,c") names it: then every test that needs it fails.
"""
import os
import sys

import pytest
from hypothesis import settings

# The helper modules (exact.py, naive.py) sit beside the tests; make them
# importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastsce  # noqa: E402  (a broken import must fail the whole run loudly)

ALL_BACKENDS = ("numba", "c", "numpy")
FAST_BACKENDS = ("numba", "c")

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None,
                          print_blob=True)
settings.register_profile("dev", max_examples=20, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def required_backends():
    raw = os.environ.get("FASTSCE_REQUIRE_BACKENDS", "")
    return {part.strip().lower() for part in raw.split(",") if part.strip()}


def require_backend(name):
    """Return ``name`` if usable; else skip (or fail when it is required)."""
    record = fastsce.info()["backends"].get(name)
    if record is None:
        pytest.fail(f"fastsce.info() does not list backend {name!r}")
    if not record["available"]:
        message = f"backend {name!r} unavailable: {record['reason']}"
        if name in required_backends():
            pytest.fail(f"{message} (required by FASTSCE_REQUIRE_BACKENDS)")
        pytest.skip(message)
    return name


# Session scope: hypothesis tests may use these (function-scoped fixtures are
# rejected by its health check), and info() is asked once per backend.
@pytest.fixture(params=ALL_BACKENDS, scope="session")
def backend(request):
    """Every backend: "numba", "c" and the float64 "numpy" reference."""
    return require_backend(request.param)


@pytest.fixture(params=FAST_BACKENDS, scope="session")
def fast_backend(request):
    """The compiled backends only."""
    return require_backend(request.param)
