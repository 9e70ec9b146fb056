"""What each simulated CPU does in its own process: wait at the gate, run its role until the
run's end, and hand back its events, violations and counters.

Roles (DESIGN.md): app (loads/stores by a workload pattern, faulting as needed, and now and then
an MADV_DONTNEED of a few pages, as an allocator returning memory does — so holes keep appearing
and collapse work never runs out), gup-fast and gup-slow (pin a page, write through the pin like a
DMA engine for ``pin_hold_us``, unpin, then check the DMA write is visible through the page table),
mmap (mmap()/mprotect()/munmap() churn on small VMAs of the same mm), zap (MADV_DONTNEED of random
ranges), khugepaged (scan, collapse with the run's strategy, record the result and phase times),
and requirement c)'s walkers (core/kernel/walkers.py): rmap-walk (folio_referenced / migration of the
collapsing VMA's folios), pt-walk (smaps, MADV_COLD / MADV_PAGEOUT), vma-change (mprotect() and
mmap(MAP_FIXED) over sub-ranges of the collapsing VMA).
"""

from __future__ import annotations

import os
import random
from typing import Any

from ptlab.core.kernel import strategies
from ptlab.core.kernel.khugepaged import PHASES, collapse_range, scan_pmd
from ptlab.core.kernel.paths import (
    DMA_WORD,
    FIRST_CHURN_SLOT,
    Oracle,
    access_load,
    access_store,
    churn_slot_range,
    do_mmap,
    do_mprotect,
    do_munmap,
    gup_fast,
    gup_slow,
    translate,
    zap_range,
)
from ptlab.core.kernel.walkers import (
    MADV_PAGES,
    change_protection,
    madvise_cold_or_pageout,
    migrate_folio,
    mmap_fixed_over,
    shrink_active_folio,
    smaps_walk,
)
from ptlab.core.machine.config import PTRS_PER_PTE, RunConfig
from ptlab.core.machine.config import Role as RoleName
from ptlab.core.machine.cpu import CpuContext, Stopped
from ptlab.core.machine.errors import OwnerDied
from ptlab.core.machine.events import OP, RESULT, pack
from ptlab.core.machine.layout import (
    COLLAPSE_PHASE,
    COLLAPSE_START,
    COLLAPSING,
    CPU_STATE,
    GATE,
    PARKED,
    POISON_FREE,
    QUIESCE,
    READY,
    ST_DONE,
    STOP,
    STOP_FAILED,
    STOP_VIOLATION,
    STOP_WATCHDOG,
    T0,
    pmd_trans_huge,
)
from ptlab.core.machine.locks import check_locks_released
from ptlab.core.machine.mm import VMA_COLLAPSE, VMA_OTHER, Machine
from ptlab.workloads.patterns import make_pattern

FREE_RATE = 0.002  # app: probability per access of an MADV_DONTNEED of zap_pages pages
OTHER_VMA_RATE = 0.1  # app: share of accesses that go to the other VMA
WRITE_RATE = 0.5
IDLE_NS = 1_000_000  # khugepaged between passes with nothing to do; zap between zaps
TARGET_POLL_NS = 20_000  # a GUP CPU with stress_target=collapse, between looks for a collapse
# A targeted pin is held at least pin_hold_us and until the collapse it was aimed at is over
# (at most this long): a missing reference check shows only if the pin outlives the copy, and
# on a loaded host the collapse's flush alone can wait milliseconds for its targets to run.
# Holding exactly that long instead of a fixed worst case lets the GUP CPU aim at many more
# collapses per second.
TARGET_HOLD_MAX_NS = 100_000_000
# A targeted GUP-slow walk that has read a PTE of the range being collapsed lingers before its
# grab, half the time, until that collapse has checked references (at most this long), as a
# vCPU preempted by its host mid-walk would: under the PTL this holds the collapse off (bounded),
# without it the grab comes after the reference check.  A chaos delay alone cannot span the
# collapse's flush, which waits milliseconds for its targets on a loaded 2-core host.
LINGER_MAX_NS = 20_000_000
REFCHECK_PHASE = PHASES.index("refcheck") + 1  # as published in COLLAPSE_PHASE
COPY_PHASE = PHASES.index("copy") + 1
MMAP_GAP_NS = 200_000  # mmap role: between mmap/mprotect/munmap cycles



