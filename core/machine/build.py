"""Which build of the hot paths runs: compiled (Cython, from the same .py files) or pure Python.

The kernel paths, locks, CPU context and strategies are plain typed Python.  ``make install``
(``pip install -e .``) also compiles the modules in ``COMPILED`` with Cython 3 in pure-Python
mode (setup.py): each ``X.py`` gets an extension module ``X.cpython-*.so`` beside it, which
Python's import system prefers to the ``.py``.  There is no second copy of any kernel path: the
``.py`` is the source of both.

Three things decide, per module, which of the two is imported (``install()``, called from
``ptlab.core``'s ``__init__`` before any of them is imported):

  - ``PTLAB_PURE=1`` in the environment: every module of the list runs as plain Python (for
    debugging, a profiler that wants Python frames, or to compare the two builds);
    ``PTLAB_PURE=paths,cpu`` only those;
  - a stale build: setup.py records the SHA-256 of each source it compiled in
    ``core/_build_hashes.json``; a module whose ``.py`` no longer matches runs as plain Python,
    with one warning line on stderr naming it and the fix (``make install``).  So an edit to
    ``paths.py`` is never shadowed by the extension built from the old text — in the process
    backend's Ray workers, the in-process stepper and the scheduled backend alike;
  - the Cython declarations: a module's augmenting ``X.pxd`` is part of its source (its hash),
    and a module whose .pxd cimports another's extension type or C functions (paths.pxd cimports
    Machine and CpuContext) runs as Python whenever that other one does (``cimported()``).

Both work by a meta-path finder placed first on ``sys.meta_path`` that answers, for the
modules to run as Python, with a spec for the ``.py`` (a plain ``SourceFileLoader``); every
other import goes on as usual.  ``build_info()`` says which build runs ("compiled", "pure" or
"mixed") and which modules are compiled: ``ptlab --version`` prints it, ``ptlab bench`` puts
it in its table and every result file carries it in its metadata (``build``).

This module is loaded by setup.py before the package exists: it imports nothing of ptlab.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# Every module that may be compiled: the kernel paths, the machine they run on and the
# strategies; never the backends, analysis or cli.
CANDIDATES: tuple[str, ...] = (
    "machine/locks",
    "machine/cpu",
    "machine/mm",
    "machine/layout",
    "machine/events",
    "kernel/paths",
    "kernel/khugepaged",
    "kernel/oracle",
    "kernel/roles",
    "kernel/walkers",
    "kernel/strategies/pmd_clear",
    "kernel/strategies/ptl_hold",
    "kernel/strategies/migration_entry",
)
# The ones setup.py compiles: those that paid for themselves (`ptlab bench`, README "Calibration
# and dilation").  Untyped, Cython's generic code is about as fast as CPython 3.11's
# specialising interpreter: compiled that way, the CPU context, the layout, the event recorder
# and the fault path took a TLB-hit access from 1.04 to 0.90 µs, and machine/mm nothing.  What
# pays is typing, from an augmenting X.pxd beside X.py (declarations only; the .py stays the one
# source, and PTLAB_PURE ignores the .pxd): mm.pxd and cpu.pxd make Machine and CpuContext
# extension types whose fields are struct members, paths.pxd types the access and fault paths'
# CPU, machine, oracle and integers and makes them C calls, layout.pxd the entry helpers.
# Together: a TLB-hit access 0.95 -> 0.55 µs, an anonymous fault 7.9 -> 4.9 µs (2-core VM,
# loaded; `ptlab bench`).  Compiling khugepaged, the strategies, the oracle, roles or walkers
# changed no measured step (`ptlab explore --bench` runs as many steps/s either way): they stay
# plain Python, which also keeps the install short.  A .pxd edit makes its module's build stale
# as a .py edit does (source_hash() covers both).
# machine/locks is left out too: its classes are thin wrappers over one C call each, where
# CPython 3.11's specialised attribute loads (inline caches on __slots__ members) beat
# Cython's generic getattr (spin_lock + unlock through SpinLock: 194 ns compiled, 170 ns
# interpreted, before the locks moved into C).
COMPILED: tuple[str, ...] = (
    "machine/cpu",
    "machine/layout",
    "machine/events",
    "machine/mm",
    "kernel/paths",
)

CORE_DIR = Path(__file__).resolve().parent.parent  # the directory of package ptlab.core
HASHES_NAME = "_build_hashes.json"
PURE_ENV = "PTLAB_PURE"


def module_name(rel: str) -> str:
    """``machine/locks`` -> ``ptlab.core.machine.locks``."""
    return "ptlab.core." + rel.replace("/", ".")


def source_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a source file's bytes, and of the Cython declarations beside it (an
    augmenting ``X.pxd`` next to ``X.py``: its types are part of what the extension was built
    from, so editing it makes the build stale too)."""
    p = Path(path)
    h = hashlib.sha256(p.read_bytes())
    pxd = p.with_suffix(".pxd")
    if p.suffix == ".py" and pxd.is_file():
        h.update(b"\0pxd\0" + pxd.read_bytes())
    return h.hexdigest()


