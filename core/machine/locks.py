"""Locks on shared words: spinlock, rwsem, per-VMA lock, folio lock.

One wait mechanism underneath (trio's ParkingLot idea, over shared memory): a spinner spins in
C and comes back to Python only to service an IPI or to check, every BUDGET_NS, that the owner
is alive and the run has not been stopped; a sleeper leaves mm_cpumask, drops its TLB and
sleeps on a futex word, with the same periodic checks.  Every lock knows its owner CPU and
counts its own contention; every CPU accounts the spin ns and sleep ns it spent and on what
(``CpuContext.spin_ns``/``sleep_ns``/``waited_on``), which is what the whole comparison is about.

A lock whose owner died raises OwnerDied in its waiters within BUDGET_NS-ish, naming the lock
and the dead CPU, instead of hanging.

One C call per lock operation.  Each class here subclasses a C base in _prims (SpinLockBase,
RwSemBase, FolioLocksBase, VmaLockBase) that runs the uncontended operation — and a contended
spin that wins without an interruption, with its accounting — in one call on the process
backend's Region, reading the CPU's fields from its C base (CpuBase).  Sleeps, interrupted spins
and wake-ups come back to the Python methods below; on any other region (the scheduled
backend's SchedRegion) every operation runs its ``_py_*`` method, the same word operations as
Region calls, so the deterministic backend's schedule space is unchanged (tests/test_fastpaths.py
holds the two to the same words).

Lost wake-ups.  Every sleep is bounded by a safety timeout (SLEEP_SLICE_NS) so that a CPU keeps
checking that the owner is alive; a sleep that ends by that timeout although what it waited for
was released — and the release had *finished* its wake-up step before the timeout could fire —
is a lost wake-up, recorded as a ``lost_wakeup`` violation instead of being hidden in the sleep
time.  The releaser publishes a "wake done" mark after its futex_wake (the release's sequence
number and the time, in units of 2**20 ns), so a waker that was merely slow — preempted between
its release and its futex_wake on a loaded host — is never flagged: its mark comes later than
the sleeper's timeout.  With a correct protocol a release that follows the sleeper's snapshot
either changes the futex word before the sleeper is queued (futex_wait returns at once) or wakes
it; a timeout after a completed wake therefore means the wake was skipped or went elsewhere.
The mutants ``mutant-rwsem-no-wake``, ``mutant-vma-no-wake`` and ``mutant-folio-unlock-no-wake``
delete the three wakes and are killed by this check (tests/test_mutants.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from ptlab.core.machine._prims import FolioLocksBase, Region, RwSemBase, SpinLockBase, VmaLockBase
from ptlab.core.machine.errors import OwnerDied
from ptlab.core.machine.layout import (
    MAX_CPUS,
    PG_LOCKED,
    VMA_LOCK_SEQ,
    VMA_READERS,
    VMA_WAKE_DONE,
    VMA_WAKE_T,
    VMA_WWAIT,
)

if TYPE_CHECKING:
    from ptlab.core.machine.cpu import CpuContext

BUDGET_NS = 20_000_000  # how long one C spin or one futex sleep lasts before re-checking
SLEEP_SLICE_NS = 20_000_000

# rwsem state word
RWSEM_READER_MASK = (1 << 32) - 1
RWSEM_WRITER = 1 << 32
RWSEM_WWAIT = 1 << 40
RWSEM_WAKE_DONE, RWSEM_WAKE_T = 20, 56  # u32 "wake done" seq and time of the last waking release

WAKE_T_SHIFT = 20  # wake-done times are now_ns() >> 20 (about 1 ms), 32-bit modular
LOST_WAKEUP_GRACE = 2  # in those units: a wake done this close to the timeout is not judged


def _mutant(cpu: CpuContext, name: str) -> bool:
    bugs = cpu.bugs
    return bool(bugs) and name in bugs


def wake_t(cpu: CpuContext) -> int:
    """The "wake done" time stamp of a release (32-bit, units of 2**20 ns), on the CPU's clock
    (the one its futex timeouts run on: wall clock, or the scheduled backend's virtual one)."""
    return (cpu.now() >> WAKE_T_SHIFT) & 0xFFFFFFFF


def _after(a: int, b: int) -> bool:
    """a is later than b in 32-bit modular arithmetic."""
    d = (a - b) & 0xFFFFFFFF
    return 0 < d < 0x80000000


def check_lost_wakeup(cpu: CpuContext, what: str, snapshot: int, done_seq: int, done_t: int, t_before: int, timeout_ns: int) -> bool:
    """After a futex sleep: if it timed out although a release that came after the sleeper's
    ``snapshot`` (its ``done_seq`` is later) had finished its wake step (``done_t``) before the
    timeout could fire (the sleep began no earlier than ``t_before``), record a lost wake-up.
    ``done_seq`` must be read before ``done_t`` (the releaser writes them the other way round),
    so a newer release can only make ``done_t`` later: the check errs towards silence."""
    if not getattr(cpu, "wait_timed_out", False) or not _after(done_seq, snapshot):
        return False
    deadline = ((t_before + timeout_ns) >> WAKE_T_SHIFT) & 0xFFFFFFFF
    if not _after(deadline, (done_t + LOST_WAKEUP_GRACE) & 0xFFFFFFFF):
        return False  # the waker was slow: its wake came (about) when the timeout fired
    cpu.violation("lost_wakeup", detail=f"CPU {cpu.id} slept {timeout_ns / 1e6:.0f} ms on {what} until its safety timeout, though the release after its snapshot had done its wake-up before that")
    return True


def held_locks(m: Any, cpu: CpuContext) -> list[str]:
    """Every lock that ``cpu`` holds now (spinlocks, the rwsems, folio locks).  Between two
    operations a CPU holds none: anything listed then is a lock leaked by a path that returned
    without releasing it."""
    tag = cpu.owner_tag
    out = []
    for lock in dict.fromkeys((m.page_table_lock, m.pmd_lock, m.zone_lock, *m._ptls)):
        if lock.r.load32(lock.off) == tag:
            out.append(lock.name)
    for sem in (m.mmap_lock, m.anon_vma):
        if sem.writer() == cpu.id:
            out.append(f"{sem.name} (write)")
        elif sem.r.load64(sem.off + 24) >> cpu.id & 1:
            out.append(f"{sem.name} (read)")
    owners = m.f["lock_owner"]
    for pfn in np.nonzero(owners == tag)[0][:4].tolist():
        out.append(f"folio lock of pfn {pfn}")
    return out


def locks_held(m: Any) -> list[str]:
    """Every lock held by anyone, for a quiescent point (every CPU between two operations, or
    done), where there must be none."""
    out = []
    for lock in dict.fromkeys((m.page_table_lock, m.pmd_lock, m.zone_lock, *m._ptls)):
        if lock.owner() >= 0:
            out.append(f"{lock.name} is held by CPU {lock.owner()}")
    for sem in (m.mmap_lock, m.anon_vma):
        if sem.r.load64(sem.off) & (RWSEM_READER_MASK | RWSEM_WRITER):
            out.append(f"{sem!r}")
    heads = m.f["head"] == np.arange(len(m.f["head"]))
    locked = np.nonzero(((m.f["flags"] & PG_LOCKED) != 0) & heads)[0]
    for pfn in locked[:4].tolist():
        out.append(f"folio lock of pfn {pfn} is held by CPU {int(m.f['lock_owner'][pfn]) - 1}")
    return out


def check_locks_released(m: Any, cpu: CpuContext, where: str) -> bool:
    """Record a ``lock_leak`` violation if ``cpu`` holds any lock at ``where`` (a point between
    two operations).  Returns True when it did."""
    held = held_locks(m, cpu)
    if held:
        cpu.violation("lock_leak", detail=f"CPU {cpu.id} ({cpu.role}) still holds {', '.join(held)} {where}")
    return bool(held)


class SpinLock(SpinLockBase):
    """Test-and-test-and-set spinlock on a 32-bit word (0 free, else owner CPU + 1).

    Layout (one 64-byte line): +0 word, +8 acquisitions, +16 contended, +24 spin_ns.
    Invariant: word != 0 iff some CPU is between spin_lock() and spin_unlock().

    ``SpinLock(region, off, name, kind, lock_id)``: ``name`` e.g. "ptl[3]", ``kind`` the
    waited_on class ("ptl", "pmd_lock", "zone").  ``lock``/``unlock``/``trylock`` are one C call
    each (_prims.SpinLockBase): on the process backend's Region the CAS, and a contended spin
    with its IPI check and accounting, run in C; an interrupted spin comes back to ``_slow``.
    On any other region (the scheduled backend's) they run ``_py_lock``/``_py_unlock``/
    ``_py_trylock`` below, the same steps as Region calls.
    """

    __slots__ = ()

    def _py_lock(self, cpu: CpuContext) -> int:
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

    def _py_trylock(self, cpu: CpuContext) -> bool:
        return self.r.spin_trylock(self.off, cpu.owner_tag)

    def _py_unlock(self, cpu: CpuContext) -> None:
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


class RwSem(RwSemBase):
    """Sleeping reader-writer semaphore (mmap_lock, anon_vma->rwsem), writer-fair like Linux:
    a waiting writer blocks new readers, so a stream of readers cannot starve it.

    ``RwSem(region, off, name, lock_id)``.  down_read/up_read/down_write/up_write and the
    trylocks are one C call each (_prims.RwSemBase) on the process backend's Region: the CAS,
    the readers mask or owner store, and up_*'s "wake?" decision; a sleep is ``_wait`` and a
    release with sleepers ``_wake_sleepers``, in Python.  On any other region they run the
    ``_py_*`` methods below, the same steps as Region calls.

    Layout: +0 state (readers in the low 32 bits | RWSEM_WRITER | waiting writers * 2**40),
    +8 seq (futex word, bumped on every release), +12 sleepers, +16 owner (writer CPU + 1),
    +20 wake-done seq, +24 readers mask (bit per CPU holding it for read), +32 sleep_ns,
    +40 contended, +56 wake-done time (the lost wake-up check, see the module header).
    Invariants: WRITER set implies readers == 0; owner != 0 iff WRITER set.
    """

    __slots__ = ()

    # -- read side --
    def _read_ok(self, s: int) -> bool:
        return not (s & RWSEM_WRITER) and (s >> 40) == 0

    def _py_down_read_trylock(self, cpu: CpuContext) -> bool:
        s = self.r.load64(self.off)
        if self._read_ok(s) and self.r.cas64(self.off, s, s + 1):
            if cpu.id < 63:  # the readers mask (for the lock dump) covers CPUs 0..62
                self.r.fetch_or64(self.off + 24, 1 << cpu.id)
            return True
        return False

    def _py_down_read(self, cpu: CpuContext) -> int:
        """Acquire for read; returns ns slept (0 when uncontended)."""
        if self._py_down_read_trylock(cpu):
            return 0
        return self._wait(cpu, False)

    def _py_up_read(self, cpu: CpuContext) -> None:
        if cpu.id < 63:
            self.r.fetch_and64(self.off + 24, ~(1 << cpu.id))
        old = self.r.fetch_add64(self.off, -1)
        if (old & RWSEM_READER_MASK) == 1:
            self._wake(cpu)

    # -- write side --
    def _py_down_write_trylock(self, cpu: CpuContext) -> bool:
        s = self.r.load64(self.off)
        if (s & (RWSEM_READER_MASK | RWSEM_WRITER)) == 0 and self.r.cas64(self.off, s, s | RWSEM_WRITER):
            self.r.store32(self.off + 16, cpu.owner_tag)
            return True
        return False

    def _py_down_write(self, cpu: CpuContext) -> int:
        if self._py_down_write_trylock(cpu):
            return 0
        return self._wait(cpu, True)

    def _py_up_write(self, cpu: CpuContext) -> None:
        self.r.store32(self.off + 16, 0)
        self.r.fetch_add64(self.off, -RWSEM_WRITER)
        self._wake(cpu)

    def _wake(self, cpu: CpuContext) -> None:
        """rwsem_wake(): bump the sequence (the sleepers' futex word) and wake the sleepers;
        then publish "wake done" for the lost wake-up check."""
        r, off = self.r, self.off
        seq = r.fetch_add32(off + 8, 1) + 1
        if r.load32(off + 12):
            self._wake_sleepers(cpu, seq)

    def _wake_sleepers(self, cpu: CpuContext, seq: int) -> None:
        """The sleepers' half of _wake() (C calls it too): futex_wake, then "wake done"."""
        r, off = self.r, self.off
        if not _mutant(cpu, "mutant-rwsem-no-wake"):
            r.futex_wake(off + 8, 1 << 30)
        r.store32(off + RWSEM_WAKE_T, wake_t(cpu))
        r.store32(off + RWSEM_WAKE_DONE, seq)

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
                    if cpu.id < 63:
                        r.fetch_or64(off + 24, 1 << cpu.id)
                    break
                else:
                    pass
                if (s & RWSEM_WRITER) or (s & RWSEM_READER_MASK):
                    self.check_owner(cpu)
                cpu.check_stop()
                r.fetch_add32(off + 12, 1)
                t_before = cpu.now()
                slept += cpu.futex_sleep(r, off + 8, seq, SLEEP_SLICE_NS)
                r.fetch_add32(off + 12, -1)
                done = r.load32(off + RWSEM_WAKE_DONE)
                check_lost_wakeup(cpu, self.name, seq, done, r.load32(off + RWSEM_WAKE_T), t_before, SLEEP_SLICE_NS)
        except BaseException:
            if registered:
                r.fetch_add64(off, -RWSEM_WWAIT)
                self._wake(cpu)
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
        return [i for i in range(min(MAX_CPUS, 63)) if mask >> i & 1]

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


class VmaLock(VmaLockBase):
    """Per-VMA lock with the kernel's semantics (mm/mmap_lock.c, include/linux/mmap_lock.h):

    - read (``vma_start_read``, used by ``lock_vma_under_rcu``) is a trylock that fails while the
      VMA is write-locked, i.e. while vma->vm_lock_seq == mm->mm_lock_seq;
    - write (``vma_start_write``) is taken only under mmap_lock held for write: it sets
      vm_lock_seq = mm_lock_seq and waits for the current readers to leave;
    - every VMA write lock ends at once when mmap_write_unlock bumps mm_lock_seq.

    ``VmaLock(region, vma_off, mm_lock_seq_off, name, lock_id)``.  vma_start_read/vma_end_read
    are one C call each (_prims.VmaLockBase) on the process backend's Region; the last reader's
    wake of a waiting writer is ``_wake_writer``, in Python.  On any other region they run the
    ``_py_*`` methods below, the same steps as Region calls.
    """

    __slots__ = ()

    def write_locked(self) -> bool:
        return self.r.load64(self.off + VMA_LOCK_SEQ) == self.r.load64(self.seq_off)

    def _py_vma_start_read(self, cpu: CpuContext) -> bool:
        r = self.r
        if self.write_locked():
            return False
        r.fetch_add32(self.off + VMA_READERS, 1)
        # re-check after publishing ourselves: pairs with vma_start_write's xchg then readers read
        if self.write_locked():
            self.vma_end_read(cpu)
            return False
        return True

    def _py_vma_end_read(self, cpu: CpuContext) -> None:
        r = self.r
        if r.fetch_add32(self.off + VMA_READERS, -1) == 1 and r.load32(self.off + VMA_WWAIT):
            self._wake_writer(cpu)

    def _wake_writer(self, cpu: CpuContext) -> None:
        """The last reader wakes vma_start_write()'s sleeper, then publishes "wake done"."""
        r = self.r
        if not _mutant(cpu, "mutant-vma-no-wake"):
            r.futex_wake(self.off + VMA_READERS, 1 << 30)
        r.store32(self.off + VMA_WAKE_T, wake_t(cpu))  # "wake done" for the lost wake-up check
        r.fetch_add32(self.off + VMA_WAKE_DONE, 1)

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
                done0 = r.load32(self.off + VMA_WAKE_DONE)  # before the readers count
                n = r.load32(self.off + VMA_READERS)
                if n == 0:
                    break
                cpu.check_stop()
                t_before = cpu.now()
                slept += cpu.futex_sleep(r, self.off + VMA_READERS, n, SLEEP_SLICE_NS)
                done = r.load32(self.off + VMA_WAKE_DONE)
                check_lost_wakeup(cpu, self.name, done0, done, r.load32(self.off + VMA_WAKE_T), t_before, SLEEP_SLICE_NS)
        finally:
            r.store32(self.off + VMA_WWAIT, 0)
            cpu.set_waiting(0, 0)
        cpu.account_sleep(slept, "vma_lock")
        return slept


class FolioLocks(FolioLocksBase):
    """PG_locked on every folio, in the folio segment's parallel arrays (flags is the futex word).

    ``folio_lock`` sleeps, ``folio_trylock`` does not, ``folio_unlock`` wakes every waiter, and
    ``folio_wait_unlocked`` sleeps until PG_locked clears without taking it — the basis of
    ``migration_entry_wait_on_locked`` (mm/filemap.c), which registers as a waiter *before* the
    PTL is dropped so the unlock cannot be missed.

    ``FolioLocks(region, flags_base, owner_base, waiters_base, wake_base, wake_done_base,
    wake_t_base)``: offsets of the per-frame arrays; ``wake`` is bumped by every folio_unlock()
    (the WQ_FLAG_WOKEN of a waiter), ``wake_done``/``wake_t`` are the lost wake-up check's
    per-folio "wake done" seq and time.  folio_trylock/folio_lock/folio_unlock are one C call
    each (_prims.FolioLocksBase) on the process backend's Region, and so are
    ``folio_trylock_many``/``folio_unlock_many`` for a batch (a collapse's old folios); a sleep is
    ``_folio_lock_slow`` and an unlock with waiters ``_wake_waiters``, in Python.  On any other
    region they run the ``_py_*`` methods below, the same steps as Region calls.
    """

    __slots__ = ()

    def __init__(self, region: Region, flags_base: int, owner_base: int, waiters_base: int, wake_base: int, wake_done_base: int, wake_t_base: int) -> None:
        super().__init__(region, flags_base, owner_base, waiters_base, wake_base, wake_done_base, wake_t_base, PG_LOCKED)

    def _py_folio_trylock(self, cpu: CpuContext, pfn: int) -> bool:
        r, off = self.r, self.flags + pfn * 4
        while True:
            f = r.load32(off)
            if f & PG_LOCKED:
                return False
            if r.cas32(off, f, f | PG_LOCKED):
                r.store32(self.owner + pfn * 4, cpu.owner_tag)
                return True

    def _py_folio_lock(self, cpu: CpuContext, pfn: int) -> int:
        if self._py_folio_trylock(cpu, pfn):
            return 0
        return self._folio_lock_slow(cpu, pfn)

    def _folio_lock_slow(self, cpu: CpuContext, pfn: int) -> int:
        slept = 0
        r, off = self.r, self.flags + pfn * 4
        cpu.set_waiting(2, 100_000 + pfn)
        r.fetch_add32(self.waiters + pfn * 4, 1)
        try:
            while not self.folio_trylock(cpu, pfn):  # one C call on the process backend
                ticket = r.load32(self.wake + pfn * 4)  # before the flags we sleep on
                f = r.load32(off)
                if f & PG_LOCKED:
                    self._check_owner(cpu, pfn)
                    cpu.check_stop()
                    t_before = cpu.now()
                    slept += cpu.futex_sleep(r, off, f, SLEEP_SLICE_NS)
                    self._check_lost(cpu, pfn, ticket, t_before)
        finally:
            r.fetch_add32(self.waiters + pfn * 4, -1)
            cpu.set_waiting(0, 0)
        cpu.account_sleep(slept, "folio_lock")
        return slept

    def _py_folio_unlock(self, cpu: CpuContext, pfn: int) -> None:
        r, off = self.r, self.flags + pfn * 4
        r.store32(self.owner + pfn * 4, 0)
        while True:
            f = r.load32(off)
            if r.cas32(off, f, f & ~PG_LOCKED):
                break
        seq = r.fetch_add32(self.wake + pfn * 4, 1) + 1
        if r.load32(self.waiters + pfn * 4):
            self._wake_waiters(cpu, pfn, seq)

    def _py_folio_trylock_many(self, cpu: CpuContext, pfns: list[int]) -> int:
        """folio_trylock_many() off the process backend: folio_trylock() of each in turn, up to
        the first that fails; returns how many were taken."""
        for k, pfn in enumerate(pfns):
            if not self.folio_trylock(cpu, pfn):
                return k
        return len(pfns)

    def _py_folio_unlock_many(self, cpu: CpuContext, pfns: list[int]) -> None:
        for pfn in pfns:
            self.folio_unlock(cpu, pfn)

    def _wake_waiters(self, cpu: CpuContext, pfn: int, seq: int) -> None:
        """folio_wake_bit(folio, PG_locked), then "wake done" for the lost wake-up check."""
        r, off = self.r, self.flags + pfn * 4
        if not _mutant(cpu, "mutant-folio-unlock-no-wake"):
            r.futex_wake(off, 1 << 30)
            r.futex_wake(self.wake + pfn * 4, 1 << 30)
        r.store32(self.wake_t + pfn * 4, wake_t(cpu))
        r.store32(self.wake_done + pfn * 4, seq)

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
                t_before = cpu.now()
                slept += cpu.futex_sleep(r, woff, ticket, SLEEP_SLICE_NS)
                self._check_lost(cpu, pfn, ticket, t_before)
        finally:
            r.fetch_add32(self.waiters + pfn * 4, -1)
            cpu.set_waiting(0, 0)
        cpu.account_sleep(slept, kind)
        return slept

    def _check_lost(self, cpu: CpuContext, pfn: int, ticket: int, t_before: int) -> None:
        r = self.r
        done = r.load32(self.wake_done + pfn * 4)
        check_lost_wakeup(cpu, f"the folio lock of pfn {pfn}", ticket, done, r.load32(self.wake_t + pfn * 4), t_before, SLEEP_SLICE_NS)

    def _check_owner(self, cpu: CpuContext, pfn: int) -> None:
        o = self.r.load32(self.owner + pfn * 4) - 1
        if o >= 0 and not cpu.cpu_alive(o):
            raise OwnerDied(f"folio lock of pfn {pfn} is held by CPU {o}, whose process died")
