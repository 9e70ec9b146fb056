"""Run configuration: every parameter of one simulated run, validated when built.

A RunConfig is what a result file's metadata records under ``params`` (``to_dict``) and what a
sweep cell carries to the node that runs it.  Validation happens here, once, with messages that
say what to do (hypothesis-style), so the CLI, the sweep and the tests all refuse the same things.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ptlab.core.errors import ConfigError

PTRS_PER_PTE = 512
HPAGE_PMD_ORDER = 9


class Strategy(str, Enum):
    PMD_CLEAR = "pmd-clear"
    PTL_HOLD = "ptl-hold"
    MIGRATION_ENTRY = "migration-entry"


class Role(str, Enum):
    APP = "app"
    GUP_FAST = "gup-fast"
    GUP_SLOW = "gup-slow"
    MMAP = "mmap"
    ZAP = "zap"
    KHUGEPAGED = "khugepaged"


class FlushMode(str, Enum):
    IPI = "ipi"
    BROADCAST = "broadcast"


class PtlMode(str, Enum):
    SPLIT = "split"
    MM = "mm"


# Injectable bugs: name -> (strategy it applies to or None for any, one-line description).
# The long descriptions live in core/bugs.py; this table is what validation needs.
BUGS: dict[str, str | None] = {
    "ptl-hold-no-flush": "ptl-hold",
    "ptl-hold-unlocked-copy": "ptl-hold",
    "migration-no-refcheck": "migration-entry",
    "migration-refcheck-before-unmap": "migration-entry",
    "rfc-v1": "ptl-hold",
    "pmd-clear-read-lock": "pmd-clear",
    "gup-fast-no-pmd-recheck": None,
    "no-sync-ipi": "pmd-clear",
    # test-only: never releases the PTL, to prove the watchdog (not listed by `ptlab strategies`)
    "test-ptl-leak": None,
}

DEFAULT_CPUS: Mapping[str, int] = {"app": 1, "gup-fast": 0, "khugepaged": 1}


@dataclass(frozen=True)
class RunConfig:
    """One run of one strategy.  Units: seconds for durations, µs for pin_hold_us, bytes for
    page_size; ``cpus`` maps a role name to the number of simulated CPUs running it."""

    strategy: str = Strategy.PMD_CLEAR.value
    order: int = HPAGE_PMD_ORDER
    duration_s: float = 3.0
    warmup_s: float = 0.3
    cpus: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_CPUS))
    workload: str = "random"
    seed: int = 0
    flush: str = FlushMode.IPI.value
    ptl: str = PtlMode.SPLIT.value
    vma_locks: bool = True
    inject_bugs: tuple[str, ...] = ()
    unsafe: bool = False
    chaos: bool = False
    page_size: int = 4096
    nr_pmds: int = 4  # size of the collapsing VMA in PMDs (2 MiB each with 4 KiB pages)
    nr_frames: int = 0  # 0: sized from nr_pmds (enough for the VMA, the copies and churn)
    pin_hold_us: int = 200
    max_ptes_none: int = 511
    watchdog_s: float = 10.0
    quiesce_s: float = 1.0  # check the invariants at a quiescent point this often (0: only at the end)
    mthp_fault_order: int = 0  # >0: faults on an all-none range may allocate this order
    zap_pages: int = 8  # pages per MADV_DONTNEED

    def __post_init__(self) -> None:
        validate(self)

    @property
    def nr_cpus(self) -> int:
        return sum(self.cpus.values())

    @property
    def pages(self) -> int:
        return self.nr_pmds * PTRS_PER_PTE

    @property
    def frames(self) -> int:
        if self.nr_frames:
            return self.nr_frames
        # the VMA, one target folio per collapser, the other VMAs and slack for fragmentation
        return self.pages * 2 + 4 * PTRS_PER_PTE

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cpus"] = dict(self.cpus)
        d["inject_bugs"] = list(self.inject_bugs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown run parameter(s): {', '.join(sorted(unknown))}")
        kw = dict(d)
        if "inject_bugs" in kw:
            kw["inject_bugs"] = tuple(kw["inject_bugs"])
        return cls(**kw)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _choices(enum: type[Enum]) -> str:
    return ", ".join(m.value for m in enum)  # type: ignore[attr-defined]


def validate(c: RunConfig) -> None:
    """Raise ConfigError with a message that says what to do."""
    if c.strategy not in {s.value for s in Strategy}:
        raise ConfigError(f"unknown strategy {c.strategy!r}; choose one of: {_choices(Strategy)}")
    if not 2 <= c.order <= HPAGE_PMD_ORDER:
        raise ConfigError(f"--order {c.order} is out of range; collapse orders are 2..9 (9 = PMD THP)")
    if not c.duration_s > 0:
        raise ConfigError(f"--duration must be positive (got {c.duration_s})")
    if c.warmup_s < 0:
        raise ConfigError(f"warm-up must be >= 0 s (got {c.warmup_s})")
    roles = {r.value for r in Role}
    for role, n in c.cpus.items():
        if role not in roles:
            raise ConfigError(f"unknown role {role!r}; roles are: {_choices(Role)}")
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"CPU count for role {role} must be a non-negative integer (got {n!r})")
    if c.nr_cpus <= 0:
        raise ConfigError("a run needs at least one simulated CPU; give e.g. --app 1 --khugepaged 1")
    if c.nr_cpus > 63:
        raise ConfigError(f"{c.nr_cpus} simulated CPUs: at most 63 are supported (mm_cpumask is one word)")
    if c.flush not in {m.value for m in FlushMode}:
        raise ConfigError(f"unknown flush mode {c.flush!r}; choose one of: {_choices(FlushMode)}")
    if c.ptl not in {m.value for m in PtlMode}:
        raise ConfigError(f"unknown PTL mode {c.ptl!r}; choose one of: {_choices(PtlMode)}")
    for bug in c.inject_bugs:
        if bug not in BUGS:
            names = ", ".join(b for b in BUGS if not b.startswith("test-"))
            raise ConfigError(f"unknown bug {bug!r}; injectable bugs are: {names}")
    if c.inject_bugs and not c.unsafe:
        raise ConfigError("--inject-bug runs a known-broken kernel path; add --unsafe to confirm")
    if c.page_size < 1024 or c.page_size & (c.page_size - 1) or c.page_size > 65536:
        raise ConfigError(f"page size {c.page_size} must be a power of two between 1024 and 65536")
    if c.nr_pmds < 1:
        raise ConfigError(f"the collapsing VMA needs at least one PMD (got {c.nr_pmds})")
    if c.nr_frames and c.nr_frames < c.pages + (1 << c.order):
        raise ConfigError(
            f"{c.nr_frames} frames cannot hold {c.pages} pages plus one order-{c.order} target "
            f"folio; give at least {c.pages + (1 << c.order)} frames or fewer PMDs"
        )
    if c.frames > (1 << 22):
        raise ConfigError(f"{c.frames} frames is too many (at most {1 << 22})")
    if c.pin_hold_us < 0:
        raise ConfigError(f"pin hold time must be >= 0 µs (got {c.pin_hold_us})")
    if not 0 <= c.max_ptes_none < PTRS_PER_PTE:
        raise ConfigError(f"max_ptes_none must be in 0..511 (got {c.max_ptes_none})")
    if c.quiesce_s < 0:
        raise ConfigError(f"quiescent-check interval must be >= 0 s (got {c.quiesce_s})")
    if c.watchdog_s <= 0:
        raise ConfigError(f"watchdog limit must be positive (got {c.watchdog_s})")
    if c.mthp_fault_order and not 2 <= c.mthp_fault_order < HPAGE_PMD_ORDER:
        raise ConfigError(f"mTHP fault order must be 0 (off) or 2..8 (got {c.mthp_fault_order})")
    if c.zap_pages < 1:
        raise ConfigError(f"zap size must be at least one page (got {c.zap_pages})")
