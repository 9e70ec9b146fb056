"""The compiled build of the hot paths (core/machine/build.py, setup.py): ``PTLAB_PURE=1`` runs
the plain .py even when the extensions are built, an edited source is never shadowed by its
stale extension, and both builds run the same kernel paths to the same result, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ptlab.core.machine import build

ROOT = Path(__file__).resolve().parent.parent
SO = ".cpython-311-x86_64-linux-gnu.so"


def _py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != build.PURE_ENV}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


FILES = "import ptlab.core.kernel.paths as p, ptlab.core.machine.cpu as c; print(p.__file__); print(c.__file__)"


def test_pure_env_runs_the_py_sources():
    r = _py(FILES, PTLAB_PURE="1")
    assert r.returncode == 0, r.stderr
    assert all(f.endswith(".py") for f in r.stdout.split()), r.stdout
    assert r.stderr == ""  # PTLAB_PURE is no staleness: no warning


def test_default_runs_the_compiled_build_when_it_is_fresh():
    info = build.decide()
    if os.environ.get("CI"):  # CI installs with `make test`: the compiled build, every module
        assert info.build == "compiled", info.to_dict()
    if info.build != "compiled":
        pytest.skip(f"no fresh compiled build here ({info.describe()})")
    r = _py(FILES)
    assert r.returncode == 0, r.stderr
    assert all(f.endswith(".so") for f in r.stdout.split()), r.stdout
    assert r.stderr == ""
    assert "build: compiled (Cython: " in _py("from ptlab.cli.main import main; main(['--version'])").stdout


def test_pure_env_can_name_modules():
    assert build.pure_requested({"PTLAB_PURE": "paths, machine/mm"}) == frozenset({"paths", "machine/mm"})
    assert build.pure_requested({"PTLAB_PURE": "0"}) is False and build.pure_requested({}) is False
    assert build.pure_requested({"PTLAB_PURE": "yes"}) is True


def _fake_core(tmp_path: Path, rels: tuple[str, ...]) -> Path:
    """A core/ with each module's .py, a (fake) extension beside it, and the build's hashes."""
    core = tmp_path / "core"
    for rel in rels:
        py = core / f"{rel}.py"
        py.parent.mkdir(parents=True, exist_ok=True)
        py.write_text(f"WHO = {rel!r}\n")
        py.with_name(py.stem + SO).write_bytes(b"not an ELF file")
    hashes = {rel: build.source_hash(core / f"{rel}.py") for rel in rels}
    (core / build.HASHES_NAME).write_text(json.dumps({"format": 1, "sources": hashes}))
    return core


def test_an_edited_source_is_stale(tmp_path: Path):
    core = _fake_core(tmp_path, build.COMPILED)
    assert build.decide(core, {}).build == "compiled"
    (core / "kernel/paths.py").write_text("WHO = 'edited'\n")
    info = build.decide(core, {})
    assert info.stale == ["ptlab.core.kernel.paths"] and info.build == "mixed"
    assert "plain Python: paths" in info.describe()
    # a build without a record of its sources is stale as a whole
    (core / build.HASHES_NAME).unlink()
    assert len(build.decide(core, {}).stale) == len(build.COMPILED)
    # PTLAB_PURE wins over everything
    assert build.decide(core, {"PTLAB_PURE": "1"}).build == "pure"


def test_an_edited_pxd_is_stale_too(tmp_path: Path):
    """The types in an augmenting X.pxd are part of what X's extension was built from: adding,
    editing or removing it makes the build stale, as a .py edit does; a .pxd that was there at
    build time and is unchanged does not."""
    core = _fake_core(tmp_path, build.COMPILED)
    (core / "kernel/paths.pxd").write_text("cpdef long long translate(object cpu, long long vpn, bint write)\n")
    assert build.decide(core, {}).stale == ["ptlab.core.kernel.paths"]  # added after the build
    hashes = {rel: build.source_hash(core / f"{rel}.py") for rel in build.COMPILED}
    (core / build.HASHES_NAME).write_text(json.dumps({"format": 1, "sources": hashes}))
    assert build.decide(core, {}).build == "compiled"  # built with it, unchanged
    (core / "kernel/paths.pxd").write_text("cpdef long long translate(object cpu, int vpn, bint write)\n")
    assert build.decide(core, {}).stale == ["ptlab.core.kernel.paths"]
    (core / "kernel/paths.pxd").unlink()
    assert build.decide(core, {}).stale == ["ptlab.core.kernel.paths"]


def test_a_module_that_cimports_one_running_as_python_runs_as_python_too(tmp_path: Path):
    """paths.pxd cimports Machine from mm.pxd: a compiled paths cannot import beside a pure or
    stale mm (its extension type is not there), so paths follows mm, and cpu (which cimports mm
    too) likewise; without the cimport (the negative control) paths stays compiled."""
    rels = ("machine/mm", "machine/cpu", "kernel/paths")
    if not set(rels) <= set(build.COMPILED):
        pytest.skip("mm, cpu and paths are not all compiled")
    core = _fake_core(tmp_path, build.COMPILED)
    (core / "machine/cpu.pxd").write_text("from ptlab.core.machine.mm cimport Machine\n")
    (core / "kernel/paths.pxd").write_text("cimport cython\nfrom ptlab.core.machine.cpu cimport CpuContext\n")
    hashes = {rel: build.source_hash(core / f"{rel}.py") for rel in build.COMPILED}
    (core / build.HASHES_NAME).write_text(json.dumps({"format": 1, "sources": hashes}))
    assert build.decide(core, {}).build == "compiled"
    info = build.decide(core, {"PTLAB_PURE": "mm"})
    assert sorted(info.forced_pure) == sorted(build.module_name(r) for r in rels) and not info.stale
    (core / "machine/mm.py").write_text("WHO = 'edited'\n")
    info = build.decide(core, {})
    assert sorted(info.stale) == sorted(build.module_name(r) for r in rels)
    assert info.build == "mixed" and all(leaf in info.describe() for leaf in ("mm", "cpu", "paths"))
    # the negative control: a paths.pxd that cimports nothing of ptlab keeps paths compiled
    (core / "machine/cpu.pxd").unlink()
    (core / "kernel/paths.pxd").write_text("cimport cython\n")
    hashes = {rel: build.source_hash(core / f"{rel}.py") for rel in build.COMPILED if rel != "machine/mm"}
    (core / build.HASHES_NAME).write_text(json.dumps({"format": 1, "sources": hashes}))
    assert build.decide(core, {}).stale == [build.module_name("machine/mm")]


def test_every_pxd_declares_a_compiled_module_or_the_c_types():
    """A .pxd beside a module that is not compiled would be dead text (Cython never reads it)."""
    rels = {str(p.relative_to(ROOT / "core").with_suffix("")) for p in (ROOT / "core").glob("*/*.pxd")}
    assert rels - {"machine/_prims"} <= set(build.COMPILED), rels


def test_a_module_no_longer_compiled_is_stale_when_its_old_build_is_left(tmp_path: Path):
    dropped = [m for m in build.CANDIDATES if m not in build.COMPILED]
    if not dropped:
        pytest.skip("every candidate module is compiled")
    core = _fake_core(tmp_path, build.CANDIDATES)
    assert build.module_name(dropped[0]) in build.decide(core, {}).stale


def test_the_finder_imports_the_py_instead_of_the_extension(tmp_path: Path):
    """A package whose extension beside mod.py is broken: the normal import picks the extension
    (and fails); with the finder it runs mod.py."""
    pkg = tmp_path / "h8pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("WHO = 'py'\n")
    (pkg / f"mod{SO}").write_bytes(b"not an ELF file")
    code = ("import sys; sys.path.insert(0, {p!r}); {pre}"
            "import h8pkg.mod as m; print(m.WHO)")
    plain = _py(code.format(p=str(tmp_path), pre=""))
    assert plain.returncode != 0 and "ImportError" in plain.stderr  # the check below matters
    fixed = _py(code.format(p=str(tmp_path), pre="from ptlab.core.machine.build import PureFinder; "
                                                 "sys.meta_path.insert(0, PureFinder(['h8pkg.mod'])); "))
    assert fixed.returncode == 0 and fixed.stdout.strip() == "py", fixed.stderr


def test_install_warns_once_naming_the_stale_module_and_the_fix(tmp_path: Path):
    core = _fake_core(tmp_path, build.COMPILED)
    rel = build.COMPILED[0]
    (core / f"{rel}.py").write_text("WHO = 'edited'\n")
    # build.py loaded by path (as setup.py does): the real tree's own install() stays out of it
    code = ("import importlib.util as u; from pathlib import Path; "
            f"s = u.spec_from_file_location('b', {str(Path(build.__file__))!r}); b = u.module_from_spec(s); "
            "s.loader.exec_module(b); "
            f"b.install(Path({str(core)!r})); b.install(Path({str(core)!r}))")
    r = _py(code)
    lines = [ln for ln in r.stderr.splitlines() if "stale" in ln]
    assert len(lines) == 1 and f"core/{rel}.py" in lines[0] and "make install" in lines[0], r.stderr


def test_results_carry_the_build(tmp_path: Path):
    from ptlab.core.analysis.results import SCHEMA_VERSION, read_run, write_run

    f = write_run(tmp_path / "r.arrow", {"run_id": [], "strategy": [], "cpu": [], "role": [], "op": [],
                                          "t_start_ns": [], "latency_ns": [], "order": []},
                  {"schema_version": SCHEMA_VERSION, "run_id": "r", "kind": "sim"})
    assert read_run(f).meta["build"] == build.build_info().build


SCHED = """
import hashlib
from ptlab.core.backends.scheduled import make_scheduler, run_scheduled
from ptlab.core.machine.build import loaded_build
from ptlab.core.machine.config import RunConfig
out = []
for strategy, bugs in (("ptl-hold", ()), ("migration-entry", ()), ("ptl-hold", ("ptl-hold-no-flush",))):
    c = RunConfig(strategy=strategy, order=4, cpus={"app": 1, "gup-fast": 1, "khugepaged": 1}, nr_pmds=1,
                  workload="hotset", inject_bugs=bugs, unsafe=bool(bugs))
    r = run_scheduled(c, make_scheduler("random", 7))
    out.append(f"{strategy} {bugs} {r.outcome} {r.steps} {r.trace_hash} {sorted(v['kind'] for v in r.violations)}")
print(loaded_build())
print("\\n".join(out))
"""


def test_compiled_and_pure_run_the_same_schedules_bit_for_bit():
    """The scheduled backend (greenlets switching inside compiled frames) gives the same trace
    hash, steps and findings on either build: compiling changed no kernel path."""
    pure = _py(SCHED, PTLAB_PURE="1")
    assert pure.returncode == 0, pure.stderr
    default = _py(SCHED)
    assert default.returncode == 0, default.stderr
    assert pure.stdout.splitlines()[0] == "pure"
    if build.decide().build != "compiled":
        pytest.skip("no fresh compiled build to compare with")
    assert default.stdout.splitlines()[0] == "compiled"
    assert default.stdout.splitlines()[1:] == pure.stdout.splitlines()[1:]
    assert "violation" in pure.stdout.splitlines()[-1]  # the injected bug is found on both
