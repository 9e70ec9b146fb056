"""The collapse strategies, one module each over the engine in core/kernel/khugepaged.py.

A strategy module has NAME and ``collapse(c: Collapse) -> str`` (a ScanResult name); its header
says why the seed's requirements a), b) and c) hold.  Adding one: a module here, a member of
core.config.Strategy, and a line below.
"""

from __future__ import annotations

from types import ModuleType

from ptlab.core.kernel.strategies import migration_entry, pmd_clear, ptl_hold, test_ptl_leak

STRATEGIES: dict[str, ModuleType] = {mod.NAME: mod for mod in (pmd_clear, ptl_hold, migration_entry)}


def get(name: str, bugs: frozenset[str] = frozenset()) -> ModuleType:
    """The module that runs a strategy (the watchdog's test-only leak replaces any)."""
    if "test-ptl-leak" in bugs:
        return test_ptl_leak
    return STRATEGIES[name]
