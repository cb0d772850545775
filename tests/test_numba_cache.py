"""Numba's disk cache must not serve a kernel built from older helper code.

Numba revalidates a cached kernel against the file that defines it only,
while our kernels inline helpers from the other `_numba_*.py` files and freeze
constants of `_layout.py` and `_reference.py`; every dispatcher id carries a
digest of all of them (fastsce/_numba_math.py)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

import fastsce

def _ids(pkg_parent):
    """(digest, an inlined helper's id) of the package copy under pkg_parent."""
    code = (
        "import fastsce._numba_math as m;"
        "print(m._SOURCE_DIGEST, m.exp_neg_f32._uuid)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=pkg_parent, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    return out


@pytest.mark.parametrize("edited", ["_numba_math.py", "_numba_softmax.py", "_layout.py",
                                    "_reference.py"])
def test_helper_edit_changes_every_id(tmp_path, edited):
    src = Path(fastsce.__file__).parent
    pkg = tmp_path / "fastsce"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = _ids(tmp_path)
    with open(pkg / edited, "a") as f:
        f.write("\n# an edit\n")
    after = _ids(tmp_path)
    assert before[0] != after[0]
    assert before[1] != after[1] and after[0] in after[1]


def test_kernel_variants_get_their_own_code_names():
    # Numba names machine code by qualname plus a per-process counter; variants
    # of one factory sharing a qualname could share a symbol, and a kernel
    # loaded from the disk cache then ran the other variant's code (a softmax
    # gradient of probabilities came out as the logits' one). `jit` puts the
    # variant key in the name.
    import numpy as np
    from fastsce import _numba_kernels, _numba_softmax
    tiles = [_numba_softmax._tile(fl, dv, False, np.float32)
             for fl in (True, False) for dv in (True, False)]
    drivers = [_numba_softmax._driver(fl, False, False, np.float32) for fl in (True, False)]
    segments = [_numba_kernels._segment(fl, False, np.float32) for fl in (True, False)]
    for group in (tiles, drivers, segments):
        names = [d.py_func.__qualname__ for d in group]
        assert len(set(names)) == len(names), names


def test_concurrent_cache_saves_keep_every_entry(tmp_path, monkeypatch):
    # Two saves of different signatures of one kernel at once (two pytest -n
    # workers, two dask workers): each reads the index before either writes
    # it. Numba's own save would give both the same data file and one entry
    # would be lost (or name the other's machine code); the flock serializes
    # them. Threads stand in for processes: each opens the lock file itself.
    import threading
    import time

    from fastsce._numba_math import jit

    @jit("cache-save-race", cache=True)
    def kernel(a):
        return a + 1

    cache_file = kernel._cache._cache_file
    monkeypatch.setattr(cache_file, "_cache_path", str(tmp_path))
    monkeypatch.setattr(cache_file, "_index_path", str(tmp_path / "kernel.nbi"))
    load_index = cache_file._load_index

    def slow_load_index():
        overloads = load_index()
        time.sleep(0.3)     # the other save reads the index meanwhile
        return overloads

    monkeypatch.setattr(cache_file, "_load_index", slow_load_index)
    saves = [threading.Thread(target=cache_file.save, args=((name,), f"code of {name}"))
             for name in ("sig-a", "sig-b")]
    for t in saves:
        t.start()
    for t in saves:
        t.join()
    monkeypatch.setattr(cache_file, "_load_index", load_index)
    assert cache_file.load(("sig-a",)) == "code of sig-a"
    assert cache_file.load(("sig-b",)) == "code of sig-b"
