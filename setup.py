"""Build the C primitives and compile the hot paths; everything else is declared in pyproject.toml.

The hot paths (core/machine/build.py: COMPILED) are compiled by Cython 3 from the very .py files
that also run as plain Python: no .pyx, no second copy.  An editable install builds each
extension beside its .py and records the SHA-256 of every source it compiled in
core/_build_hashes.json, which ptlab.core reads at import to run an edited module as Python
until the next ``make install``.  ``PTLAB_NO_COMPILE=1`` builds only the C primitives.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CYTHON_DIR = Path("build") / "cython"  # the generated .c files (relative: setuptools wants it so)
C_ARGS = ["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"]


def _build_module():
    """core/machine/build.py, loaded by path: the package is not importable yet."""
    spec = importlib.util.spec_from_file_location("_ptlab_build", HERE / "core" / "machine" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _build_module()
COMPILED_SOURCES: dict[str, str] = {}  # rel -> SHA-256 of the source each extension was generated from


def _sources() -> dict[str, str]:
    return {rel: BUILD.source_hash(HERE / "core" / f"{rel}.py") for rel in BUILD.COMPILED}


def compiled_extensions() -> list[Extension]:
    if os.environ.get("PTLAB_NO_COMPILE", "") not in ("", "0"):
        return []
    from Cython.Build import cythonize

    # Cython decides from time stamps whether a .c is out of date; the hash record of the last
    # generation makes that exact (a checkout can give an older .py a newer time stamp)
    record = HERE / CYTHON_DIR / "sources.json"
    try:
        generated = json.loads(record.read_text())
    except (OSError, ValueError):
        generated = {}
    sources = _sources()
    for rel, digest in sources.items():
        if generated.get(rel) != digest:
            (HERE / CYTHON_DIR / "core" / f"{rel}.c").unlink(missing_ok=True)
    exts = [
        Extension(BUILD.module_name(rel), [f"core/{rel}.py"], extra_compile_args=["-O2", "-Wno-unused-function"])
        for rel in BUILD.COMPILED
    ]
    # Cython finds the declarations core/X.pxd of module ptlab.core.X (an augmenting .pxd beside
    # a compiled .py, or _prims.pxd for the C types) as ptlab/core/X.pxd on its include path; the
    # package directory is this checkout (package-dir): a link to each
    include = HERE / CYTHON_DIR / "include"
    for link in include.glob("ptlab/core/*/*.pxd"):
        if not link.resolve().is_file():
            link.unlink()
    for pxd in (HERE / "core").glob("*/*.pxd"):
        link = include / "ptlab" / pxd.relative_to(HERE)
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(pxd)
    out = cythonize(
        exts,
        include_path=[str(include)],
        build_dir=str(CYTHON_DIR),
        nthreads=os.cpu_count() or 1,
        quiet=True,
        compiler_directives={
            "language_level": 3,
            # annotations stay annotations: a `float` or `int` hint must not turn a Python
            # object into a C double/long (same behaviour as the .py, bit for bit)
            "annotation_typing": False,
            "binding": True,
        },
    )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(sources, indent=1, sort_keys=True))
    COMPILED_SOURCES.update(sources)
    return out


class BuildExt(build_ext):
    """build_ext, in parallel, that also writes core/_build_hashes.json beside the package."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        super().run()
        names = {BUILD.module_name(rel): rel for rel in BUILD.COMPILED}
        built = [e.name for e in self.extensions if e.name in names]
        if not built:
            return
        # the directory of package ptlab.core, wherever this build puts extensions
        first = Path(self.get_ext_fullpath(built[0]))
        core_dir = first.parents[len(built[0].split(".")) - 3]
        data = {"format": 1, "compiler": "cython", "sources": {names[n]: COMPILED_SOURCES[names[n]] for n in built}}
        (core_dir / BUILD.HASHES_NAME).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        for rel in set(BUILD.CANDIDATES) - set(BUILD.COMPILED):  # no longer compiled: drop the old build
            for so in (core_dir / rel).parent.glob(f"{Path(rel).name}.*.so"):
                so.unlink()


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "ptlab.core.machine._prims",
            sources=["core/machine/_prims.c"],
            extra_compile_args=C_ARGS,
            libraries=["pthread"],
        ),
        Extension(
            "ptlab.core.probe._kprobe",
            sources=["core/probe/_kprobe.c"],
            extra_compile_args=C_ARGS,
            libraries=["pthread"],
        ),
        *compiled_extensions(),
    ],
)