def pure_requested(environ: Any = None) -> frozenset[str] | bool:
    """What PTLAB_PURE asks to run as plain Python: True for every compiled module ("1", "yes",
    "true", "all"), False for none (unset, "", "0", "no", "false"), else the set of modules it
    names, comma-separated, as ``kernel/paths`` or ``paths`` (to find which module misbehaves
    compiled, or what one module's build is worth)."""
    v = (os.environ if environ is None else environ).get(PURE_ENV, "").strip()
    if v.lower() in ("", "0", "no", "false"):
        return False
    if v.lower() in ("1", "yes", "true", "all"):
        return True
    return frozenset(w.strip().replace(".", "/") for w in v.split(",") if w.strip())


def _named(rel: str, names: frozenset[str] | bool) -> bool:
    if isinstance(names, bool):
        return names
    return rel in names or rel.rpartition("/")[2] in names


def _extension(py: Path) -> Path | None:
    """The compiled module built beside ``py``, if any."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        so = py.with_suffix(suffix)
        if so.exists():
            return so
    return None


class PureFinder:
    """A meta-path finder: for the named modules, the spec of their ``.py`` source, so that the
    extension module built beside it is not imported."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> Any:
        if fullname not in self.names or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            src = Path(entry) / f"{leaf}.py"
            if src.is_file():
                loader = importlib.machinery.SourceFileLoader(fullname, str(src))
                return importlib.util.spec_from_file_location(fullname, str(src), loader=loader)
        return None

    def invalidate_caches(self) -> None:
        pass


class BuildInfo:
    """What install() decided: the modules that run compiled, those that run as Python while a
    compiled build of them exists (pure requested, or stale), and those with no build."""

    def __init__(self) -> None:
        self.compiled: list[str] = []
        self.stale: list[str] = []
        self.forced_pure: list[str] = []
        self.unbuilt: list[str] = []

    @property
    def build(self) -> str:
        """"compiled" (every module of COMPILED), "pure" (none) or "mixed"."""
        if not self.compiled:
            return "pure"
        return "compiled" if len(self.compiled) == len(COMPILED) else "mixed"

    def describe(self) -> str:
        """One line: ``build: compiled (Cython: cpu, mm, ...)`` / ``build: pure (PTLAB_PURE=1)`` /
        ``build: mixed (11 compiled; plain Python: paths)``."""
        b = self.build
        if b == "compiled":
            return f"build: compiled (Cython: {', '.join(m.rpartition('.')[2] for m in self.compiled)})"
        if b == "pure":
            if self.forced_pure:
                why = f"{PURE_ENV}={os.environ.get(PURE_ENV, '1')}"
            elif self.stale:
                why = "every compiled module is stale: make install"
            else:
                why = "no compiled modules built"
            return f"build: pure ({why})"
        pure = [m.rpartition(".")[2] for m in self.stale + self.forced_pure + self.unbuilt]
        return f"build: mixed ({len(self.compiled)} compiled; plain Python: {', '.join(pure)})"

    def to_dict(self) -> dict[str, Any]:
        return {"build": self.build, "compiled": list(self.compiled), "stale": list(self.stale), "pure": sorted(self.forced_pure + self.unbuilt)}


