"""Kernel paths run by the simulated CPUs: the hardware walk and the access, the page fault,
GUP-fast and GUP-slow, MADV_DONTNEED, mmap()/munmap()/mprotect(), split_huge_pmd.

Each function says which kernel function it mirrors and follows its order of locks and checks.
They touch the machine only through core/machine/mm/mm.py's accessors, the locks and the CPU context
(TLB flush, interrupt points), never through raw offsets.

The oracle lives in the access itself: every page holds one counter word per CPU (word = CPU
id) and one per DMA pin (word = 256 + CPU id).  A store first checks that its own word still
holds the value it last wrote there (else a write was lost), a load checks that another CPU's
word never goes backwards (else a stale read), and a value's high half names the page it was
written to (else a PTE maps the wrong page).  MADV_DONTNEED legitimately drops contents: it
bumps the page's zap epoch, and a word that reads 0 after an epoch change is a fresh page.  It
must really drop them, too: when a zap completed between two accesses (the epoch read before the
second differs from the one read after the first), the page must read 0 or a newer write, never
the old contents (``zap_not_zeroed``).  A word holding the free poison was read or written
through a stale translation of a freed frame (``use_after_free``).
"""

from __future__ import annotations

from ptlab.core.machine.config import PTRS_PER_PTE
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.layout import (
    _DIRTY,
    _PRESENT,
    _WRITE,
    _YOUNG,
    MM_LOCK_SEQ,
    PFN_SHIFT,
    POISON_FREE,
    VM_INUSE,
    VM_WRITE,
    is_migration_entry,
    pmd_mk_table,
    pmd_trans_huge,
    pte_mk,
)
from ptlab.core.machine.mm import VMA_COLLAPSE, Machine
from ptlab.core.machine.mutants import lock_or_skip

DMA_WORD = 256
VPN_SHIFT = 32
CHURN_SLOT_PAGES = 32
FIRST_CHURN_SLOT = 2


# ------------------------------------------------------------------------------ locking helpers
def mmap_write_unlock(cpu: CpuContext) -> None:
    """mmap_write_unlock(): vma_end_write_all() (bump mm_lock_seq) then up_write()."""
    cpu.ctl.fetch_add64(MM_LOCK_SEQ, 1)
    cpu.m.mmap_lock.up_write(cpu)


def mm_lock_seq(cpu: CpuContext) -> int:
    return cpu.ctl.load64(MM_LOCK_SEQ)


def lock_vma_under_rcu(cpu: CpuContext, vpn: int) -> int:
    """Find the VMA locklessly and read-lock it; -1 when that fails (caller takes mmap_lock)."""
    m = cpu.m
    if not cpu.config.vma_locks:
        return -1
    vma = m.find_vma(vpn)
    if vma < 0:
        return -1
    lock = m.vma_locks[vma]
    if not lock.vma_start_read(cpu):
        return -1
    if m.find_vma(vpn) != vma:  # unmapped or replaced between lookup and lock
        lock.vma_end_read(cpu)
        return -1
    return vma


# ------------------------------------------------------------------------------ hardware walk
def hw_walk(cpu: CpuContext, vpn: int, write: bool) -> int:
    """The MMU's lockless walk: returns the TLB entry (pfn << 1 | writable) it filled, or -1
    when the access must fault.  Sets the accessed/dirty bits atomically, as hardware does."""
    cpu.charge("tlb_walk")
    m = cpu.m
    i = vpn >> 9
    pmd = m.pmdp_get(i)
    if not pmd & _PRESENT:
        return -1
    if pmd_trans_huge(pmd):
        pfn = (pmd >> 12) + (vpn & 511)
        cpu.tlb_fill(vpn, pfn, True)
        return pfn << 1 | 1
    t = pmd >> 12
    idx = vpn & 511
    while True:
        pte = m.ptep_get(t, idx)
        if not pte & _PRESENT or (write and not pte & _WRITE):
            return -1
        want = pte | _YOUNG | (_DIRTY if write else 0)
        if want == pte or m.ptep_cmpxchg(t, idx, pte, want):
            break
    pfn = pte >> 12
    cpu.tlb_fill(vpn, pfn, bool(pte & _WRITE))
    return pfn << 1 | bool(pte & _WRITE)


