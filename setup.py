"""Build the C primitives; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ptlab.core.machine._prims",
            sources=["core/machine/_prims.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
            libraries=["pthread"],
        ),
        Extension(
            "ptlab.core.probe._kprobe",
            sources=["core/probe/_kprobe.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
            libraries=["pthread"],
        ),
    ],
)
