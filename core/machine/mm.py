"""The simulated machine: memory, folios, the buddy allocator, one mm with VMAs and page tables.

Everything here lives in the run's shared-memory segments (core/machine/mm/layout.py says where) and is
reached only through the primitives: atomic words, spinlocks, rwsems, futexes.  Kernel paths
(fault, GUP, zap, khugepaged, the strategies) talk to the machine through the accessors below,
named like the kernel's, so that a deterministic backend can later run the very same paths.

Folio model (include/linux/mm.h, mm/gup.c):
  - a folio of order k is 2^k frames, head frame aligned; every frame's ``head`` names it;
  - refcount: one per PTE mapping (one for a PMD mapping), plus pins: a FOLL_PIN adds
    GUP_PIN_COUNTING_BIAS (1024) to a small folio's refcount, or 1 (and 1 to pincount) to a
    large one's; mapcount counts mappings.  Invariant at quiescent points:
        refcount == mapcount + (1024 if small else 1) * pincount
  - try-get (``folio_try_get``) fails at zero; a frozen folio's refcount is 0 (folio_ref_freeze).
Freed frames are poisoned with POISON_FREE and the poison is checked when they are handed out
again (like CONFIG_PAGE_POISONING), so a write through a stale translation into a freed frame is
caught even when nobody reads that frame soon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from ptlab.core.machine._prims import Buddy, Region
from ptlab.core.machine.config import HPAGE_PMD_ORDER, PTRS_PER_PTE, RunConfig
from ptlab.core.machine.errors import Stopped
from ptlab.core.machine.layout import (
    _PRESENT,
    FOLIO_FIELDS,
    GUP_PIN_COUNTING_BIAS,
    MAX_VMAS,
    MM_LOCK_SEQ,
    NAMED_LOCKS,
    NR_FREE_TABLES,
    PFN_SHIFT,
    PG_ANON,
    PG_BUDDY,
    PG_LOCKED,
    PG_LRU,
    POISON_FREE,
    POISON_PT,
    STOP,
    STOP_VIOLATION,
    TABLE_FREE_HEAD,
    VM_HUGEPAGE,
    VM_INUSE,
    VM_ORACLE,
    VM_WRITE,
    VMA_END,
    VMA_FLAGS,
    VMA_GEN,
    VMA_START,
    Layout,
    pmd_mk_table,
    pmd_trans_huge,
    pte_mk,
)
from ptlab.core.machine.locks import FolioLocks, RwSem, SpinLock, VmaLock
from ptlab.core.machine.mutants import lock_or_skip
from ptlab.core.machine.shm import Namespace

if TYPE_CHECKING:
    from ptlab.core.machine.cpu import CpuContext

FREE_HEADS = 64  # ctl: i32[HPAGE_PMD_ORDER + 1] buddy free-list heads (-1 empty)
NR_FREE = 104  # ctl: i32 free frames
MAX_ORDER = HPAGE_PMD_ORDER

VMA_COLLAPSE, VMA_OTHER = 0, 1  # fixed VMAs; 2.. are mmap() churn slots


class Machine:
    """One simulated machine, mapped in this process."""

    def __init__(self, config: RunConfig, ns: Namespace, wrap: Callable[[str, Region], Any] | None = None) -> None:
        """``wrap(name, region)`` (the scheduled backend) may interpose on every shared word
        operation of a segment: the locks and kernel paths then go through it unknowingly."""
        self.config = config
        self.ns = ns
        self.L = L = Layout.for_config(config)
        self.page_size = L.page_size
        self.words_per_page = L.page_size // 8
        self.zero_pfn = L.nr_frames - 1  # the shared zero page: outside the buddy allocator
        w = wrap or (lambda name, region: region)
        self.ctl = w("ctl", ns["ctl"].region)
        self.pt = w("pt", ns["pt"].region)
        self.folio = w("folio", ns["folio"].region)
        self.frames = w("frames", ns["frames"].region)
        # numpy views for vectorised range work (scans, set_ptes, invariant checks)
        self.ptes = ns["pt"].view(np.int64, L.tables_base, L.nr_tables * PTRS_PER_PTE)
        self.pmds = ns["pt"].view(np.int64, 0, L.nr_pmds)
        self.f = {name: ns["folio"].view(np.int32, L.folio_field(name), L.nr_frames) for name in FOLIO_FIELDS}
        self.off = {name: L.folio_field(name) for name in FOLIO_FIELDS}
        # The allocator's plain words (head, order, buddy links; flags of free frames) through the
        # raw folio segment: like the numpy views above, never a scheduling point (one scalar
        # Region call costs a quarter of a numpy scalar access)
        self._rf = ns["folio"].region
        self._o_head, self._o_order, self._o_flags = self.off["head"], self.off["order"], self.off["flags"]
        self._o_next, self._o_prev, self._o_ref = self.off["next_free"], self.off["prev_free"], self.off["refcount"]
        self._o_map = self.off["mapcount"]
        self._tables_base = L.tables_base  # Layout properties, computed once
        self._epochs_base = L.epochs_base
        self._nr_frames = L.nr_frames
        self._vma_offs = [L.vma(i) for i in range(MAX_VMAS)]
        # The buddy lists' work in one C call per operation (_prims.Buddy: the word steps of
        # _buddy_add/_buddy_del and of the loops in alloc_folio/free_folio, in their order) when
        # all three segments are the process backend's Regions; on any other (the scheduled
        # backend's) the Python steps run, so its schedule space is unchanged
        segs = (self.ctl, self.folio, self.frames)
        self._buddy = None
        if all(type(r) is Region for r in segs):
            o = self.off
            self._buddy = Buddy(*segs, tuple(o[k] for k in ("head", "order", "flags", "next_free", "prev_free", "refcount", "mapcount", "pincount", "lock_owner")),
                                FREE_HEADS, NR_FREE, L.nr_frames, MAX_ORDER, L.page_size, PG_BUDDY, PG_LOCKED, PG_ANON | PG_LRU, POISON_FREE)
        # locks
        self.mmap_lock = RwSem(self.ctl, L.named_lock("mmap_lock"), "mmap_lock", 0)
        self.anon_vma = RwSem(self.ctl, L.named_lock("anon_vma"), "anon_vma", 1)
        self.page_table_lock = SpinLock(self.ctl, L.named_lock("page_table_lock"), "page_table_lock", "ptl", 2)
        self.pmd_lock = SpinLock(self.ctl, L.named_lock("pmd_lock"), "pmd_lock", "pmd_lock", 3)
        self.zone_lock = SpinLock(self.ctl, L.named_lock("zone_lock"), "zone_lock", "zone", 4)
        split = config.ptl == "split"
        self._ptls = [
            SpinLock(self.ctl, L.ptl(t), f"ptl[{t}]", "ptl", len(NAMED_LOCKS) + t) if split else self.page_table_lock
            for t in range(L.nr_tables)
        ]
        self.vma_locks = [VmaLock(self.ctl, L.vma(i), MM_LOCK_SEQ, f"vma_lock[{i}]", 1000 + i) for i in range(MAX_VMAS)]
        self.folio_locks = FolioLocks(self.folio, self.off["flags"], self.off["lock_owner"], self.off["waiters"], self.off["wake_seq"], self.off["wake_done"], self.off["wake_t"])

    # ------------------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, config: RunConfig, token: str | None = None, wrap: Callable[[str, Region], Any] | None = None) -> Machine:
        ns = Namespace.create(Layout.for_config(config).sizes(), token=token)
        try:
            m = cls(config, ns, wrap)
            m._init()
            return m
        except BaseException:
            ns.close()
            raise

    @classmethod
    def attach(cls, config: RunConfig, prefix: str) -> Machine:
        return cls(config, Namespace.attach(prefix, Layout.for_config(config).sizes()))

    @property
    def prefix(self) -> str:
        return self.ns.prefix

    def close(self) -> None:
        self.ptes = self.pmds = None  # type: ignore[assignment]
        self.f = {}
        self.ns.close()

    def _init(self) -> None:
        L = self.L
        self.f["head"][:] = -1
        self.f["next_free"][:] = -1
        self.f["prev_free"][:] = -1
        for o in range(MAX_ORDER + 1):
            self.ctl.store32(FREE_HEADS + 4 * o, -1)
        # every frame starts free and poisoned, in max-order blocks (the tail in smaller ones)
        self.frames.fill64(0, L.nr_frames * self.words_per_page, POISON_FREE)
        pfn = 0
        while pfn < self.zero_pfn:
            o = MAX_ORDER
            while o > 0 and (pfn % (1 << o) or pfn + (1 << o) > self.zero_pfn):
                o -= 1
            self._buddy_add(pfn, o)
            pfn += 1 << o
        self.ctl.store32(NR_FREE, self.zero_pfn)
        # the shared zero page (mm/memory.c my_zero_pfn()): zero-filled, no folio (head -1,
        # refcount 0, never free): read faults map it read-only, nothing may ever write it
        self.frames.fill64(self.zero_pfn * self.page_size, self.words_per_page, 0)
        # the PTE-table pool: every table free and poisoned, on a LIFO free list (a table freed
        # by one CPU is the next one another CPU gets, as with the page allocator's pcp lists)
        self.ptes[:] = POISON_PT
        for t in range(L.nr_tables):
            self.pt.store32(L.table_next(t), t + 1 if t + 1 < L.nr_tables else -1)
        self.ctl.store32(TABLE_FREE_HEAD, 0)
        self.ctl.store32(NR_FREE_TABLES, L.nr_tables)
        self.ctl.store64(MM_LOCK_SEQ, 1)
        for i in range(MAX_VMAS):
            self.ctl.store64(L.vma(i) + 24, 0)  # vm_lock_seq 0 != mm_lock_seq 1: unlocked
        # VMA 0: the collapsing VMA (MADV_HUGEPAGE); VMA 1: another anon VMA of the same mm
        self.set_vma(VMA_COLLAPSE, 0, L.vma0_pmds * PTRS_PER_PTE, VM_INUSE | VM_HUGEPAGE | VM_WRITE | VM_ORACLE)
        other = L.vma0_pmds * PTRS_PER_PTE
        self.set_vma(VMA_OTHER, other, other + PTRS_PER_PTE, VM_INUSE | VM_WRITE | VM_ORACLE)

    def populate(self, cpu: CpuContext, vma: int) -> None:
        """Fault in every page of a VMA with order-0 folios (the app touched its memory before
        the run started), directly and single-threaded: no lock is contended yet."""
        start, end, _ = self.vma_range(vma)
        for vpn in range(start, end):
            table = self.pte_table_for(cpu, vpn)
            pfn = self.alloc_folio(cpu, 0, zero=True)
            if pfn < 0:
                raise MemoryError("not enough frames to populate the VMA")
            self.folio_add_new_anon_rmap(pfn, 1)
            self.pt.store64(self.L.pte(table, vpn & 511), pte_mk(pfn, write=True, dirty=True, young=True))

    # ------------------------------------------------------------------------------ VMAs
    def set_vma(self, i: int, start: int, end: int, flags: int) -> None:
        o = self.L.vma(i)
        self.ctl.store64(o + VMA_START, start)
        self.ctl.store64(o + VMA_END, end)
        self.ctl.fetch_add64(o + VMA_GEN, 1)
        self.ctl.store64(o + VMA_FLAGS, flags)

    def clear_vma(self, i: int) -> None:
        o = self.L.vma(i)
        self.ctl.store64(o + VMA_FLAGS, 0)
        self.ctl.fetch_add64(o + VMA_GEN, 1)

    def vma_range(self, i: int) -> tuple[int, int, int]:
        o = self._vma_offs[i]
        return self.ctl.load64(o + VMA_START), self.ctl.load64(o + VMA_END), self.ctl.load64(o + VMA_FLAGS)

    def vma_flags(self, i: int) -> int:
        """vma->vm_flags of VMA slot i."""
        return self.ctl.load64(self._vma_offs[i] + VMA_FLAGS)

    def find_vma(self, vpn: int) -> int:
        """The VMA containing vpn, or -1 (a lockless lookup, like the maple tree under RCU)."""
        ctl = self.ctl
        for i, o in enumerate(self._vma_offs):
            if ctl.load64(o + VMA_FLAGS) & VM_INUSE and ctl.load64(o + VMA_START) <= vpn < ctl.load64(o + VMA_END):
                return i
        return -1

    # ------------------------------------------------------------------------------ page tables
    def ptl(self, table: int) -> SpinLock:
        """The PTE lock of a table: split per table, or the mm-wide page_table_lock."""
        return self._ptls[table]

    def pmdp_get(self, pmd_index: int) -> int:
        return self.pt.load64(pmd_index * 8)

    def set_pmd(self, pmd_index: int, val: int) -> None:
        self.pt.store64(pmd_index * 8, val)

    def pmdp_get_and_clear(self, pmd_index: int) -> int:
        return self.pt.xchg64(pmd_index * 8, 0)


    def ptep_get(self, table: int, index: int) -> int:
        return self.pt.load64(self._tables_base + (table * PTRS_PER_PTE + index) * 8)

    def set_pte_at(self, table: int, index: int, val: int) -> None:
        self.pt.store64(self._tables_base + (table * PTRS_PER_PTE + index) * 8, val)

    def ptep_get_and_clear(self, table: int, index: int) -> int:
        return self.pt.xchg64(self._tables_base + (table * PTRS_PER_PTE + index) * 8, 0)

    def ptep_get_and_clear_range(self, table: int, index: int, nr: int) -> np.ndarray:
        """ptep_get_and_clear() of nr entries from index on, in order, in one call: the old
        values (an int64 array)."""
        out = np.empty(nr, dtype=np.int64)
        self.pt.get_and_clear64(self._tables_base + (table * PTRS_PER_PTE + index) * 8, out)
        return out

    def ptep_cmpxchg(self, table: int, index: int, old: int, new: int) -> bool:
        return self.pt.cas64(self._tables_base + (table * PTRS_PER_PTE + index) * 8, old, new)

    def ptes_range(self, table: int, index: int, nr: int) -> np.ndarray:
        """A snapshot copy of nr PTEs (vectorised read, as a scan under the PTL does)."""
        base = table * PTRS_PER_PTE + index
        return self.ptes[base : base + nr].copy()

    def set_ptes(self, table: int, index: int, values: np.ndarray | list[int]) -> None:
        """set_ptes()/set_ptes-of-a-batch: plain stores of a range, caller holds the PTL."""
        base = table * PTRS_PER_PTE + index
        if len(values) == 1:  # a fault's one PTE: a scalar store, no array built
            self.ptes[base] = values[0]
        else:
            self.ptes[base : base + len(values)] = values

    def alloc_pte_table(self, cpu: CpuContext) -> int:
        """pte_alloc_one(): a page-table page from the page allocator, zeroed; -1 when none is
        left.  Checks that the table still holds its free poison (else something wrote into it
        after pte_free: a page-table use after free)."""
        L = self.L
        self.zone_lock.lock(cpu)  # the page allocator's free lists (the table pool) are plain words
        try:
            t = self.ctl.load32(TABLE_FREE_HEAD)
            if t >= 0:
                self.ctl.store32(TABLE_FREE_HEAD, self.pt.load32(L.table_next(t)))
                self.pt.store32(L.table_next(t), -2)
                self.ctl.fetch_add32(NR_FREE_TABLES, -1)
        finally:
            self.zone_lock.unlock(cpu)
        if t < 0:
            return -1  # like a failed pte_alloc_one(): the fault ends in VM_FAULT_OOM
        table = self.ptes[t * PTRS_PER_PTE : (t + 1) * PTRS_PER_PTE]
        if (table != POISON_PT).any():
            j = int(np.argmax(table != POISON_PT))
            cpu.violation("pt_use_after_free", page=-1, detail=f"free PTE table {t} was written after pte_free (entry {j} holds {int(table[j]):#x})")
        table[:] = 0
        return t

    def pte_free(self, cpu: CpuContext, t: int) -> None:
        """pte_free(): give a PTE table back to the page allocator at once (no RCU, no IPI: what
        zap_deposited_table() does).  Its life counter moves first, then it is poisoned."""
        L = self.L
        self.pt.fetch_add32(L.table_life(t), 1)
        self.ptes[t * PTRS_PER_PTE : (t + 1) * PTRS_PER_PTE] = POISON_PT
        self.zone_lock.lock(cpu)  # the page allocator's free lists
        try:
            if self.pt.load32(L.table_next(t)) != -2:
                cpu.violation("pt_double_free", page=-1, detail=f"PTE table {t} freed twice")
                return
            self.pt.store32(L.table_next(t), self.ctl.load32(TABLE_FREE_HEAD))
            self.ctl.store32(TABLE_FREE_HEAD, t)
            self.ctl.fetch_add32(NR_FREE_TABLES, 1)
        finally:
            self.zone_lock.unlock(cpu)

    def table_life(self, t: int) -> int:
        return self.pt.load32(self.L.table_life(t))

    def table_in_use(self, t: int) -> bool:
        return self.pt.load32(self.L.table_next(t)) == -2

    def pgtable_trans_huge_deposit(self, i: int, t: int) -> None:
        """Keep the PTE table behind a huge PMD, for a later split (caller holds the PMD lock)."""
        self.pt.store64(self.L.deposit(i), t)

    def pgtable_trans_huge_withdraw(self, i: int) -> int:
        """Take back the table deposited behind huge PMD i (caller holds the PMD lock)."""
        t = self.pt.load64(self.L.deposit(i))
        self.pt.store64(self.L.deposit(i), -1)
        return t

    def pte_table_for(self, cpu: CpuContext, vpn: int) -> int:
        """__pte_alloc + pmd_install: the table mapping vpn, installing a new one if the PMD is
        none (under the PMD lock; a racing installer wins).  -1 when no table is left, -2
        when the PMD turned huge meanwhile (the caller retries the fault)."""
        i = vpn >> 9
        pmd = self.pmdp_get(i)
        if not pmd:
            t = self.alloc_pte_table(cpu)
            if t < 0:
                return -1
            pmd_lock = lock_or_skip(cpu, "mutant-pmd-install-no-lock", self.pmd_lock)
            pmd_lock.lock(cpu)  # pmd_install(): one installer wins
            try:
                if self.pmdp_get(i) == 0:
                    cpu.chaos("pmd_install_after_check")  # rare: only a PMD that is none
                    self.set_pmd(i, pmd_mk_table(t))  # pmd_install
                    return t
            finally:
                pmd_lock.unlock(cpu)
            self.pte_free(cpu, t)  # lost the race: pmd_install() frees the new table
            pmd = self.pmdp_get(i)
        if pmd_trans_huge(pmd):
            return -2
        return pmd >> 12 if pmd else -2

    def epoch(self, vpn: int) -> int:
        return self.pt.load32(self._epochs_base + vpn * 4)

    def bump_epoch(self, vpn: int) -> None:
        self.pt.fetch_add32(self._epochs_base + vpn * 4, 1)

    def bump_epochs(self, vpn: int, nr: int) -> None:
        """bump_epoch() of nr pages from vpn on, in order, in one call."""
        offs = self._epochs_base + np.arange(vpn, vpn + nr, dtype=np.int64) * 4
        self.pt.fetch_add32_each(offs, np.ones(nr, dtype=np.int64))

    # ------------------------------------------------------------------------------ folios
    def folio_head(self, pfn: int) -> int:
        return self.folio.load32(self.off["head"] + pfn * 4)

    def folio_order(self, head: int) -> int:
        return self.folio.load32(self.off["order"] + head * 4)

    def folio_ref_count(self, head: int) -> int:
        return self.folio.load32(self.off["refcount"] + head * 4)

    def folio_mapcount(self, head: int) -> int:
        return self.folio.load32(self.off["mapcount"] + head * 4)

    def folio_pincount(self, head: int) -> int:
        return self.folio.load32(self.off["pincount"] + head * 4)

    def folio_ref_add(self, head: int, n: int) -> int:
        return self.folio.fetch_add32(self.off["refcount"] + head * 4, n) + n

    def folio_mapcount_add(self, head: int, n: int) -> int:
        return self.folio.fetch_add32(self.off["mapcount"] + head * 4, n) + n

    def folio_try_get(self, head: int, refs: int = 1) -> bool:
        """folio_ref_try_add: add refs unless the count is zero (free or frozen)."""
        r, off = self.folio, self.off["refcount"] + head * 4
        while True:
            c = r.load32(off)
            if c <= 0:
                return False
            if r.cas32(off, c, c + refs):
                return True

    def folio_ref_freeze(self, head: int, count: int) -> bool:
        return self.folio.cas32(self.off["refcount"] + head * 4, count, 0)

    def folio_ref_unfreeze(self, head: int, count: int) -> None:
        self.folio.store32(self.off["refcount"] + head * 4, count)

    def try_grab_folio(self, pfn: int, pin: bool) -> int:
        """try_grab_folio_fast(page, 1, FOLL_GET|FOLL_PIN): the head pfn, or -1 on failure.
        Re-checks that the page still belongs to the folio after the reference is taken."""
        head = self.folio_head(pfn)
        if head < 0:
            return -1
        small = self.folio_order(head) == 0
        refs = GUP_PIN_COUNTING_BIAS if pin and small else 1
        if not self.folio_try_get(head, refs):
            return -1
        if self.folio_head(pfn) != head:  # the folio was freed and reused under us
            self.folio_ref_add(head, -refs)
            return -1
        if pin:
            self.folio.fetch_add32(self.off["pincount"] + head * 4, 1)
        return head

    def unpin_folio(self, cpu: CpuContext, head: int) -> None:
        """unpin_user_page(): drop the pin and its bias; frees the folio at zero."""
        small = self.folio_order(head) == 0
        self.folio.fetch_add32(self.off["pincount"] + head * 4, -1)
        self.folio_put(cpu, head, GUP_PIN_COUNTING_BIAS if small else 1)

    def folio_put(self, cpu: CpuContext, head: int, refs: int = 1) -> None:
        left = self.folio_ref_add(head, -refs)
        if left == 0:
            self.free_folio(cpu, head)
        elif left < 0:
            cpu.violation("refcount_underflow", page=head, detail=f"folio {head} refcount went to {left}")

    def folio_counts_add(self, heads: np.ndarray, deltas: np.ndarray, fields: tuple[str, ...]) -> None:
        """folio_ref_add()/folio_mapcount_add() over a batch of folios in one call: for each
        folio in turn, an atomic add of ``deltas[i]`` to each of ``fields`` (e.g. ("mapcount",
        "refcount")), in that order — the order of the per-folio calls it replaces."""
        k = len(fields)
        h4 = np.asarray(heads, dtype=np.int64) * 4
        if k == 1:  # one count per folio (isolation's folio_get()): the offsets are one add
            self.folio.fetch_add32_each(h4 + self.off[fields[0]], np.asarray(deltas, dtype=np.int64))
            return
        offs = np.empty(len(h4) * k, dtype=np.int64)
        for j, name in enumerate(fields):
            offs[j::k] = self.off[name] + h4
        self.folio.fetch_add32_each(offs, np.repeat(np.asarray(deltas, dtype=np.int64), k))

    def folio_add_new_anon_rmap(self, head: int, nr: int) -> None:
        """A fresh folio (refcount 1 from the allocator) about to be mapped by nr >= 1 PTEs (or
        one PMD): mapcount nr, and folio_ref_add(nr - 1) — an atomic add, so a GUP-fast grab
        racing with the set_ptes() that follows is never overwritten."""
        self.folio.store32(self.off["mapcount"] + head * 4, nr)
        if nr > 1:
            self.folio.fetch_add32(self.off["refcount"] + head * 4, nr - 1)

    def folio_test_set_flag(self, head: int, bit: int, on: bool) -> None:
        r, off = self.folio, self.off["flags"] + head * 4
        while True:
            f = r.load32(off)
            if r.cas32(off, f, (f | bit) if on else (f & ~bit)):
                return

    def folio_clear_flag_locked(self, head: int, bit: int) -> None:
        """Clear a flag of a folio whose lock the caller holds (folio_clear_isolated() before the
        unlock): a plain read-modify-write of the word, as the numpy views do, never a
        scheduling point."""
        rf, off = self._rf, self._o_flags + head * 4
        rf.store32(off, rf.load32(off) & ~bit)

    def folio_flags(self, head: int) -> int:
        return self.folio.load32(self.off["flags"] + head * 4)

    def is_refcount_suitable(self, head: int) -> bool:
        """mm/khugepaged.c: folio_ref_count(folio) == folio_mapcount(folio) (no swapcache here)."""
        return self.folio_ref_count(head) == self.folio_mapcount(head)

    # ------------------------------------------------------------------------------ allocator
    def _buddy_add(self, pfn: int, order: int) -> None:
        rf, p4 = self._rf, pfn * 4
        rf.store32(self._o_order + p4, order)
        rf.store32(self._o_flags + p4, PG_BUDDY)
        rf.store32(self._o_ref + p4, 0)
        first = self.ctl.load32(FREE_HEADS + 4 * order)
        rf.store32(self._o_next + p4, first)
        rf.store32(self._o_prev + p4, -1)
        if first >= 0:
            rf.store32(self._o_prev + first * 4, pfn)
        self.ctl.store32(FREE_HEADS + 4 * order, pfn)

    def _buddy_del(self, pfn: int, order: int) -> None:
        rf, p4, o_next, o_prev = self._rf, pfn * 4, self._o_next, self._o_prev
        nxt, prv = rf.load32(o_next + p4), rf.load32(o_prev + p4)
        if prv >= 0:
            rf.store32(o_next + prv * 4, nxt)
        else:
            self.ctl.store32(FREE_HEADS + 4 * order, nxt)
        if nxt >= 0:
            rf.store32(o_prev + nxt * 4, prv)
        rf.store32(o_next + p4, -1)
        rf.store32(o_prev + p4, -1)
        rf.store32(self._o_flags + p4, 0)

    def _list_del_entry_valid(self, cpu: CpuContext, pfn: int, order: int) -> None:
        """__list_del_entry_valid() (CONFIG_DEBUG_LIST): the block taken off a free list must be
        a free block of that order still linked where the list says.  A free list changed under
        the taker (the zone lock missing) fails this; like the kernel's "list_del corruption"
        BUG it ends the run, as a ``frame_accounting`` violation, not as a crash of the model."""
        rf, p4 = self._rf, pfn * 4
        ok = 0 <= pfn < self.L.nr_frames and rf.load32(self._o_flags + p4) & PG_BUDDY and rf.load32(self._o_order + p4) == order
        if ok:
            prv = rf.load32(self._o_prev + p4)
            ok = (self.ctl.load32(FREE_HEADS + 4 * order) if prv < 0 else rf.load32(self._o_next + prv * 4)) == pfn
        if not ok:
            cpu.violation("frame_accounting", page=max(pfn, -1), detail=f"list_del corruption: CPU {cpu.id} took pfn {pfn} off the order-{order} free list, which no longer holds it there")
            self.ctl.cas32(STOP, 0, STOP_VIOLATION)
            raise Stopped()

    def alloc_folio(self, cpu: CpuContext, order: int, zero: bool = False) -> int:
        """__folio_alloc(): a folio of 2^order frames (head pfn) with refcount 1, or -1 when no
        free block is large enough (fragmentation).  Checks the free poison of every frame."""
        cpu.charge("alloc_page")
        if order:
            cpu.charge("alloc_large_per_page", (1 << order) - 1)
        buddy = self._buddy
        zone_lock = lock_or_skip(cpu, "mutant-alloc-no-zone-lock", self.zone_lock)
        zone_lock.lock(cpu)  # excludes other allocators/freers: the free lists are plain words
        try:
            # the list work below in one C call; -2: its __list_del_entry_valid() failed (nothing
            # changed), and the Python steps record it; a CPU with test hooks parks in them, and
            # with --chaos they run step by step with a race point between reading the list head
            # and unlinking it (one C call would leave a racer no window to meet)
            pfn = -2 if buddy is None or cpu.hooks or cpu.chaos_on else buddy.alloc(order)
            if pfn == -2:
                pfn = self._rmqueue(cpu, order)
        finally:
            zone_lock.unlock(cpu)
        if pfn < 0:
            return -1
        if buddy is not None:
            # the steps below in one C call (the poison check before the clearing)
            bad = buddy.prep_new(pfn, order, zero)
            if bad >= 0:
                self._poison_violation(cpu, pfn, bad)
            return pfn
        n = 1 << order
        f, rf, p4 = self.f, self._rf, pfn * 4
        if n == 1:
            rf.store32(self._o_head + p4, pfn)
        else:
            f["head"][pfn : pfn + n] = pfn
        rf.store32(self._o_order + p4, order)
        rf.store32(self._o_map + p4, 0)
        rf.store32(self.off["pincount"] + p4, 0)
        rf.store32(self.off["lock_owner"] + p4, 0)
        self.folio.store32(self.off["flags"] + pfn * 4, PG_ANON | PG_LRU)
        self.folio.store32(self.off["refcount"] + pfn * 4, 1)
        wpp = self.words_per_page
        bad = self.frames.find_not64(pfn * self.page_size, n * wpp, POISON_FREE)
        if bad >= 0:
            self._poison_violation(cpu, pfn, bad)
        if zero:
            self.frames.fill64(pfn * self.page_size, n * wpp, 0)
        return pfn

    def _rmqueue(self, cpu: CpuContext, order: int) -> int:
        """rmqueue() -> __rmqueue_smallest() under zone->lock (the caller holds it): the smallest
        free block of at least ``order`` off its list, split down to ``order`` (the upper halves
        go back), or -1 when none is large enough."""
        o = order
        while o <= MAX_ORDER and self.ctl.load32(FREE_HEADS + 4 * o) < 0:
            o += 1
        if o > MAX_ORDER:
            return -1
        pfn = self.ctl.load32(FREE_HEADS + 4 * o)
        if cpu.hooks or cpu.chaos_on:  # a park point for tests/test_mutants.py, a race point for --chaos
            cpu.chaos("alloc_after_head_read")
        self._list_del_entry_valid(cpu, pfn, o)
        self._buddy_del(pfn, o)
        while o > order:  # split, giving the upper halves back
            o -= 1
            self._buddy_add(pfn + (1 << o), o)
        self.ctl.fetch_add32(NR_FREE, -(1 << order))
        return pfn

    def _poison_violation(self, cpu: CpuContext, pfn: int, bad: int) -> None:
        """Word ``bad`` of the new folio at ``pfn`` had lost its free poison."""
        wpp = self.words_per_page
        page, word = pfn + bad // wpp, bad % wpp
        who = f"CPU {word}" if word < 256 else f"DMA of CPU {word - 256}"
        cpu.violation(
            "use_after_free",
            page=page,
            detail=f"freed frame {page} was written after free (word {word}: {who}) — a stale TLB entry or pin",
        )

    def free_folio(self, cpu: CpuContext, head: int) -> None:
        """Free a folio whose refcount reached zero: poison it and give it to the buddy lists."""
        if self._buddy is not None and self._buddy.free_prepare((head,)):
            self._free_prepared(cpu, [head])  # the steps below, in two C calls
            return
        order = self.folio_order(head)
        flags = self.folio_flags(head)
        if flags & PG_BUDDY:
            cpu.violation("double_free", page=head, detail=f"folio {head} freed twice")
            return
        if flags & PG_LOCKED:
            cpu.violation("free_locked", page=head, detail=f"folio {head} freed while locked")
        n = 1 << order
        mc = self.folio_mapcount(head)
        if mc != 0:
            cpu.violation("free_mapped", page=head, detail=f"folio {head} freed with mapcount {mc}")
        self.frames.fill64(head * self.page_size, n * self.words_per_page, POISON_FREE)
        rf = self._rf
        if n == 1:
            rf.store32(self._o_head + head * 4, -1)
        else:
            self.f["head"][head : head + n] = -1
        zone_lock = lock_or_skip(cpu, "mutant-alloc-no-zone-lock", self.zone_lock)
        zone_lock.lock(cpu)  # the buddy lists
        try:
            pfn, o = head, order
            o_flags, o_order, nr_frames = self._o_flags, self._o_order, self._nr_frames
            while o < MAX_ORDER:
                buddy = pfn ^ (1 << o)
                if buddy + (1 << o) > nr_frames:
                    break
                if not (rf.load32(o_flags + buddy * 4) & PG_BUDDY and rf.load32(o_order + buddy * 4) == o):
                    break
                self._buddy_del(buddy, o)
                pfn = min(pfn, buddy)
                o += 1
            self._buddy_add(pfn, o)
            self.ctl.fetch_add32(NR_FREE, n)
        finally:
            zone_lock.unlock(cpu)

    def _free_prepared(self, cpu: CpuContext, heads: list[int]) -> None:
        """free_folio()'s part under zone->lock for folios Buddy.free_prepare() poisoned, in one
        C call and one zone->lock hold (free_pcppages_bulk())."""
        zone_lock = lock_or_skip(cpu, "mutant-alloc-no-zone-lock", self.zone_lock)
        zone_lock.lock(cpu)  # the buddy lists
        try:
            self._buddy.free(heads)  # type: ignore[union-attr]
        finally:
            zone_lock.unlock(cpu)

    def folios_put(self, cpu: CpuContext, heads: list[int]) -> None:
        """folios_put(): folio_put() of each folio in turn.  On the process backend the folios
        whose count reaches zero are freed as one batch once all are put, as the kernel's
        free_unref_folios() does through the per-CPU lists: free_pages_prepare() of each (checks,
        poison), then the buddy lists under one zone->lock hold (free_pcppages_bulk()).  A folio
        that fails free_folio()'s checks goes through free_folio(), which records it."""
        buddy = self._buddy
        if buddy is None:  # the scheduled backend: the per-folio steps
            for head in heads:
                self.folio_put(cpu, head)
            return
        zero, under = buddy.put(heads)
        for head, left in under:
            cpu.violation("refcount_underflow", page=head, detail=f"folio {head} refcount went to {left}")
        while zero:
            k = buddy.free_prepare(zero)
            if k:
                self._free_prepared(cpu, zero[:k])
            if k < len(zero):
                self.free_folio(cpu, zero[k])  # the Python steps: they record what is wrong with it
            zero = zero[k + 1 :]

    def release_locked_folios(self, cpu: CpuContext, heads: list[int], clear: int) -> None:
        """For folios this CPU holds locked: clear the flag bits ``clear`` (a plain
        read-modify-write under the folio lock), folio_unlock() (waking its waiters) and
        folio_put() — __collapse_huge_page_copy_succeeded()'s release_pte_folio() and
        free_folio_and_swap_cache() of each old folio.  On the process backend the puts come
        after all the unlocks, as one folios_put() (the frees are batched through the per-CPU
        lists in the kernel too); on the scheduled backend each folio in turn, as before."""
        fl = self.folio_locks
        if self._buddy is None:
            for head in heads:
                self.folio_clear_flag_locked(head, clear)
                fl.folio_unlock(cpu, head)
                self.folio_put(cpu, head)
            return
        if heads:
            flags = self.f["flags"]
            h = np.asarray(heads, dtype=np.int64)
            flags[h] &= ~clear
        fl.folio_unlock_many(cpu, heads)
        self.folios_put(cpu, heads)

    def nr_free(self) -> int:
        return self.ctl.load32(NR_FREE)

    # ------------------------------------------------------------------------------ frames
    def page_word_off(self, pfn: int, word: int) -> int:
        return pfn * self.page_size + word * 8

    def copy_page(self, dst_pfn: int, src_pfn: int) -> None:
        self.frames.copy(dst_pfn * self.page_size, src_pfn * self.page_size, self.page_size)

    def clear_page(self, pfn: int) -> None:
        self.frames.fill64(pfn * self.page_size, self.words_per_page, 0)

    def copy_pages(self, dst_pfn: int, src_offs: np.ndarray) -> None:
        """copy_page() of each page of a run in one call: frame dst_pfn + j gets a copy of the
        frame at byte offset src_offs[j] (pfn * page_size, an int64 array), or is cleared
        (clear_page()) where src_offs[j] < 0.  The same operations in the same order as the
        per-page calls (the scheduled backend runs those)."""
        self.frames.copy_pages(dst_pfn * self.page_size, src_offs, self.page_size)

    # ------------------------------------------------------------------------------ zero page
    def is_zero_pfn(self, pfn: int) -> bool:
        """is_zero_pfn(): the shared zero page, which no folio owns (vm_normal_page() is NULL)."""
        return pfn == self.zero_pfn

    def pte_none_or_zero(self, ptes: np.ndarray) -> np.ndarray:
        """Per entry of an int64 PTE array: pte_none() || is_zero_pfn(pte_pfn()) — what
        khugepaged counts against max_ptes_none and fills with zeroes (a bool array)."""
        # present with pfn == zero_pfn, as one masked compare: (pte >> PFN_SHIFT) == zero_pfn
        # exactly when the bits above the flags are zero_pfn's
        zero_pte = self.zero_pfn << PFN_SHIFT | _PRESENT
        return (ptes == 0) | ((ptes & (-(1 << PFN_SHIFT) | _PRESENT)) == zero_pte)
