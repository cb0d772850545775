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