def run_cpu(prefix: str, config: RunConfig, cpu_id: int, role: str, seed: int, pin_core: int | None) -> dict[str, Any]:
    """Attach to the machine, run one CPU to the end of the run, return what it recorded."""
    if pin_core is not None:
        try:
            os.sched_setaffinity(0, {pin_core})
        except OSError:
            pass
    m = Machine.attach(config, prefix)
    duration_ns = int((config.warmup_s + config.duration_s) * 1e9)
    capacity = int((config.warmup_s + config.duration_s) * 60_000) + 20_000
    cpu = CpuContext(m, cpu_id, role, config, capacity=capacity, seed=seed)
    error = ""
    try:
        cpu.register()
        m.ctl.fetch_add32(READY, 1)
        while m.ctl.load32(GATE) == 0:
            if m.ctl.load32(STOP):
                raise Stopped()
            cpu.futex_sleep(m.ctl, GATE, 0, 50_000_000)
        cpu.join_cpumask()
        end = m.ctl.load64(T0) + duration_ns
        runner = ROLES[role](cpu, random.Random(seed * 1000 + cpu_id))
        try:
            ctl = m.ctl
            while cpu.now() < end and not ctl.load32(STOP):
                runner.step()
                cpu.interrupt_point()
                if ctl.load32(QUIESCE):
                    park(cpu)
        finally:
            runner.finish()
    except Stopped:
        pass
    except OwnerDied as e:
        error = str(e)
        m.ctl.cas32(STOP, 0, STOP_FAILED)
    except Exception as e:
        # the machine reached a state no kernel path expects: the run cannot complete, and it
        # is a failed run (exit 3), never a catch — the cell raises RunFailed with this line
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        detail = f"{type(e).__name__}: {e} at {os.path.basename(where.filename)}:{where.lineno} ({where.name})"
        cpu.violation("cpu_exception", detail=detail)
        error = f"simulated CPU {cpu_id} ({role}) raised {detail}"
        m.ctl.cas32(STOP, 0, STOP_FAILED)
    finally:
        m.ctl.store32(cpu.base + CPU_STATE, ST_DONE)
        cpu.leave_cpumask()
    rows, crows = cpu.rec.export()
    import resource

    out = {
        "cpu": cpu_id,
        "role": role,
        "rows": rows,
        "crows": crows,
        "violations": cpu.violations,
        "stats": {
            **cpu.stats,
            "dropped_events": cpu.rec.dropped,
            "spin_ns": cpu.spin_ns,
            "sleep_ns": cpu.sleep_ns,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        },
        "error": error,
        "pid": os.getpid(),
    }
    cpu.rec.close()
    m.close()
    return out


def assign_roles(config: RunConfig) -> list[str]:
    """CPU id -> role, in the order roles are declared, khugepaged last (so CPU 0 is an app CPU
    when there is one)."""
    order = [r.value for r in RoleName if r.value != "khugepaged"] + ["khugepaged"]
    return [role for role in order for _ in range(config.cpus.get(role, 0))]


def no_lock_held(cpu: CpuContext, where: str) -> None:
    """Between two operations a CPU holds no lock.  A leaked one is recorded (``lock_leak``)
    and ends the run at once (STOP_VIOLATION): every other CPU would soon wait on it for ever,
    turning a found bug into a watchdog stall, which is a failed run, not a catch."""
    if check_locks_released(cpu.m, cpu, where):
        cpu.ctl.cas32(STOP, 0, STOP_VIOLATION)
        raise Stopped()


def park(cpu: CpuContext) -> None:
    """A quiescent point: between two operations this CPU holds no lock, no pin and no
    half-changed entry, so the driver can check the machine's invariants while all are parked."""
    no_lock_held(cpu, "at a quiescent point")
    ctl = cpu.ctl
    ctl.fetch_add32(PARKED, 1)
    try:
        while ctl.load32(QUIESCE) and not ctl.load32(STOP):
            cpu.futex_sleep(ctl, QUIESCE, 1, 50_000_000)
    finally:
        ctl.fetch_add32(PARKED, -1)


