"""PyTorch is optional: `import fastsce` never imports it, and `fastsce.torch`
without it says how to install it. (Subprocesses: this process may have torch.)"""
import subprocess
import sys


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout


def test_import_fastsce_does_not_import_torch():
    assert run("import sys, fastsce; fastsce.info(); print('torch' in sys.modules)") == "False\n"


def test_fastsce_torch_without_torch_says_how_to_install():
    out = run("import sys\nsys.modules['torch'] = None  # as if not installed\n"
              "try:\n    import fastsce.torch\nexcept ImportError as exc:\n    print(exc)")
    assert out == 'fastsce.torch needs PyTorch; install it with: pip install "fastsce[torch]"\n'
