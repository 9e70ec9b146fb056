"""The package layout keeps its imports pointing one way:

    cli -> cluster, probe -> analysis, backends -> kernel -> workloads -> machine

A module may import from its own layer or any layer below, never above — function-level
imports included (they are how a cycle hides)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "ptlab.core.machine": 0,
    "ptlab.workloads": 1,
    "ptlab.core.kernel": 2,
    "ptlab.core.analysis": 3,
    "ptlab.core.backends": 3,
    "ptlab.core.probe": 4,
    "ptlab.cluster": 4,
    "ptlab.cli": 5,
}
DIRS = {"core/machine": "ptlab.core.machine", "workloads": "ptlab.workloads", "core/kernel": "ptlab.core.kernel",
        "core/analysis": "ptlab.core.analysis", "core/backends": "ptlab.core.backends", "core/probe": "ptlab.core.probe",
        "cluster": "ptlab.cluster", "cli": "ptlab.cli"}


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            best = layer
    return best


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptlab"):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("ptlab")]
    return out


def test_imports_point_one_way():
    wrong = []
    for d, pkg in DIRS.items():
        own = LAYERS[pkg]
        for f in sorted((ROOT / d).rglob("*.py")):
            for mod in _imports(f):
                layer = _layer(mod)
                if layer is not None and layer > own:
                    wrong.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not wrong, "imports pointing up the layers:\n" + "\n".join(wrong)


def test_core_has_only_the_five_subpackages():
    modules = {p.name for p in (ROOT / "core").iterdir() if p.suffix == ".py" and p.name != "__init__.py"}
    assert modules == set(), f"modules left at the top of core/: {sorted(modules)}"
