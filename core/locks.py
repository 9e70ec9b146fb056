"""Locks on shared words: spinlock, rwsem, per-VMA lock, folio lock.

One wait mechanism underneath (trio's ParkingLot idea, over shared memory): a spinner spins in
C and comes back to Python only to service an IPI or to check, every BUDGET_NS, that the owner
is alive and the run has not been stopped; a sleeper leaves mm_cpumask, drops its TLB and
sleeps on a futex word, with the same periodic checks.  Every lock knows its owner CPU and
counts its own contention; every CPU accounts the spin ns and sleep ns it spent and on what
(``CpuContext.spin_ns``/``sleep_ns``/``waited_on``), which is what the whole comparison is about.

A lock whose owner died raises OwnerDied in its waiters within BUDGET_NS-ish, naming the lock
and the dead CPU, instead of hanging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ptlab.core._prims import Region
from ptlab.core.errors import OwnerDied
from ptlab.core.layout import (
    MAX_CPUS,
    PG_LOCKED,
    VMA_LOCK_SEQ,
    VMA_READERS,
    VMA_WWAIT,
)

if TYPE_CHECKING:
    from ptlab.core.cpu import CpuContext

BUDGET_NS = 20_000_000  # how long one C spin or one futex sleep lasts before re-checking
SLEEP_SLICE_NS = 20_000_000

# rwsem state word
RWSEM_READER_MASK = (1 << 32) - 1
RWSEM_WRITER = 1 << 32
RWSEM_WWAIT = 1 << 40


class SpinLock:
    """Test-and-test-and-set spinlock on a 32-bit word (0 free, else owner CPU + 1).

    Layout (one 64-byte line): +0 word, +8 acquisitions, +16 contended, +24 spin_ns.
    Invariant: word != 0 iff some CPU is between spin_lock() and spin_unlock().
    """

    __slots__ = ("r", "off", "name", "kind", "lock_id")

    def __init__(self, region: Region, off: int, name: str, kind: str, lock_id: int) -> None:
        self.r = region
        self.off = off
        self.name = name  # e.g. "ptl[3]"
        self.kind = kind  # the waited_on class: "ptl", "pmd_lock", "zone"
        self.lock_id = lock_id

    def lock(self, cpu: CpuContext) -> int:
        """Acquire; returns ns spent spinning (0 when uncontended)."""
        r = self.r.spin_lock(self.off, cpu.owner_tag, cpu.ipi_flag_off, BUDGET_NS)
        if r == 0:
            return 0
        return self._slow(cpu, r)

    def _slow(self, cpu: CpuContext, r: int) -> int:
        spun = 0
        cpu.set_waiting(1, self.lock_id)
        try:
            while r < 0:
                spun += -1 - r
                # interrupts are on while spin_lock spins: service a pending flush IPI
                cpu.interrupt_point()
                cpu.check_stop()
                self.check_owner(cpu)
                r = self.r.spin_lock(self.off, cpu.owner_tag, cpu.ipi_flag_off, BUDGET_NS)
            spun += r
        finally:
            cpu.set_waiting(0, 0)
        self.r.fetch_add64(self.off + 16, 1)
        self.r.fetch_add64(self.off + 24, spun)
        cpu.account_spin(spun, self.kind)
        return spun

    def trylock(self, cpu: CpuContext) -> bool:
        return self.r.spin_trylock(self.off, cpu.owner_tag)

    def unlock(self, cpu: CpuContext) -> None:
        self.r.spin_unlock(self.off)

    def owner(self) -> int:
        """Owner CPU id, or -1 when free."""
        return self.r.load32(self.off) - 1

    def check_owner(self, cpu: CpuContext) -> None:
        owner = self.owner()
        if owner >= 0 and not cpu.cpu_alive(owner):
            raise OwnerDied(f"{self.name} is held by CPU {owner}, whose process died; giving up the wait")

    def statistics(self) -> dict[str, int]:
        return {
            "owner": self.owner(),
            "contended": self.r.load64(self.off + 16),
            "spin_ns": self.r.load64(self.off + 24),
        }

    def __repr__(self) -> str:
        o = self.owner()
        return f"<{self.name} {f'held by CPU {o}' if o >= 0 else 'free'}>"


class RwSem:
    """Sleeping reader-writer semaphore (mmap_lock, anon_vma->rwsem), writer-fair like Linux:
    a waiting writer blocks new readers, so a stream of readers cannot starve it.

    Layout: +0 state (readers in the low 32 bits | RWSEM_WRITER | waiting writers * 2**40),
    +8 seq (futex word, bumped on every release), +12 sleepers, +16 owner (writer CPU + 1),
    +24 readers mask (bit per CPU holding it for read), +32 sleep_ns, +40 contended.
    Invariants: WRITER set implies readers == 0; owner != 0 iff WRITER set.
    """

    __slots__ = ("r", "off", "name", "lock_id")

    def __init__(self, region: Region, off: int, name: str, lock_id: int) -> None:
        self.r = region
        self.off = off
        self.name = name
        self.lock_id = lock_id

    # -- read side --
    def _read_ok(self, s: int) -> bool:
        return not (s & RWSEM_WRITER) and (s >> 40) == 0

    def down_read_trylock(self, cpu: CpuContext) -> bool:
        s = self.r.load64(self.off)
        if self._read_ok(s) and self.r.cas64(self.off, s, s + 1):
            self.r.fetch_or64(self.off + 24, 1 << cpu.id)
            return True
        return False

    def down_read(self, cpu: CpuContext) -> int:
        """Acquire for read; returns ns slept (0 when uncontended)."""
        if self.down_read_trylock(cpu):
            return 0
        return self._wait(cpu, write=False)

    def up_read(self, cpu: CpuContext) -> None:
        self.r.fetch_and64(self.off + 24, ~(1 << cpu.id))
        old = self.r.fetch_add64(self.off, -1)
        if (old & RWSEM_READER_MASK) == 1:
            self._wake()

    # -- write side --
    def down_write_trylock(self, cpu: CpuContext) -> bool:
        s = self.r.load64(self.off)
        if (s & (RWSEM_READER_MASK | RWSEM_WRITER)) == 0 and self.r.cas64(self.off, s, s | RWSEM_WRITER):
            self.r.store32(self.off + 16, cpu.owner_tag)
            return True
        return False

    def down_write(self, cpu: CpuContext) -> int:
        if self.down_write_trylock(cpu):
            return 0
        return self._wait(cpu, write=True)

    def up_write(self, cpu: CpuContext) -> None:
        self.r.store32(self.off + 16, 0)
        self.r.fetch_add64(self.off, -RWSEM_WRITER)
        self._wake()

    def _wake(self) -> None:
        self.r.fetch_add32(self.off + 8, 1)
        if self.r.load32(self.off + 12):
            self.r.futex_wake(self.off + 8, 1 << 30)

    def _wait(self, cpu: CpuContext, write: bool) -> int:
        r, off = self.r, self.off
        if write:
            r.fetch_add64(off, RWSEM_WWAIT)
        slept = 0
        cpu.set_waiting(2, self.lock_id)
        registered = write
        try:
            while True:
                seq = r.load32(off + 8)
                s = r.load64(off)
                if write:
                    if (s & (RWSEM_READER_MASK | RWSEM_WRITER)) == 0 and r.cas64(off, s, (s - RWSEM_WWAIT) | RWSEM_WRITER):
                        registered = False
                        r.store32(off + 16, cpu.owner_tag)
                        break
                elif self._read_ok(s) and r.cas64(off, s, s + 1):
                    r.fetch_or64(off + 24, 1 << cpu.id)
                    break
                else:
                    pass
                if (s & RWSEM_WRITER) or (s & RWSEM_READER_MASK):
                    self.check_owner(cpu)
                cpu.check_stop()
                r.fetch_add32(off + 12, 1)
                slept += cpu.futex_sleep(r, off + 8, seq, SLEEP_SLICE_NS)
                r.fetch_add32(off + 12, -1)
        except BaseException:
            if registered:
                r.fetch_add64(off, -RWSEM_WWAIT)
                self._wake()
            raise
        finally:
            cpu.set_waiting(0, 0)
        r.fetch_add64(off + 40, 1)
        r.fetch_add64(off + 32, slept)
        cpu.account_sleep(slept, self.name_kind)
        return slept

    @property
    def name_kind(self) -> str:
        return "mmap_lock" if self.name == "mmap_lock" else "anon_vma"

    def writer(self) -> int:
        return self.r.load32(self.off + 16) - 1

    def readers(self) -> list[int]:
        mask = self.r.load64(self.off + 24)
        return [i for i in range(MAX_CPUS) if mask >> i & 1]

    def check_owner(self, cpu: CpuContext) -> None:
        w = self.writer()
        if w >= 0 and not cpu.cpu_alive(w):
            raise OwnerDied(f"{self.name} is held for write by CPU {w}, whose process died")
        for rd in self.readers():
            if not cpu.cpu_alive(rd):
                raise OwnerDied(f"{self.name} is held for read by CPU {rd}, whose process died")

    def statistics(self) -> dict[str, object]:
        s = self.r.load64(self.off)
        return {
            "writer": self.writer(),
            "readers": self.readers(),
            "waiting_writers": s >> 40,
            "sleepers": self.r.load32(self.off + 12),
            "contended": self.r.load64(self.off + 40),
            "sleep_ns": self.r.load64(self.off + 32),
        }

    def __repr__(self) -> str:
        st = self.statistics()
        if st["writer"] >= 0:  # type: ignore[operator]
            held = f"held for write by CPU {st['writer']}"
        elif st["readers"]:
            held = f"held for read by CPUs {st['readers']}"
        else:
            held = "free"
        return f"<{self.name} {held}, {st['sleepers']} sleeping>"


class VmaLock:
    """Per-VMA lock with the kernel's semantics (mm/mmap_lock.c, include/linux/mmap_lock.h):

    - read (``vma_start_read``, used by ``lock_vma_under_rcu``) is a trylock that fails while the
      VMA is write-locked, i.e. while vma->vm_lock_seq == mm->mm_lock_seq;
    - write (``vma_start_write``) is taken only under mmap_lock held for write: it sets
      vm_lock_seq = mm_lock_seq and waits for the current readers to leave;
    - every VMA write lock ends at once when mmap_write_unlock bumps mm_lock_seq.
    """

    __slots__ = ("r", "off", "seq_off", "name", "lock_id")

    def __init__(self, region: Region, vma_off: int, mm_lock_seq_off: int, name: str, lock_id: int) -> None:
        self.r = region
        self.off = vma_off
        self.seq_off = mm_lock_seq_off
        self.name = name
        self.lock_id = lock_id

    def write_locked(self) -> bool:
        return self.r.load64(self.off + VMA_LOCK_SEQ) == self.r.load64(self.seq_off)

    def vma_start_read(self, cpu: CpuContext) -> bool:
        r = self.r
        if self.write_locked():
            return False
        r.fetch_add32(self.off + VMA_READERS, 1)
        # re-check after publishing ourselves: pairs with vma_start_write's xchg then readers read
        if self.write_locked():
            self.vma_end_read(cpu)
            return False
        return True

    def vma_end_read(self, cpu: CpuContext) -> None:
        r = self.r
        if r.fetch_add32(self.off + VMA_READERS, -1) == 1 and r.load32(self.off + VMA_WWAIT):
            r.futex_wake(self.off + VMA_READERS, 1 << 30)

    def vma_start_write(self, cpu: CpuContext, mm_seq: int) -> int:
        """Caller holds mmap_lock for write.  Returns ns slept waiting for readers to drain."""
        r = self.r
        if r.load64(self.off + VMA_LOCK_SEQ) == mm_seq:
            return 0
        r.xchg64(self.off + VMA_LOCK_SEQ, mm_seq)  # full barrier before reading the readers count
        slept = 0
        if r.load32(self.off + VMA_READERS) == 0:
            return 0
        r.store32(self.off + VMA_WWAIT, 1)
        cpu.set_waiting(2, self.lock_id)
        try:
            while True:
                n = r.load32(self.off + VMA_READERS)
                if n == 0:
                    break
                cpu.check_stop()
                slept += cpu.futex_sleep(r, self.off + VMA_READERS, n, SLEEP_SLICE_NS)
        finally:
            r.store32(self.off + VMA_WWAIT, 0)
            cpu.set_waiting(0, 0)
        cpu.account_sleep(slept, "vma_lock")
        return slept


class FolioLocks:
    """PG_locked on every folio, in the folio segment's parallel arrays (flags is the futex word).

    ``folio_lock`` sleeps, ``folio_trylock`` does not, ``folio_unlock`` wakes every waiter, and
    ``folio_wait_unlocked`` sleeps until PG_locked clears without taking it — the basis of
    ``migration_entry_wait_on_locked`` (mm/filemap.c), which registers as a waiter *before* the
    PTL is dropped so the unlock cannot be missed.
    """

    def __init__(self, region: Region, flags_base: int, owner_base: int, waiters_base: int, wake_base: int) -> None:
        self.r = region
        self.flags = flags_base
        self.owner = owner_base
        self.waiters = waiters_base
        self.wake = wake_base  # bumped by every folio_unlock(): the WQ_FLAG_WOKEN of a waiter

    def folio_trylock(self, cpu: CpuContext, pfn: int) -> bool:
        r, off = self.r, self.flags + pfn * 4
        while True:
            f = r.load32(off)
            if f & PG_LOCKED:
                return False
            if r.cas32(off, f, f | PG_LOCKED):
                r.store32(self.owner + pfn * 4, cpu.owner_tag)
                return True

    def folio_lock(self, cpu: CpuContext, pfn: int) -> int:
        if self.folio_trylock(cpu, pfn):
            return 0
        slept = 0
        r, off = self.r, self.flags + pfn * 4
        cpu.set_waiting(2, 100_000 + pfn)
        r.fetch_add32(self.waiters + pfn * 4, 1)
        try:
            while not self.folio_trylock(cpu, pfn):
                f = r.load32(off)
                if f & PG_LOCKED:
                    self._check_owner(cpu, pfn)
                    cpu.check_stop()
                    slept += cpu.futex_sleep(r, off, f, SLEEP_SLICE_NS)
        finally:
            r.fetch_add32(self.waiters + pfn * 4, -1)
            cpu.set_waiting(0, 0)
        cpu.account_sleep(slept, "folio_lock")
        return slept

    def folio_unlock(self, cpu: CpuContext, pfn: int) -> None:
        r, off = self.r, self.flags + pfn * 4
        r.store32(self.owner + pfn * 4, 0)
        while True:
            f = r.load32(off)
            if r.cas32(off, f, f & ~PG_LOCKED):
                break
        r.fetch_add32(self.wake + pfn * 4, 1)
        if r.load32(self.waiters + pfn * 4):
            r.futex_wake(off, 1 << 30)  # folio_wake_bit(folio, PG_locked)
            r.futex_wake(self.wake + pfn * 4, 1 << 30)

    def folio_test_locked(self, pfn: int) -> bool:
        return bool(self.r.load32(self.flags + pfn * 4) & PG_LOCKED)

    def folio_wait_unlocked_prepare(self, pfn: int) -> int:
        """Queue as a waiter (folio_set_waiters) — call while still holding the PTL.  Returns
        the wake ticket that folio_wait_unlocked() waits to see change."""
        self.r.fetch_add32(self.waiters + pfn * 4, 1)
        return self.r.load32(self.wake + pfn * 4)

    def folio_wait_unlocked(self, cpu: CpuContext, pfn: int, ticket: int, kind: str = "migration") -> int:
        """Sleep until the folio is unlocked once after ``ticket`` (or is found unlocked), like
        migration_entry_wait_on_locked(): a waiter returns when woken, whatever happens to the
        folio afterwards (it may be freed and reused), and the fault is retried.  Returns ns."""
        r, woff = self.r, self.wake + pfn * 4
        slept = 0
        cpu.set_waiting(2, 100_000 + pfn)
        try:
            while r.load32(woff) == ticket and r.load32(self.flags + pfn * 4) & PG_LOCKED:
                self._check_owner(cpu, pfn)
                cpu.check_stop()
                slept += cpu.futex_sleep(r, woff, ticket, SLEEP_SLICE_NS)
        finally:
            r.fetch_add32(self.waiters + pfn * 4, -1)
            cpu.set_waiting(0, 0)
        cpu.account_sleep(slept, kind)
        return slept

    def _check_owner(self, cpu: CpuContext, pfn: int) -> None:
        o = self.r.load32(self.owner + pfn * 4) - 1
        if o >= 0 and not cpu.cpu_alive(o):
            raise OwnerDied(f"folio lock of pfn {pfn} is held by CPU {o}, whose process died")
