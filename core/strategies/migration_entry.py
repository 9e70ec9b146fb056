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
The PTL is held only for the unmap and for the remap, not for the copy.  mmap_lock stays held
for read (VMA stability), as in the proposal.

Injectable bugs here: ``migration-no-refcheck`` (never checks for pins: a DMA write into the old
folio during the copy is lost), ``migration-refcheck-before-unmap`` (checks before clearing: a pin
taken between the check and the clear is missed — the same loss, through a narrower window).
"""

from __future__ import annotations

import numpy as np
from ptlab.core.khugepaged import Collapse
from ptlab.core.layout import pte_mk_migration

NAME = "migration-entry"


def collapse(c: Collapse) -> str:
    cpu, m = c.cpu, c.m  # step 1, allocating c.target outside any lock, ran in collapse_range()
    m.mmap_lock.down_read(cpu)  # the VMA must stay stable for the whole collapse
    try:
        result = c.revalidate()
        if result != "SCAN_SUCCEED":
            return result
        ptl = m.ptl(c.t)
        ptl.lock(cpu)  # the unmap: PTEs change only under it
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
            # so a racing fault goes to migration_entry_wait() instead of allocating), one
            # flush for the range, then the pin check (clear first, then check: §2.3 A1 -> A2)
            c.phase("unmap")
            entries = np.where(ptes != 0, pte_mk_migration(ptes), 0)
            m.set_ptes(c.t, c.first, entries)
            c.phase("flush")
            cpu.flush_tlb_range(c.start, c.start + c.nr)
            cpu.chaos("collapse_after_flush")
            c.phase("refcheck")
            if "migration-no-refcheck" not in c.bugs and "migration-refcheck-before-unmap" not in c.bugs:
                if c.refs_unexpected():  # folio_maybe_dma_pinned() / expected refcount
                    m.set_ptes(c.t, c.first, ptes)  # remove_migration_ptes(src, src)
                    c.release_isolated()
                    return "SCAN_PAGE_COUNT"
        finally:
            ptl.unlock(cpu)
        # try_to_migrate_one(): folio_remove_rmap_pte() + folio_put() per entry (the folios are
        # locked and isolated: nothing else touches their counts)
        c.remove_rmaps(ptes)
        # the copy runs with no spinlock: faulting CPUs sleep in migration_entry_wait()
        c.phase("copy")
        c.copy(entries)
        c.phase("install")
        ptl.lock(cpu)  # remove_migration_ptes(src, dst): under the PTL, only our own entries
        try:
            # an entry zapped during the copy stays none; a hole refilled by a fault stays
            # the fault's; everything else gets the new folio's page
            now = m.ptes_range(c.t, c.first, c.nr)
            ours = now == entries
            nslots = int(ours.sum())
            if nslots:
                m.folio_add_new_anon_rmap(c.target, nslots)  # before the PTEs are visible
                m.set_ptes(c.t, c.first, np.where(ours, c.new_ptes(), now))
        finally:
            ptl.unlock(cpu)
        if not nslots:
            m.folio_put(cpu, c.target)  # nothing left to map
        c.target = -1
        c.release_old()  # folio_unlock() of every old folio wakes the sleepers
        return "SCAN_SUCCEED"
    finally:
        m.mmap_lock.up_read(cpu)

