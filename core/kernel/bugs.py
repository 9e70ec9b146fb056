"""What each strategy and each injectable bug does, and the correctness matrix that proves the
oracle: every safe strategy stays clean beside a positive control that is caught under the same
settings, every bug is caught *with the kinds it must produce*, and the known answers from the
kernel's history (70cbc3cc78a9, 2ba99c5e0881) come out on both sides.

A verdict means what it says: a run that could not complete (a CPU raised — ``cpu_exception`` —
or the watchdog found no progress) is a failed run, never a catch; a catch whose kinds are none
of the expected ones is "caught with wrong kind"; a clean verdict without a caught control does
not count.  The mutants (core/machine/mutants.py) extend the matrix to every safety step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ptlab.core.machine.config import HPAGE_PMD_ORDER, PTE_LEVEL_ONLY
from ptlab.core.machine.mutants import (
    CHAOS_US,
    CPUS,
    FAILED_RUN,
    MUTANTS,
    PIN_HOLD_US,
    STALE_TLB,
    Mutant,
)

STRATEGY_TEXT = {
    "pmd-clear": (
        "Today's collapse_huge_page() (order 9) and Nico Pache's mTHP v16 (orders < 9): mmap_lock "
        "for write, the VMA write-locked, anon_vma for write; the whole PMD cleared and flushed, "
        "tlb_remove_table_sync_one(), isolate, copy with no spinlock, install, pmd_populate. "
        "Keeps a) b) c): GUP-fast sees pmd_none or backs off on its PMD re-check; no translation "
        "survives the flush and faults sleep on mmap_lock; walkers are excluded by the mmap/VMA/"
        "anon_vma locks. Faulting CPUs in the VMA and every mmap() of the mm sleep for the whole "
        "collapse."
    ),
    "ptl-hold": (
        "David Hildenbrand's sketch: under mmap_lock for read, take the PTE lock and hold it from "
        "clearing the PTEs + flushing the TLB, through the reference check and the copy, to "
        "re-inserting the new PTEs (the originals are kept for back-off). Keeps a) b) c): the "
        "flush kills every translation, and everything that would map the range needs the PTL. "
        "A faulting CPU sees pte_none (a write fault allocates and zeroes a folio, a read fault "
        "goes for the zero page), then spins on the PTL and throws its work away. Holes need "
        "nothing extra: filling or zapping one needs the PTL. The VMA is kept stable by mmap_lock "
        "for read (--vma-stability mmap-lock, as proposed: every mmap() of the mm waits for the "
        "collapse) or only by the VMA's own read lock (vma-lock: mmap() of other VMAs goes on)."
    ),
    "migration-entry": (
        "Dev Jain's proposal, mirroring anon page migration: lock and isolate the old folios, turn "
        "their PTEs into migration entries and flush under the PTL, check for pins, drop the PTL, "
        "copy, then replace the entries under the PTL and unlock the folios. Keeps a) b) c): "
        "migration entries are not present (GUP-fast falls back), the flush killed every "
        "translation, and walkers see the entries. A faulting CPU sleeps in "
        "migration_entry_wait() until the folio unlock instead of spinning. Holes (none or "
        "zero-page PTEs) are the devil in the detail: --holes mark puts a marker in each (a "
        "migration entry to the new folio, locked until the install), so faulters sleep there "
        "too; --holes backoff leaves them open and undoes the collapse if one was filled "
        "(SCAN_PAGE_FILLED). Entries zapped meanwhile stay zapped (SCAN_PTE_ZAPPED). The VMA is "
        "kept stable by mmap_lock for read (--vma-stability mmap-lock, as proposed) or only by "
        "the VMA's own read lock (vma-lock)."
    ),
}

BUG_TEXT = {
    "ptl-hold-no-flush": (
        "ptl-hold", "b)",
        "Clears the PTEs but never flushes the TLB: a CPU keeps reading and writing the old folio "
        "through its cached translation during and after the copy. The oracle sees lost writes, "
        "stale reads and writes into the freed old folio (use after free).",
    ),
    "ptl-hold-unlocked-copy": (
        "ptl-hold", "b) c)",
        "Drops the PTL for the copy while the PTEs are none: a fault installs a fresh page in a "
        "hole, which the re-insert overwrites. The oracle sees lost writes and a folio whose "
        "mapcount no longer matches its mappings.",
    ),
    "migration-no-refcheck": (
        "migration-entry", "a)",
        "Never checks for GUP pins: a DMA engine keeps writing the old folio through its pin after "
        "the copy. The oracle sees the DMA write missing through the page table after unpin.",
    ),
    "migration-refcheck-before-unmap": (
        "migration-entry", "a)",
        "Checks references before installing the migration entries (A2 before A1): a GUP-fast pin "
        "taken between the check and the unmap is missed, with the same lost DMA write.",
    ),
    "migration-holes-open": (
        "migration-entry", "(result)",
        "The proposal as first written: only present PTEs become migration entries, so pte_none "
        "holes stay open while the PTL is dropped; a racing fault fills one, the install keeps "
        "the fault's page, and the collapse still says SCAN_SUCCEED with the new folio partly "
        "mapped. collapse_range() flags it (partial_collapse).",
    ),
    "rfc-v1": (
        "ptl-hold", "b)",
        "The first RFC's order: under the PTL copy first, then clear and set_ptes, no flush. "
        "Writes made through the TLB during and after the copy land in the old folio: lost writes.",
    ),
    "pmd-clear-read-lock": (
        "pmd-clear", "b) c)",
        "pmd-clear under mmap_lock for read and without vma_start_write(): a fault finds the PMD "
        "none, installs a new PTE table and a page, and pmd_populate() then overwrites it: lost "
        "writes and a leaked folio.",
    ),
    "gup-fast-no-pmd-recheck": (
        "any", "a)",
        "GUP-fast without the PMD re-check of 70cbc3cc78a9. Alone it is safe: the flush IPI (ipi "
        "mode) or tlb_remove_table_sync_one() (broadcast mode) waits for the IRQs-off walk. With "
        "no-sync-ipi on a broadcast-TLBI machine it pins a folio after the reference check.",
    ),
    "no-sync-ipi": (
        "pmd-clear", "a)",
        "pmd-clear without tlb_remove_table_sync_one() (2ba99c5e0881). Alone it is safe: GUP-fast "
        "re-checks the PMD. Together with gup-fast-no-pmd-recheck it is caught in broadcast mode "
        "and safe in ipi mode, where the flush IPI waits for the IRQs-off walk.",
    ),
    "pmd-clear-no-anon-vma-lock": (
        "pmd-clear", "c)",
        "pmd-clear without anon_vma_lock_write(): rmap walkers run while the PMD is cleared. A "
        "migration (the rmap-walk CPU) that unmapped a folio of the same PTE table before the "
        "clear runs remove_migration_ptes() behind it, finds no table behind the PMD and leaves "
        "its migration entry (the next fault on it would loop for ever). The oracle sees "
        "walker_missed_mapping. Needs --rmap-walk.",
    ),
    "pt-walk-no-ptl": (
        "any", "c)",
        "A page-table walker (MADV_COLD / MADV_PAGEOUT of the pt-walk CPU) that reads the PTEs "
        "and acts on them without pte_offset_map_lock(). Under ptl-hold and migration-entry it "
        "derives the old folios from their PTEs while the collapse holds the PTL between "
        "isolating them and invalidating the PTEs: walker_grabbed_collapsing_folio. Under "
        "pmd-clear it stays harmless: mmap_lock for write keeps it out. Needs --pt-walk.",
    ),
}

# What each bug must produce: a bug cell passes only when one of these kinds appears.  The
# cells and kinds of the bugs that delete a safety step live with the mutants (core/machine/mutants.py),
# so that one table says, for every step, what its deletion looks like to the oracle.
BUG_KINDS: dict[str, tuple[str, ...]] = {
    **{name: m.kinds for name, m in MUTANTS.items() if m.is_bug and m.kinds},
    "migration-holes-open": ("partial_collapse",),
    "rfc-v1": STALE_TLB,
    # caught only together with no-sync-ipi on a broadcast machine (see check_cases)
    "gup-fast-no-pmd-recheck": ("lost_dma_write", "pt_use_after_free"),
    "pmd-clear-no-anon-vma-lock": ("walker_missed_mapping",),
    "pt-walk-no-ptl": ("walker_grabbed_collapsing_folio",),
}

# The positive control of each strategy's clean cells: the same CPUs, workload, chaos and
# duration with one step deleted — the clean verdict counts only if this is caught.
CONTROL = {
    "pmd-clear": "mutant-pmd-clear-no-flush",
    "ptl-hold": "ptl-hold-no-flush",
    "migration-entry": "mutant-migration-no-flush",
}
# ... and of the GUP-fast known answers that must stay clean: a pin check deleted, which only a
# pin racing the collapse in these very settings can expose.
PIN_CONTROL = "mutant-pmd-clear-no-refcheck"

SAFE_CPUS = CPUS["pin"]
GUP_CPUS = {"app": 2, "gup-fast": 1, "zap": 1, "khugepaged": 1}  # zap_huge_pmd frees tables
# one CPU of each walker (five CPUs: the walkers idle between walks, so two cores carry them)
WALK_CPUS = {"app": 1, "rmap-walk": 1, "pt-walk": 1, "vma-change": 1, "khugepaged": 1}
STRESS = {"workload": "hotset", "nr_pmds": 1, "pin_hold_us": 50, "chaos": True, "chaos_us": CHAOS_US}


def expected_kinds(bugs: tuple[str, ...]) -> tuple[str, ...]:
    """The violation kinds that count as catching a combination of bugs/mutants."""
    out: list[str] = []
    for b in bugs:
        kinds = MUTANTS[b].kinds if b in MUTANTS else BUG_KINDS.get(b, ())
        out += [k for k in kinds if k not in out]
    return tuple(out)


@dataclass(frozen=True, eq=False)  # identity: a case is a key of its runs
class CheckCase:
    """One cell of the correctness matrix: a configuration and what the oracle must say about
    it — one of the ``expect`` kinds, or nothing at all (``expect == ()``: clean).  A clean
    cell carries its positive control."""

    strategy: str
    bugs: tuple[str, ...]
    flush: str
    order: int
    expect: tuple[str, ...]
    cpus: dict[str, int] = field(default_factory=dict)
    why: str = ""
    control: CheckCase | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def expect_caught(self) -> bool:
        return bool(self.expect)

    @property
    def label(self) -> str:
        return "+".join(self.bugs) if self.bugs else "(safe)"

    def params(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "order": self.order,
            "flush": self.flush,
            "cpus": dict(self.cpus),
            "inject_bugs": self.bugs,
            "unsafe": bool(self.bugs),
            **STRESS,
            **self.extra,
        }

    def with_control(self, bug: str) -> CheckCase:
        """This clean cell with its positive control: the same settings plus ``bug``."""
        ctl = replace(self, bugs=(*self.bugs, bug), expect=expected_kinds((bug,)), why=f"positive control of {self.label}", control=None)
        return replace(self, control=ctl)


def case_for(m: Mutant) -> CheckCase:
    """The real-backend cell that must kill mutant (or bug) ``m``."""
    assert m.cell is not None, f"{m.name} is equivalent: {m.equivalent}"
    p = m.cell.params()
    extra = {k: v for k, v in p.items() if k not in ("strategy", "order", "flush", "cpus")}
    return CheckCase(m.cell.strategy, (m.name,), m.cell.flush, m.cell.order, m.kinds, p["cpus"], m.step, extra=extra)


def check_cases(orders: tuple[int, ...] = (4, 9)) -> list[CheckCase]:
    """Every safe strategy (two app CPUs, GUP-fast pins, holes, chaos on) beside its positive
    control, every injectable bug with the kinds it must produce, and the known answers for
    GUP-fast's PMD re-check (70cbc3cc78a9) and the sync IPI (2ba99c5e0881) on both flush modes."""
    cases = [
        CheckCase(s, (), f, o, (), SAFE_CPUS, "safe").with_control(CONTROL[s])
        for s in STRATEGY_TEXT
        for o in orders
        for f in ("ipi", "broadcast")
        if not (o == HPAGE_PMD_ORDER and s in PTE_LEVEL_ONLY)  # order 9 is pmd-clear only
    ]
    explicit = {"no-sync-ipi", "pmd-clear-no-anon-vma-lock", "pt-walk-no-ptl"}  # their cells are below
    cases += [case_for(m) for m in MUTANTS.values() if m.is_bug and m.cell is not None and m.name not in explicit]
    cases.append(CheckCase("ptl-hold", ("rfc-v1",), "ipi", 4, STALE_TLB, CPUS["app"], "copy before clear, no flush"))
    cases.append(CheckCase("migration-entry", ("migration-holes-open",), "ipi", 4, ("partial_collapse",), CPUS["app"], "holes left open while the PTL is dropped", extra={}))
    both = ("gup-fast-no-pmd-recheck", "no-sync-ipi")
    pin = ("lost_dma_write", "pt_use_after_free")
    # the clean known answers run with long pin holds, so that their control (a pin check
    # deleted) can be caught under the very same settings (see mutants.PIN_HOLD_US)
    held = {"pin_hold_us": PIN_HOLD_US, "stress_target": "collapse"}
    cases += [
        CheckCase("pmd-clear", both, "broadcast", 9, pin, GUP_CPUS, "no PMD re-check and no sync IPI: nothing waits for the walk"),
        CheckCase("pmd-clear", both, "ipi", 9, (), GUP_CPUS, "the flush IPI waits for the IRQs-off walk", extra=held).with_control(PIN_CONTROL),
        CheckCase("pmd-clear", ("no-sync-ipi",), "broadcast", 9, ("pt_use_after_free",), GUP_CPUS, "nothing waits for the walk before zap_huge_pmd frees the table"),
        CheckCase("pmd-clear", ("no-sync-ipi",), "ipi", 9, (), GUP_CPUS, "the flush IPI waits for the IRQs-off walk", extra=held).with_control(PIN_CONTROL),
    ]
    for f in ("ipi", "broadcast"):
        cases.append(CheckCase("pmd-clear", ("gup-fast-no-pmd-recheck",), f, 9, (), GUP_CPUS, "the sync IPI waits for the walk", extra=held).with_control(PIN_CONTROL))
    # requirement c): every strategy clean with all three walkers beside it, and the walker
    # checks caught (core/kernel/walkers.py)
    cases += [CheckCase(s, (), "ipi", 4, (), WALK_CPUS, "walkers beside the collapse").with_control(CONTROL[s]) for s in STRATEGY_TEXT]
    cases += [
        CheckCase("pmd-clear", ("pmd-clear-no-anon-vma-lock",), "ipi", 4, ("walker_missed_mapping",), {"app": 1, "rmap-walk": 1, "khugepaged": 1}, "an rmap walk behind the cleared PMD"),
        CheckCase("migration-entry", ("pt-walk-no-ptl",), "ipi", 4, ("walker_grabbed_collapsing_folio",), {"app": 1, "pt-walk": 1, "khugepaged": 1}, "a PTE read without the PTL mid-collapse"),
        CheckCase("pmd-clear", ("pt-walk-no-ptl",), "ipi", 4, (), {"app": 1, "pt-walk": 1, "khugepaged": 1}, "mmap_lock for write keeps the walker out").with_control(CONTROL["pmd-clear"]),
    ]
    return cases