class Role:
    def __init__(self, cpu: CpuContext, rng: random.Random) -> None:
        self.cpu = cpu
        self.m: Machine = cpu.m
        self.rng = rng
        self.config = cpu.config
        self.oracle = Oracle()
        v0 = self.m.vma_range(VMA_COLLAPSE)
        v1 = self.m.vma_range(VMA_OTHER)
        self.vma0 = (v0[0], v0[1] - v0[0])
        self.vma1 = (v1[0], v1[1] - v1[0])
        self.pick0 = make_pattern(self.config.workload, self.vma0[1], rng, self.config.seed)

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def idle(self, ns: int) -> None:
        """Go idle for ns (leaves mm_cpumask like a CPU entering the idle loop)."""
        self.cpu.idle(ns)

    def zap(self, vma: int = VMA_COLLAPSE) -> None:
        cpu, cfg = self.cpu, self.config
        n = cfg.zap_pages
        if vma == VMA_COLLAPSE:
            start = self.vma0[0] + (self.pick0() // n) * n
        else:
            start = self.vma1[0] + (self.rng.randrange(self.vma1[1]) // n) * n
        begin = cpu.op_begin()
        zap_range(cpu, start, n)
        cpu.op_end(begin, "zap", "ok", start, vma=vma)


class App(Role):
    """Loads and stores by the run's workload pattern, through the TLB, faulting as needed."""

    def __init__(self, cpu: CpuContext, rng: random.Random) -> None:
        super().__init__(cpu, rng)
        self.pick1 = make_pattern(self.config.workload, self.vma1[1], rng, self.config.seed + 1)
        self.n = 0
        self.others = [c for c in range(self.config.nr_cpus) if c != cpu.id]
        self.sample = cpu.sample
        self.think = self.config.think_ns
        self.refault = self.config.workload == "refault"
        self.codes = {v: pack(OP["access"], cpu.role_code, 0, RESULT["ok"], v, 0, False) for v in (VMA_COLLAPSE, VMA_OTHER)}

    def step(self) -> None:
        cpu, rng = self.cpu, self.rng
        if self.refault:
            self.refault_step()
            return
        r = rng.random()
        if r < FREE_RATE:  # free memory where the accesses go: both VMAs get holes to refault
            self.zap(VMA_OTHER if rng.random() < OTHER_VMA_RATE else VMA_COLLAPSE)
            return
        if r < OTHER_VMA_RATE:
            vma, vpn = VMA_OTHER, self.vma1[0] + self.pick1()
        else:
            vma, vpn = VMA_COLLAPSE, self.vma0[0] + self.pick0()
        self.n += 1
        record = self.n % self.sample == 0
        if record:
            cpu.wait_kind = ""
            t0, s0, z0 = cpu.now(), cpu.spin_ns, cpu.sleep_ns
        if rng.random() < WRITE_RATE or not self.others:
            access_store(cpu, self.oracle, vpn)
        else:
            access_load(cpu, self.oracle, vpn, self.others[self.n % len(self.others)])
        if record:
            cpu.record_access(t0, s0, z0, vpn, self.codes[vma])
        if self.think:
            cpu.delay(self.think)  # the application's own work between two accesses
        if self.n & 63 == 0:
            cpu.progress()


    def refault_step(self) -> None:
        """`ptlab kernel`'s fault thread: MADV_DONTNEED a random run of zap_pages pages of this
        CPU's VMA (even CPUs the collapsing one, odd the other), then write each back in."""
        cpu = self.cpu
        vma, (base, n) = (VMA_OTHER, self.vma1) if cpu.id % 2 else (VMA_COLLAPSE, self.vma0)
        z = min(self.config.zap_pages, n)
        start = base + (self.rng.randrange(n) // z) * z
        begin = cpu.op_begin()
        zap_range(cpu, start, z)
        cpu.op_end(begin, "zap", "ok", start, vma=vma)
        for vpn in range(start, start + z):
            access_store(cpu, self.oracle, vpn)
            if self.think:
                cpu.delay(self.think)
        cpu.progress()


class Gup(Role):
    """Pins a page (GUP-fast with fallback, or GUP-slow), writes through the pin like a DMA
    engine for pin_hold_us, unpins, then checks the last DMA value through the page table."""

    fast = True

    def __init__(self, cpu: CpuContext, rng: random.Random) -> None:
        super().__init__(cpu, rng)
        self.word = DMA_WORD + cpu.id
        self.held: int = -1
        self.targeted = self.config.stress_target == "collapse"
        if self.targeted and not self.fast:
            cpu.hooks["gup_slow_after_pte_read"] = self._linger

    def _linger(self) -> None:
        cpu, ctl = self.cpu, self.m.ctl
        start = ctl.load64(COLLAPSE_START) - 1
        if start < 0 or self.rng.random() < 0.5:
            return
        until = cpu.now() + LINGER_MAX_NS
        while ctl.load32(COLLAPSE_PHASE) < COPY_PHASE and ctl.load64(COLLAPSE_START) - 1 == start and cpu.now() < until:
            cpu.delay(2_000)

    def step(self) -> None:
        cpu, m = self.cpu, self.m
        vpn = self.vma0[0] + self.pick0()
        start = -1
        if self.targeted:  # stress for `ptlab check`: pin a page of the range being collapsed
            start = m.ctl.load64(COLLAPSE_START) - 1
            if start < 0:
                self.idle(TARGET_POLL_NS)  # no collapse in flight: wait for one
                return
            vpn = start + self.rng.randrange(1 << self.config.order)
            if self.rng.random() < 0.5:  # half the pins wait for the reference check to begin
                ctl = m.ctl
                while ctl.load32(COLLAPSE_PHASE) != REFCHECK_PHASE and ctl.load64(COLLAPSE_START) - 1 == start:
                    cpu.delay(2_000)
        epoch = m.epoch(vpn)  # before the pin: a zap after it unmaps the pinned page legitimately
        head = pfn = -1
        if self.fast:
            begin = cpu.op_begin()
            head, pfn = gup_fast(cpu, vpn)
            cpu.op_end(begin, "gup_fast", "ok" if head >= 0 else "fallback", vpn, vma=VMA_COLLAPSE)
        if head < 0:
            begin = cpu.op_begin()
            head, pfn = gup_slow(cpu, vpn)
            cpu.op_end(begin, "gup_slow", "ok" if head >= 0 else "fail", vpn, vma=VMA_COLLAPSE)
        if head < 0:
            return
        self.held = head
        begin = cpu.op_begin()
        off = m.page_word_off(pfn, self.word)
        last = self.oracle.dma.get(vpn)
        v = m.frames.load64(off)
        if v == POISON_FREE:
            cpu.violation("use_after_free", page=vpn, detail=f"CPU {cpu.id} pinned page {vpn} (pfn {pfn}) and found the free poison")
        elif last is not None and v != last[0] and not (v == 0 and (m.epoch(vpn) != last[1] or last[1] & 1)):
            cpu.violation("lost_dma_write", page=vpn, detail=f"DMA word of CPU {cpu.id} on page {vpn} holds {v:#x}, expected {last[0]:#x}")
        t_pin = cpu.now()
        hold_until = t_pin + self.config.pin_hold_us * 1000
        while True:  # the device writes through the pinned page, not through the page table
            self.oracle.seq += 1
            v = vpn << 32 | (self.oracle.seq & 0xFFFFFFFF)
            m.frames.store64(off, v)
            t = cpu.now()
            if t >= hold_until and (start < 0 or m.ctl.load64(COLLAPSE_START) - 1 != start or t - t_pin >= TARGET_HOLD_MAX_NS):
                break
            cpu.io_wait(20_000)  # the device's next write: the pinning thread waits for the I/O
        self.held = -1
        m.unpin_folio(cpu, head)
        self.oracle.dma[vpn] = (v, epoch)
        cpu.op_end(begin, "dma", "ok", vpn, vma=VMA_COLLAPSE)
        # after unpin the device's last write must be visible through the page table
        epoch2 = m.epoch(vpn)
        pfn2 = translate(cpu, vpn, False)
        if pfn2 >= 0:
            seen = m.frames.load64(m.page_word_off(pfn2, self.word))
            if cpu.broadcast:
                cpu.access_end()
            if seen != v and m.epoch(vpn) == epoch:
                cpu.violation("lost_dma_write", page=vpn, detail=f"DMA write {v:#x} by CPU {cpu.id} not visible after unpin (found {seen:#x} in pfn {pfn2}, pinned pfn {pfn})")
            self.oracle.dma[vpn] = (seen, epoch2)

    def finish(self) -> None:
        if self.held >= 0:
            self.m.unpin_folio(self.cpu, self.held)
            self.held = -1


class GupSlow(Gup):
    fast = False


class Mmap(Role):
    """mmap() a small anon VMA, touch it, mprotect() it, munmap() it — on other VMAs of the mm."""

    def __init__(self, cpu: CpuContext, rng: random.Random) -> None:
        super().__init__(cpu, rng)
        self.slot = FIRST_CHURN_SLOT + cpu.id % (16 - FIRST_CHURN_SLOT)

    def step(self) -> None:
        cpu, m = self.cpu, self.m
        begin = cpu.op_begin()
        do_mmap(cpu, self.slot)
        cpu.op_end(begin, "mmap", "ok", -1)
        start, _ = churn_slot_range(m, self.slot)
        for k in range(4):
            if translate(cpu, start + k, True) >= 0 and cpu.broadcast:
                cpu.access_end()
        begin = cpu.op_begin()
        do_mprotect(cpu, self.slot)
        cpu.op_end(begin, "mprotect", "ok", start)
        begin = cpu.op_begin()
        do_munmap(cpu, self.slot)
        cpu.op_end(begin, "munmap", "ok", start)
        self.idle(MMAP_GAP_NS)  # a process maps memory now and then, not in a tight loop


class Zap(Role):
    """MADV_DONTNEED of a few pages of the collapsing VMA; where it lands on a PMD-mapped THP it
    frees the whole 2 MiB (zap_huge_pmd), which frees the PTE table deposited behind it."""

    def step(self) -> None:
        m, cpu = self.m, self.cpu
        vpn = self.vma0[0] + self.pick0()
        if self.config.stress_target == "collapse":  # stress for `ptlab check`: zap mid-collapse
            start = m.ctl.load64(COLLAPSE_START) - 1
            if start < 0:
                self.idle(TARGET_POLL_NS)  # no collapse in flight: wait for one
                return
            vpn = start + self.rng.randrange(1 << self.config.order)
            # half the zaps come when the references are checked (the entries still present),
            # half when the copy runs (the entries cleared or migration entries)
            phase = REFCHECK_PHASE if self.rng.random() < 0.5 else COPY_PHASE
            ctl = m.ctl
            while ctl.load32(COLLAPSE_PHASE) != phase and ctl.load64(COLLAPSE_START) - 1 == start:
                cpu.delay(2_000)
        if pmd_trans_huge(m.pmdp_get(vpn >> 9)):
            begin = cpu.op_begin()
            start = vpn & ~(PTRS_PER_PTE - 1)
            zap_range(cpu, start, PTRS_PER_PTE)
            cpu.op_end(begin, "zap", "ok", start, vma=VMA_COLLAPSE)
        elif self.config.stress_target == "collapse":
            n = self.config.zap_pages
            begin = cpu.op_begin()
            zap_range(cpu, vpn // n * n, n)
            cpu.op_end(begin, "zap", "ok", vpn // n * n, vma=VMA_COLLAPSE)
        else:
            self.zap()
        self.idle(IDLE_NS)


class Khugepaged(Role):
    """khugepaged_scan_mm_slot(): mmap_read_trylock, walk the VMA in order-sized steps,
    hpage_collapse_scan_pmd() each, collapse_huge_page() (the strategy) where the scan passes."""

    def __init__(self, cpu: CpuContext, rng: random.Random) -> None:
        super().__init__(cpu, rng)
        self.order = self.config.order
        self.strategy = strategies.get(self.config.strategy, cpu.bugs)
        n = 1 << self.order
        self.ranges = list(range(self.vma0[0], self.vma0[0] + self.vma0[1], n))
        self.cursor = rng.randrange(len(self.ranges))
        self.idle_pass = 0

    def step(self) -> None:
        if self.config.collapse_context == "madvise":
            self.madvise_collapse_step()
            self.idle(MADV_COLLAPSE_GAP_NS)
            return
        cpu, m = self.cpu, self.m
        if "test-cpu-exception" in cpu.bugs:
            raise RuntimeError("test-cpu-exception: a kernel path reached a state it cannot handle")
        start = self.ranges[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.ranges)
        if self.cursor == 0:
            if self.idle_pass == len(self.ranges):
                self.idle(IDLE_NS)  # a whole pass found nothing to do
            self.idle_pass = 0
        begin = cpu.op_begin()
        # "Don't wait for semaphore (to avoid long wait times). Just move to the next mm"
        if not m.mmap_lock.down_read_trylock(cpu):
            cpu.op_end(begin, "scan", "SCAN_ANY_PROCESS", start, vma=VMA_COLLAPSE, order=self.order)
            self.idle(IDLE_NS // 10)
            return
        try:
            result = scan_pmd(cpu, start, self.order)
        finally:
            m.mmap_lock.up_read(cpu)  # collapse_huge_page() drops it before allocating
        if result != "SCAN_SUCCEED":
            self.idle_pass += 1
            if result not in ("SCAN_PMD_MAPPED", "SCAN_PTE_MAPPED_HUGEPAGE"):
                cpu.op_end(begin, "scan", result, start, vma=VMA_COLLAPSE, order=self.order)
            return
        begin = cpu.op_begin()
        result, phases = collapse_range(cpu, self.strategy, start, self.order)
        cpu.record_collapse(begin, result, start, self.order, [phases[p] for p in PHASES])
        no_lock_held(cpu, f"after a collapse ({result})")


    def madvise_collapse_step(self) -> int:
        """madvise(MADV_COLLAPSE) of one 2 MiB range, as `ptlab kernel`'s collapser calls it:
        madvise() takes mmap_lock for read (waiting for it), madvise_collapse() drains the
        per-CPU LRU batches (lru_add_drain_all()) and scans, collapse_huge_page() collapses;
        then the range is split again (MADV_DONTNEED of one page, touched back in) so the next
        pass has work.  The whole call is the collapse event and the "during a collapse"
        window, as in the kernel probe."""
        cpu, m = self.cpu, self.m
        start = self.ranges[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.ranges)
        begin = cpu.op_begin()
        cpu.ctl.fetch_add32(COLLAPSING, 1)
        phases = dict.fromkeys(PHASES, 0)
        try:
            m.mmap_lock.down_read(cpu)  # madvise(): MADV_COLLAPSE holds mmap_lock for read
            try:
                cpu.charge("lru_drain")  # lru_add_drain_all(), under mmap_read_lock
                result = scan_pmd(cpu, start, self.order)
            finally:
                m.mmap_lock.up_read(cpu)  # collapse_huge_page() drops it before allocating
            if result == "SCAN_SUCCEED":
                result, phases = collapse_range(cpu, self.strategy, start, self.order)
        finally:
            cpu.ctl.fetch_add32(COLLAPSING, -1)
        latency = cpu.now() - begin[0]
        cpu.record_collapse(begin, result, start, self.order, [phases[p] for p in PHASES])
        page = start + self.rng.randrange(1 << self.order)
        zap_range(cpu, page, 1)  # splits the PMD (split_huge_pmd), leaves a hole
        access_store(cpu, self.oracle, page)  # and touches it back in
        return latency


MADV_COLLAPSE_GAP_NS = 200_000  # after each MADV_COLLAPSE, as `ptlab kernel --gap-us` by default
WALK_GAP_NS = 100_000  # rmap-walk, pt-walk: between two walks (background scanners, not tight loops)
VMA_CHANGE_GAP_NS = 500_000  # vma-change: between two mprotect()/munmap() calls


class RmapWalk(Role):
    """Requirement c)'s rmap walker (core/kernel/walkers.py), a kernel thread like kswapd/kcompactd:
    each step takes a folio of the collapsing VMA off the LRU and either ages it
    (shrink_active_list() -> folio_referenced()) or migrates it (migrate_pages(), MIGRATE_ASYNC)."""

    def step(self) -> None:
        cpu = self.cpu
        vpn = self.vma0[0] + self.pick0()
        migrate = self.rng.random() < 0.5
        during = cpu.collapsing()
        begin = cpu.op_begin()
        if migrate:
            cpu.op_end(begin, "migrate", migrate_folio(cpu, vpn), vpn, vma=VMA_COLLAPSE, during=during)
        else:
            cpu.op_end(begin, "folio_referenced", shrink_active_folio(cpu, vpn), vpn, vma=VMA_COLLAPSE, during=during)
        self.idle(WALK_GAP_NS)


class PtWalk(Role):
    """Requirement c)'s page-table walker (core/kernel/walkers.py), another process: reads
    /proc/pid/smaps of the whole collapsing VMA, or madvise(MADV_COLD / MADV_PAGEOUT)s a range
    of it (process_madvise())."""

    def step(self) -> None:
        cpu = self.cpu
        r = self.rng.random()
        during = cpu.collapsing()
        begin = cpu.op_begin()
        if r < 1 / 3:
            start, n = self.vma0
            smaps_walk(cpu, start, start + n)
            cpu.op_end(begin, "smaps", "ok", start, vma=VMA_COLLAPSE, during=during)
        else:
            start = self.vma0[0] + (self.pick0() // MADV_PAGES) * MADV_PAGES
            pageout = r >= 2 / 3
            madvise_cold_or_pageout(cpu, start, MADV_PAGES, pageout)
            cpu.op_end(begin, "madv_pageout" if pageout else "madv_cold", "ok", start, vma=VMA_COLLAPSE, during=during)
        self.idle(WALK_GAP_NS)


class VmaChange(Role):
    """Requirement c)'s VMA changes (core/kernel/walkers.py), a thread of the process: mprotect() of a
    sub-range of the collapsing VMA read-only and, next step, back to read-write; or
    mmap(MAP_FIXED) over a sub-range (recorded as munmap: its unmap is what meets a collapse).
    mremap() is not modelled (see core/kernel/walkers.py)."""

    def __init__(self, cpu: CpuContext, rng: random.Random) -> None:
        super().__init__(cpu, rng)
        self.read_only = -1  # start of the range left read-only by the last step, or -1

    def step(self) -> None:
        cpu = self.cpu
        during = cpu.collapsing()
        n = 1 << min(self.config.order, 6)
        begin = cpu.op_begin()
        if self.read_only >= 0:
            start, self.read_only = self.read_only, -1
            cpu.op_end(begin, "mprotect", change_protection(cpu, start, n, writable=True), start, vma=VMA_COLLAPSE, during=during)
        elif self.rng.random() < 0.5:
            start = self.vma0[0] + (self.pick0() // n) * n
            self.read_only = start
            cpu.op_end(begin, "mprotect", change_protection(cpu, start, n, writable=False), start, vma=VMA_COLLAPSE, during=during)
        else:
            z = self.config.zap_pages
            start = self.vma0[0] + (self.pick0() // z) * z
            mmap_fixed_over(cpu, start, z)
            cpu.op_end(begin, "munmap", "ok", start, vma=VMA_COLLAPSE, during=during)
        self.idle(VMA_CHANGE_GAP_NS)


ROLES: dict[str, type[Role]] = {
    "app": App,
    "gup-fast": Gup,
    "gup-slow": GupSlow,
    "mmap": Mmap,
    "zap": Zap,
    "khugepaged": Khugepaged,
    "rmap-walk": RmapWalk,
    "pt-walk": PtWalk,
    "vma-change": VmaChange,
}

__all__ = ["run_cpu", "ROLES", "STOP_WATCHDOG", "STOP_FAILED", "STOP_VIOLATION"]