def translate(cpu: CpuContext, vpn: int, write: bool) -> int:
    """TLB lookup, else walk, else page fault and retry (the access re-executes).  Returns the
    pfn, or -1 on SIGSEGV.  In broadcast mode the caller's load/store is marked in flight from
    the final TLB check until ``cpu.access_end()``."""
    bcast = cpu.broadcast
    while True:
        if bcast:
            cpu.access_begin()
            cpu.check_broadcast()
        e = cpu.tlb.get(vpn)
        if e is not None and (e & 1 or not write):
            return e >> 1
        if bcast:
            cpu.access_end()
        if hw_walk(cpu, vpn, write) >= 0:
            continue  # filled: the access re-checks the TLB (and any invalidation since)
        if handle_mm_fault(cpu, vpn, write) in ("segv", "fail"):
            return -1  # SIGSEGV, or VM_FAULT_OOM: the access does not happen
        cpu.interrupt_point()


# ------------------------------------------------------------------------------ the access + oracle
class Oracle:
    """Per-CPU memory of what this CPU wrote and saw, keyed by vpn."""

    __slots__ = ("mine", "seen", "dma", "seq")

    def __init__(self) -> None:
        # vpn -> (value, zap epoch before the store, zap epoch after it)
        self.mine: dict[int, tuple[int, int, int]] = {}
        self.seen: dict[tuple[int, int], tuple[int, int, int]] = {}  # likewise for loads
        self.dma: dict[int, tuple[int, int]] = {}
        self.seq = 0


def access_store(cpu: CpuContext, oracle: Oracle, vpn: int) -> bool:
    """A store of this CPU's counter word on page vpn; returns False on SIGSEGV.

    The zap epoch is read before the translation and again after the store (zap_epoch(): a zap
    moves it when it clears the entries and again after its flush): a store that went through a
    translation the zap was about to kill read an epoch older than the zap's end (its loss is
    accepted as legitimate), and a store that began after a whole zap must find 0 — the page
    is new — never the value this CPU stored before the zap (zap_not_zeroed)."""
    m = cpu.m
    epoch = m.epoch(vpn)
    new = vpn << VPN_SHIFT | ((oracle.seq + 1) & 0xFFFFFFFF)
    # the common case, a TLB hit, in one call: the lookup and the load and store through it
    # (not in broadcast mode, which marks the access in flight, nor when the steps are traced)
    hit = None if cpu.broadcast or cpu.on_step is not None else m.frames.tlb_xchg64(cpu.tlb, vpn, m.page_size, cpu.id * 8, new)
    if hit is not None:
        pfn, v = hit
    else:
        pfn = translate(cpu, vpn, True)
        if pfn < 0:
            return False
        if cpu.on_step is not None:
            cpu.on_step(f"store page {vpn} (pfn {pfn})")
        off = pfn * m.page_size + cpu.id * 8
        v = m.frames.load64(off)
        m.frames.store64(off, new)
        if cpu.broadcast:
            cpu.access_end()
    oracle.seq += 1
    after = m.epoch(vpn)
    prev = oracle.mine.get(vpn)
    expect = prev[0] if prev else 0
    # a store that started while a zap was in flight (odd epoch) may have gone to the doomed page
    if v != expect and not (v == 0 and prev is not None and (after != prev[1] or prev[1] & 1)):
        kind = "use_after_free" if v == POISON_FREE else "wrong_page" if v and v >> VPN_SHIFT != vpn else "lost_write"
        cpu.violation(kind, page=vpn, detail=f"CPU {cpu.id} expected {expect:#x} in its word, found {v:#x} (pfn {pfn})")
    elif v and prev is not None and zap_completed_since(epoch, prev[2]):
        # a zap completed (flush, then epoch bump) after the last store and before this
        # translation: the page is a new one, yet the old value is still there
        cpu.violation("zap_not_zeroed", page=vpn, detail=f"page {vpn} was zapped after CPU {cpu.id} stored {v:#x}, and still holds it (pfn {pfn})")
    oracle.mine[vpn] = (new, epoch, after)
    return True


def access_load(cpu: CpuContext, oracle: Oracle, vpn: int, word: int) -> int:
    """A load of another CPU's word (or a DMA word) on page vpn; checks it never goes back."""
    m = cpu.m
    epoch = m.epoch(vpn)
    pfn = translate(cpu, vpn, False)
    if pfn < 0:
        return -1
    if cpu.on_step is not None:
        cpu.on_step(f"load page {vpn} (pfn {pfn})")
    w = m.frames.load64(pfn * m.page_size + word * 8)
    if cpu.broadcast:
        cpu.access_end()
    after = m.epoch(vpn)
    key = (vpn, word)
    last = oracle.seen.get(key)
    if w == POISON_FREE:
        cpu.violation("use_after_free", page=vpn, detail=f"word {word} of page {vpn} holds the free poison (pfn {pfn})")
    elif w and w >> VPN_SHIFT != vpn:
        cpu.violation("wrong_page", page=vpn, detail=f"word {word} of page {vpn} holds {w:#x}, written for page {w >> VPN_SHIFT}")
    elif last is not None and w < last[0] and after == last[1]:
        cpu.violation("stale_read", page=vpn, detail=f"word {word} went back from {last[0]:#x} to {w:#x} (pfn {pfn})")
    elif w and last is not None and w <= last[0] and zap_completed_since(epoch, last[2]):
        # every write after the zap is newer than anything read before it: this is old contents
        cpu.violation("zap_not_zeroed", page=vpn, detail=f"word {word} of page {vpn} reads {w:#x} after a zap (read {last[0]:#x} before it; pfn {pfn})")
    oracle.seen[key] = (w, epoch, after)
    return w


