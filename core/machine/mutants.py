"""Mutants: one named deletion or weakening of every safety step the strategies and the kernel
paths rely on, so that the oracle is trusted because each one is seen — mutation testing.

A safety step is anything whose comment says it keeps something out or keeps something true:
each TLB flush and sync IPI, each PMD/PTE re-check, each refcount/pin check, each lock whose
comment says what it excludes, each wake-up, each restore on back-off, the zap epoch bump.  For
each there is an entry here.  Either

  * a **mutant**: it names the step, the kernel function it lives in, the violation kinds that
    count as its kill, the stress cell that kills it on the real backend and the deterministic
    test (tests/test_mutants.py) that forces the interleaving exposing it; or
  * an **equivalent**: no run can tell the mutant from the original in this model, and the
    entry says why (e.g. the PMD re-check is redundant when the flush IPI waits for IRQs-off
    walkers).  An equivalent is a claim about the model, so its reason names what makes the
    step redundant here.

Some steps are deleted by the public injectable bugs (``ptl-hold-no-flush`` …); their entries
use the bug's name.  Every other mutant is named ``mutant-…`` and is injected exactly like a
bug: it is a member of the CPU's ``bugs`` set, refused without ``--unsafe``, applied in code by
a one-line test at the step (``if "mutant-x" not in cpu.bugs``, or :func:`lock_or_skip` for a
lock), never by editing files.  ``ptlab check --mutants --list`` shows them, ``ptlab check
--mutants`` runs them and prints the mutation score; ``ptlab run --help`` does not offer them.

This module imports nothing from ptlab (core/machine/config.py validates names against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Violation kinds, grouped by what they say (core/kernel/paths.py, core/kernel/roles.py, core/kernel/oracle.py).
STALE_TLB = ("lost_write", "stale_read", "use_after_free", "wrong_page", "zap_not_zeroed")
LOST_DMA = ("lost_dma_write",)
MAPPING = ("lost_write", "mapcount_mismatch", "refcount_mismatch", "leaked_folio", "pt_leak", "zap_not_zeroed", "refcount_underflow", "free_mapped")
FAILED_RUN = frozenset({"cpu_exception", "deadlock"})  # a run that could not complete: never a catch

# CPUs per role of the check cells (at least two app CPUs: the stale-read check needs two
# writers; at most four CPUs: this is a 2-core machine and spinners need cores).
CPUS: dict[str, dict[str, int]] = {
    "app": {"app": 2, "khugepaged": 1},
    "pin": {"app": 2, "gup-fast": 1, "khugepaged": 1},
    "slow": {"app": 2, "gup-slow": 1, "khugepaged": 1},
    "zap": {"app": 2, "zap": 1, "khugepaged": 1},
    "pin-zap": {"app": 1, "gup-fast": 1, "zap": 1, "khugepaged": 1},
    # requirement c)'s walkers (core/kernel/walkers.py; their cells run one app CPU)
    "rmap": {"app": 1, "rmap-walk": 1, "khugepaged": 1},
    "ptwalk": {"app": 1, "pt-walk": 1, "khugepaged": 1},
}


# How long a pin cell's GUP CPU holds each pin at least (µs).  A pin exposes a missing reference
# check only if it is taken before the collapse's unmap and still held after its copy; on a
# 2-core host that span includes the flush's wait for every target CPU to be scheduled, which is
# milliseconds (measured: 5-18 ms with four busy simulated CPUs), so short fixed holds almost
# never span it (0 of 5 runs caught migration-no-refcheck at 50 µs, 0 at 2 ms, 0 at 10 ms; 30 ms:
# 15 of 20).  And the pin must be in the range being collapsed: the pin cells' GUP CPU waits for
# a collapse and pins one of its pages (``stress_target="collapse"``) instead of following the
# workload, which put a pin in the collapsing range in about one collapse in four.  Such a
# targeted pin is held until the collapse it was aimed at is over (core/kernel/roles.py
# TARGET_HOLD_MAX_NS), so the hold spans the copy however long the flush waited, and the GUP
# CPU aims at a new collapse as soon as that one ends instead of sitting out a fixed 30 ms.
PIN_HOLD_US = 200
# The longest chaos delay of a check cell (µs): race windows at the named points (between a
# collapse's isolation and its unmap, a zap's clear and its flush, a GUP walk's PTE read and its
# grab …) are held open up to a millisecond, long enough for another process to be scheduled
# into them on a loaded 2-core host.
CHAOS_US = 1000


@dataclass(frozen=True)
class Cell:
    """The stress that kills a mutant (or proves a bug) on the real backend: one strategy,
    order and flush mode, a CPU preset from :data:`CPUS` and the shared stress settings
    (hot set shared by every CPU, one PMD, chaos on)."""

    strategy: str
    order: int = 4
    flush: str = "ipi"
    cpus: str = "app"
    pin_hold_us: int = 50
    stress_target: str = "workload"
    extra: tuple[tuple[str, Any], ...] = ()

    def params(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "order": self.order,
            "flush": self.flush,
            "cpus": dict(CPUS[self.cpus]),
            "workload": "hotset",
            "nr_pmds": 1,
            "pin_hold_us": self.pin_hold_us,
            "stress_target": self.stress_target,
            "chaos": True,
            "chaos_us": CHAOS_US,
            **dict(self.extra),
        }


@dataclass(frozen=True)
class Mutant:
    """One safety step and what deleting it must produce."""

    name: str
    step: str  # the step, in the kernel's words
    where: str  # kernel function / ptlab file
    kinds: tuple[str, ...] = ()  # violation kinds that count as the kill
    cell: Cell | None = None  # the real-backend stress that kills it
    equivalent: str = ""  # non-empty: why no run can see it (then kinds and cell are empty)
    test: str = ""  # the deterministic test in tests/test_mutants.py
    notes: str = ""

    @property
    def is_bug(self) -> bool:
        return not self.name.startswith("mutant-")


def _m(name: str, step: str, where: str, kinds: tuple[str, ...], cell: Cell, notes: str = "") -> Mutant:
    return Mutant(name, step, where, kinds, cell, test=f"test_mutant_is_killed[{name}]", notes=notes)


def _eq(name: str, step: str, where: str, why: str) -> Mutant:
    return Mutant(name, step, where, equivalent=why)


_REGISTRY: list[Mutant] = [
    # ---------------------------------------------------------------- TLB flushes and sync IPIs
    _m("ptl-hold-no-flush", "flush_tlb_range() after clearing the PTEs", "ptl_hold.collapse()", STALE_TLB, Cell("ptl-hold")),
    _m("mutant-migration-no-flush", "flush_tlb_range() after installing the migration entries (try_to_migrate_one's flush)", "migration_entry.collapse()", STALE_TLB, Cell("migration-entry")),
    _m("mutant-pmd-clear-no-flush", "flush_tlb_range() of pmdp_collapse_flush()", "pmd_clear.collapse()", STALE_TLB, Cell("pmd-clear")),
    _m("mutant-zap-no-flush", "the mmu_gather flush of zap_pte_range() before the pages are freed", "paths.zap_range()", STALE_TLB, Cell("ptl-hold")),
    _m("no-sync-ipi", "tlb_remove_table_sync_one() after pmdp_collapse_flush() (2ba99c5e0881)", "pmd_clear.collapse()", ("pt_use_after_free", "lost_dma_write"), Cell("pmd-clear", 9, "broadcast", "pin-zap"),
       notes="needs a broadcast flush (no IPI waits for IRQs-off walkers) and a zap that frees the deposited table; equivalent on x86 (ipi), where the flush IPI waits"),
    _eq("mutant-split-no-flush", "flush_tlb_range() after __split_huge_pmd()", "paths.split_huge_pmd()",
        "the PTEs a split installs map exactly the frames the huge PMD mapped, with the same permissions: a surviving huge translation reads and writes the same memory, and any later change of those PTEs flushes the range itself"),
    _eq("mutant-mprotect-no-flush", "flush_tlb_range() of change_protection()", "paths.do_mprotect()",
        "mprotect() here leaves every PTE as it was (only its locking and flush are modelled): no translation it would kill is wrong"),
    # ---------------------------------------------------------------- PMD / PTE re-checks
    _eq("gup-fast-no-pmd-recheck", "GUP-fast's PMD re-check after the grab (70cbc3cc78a9)", "paths.gup_fast()",
        "alone it is redundant: the flush IPI (ipi) or tlb_remove_table_sync_one() (broadcast) waits for the IRQs-off walk, so no walk that read the old PMD can grab after the reference check; `ptlab check` shows it caught together with no-sync-ipi on a broadcast machine"),
    _m("mutant-gup-fast-no-pte-recheck", "GUP-fast's PTE re-check after try_grab_folio_fast() (gup_fast_pte_range)", "paths.gup_fast()", LOST_DMA, Cell("ptl-hold", flush="broadcast", cpus="pin"),
       notes="equivalent on x86 (ipi): the flush IPI waits for the IRQs-off walk, so the grab precedes the reference check"),
    _m("mutant-fault-no-pte-recheck", "vmf_pte_changed() / pte_range_none() under the PTL in do_anonymous_page()", "paths.do_anonymous_page()", MAPPING, Cell("ptl-hold")),
    _eq("mutant-fault-no-pmd-recheck", "the pmd_same() re-check of pte_offset_map_lock() in do_anonymous_page()", "paths.do_anonymous_page()",
        "no path detaches a PTE table that a fault can have read: pmd-clear excludes faults (mmap_lock for write, the VMA write-locked), zap_huge_pmd() frees only the table deposited behind a huge PMD, which a fault never walks, and pmd_install() frees only its own unpublished table"),
    _m("mutant-migration-install-no-recheck", "remove_migration_ptes(): replace only our own migration entries (pte_same under the PTL)", "migration_entry.collapse()", MAPPING, Cell("migration-entry", cpus="zap", stress_target="collapse")),
    _eq("mutant-zap-no-pmd-recheck", "zap_pte_range()'s PMD re-check under the PTL", "paths.zap_range()",
        "only pmd-clear detaches a table a zap can have read, and it holds mmap_lock for write and the VMA's write lock, which exclude MADV_DONTNEED's VMA read lock and its mmap_read_lock fallback"),
    # ---------------------------------------------------------------- refcount / pin checks
    _m("migration-no-refcheck", "the expected-refcount check after the unmap (folio_maybe_dma_pinned)", "migration_entry.collapse()", LOST_DMA, Cell("migration-entry", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("migration-refcheck-before-unmap", "the refcount check placed after clear + flush (A1 -> A2), weakened to before the unmap", "migration_entry.collapse()", LOST_DMA, Cell("migration-entry", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("mutant-ptl-hold-no-refcheck", "the unexpected-reference check after clear + flush", "ptl_hold.collapse()", LOST_DMA, Cell("ptl-hold", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("mutant-pmd-clear-no-refcheck", "is_refcount_suitable() in __collapse_huge_page_isolate() after pmdp_collapse_flush()", "pmd_clear.collapse()", LOST_DMA, Cell("pmd-clear", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _eq("mutant-scan-no-refcheck", "is_refcount_suitable() in hpage_collapse_scan_pmd()", "khugepaged.scan_pmd()",
        "the scan is a racy pre-check without the collapse's locks: every strategy checks the references again after clear + flush, which is the check that matters (the scan only saves work)"),
    # ---------------------------------------------------------------- locks that exclude something
    _m("pmd-clear-read-lock", "mmap_write_lock() + vma_start_write() of collapse_huge_page()", "pmd_clear.collapse()", MAPPING, Cell("pmd-clear", 9)),
    _m("mutant-pmd-clear-no-vma-write", "vma_start_write(): excludes per-VMA-lock faults", "pmd_clear.collapse()", MAPPING, Cell("pmd-clear")),
    Mutant("pmd-clear-no-anon-vma-lock", "anon_vma_lock_write(): excludes rmap walkers while the PMD is cleared", "pmd_clear.collapse()", ("walker_missed_mapping",), Cell("pmd-clear", cpus="rmap"),
           test="tests/test_walkers.py::test_remove_migration_ptes_behind_a_cleared_pmd"),
    Mutant("pt-walk-no-ptl", "pte_offset_map_lock() of walk_page_range()'s PTE walk", "walkers.madvise_cold_or_pageout()", ("walker_grabbed_collapsing_folio",), Cell("migration-entry", cpus="ptwalk"),
           test="tests/test_walkers.py::test_page_table_walker_without_the_ptl_finds_an_old_folio"),
    _m("ptl-hold-unlocked-copy", "the PTL held across the copy", "ptl_hold.collapse()", MAPPING, Cell("ptl-hold")),
    _m("mutant-fault-no-mmap-lock", "mmap_read_lock() of the fault when the per-VMA lock fails (excludes mmap writers and pmd-clear)", "paths.handle_mm_fault()", MAPPING, Cell("pmd-clear")),
    _m("mutant-fault-no-ptl", "pte_offset_map_lock() in do_anonymous_page(): the PTEs change only under it", "paths.do_anonymous_page()", MAPPING, Cell("ptl-hold")),
    _m("mutant-gup-slow-no-mmap-lock", "mmap_read_lock() of __get_user_pages() (keeps the VMA and page-table tree stable)", "paths.gup_slow()", MAPPING + LOST_DMA, Cell("pmd-clear", cpus="slow", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("mutant-gup-slow-no-ptl", "the PTL of follow_page_pte()", "paths.gup_slow()", LOST_DMA, Cell("ptl-hold", cpus="slow", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("mutant-zap-no-ptl", "the PTL of zap_pte_range(): PTEs change only under it", "paths.zap_range()", MAPPING, Cell("migration-entry", cpus="zap", stress_target="collapse")),
    _eq("mutant-zap-no-mmap-lock", "MADV_DONTNEED's VMA read lock (lock_vma_under_rcu()) or its mmap_read_lock() fallback", "paths.zap_range()",
        "every mmap_lock writer that changes the entries a zap works on does it under the PTL (mprotect/munmap of a VMA, zap_pte_range() itself) or clears the PMD before taking the PTL (pmd-clear), and zap_pte_range() takes the PTL and re-checks the PMD under it; no page table is freed under a zap (zap_huge_pmd() frees only a huge PMD's deposit, under the PMD lock)"),
    _m("mutant-migration-unmap-no-ptl", "the PTL around the unmap (installing the migration entries)", "migration_entry.collapse()", MAPPING, Cell("migration-entry", cpus="zap", stress_target="collapse")),
    _m("mutant-migration-install-no-ptl", "the PTL of remove_migration_ptes()", "migration_entry.collapse()", MAPPING, Cell("migration-entry", cpus="zap", stress_target="collapse")),
    _m("mutant-alloc-no-zone-lock", "zone->lock around the buddy free lists", "machine.alloc_folio()/free_folio()", MAPPING + ("frame_accounting", "double_free", "use_after_free", "wrong_page"), Cell("ptl-hold")),
    # two faults must meet in pmd_install() of a PMD left none, which only zap_huge_pmd() does:
    # the zap CPU's MADV_DONTNEED covers whole 2 MiB ranges (an 8-page one that meets a THP
    # splits it instead, and leaves the PMD a table)
    _m("mutant-pmd-install-no-lock", "the PMD lock of pmd_install(): one installer wins", "machine.pte_table_for()", MAPPING, Cell("pmd-clear", 9, cpus="zap", extra=(("zap_pages", 512),))),
    _eq("mutant-pmd-clear-no-pmd-lock", "the PMD lock around pmdp_collapse_flush() and pmd_populate()", "pmd_clear.collapse()",
        "the kernel calls it \"probably unnecessary\": mmap_lock for write already excludes every other PMD writer (split and zap_huge_pmd hold mmap_lock for read)"),
    _eq("mutant-pmd-clear-detached-no-ptl", "the PTL of the detached table in pmd-clear", "pmd_clear.collapse()",
        "the table is detached and mmap_lock is held for write: no other CPU can reach it under the PTL (GUP-fast walks locklessly and is handled by the flush and re-checks)"),
    _eq("mutant-scan-no-ptl", "the PTL of hpage_collapse_scan_pmd()", "khugepaged.scan_pmd()",
        "the scan's view only decides whether to try; every strategy re-reads the PTEs under its own locks"),
    _eq("mutant-migration-wait-no-ptl", "the PTL of migration_entry_wait()", "paths.migration_entry_wait()",
        "liveness only: the wait re-checks PG_locked and returns at once if the folio was unlocked, and the fault is retried"),
    # ---------------------------------------------------------------- wake-ups
    _m("mutant-folio-unlock-no-wake", "folio_wake_bit(PG_locked) in folio_unlock()", "locks.FolioLocks.folio_unlock()", ("lost_wakeup",), Cell("migration-entry")),
    _m("mutant-rwsem-no-wake", "rwsem_wake() when the last holder releases", "locks.RwSem._wake()", ("lost_wakeup",), Cell("pmd-clear")),
    _m("mutant-vma-no-wake", "the wake of vma_start_write()'s waiter by the last reader (vma_end_read)", "locks.VmaLock.vma_end_read()", ("lost_wakeup",), Cell("pmd-clear")),
    _m("mutant-ptl-hold-backoff-keeps-ptl", "spin_unlock(ptl) on a back-off (SCAN_PAGE_COUNT, SCAN_PAGE_LOCK, SCAN_PMD_NULL …)", "ptl_hold.collapse()", ("lock_leak",), Cell("ptl-hold", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    # ---------------------------------------------------------------- restores on back-off
    _m("mutant-ptl-hold-no-restore", "set_ptes(original PTEs) on the SCAN_PAGE_COUNT back-off", "ptl_hold.collapse()", MAPPING, Cell("ptl-hold", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("mutant-migration-no-restore", "remove_migration_ptes(src, src) on the back-off", "migration_entry.collapse()", ("migration_entry_leftover",) + MAPPING, Cell("migration-entry", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("mutant-pmd-clear-no-restore", "pmd_populate(original table) on the back-off", "pmd_clear.collapse()", MAPPING + LOST_DMA, Cell("pmd-clear", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    _m("mutant-isolate-no-release", "release_pte_folios(): putback, folio_unlock, drop the isolation reference", "khugepaged.Collapse.release_isolated()", ("lock_leak", "refcount_mismatch"), Cell("ptl-hold", cpus="pin", pin_hold_us=PIN_HOLD_US, stress_target="collapse")),
    # ---------------------------------------------------------------- the oracle's own marks
    _m("mutant-zap-no-epoch-bump", "the per-page zap epoch bump after the zap's flush", "paths.zap_range()", ("lost_write", "stale_read", "lost_dma_write"), Cell("ptl-hold")),
]

MUTANTS: dict[str, Mutant] = {m.name: m for m in _REGISTRY}
assert len(MUTANTS) == len(_REGISTRY), "duplicate mutant names"


def mutant_names() -> frozenset[str]:
    """Names injectable as ``mutant-…`` (the bugs are validated by core/machine/config.py's BUGS)."""
    return frozenset(n for n in MUTANTS if n.startswith("mutant-"))


# ------------------------------------------------------------------------------ applying them
class _NoLock:
    """What a lock-deleting mutant takes instead of the lock: every operation succeeds at once
    and excludes nothing."""

    name = "no lock (mutant)"

    def lock(self, cpu: Any) -> int:
        return 0

    def unlock(self, cpu: Any) -> None:
        pass

    def trylock(self, cpu: Any) -> bool:
        return True

    def down_read(self, cpu: Any) -> int:
        return 0

    def up_read(self, cpu: Any) -> None:
        pass

    def down_write(self, cpu: Any) -> int:
        return 0

    def up_write(self, cpu: Any) -> None:
        pass

    def down_read_trylock(self, cpu: Any) -> bool:
        return True

    def down_write_trylock(self, cpu: Any) -> bool:
        return True


NO_LOCK = _NoLock()


def lock_or_skip(cpu: Any, mutant: str, lock: Any) -> Any:
    """``lock``, or a lock that excludes nothing when ``mutant`` is injected on this CPU."""
    bugs = cpu.bugs
    return NO_LOCK if bugs and mutant in bugs else lock


@dataclass
class Score:
    """A mutation score: killed (with an expected kind) over the non-equivalent mutants."""

    killed: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # the run could not complete: not a kill
    equivalent: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.killed) + len(self.survived) + len(self.failed)

    def __str__(self) -> str:
        pct = 100.0 * len(self.killed) / self.total if self.total else 100.0
        return f"{len(self.killed)}/{self.total} non-equivalent mutants killed ({pct:.0f} %), {len(self.equivalent)} equivalent"


__all__ = ["CPUS", "Cell", "FAILED_RUN", "MUTANTS", "Mutant", "NO_LOCK", "Score", "lock_or_skip", "mutant_names"]
