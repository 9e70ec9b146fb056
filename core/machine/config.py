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

from ptlab.core.machine.errors import ConfigError
from ptlab.core.machine.mutants import MUTANTS

PTRS_PER_PTE = 512
HPAGE_PMD_ORDER = 9


class Strategy(str, Enum):
    PMD_CLEAR = "pmd-clear"
    PTL_HOLD = "ptl-hold"
    MIGRATION_ENTRY = "migration-entry"


# The thread's alternatives: "In contrast to PMD-collapse, we do not need to operate on two
# levels of pagetable simultaneously" — they are proposals for mTHP orders only.
PTE_LEVEL_ONLY = frozenset({"ptl-hold", "migration-entry"})


BACKENDS = ("process", "virtual")


class Role(str, Enum):
    APP = "app"
    GUP_FAST = "gup-fast"
    GUP_SLOW = "gup-slow"
    MMAP = "mmap"
    ZAP = "zap"
    KHUGEPAGED = "khugepaged"
    # requirement c)'s walkers (core/kernel/walkers.py)
    RMAP_WALK = "rmap-walk"
    PT_WALK = "pt-walk"
    VMA_CHANGE = "vma-change"


class FlushMode(str, Enum):
    IPI = "ipi"
    BROADCAST = "broadcast"


class PtlMode(str, Enum):
    SPLIT = "split"
    MM = "mm"


class HolesMode(str, Enum):
    """How ``migration-entry`` handles pte_none (and zero-page) entries of the range."""

    MARK = "mark"  # a hole marker (a migration entry to the locked new folio): faulters sleep
    BACKOFF = "backoff"  # holes stay open; a hole filled meanwhile -> restore, SCAN_PAGE_FILLED


class VmaStability(str, Enum):
    """What keeps the VMA stable across a ``ptl-hold`` / ``migration-entry`` collapse."""

    MMAP_LOCK = "mmap-lock"  # mmap_read_lock() for the whole collapse (as proposed)
    VMA_LOCK = "vma-lock"  # only the collapsing VMA's per-VMA read lock (uffd_lock_vma()-style)


# Injectable bugs: name -> (strategy it applies to or None for any, one-line description).
# The long descriptions live in core/kernel/bugs.py; this table is what validation needs.
BUGS: dict[str, str | None] = {
    "ptl-hold-no-flush": "ptl-hold",
    "ptl-hold-unlocked-copy": "ptl-hold",
    "migration-no-refcheck": "migration-entry",
    "migration-refcheck-before-unmap": "migration-entry",
    "migration-holes-open": "migration-entry",
    "rfc-v1": "ptl-hold",
    "pmd-clear-read-lock": "pmd-clear",
    "gup-fast-no-pmd-recheck": None,
    "no-sync-ipi": "pmd-clear",
    "pmd-clear-no-anon-vma-lock": "pmd-clear",
    "pt-walk-no-ptl": None,
    # test-only: never releases the PTL, to prove the watchdog (not listed by `ptlab strategies`)
    "test-ptl-leak": None,
    # test-only: khugepaged raises, to prove a CPU exception is a failed run (exit 3), never a catch
    "test-cpu-exception": None,
}

DEFAULT_CPUS: Mapping[str, int] = {"app": 1, "gup-fast": 0, "khugepaged": 1}


@dataclass(frozen=True)
class RunConfig:
    """One run of one strategy.  Units: seconds for durations, µs for pin_hold_us, bytes for
    page_size; ``cpus`` maps a role name to the number of simulated CPUs running it."""

    strategy: str = Strategy.PMD_CLEAR.value
    order: int = 4  # 64 KiB with 4 KiB pages: the mTHP orders are what the proposals are about
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
    chaos_us: int = 60  # the longest delay at a chaos point (µs); `ptlab check` widens it
    page_size: int = 4096
    nr_pmds: int = 4  # size of the collapsing VMA in PMDs (2 MiB each with 4 KiB pages)
    nr_frames: int = 0  # 0: sized from nr_pmds (enough for the VMA, the copies and churn)
    pin_hold_us: int = 200
    stress_target: str = "workload"  # where GUP and zap CPUs act: by the workload, or in the range being collapsed
    max_ptes_none: int = 511
    watchdog_s: float = 10.0
    quiesce_s: float = 1.0  # check the invariants at a quiescent point this often (0: only at the end)
    mthp_fault_order: int = 0  # >0: faults on an all-none range may allocate this order
    zap_pages: int = 8  # pages per MADV_DONTNEED
    holes: str = HolesMode.MARK.value  # migration-entry only: mark | backoff
    vma_stability: str = VmaStability.MMAP_LOCK.value  # ptl-hold, migration-entry: mmap-lock | vma-lock
    backend: str = "process"  # process: real processes, wall-clock time; virtual: kernel-cost virtual time
    think_ns: int = 0  # app CPUs: compute between two accesses (ns; virtual time needs some)
    collapse_context: str = "khugepaged"  # khugepaged: the daemon's scan; madvise: MADV_COLLAPSE's path
    stop_on: tuple[str, ...] = ()  # violation kinds that end the run at once (`check --catch-rate`: the first catch)
    placement: str = ""  # virtual backend: which core each CPU runs on (parse_placement); "": a core each

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
        d["stop_on"] = list(self.stop_on)
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
        if "stop_on" in kw:
            kw["stop_on"] = tuple(kw["stop_on"])
        return cls(**kw)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