def zap_epoch(cpu: CpuContext, start: int, nr: int) -> None:
    """The oracle's "contents dropped on purpose" mark on [start, start + nr): a zap moves each
    page's epoch twice — once when it clears the entries, under the lock a refault needs (odd:
    a zap in flight), once after its TLB flush completed (even: done).  A store that went
    through a translation the zap was about to kill read its epoch before the second move; a
    page mapped after the clear is read with the first move already made."""
    if "mutant-zap-no-epoch-bump" in cpu.bugs:
        return
    cpu.m.bump_epochs(start, nr)  # one call for the range, page by page


def zap_completed_since(epoch: int, since: int) -> bool:
    """A whole zap (clear and flush) happened after an access that read epoch ``since`` at its
    end, and before one that read ``epoch`` at its start."""
    return epoch >= since + 2 + (since & 1)


# ------------------------------------------------------------------------------ page fault
def handle_mm_fault(cpu: CpuContext, vpn: int, write: bool) -> str:
    """do_user_addr_fault(): lock_vma_under_rcu() else mmap_read_lock(), then
    __handle_mm_fault().  Records one "fault" event; returns its result."""
    m = cpu.m
    begin = cpu.op_begin()
    cpu.charge("fault_entry")  # exception entry/exit and the fault path's fixed work
    during = cpu.collapsing()
    vma = lock_vma_under_rcu(cpu, vpn)
    if vma >= 0:
        try:
            result = __handle_mm_fault(cpu, vma, vpn, write)
        finally:
            m.vma_locks[vma].vma_end_read(cpu)
    else:
        mmap_lock = lock_or_skip(cpu, "mutant-fault-no-mmap-lock", m.mmap_lock)
        mmap_lock.down_read(cpu)  # excludes mmap()/munmap() and pmd-clear collapse (writers)
        try:
            vma = m.find_vma(vpn)
            result = "segv" if vma < 0 else __handle_mm_fault(cpu, vma, vpn, write)
        finally:
            mmap_lock.up_read(cpu)
    cpu.op_end(begin, "fault", result, vpn, vma, 0, during)  # (vma, order, during)
    return result


def __handle_mm_fault(cpu: CpuContext, vma: int, vpn: int, write: bool) -> str:
    """__handle_mm_fault() -> handle_pte_fault(), with the VMA stable (VMA or mmap lock held).
    A write to a VMA without VM_WRITE is refused first, as access_error() does in the arch
    fault handler (SIGSEGV)."""
    m = cpu.m
    if write and not m.vma_flags(vma) & VM_WRITE:
        return "segv"
    i, idx = vpn >> 9, vpn & 511
    pmd = m.pmdp_get(i)
    if pmd == 0:
        t = m.pte_table_for(cpu, vpn)  # __pte_alloc(); pmd_install() under the PMD lock
        if t == -1:
            return "fail"  # VM_FAULT_OOM
        if t < 0:
            return "retry"
        pmd = pmd_mk_table(t)
    elif pmd_trans_huge(pmd):
        return "spurious"  # huge_pmd_set_accessed(): the walk refills the TLB
    t = pmd >> 12
    # handle_pte_fault(): vmf->orig_pte = ptep_get_lockless()
    pte = m.ptep_get(t, idx)
    cpu.chaos("fault_after_pte_read")
    if pte == 0:
        return do_anonymous_page(cpu, vma, vpn, write, t)
    if is_migration_entry(pte):
        # do_swap_page() -> migration_entry_wait(); a collapse's hole marker is a migration
        # entry to the (locked) new folio, so it is waited on the same way
        return migration_entry_wait(cpu, t, idx)
    # present: a write to a read-only PTE is a write-protect fault (do_wp_page), anything else
    # a spurious fault (another CPU mapped it, or only A/D bits were missing)
    ptl = m.ptl(t)
    ptl.lock(cpu)  # pte_offset_map_lock(): serialises with everything that changes this table
    try:
        if m.pmdp_get(i) != pmd:
            return "retry"
        cur = m.ptep_get(t, idx)
        if not cur & _PRESENT:
            return "retry"
        if write and not cur & _WRITE:
            if not m.is_zero_pfn(cur >> PFN_SHIFT):
                # do_wp_page() -> wp_page_reuse(): an anon folio exclusive to this mm (no fork
                # here) is made writable in place; no flush: the permission only grows
                m.set_pte_at(t, idx, cur | _WRITE | _DIRTY | _YOUNG)
                return "ok"
            # do_wp_page() on the zero page: vm_normal_page() is NULL -> unlock, wp_page_copy()
        else:
            want = cur | _YOUNG | (_DIRTY if write else 0)
            if want != cur:
                m.set_pte_at(t, idx, want)
            return "spurious"
    finally:
        ptl.unlock(cpu)
    return wp_page_copy(cpu, vpn, t, cur)


