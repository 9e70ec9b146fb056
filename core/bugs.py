"""What each strategy and each injectable bug does, and the correctness matrix that proves the
oracle: every safe strategy stays clean, every bug is caught, and the known answers from the
kernel's history (70cbc3cc78a9, 2ba99c5e0881) come out on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        "A faulting CPU sees pte_none, allocates and zeroes a folio, then spins on the PTL and "
        "throws its folio away."
    ),
    "migration-entry": (
        "Dev Jain's proposal, mirroring anon page migration: lock and isolate the old folios, turn "
        "their PTEs into migration entries and flush under the PTL, check for pins, drop the PTL, "
        "copy, then replace the entries under the PTL and unlock the folios. Keeps a) b) c): "
        "migration entries are not present (GUP-fast falls back), the flush killed every "
        "translation, and walkers see the entries. A faulting CPU sleeps in "
        "migration_entry_wait() until the folio unlock instead of spinning."
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
}

APP_CPUS = {"app": 1, "khugepaged": 1}
GUP_CPUS = {"gup-fast": 1, "zap": 1, "khugepaged": 1}
SAFE_CPUS = {"app": 1, "gup-fast": 1, "khugepaged": 1}
STRESS = {"workload": "hotset", "nr_pmds": 1, "pin_hold_us": 50, "chaos": True}


@dataclass(frozen=True)
class CheckCase:
    """One cell of the correctness matrix."""

    strategy: str
    bugs: tuple[str, ...]
    flush: str
    order: int
    expect_caught: bool
    cpus: dict[str, int] = field(default_factory=dict)
    why: str = ""

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
        }


def check_cases(orders: tuple[int, ...] = (4, 9)) -> list[CheckCase]:
    """Every safe strategy (GUP-fast pins + holes, chaos on) and every injected bug."""
    cases = [
        CheckCase(s, (), f, o, False, SAFE_CPUS, "safe")
        for s in STRATEGY_TEXT
        for o in orders
        for f in ("ipi", "broadcast")
    ]
    cases += [
        CheckCase("ptl-hold", ("ptl-hold-no-flush",), "ipi", 4, True, APP_CPUS),
        CheckCase("ptl-hold", ("ptl-hold-unlocked-copy",), "ipi", 4, True, APP_CPUS),
        CheckCase("ptl-hold", ("rfc-v1",), "ipi", 4, True, APP_CPUS),
        CheckCase("pmd-clear", ("pmd-clear-read-lock",), "ipi", 9, True, APP_CPUS),
        CheckCase("migration-entry", ("migration-no-refcheck",), "ipi", 4, True, GUP_CPUS),
        CheckCase("migration-entry", ("migration-refcheck-before-unmap",), "ipi", 4, True, GUP_CPUS),
    ]
    both = ("gup-fast-no-pmd-recheck", "no-sync-ipi")
    cases += [
        CheckCase("pmd-clear", both, "broadcast", 9, True, GUP_CPUS, "no PMD re-check and no sync IPI: nothing waits for the walk"),
        CheckCase("pmd-clear", both, "ipi", 9, False, GUP_CPUS, "the flush IPI waits for the IRQs-off walk"),
    ]
    for bug, why in (("gup-fast-no-pmd-recheck", "the sync IPI waits for the walk"), ("no-sync-ipi", "the PMD re-check backs off")):
        for f in ("ipi", "broadcast"):
            cases.append(CheckCase("pmd-clear", (bug,), f, 9, False, GUP_CPUS, why))
    return cases