# Access patterns of app CPUs (ptlab.workloads.patterns.Workload has the same names; a test
# holds the two together -- the machine layer does not import the workloads).
WORKLOADS = ("sequential", "random", "hotset", "zipf", "refault")  # workloads/patterns.py Workload

# The command-line flag of each parameter, for error messages; a parameter without a flag of
# `ptlab run` is named as `ptlab sweep` sets it (--set NAME=VALUE).
_FLAGS = {
    "strategy": "--strategy", "order": "--order", "duration_s": "--duration", "warmup_s": "--warmup",
    "cpus": "--app/--gup-fast/--gup-slow/--mmap/--zap/--khugepaged", "workload": "--workload",
    "seed": "--seed", "flush": "--flush", "ptl": "--ptl", "vma_locks": "--vma-locks",
    "inject_bugs": "--inject-bug", "unsafe": "--unsafe", "chaos": "--chaos",
    "nr_pmds": "--nr-pmds", "nr_frames": "--frames", "pin_hold_us": "--pin-hold-us",
    "max_ptes_none": "--max-ptes-none", "watchdog_s": "--watchdog",
    "mthp_fault_order": "--mthp-fault-order",
}
# Upper bounds that catch a typo (a duration in ms, a hold time in ns) before a run starts.
MAX_DURATION_S = 86_400.0
MAX_PIN_HOLD_US = 1_000_000
MAX_SEED = 2**63 - 1


_SET_ONLY = frozenset({"page_size", "quiesce_s", "zap_pages", "stop_on"})


def flag(name: str) -> str:
    """How a user names parameter ``name``: its `ptlab run` flag (``--max-ptes-none``), or
    ``--set name`` for the few that only `ptlab sweep --set` reaches."""
    if name in _SET_ONLY:
        return f"--set {name}"
    return _FLAGS.get(name) or f"--{name.replace('_', '-')}"


def _check_types(c: RunConfig) -> None:
    """Every field has its declared type (a bool is not an int, an int is a float, no NaN or
    infinity); the message names the flag.  Values arrive untyped from TOML and --set."""
    import math

    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        kind = str(f.type).replace("typing.", "")
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{flag(f.name)} takes a whole number (got {v!r})")
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{flag(f.name)} takes a number (got {v!r})")
            if not math.isfinite(v):
                raise ConfigError(f"{flag(f.name)} must be a finite number (got {v!r})")
        elif kind == "bool":
            if not isinstance(v, bool):
                raise ConfigError(f"{flag(f.name)} takes true or false (got {v!r})")
        elif kind == "str":
            if not isinstance(v, str):
                raise ConfigError(f"{flag(f.name)} takes a name (got {v!r})")
        elif kind.startswith("tuple[str"):
            if not isinstance(v, tuple) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{flag(f.name)} takes names (got {v!r})")
        elif kind.startswith("Mapping[str, int]"):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{flag(f.name)}: CPUs per role, e.g. {{app = 1, khugepaged = 1}} (got {v!r})")


def _choices(enum: type[Enum]) -> str:
    return ", ".join(m.value for m in enum)  # type: ignore[attr-defined]