def mutant_cases(names: tuple[str, ...] = ()) -> list[CheckCase]:
    """One cell per non-equivalent mutant (and per bug that deletes a step), or only ``names``."""
    return [case_for(m) for m in MUTANTS.values() if m.cell is not None and (not names or m.name in names)]


def verdict(case: CheckCase, kinds: dict[str, int], error: str = "") -> tuple[bool, str]:
    """Judge one run of a cell: (as expected?, what was observed).  A run that failed (a CPU
    raised, the watchdog fired) is never a catch; a catch with none of the expected kinds is
    "caught with wrong kind"."""
    if error:
        return False, f"run failed: {error}"
    failed = [k for k in kinds if k in FAILED_RUN]
    if failed:
        return False, f"run failed: {', '.join(failed)}"
    found = ", ".join(f"{k}×{n}" for k, n in kinds.items())
    if not case.expect:
        return (not kinds), ("clean" if not kinds else f"not clean: {found}")
    if any(k in case.expect for k in kinds):
        return True, f"caught: {found}"
    if kinds:
        return False, f"caught with wrong kind {', '.join(kinds)}"
    return False, "missed"


def first_catch_s(case: CheckCase, violations: list[dict[str, Any]]) -> float | None:
    """Seconds from the start gate (warm-up included) to the first violation of an expected
    kind, or None."""
    ts = [v["t_ns"] for v in violations if v["kind"] in case.expect and v.get("t_ns")]
    return min(ts) / 1e9 if ts else None
