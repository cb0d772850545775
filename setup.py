# Only the cffi build lives here; everything else is in pyproject.toml.
import os
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.command.build_ext import build_ext


class ParallelBuildExt(build_ext):
    """Compiles an extension's C files side by side: the two kernel files take
    minutes each at -O3 with three clones of every loop, and setuptools builds
    one file after another (its --parallel splits extensions, of which we have
    one)."""

    def build_extension(self, ext):
        jobs = min(len(ext.sources), os.cpu_count() or 1)
        if jobs < 2 or self.compiler.compiler_type != "unix":   # (MSVC sets up lazily)
            return super().build_extension(ext)
        compile_files = self.compiler.compile

        def compile_side_by_side(sources, *args, **kwargs):
            with ThreadPoolExecutor(jobs) as pool:
                objects = pool.map(lambda src: compile_files([src], *args, **kwargs), sources)
                return [obj for objs in objects for obj in objs]

        self.compiler.compile = compile_side_by_side
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_files


setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"], cmdclass={"build_ext": ParallelBuildExt})