def wp_page_copy(cpu: CpuContext, vpn: int, t: int, orig: int) -> str:
    """wp_page_copy() (mm/memory.c) for a write to the shared zero page: allocate a zeroed
    folio (vma_alloc_zeroed_movable_folio(), no lock held), then under the PTL, if the PTE is
    still the one that faulted (pte_same(), ignoring the accessed bit the MMU may have set),
    ptep_clear_flush() it — other CPUs may hold the read-only zero-page translation and must
    not read zeroes past this write — and map the new folio writable.  Else the folio is put."""
    m = cpu.m
    i, idx = vpn >> 9, vpn & 511
    folio = m.alloc_folio(cpu, 0, zero=True)
    if folio < 0:
        return "fail"  # VM_FAULT_OOM
    cpu.chaos("wp_copy_after_alloc")
    ptl = m.ptl(t)
    ptl.lock(cpu)  # pte_offset_map_lock(): the PTE is replaced only under it
    try:
        cur = m.ptep_get(t, idx)
        same = m.pmdp_get(i) == pmd_mk_table(t) and cur & ~_YOUNG == orig & ~_YOUNG
        if same:
            m.ptep_get_and_clear(t, idx)  # ptep_clear_flush(): clear, then flush, then set
            cpu.flush_tlb_range(vpn, vpn + 1)
            m.folio_add_new_anon_rmap(folio, 1)
            m.set_pte_at(t, idx, pte_mk(folio, write=True, dirty=True, young=True))
    finally:
        ptl.unlock(cpu)
    if not same:
        m.folio_put(cpu, folio)  # somebody else changed the PTE: the new folio is thrown away
        return "thrown_away"
    return "ok"


def pte_range_none(m: Machine, t: int, idx: int, nr: int) -> bool:
    return not m.ptes_range(t, idx, nr).any()


def do_anonymous_page(cpu: CpuContext, vma: int, vpn: int, write: bool, t: int) -> str:
    """do_anonymous_page() (mm/memory.c).  A read fault maps the shared zero page: a special
    read-only PTE, no folio, no reference (``!(vmf->flags & FAULT_FLAG_WRITE)`` and
    ``!mm_forbids_zeropage()``), installed under the PTL if the PTE is still none
    (vmf_pte_changed()).  A write fault: alloc_anon_folio() — an mTHP order when the whole
    aligned range is none (checked locklessly) — zero it, then pte_offset_map_lock() and
    vmf_pte_changed()/pte_range_none(): if somebody populated the range meanwhile, the new folio
    is thrown away."""
    m = cpu.m
    i = vpn >> 9
    ptl = m.ptl(t)
    if not write:
        idx = vpn & 511
        ptl.lock(cpu)  # pte_offset_map_lock(): the PTE is set only under it
        try:
            if m.pmdp_get(i) != pmd_mk_table(t) or m.ptep_get(t, idx) != 0:
                return "retry"  # vmf_pte_changed(): update_mmu_tlb() and retry the access
            m.set_pte_at(t, idx, pte_mk(m.zero_pfn, write=False, dirty=False, young=True))
        finally:
            ptl.unlock(cpu)
        return "ok"
    order = 0
    k = cpu.config.mthp_fault_order
    if k and vma == VMA_COLLAPSE:
        start = vpn & ~((1 << k) - 1)
        if pte_range_none(m, t, start & 511, 1 << k):
            order = k
    folio = m.alloc_folio(cpu, order, zero=True)
    if folio < 0 and order:
        order = 0
        folio = m.alloc_folio(cpu, 0, zero=True)
    if folio < 0:
        return "fail"  # VM_FAULT_OOM
    nr = 1 << order
    first = (vpn & ~(nr - 1)) & 511
    cpu.chaos("fault_after_alloc")
    ptl = lock_or_skip(cpu, "mutant-fault-no-ptl", ptl)
    ptl.lock(cpu)  # pte_offset_map_lock(): the PTEs are changed only under it
    try:
        if m.pmdp_get(i) != pmd_mk_table(t):
            changed = True  # the table went away (collapse, split): retry the fault
        elif "mutant-fault-no-pte-recheck" in cpu.bugs:
            changed = False  # the mutant: no vmf_pte_changed() / pte_range_none()
        elif nr == 1:
            changed = m.ptep_get(t, first) != 0  # vmf_pte_changed()
        else:
            changed = not pte_range_none(m, t, first, nr)
        if not changed:
            m.folio_add_new_anon_rmap(folio, nr)
            m.set_ptes(t, first, [pte_mk(folio + j, write=True, dirty=write, young=True) for j in range(nr)])
    finally:
        ptl.unlock(cpu)
    if changed:
        m.folio_put(cpu, folio)  # release: the zeroed folio is thrown away
        return "thrown_away"
    return "ok"


