"""Build of the compiled CPU kernels; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gmmrefine._native",
            sources=["src/gmmrefine/_native.c"],
            # -ffp-contract=off: no fused multiply-adds, so the kernels round as the torch code does.
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c99"],
        )
    ]
)
