"""Kernel paths run by the simulated CPUs: the hardware walk and the access, the page fault,
GUP-fast and GUP-slow, MADV_DONTNEED, mmap()/munmap()/mprotect(), split_huge_pmd.

Each function says which kernel function it mirrors and follows its order of locks and checks.
They touch the machine only through core/machine.py's accessors, the locks and the CPU context
(TLB flush, interrupt points), never through raw offsets.

The oracle lives in the access itself: every page holds one counter word per CPU (word = CPU
id) and one per DMA pin (word = 256 + CPU id).  A store first checks that its own word still
holds the value it last wrote there (else a write was lost), a load checks that another CPU's
word never goes backwards (else a stale read), and a value's high half names the page it was
written to (else a PTE maps the wrong page).  MADV_DONTNEED legitimately drops contents: it
bumps the page's zap epoch, and a word that reads 0 after an epoch change is a fresh page.
"""

from __future__ import annotations

from ptlab.core.config import PTRS_PER_PTE
from ptlab.core.cpu import CpuContext
from ptlab.core.layout import (
    _DIRTY,
    _PRESENT,
    _WRITE,
    _YOUNG,
    MM_LOCK_SEQ,
    VM_INUSE,
    VM_WRITE,
    is_migration_entry,
    pmd_mk_table,
    pmd_trans_huge,
    pte_mk,
)
from ptlab.core.machine import VMA_COLLAPSE, Machine

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
        self.mine: dict[int, tuple[int, int]] = {}  # vpn -> (value, zap epoch before the store)
        self.seen: dict[tuple[int, int], tuple[int, int]] = {}
        self.dma: dict[int, tuple[int, int]] = {}
        self.seq = 0


def access_store(cpu: CpuContext, oracle: Oracle, vpn: int) -> bool:
    """A store of this CPU's counter word on page vpn; returns False on SIGSEGV.

    The zap epoch is read before the translation: MADV_DONTNEED bumps it only after its TLB
    flush completed, so a store that went through a translation the zap was about to kill
    always sees an epoch older than the bump (and its loss is accepted as legitimate)."""
    m = cpu.m
    epoch = m.epoch(vpn)
    pfn = translate(cpu, vpn, True)
    if pfn < 0:
        return False
    off = pfn * m.page_size + cpu.id * 8
    v = m.frames.load64(off)
    oracle.seq += 1
    new = vpn << VPN_SHIFT | (oracle.seq & 0xFFFFFFFF)
    m.frames.store64(off, new)
    if cpu.broadcast:
        cpu.access_end()
    prev = oracle.mine.get(vpn)
    expect = prev[0] if prev else 0
    if v != expect and not (v == 0 and prev is not None and m.epoch(vpn) != prev[1]):
        kind = "wrong_page" if v and v >> VPN_SHIFT != vpn else "lost_write"
        cpu.violation(kind, page=vpn, detail=f"CPU {cpu.id} expected {expect:#x} in its word, found {v:#x} (pfn {pfn})")
    oracle.mine[vpn] = (new, epoch)
    return True


def access_load(cpu: CpuContext, oracle: Oracle, vpn: int, word: int) -> int:
    """A load of another CPU's word (or a DMA word) on page vpn; checks it never goes back."""
    m = cpu.m
    epoch = m.epoch(vpn)
    pfn = translate(cpu, vpn, False)
    if pfn < 0:
        return -1
    w = m.frames.load64(pfn * m.page_size + word * 8)
    if cpu.broadcast:
        cpu.access_end()
    key = (vpn, word)
    last = oracle.seen.get(key)
    if w and w >> VPN_SHIFT != vpn:
        cpu.violation("wrong_page", page=vpn, detail=f"word {word} of page {vpn} holds {w:#x}, written for page {w >> VPN_SHIFT}")
    elif last is not None and w < last[0] and m.epoch(vpn) == last[1]:
        cpu.violation("stale_read", page=vpn, detail=f"word {word} went back from {last[0]:#x} to {w:#x} (pfn {pfn})")
    oracle.seen[key] = (w, epoch)
    return w