def migration_entry_wait(cpu: CpuContext, t: int, idx: int) -> str:
    """migration_entry_wait() -> migration_entry_wait_on_locked() (mm/migrate.c, mm/filemap.c):
    under the PTL re-read the entry; if it is still a migration entry, queue on the folio's
    PG_locked waitqueue, drop the PTL and sleep until the folio is unlocked; then retry.
    A migration-entry collapse's hole marker (``--holes mark``) is a migration entry to a page
    of the new folio, which the collapse holds locked until its PTEs are in: the same wait."""
    m = cpu.m
    ptl = m.ptl(t)
    ptl.lock(cpu)  # the entry cannot be removed (remove_migration_ptes) while we look at it
    pte = m.ptep_get(t, idx)
    if not is_migration_entry(pte):
        ptl.unlock(cpu)
        return "retry"
    head = m.folio_head(pte >> 12)
    if head < 0 or not m.folio_locks.folio_test_locked(head):
        ptl.unlock(cpu)
        # the oracle: under the PTL a migration entry's folio is locked (pfn_swap_entry_folio()
        # BUG_ON(!folio_test_locked)): an entry left behind would make this fault retry for
        # ever, so record it and let the access fail instead of spinning into the watchdog
        cpu.violation("migration_entry_leftover", page=-1, detail=f"CPU {cpu.id} faulted on a migration entry (table {t}, index {idx}) whose folio {head} is not locked")
        return "fail"
    ticket = m.folio_locks.folio_wait_unlocked_prepare(head)  # before dropping the PTL
    ptl.unlock(cpu)
    m.folio_locks.folio_wait_unlocked(cpu, head, ticket, "migration")
    return "retry"


# ------------------------------------------------------------------------------ GUP
def gup_fast(cpu: CpuContext, vpn: int) -> tuple[int, int]:
    """gup_fast() -> gup_fast_pte_range() with FOLL_PIN|FOLL_WRITE: IRQs off, lockless walk,
    try_grab_folio_fast(), then the re-check of PMD (70cbc3cc78a9) and PTE; any change backs
    off.  Returns (head, pfn) of the pinned folio, or (-1, -1) to fall back to GUP-slow."""
    m = cpu.m
    i, idx = vpn >> 9, vpn & 511
    t, life = -1, 0
    cpu.local_irq_disable()  # blocks the flush IPI (ipi mode) and page-table freeing
    try:
        pmd = m.pmdp_get(i)
        if not pmd & _PRESENT:
            return -1, -1
        if pmd_trans_huge(pmd):  # gup_fast_pmd_leaf()
            pfn = (pmd >> 12) + idx
            head = m.try_grab_folio(pfn, pin=True)
            if head < 0:
                return -1, -1
            if m.pmdp_get(i) != pmd:
                m.unpin_folio(cpu, head)
                return -1, -1
            return head, pfn
        t = pmd >> 12
        life = m.table_life(t)  # the oracle's note of the table the walk enters
        cpu.chaos("gup_fast_after_pmd_read")
        pte = m.ptep_get(t, idx)  # ptep_get_lockless()
        if not pte & _PRESENT or not pte & _WRITE:
            return -1, -1
        pfn = pte >> 12
        cpu.chaos("gup_fast_after_pte_read")
        head = m.try_grab_folio(pfn, pin=True)
        if head < 0:
            return -1, -1
        cpu.chaos("gup_fast_after_grab")
        pmd_changed = m.pmdp_get(i) != pmd and "gup-fast-no-pmd-recheck" not in cpu.bugs
        pte_changed = m.ptep_get(t, idx) != pte and "mutant-gup-fast-no-pte-recheck" not in cpu.bugs
        if pmd_changed or pte_changed:
            m.unpin_folio(cpu, head)  # gup_put_folio()
            return -1, -1
        return head, pfn
    finally:
        # the oracle: nothing may free a page table while a walker that read its PMD still has
        # IRQs off (the freer waits for the IPI, or tlb_remove_table_sync_one() did; 2ba99c5e0881)
        if t >= 0 and m.table_life(t) != life:
            cpu.violation("pt_use_after_free", page=vpn, detail=f"GUP-fast walked PTE table {t} while it was freed (read its PMD before, IRQs off throughout)")
        cpu.local_irq_enable()


