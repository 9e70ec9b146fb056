"""Strategy C, ``migration-entry``: Dev Jain's proposal — "Take PTL, scan PTEs, isolate and lock
the folios, set the PTEs to migration entries, check folio references ... drop the PTL ... copy
... batch set the PTEs, and release the folio locks" — mirroring migrate_pages() for anon folios
(try_to_migrate_one, remove_migration_ptes), with the pin check after clear + flush (§2.3 A1->A2).

Why the seed's requirements hold:
  a) GUP-fast cannot grab the folio: the PTEs are cleared and flushed before the reference
     check, and then replaced by migration entries, which are not present: GUP-fast falls back;
     a grab that happened before the clear is seen by the check (back-off restores the PTEs).
  b) No CPU can read or write the folio: the flush removed every translation; a fault that sees
     a migration entry goes to migration_entry_wait() and *sleeps* on the folio lock, which the
     collapse holds until the new PTEs are in.
  c) No ordinary walker can grab the folio: walkers see migration entries and back off or wait;
     rmap walkers find the folios locked and isolated, and no longer mapped.
The PTL is held only for the unmap and for the remap, not for the copy.

Holes — "some devil in the detail".  Migration knows no holes: only present PTEs become
migration entries, so the pte_none (and zero-page) entries of the range stay open while the PTL
is dropped, and a racing fault fills one without waiting.  ``--holes`` picks one of two honest
answers:
  - ``mark``: every hole gets a hole marker in the same PTL section as the migration entries: a
    migration entry to the new folio's page for that slot.  The new folio is locked from before
    the unmap until its PTEs are in (migrate_folio_unmap() locks dst too), so a faulting CPU
    sleeps in migration_entry_wait() on it exactly as on an old folio — the way collapse_file()
    fills the page-cache holes of a file range with the new locked folio.  Holes cannot be
    filled; a zero-page PTE is a hole (it is cleared, flushed and marked like one).
  - ``backoff``: holes stay open (zero-page PTEs are cleared with the migration entries, so no
    read-only zero-page translation outlives the flush).  If one was filled when the install
    comes, everything goes back — remove_migration_ptes(src, src) of the entries that are still
    ours, filled holes keep the fault's page — and the result is SCAN_PAGE_FILLED (the kernel's
    code for a hole filled during collapse_file()).
Either way, an entry that MADV_DONTNEED zapped during the collapse stays zapped (never
resurrected): the new folio then maps fewer entries and the result is SCAN_PTE_ZAPPED (or
SCAN_RANGE_ZAPPED when nothing is left to map); only a range that maps the new folio in every
entry is SCAN_SUCCEED (collapse_range() checks it).

VMA stability: ``--vma-stability mmap-lock`` holds mmap_lock for read across the collapse, as
proposed (every mmap() of the mm waits for the collapse); ``vma-lock`` holds only the collapsing
VMA's read lock (Collapse.vma_stable_lock()).

Injectable bugs here: ``migration-no-refcheck`` (never checks for pins: a DMA write into the old
folio during the copy is lost), ``migration-refcheck-before-unmap`` (checks before clearing: a pin
taken between the check and the clear is missed — the same loss, through a narrower window),
``migration-holes-open`` (the proposal as first written: holes stay open, the install keeps a
fault's page and still says SCAN_SUCCEED — collapse_range() flags the partial collapse).
"""

from __future__ import annotations

import numpy as np
from ptlab.core.kernel.khugepaged import Collapse
from ptlab.core.machine.layout import pte_mk_migration
from ptlab.core.machine.mutants import lock_or_skip

NAME = "migration-entry"


