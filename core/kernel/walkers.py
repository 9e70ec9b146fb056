"""Walkers for the seed's requirement c) "no ordinary page table walker can grab the folio".

Three kinds of CPU walk the collapsing VMA beside khugepaged, each following the kernel path it
is named after:

1. **rmap walker** (role ``rmap-walk``, a kernel thread like kswapd/kcompactd): takes folios of
   the collapsing VMA off the LRU and walks their reverse mappings —
   - ``folio_referenced``: shrink_active_list()'s aging.  folio_referenced() trylocks the folio,
     rmap_walk_anon() with ``try_lock`` (anon_vma_trylock_read(); contended -> bail out) and,
     per mapping, page_vma_mapped_walk() + ptep_clear_flush_young() under the PTL (x86 does not
     flush for the accessed bit);
   - ``migrate``: migrate_pages() in MIGRATE_ASYNC mode, as compaction does: folio_trylock(src),
     try_to_migrate() (anon_vma_lock_read(), each PTE cleared, flushed and replaced by a
     migration entry under the PTL, folio_remove_rmap_pte()), the expected-refcount check of
     folio_migrate_mapping() (a pin -> -EAGAIN), folio_copy(), remove_migration_ptes(src, dst)
     (anon_vma_lock_read() again, PVMW_MIGRATION), unlock, put.
   Anon reclaim proper (try_to_unmap()) needs swap, which the model does not have: without it
   shrink_folio_list() keeps every anon folio (add_to_swap() fails), so the honest "unmap" an rmap
   walker does here is migration's — it really moves the data, and the oracle checks every word.
   The rmap walk is modelled as page_vma_mapped_walk() does it: from the folio's address (its
   index, known from the PTE the LRU pick came through), read the PMD; none -> not mapped here
   (a cleared PMD hides the folio); a table -> a lockless peek at the folio's PTEs, then
   spin_lock(ptl), pmd_same() re-check, check_pte() under the lock.  PMD-mapped THPs are not
   picked (THP migration is not modelled).
2. **page-table walker** (role ``pt-walk``, another process reading /proc/pid/smaps or calling
   process_madvise(): not in this mm's cpumask): walk_page_range() under mmap_read_lock (the
   PGWALK_RDLOCK of show_smap() and of MADV_COLD/MADV_PAGEOUT), pte_offset_map_lock() per table
   (with its pmd_same() re-check) —
   - ``smaps``: smaps_pte_range() over the whole VMA: counts present PTEs and migration entries
     and reads each folio's mapcount and refcount;
   - ``madv_cold`` / ``madv_pageout``: madvise_cold_or_pageout_pte_range() on a 64-page range:
     skip what is not present, large folios not wholly in the range (the kernel would try to
     split them: not modelled), folios not on the LRU or mapped elsewhere; COLD clears the
     young bits (flushed at tlb_finish_mmu()); PAGEOUT folio_isolate_lru()s them and, after the
     PTL, reclaim_pages() -> shrink_folio_list(): folio_trylock(), no swap -> keep, putback.
3. **VMA changes** (role ``vma-change``, a thread of the process itself): on a sub-range of the
   collapsing VMA, under mmap_write_lock() and vma_start_write() of that VMA —
   - ``mprotect``: two calls, mprotect(PROT_READ) then mprotect(PROT_READ|PROT_WRITE), each
     change_protection() -> change_pte_range() under the PTL (a writable migration entry becomes
     a readable one; the zero page stays read-only; the upgrade is MM_CP_TRY_CHANGE_WRITABLE's:
     exclusive anon folios only), then flush_tlb_range() before mmap_write_unlock().  VMAs are
     fixed slots here and cannot split, so the sub-range keeps VM_WRITE in between: a write
     fault there finds a read-only PTE in a writable VMA and do_wp_page() -> wp_page_reuse()
     makes it writable again, as after the second call.  A collapse in between re-makes the
     range writable (the VMA is VM_WRITE), as the kernel's would in a writable VMA.
   - ``munmap``: mmap(MAP_FIXED|MAP_ANONYMOUS) over the sub-range — one syscall that unmaps
     (zap, flush, free: unmap_region()) and maps empty anonymous memory again under one
     mmap_write_lock hold; the zap epoch tells the oracle the contents went on purpose.
   - ``mremap`` is **not modelled**: a move needs VMAs that split and merge (the slots here
     cannot), and the oracle's words name the page they were written to, so a page moved to
     another address would need a second identity.  Against a collapse its footprint would be
     munmap's: mmap_write_lock + vma_start_write on the collapsing VMA, both PTLs (old and new
     table) for move_ptes(), a flush — all excluded by the same locks as munmap.

Why no walker can grab an old folio (what the oracle checks):
  - pmd-clear: mmap_lock for write and the VMA write lock keep page-table walkers and VMA
    changes out; anon_vma_lock_write keeps rmap walks out while the PMD is cleared (an rmap
    walk that runs then cannot see the mappings behind it); the old folios are locked and
    isolated (off the LRU), so no rmap walker can take them.
  - ptl-hold: the collapse isolates, clears and re-fills the PTEs under the PTL it holds
    throughout: a walker spins on the PTL and then sees the new folio; VMA changes wait for
    the collapse's mmap_lock (or VMA) read hold.
  - migration-entry: isolation and the unmap happen under the PTL; afterwards the entries are
    migration entries (not present: walkers skip them; smaps reads the folio through one, which
    is locked, as pfn_swap_entry_to_page() insists); the old folios stay locked and off the LRU.
The checks (violation kinds):
  - ``walker_grabbed_collapsing_folio``: a walker locked, isolated, unmapped, mapped or changed
    the protection of a folio a collapse owns (PG_ISOLATED: set by khugepaged's isolation and
    cleared at its release, only ever under the folio lock), or found one through a present
    PTE — the folio can be derived from the page table, which c) forbids.
  - ``walker_inconsistent``: what a walker sees under the PTL contradicts the folio metadata: a
    present PTE mapping a free frame, a folio with fewer mappings (mapcount) than PTEs of this
    table map it, refcount below mapcount, a migration entry whose folio is not locked.
  - ``walker_missed_mapping``: remove_migration_ptes() left a migration entry it installed
    behind (its rmap walk ran while a PMD was cleared).  The kernel would leave it (and the next
    fault on it would loop for ever); the oracle records it and then repairs the entry so the
    run can go on.
Injectable bugs: ``pmd-clear-no-anon-vma-lock`` (core/kernel/strategies/pmd_clear.py) and
``pt-walk-no-ptl`` (the page-table walker reads PTEs and acts on them without the PTL).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ptlab.core.kernel.paths import mm_lock_seq, mmap_write_unlock, split_huge_pmd, zap_range
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.layout import (
    _DIRTY,
    _MIGRATION,
    _PRESENT,
    _WRITE,
    _YOUNG,
    PFN_SHIFT,
    PG_BUDDY,
    PG_ISOLATED,
    PG_LOCKED,
    PG_LRU,
    is_migration_entry,
    pmd_trans_huge,
    pte_mk_migration,
)
from ptlab.core.machine.locks import SpinLock
from ptlab.core.machine.mm import VMA_COLLAPSE, Machine

MADV_PAGES = 64  # pages per MADV_COLD / MADV_PAGEOUT call


# ------------------------------------------------------------------------------ the oracle's view
def collapse_owns(m: Machine, head: int) -> bool:
    """A collapse owns the folio: khugepaged isolated it (PG_ISOLATED is set only by the
    collapse's isolation, cleared at its release, both under the folio lock)."""
    return bool(m.folio_flags(head) & PG_ISOLATED)


def walker_grabbed(cpu: CpuContext, head: int, vpn: int, how: str) -> None:
    cpu.violation(
        "walker_grabbed_collapsing_folio",
        page=vpn,
        detail=f"{cpu.role} CPU {cpu.id} {how} folio {head} (page {vpn}) while a collapse owns it (isolated and locked by khugepaged)",
    )


def walker_inconsistent(cpu: CpuContext, vpn: int, detail: str) -> None:
    cpu.violation("walker_inconsistent", page=vpn, detail=f"{cpu.role} CPU {cpu.id}: {detail}")


def check_ptes_locked(cpu: CpuContext, t: int, first: int, nr: int, base_vpn: int, derive: bool = True) -> None:
    """The oracle on what a walker holding the PTL of table ``t`` sees in [first, first + nr):
    every present PTE maps a live folio that no collapse owns (``derive``: the walker can take
    the folio from the PTE), no folio has fewer mappings than PTEs of this table map it, no
    refcount is below its mapcount, and every migration entry's folio is locked.

    Why these hold under the PTL: every path that adds a mapping raises mapcount (and refcount
    first) before its PTEs are visible under this PTL; every path that drops one clears the PTE
    under this PTL first.  Refcounts are read before mapcounts (decrements go mapcount first)."""
    m = cpu.m
    f = m.f
    ptes = m.ptes_range(t, first, nr)
    pfns = ptes >> PFN_SHIFT
    present = (ptes & _PRESENT) != 0
    real = present & (pfns != m.zero_pfn)
    if real.any():
        idx = np.nonzero(real)[0]
        p = pfns[idx]
        out = p >= m.L.nr_frames
        p = np.where(out, 0, p)
        heads = f["head"][p]
        free = out | (heads < 0) | ((f["flags"][np.maximum(heads, 0)] & PG_BUDDY) != 0)
        for j in idx[free].tolist():
            walker_inconsistent(cpu, base_vpn + j, f"present PTE of page {base_vpn + j} maps pfn {int(pfns[j])}, which is free")
        live, hs = idx[~free], heads[~free]
        if len(hs):
            if derive:
                owned = (f["flags"][hs] & PG_ISOLATED) != 0
                for j, h in zip(live[owned].tolist(), hs[owned].tolist()):
                    walker_grabbed(cpu, h, base_vpn + j, "found, through a present PTE under the PTL,")
            uh, counts = np.unique(hs, return_counts=True)
            ref = f["refcount"][uh].copy()  # refcount first: mappings are dropped mapcount first
            mc = f["mapcount"][uh].copy()
            for h, c, r, k in zip(uh.tolist(), mc.tolist(), ref.tolist(), counts.tolist()):
                if c < k:
                    walker_inconsistent(cpu, base_vpn, f"folio {h} has mapcount {c} but {k} PTE(s) of table {t} map it")
                elif r < c:
                    walker_inconsistent(cpu, base_vpn, f"folio {h} has refcount {r} below its mapcount {c}")
    mig = ((ptes & _MIGRATION) != 0) & ~present
    if mig.any():
        idx = np.nonzero(mig)[0]
        p = pfns[idx]
        out = p >= m.L.nr_frames
        heads = f["head"][np.where(out, 0, p)]
        fl = f["flags"][np.maximum(heads, 0)]
        bad = out | (heads < 0) | ((fl & PG_BUDDY) != 0) | ((fl & PG_LOCKED) == 0)
        for j in idx[bad].tolist():
            walker_inconsistent(
                cpu,
                base_vpn + j,
                f"migration entry of page {base_vpn + j} points at pfn {int(pfns[j])}, whose folio is not locked (pfn_swap_entry_to_page() would BUG)",
            )


# ------------------------------------------------------------------------------ shared steps
def pte_offset_map_lock(cpu: CpuContext, i: int) -> tuple[int, SpinLock | None]:
    """__pte_offset_map_lock(): read the PMD, take the PTL of its table, re-check the PMD
    (pmd_same()) and start again if it changed.  (-1, None) when the PMD maps no table (none or
    huge)."""
    m = cpu.m
    while True:
        pmd = m.pmdp_get(i)
        if not pmd & _PRESENT or pmd_trans_huge(pmd):
            return -1, None
        t = pmd >> PFN_SHIFT
        ptl = m.ptl(t)
        ptl.lock(cpu)  # the entries of this table change only under it
        if m.pmdp_get(i) == pmd:
            return t, ptl
        ptl.unlock(cpu)


def lru_pick(cpu: CpuContext, vpn: int) -> tuple[int, int]:
    """The folio an LRU scan would hand over, found through a lockless peek at the PTE of vpn
    (the kernel's LRU order picks; here the walker aims at the collapsing VMA's folios).
    Returns (pfn, the folio's index: the vpn of its head), or (-1, -1): nothing there, the zero
    page, or a PMD-mapped THP (not migrated here)."""
    m = cpu.m
    pmd = m.pmdp_get(vpn >> 9)
    if not pmd & _PRESENT or pmd_trans_huge(pmd):
        return -1, -1
    pte = m.ptep_get(pmd >> PFN_SHIFT, vpn & 511)
    pfn = pte >> PFN_SHIFT
    if not pte & _PRESENT or m.is_zero_pfn(pfn) or not 0 <= pfn < m.L.nr_frames:
        return -1, -1
    head = m.folio_head(pfn)
    if head < 0:
        return -1, -1
    return pfn, vpn - (pfn - head)


def folio_isolate_lru(cpu: CpuContext, pfn: int, keep_locked: bool) -> tuple[int, str]:
    """isolate_lru_folios() / folio_isolate_lru(): folio_try_get(), then take the folio off the
    LRU (clear PG_LRU).  The model changes PG_LRU only under the folio lock — folio flags are
    plain words, and khugepaged's isolation writes them under that lock — so the trylock comes
    first; the kernel clears PG_LRU atomically and locks afterwards (shrink_folio_list(),
    migrate_folio_unmap()).  Either order gives a folio to exactly one of khugepaged and the
    walker.  Returns (head, "ok") holding a reference (and the lock if ``keep_locked``), or
    (-1, reason): -EBUSY (freed, not on the LRU), -EAGAIN (locked by somebody else)."""
    m = cpu.m
    head = m.try_grab_folio(pfn, pin=False)
    if head < 0:
        return -1, "-EBUSY"
    if not m.folio_locks.folio_trylock(cpu, head):  # flags change under it: excludes khugepaged's isolation
        m.folio_put(cpu, head)
        return -1, "-EAGAIN"
    flags = m.folio_flags(head)
    if flags & PG_ISOLATED:
        walker_grabbed(cpu, head, -1, "locked")  # only if a collapse lost its folio lock
    if not flags & PG_LRU or flags & PG_ISOLATED:
        m.folio_locks.folio_unlock(cpu, head)
        m.folio_put(cpu, head)
        return -1, "-EBUSY"
    m.folio_test_set_flag(head, PG_LRU, False)
    if not keep_locked:
        m.folio_locks.folio_unlock(cpu, head)
    return head, "ok"


def folio_putback_lru(cpu: CpuContext, head: int, locked: bool) -> None:
    """folio_putback_lru(): back on the LRU (an atomic set: only the isolator sets PG_LRU),
    unlock if held, drop the isolation reference."""
    m = cpu.m
    m.folio_test_set_flag(head, PG_LRU, True)
    if locked:
        m.folio_locks.folio_unlock(cpu, head)
    m.folio_put(cpu, head)


def page_vma_mapped_walk(cpu: CpuContext, src: int, index: int, nr: int, migration: bool, visit: Callable[[int, int, int, int], None]) -> int:
    """page_vma_mapped_walk() over the folio's address range [index, index + nr) for pfns
    [src, src + nr): present PTEs, or migration entries (PVMW_MIGRATION).  A PMD that is not
    present means "not mapped here" (step_forward()); otherwise a lockless peek at the entries
    (map_pte()), and only if one may match: spin_lock(ptl), pmd_same() re-check (else start
    again), check_pte() and ``visit(t, index_in_table, entry, base_vpn)`` under the lock.
    Returns how many entries matched.  The caller holds the anon_vma lock (rmap_walk_anon())."""
    m = cpu.m
    i, first = index >> 9, index & 511
    base = i << 9

    def matches(ptes: np.ndarray) -> np.ndarray:
        p = ptes >> PFN_SHIFT
        inrange = (p >= src) & (p < src + nr)
        if migration:
            return inrange & ((ptes & _MIGRATION) != 0) & ((ptes & _PRESENT) == 0)
        return inrange & ((ptes & _PRESENT) != 0)

    while True:
        pmd = m.pmdp_get(i)
        if not pmd & _PRESENT or pmd_trans_huge(pmd):
            return 0  # no table behind this PMD: the folio is not mapped here
        t = pmd >> PFN_SHIFT
        if not matches(m.ptes_range(t, first, nr)).any():  # the lockless peek of map_pte()
            return 0
        ptl = m.ptl(t)
        ptl.lock(cpu)  # check_pte() and the rmap_one() work need entries that cannot change
        try:
            if m.pmdp_get(i) != pmd:
                continue  # pmd_same() failed: the table was replaced under us, walk again
            ptes = m.ptes_range(t, first, nr)
            hit = np.nonzero(matches(ptes))[0]
            for j in hit.tolist():
                visit(t, first + j, int(ptes[j]), base)
            return len(hit)
        finally:
            ptl.unlock(cpu)


# ------------------------------------------------------------------------------ 1. rmap walker
def folio_referenced(cpu: CpuContext, head: int, index: int) -> str:
    """folio_referenced(folio, 0, ...): folio_trylock() (busy -> counted as referenced), the rmap
    walk with try_lock (anon_vma busy -> "contended", the -1 of the kernel), and per mapping
    folio_referenced_one(): ptep_clear_flush_young() under the PTL.  Returns referenced,
    unreferenced or contended."""
    m = cpu.m
    if not m.folio_mapcount(head):
        return "unreferenced"
    # the folio lock keeps folio->mapping (the anon_vma) stable for the rmap walk; never sleep here
    if not m.folio_locks.folio_trylock(cpu, head):
        return "referenced"  # "we_locked = folio_trylock(folio); if (!we_locked) return 1;"
    try:
        if collapse_owns(m, head):
            walker_grabbed(cpu, head, index, "locked")
        if not m.anon_vma.down_read_trylock(cpu):  # rwc.try_lock: never sleep in reclaim's aging
            return "contended"
        young = [0]
        nr = 1 << m.folio_order(head)

        def clear_young(t: int, j: int, pte: int, base: int) -> None:
            check_ptes_locked(cpu, t, j, 1, base + j)
            while pte & _YOUNG:  # ptep_test_and_clear_young(): the MMU sets A/D bits by CAS too
                if m.ptep_cmpxchg(t, j, pte, pte & ~_YOUNG):
                    young[0] += 1
                    break
                pte = m.ptep_get(t, j)

        try:
            page_vma_mapped_walk(cpu, head, index, nr, False, clear_young)
        finally:
            m.anon_vma.up_read(cpu)
        return "referenced" if young[0] else "unreferenced"
    finally:
        m.folio_locks.folio_unlock(cpu, head)


def shrink_active_folio(cpu: CpuContext, vpn: int) -> str:
    """shrink_active_list() for the folio the LRU hands over at vpn (lru_pick())."""
    pfn, index = lru_pick(cpu, vpn)
    if pfn < 0:
        return "-EBUSY"
    return shrink_active_one(cpu, pfn, index)


def shrink_active_one(cpu: CpuContext, pfn: int, index: int) -> str:
    """shrink_active_list() for one folio (of page ``pfn``, mapped from ``index``): isolate it
    from the LRU, age it with folio_referenced(), put it back.  Returns folio_referenced()'s
    outcome or why the folio could not be isolated."""
    head, why = folio_isolate_lru(cpu, pfn, keep_locked=False)
    if head < 0:
        return why
    try:
        return folio_referenced(cpu, head, index)
    finally:
        folio_putback_lru(cpu, head, locked=False)


def try_to_migrate(cpu: CpuContext, src: int, index: int, nr: int) -> list[tuple[int, int, int]]:
    """try_to_migrate() -> try_to_migrate_one() per mapping, under the anon_vma lock held by the
    caller: ptep_clear_flush() each PTE of the folio under the PTL and put a migration entry
    (carrying the write/dirty/young bits) in its place; then folio_remove_rmap_pte() and
    folio_put() per entry.  Returns (table, index, entry) of every entry installed."""
    m = cpu.m
    installed: list[tuple[int, int, int]] = []

    def unmap(t: int, j: int, pte: int, base: int) -> None:
        if collapse_owns(m, src):
            walker_grabbed(cpu, src, base + j, "unmapped")
        old = m.ptep_get_and_clear(t, j)  # the MMU may have set A/D since the read: take its value
        entry = pte_mk_migration(old)
        m.set_pte_at(t, j, entry)
        installed.append((t, j, entry))

    # every match is unmapped under one PTL hold; the flush of ptep_clear_flush() is batched
    # (TTU_BATCH_FLUSH + try_to_unmap_flush()) and done before anything reads the folio
    n = page_vma_mapped_walk(cpu, src, index, nr, False, unmap)
    if n:
        cpu.flush_tlb_range(index, index + nr)  # no write through a stale TLB entry may follow
        m.folio_mapcount_add(src, -n)  # folio_remove_rmap_pte() per entry
        m.folio_put(cpu, src, n)  # the mappings' references (the isolation reference keeps it)
    return installed


def remove_migration_ptes(cpu: CpuContext, src: int, dst: int, index: int, nr: int) -> int:
    """remove_migration_ptes(src, dst) -> remove_migration_pte() per entry (PVMW_MIGRATION), the
    caller holding the anon_vma lock: under the PTL, folio_get(dst) + folio_add_anon_rmap_pte()
    and then set_pte_at() of a present PTE to the matching page of dst, with the entry's
    write/dirty/young bits.  Returns how many entries were replaced."""
    m = cpu.m

    def restore(t: int, j: int, entry: int, base: int) -> None:
        if collapse_owns(m, dst):
            walker_grabbed(cpu, dst, base + j, "mapped")
        pfn = dst + ((entry >> PFN_SHIFT) - src)
        m.folio_ref_add(dst, 1)  # folio_get()
        m.folio_mapcount_add(dst, 1)  # folio_add_anon_rmap_pte(): before the PTE is visible
        m.set_pte_at(t, j, (pfn << PFN_SHIFT) | _PRESENT | (entry & (_WRITE | _DIRTY | _YOUNG)))

    return page_vma_mapped_walk(cpu, src, index, nr, True, restore)


def migrate_folio(cpu: CpuContext, vpn: int) -> str:
    """migrate_pages() of the folio the LRU hands over at vpn (lru_pick())."""
    pfn, index = lru_pick(cpu, vpn)
    if pfn < 0:
        return "-EBUSY"
    return migrate_one(cpu, pfn, index)


def migrate_one(cpu: CpuContext, pfn: int, index: int) -> str:
    """migrate_pages() of one folio (of page ``pfn``, mapped from ``index``), MIGRATE_ASYNC
    (compaction):
    migrate_folio_unmap() — isolate, folio_trylock(src), allocate and lock dst, try_to_migrate()
    under anon_vma_lock_read() — then migrate_folio_move() — the expected-refcount check
    (refcount == 1, our isolation reference: a GUP pin or any other reference -> -EAGAIN),
    folio_copy(), remove_migration_ptes(src, dst or src on failure) under anon_vma_lock_read(),
    unlock both, free src.  Returns MIGRATEPAGE_SUCCESS, -EAGAIN, -EBUSY or -ENOMEM."""
    m = cpu.m
    src, why = folio_isolate_lru(cpu, pfn, keep_locked=True)  # MIGRATE_ASYNC: folio_trylock(src)
    if src < 0:
        return why
    nr = 1 << m.folio_order(src)
    dst = m.alloc_folio(cpu, m.folio_order(src))
    if dst < 0:
        folio_putback_lru(cpu, src, locked=True)
        return "-ENOMEM"
    m.folio_locks.folio_trylock(cpu, dst)  # nobody else knows dst: cannot fail
    m.anon_vma.down_read(cpu)  # rmap_walk_anon_lock(): waits out a pmd-clear collapse's write hold
    try:
        installed = try_to_migrate(cpu, src, index, nr)
    finally:
        m.anon_vma.up_read(cpu)
    cpu.chaos("migrate_after_unmap")
    result = "MIGRATEPAGE_SUCCESS"
    if m.folio_mapcount(src) or not installed:
        # still mapped (the walk missed a mapping: the kernel fails the move the same way), or
        # nothing mapped it any more (the kernel would move the unmapped folio: nothing to see)
        result = "-EAGAIN"
    elif m.folio_ref_count(src) != 1:
        result = "-EAGAIN"  # folio_migrate_mapping(): a pin or another reference
    if result == "MIGRATEPAGE_SUCCESS":
        for j in range(nr):  # folio_copy(): after the flush, so no write lands behind it
            m.copy_page(dst + j, src + j)
        cpu.chaos("migrate_after_copy")
    new = dst if result == "MIGRATEPAGE_SUCCESS" else src
    if installed:
        m.anon_vma.down_read(cpu)  # remove_migration_ptes() walks the rmap: same exclusion
        try:
            remove_migration_ptes(cpu, src, new, index, nr)
        finally:
            m.anon_vma.up_read(cpu)
        missed = [(t, j, e) for t, j, e in installed if leftover(m, t, j, src, nr)]
        if missed:
            repair_migration_entries(cpu, missed, src, new, index)
    m.folio_locks.folio_unlock(cpu, dst)
    if result == "MIGRATEPAGE_SUCCESS":
        m.folio_put(cpu, dst)  # the allocation reference: dst lives on by its mappings
        m.folio_locks.folio_unlock(cpu, src)
        m.folio_put(cpu, src)  # the isolation reference: frees src
    else:
        m.folio_put(cpu, dst)  # never mapped: freed
        folio_putback_lru(cpu, src, locked=True)
    return result


def leftover(m: Machine, t: int, j: int, src: int, nr: int) -> bool:
    """Entry j of table t is still one of our migration entries to src."""
    e = m.ptep_get(t, j)
    return is_migration_entry(e) and src <= e >> PFN_SHIFT < src + nr


def repair_migration_entries(cpu: CpuContext, missed: list[tuple[int, int, int]], src: int, new: int, index: int) -> None:
    """The oracle: remove_migration_ptes() did not find these entries (its rmap walk met a
    cleared PMD).  Record it, then do what remove_migration_pte() would have done, straight in
    the table (under its PTL) — the kernel would leave them, and the next fault on one would
    retry for ever on an unlocked (or freed) folio."""
    m = cpu.m
    for t, j, _ in missed:
        vpn = (index & ~511) + j
        cpu.violation(
            "walker_missed_mapping",
            page=vpn,
            detail=f"remove_migration_ptes() of folio {src} left the migration entry of page {vpn} (table {t}) behind: the rmap walk found no table behind the PMD",
        )
        ptl = m.ptl(t)
        ptl.lock(cpu)  # the entry changes only under its table's PTL
        try:
            if leftover(m, t, j, src, 1 << m.folio_order(src)):
                e = m.ptep_get(t, j)
                pfn = new + ((e >> PFN_SHIFT) - src)
                m.folio_ref_add(new, 1)
                m.folio_mapcount_add(new, 1)
                m.set_pte_at(t, j, (pfn << PFN_SHIFT) | _PRESENT | (e & (_WRITE | _DIRTY | _YOUNG)))
        finally:
            ptl.unlock(cpu)


# ------------------------------------------------------------------------------ 2. page-table walker
def walk_page_range(cpu: CpuContext, start: int, end: int, pmd_entry: Callable[[int, int, int], None]) -> None:
    """walk_page_range() with PGWALK_RDLOCK: mmap_read_lock(), then ``pmd_entry(i, lo, hi)`` for
    every PMD covering [start, end) (lo, hi: the part of the range in that PMD)."""
    m = cpu.m
    m.mmap_lock.down_read(cpu)  # the VMA and the page-table tree stay as they are (pmd-clear, VMA changes are writers)
    try:
        vpn = start
        while vpn < end:
            i = vpn >> 9
            hi = min(end, (i + 1) << 9)
            pmd_entry(i, vpn, hi)
            vpn = hi
            cpu.interrupt_point()
    finally:
        m.mmap_lock.up_read(cpu)


def smaps_walk(cpu: CpuContext, start: int, end: int) -> dict[str, int]:
    """show_smap() -> smaps_pte_range() over [start, end): a PMD-mapped THP under
    pmd_trans_huge_lock(), each PTE table under pte_offset_map_lock(); present PTEs and
    migration entries are accounted (smaps_pte_entry() reads the folio behind a migration entry
    too, through pfn_swap_entry_to_page()), with every folio's mapcount and refcount — which
    the oracle checks against what the walker sees (check_ptes_locked()).  Returns the counts."""
    m = cpu.m
    acc = {"rss": 0, "migration": 0, "thp": 0}

    def pmd_entry(i: int, lo: int, hi: int) -> None:
        pmd = m.pmdp_get(i)
        if pmd_trans_huge(pmd):
            m.pmd_lock.lock(cpu)  # pmd_trans_huge_lock(): excludes split and zap of the huge PMD
            try:
                pmd = m.pmdp_get(i)
                if pmd_trans_huge(pmd):
                    head = pmd >> PFN_SHIFT
                    if m.folio_head(head) != head or m.folio_flags(head) & PG_BUDDY:
                        walker_inconsistent(cpu, i << 9, f"huge PMD {i} maps pfn {head}, which is not a live folio")
                    elif collapse_owns(m, head):
                        walker_grabbed(cpu, head, i << 9, "found, through a huge PMD under the PMD lock,")
                    elif m.folio_mapcount(head) < 1:
                        walker_inconsistent(cpu, i << 9, f"huge PMD {i} maps folio {head}, whose mapcount is {m.folio_mapcount(head)}")
                    acc["thp"] += hi - lo
                    acc["rss"] += hi - lo
                    return
            finally:
                m.pmd_lock.unlock(cpu)
        t, ptl = pte_offset_map_lock(cpu, i)
        if ptl is None:
            return
        try:
            first = lo & 511
            check_ptes_locked(cpu, t, first, hi - lo, lo)
            ptes = m.ptes_range(t, first, hi - lo)
            acc["rss"] += int(((ptes & _PRESENT) != 0).sum())
            acc["migration"] += int((((ptes & _MIGRATION) != 0) & ((ptes & _PRESENT) == 0)).sum())
        finally:
            ptl.unlock(cpu)

    walk_page_range(cpu, start, end, pmd_entry)
    return acc


def madvise_cold_or_pageout(cpu: CpuContext, start: int, nr: int, pageout: bool) -> dict[str, int]:
    """madvise(MADV_COLD / MADV_PAGEOUT) of [start, start + nr) (within one PMD) ->
    madvise_cold_or_pageout_pte_range() under mmap_read_lock: pte_offset_map_lock(); skip
    entries that are not present and the zero page; skip large folios not wholly in the range
    (the kernel would folio_trylock() + split_folio() them: not modelled) and folios not on the
    LRU or mapped more often than they have pages; COLD: clear the young bits
    (clear_young_dirty_ptes(), flushed at tlb_finish_mmu()); PAGEOUT: folio_isolate_lru() and,
    with the PTL dropped, reclaim_pages() -> shrink_folio_list(): folio_trylock(), and without
    swap add_to_swap() fails, so the folio is kept and put back.  A PMD-mapped THP is skipped
    (the kernel would split it for a partial range).

    With the ``pt-walk-no-ptl`` bug the PTEs are read and acted on without the PTL."""
    m = cpu.m
    nolock = "pt-walk-no-ptl" in cpu.bugs
    acc = {"young_cleared": 0, "isolated": 0, "kept": 0}
    isolated: list[int] = []
    i, first = start >> 9, start & 511

    m.mmap_lock.down_read(cpu)  # PGWALK_RDLOCK: the VMA stays, page tables are not replaced under us
    try:
        if nolock:
            pmd = m.pmdp_get(i)
            t, ptl = (-1, None) if not pmd & _PRESENT or pmd_trans_huge(pmd) else (pmd >> PFN_SHIFT, None)
        else:
            t, ptl = pte_offset_map_lock(cpu, i)
        if t < 0:
            return acc
        try:
            if ptl is not None:
                check_ptes_locked(cpu, t, first, nr, start)
            ptes = m.ptes_range(t, first, nr)
            seen: set[int] = set()
            for j, pte in enumerate(ptes.tolist()):
                pfn = pte >> PFN_SHIFT
                if not pte & _PRESENT or m.is_zero_pfn(pfn) or not 0 <= pfn < m.L.nr_frames:
                    continue
                head = m.folio_head(pfn)  # vm_normal_folio()
                if head < 0 or head in seen:
                    continue
                seen.add(head)
                if nolock and collapse_owns(m, head):
                    walker_grabbed(cpu, head, start + j, "found, through a PTE read without the PTL,")
                fnr = 1 << m.folio_order(head)
                lo = j - (pfn - head)
                if lo < 0 or lo + fnr > nr:
                    continue  # a large folio not wholly in the range: the kernel splits it
                flags = m.folio_flags(head)
                if not flags & PG_LRU or m.folio_mapcount(head) != fnr:
                    continue  # "Do not interfere with other mappings of this folio and non-LRU folio"
                if not pageout:
                    for k in range(lo, lo + fnr):
                        e = m.ptep_get(t, first + k)
                        while e & _PRESENT and e & _YOUNG and e >> PFN_SHIFT == head + (k - lo):
                            if m.ptep_cmpxchg(t, first + k, e, e & ~_YOUNG):  # clear_young_dirty_ptes()
                                acc["young_cleared"] += 1
                                break
                            e = m.ptep_get(t, first + k)
                    continue
                h, _ = folio_isolate_lru(cpu, pfn, keep_locked=False)
                if h >= 0:
                    isolated.append(h)
                    acc["isolated"] += 1
        finally:
            if ptl is not None:
                ptl.unlock(cpu)
        if acc["young_cleared"]:
            cpu.flush_tlb_range(start, start + nr)  # tlb_finish_mmu(): tlb_remove_tlb_entries() batched
    finally:
        m.mmap_lock.up_read(cpu)
    for head in isolated:  # reclaim_pages() -> shrink_folio_list()
        locked = m.folio_locks.folio_trylock(cpu, head)  # shrink_folio_list(): excludes a collapse, a migration
        if locked and collapse_owns(m, head):
            walker_grabbed(cpu, head, start, "locked")
        acc["kept"] += 1  # anon, no swap: add_to_swap() fails -> activate_locked, keep
        folio_putback_lru(cpu, head, locked=locked)
    return acc


# ------------------------------------------------------------------------------ 3. VMA changes
def change_protection(cpu: CpuContext, start: int, nr: int, writable: bool) -> str:
    """mprotect() of [start, start + nr) of the collapsing VMA (within one PMD) ->
    mprotect_fixup() -> change_protection() -> change_pte_range(): mmap_write_lock(),
    vma_start_write(); a PMD-mapped THP is split first (a partial range: __split_huge_pmd());
    under the PTL each present PTE is made read-only (PROT_READ) or, for PROT_READ|PROT_WRITE,
    writable where can_change_pte_writable() allows (an exclusive anon folio: never the zero
    page); a writable migration entry becomes a readable one; then flush_tlb_range() before
    mmap_write_unlock().  Returns "ok"."""
    m = cpu.m
    i, first = start >> 9, start & 511
    m.mmap_lock.down_write(cpu)  # the VMA changes: excludes every mmap_lock reader (faults, GUP-slow, khugepaged, walkers)
    try:
        # excludes per-VMA-lock faults and a collapse that holds the VMA's read lock
        m.vma_locks[VMA_COLLAPSE].vma_start_write(cpu, mm_lock_seq(cpu))
        if pmd_trans_huge(m.pmdp_get(i)):
            split_huge_pmd(cpu, i)
        t, ptl = pte_offset_map_lock(cpu, i)
        if ptl is None:
            return "ok"
        changed = 0
        try:
            check_ptes_locked(cpu, t, first, nr, start)
            for j in range(first, first + nr):
                while True:  # ptep_modify_prot_start/commit: the MMU may set A/D meanwhile
                    pte = m.ptep_get(t, j)
                    pfn = pte >> PFN_SHIFT
                    if pte & _PRESENT and not m.is_zero_pfn(pfn):
                        new = pte | _WRITE if writable else pte & ~_WRITE
                    elif is_migration_entry(pte) and not writable:
                        new = pte & ~_WRITE  # make_readable_migration_entry()
                    else:
                        break
                    if new == pte:
                        break
                    if pte & _PRESENT:
                        head = m.folio_head(pfn)
                        if head >= 0 and collapse_owns(m, head):
                            walker_grabbed(cpu, head, (i << 9) + j, "changed the protection of")
                    if m.ptep_cmpxchg(t, j, pte, new):
                        changed += 1
                        break
        finally:
            ptl.unlock(cpu)
        if changed:
            cpu.flush_tlb_range(start, start + nr)  # change_protection_range(): before the lock goes
        return "ok"
    finally:
        mmap_write_unlock(cpu)


def mmap_fixed_over(cpu: CpuContext, start: int, nr: int) -> int:
    """mmap(MAP_FIXED|MAP_ANONYMOUS) over [start, start + nr) of the collapsing VMA: one syscall
    that munmap()s the range — mmap_write_lock(), vma_start_write(), unmap_region(): zap, flush,
    free (MADV_DONTNEED's zap_range(), whose zap epoch tells the oracle the contents went on
    purpose) — and maps fresh anonymous memory there, merged back into the same VMA (the slot
    never changes).  Returns the pages zapped."""
    m = cpu.m
    m.mmap_lock.down_write(cpu)  # the VMA tree changes: excludes every mmap_lock reader
    try:
        m.vma_locks[VMA_COLLAPSE].vma_start_write(cpu, mm_lock_seq(cpu))  # and every VMA-lock reader of it
        return zap_range(cpu, start, nr, lock_mm=False)
    finally:
        mmap_write_unlock(cpu)


__all__ = [
    "MADV_PAGES",
    "change_protection",
    "check_ptes_locked",
    "collapse_owns",
    "folio_isolate_lru",
    "folio_referenced",
    "lru_pick",
    "madvise_cold_or_pageout",
    "migrate_folio",
    "migrate_one",
    "mmap_fixed_over",
    "page_vma_mapped_walk",
    "pte_offset_map_lock",
    "shrink_active_folio",
    "shrink_active_one",
    "smaps_walk",
    "walk_page_range",
]
