"""khugepaged: the scan (hpage_collapse_scan_pmd) and the collapse engine the strategies use.

The scan and every step that all strategies share live here — allocating the target folio,
revalidating the VMA, isolating the old folios, the reference check, the copy, installing the
new PTEs or PMD, releasing the old folios — so that a strategy module says only what differs:
which locks it takes, what it clears and how it restores (STYLE.md §2).  Adding a strategy means
one module in core/kernel/strategies/ and one Strategy enum member.

Reference model during a collapse (mm/khugepaged.c, mm/migrate.c): the scan and the isolation
check ``folio_ref_count == folio_mapcount`` (is_refcount_suitable); isolation then takes one
reference per old folio (folio_isolate_lru's folio_get), which the engine drops at the end.  A
GUP pin shows up as refcount above mapcount (+1024 for a small folio) and fails the check with
SCAN_PAGE_COUNT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ptlab.core.kernel.paths import lock_vma_under_rcu
from ptlab.core.machine.config import HPAGE_PMD_ORDER, PTRS_PER_PTE
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.errors import Stopped
from ptlab.core.machine.events import PHASES
from ptlab.core.machine.layout import (
    _DIRTY,
    _PRESENT,
    _WRITE,
    _YOUNG,
    COLLAPSE_PHASE,
    COLLAPSE_START,
    COLLAPSING,
    PG_ISOLATED,
    PG_LOCKED,
    PG_LRU,
    STOP,
    STOP_VIOLATION,
    pmd_trans_huge,
)
from ptlab.core.machine.mm import VMA_COLLAPSE, Machine


@dataclass
class Collapse:
    """One collapse attempt of [start, start + nr) into a folio of ``order``: the kernel's
    collapse_control plus the state a strategy carries between its steps."""

    cpu: CpuContext
    start: int
    order: int
    nr: int = 0
    i: int = 0  # PMD index
    first: int = 0  # index of the first PTE in its table
    t: int = -1  # PTE table
    target: int = -1  # head pfn of the new folio
    heads: list[int] = field(default_factory=list)  # old folios, locked and isolated
    mapped: int = -1  # entries mapping the new folio after install_ptes() (-1: not reported)
    vma_held: str = ""  # what vma_stable_lock() holds: "mmap" (mmap_lock read), "vma", or ""
    phase_ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    _holes: tuple[np.ndarray, np.ndarray] | None = None  # (PTE snapshot, its holes()): once per snapshot
    _t: int = 0
    _phase: str = ""

    def __post_init__(self) -> None:
        self.nr = 1 << self.order
        self.i = self.start >> 9
        self.first = self.start & (PTRS_PER_PTE - 1)

    @property
    def m(self) -> Machine:
        return self.cpu.m

    @property
    def bugs(self) -> frozenset[str]:
        return self.cpu.bugs

    # -- phase timing: each step is charged to the phase it belongs to --
    def phase(self, name: str) -> None:
        now = self.cpu.now()
        if self._phase:
            self.phase_ns[self._phase] += now - self._t
        self._phase, self._t = name, now
        self.cpu.phase = name
        if name and self.cpu.on_step is not None:
            self.cpu.on_step(f"collapse [{self.start}, {self.start + self.nr}) order {self.order}: {name}")
        # published so that a CPU detecting a violation can say what the collapse was doing
        self.cpu.ctl.store32(COLLAPSE_PHASE, PHASES.index(name) + 1 if name else 0)

    def end_phases(self) -> None:
        self.phase("")
        self.cpu.phase = ""

    # -- shared steps --------------------------------------------------------------------------
    def alloc_target(self) -> str:
        """alloc_charge_folio(): __folio_alloc(order); fails when fragmented."""
        self.target = self.m.alloc_folio(self.cpu, self.order)
        return "SCAN_SUCCEED" if self.target >= 0 else "SCAN_ALLOC_HUGE_PAGE_FAIL"

    def free_target(self) -> None:
        """Give an unused target folio back (a no-op once it is installed: target == -1)."""
        if self.target >= 0:
            self.m.folio_put(self.cpu, self.target)
            self.target = -1

    def hugepage_vma_revalidate(self) -> str:
        start, end, flags = self.m.vma_range(VMA_COLLAPSE)
        if not flags & 1:
            return "SCAN_VMA_NULL"
        if not (start <= self.start and self.start + self.nr <= end):
            return "SCAN_ADDRESS_RANGE"
        return "SCAN_SUCCEED"

    def check_pmd_still_valid(self) -> str:
        pmd = self.m.pmdp_get(self.i)
        if not pmd & _PRESENT:
            return "SCAN_PMD_NULL"
        if pmd_trans_huge(pmd):
            return "SCAN_PMD_MAPPED"
        self.t = pmd >> 12
        return "SCAN_SUCCEED"

    def revalidate(self) -> str:
        """hugepage_vma_revalidate() + check_pmd_still_valid() after retaking mmap_lock."""
        result = self.hugepage_vma_revalidate()
        if result == "SCAN_SUCCEED":
            result = self.check_pmd_still_valid()
        return result

    def vma_stable_lock(self) -> str:
        """Keep the VMA stable for the whole collapse (ptl-hold, migration-entry), as chosen by
        ``--vma-stability``:

        - ``mmap-lock``: mmap_read_lock(), as both proposals do.  Every mmap()/munmap()/
          mprotect() of the mm (an mmap_lock writer) then waits for the whole collapse, and
          behind that waiting writer so does every later mmap_read_lock() (faults without a
          per-VMA lock, GUP-slow, khugepaged's own scan): the rwsem is writer-fair.
        - ``vma-lock``: only the collapsing VMA's per-VMA read lock, taken as a page fault takes
          it (lock_vma_under_rcu()).  When that fails — the VMA is write-locked by an mmap
          writer working on it, or was replaced — fall back as uffd_lock_vma() does
          (mm/userfaultfd.c): mmap_read_lock() just long enough to look the VMA up and read-lock
          it (vma_start_read_locked(): cannot fail while mmap_lock is held, since
          vma_start_write() needs mmap_lock for write), then mmap_read_unlock().  The VMA read
          lock keeps out exactly what would change this VMA and its page tables
          (vma_start_write() waits for its readers: munmap/mprotect of it, a pmd-clear
          collapse); mmap() of other VMAs goes ahead.

        Returns SCAN_SUCCEED, or SCAN_VMA_NULL (nothing held) when the range is no longer in
        the collapsing VMA."""
        m, cpu = self.m, self.cpu
        if cpu.config.vma_stability != "vma-lock":
            m.mmap_lock.down_read(cpu)  # excludes every mmap_lock writer: no VMA of the mm changes
            self.vma_held = "mmap"
            return "SCAN_SUCCEED"
        vma = lock_vma_under_rcu(cpu, self.start)
        if vma < 0:
            m.mmap_lock.down_read(cpu)  # for the lookup only: no vma_start_write() can run meanwhile
            try:
                vma = m.find_vma(self.start)
                if vma >= 0 and not m.vma_locks[vma].vma_start_read(cpu):  # vma_start_read_locked()
                    vma = -1  # unreachable while mmap_lock is held (kept defensive)
            finally:
                m.mmap_lock.up_read(cpu)
        if vma != VMA_COLLAPSE:
            if vma >= 0:
                m.vma_locks[vma].vma_end_read(cpu)
            return "SCAN_VMA_NULL"
        self.vma_held = "vma"
        return "SCAN_SUCCEED"

    def vma_stable_unlock(self) -> None:
        """Drop what vma_stable_lock() took (mmap_read_unlock() or vma_end_read())."""
        if self.vma_held == "mmap":
            self.m.mmap_lock.up_read(self.cpu)
        elif self.vma_held == "vma":
            self.m.vma_locks[VMA_COLLAPSE].vma_end_read(self.cpu)
        self.vma_held = ""

    def holes(self, ptes: np.ndarray) -> np.ndarray:
        """pte_none() || is_zero_pfn() per entry of a PTE snapshot (Machine.pte_none_or_zero),
        worked out once per snapshot: isolate, copy and the rmap updates ask about the same one."""
        if self._holes is None or self._holes[0] is not ptes:
            self._holes = (ptes, self.m.pte_none_or_zero(ptes))
        return self._holes[1]

    def read_ptes(self) -> np.ndarray:
        """A copy of the range's PTEs (int64 array), read under the PTL by the caller."""
        return self.m.ptes_range(self.t, self.first, self.nr)

    def isolate(self, ptes: np.ndarray, check_refs: bool = True) -> str:
        """__collapse_huge_page_isolate(): count holes (none or zero-page PTEs) against
        max_ptes_none, need a writable PTE (else SCAN_PAGE_RO), then per folio
        (a large folio once: compound_pagelist) folio_trylock() — a trylock, since we may hold
        the PTL and the lock order is folio_lock -> PTL — is_refcount_suitable(), and
        folio_isolate_lru() taking a reference.  On failure everything is released.  The
        per-folio checks are batched with numpy (plain loads, as the kernel's are); every
        change to a shared count is atomic.  (Counts and tests over the arrays are
        np.count_nonzero(): a C loop, where .any()/.sum() go through numpy's Python wrappers.)"""
        m, cpu = self.m, self.cpu
        nnz = np.count_nonzero
        max_none = cpu.config.max_ptes_none >> (HPAGE_PMD_ORDER - self.order)
        none = self.holes(ptes)  # a zero-page PTE counts as none: no folio behind it
        if nnz(none) > max_none:
            return "SCAN_EXCEED_NONE_PTE"
        present = ptes[~none]
        if nnz((present & _PRESENT) == 0):
            return "SCAN_PTE_NON_PRESENT"
        if not nnz(present & _WRITE):
            return "SCAN_PAGE_RO"  # no writable PTE (also: nothing but holes and zero pages)
        heads_all = m.f["head"][present >> 12]
        if nnz(heads_all < 0):
            return "SCAN_PAGE_NULL"
        heads = list(dict.fromkeys(heads_all.tolist()))
        # folio_trylock() of each in turn, in one call, up to the first that is locked already
        taken = m.folio_locks.folio_trylock_many(cpu, heads)
        self.heads.extend(heads[:taken])
        if taken < len(heads):
            self.release_isolated()
            return "SCAN_PAGE_LOCK"
        h = heads_all if len(heads) == len(heads_all) else np.asarray(heads)  # no large folio: as they are
        if check_refs and nnz(m.f["refcount"][h] != m.f["mapcount"][h]):
            self.release_isolated()
            return "SCAN_PAGE_COUNT"
        if nnz((m.f["flags"][h] & PG_LRU) == 0):
            self.release_isolated()
            return "SCAN_DEL_PAGE_LRU"
        # folio_isolate_lru(): the flags of a folio we hold locked change only under its lock
        m.f["flags"][h] = (m.f["flags"][h] & ~PG_LRU) | PG_ISOLATED
        m.folio_counts_add(h, np.ones(len(h), dtype=np.int64), ("refcount",))  # folio_get() each
        return "SCAN_SUCCEED"

    def refs_unexpected(self) -> bool:
        """The reference check after clear + flush: any reference beyond the mappings and our
        isolation reference is a GUP pin (or an in-flight GUP-fast grab)."""
        if not self.heads:
            return False
        m = self.m
        h = np.asarray(self.heads)
        return bool(np.count_nonzero(m.f["refcount"][h] != m.f["mapcount"][h] + 1))

    def release_isolated(self) -> None:
        """release_pte_folios(): putback on the LRU, unlock, drop the isolation reference."""
        m, cpu = self.m, self.cpu
        if "mutant-isolate-no-release" in cpu.bugs:
            self.heads.clear()  # the mutant: the folios stay locked, isolated and referenced
            return
        flags = m.f["flags"]
        for head in self.heads:
            isolated = flags[head] & PG_ISOLATED
            if isolated:
                flags[head] = (flags[head] & ~PG_ISOLATED) | PG_LRU
            m.folio_locks.folio_unlock(cpu, head)
            if isolated:
                m.folio_put(cpu, head)
        self.heads.clear()

    def copy(self, ptes: np.ndarray) -> None:
        """__collapse_huge_page_copy(): copy every mapped page, clear every hole — a none or
        zero-page PTE (clear_user_highpage).  Interrupts stay on (a flush IPI is taken between
        pages); ``collapse_mid_copy`` is a park point halfway through.  The pages between two of
        those points are copied in one call (Machine.copy_pages: the same copies, in order)."""
        m, cpu = self.m, self.cpu
        nr = len(ptes)
        half = nr // 2
        cpu.charge("collapse_page_rest", nr)  # per-page work besides the copy itself
        srcs = np.where(self.holes(ptes), -1, (ptes >> 12) * m.page_size)  # source frames' offsets
        cuts = sorted({0, half, nr, *range(16, nr, 16)})
        for a, b in zip(cuts, cuts[1:]):
            if a == half:
                cpu.chaos("collapse_mid_copy")
            m.copy_pages(self.target + a, srcs[a:b])
            if b & 15 == 0:  # after every 16th page
                cpu.interrupt_point()
        cpu.chaos("collapse_after_copy")

    def new_ptes(self) -> np.ndarray:
        pfns = np.arange(self.target, self.target + self.nr, dtype=np.int64)
        return (pfns << 12) | (_PRESENT | _WRITE | _DIRTY | _YOUNG)

    def install_ptes(self, ours: np.ndarray | None = None, now: np.ndarray | None = None) -> int:
        """Map the new folio (the caller holds the PTL): folio_add_new_anon_rmap() before the
        PTEs are visible, then set_ptes() — of every entry, or only where ``ours`` is true (the
        others keep their value in ``now``).  Records and returns how many entries map the new
        folio (``mapped``); collapse_range() holds SCAN_SUCCEED to "all of them".  Maps nothing
        (and takes no mapping reference) when ``ours`` is all false."""
        m = self.m
        n = self.nr if ours is None else int(ours.sum())
        if n:
            m.folio_add_new_anon_rmap(self.target, n)
            new = self.new_ptes()
            m.set_ptes(self.t, self.first, new if ours is None else np.where(ours, new, now))
        self.mapped = n
        return n

    def remove_rmaps(self, ptes: np.ndarray) -> None:
        """folio_remove_rmap_ptes() for every old PTE, batched per folio: mapcount and the
        mappings' references drop by the number of PTEs; the isolation reference keeps each
        folio alive (zero-page PTEs map no folio)."""
        m = self.m
        present = ptes[~self.holes(ptes)]
        heads, counts = self.folios_of(present >> 12)
        m.folio_counts_add(heads, -counts, ("mapcount", "refcount"))

    def folios_of(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The folios (heads) behind the pages of a PTE snapshot and how many pages each.  The
        snapshot's folios are locked and isolated, so none can be freed; a free frame here (head
        -1) is a folio freed while still mapped — the kernel's bad_page() — which a path that
        changed the PTEs without the PTL leaves behind: recorded as ``free_mapped``, and the
        run ends there instead of in the model's own arithmetic on a freed frame."""
        m, cpu = self.m, self.cpu
        of = m.f["head"][pfns]
        if len(of) <= 64:  # np.unique()'s result, without its fixed cost (a few µs) on a small range
            n: dict[int, int] = {}
            for head in of.tolist():
                n[head] = n.get(head, 0) + 1
            keys = sorted(n)
            heads, counts = np.array(keys, dtype=of.dtype), np.array([n[k] for k in keys], dtype=np.int64)
        else:
            heads, counts = np.unique(of, return_counts=True)
        if len(heads) and heads[0] < 0:
            pfn = int(pfns[m.f["head"][pfns] < 0][0])
            cpu.violation("free_mapped", page=pfn, detail=f"CPU {cpu.id}'s collapse found frame {pfn} of its PTE snapshot free: its folio was freed while mapped")
            cpu.ctl.cas32(STOP, 0, STOP_VIOLATION)
            raise Stopped()
        return heads, counts

    def add_rmaps(self, ptes: np.ndarray) -> None:
        """remove_migration_ptes(src, src) on back-off: folio_get() + folio_add_anon_rmap_pte()
        for every entry about to be restored (present PTEs of old folios, batched per folio),
        before the PTEs are visible."""
        if not len(ptes):
            return
        m = self.m
        heads, counts = self.folios_of(ptes >> 12)
        m.folio_counts_add(heads, counts, ("refcount", "mapcount"))

    def release_old(self) -> None:
        """After the new folio is in: unlock every old folio (waking migration waiters) and drop
        the isolation reference, which frees it (Machine.release_locked_folios: the frees as one
        batch on the process backend, as free_unref_folios() does)."""
        self.m.release_locked_folios(self.cpu, self.heads, PG_ISOLATED)
        self.heads.clear()

    def drop_old_mappings(self, ptes: np.ndarray) -> None:
        """__collapse_huge_page_copy_succeeded(): folio_remove_rmap_pte() + the mapping's
        reference for every old PTE, then the isolated folios are released (and freed)."""
        self.remove_rmaps(ptes)
        self.release_old()


def scan_pmd(cpu: CpuContext, start: int, order: int) -> str:
    """hpage_collapse_scan_pmd() for one range: the racy pre-check under the PTL (mmap_lock
    held for read by the caller).  Returns a ScanResult name."""
    m = cpu.m
    nr = 1 << order
    i, first = start >> 9, start & 511
    pmd = m.pmdp_get(i)
    if not pmd & _PRESENT:
        return "SCAN_PMD_NULL"
    if pmd_trans_huge(pmd):
        return "SCAN_PMD_MAPPED"
    t = pmd >> 12
    ptl = m.ptl(t)
    ptl.lock(cpu)  # a stable view of the PTEs while we look at their folios
    try:
        ptes = m.ptes_range(t, first, nr)
    finally:
        ptl.unlock(cpu)
    # "pte_none(pteval) || is_zero_pfn(pte_pfn(pteval))" both count against max_ptes_none
    hole = m.pte_none_or_zero(ptes)
    none = int(hole.sum())
    if none > cpu.config.max_ptes_none >> (HPAGE_PMD_ORDER - order):
        return "SCAN_EXCEED_NONE_PTE"
    present = ptes[~hole]
    if ((present & _PRESENT) == 0).any():
        return "SCAN_PTE_NON_PRESENT"
    if not ((present & _WRITE) != 0).any():
        return "SCAN_PAGE_RO"
    if not ((present & _YOUNG) != 0).any():
        return "SCAN_LACK_REFERENCED_PAGE"
    heads = {}
    for j, pte in enumerate(ptes.tolist()):
        if hole[j]:
            continue
        pfn = pte >> 12
        head = m.folio_head(pfn)
        if head < 0:
            return "SCAN_PAGE_NULL"
        if head not in heads:
            heads[head] = (m.folio_order(head), pfn - j)
    for head, (forder, base) in heads.items():
        if forder >= order:
            # already a folio of this order mapped in place: nothing to gain
            if forder == order and base == head and len(heads) == 1 and none == 0:
                return "SCAN_PTE_MAPPED_HUGEPAGE"
            if forder > order:
                return "SCAN_PTE_MAPPED_HUGEPAGE"
        flags = m.folio_flags(head)
        if flags & PG_LOCKED:
            return "SCAN_PAGE_LOCK"
        if not flags & PG_LRU:
            return "SCAN_PAGE_LRU"
        if not m.is_refcount_suitable(head) and "migration-no-refcheck" not in cpu.bugs:
            return "SCAN_PAGE_COUNT"
    return "SCAN_SUCCEED"


def collapse_range(cpu: CpuContext, strategy: object, start: int, order: int) -> tuple[str, dict[str, int]]:
    """Allocate the target folio and run one collapse with a strategy; counts the collapse as
    in flight for other CPUs' during_collapse flag."""
    c = Collapse(cpu=cpu, start=start, order=order)
    cpu.ctl.fetch_add32(COLLAPSING, 1)
    cpu.ctl.store64(COLLAPSE_START, start + 1)  # where a targeted GUP CPU pins (stress_target)
    try:
        # every strategy allocates first, outside any lock: "The allocation can take
        # potentially a long time if it involves sync compaction" (collapse_huge_page)
        c.phase("lock")
        cpu.charge("collapse_fixed")  # the collapse's own fixed work (mmu notifiers, accounting)
        result = c.alloc_target()
        if result == "SCAN_SUCCEED":
            result = strategy.collapse(c)  # type: ignore[attr-defined]
        if result == "SCAN_SUCCEED" and 0 <= c.mapped < c.nr:
            # the engine's own check of the result: success means the whole range maps the new
            # folio (a partly mapped folio is a different outcome, with its own code)
            cpu.violation("partial_collapse", page=start, detail=f"SCAN_SUCCEED, but the new order-{order} folio maps {c.mapped} of {c.nr} entries")
        if result != "SCAN_SUCCEED":
            c.free_target()  # out_nolock: every back-off gives the new folio back, locks dropped
    finally:
        c.end_phases()
        cpu.ctl.store64(COLLAPSE_START, 0)
        cpu.ctl.fetch_add32(COLLAPSING, -1)
    return result, c.phase_ns