_INFO: BuildInfo | None = None
_FINDER: PureFinder | None = None


def _read_hashes(core_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((core_dir / HASHES_NAME).read_text())
        return {str(k): str(v) for k, v in data.get("sources", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def decide(core_dir: Path = CORE_DIR, environ: Any = None) -> BuildInfo:
    """Per module of COMPILED: compiled, stale, forced pure or unbuilt (no side effects)."""
    info = BuildInfo()
    hashes = _read_hashes(core_dir)
    pure = pure_requested(environ)
    for rel in CANDIDATES:
        name = module_name(rel)
        py = core_dir / f"{rel}.py"
        if rel not in COMPILED:
            if _extension(py) is not None:
                info.stale.append(name)  # left over from a build that compiled it
            continue
        if _extension(py) is None:
            info.unbuilt.append(name)
        elif _named(rel, pure):
            info.forced_pure.append(name)
        elif not py.is_file() or hashes.get(rel) != source_hash(py):
            info.stale.append(name)  # no record of its source, or the source changed since
        else:
            info.compiled.append(name)
    # a compiled module whose .pxd cimports another (its extension type, its C functions) can
    # only run compiled beside that one's build: when that one runs as Python, so must it
    # (pure if that one was asked to be, else stale), and so on down the chain
    deps = {rel: cimported(core_dir, rel) for rel in COMPILED}
    changed = True
    while changed:
        changed = False
        for rel in COMPILED:
            name = module_name(rel)
            if name not in info.compiled:
                continue
            python = [module_name(d) for d in deps[rel] if module_name(d) not in info.compiled]
            if python:
                info.compiled.remove(name)
                forced = all(d in info.forced_pure for d in python)
                (info.forced_pure if forced else info.stale).append(name)
                changed = True
    return info


_CIMPORT = re.compile(r"^\s*from\s+ptlab\.core\.([\w.]+)\s+cimport\b", re.M)


def cimported(core_dir: Path, rel: str) -> set[str]:
    """The modules of COMPILED whose declarations ``rel``'s .pxd cimports (``from
    ptlab.core.machine.mm cimport Machine`` -> ``machine/mm``)."""
    pxd = core_dir / f"{rel}.pxd"
    if not pxd.is_file():
        return set()
    found = {m.replace(".", "/") for m in _CIMPORT.findall(pxd.read_text())}
    return found & set(COMPILED)


def install(core_dir: Path = CORE_DIR) -> BuildInfo:
    """Put the finder first on sys.meta_path for every module that must run as Python although
    an extension of it is built; warn once (stderr) about stale ones.  Idempotent."""
    global _INFO, _FINDER
    if _INFO is not None:
        return _INFO
    info = decide(core_dir)
    names = info.stale + info.forced_pure
    if names:
        _FINDER = PureFinder(names)
        sys.meta_path.insert(0, _FINDER)
    if info.stale:
        files = ", ".join(f"core/{n[len('ptlab.core.'):].replace('.', '/')}.py" for n in info.stale)
        print(f"ptlab: the compiled build of {files} is stale (source edited since, or left from an "
              f"older build): running it as plain Python; `make install` rebuilds", file=sys.stderr)
    _INFO = info
    return info


def build_info() -> BuildInfo:
    """What this process runs (install() has run when ptlab.core was imported)."""
    return _INFO if _INFO is not None else install()


def loaded_build() -> str:
    """The build of the COMPILED modules imported so far, from their files: "compiled", "pure"
    or "mixed" ("pure" when none is imported yet)."""
    kinds = set()
    for rel in COMPILED:
        mod = sys.modules.get(module_name(rel))
        if mod is not None:
            kinds.add(str(getattr(mod, "__file__", "")).endswith(".py"))
    if not kinds or kinds == {True}:
        return "pure"
    return "compiled" if kinds == {False} else "mixed"
