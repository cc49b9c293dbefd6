"""Build of the optional compiled CPU kernels; everything else about the package is in pyproject.toml.

The extension is optional: without a working C compiler (or on a platform where it fails to build)
the package installs without it and the torch code runs instead (``gmmrefine info`` says which).
Flags are chosen per compiler: OpenMP where a test compile shows it works (GCC; Clang with libomp),
serial loops otherwise (Apple Clang without libomp, MSVC).
"""

from __future__ import annotations

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildNative(build_ext):
    """Per-compiler flags for ``gmmrefine._native``; a failed build is reported and skipped."""

    def build_extensions(self) -> None:
        if os.environ.get("GMMREFINE_NO_NATIVE"):
            print("gmmrefine: GMMREFINE_NO_NATIVE is set; not building the compiled kernels (the torch code runs)")
            self.extensions = []
            return
        msvc = self.compiler.compiler_type == "msvc"
        openmp = not msvc and self._links(["-fopenmp"])
        for ext in self.extensions:
            if msvc:
                # MSVC's OpenMP 2.0 lacks the loop forms used; its loops run serially.
                ext.extra_compile_args = ["/O2", "/fp:precise"]
            else:
                # -ffp-contract=off: no fused multiply-adds, so the insertion rounds as the torch code does.
                # -fopenmp: at run time libgomp resolves to the copy torch has loaded (one thread pool).
                ext.extra_compile_args = ["-O3", "-ffp-contract=off", "-std=c99"] + (["-fopenmp"] if openmp else [])
                ext.extra_link_args = ["-fopenmp"] if openmp else []
                ext.libraries = ["m"]
        print(f"gmmrefine: compiled kernels with {self.compiler.compiler_type}, "
              f"{'OpenMP' if openmp else 'without OpenMP (serial loops)'}")
        super().build_extensions()

    def _links(self, flags: list[str]) -> bool:
        """Whether a small OpenMP program compiles and links with ``flags``."""
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "omp_check.c")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
                self.compiler.link_executable(objects, os.path.join(tmp, "omp_check"), extra_postargs=flags)
            except Exception:  # any compiler or linker failure means: no OpenMP
                return False
        return True


setup(
    ext_modules=[Extension("gmmrefine._native", sources=["src/gmmrefine/_native.c"], optional=True)],
    cmdclass={"build_ext": BuildNative},
)
