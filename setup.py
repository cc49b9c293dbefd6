"""Build of the compiled CPU kernels; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gmmrefine._native",
            sources=["src/gmmrefine/_native.c"],
            # -ffp-contract=off: no fused multiply-adds, so the insertion rounds as the torch code does.
            # -fopenmp: the projection kernels' threads; at run time libgomp.so.1 resolves to the copy
            # torch has already loaded, so both share one thread pool.
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c99", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],
        )
    ]
)