def gup_slow(cpu: CpuContext, vpn: int) -> tuple[int, int]:
    """__get_user_pages() under mmap_read_lock: follow_page_pte() under the PTL; when the page
    is not there, faultin_page() -> handle_mm_fault() (which waits on migration entries) and
    retry.  Returns (head, pfn) pinned, or (-1, -1) when the address is not mapped."""
    m = cpu.m
    i, idx = vpn >> 9, vpn & 511
    mmap_lock = lock_or_skip(cpu, "mutant-gup-slow-no-mmap-lock", m.mmap_lock)
    mmap_lock.down_read(cpu)  # keeps the VMA and the page-table tree stable
    try:
        for _ in range(1000):
            vma = m.find_vma(vpn)
            if vma < 0:
                return -1, -1
            pmd = m.pmdp_get(i)
            if pmd & _PRESENT:
                if pmd_trans_huge(pmd):  # follow_huge_pmd() under the PMD lock
                    m.pmd_lock.lock(cpu)  # excludes split_huge_pmd and the collapse's install
                    try:
                        if m.pmdp_get(i) == pmd:
                            pfn = (pmd >> 12) + idx
                            head = m.try_grab_folio(pfn, pin=True)
                            if head >= 0:
                                return head, pfn
                    finally:
                        m.pmd_lock.unlock(cpu)
                    continue
                t = pmd >> 12
                ptl = lock_or_skip(cpu, "mutant-gup-slow-no-ptl", m.ptl(t))
                ptl.lock(cpu)  # follow_page_pte(): pte_offset_map_lock()
                try:
                    if m.pmdp_get(i) == pmd:
                        pte = m.ptep_get(t, idx)
                        if pte & _PRESENT and pte & _WRITE:
                            cpu.chaos("gup_slow_after_pte_read")
                            head = m.try_grab_folio(pte >> 12, pin=True)
                            if head >= 0:
                                return head, pte >> 12
                finally:
                    ptl.unlock(cpu)
            # faultin_page(): the fault path under the mmap_lock we already hold
            __handle_mm_fault(cpu, vma, vpn, True)
        return -1, -1
    finally:
        mmap_lock.up_read(cpu)


# ------------------------------------------------------------------------------ zap
def split_huge_pmd(cpu: CpuContext, i: int) -> None:
    """__split_huge_pmd() for an anon PMD mapping: under the PMD lock, withdraw the deposited
    PTE table, map every subpage by a PTE, and turn the one PMD mapping into 512 PTE mappings."""
    m = cpu.m
    m.pmd_lock.lock(cpu)  # excludes GUP-slow's follow_huge_pmd and other splitters
    try:
        pmd = m.pmdp_get(i)
        if not pmd_trans_huge(pmd):
            return
        head = pmd >> 12
        t = m.pgtable_trans_huge_withdraw(i)
        m.set_ptes(t, 0, [pte_mk(head + j, write=True, dirty=True, young=True) for j in range(PTRS_PER_PTE)])
        m.folio_ref_add(head, PTRS_PER_PTE - 1)
        m.folio_mapcount_add(head, PTRS_PER_PTE - 1)
        m.set_pmd(i, pmd_mk_table(t))  # pmd_populate() after the PTEs are visible
        start = i * PTRS_PER_PTE
    finally:
        m.pmd_lock.unlock(cpu)
    cpu.flush_tlb_range(start, start + PTRS_PER_PTE)


