"""Build the C primitives; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ptlab.core._prims",
            sources=["core/_prims.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
            libraries=["pthread"],
        ),
        Extension(
            "ptlab.core._kprobe",
            sources=["core/_kprobe.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
            libraries=["pthread"],
        ),
    ],
)