def validate(c: RunConfig) -> None:
    """Raise ConfigError with a message that says what to do (and names the flag)."""
    _check_types(c)
    if c.strategy not in {s.value for s in Strategy}:
        raise ConfigError(f"unknown strategy {c.strategy!r}; choose one of: {_choices(Strategy)}")
    if not 2 <= c.order <= HPAGE_PMD_ORDER:
        raise ConfigError(f"--order {c.order} is out of range; collapse orders are 2..9 (9 = PMD THP)")
    if c.order == HPAGE_PMD_ORDER and c.strategy in PTE_LEVEL_ONLY:
        raise ConfigError(
            f"--order 9 is refused for {c.strategy}: a PMD-order collapse replaces the page table, "
            "which walkers reach without the PTL, so only pmd-clear models it; use an mTHP order "
            "2..8 or -s pmd-clear"
        )
    if not 0 < c.duration_s <= MAX_DURATION_S:
        raise ConfigError(f"--duration must be positive and at most {MAX_DURATION_S:,.0f} s (got {c.duration_s})")
    if not 0 <= c.warmup_s <= MAX_DURATION_S:
        raise ConfigError(f"--warmup must be 0..{MAX_DURATION_S:,.0f} s (got {c.warmup_s})")
    if c.workload not in WORKLOADS:
        raise ConfigError(f"--workload {c.workload!r} is not a choice; choose one of: {', '.join(WORKLOADS)}")
    if not 0 <= c.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be 0..2^63-1 (got {c.seed})")
    roles = {r.value for r in Role}
    for role, n in c.cpus.items():
        if role not in roles:
            raise ConfigError(f"unknown role {role!r}; roles are: {_choices(Role)}")
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"--{role} takes a non-negative whole number of CPUs (got {n!r})")
    if c.nr_cpus <= 0:
        raise ConfigError("a run needs at least one simulated CPU; give e.g. --app 1 --khugepaged 1")
    if c.nr_cpus > 127:
        raise ConfigError(f"{c.nr_cpus} simulated CPUs: at most 127 are supported")
    if c.flush not in {m.value for m in FlushMode}:
        raise ConfigError(f"unknown flush mode {c.flush!r}; choose one of: {_choices(FlushMode)}")
    if c.ptl not in {m.value for m in PtlMode}:
        raise ConfigError(f"unknown PTL mode {c.ptl!r}; choose one of: {_choices(PtlMode)}")
    for bug in c.inject_bugs:
        if bug not in BUGS and bug not in MUTANTS:  # mutants: core/machine/mutants.py, `ptlab check --mutants --list`
            names = ", ".join(b for b in BUGS if not b.startswith("test-"))
            raise ConfigError(f"unknown bug {bug!r}; injectable bugs are: {names}")
    if c.inject_bugs and not c.unsafe:
        raise ConfigError("--inject-bug runs a known-broken kernel path; add --unsafe to confirm")
    if c.page_size < 1024 or c.page_size & (c.page_size - 1) or c.page_size > 65536:
        raise ConfigError(f"--set page_size={c.page_size}: must be a power of two between 1024 and 65536")
    if c.nr_pmds < 1:
        raise ConfigError(f"--nr-pmds must be at least 1: the collapsing VMA needs a PMD (got {c.nr_pmds})")
    if c.nr_frames and c.nr_frames < c.pages + (1 << c.order):
        raise ConfigError(
            f"{c.nr_frames} frames cannot hold {c.pages} pages plus one order-{c.order} target "
            f"folio; give at least {c.pages + (1 << c.order)} frames or fewer PMDs"
        )
    if c.nr_frames < 0:
        raise ConfigError(f"--frames must be 0 (sized from the VMA) or a number of frames (got {c.nr_frames})")
    if c.frames > (1 << 22):
        raise ConfigError(f"--frames/--nr-pmds: {c.frames:,} frames is too many (at most {1 << 22:,})")
    if not 3 <= c.chaos_us <= 100_000:
        raise ConfigError(f"chaos_us must be 3..100000 µs (got {c.chaos_us})")
    if c.stress_target not in ("workload", "collapse"):
        raise ConfigError(f"stress_target {c.stress_target!r} is not a choice; choose workload or collapse")
    if not 0 <= c.pin_hold_us <= MAX_PIN_HOLD_US:
        raise ConfigError(f"--pin-hold-us must be 0..{MAX_PIN_HOLD_US:,} µs (1 s) (got {c.pin_hold_us:,})")
    if not 0 <= c.max_ptes_none < PTRS_PER_PTE:
        raise ConfigError(f"--max-ptes-none must be 0..511 (got {c.max_ptes_none})")
    if not 0 <= c.quiesce_s <= MAX_DURATION_S:
        raise ConfigError(f"--set quiesce_s must be 0..{MAX_DURATION_S:,.0f} s (got {c.quiesce_s})")
    if not 0 < c.watchdog_s <= MAX_DURATION_S:
        raise ConfigError(f"--watchdog must be positive and at most {MAX_DURATION_S:,.0f} s (got {c.watchdog_s})")
    if c.mthp_fault_order and not 2 <= c.mthp_fault_order < HPAGE_PMD_ORDER:
        raise ConfigError(f"--mthp-fault-order must be 0 (off) or 2..8 (got {c.mthp_fault_order})")
    if c.backend not in BACKENDS:
        raise ConfigError(f"--backend {c.backend!r} is not a choice; choose one of: {', '.join(BACKENDS)}")
    if not isinstance(c.think_ns, int) or not 0 <= c.think_ns <= 10_000_000:
        raise ConfigError(f"--think-ns must be 0..10000000 ns (got {c.think_ns!r})")
    if c.collapse_context not in ("khugepaged", "madvise"):
        raise ConfigError(f"--collapse-context {c.collapse_context!r} is not a choice; choose khugepaged or madvise")
    if c.collapse_context == "madvise" and c.order != HPAGE_PMD_ORDER:
        raise ConfigError("--collapse-context madvise is MADV_COLLAPSE, which collapses order 9 only; give --order 9 -s pmd-clear")
    if not 1 <= c.zap_pages <= c.pages:
        raise ConfigError(f"--set zap_pages must be 1..{c.pages} pages (got {c.zap_pages})")
    if c.holes not in {m.value for m in HolesMode}:
        raise ConfigError(f"--holes {c.holes!r} is not a choice; choose one of: {_choices(HolesMode)}")
    if c.holes != HolesMode.MARK.value and c.strategy != Strategy.MIGRATION_ENTRY.value:
        raise ConfigError(f"--holes applies to migration-entry only ({c.strategy} keeps holes closed with its locks); drop it or use -s migration-entry")
    if c.vma_stability not in {m.value for m in VmaStability}:
        raise ConfigError(f"--vma-stability {c.vma_stability!r} is not a choice; choose one of: {_choices(VmaStability)}")
    if c.vma_stability != VmaStability.MMAP_LOCK.value:
        if c.strategy == Strategy.PMD_CLEAR.value:
            raise ConfigError("--vma-stability vma-lock applies to ptl-hold and migration-entry; pmd-clear always takes mmap_lock for write")
        if not c.vma_locks:
            raise ConfigError("--vma-stability vma-lock needs per-VMA locks; drop --no-vma-locks")
    if c.placement:
        if c.backend != "virtual":
            raise ConfigError("--placement applies to --backend virtual (the process backend places its CPUs on host cores itself)")
        parse_placement(c.placement, c.nr_cpus, c.cpus.get("khugepaged", 0))