def zap_huge_pmd(cpu: CpuContext, i: int) -> int:
    """zap_pmd_range() on a range covering a whole huge PMD -> zap_huge_pmd(): under the PMD
    lock clear the PMD and zap_deposited_table() — withdraw the deposited PTE table and
    pte_free() it at once, with no IPI and no RCU: only the collapse's
    tlb_remove_table_sync_one() (or a flush IPI that waited for IRQs-off walkers) made sure no
    GUP-fast walk is still inside it — then flush and free the THP (tlb_finish_mmu).
    Returns the pages zapped."""
    m = cpu.m
    start = i * PTRS_PER_PTE
    m.pmd_lock.lock(cpu)  # pmd_trans_huge_lock(): excludes splitters, GUP-slow's follow_huge_pmd
    try:
        pmd = m.pmdp_get(i)
        if not pmd_trans_huge(pmd):
            return 0  # split or zapped meanwhile: nothing of ours left here
        m.set_pmd(i, 0)  # pmdp_huge_get_and_clear_full()
        zap_epoch(cpu, start, PTRS_PER_PTE)  # the oracle: in flight, before a refault can map a page
        t = m.pgtable_trans_huge_withdraw(i)
        m.pte_free(cpu, t)
        cpu.chaos("zap_huge_pmd_after_pte_free")  # the deposited table is back in the allocator
    finally:
        m.pmd_lock.unlock(cpu)
    cpu.flush_tlb_range(start, start + PTRS_PER_PTE)
    zap_epoch(cpu, start, PTRS_PER_PTE)  # the oracle: done, after the flush
    head = pmd >> 12
    m.folio_mapcount_add(head, -1)  # folio_remove_rmap_pmd()
    m.folio_put(cpu, head)  # tlb_remove_page_size(): frees the THP
    return PTRS_PER_PTE


def zap_range(cpu: CpuContext, start: int, nr: int, lock_mm: bool = True) -> int:
    """madvise(MADV_DONTNEED) -> zap_page_range_single() -> zap_pte_range(): clear the PTEs
    under the PTL, flush the TLB, then drop the rmap and the references (tlb_finish_mmu).
    Returns the number of pages freed from the mapping.

    Locking as do_madvise() takes it in mm/madvise.c (the host's 6.18): madvise_lock() takes
    nothing up front, since get_lock_mode() is MADVISE_VMA_READ_LOCK for MADV_DONTNEED;
    madvise_walk_vmas() -> try_vma_read_lock() read-locks the VMA of ``start`` with
    lock_vma_under_rcu() and keeps only that lock when is_vma_lock_sufficient() (the range ends
    inside that VMA); when the VMA cannot be read-locked — no per-VMA locks, or it is
    write-locked by a pmd-clear collapse or a munmap()/mprotect() of it — it falls back to
    mmap_read_lock() (MADVISE_MMAP_READ_LOCK) and madvise_do_behavior() walks the VMAs under it.
    So a zap no longer waits for mmap() of other VMAs, nor behind a writer queued on mmap_lock.
    ``lock_mm=False``: the caller holds mmap_lock for write (munmap()'s unmap_region(),
    mmap(MAP_FIXED))."""
    m = cpu.m
    vma = -1
    mmap_locked = False
    if lock_mm and "mutant-zap-no-mmap-lock" not in cpu.bugs:
        # try_vma_read_lock(): excludes vma_start_write() of this VMA (pmd-clear, munmap/mprotect of it)
        vma = lock_vma_under_rcu(cpu, start)
        if vma >= 0 and start + nr > m.vma_range(vma)[1]:  # is_vma_lock_sufficient(): one VMA only
            m.vma_locks[vma].vma_end_read(cpu)
            vma = -1
        if vma < 0:
            m.mmap_lock.down_read(cpu)  # the fallback: excludes every mmap_lock writer (mmap()/munmap(), pmd-clear)
            mmap_locked = True
    zapped = 0
    try:
        i = start >> 9
        pmd = m.pmdp_get(i)
        if pmd_trans_huge(pmd) and start & 511 == 0 and nr >= PTRS_PER_PTE:
            return zap_huge_pmd(cpu, i)
        while pmd_trans_huge(pmd):  # a huge PMD is split first (it may be re-made meanwhile)
            split_huge_pmd(cpu, i)
            pmd = m.pmdp_get(i)
        if not pmd & _PRESENT:
            return 0
        t = pmd >> 12
        first = start & 511
        nr = min(nr, PTRS_PER_PTE - first)
        puts: list[int] = []
        ptl = lock_or_skip(cpu, "mutant-zap-no-ptl", m.ptl(t))
        ptl.lock(cpu)  # zap_pte_range(): PTEs change only under the PTL
        try:
            if m.pmdp_get(i) != pmd:
                return 0
            flush = False
            # ptep_get_and_clear() of every entry, in one call (the same exchanges, in order)
            for old in m.ptep_get_and_clear_range(t, first, nr).tolist():
                if old & _PRESENT:
                    flush = True
                    if not m.is_zero_pfn(old >> PFN_SHIFT):  # vm_normal_page(): no folio behind it
                        puts.append(old >> 12)
                # a migration entry holds no mapping of its own: clearing it is enough
            zap_epoch(cpu, start, nr)  # the oracle: a zap in flight
            cpu.chaos("zap_after_clear")
            if flush and "mutant-zap-no-flush" not in cpu.bugs:
                cpu.flush_tlb_range(start, start + nr)  # before any page can be freed
            zap_epoch(cpu, start, nr)  # the oracle: done, after the flush
        finally:
            ptl.unlock(cpu)
        for pfn in puts:  # folio_remove_rmap_pte() + the mmu_gather's folio_put()
            head = m.folio_head(pfn)
            if head < 0:
                cpu.violation("pte_maps_free_frame", page=start, detail=f"zap found a PTE mapping free frame {pfn}")
                continue
            m.folio_mapcount_add(head, -1)
            m.folio_put(cpu, head)
        zapped = len(puts)
    finally:
        if mmap_locked:
            m.mmap_lock.up_read(cpu)
        elif vma >= 0:
            m.vma_locks[vma].vma_end_read(cpu)  # vma_end_read() in madvise_walk_vmas()
    return zapped


