"""dask is optional: `import fastsce` never imports it, and `fastsce.dask`
without it says how to install it. (Subprocesses: this process may have dask.)"""
import subprocess
import sys


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout


def test_import_fastsce_does_not_import_dask():
    assert run("import sys, fastsce; fastsce.info(); print('dask' in sys.modules)") == "False\n"


def test_fastsce_dask_without_dask_says_how_to_install():
    out = run("import sys\nsys.modules['dask'] = None  # as if not installed\n"
              "try:\n    import fastsce.dask\nexcept ImportError as exc:\n    print(exc)")
    assert out == 'fastsce.dask needs dask; install it with: pip install "fastsce[dask]"\n'
