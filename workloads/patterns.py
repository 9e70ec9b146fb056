"""Access patterns for app CPUs: each yields page numbers (vpn offsets inside a VMA).

All are seeded (per run seed and CPU) so a run can be repeated; each returns a callable
``next_page() -> int`` over ``[0, npages)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import Enum

from ptlab.core.machine.errors import ConfigError


class Workload(str, Enum):
    SEQUENTIAL = "sequential"
    RANDOM = "random"
    HOTSET = "hotset"
    ZIPF = "zipf"
    # app CPUs fault in a loop like `ptlab kernel`'s fault threads: MADV_DONTNEED a random run of
    # zap_pages pages, then touch each back in (even CPUs in the collapsing VMA, odd in the other)
    REFAULT = "refault"


def make_pattern(name: str, npages: int, rng: random.Random, run_seed: int = 0) -> Callable[[], int]:
    """A page picker for workload ``name``.  The hot set and the zipf ranking come from the
    run's seed, so every CPU of a run (app, GUP, zap) shares them: pins, holes and collapses
    meet in the same place.  Raises ConfigError for an unknown name."""
    shared = random.Random(run_seed * 7919 + npages)
    if name == Workload.SEQUENTIAL:
        pos = [rng.randrange(npages)]

        def sequential() -> int:
            pos[0] = (pos[0] + 1) % npages
            return pos[0]

        return sequential
    if name in (Workload.RANDOM, Workload.REFAULT):
        return lambda: rng.randrange(npages)
    if name == Workload.HOTSET:
        hot = max(1, npages // 10)
        base = shared.randrange(npages)

        def hotset() -> int:  # 90 % of accesses to a 10 % window
            if rng.random() < 0.9:
                return (base + rng.randrange(hot)) % npages
            return rng.randrange(npages)

        return hotset
    if name == Workload.ZIPF:
        weights = [1.0 / (k + 1) for k in range(npages)]
        order = list(range(npages))
        shared.shuffle(order)
        cum = []
        acc = 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        import bisect

        def zipf() -> int:
            return order[bisect.bisect_left(cum, rng.random() * acc)]

        return zipf
    names = ", ".join(w.value for w in Workload)
    raise ConfigError(f"unknown workload {name!r}; choose one of: {names}")
