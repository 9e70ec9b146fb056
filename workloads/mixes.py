"""Named role mixes: how many simulated CPUs run each role.

``ptlab run --mix NAME`` picks one; explicit per-role counts (``--app 2``) override it.
"""

from __future__ import annotations

from ptlab.core.machine.errors import ConfigError

MIXES: dict[str, dict[str, int]] = {
    # the smallest comparison: one app CPU faulting, one khugepaged
    "minimal": {"app": 1, "khugepaged": 1},
    # app + GUP-fast pins (DMA) + khugepaged: the correctness mix of the acceptance tests
    "pinning": {"app": 1, "gup-fast": 1, "khugepaged": 1},
    # app + mmap()/munmap() churn + khugepaged: who stalls mmap()
    "mmap-churn": {"app": 1, "mmap": 1, "khugepaged": 1},
    # app + requirement c)'s walkers: rmap (reclaim aging, migration), page-table (smaps,
    # MADV_COLD/PAGEOUT) and mprotect()/mmap(MAP_FIXED) on the collapsing VMA + khugepaged
    "walkers": {"app": 1, "rmap-walk": 1, "pt-walk": 1, "vma-change": 1, "khugepaged": 1},
    # everything at once (oversubscribed on a 2-core host)
    "full": {"app": 2, "gup-fast": 1, "gup-slow": 1, "mmap": 1, "zap": 1, "rmap-walk": 1, "pt-walk": 1, "vma-change": 1, "khugepaged": 1},
}


def default_cpus(host_cores: int) -> dict[str, int]:
    """The default mix sized to the host's cores without oversubscription."""
    if host_cores >= 6:
        return {"app": host_cores - 3, "gup-fast": 1, "mmap": 1, "khugepaged": 1}
    if host_cores >= 4:
        return {"app": 2, "gup-fast": 1, "khugepaged": 1}
    if host_cores >= 3:
        return {"app": 1, "gup-fast": 1, "khugepaged": 1}
    return {"app": 1, "khugepaged": 1}


def get_mix(name: str) -> dict[str, int]:
    try:
        return dict(MIXES[name])
    except KeyError:
        raise ConfigError(f"unknown role mix {name!r}; choose one of: {', '.join(MIXES)}") from None
