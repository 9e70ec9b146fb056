"""Strategy A, ``pmd-clear``: today's collapse_huge_page() (order 9) and Nico Pache's mTHP v16
generalisation (orders < 9), mm/khugepaged.c.

Why the seed's requirements hold:
  a) GUP-fast cannot grab the folio: the whole PMD is cleared (pmdp_collapse_flush) before the
     reference check.  A walker that starts later sees pmd_none and falls back to GUP-slow,
     which sleeps on mmap_lock; a walker already inside the old table either finished its grab
     before the flush IPI completed (ipi mode: the IPI waits for IRQs-off walkers) and is seen
     by the reference check, or re-checks the PMD after its grab and backs off (70cbc3cc78a9);
     tlb_remove_table_sync_one() waits for IRQs-off walkers where the flush does not
     (broadcast TLBI, 2ba99c5e0881).
  b) No CPU can read or write the folio: the flush removed every translation, and no new one
     can be made: the PMD is none and faults cannot get past mmap_lock (held for write) or the
     VMA lock (write-locked), so they sleep until the collapse is over.
  c) No ordinary walker can grab the folio: mmap_lock for write and the VMA write lock exclude
     page-table walkers, anon_vma_lock_write excludes rmap walkers, and the old folios are
     locked and isolated.
Cost: every fault in the VMA and every mmap()/munmap() in the mm sleeps for the whole collapse,
including the copy; for mTHP all 512 PTEs of the PMD are hidden, not just the 2^order collapsed.

Injectable bugs here: ``pmd-clear-read-lock`` (mmap_lock for read and no vma_start_write: a fault
populates the cleared PMD with a fresh table, which pmd_populate then overwrites — lost writes),
``no-sync-ipi`` (skips tlb_remove_table_sync_one(); only unsafe together with GUP-fast missing its
PMD re-check on a broadcast-flush machine), ``pmd-clear-no-anon-vma-lock`` (no anon_vma_lock_write:
an rmap walk runs while the PMD is cleared — a migration's remove_migration_ptes() cannot find the
migration entries it installed behind that PMD and leaves them; core/kernel/walkers.py flags it).
"""

from __future__ import annotations

import numpy as np
from ptlab.core.kernel.khugepaged import Collapse
from ptlab.core.kernel.paths import mm_lock_seq, mmap_write_unlock
from ptlab.core.machine.layout import pmd_mk_huge, pmd_mk_table

NAME = "pmd-clear"


def collapse(c: Collapse) -> str:
    cpu, m = c.cpu, c.m  # step 1, allocating c.target outside any lock, ran in collapse_range()
    read_lock = "pmd-clear-read-lock" in c.bugs
    # step 2: mmap_write_lock: "Prevent all access to pagetables with the exception of gup_fast
    # later handled by the ptep_clear_flush and the VM handled by the anon_vma lock + PG_lock."
    if read_lock:
        m.mmap_lock.down_read(cpu)  # the bug: faults and page-table walkers are not excluded
    else:
        m.mmap_lock.down_write(cpu)  # excludes faults, GUP-slow, mmap()/munmap() of the whole mm
    try:
        result = c.hugepage_vma_revalidate()
        if result != "SCAN_SUCCEED":
            return result
        if not read_lock and "mutant-pmd-clear-no-vma-write" not in c.bugs:
            m.vma_locks[0].vma_start_write(cpu, mm_lock_seq(cpu))  # excludes per-VMA-lock faults
        result = c.check_pmd_still_valid()
        if result != "SCAN_SUCCEED":
            return result
        anon_locked = "pmd-clear-no-anon-vma-lock" not in c.bugs  # the bug: rmap walks run on
        if anon_locked:
            m.anon_vma.down_write(cpu)  # excludes rmap walkers (reclaim, migration, compaction)
        try:
            # step 3: pmdp_collapse_flush() under the PMD lock, then the GUP-fast sync IPI
            c.phase("unmap")
            m.pmd_lock.lock(cpu)  # "probably unnecessary": serialises PMD changes
            pmd = m.pmdp_get_and_clear(c.i)
            m.pmd_lock.unlock(cpu)
            cpu.chaos("collapse_after_pmd_clear")
            c.phase("flush")
            pmd_start = c.i * 512
            if "mutant-pmd-clear-no-flush" not in c.bugs:
                cpu.flush_tlb_range(pmd_start, pmd_start + 512)
            if "no-sync-ipi" not in c.bugs:
                cpu.tlb_remove_table_sync_one()
            cpu.chaos("collapse_after_flush")
            # step 4: isolate under the (now detached) table's PTL
            c.phase("refcheck")
            ptl = m.ptl(c.t)
            ptl.lock(cpu)  # pte_offset_map_lock() on the detached table
            try:
                ptes = c.read_ptes()
                result = c.isolate(ptes, check_refs="mutant-pmd-clear-no-refcheck" not in c.bugs)
            finally:
                ptl.unlock(cpu)
            if result != "SCAN_SUCCEED":
                # re-attach the old table unchanged
                m.pmd_lock.lock(cpu)  # pmd_populate() under the PMD lock
                if "mutant-pmd-clear-no-restore" not in c.bugs:
                    m.set_pmd(c.i, pmd)
                m.pmd_lock.unlock(cpu)
                return result
            if c.order == 9 and anon_locked:
                # "All pages are isolated and locked so anon_vma rmap can't run anymore."
                m.anon_vma.up_write(cpu)
                anon_locked = False
            # step 5: copy with no spinlock held, the PMD still cleared
            c.phase("copy")
            c.copy(ptes)
            # step 6: install
            c.phase("install")
            m.set_ptes(c.t, c.first, np.zeros(c.nr, dtype=np.int64))  # ptep_clear() in copy_succeeded
            if c.order == 9:
                m.folio_add_new_anon_rmap(c.target, 1)
                m.pmd_lock.lock(cpu)  # set_pmd_at() under the PMD lock
                m.pgtable_trans_huge_deposit(c.i, c.t)  # the old table, kept for a later split
                m.set_pmd(c.i, pmd_mk_huge(c.target))
                m.pmd_lock.unlock(cpu)
            else:
                # map_anon_folio_pte_nopf() into the detached table, then pmd_populate()
                m.folio_add_new_anon_rmap(c.target, c.nr)
                m.set_ptes(c.t, c.first, c.new_ptes())
                m.pmd_lock.lock(cpu)  # pmd_populate() under the PMD lock
                m.set_pmd(c.i, pmd_mk_table(c.t))  # smp_wmb(): PTEs visible before the PMD
                m.pmd_lock.unlock(cpu)
            c.target = -1
            c.drop_old_mappings(ptes)
            return "SCAN_SUCCEED"
        finally:
            if anon_locked:
                m.anon_vma.up_write(cpu)
    finally:
        if read_lock:
            m.mmap_lock.up_read(cpu)
        else:
            mmap_write_unlock(cpu)