def parse_placement(spec: str, nr_cpus: int, nr_collapsers: int = 0) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The core each simulated CPU runs on and whether it runs under SCHED_IDLE, from
    ``--placement``: one ``CORE`` or ``CORE:idle`` per CPU in CPU-id order, comma-separated
    (``1:idle,1:idle,1:idle,1:idle,0``), or ``probe:N``: `ptlab kernel`'s placement on N cores
    (core/probe/kernel_probe.py placement(): with fewer cores than CPUs the khugepaged CPUs --
    the last ids -- keep core 0 and the others share the rest round robin under SCHED_IDLE;
    with enough cores, one each).  Raises ConfigError naming the flag."""
    spec = spec.strip()
    if spec.startswith("probe:"):
        n = spec.removeprefix("probe:")
        if not n.isdigit() or not 1 <= int(n) <= 127:
            raise ConfigError(f"--placement probe:N takes a number of cores 1..127 (got {spec!r})")
        cores = int(n)
        if cores >= nr_cpus:
            return tuple(range(nr_cpus)), (False,) * nr_cpus
        first = nr_cpus - nr_collapsers
        load = list(range(1, cores)) or [0]
        out = tuple(load[i % len(load)] for i in range(first)) + (0,) * nr_collapsers
        return out, (True,) * first + (False,) * nr_collapsers
    items = [x.strip() for x in spec.split(",")]
    if len(items) != nr_cpus:
        raise ConfigError(f"--placement names {len(items)} CPU(s) and the run has {nr_cpus}; give one CORE or CORE:idle per CPU in CPU-id order, or probe:N")
    cores_: list[int] = []
    idle: list[bool] = []
    for x in items:
        core, _, policy = x.partition(":")
        if not core.isdigit() or int(core) > 127 or policy not in ("", "idle", "normal"):
            raise ConfigError(f"--placement item {x!r}: give CORE (0..127) or CORE:idle (SCHED_IDLE), e.g. 1:idle,1:idle,0")
        cores_.append(int(core))
        idle.append(policy == "idle")
    return tuple(cores_), tuple(idle)