# ------------------------------------------------------------------------------ mmap churn
def churn_slot_range(m: Machine, slot: int) -> tuple[int, int]:
    base = (m.L.vma0_pmds + 1) * PTRS_PER_PTE
    s = base + (slot - FIRST_CHURN_SLOT) * CHURN_SLOT_PAGES
    return s, s + CHURN_SLOT_PAGES


def do_mmap(cpu: CpuContext, slot: int) -> None:
    """mmap(MAP_ANONYMOUS|MAP_PRIVATE) of a churn slot: mmap_write_lock, insert the VMA."""
    cpu.charge("mmap_call")  # the VMA tree work of one mmap() or munmap() call
    m = cpu.m
    m.mmap_lock.down_write(cpu)  # the VMA tree changes: excludes every mmap_lock reader
    try:
        start, end = churn_slot_range(m, slot)
        m.set_vma(slot, start, end, VM_INUSE | VM_WRITE)
    finally:
        mmap_write_unlock(cpu)


def do_munmap(cpu: CpuContext, slot: int) -> None:
    """munmap(): mmap_write_lock, vma_start_write, unmap_region (zap + free), remove the VMA."""
    cpu.charge("mmap_call")  # the VMA tree work of one mmap() or munmap() call
    m = cpu.m
    m.mmap_lock.down_write(cpu)  # the VMA tree changes: excludes every mmap_lock reader
    try:
        m.vma_locks[slot].vma_start_write(cpu, mm_lock_seq(cpu))  # excludes per-VMA-lock faults
        start, end = churn_slot_range(m, slot)
        zap_range(cpu, start, end - start, lock_mm=False)
        m.clear_vma(slot)
    finally:
        mmap_write_unlock(cpu)


def do_mprotect(cpu: CpuContext, slot: int) -> None:
    """mprotect(): mmap_write_lock, vma_start_write, change_protection() under the PTL + flush
    (protection is left as it was: the cost of the locking is what is measured)."""
    m = cpu.m
    m.mmap_lock.down_write(cpu)  # vm_flags change: excludes every mmap_lock reader
    try:
        m.vma_locks[slot].vma_start_write(cpu, mm_lock_seq(cpu))  # excludes per-VMA-lock faults
        start, end = churn_slot_range(m, slot)
        pmd = m.pmdp_get(start >> 9)
        if pmd & _PRESENT and not pmd_trans_huge(pmd):
            ptl = m.ptl(pmd >> 12)
            ptl.lock(cpu)  # change_pte_range(): PTEs change only under the PTL
            try:
                cpu.flush_tlb_range(start, end)
            finally:
                ptl.unlock(cpu)
    finally:
        mmap_write_unlock(cpu)


__all__ = [
    "Oracle",
    "access_load",
    "access_store",
    "do_mmap",
    "do_mprotect",
    "do_munmap",
    "gup_fast",
    "gup_slow",
    "handle_mm_fault",
    "hw_walk",
    "migration_entry_wait",
    "mmap_write_unlock",
    "split_huge_pmd",
    "zap_huge_pmd",
    "translate",
    "zap_range",
]