def collapse(c: Collapse) -> str:
    cpu, m = c.cpu, c.m  # step 1, allocating c.target outside any lock, ran in collapse_range()
    holes_open = "migration-holes-open" in c.bugs
    mark = cpu.config.holes == "mark" and not holes_open
    result = c.vma_stable_lock()  # the VMA must stay stable for the whole collapse
    if result != "SCAN_SUCCEED":
        return result
    target_locked = False
    try:
        result = c.revalidate()
        if result != "SCAN_SUCCEED":
            return result
        if mark:
            # migrate_folio_unmap(): folio_trylock(dst).  Nobody else knows the new folio, so
            # this cannot fail; it stays locked until its PTEs are in: hole-marker waiters sleep on it
            if not m.folio_locks.folio_trylock(cpu, c.target):
                return "SCAN_PAGE_LOCK"
            target_locked = True
        ptl = m.ptl(c.t)
        unmap_ptl = lock_or_skip(cpu, "mutant-migration-unmap-no-ptl", ptl)
        unmap_ptl.lock(cpu)  # the unmap: PTEs change only under it
        try:
            if m.pmdp_get(c.i) >> 12 != c.t:
                return "SCAN_PMD_NULL"
            c.phase("refcheck")
            ptes = c.read_ptes()
            # folio_trylock + isolate (the folios stay locked to the end)
            result = c.isolate(ptes, check_refs="migration-no-refcheck" not in c.bugs)
            if result != "SCAN_SUCCEED":
                return result
            if "migration-refcheck-before-unmap" in c.bugs and c.refs_unexpected():
                c.release_isolated()
                return "SCAN_PAGE_COUNT"
            cpu.chaos("collapse_before_unmap")
            # invalidate: each present PTE becomes a migration entry at once (never pte_none,
            # so a racing fault goes to migration_entry_wait() instead of allocating); each hole
            # (none or zero page) a hole marker (mark) or pte_none (backoff); one flush for the
            # range, then the pin check (clear first, then check: §2.3 A1 -> A2)
            c.phase("unmap")
            hole = c.holes(ptes)
            fill = pte_mk_migration(c.new_ptes()) if mark else np.zeros(c.nr, dtype=np.int64)
            entries = np.where(hole, fill, pte_mk_migration(ptes))
            m.set_ptes(c.t, c.first, entries)
            c.phase("flush")
            if "mutant-migration-no-flush" not in c.bugs:
                cpu.flush_tlb_range(c.start, c.start + c.nr)
            cpu.chaos("collapse_after_flush")
            c.phase("refcheck")
            if "migration-no-refcheck" not in c.bugs and "migration-refcheck-before-unmap" not in c.bugs:
                if c.refs_unexpected():  # folio_maybe_dma_pinned() / expected refcount
                    if "mutant-migration-no-restore" not in c.bugs:
                        m.set_ptes(c.t, c.first, ptes)  # remove_migration_ptes(src, src); markers go
                    c.release_isolated()
                    return "SCAN_PAGE_COUNT"
        finally:
            unmap_ptl.unlock(cpu)
        # try_to_migrate_one(): folio_remove_rmap_pte() + folio_put() per entry (the folios are
        # locked and isolated: nothing else touches their counts)
        c.remove_rmaps(ptes)
        # the copy runs with no spinlock: faulting CPUs sleep in migration_entry_wait()
        c.phase("copy")
        c.copy(ptes)
        c.phase("install")
        install_ptl = lock_or_skip(cpu, "mutant-migration-install-no-ptl", ptl)
        install_ptl.lock(cpu)  # remove_migration_ptes(): under the PTL, only our own entries
        try:
            now = m.ptes_range(c.t, c.first, c.nr)
            cpu.chaos("collapse_install_after_read")
            ours = now == entries  # an entry zapped (and maybe refaulted) since is not ours
            if "mutant-migration-install-no-recheck" in c.bugs:
                ours = np.ones(c.nr, dtype=bool)  # the mutant replaces whatever is there
            if not mark and not holes_open and (hole & ~ours).any():
                # a hole was filled while the range was open: back off.  Entries still ours go
                # back to what they were (the rmap first: folio_add_anon_rmap_pte() before
                # set_pte_at()), filled holes keep the fault's page, zapped entries stay none
                c.add_rmaps(ptes[ours & ~hole])
                m.set_ptes(c.t, c.first, np.where(ours, ptes, now))
                result = "SCAN_PAGE_FILLED"
            else:
                # an entry zapped during the collapse stays none; a hole a fault filled (only
                # with the holes-open bug) stays the fault's; everything else maps the new folio
                c.install_ptes(ours, now)
        finally:
            install_ptl.unlock(cpu)
        if target_locked:
            m.folio_locks.folio_unlock(cpu, c.target)  # wakes the hole-marker waiters
            target_locked = False
        if result == "SCAN_PAGE_FILLED":
            c.release_isolated()  # putback, unlock (wakes the migration waiters)
            return result
        if c.mapped:
            c.target = -1  # in the page tables now
        c.release_old()  # folio_unlock() of every old folio wakes the sleepers
        if c.mapped == c.nr or holes_open:
            if not c.mapped:
                c.free_target()  # the bug's "success" that maps nothing
            return "SCAN_SUCCEED"
        return "SCAN_PTE_ZAPPED" if c.mapped else "SCAN_RANGE_ZAPPED"
    finally:
        if target_locked:
            m.folio_locks.folio_unlock(cpu, c.target)  # back-off before the install
        c.vma_stable_unlock()
