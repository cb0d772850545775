"""The float32 polynomials of the binary loss, checked on every input (the
bounds csrc/fastsce_math.h states): builds tests/exhaustive_f32.c with the
system's C compiler and runs it. About 40 s: `pytest -m slow`."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: worst ulp over every input, as measured when the polynomials were written
BOUNDS = {"exp": 1.03, "log1p_01": 1.43}


@pytest.mark.slow
def test_polynomials_on_every_float32(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "exhaustive"
    # -march=native: hardware fma (the results are the same through libm's fmaf, only slower)
    subprocess.run([cc, "-O2", "-march=native", "-ffp-contract=off", "-I", str(ROOT / "csrc"),
                    str(ROOT / "tests" / "exhaustive_f32.c"), "-o", str(exe), "-lm"], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    worst = {name: float(ulps) for name, ulps, _ in (line.split() for line in out.splitlines())}
    for name, bound in BOUNDS.items():
        assert worst[name] <= bound + 0.005, f"{name}: {worst[name]} ulp > {bound} ({out})"