# ------------------------------------------------------------------------------ page fault
def handle_mm_fault(cpu: CpuContext, vpn: int, write: bool) -> str:
    """do_user_addr_fault(): lock_vma_under_rcu() else mmap_read_lock(), then
    __handle_mm_fault().  Records one "fault" event; returns its result."""
    m = cpu.m
    begin = cpu.op_begin()
    during = cpu.collapsing()
    vma = lock_vma_under_rcu(cpu, vpn)
    if vma >= 0:
        try:
            result = __handle_mm_fault(cpu, vma, vpn, write)
        finally:
            m.vma_locks[vma].vma_end_read(cpu)
    else:
        m.mmap_lock.down_read(cpu)  # excludes mmap()/munmap() and pmd-clear collapse (writers)
        try:
            vma = m.find_vma(vpn)
            result = "segv" if vma < 0 else __handle_mm_fault(cpu, vma, vpn, write)
        finally:
            m.mmap_lock.up_read(cpu)
    cpu.op_end(begin, "fault", result, vpn, vma=vma, during=during)
    return result


def __handle_mm_fault(cpu: CpuContext, vma: int, vpn: int, write: bool) -> str:
    """__handle_mm_fault() -> handle_pte_fault(), with the VMA stable (VMA or mmap lock held)."""
    m = cpu.m
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
        return migration_entry_wait(cpu, t, idx)  # do_swap_page() -> migration_entry_wait()
    # present: a spurious fault (another CPU mapped it, or only A/D bits were missing)
    ptl = m.ptl(t)
    ptl.lock(cpu)  # pte_offset_map_lock(): serialises with everything that changes this table
    try:
        if m.pmdp_get(i) != pmd:
            return "retry"
        cur = m.ptep_get(t, idx)
        if cur & _PRESENT:
            want = cur | _YOUNG | (_DIRTY if write else 0)
            if want != cur:
                m.set_pte_at(t, idx, want)
    finally:
        ptl.unlock(cpu)
    return "spurious"


def pte_range_none(m: Machine, t: int, idx: int, nr: int) -> bool:
    return not m.ptes_range(t, idx, nr).any()


