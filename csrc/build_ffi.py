"""cffi builder (out-of-line API mode) for the C kernels, run by setup.py.

OpenMP is probed by compiling and linking a tiny program: FASTSCE_OPENMP=auto
(default) uses it when that works and warns loudly when it does not;
FASTSCE_OPENMP=1 makes its absence an error, 0 builds serial kernels. The
outcome is compiled into the library (FASTSCE_HAVE_OPENMP) for info().
Flags: -O3 without -ffast-math (it breaks NaN/inf and the polynomials'
rounding, PERF_NOTES), -ffp-contract=off so results match the Numba backend.
FASTSCE_SCHEDULE=0 builds without GCC's pre-allocation scheduler (below).
FASTSCE_SANITIZE=1 adds AddressSanitizer and UndefinedBehaviorSanitizer
(.ci/sanitize builds a copy of the tree so, never the installed library).
"""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
BASE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-std=c99"]
# GCC's pre-register-allocation scheduler, off by default on x86: it
# interleaves the long exp/log chains of the loops (Zen 4, 1 thread: W1 5%
# faster, W2 4%, W3 3%, W4 4% with walk.h keeping it off the transposes). Used
# if the compiler takes it (clang does not); FASTSCE_SCHEDULE=0 leaves it out.
SCHEDULE = ["-fschedule-insns", "-fsched-pressure"]
# Any undefined behavior (and a float to integer conversion out of range)
# aborts at once; -fno-wrapv undoes Python's -fwrapv, which would hide signed
# overflow; frame pointers and -g for readable stacks; one copy of the loops,
# for this CPU (the copy its clones would pick), builds in half the time.
SANITIZE = ["-fsanitize=address,undefined,float-cast-overflow",
            "-fno-sanitize-recover=undefined,float-cast-overflow", "-fno-wrapv",
            "-fno-omit-frame-pointer", "-g", "-DFASTSCE_NO_CLONES", "-march=native"]


def _cdef_source():
    text = (HERE / "fastsce.h").read_text()
    return text.split("/* CDEF BEGIN */")[1].split("/* CDEF END */")[0]


PLAIN_PROBE = "int main(void){return 0;}\n"
OMP_PROBE = ("#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\n"
             "n+=1;\nreturn omp_get_max_threads()>0&&n>0?0:1;}\n")


def _compiles(flags, src=OMP_PROBE):
    """True if the C compiler builds and links `src` (by default an OpenMP program)
    with `flags`."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        c = pathlib.Path(tmp, "probe.c")
        c.write_text(src)
        try:
            res = subprocess.run(cc.split() + [str(c), "-o", str(pathlib.Path(tmp, "probe"))] + flags,
                                 capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return res.returncode == 0


def openmp_flags():
    mode = os.environ.get("FASTSCE_OPENMP", "auto").strip().lower()
    if mode == "0":
        return [], []
    for flags in (["-fopenmp"], ["-Xpreprocessor", "-fopenmp", "-lomp"]):
        if _compiles(flags):
            return flags, [f for f in flags if f != "-Xpreprocessor"]
    if mode == "1":
        sys.exit("FASTSCE_OPENMP=1 but the compiler cannot build an OpenMP program")
    warnings.warn(
        "\n\n*** fastsce: the C compiler cannot build OpenMP programs; the C kernels will "
        "run on ONE thread. Install an OpenMP runtime (gcc's libgomp, or libomp for clang) "
        "and rebuild. ***\n",
        stacklevel=1,
    )
    return ["-fopenmp-simd"] if _compiles(["-fopenmp-simd"], PLAIN_PROBE) else [], []


compile_omp, link_omp = openmp_flags()
sanitize = SANITIZE if os.environ.get("FASTSCE_SANITIZE", "0").strip() == "1" else []
use_schedule = os.environ.get("FASTSCE_SCHEDULE", "1").strip() != "0"
schedule = SCHEDULE if use_schedule and _compiles(SCHEDULE + ["-Werror"], PLAIN_PROBE) else []
flags = BASE_FLAGS + schedule + compile_omp + sanitize
ffibuilder = FFI()
ffibuilder.cdef(_cdef_source())
ffibuilder.set_source(
    "fastsce._cffi_kernels",
    '#include "fastsce.h"\n',
    # setuptools wants paths relative to setup.py's folder.
    sources=[os.path.relpath(HERE / name)
             for name in ("sigmoid_ce.c", "softmax_ce.c", "scratch.c")],
    include_dirs=[os.path.relpath(HERE)],
    # the headers too, or an edit of one alone leaves an in-place build stale
    depends=[os.path.relpath(p) for p in sorted(HERE.glob("*.h"))],
    extra_compile_args=flags + [f'-DFASTSCE_BUILD_FLAGS_STR="{" ".join(flags)}"'],
    extra_link_args=link_omp + sanitize[:1],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
