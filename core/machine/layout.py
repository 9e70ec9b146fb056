"""Where everything of one machine lives: segment sizes and byte offsets.

Four segments per machine:
  ctl     the mm and its locks, VMAs, per-CPU mailboxes, the start gate and run flags
  pt      the PMD table, a pool of PTE tables (512 entries each), per-page zap epochs
  folio   per-frame metadata as parallel int32 arrays (refcount, mapcount, flags, ...)
  frames  the bytes of "physical memory"

Lock words and mailboxes sit in ctl so that a spinning CPU can watch its own IPI word in the
same region as the lock (one C call spins on both).  Every hot word gets its own 64-byte line.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptlab.core.machine.config import PTRS_PER_PTE, RunConfig

LINE = 64
MAX_CPUS = 128  # simulated CPUs (the last id is the driver's); mm_cpumask is MAX_CPUS // 64 words
MAX_VMAS = 16
BCAST_RING = 64

# ---- ctl header (byte offsets) ---------------------------------------------------------------
GATE = 0  # u32 futex: 0 closed, 1 open
STOP = 4  # u32: 0 running, else a StopReason
STOP_WATCHDOG, STOP_FAILED, STOP_VIOLATION = 2, 3, 4  # STOP values (1 is not used: the end is time-based)
READY = 8  # u32: CPUs attached and waiting at the gate
COLLAPSING = 12  # u32: collapses in flight (events record during_collapse from it)
COLLAPSE_START = 16  # i64: first vpn of the collapse in flight + 1 (0: none): stress_target=collapse
MM_LOCK_SEQ = 24  # i64: bumped by mmap_write_unlock, ending every VMA write lock at once
TLB_GEN = 32  # i64: broadcast-invalidation generation
T0 = 40  # i64: start-gate time (monotonic ns)
TABLE_FREE_HEAD = 48  # i32: first free PTE table of the pool (-1 none), under the zone lock
NR_FREE_TABLES = 52  # i32: free PTE tables
COLLAPSE_PHASE = 108  # i32: phase of the collapse in flight (index into PHASES + 1), 0 none
QUIESCE = 112  # u32 futex: 1 while the driver wants every CPU parked between operations
PARKED = 116  # u32: CPUs parked at the quiescent point
MM_TLB_GEN = 120  # i64: the mm's flush generation (x86 mm->context.tlb_gen), bumped by every flush
BCAST = 128  # BCAST_RING x (start, end) i64 pairs
MM_CPUMASK = BCAST + BCAST_RING * 16  # i64[MAX_CPUS // 64]: CPUs whose TLB may hold this mm's entries
HEADER_END = MM_CPUMASK + 64


def cpumask_slot(cpu: int) -> tuple[int, int]:
    """(byte offset of the mm_cpumask word holding ``cpu``, its bit as a signed int64)."""
    bit = 1 << (cpu & 63)
    return MM_CPUMASK + (cpu >> 6) * 8, bit - (1 << 64) if bit >= 1 << 63 else bit


def cpumask_cpus(words: list[int]) -> list[int]:
    """The CPU ids set in the mm_cpumask words (signed int64 each)."""
    return [w * 64 + b for w, word in enumerate(words) for b in range(64) if word >> b & 1]

# ---- lock structs (one line each) --------------------------------------------------------------
# spinlock: +0 word (owner cpu + 1), +8 acquisitions, +16 contended, +24 spin_ns
# rwsem:    +0 state i64 (readers | WRITER | waiting writers), +8 seq u32 futex, +12 sleepers u32,
#           +16 owner i32 (writer cpu + 1), +24 readers mask i64, +32 sleep_ns, +40 contended,
#           +48 acquisitions
NAMED_LOCKS = ("mmap_lock", "anon_vma", "page_table_lock", "pmd_lock", "zone_lock")

# ---- VMA struct ---------------------------------------------------------------------------------
# +0 start vpn, +8 end vpn, +16 flags, +24 vm_lock_seq, +32 readers i32 (futex), +36 writer
# waiting i32, +40 generation (bumped by munmap/mmap so a racing lockless lookup can revalidate)
VMA_SIZE = LINE
VMA_START, VMA_END, VMA_FLAGS, VMA_LOCK_SEQ, VMA_READERS, VMA_WWAIT, VMA_GEN = 0, 8, 16, 24, 32, 36, 40
VMA_WAKE_DONE, VMA_WAKE_T = 48, 52  # u32: the last reader's "wake done" count and time (core/machine/locks.py)
VM_INUSE, VM_HUGEPAGE, VM_WRITE, VM_ORACLE = 1, 2, 4, 8

# ---- CPU struct ----------------------------------------------------------------------------------
# +0 pid, +8 ipi_req, +16 ipi_ack, +24 ipi_start, +32 ipi_end, +40 progress, +48 ipi_flag i32,
# +52 state i32, +56 waiting-on lock id i32, +60 irq_off i32, +68 alive i32,
# +72 in_access i32
CPU_SIZE = 2 * LINE
CPU_PID, CPU_IPI_REQ, CPU_IPI_ACK, CPU_IPI_START, CPU_IPI_END, CPU_PROGRESS = 0, 8, 16, 24, 32, 40
CPU_IPI_FLAG, CPU_STATE, CPU_WAITING, CPU_IRQ_OFF, CPU_ALIVE = 48, 52, 56, 60, 68
CPU_IN_ACCESS = 72  # i32: 1 from a TLB hit until the load/store through it has landed
CPU_IPI_GEN = 80  # i64: highest flush generation requested since the last service (atomic max)
CPU_IPI_NGEN = 88  # i64: range flushes requested since the last service

# CPU_STATE values (for the watchdog's dump)
ST_RUN, ST_SPIN, ST_SLEEP, ST_IPI_WAIT, ST_DONE = 0, 1, 2, 3, 4
STATE_NAMES = {ST_RUN: "running", ST_SPIN: "spinning", ST_SLEEP: "sleeping", ST_IPI_WAIT: "waiting for IPI acks", ST_DONE: "done"}

# ---- folio fields (parallel int32 arrays in the folio segment) ---------------------------------
FOLIO_FIELDS = ("refcount", "mapcount", "flags", "order", "head", "pincount", "lock_owner", "waiters", "wake_seq", "next_free", "prev_free", "wake_done", "wake_t")
PG_LOCKED, PG_LRU, PG_ISOLATED, PG_ANON, PG_BUDDY = 1, 2, 4, 8, 16
GUP_PIN_COUNTING_BIAS = 1024
POISON_FREE = 0x6B6B6B6B6B6B6B6B
# a freed PTE table is filled with this (PAGE_POISON 0xaa): not present, not a migration entry
POISON_PT = -0x5555555555555556  # 0xAAAAAAAAAAAAAAAA as int64

# ---- PTE / PMD encoding (int64) -------------------------------------------------------------
# PTE: 0 = none.  bit0 present, bit1 write, bit2 dirty, bit3 young, bit4 migration entry
#      (not present; swap-type), pfn << 12.
# PMD: 0 = none.  bit0 present, bit5 huge (leaf), bit1 write; table index or pfn << 12.
_PRESENT, _WRITE, _DIRTY, _YOUNG, _MIGRATION, _HUGE = 1, 2, 4, 8, 16, 32
PFN_SHIFT = 12


@dataclass(frozen=True)
class Layout:
    """All sizes and offsets of one machine, derived from its RunConfig."""

    page_size: int
    nr_frames: int
    nr_pmds: int  # PMD entries in the mm (the collapsing VMA, the other VMA, the mmap area)
    nr_tables: int  # PTE tables in the pool
    nr_cpus: int
    vma0_pmds: int

    @classmethod
    def for_config(cls, c: RunConfig) -> Layout:
        nr_pmds = c.nr_pmds + 2  # + one PMD for the "other" VMA, one for mmap() churn
        return cls(
            page_size=c.page_size,
            nr_frames=c.frames + 1,  # + the shared zero page, the last frame (never allocated)
            nr_pmds=nr_pmds,
            nr_tables=2 * nr_pmds + 4,
            nr_cpus=c.nr_cpus,
            vma0_pmds=c.nr_pmds,
        )

    # ctl
    @property
    def locks_base(self) -> int:
        return HEADER_END

    def named_lock(self, name: str) -> int:
        return self.locks_base + NAMED_LOCKS.index(name) * LINE

    def ptl(self, table: int) -> int:
        return self.locks_base + (len(NAMED_LOCKS) + table) * LINE

    @property
    def vmas_base(self) -> int:
        return self.locks_base + (len(NAMED_LOCKS) + self.nr_tables) * LINE

    def vma(self, i: int) -> int:
        return self.vmas_base + i * VMA_SIZE

    @property
    def cpus_base(self) -> int:
        return self.vmas_base + MAX_VMAS * VMA_SIZE

    def cpu(self, i: int) -> int:
        return self.cpus_base + i * CPU_SIZE

    @property
    def ctl_size(self) -> int:
        return self.cpus_base + MAX_CPUS * CPU_SIZE

    # pt
    def pmd(self, i: int) -> int:
        return i * 8

    @property
    def tables_base(self) -> int:
        return ((self.nr_pmds * 8 + 4095) // 4096) * 4096

    def pte(self, table: int, index: int) -> int:
        return self.tables_base + (table * PTRS_PER_PTE + index) * 8

    @property
    def epochs_base(self) -> int:
        return self.tables_base + self.nr_tables * PTRS_PER_PTE * 8

    @property
    def nr_pages(self) -> int:
        return self.nr_pmds * PTRS_PER_PTE

    def epoch(self, vpn: int) -> int:
        return self.epochs_base + vpn * 4

    @property
    def deposits_base(self) -> int:
        return self.epochs_base + self.nr_pages * 4

    def deposit(self, pmd_index: int) -> int:
        """pgtable_trans_huge_deposit slot of a PMD: the PTE table kept behind a huge PMD."""
        return self.deposits_base + pmd_index * 8

    @property
    def table_life_base(self) -> int:
        """Per PTE table: i32 life counter, bumped when the table is freed (the oracle's view of
        page-table lifetime: a lockless walker that sees it move was inside a freed table)."""
        return self.deposits_base + self.nr_pmds * 8

    def table_life(self, table: int) -> int:
        return self.table_life_base + table * 4

    def table_next(self, table: int) -> int:
        """Per PTE table: i32 link of the pool's free list (-1 end), -2 while in use."""
        return self.table_life_base + self.nr_tables * 4 + table * 4

    @property
    def pt_size(self) -> int:
        return self.table_life_base + self.nr_tables * 8

    # folio
    def folio_field(self, field: str) -> int:
        return FOLIO_FIELDS.index(field) * self.nr_frames * 4

    @property
    def folio_size(self) -> int:
        return len(FOLIO_FIELDS) * self.nr_frames * 4

    # frames
    @property
    def frames_size(self) -> int:
        return self.nr_frames * self.page_size

    def sizes(self) -> dict[str, int]:
        return {"ctl": self.ctl_size, "pt": self.pt_size, "folio": self.folio_size, "frames": self.frames_size}


# ---- entry helpers ----------------------------------------------------------------------------
def pte_mk(pfn: int, write: bool = True, dirty: bool = False, young: bool = True) -> int:
    return (pfn << PFN_SHIFT) | _PRESENT | (_WRITE if write else 0) | (_DIRTY if dirty else 0) | (_YOUNG if young else 0)


def pte_mk_migration(pte):  # type: ignore[no-untyped-def]
    """A migration entry carrying the pfn and the write/dirty/young bits of a present PTE
    (an int or an int64 array)."""
    return (pte & ~_PRESENT) | _MIGRATION


def is_migration_entry(pte: int) -> bool:
    return bool(pte & _MIGRATION) and not pte & _PRESENT


def pmd_mk_table(table: int) -> int:
    return (table << PFN_SHIFT) | _PRESENT


def pmd_mk_huge(pfn: int, write: bool = True) -> int:
    return (pfn << PFN_SHIFT) | _PRESENT | _HUGE | (_WRITE if write else 0)


def pmd_trans_huge(pmd: int) -> bool:
    return bool(pmd & _PRESENT) and bool(pmd & _HUGE)