def do_anonymous_page(cpu: CpuContext, vma: int, vpn: int, write: bool, t: int) -> str:
    """do_anonymous_page() (mm/memory.c): alloc_anon_folio() — an mTHP order when the whole
    aligned range is none (checked locklessly) — zero it, then pte_offset_map_lock() and
    vmf_pte_changed()/pte_range_none(): if somebody populated the range meanwhile, the new folio
    is thrown away.  Read faults allocate too (as with the zero page disabled)."""
    m = cpu.m
    i = vpn >> 9
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
    ptl = m.ptl(t)
    ptl.lock(cpu)  # pte_offset_map_lock(): the PTEs are changed only under it
    try:
        if m.pmdp_get(i) != pmd_mk_table(t):
            changed = True  # the table went away (collapse, split): retry the fault
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
    PG_locked waitqueue, drop the PTL and sleep until the folio is unlocked; then retry."""
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
        return "retry"
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
        cpu.chaos("gup_fast_after_pmd_read")
        t = pmd >> 12
        pte = m.ptep_get(t, idx)  # ptep_get_lockless()
        if not pte & _PRESENT or not pte & _WRITE:
            return -1, -1
        pfn = pte >> 12
        head = m.try_grab_folio(pfn, pin=True)
        if head < 0:
            return -1, -1
        cpu.chaos("gup_fast_after_grab")
        pmd_changed = m.pmdp_get(i) != pmd and "gup-fast-no-pmd-recheck" not in cpu.bugs
        if pmd_changed or m.ptep_get(t, idx) != pte:
            m.unpin_folio(cpu, head)  # gup_put_folio()
            return -1, -1
        return head, pfn
    finally:
        cpu.local_irq_enable()


def gup_slow(cpu: CpuContext, vpn: int) -> tuple[int, int]:
    """__get_user_pages() under mmap_read_lock: follow_page_pte() under the PTL; when the page
    is not there, faultin_page() -> handle_mm_fault() (which waits on migration entries) and
    retry.  Returns (head, pfn) pinned, or (-1, -1) when the address is not mapped."""
    m = cpu.m
    i, idx = vpn >> 9, vpn & 511
    m.mmap_lock.down_read(cpu)  # keeps the VMA and the page-table tree stable
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
                ptl = m.ptl(t)
                ptl.lock(cpu)  # follow_page_pte(): pte_offset_map_lock()
                try:
                    if m.pmdp_get(i) == pmd:
                        pte = m.ptep_get(t, idx)
                        if pte & _PRESENT and pte & _WRITE:
                            head = m.try_grab_folio(pte >> 12, pin=True)
                            if head >= 0:
                                return head, pte >> 12
                finally:
                    ptl.unlock(cpu)
            # faultin_page(): the fault path under the mmap_lock we already hold
            __handle_mm_fault(cpu, vma, vpn, True)
        return -1, -1
    finally:
        m.mmap_lock.up_read(cpu)


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
        t = m.pt.load64(m.L.deposit(i))  # pgtable_trans_huge_withdraw()
        m.set_ptes(t, 0, [pte_mk(head + j, write=True, dirty=True, young=True) for j in range(PTRS_PER_PTE)])
        m.folio_ref_add(head, PTRS_PER_PTE - 1)
        m.folio_mapcount_add(head, PTRS_PER_PTE - 1)
        m.set_pmd(i, pmd_mk_table(t))  # pmd_populate() after the PTEs are visible
        start = i * PTRS_PER_PTE
    finally:
        m.pmd_lock.unlock(cpu)
    cpu.flush_tlb_range(start, start + PTRS_PER_PTE)


def zap_range(cpu: CpuContext, start: int, nr: int, lock_mm: bool = True) -> int:
    """madvise(MADV_DONTNEED) -> zap_page_range_single() -> zap_pte_range(): clear the PTEs
    under the PTL, flush the TLB, then drop the rmap and the references (tlb_finish_mmu).
    Returns the number of pages freed from the mapping."""
    m = cpu.m
    if lock_mm:
        m.mmap_lock.down_read(cpu)  # madvise(MADV_DONTNEED) holds mmap_lock for read
    zapped = 0
    try:
        i = start >> 9
        pmd = m.pmdp_get(i)
        while pmd_trans_huge(pmd):  # a huge PMD is split first (it may be re-made meanwhile)
            split_huge_pmd(cpu, i)
            pmd = m.pmdp_get(i)
        if not pmd & _PRESENT:
            return 0
        t = pmd >> 12
        first = start & 511
        nr = min(nr, PTRS_PER_PTE - first)
        puts: list[int] = []
        ptl = m.ptl(t)
        ptl.lock(cpu)  # zap_pte_range(): PTEs change only under the PTL
        try:
            if m.pmdp_get(i) != pmd:
                return 0
            for j in range(nr):
                old = m.ptep_get_and_clear(t, first + j)
                if old & _PRESENT:
                    puts.append(old >> 12)
                # a migration entry holds no mapping of its own: clearing it is enough
            if puts:
                cpu.flush_tlb_range(start, start + nr)  # before any page can be freed
            for j in range(nr):  # the oracle's "contents dropped on purpose" mark, after the flush
                m.bump_epoch(start + j)
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
        if lock_mm:
            m.mmap_lock.up_read(cpu)
    return zapped


# ------------------------------------------------------------------------------ mmap churn
def churn_slot_range(m: Machine, slot: int) -> tuple[int, int]:
    base = (m.L.vma0_pmds + 1) * PTRS_PER_PTE
    s = base + (slot - FIRST_CHURN_SLOT) * CHURN_SLOT_PAGES
    return s, s + CHURN_SLOT_PAGES


def do_mmap(cpu: CpuContext, slot: int) -> None:
    """mmap(MAP_ANONYMOUS|MAP_PRIVATE) of a churn slot: mmap_write_lock, insert the VMA."""
    m = cpu.m
    m.mmap_lock.down_write(cpu)  # the VMA tree changes: excludes every mmap_lock reader
    try:
        start, end = churn_slot_range(m, slot)
        m.set_vma(slot, start, end, VM_INUSE | VM_WRITE)
    finally:
        mmap_write_unlock(cpu)


def do_munmap(cpu: CpuContext, slot: int) -> None:
    """munmap(): mmap_write_lock, vma_start_write, unmap_region (zap + free), remove the VMA."""
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
    "translate",
    "zap_range",
]
