"""Threads, fork, spawn and forkserver, under every Numba threading layer that
loads here (README, "Threads, processes and fork").

Each scenario runs in a fresh process (parallel_cases.py) with
NUMBA_THREADING_LAYER set, so that an abort (the workqueue layer's reaction to
concurrent launches) or a hang (GNU OpenMP after fork) fails its own test,
with the process's output, instead of killing or stalling pytest.
"""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastsce
from conftest import require_backend

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIO_TIMEOUT = 300   # seconds, over the children's own 60 s
LAYER_MODULES = {"omp": "omppool", "workqueue": "workqueue", "tbb": "tbbpool"}


def _layer(name):
    """`name` if this Numba can load that layer, else skip."""
    try:
        importlib.import_module(f"numba.np.ufunc.{LAYER_MODULES[name]}")
    except ImportError as exc:
        pytest.skip(f"Numba's {name} threading layer does not load here: {exc}")
    return name


@pytest.fixture(params=sorted(LAYER_MODULES))
def layer(request):
    require_backend("numba")
    require_backend("c")
    return _layer(request.param)


def _scenario(layer, *args):
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "parallel_cases.py"), *args],
                          env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert f'"layer": "{layer}"' in proc.stdout, proc.stdout   # the layer asked for ran
    return proc.stdout


def test_eight_threads_match_serial(layer):
    # Both fast backends, sigmoid and softmax, float32 and float64, 1-3
    # threads, from 8 Python threads at once: bitwise the serial results.
    out = _scenario(layer, "threads")
    assert '"wrong": []' in out


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_children_compute_and_do_not_hang(layer, backend):
    # fork before any call, fork after a 2-thread call, spawn, forkserver:
    # every child gives the parent's results, one thread only after the fork
    # that follows OpenMP.
    out = _scenario(layer, "fork", backend)
    for method in ("fork before any call", "fork", "spawn", "forkserver"):
        assert f'"{method}": "ok"' in out, out


def test_info_reports_threading():
    info = fastsce.info()
    assert info["forked_after_openmp"] is False
    if info["backends"]["numba"]["available"]:
        fastsce.sigmoid_cross_entropy(np.zeros(3), np.ones(3), backend="numba", num_threads=2)
        info = fastsce.info()
        assert info["numba_threading_layer"] in LAYER_MODULES
        assert isinstance(info["numba_threading_policy"], str)
