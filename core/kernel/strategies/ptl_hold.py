"""Strategy B, ``ptl-hold``: David Hildenbrand's sketch — "you really have to hold the PTL for
the whole period: from when you temporarily clear PTEs + flush the TLB, when you copy, until
you re-insert the updated ones" — keeping the original PTEs in a temporary copy for back-off.

Why the seed's requirements hold:
  a) GUP-fast cannot grab the folio: the PTEs are cleared and the TLB flushed before the
     reference check, so a walker starting later sees pte_none and falls back (to GUP-slow,
     which spins on the PTL); one that grabbed earlier is seen by the check, and one in flight
     re-checks its PTE after the grab and backs off (the flush IPI also waits for it in ipi mode).
  b) No CPU can read or write the folio: the flush removed every translation, and any fault
     that sees pte_none must take the PTL to install anything — it spins until the new PTEs are
     in, then vmf_pte_changed() makes it throw its freshly zeroed folio away.
  c) No ordinary walker can grab the folio: all of them take this PTL.
Holes need nothing extra: a hole (none or zero-page PTE) is cleared with the rest, and a fault
on it must take the PTL to fill it — it spins, then finds the new PTE (vmf_pte_changed()).  An
MADV_DONTNEED of the range needs the PTL too, so every entry maps the new folio at the end.

Cost: every CPU that touches the range (or, with ``--ptl mm``, anything mapped by the mm) spins
for the whole copy, burning its CPU.  VMA stability (``--vma-stability``): with ``mmap-lock``
(as proposed) mmap_lock is held for read throughout, so every mmap() of the mm waits for the
collapse and a queued mmap() writer also holds up later mmap_read_lock callers; with
``vma-lock`` only the collapsing VMA's read lock is held (Collapse.vma_stable_lock()).

Injectable bugs here: ``ptl-hold-no-flush`` (clears but never flushes: a CPU keeps writing the
old folio through its TLB during and after the copy — lost writes), ``ptl-hold-unlocked-copy``
(drops the PTL for the copy while the PTEs are none: a fault installs a fresh page that the
re-insert overwrites — lost writes, leaked folio), ``rfc-v1`` (the first RFC's order: copy under
the PTL first, then clear and set_ptes, no flush: writes made during the copy are lost).
"""

from __future__ import annotations

import numpy as np
from ptlab.core.kernel.khugepaged import Collapse

NAME = "ptl-hold"


def collapse(c: Collapse) -> str:
    cpu, m = c.cpu, c.m  # step 1, allocating c.target outside any lock, ran in collapse_range()
    result = c.vma_stable_lock()  # VMA stability; page faults and GUP proceed under it
    if result != "SCAN_SUCCEED":
        return result
    try:
        result = c.revalidate()
        if result != "SCAN_SUCCEED":
            return result
        ptl = m.ptl(c.t)
        ptl.lock(cpu)  # held from the clear to the re-insert: every walker of this table waits
        locked = True
        try:
            if m.pmdp_get(c.i) >> 12 != c.t:
                return "SCAN_PMD_NULL"
            c.phase("refcheck")
            ptes = c.read_ptes()
            result = c.isolate(ptes)
            if result != "SCAN_SUCCEED":
                return result
            if "rfc-v1" in c.bugs:
                # RFC v1: copy first under the PTL, then clear + set_ptes, no flush
                c.phase("copy")
                c.copy(ptes)
                c.phase("unmap")
                m.set_ptes(c.t, c.first, np.zeros(c.nr, dtype=np.int64))
            else:
                cpu.chaos("collapse_before_unmap")  # isolated (refs checked), PTEs still present
                # step 1: clear the PTEs and flush the TLB
                c.phase("unmap")
                m.set_ptes(c.t, c.first, np.zeros(c.nr, dtype=np.int64))  # ptep_get_and_clear, batched
                cpu.chaos("collapse_after_clear")
                c.phase("flush")
                if "ptl-hold-no-flush" not in c.bugs:
                    cpu.flush_tlb_range(c.start, c.start + c.nr)
                cpu.chaos("collapse_after_flush")
                # step 2: unexpected references (GUP pins) -> restore the original PTEs
                c.phase("refcheck")
                if c.refs_unexpected() and "mutant-ptl-hold-no-refcheck" not in c.bugs:
                    if "mutant-ptl-hold-no-restore" not in c.bugs:
                        m.set_ptes(c.t, c.first, ptes)
                    c.release_isolated()
                    return "SCAN_PAGE_COUNT"
                # step 3: copy, the PTL still held (unless the bug drops it)
                c.phase("copy")
                if "ptl-hold-unlocked-copy" in c.bugs:
                    ptl.unlock(cpu)
                    locked = False
                c.copy(ptes)
                if not locked:
                    ptl.lock(cpu)  # back for the re-insert (the bug left the range open meanwhile)
                    locked = True
            # step 4: install the new folio's PTEs
            c.phase("install")
            c.install_ptes()  # folio_add_new_anon_rmap() + set_ptes() of the whole range
            c.target = -1
        finally:
            if locked and not ("mutant-ptl-hold-backoff-keeps-ptl" in c.bugs and c.target >= 0):
                ptl.unlock(cpu)  # (the mutant keeps it on every back-off: target not installed)
        c.drop_old_mappings(ptes)
        return "SCAN_SUCCEED"
    finally:
        c.vma_stable_unlock()
