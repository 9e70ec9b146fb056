"""What each simulated CPU does in its own process: wait at the gate, run its role until the
run's end, and hand back its events, violations and counters.

Roles (DESIGN.md): app (loads/stores by a workload pattern, faulting as needed, and now and then
an MADV_DONTNEED of a few pages, as an allocator returning memory does — so holes keep appearing
and collapse work never runs out), gup-fast and gup-slow (pin a page, write through the pin like a
DMA engine for ``pin_hold_us``, unpin, then check the DMA write is visible through the page table),
mmap (mmap()/mprotect()/munmap() churn on small VMAs of the same mm), zap (MADV_DONTNEED of random
ranges), khugepaged (scan, collapse with the run's strategy, record the result and phase times).
"""

from __future__ import annotations

import os
import random
from typing import Any

from ptlab.core import strategies
from ptlab.core._prims import now_ns
from ptlab.core.config import RunConfig
from ptlab.core.cpu import CpuContext, Stopped
from ptlab.core.errors import OwnerDied
from ptlab.core.events import OP, RESULT, pack
from ptlab.core.khugepaged import PHASES, collapse_range, scan_pmd
from ptlab.core.layout import CPU_STATE, GATE, PARKED, QUIESCE, READY, ST_DONE, STOP, T0
from ptlab.core.machine import VMA_COLLAPSE, VMA_OTHER, Machine
from ptlab.core.paths import (
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
from ptlab.workloads.patterns import make_pattern

FREE_RATE = 0.002  # app: probability per access of an MADV_DONTNEED of zap_pages pages
OTHER_VMA_RATE = 0.1  # app: share of accesses that go to the other VMA
WRITE_RATE = 0.5
IDLE_NS = 1_000_000  # khugepaged between passes with nothing to do; zap between zaps
MMAP_GAP_NS = 200_000  # mmap role: between mmap/mprotect/munmap cycles

STOP_WATCHDOG, STOP_FAILED = 2, 3  # STOP values (1 is not used: the end is time-based)


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
            while now_ns() < end and not ctl.load32(STOP):
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
    except Exception as e:  # the machine reached a state no kernel path expects: report it
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        cpu.violation("cpu_exception", detail=f"{type(e).__name__}: {e} at {os.path.basename(where.filename)}:{where.lineno} ({where.name})")
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


def park(cpu: CpuContext) -> None:
    """A quiescent point: between two operations this CPU holds no lock, no pin and no
    half-changed entry, so the driver can check the machine's invariants while all are parked."""
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
        self.cpu.futex_sleep(self.m.ctl, STOP, 0, ns)

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
        self.codes = {v: pack(OP["access"], cpu.role_code, 0, RESULT["ok"], v, 0, False) for v in (VMA_COLLAPSE, VMA_OTHER)}

    def step(self) -> None:
        cpu, rng = self.cpu, self.rng
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
            t0, s0, z0 = now_ns(), cpu.spin_ns, cpu.sleep_ns
        if rng.random() < WRITE_RATE or not self.others:
            access_store(cpu, self.oracle, vpn)
        else:
            access_load(cpu, self.oracle, vpn, self.others[self.n % len(self.others)])
        if record:
            cpu.record_access(t0, s0, z0, vpn, self.codes[vma])
        if self.n & 63 == 0:
            cpu.progress()


class Gup(Role):
    """Pins a page (GUP-fast with fallback, or GUP-slow), writes through the pin like a DMA
    engine for pin_hold_us, unpins, then checks the last DMA value through the page table."""

    fast = True

    def __init__(self, cpu: CpuContext, rng: random.Random) -> None:
        super().__init__(cpu, rng)
        self.word = DMA_WORD + cpu.id
        self.held: int = -1

    def step(self) -> None:
        cpu, m = self.cpu, self.m
        vpn = self.vma0[0] + self.pick0()
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
        if last is not None and v != last[0] and not (v == 0 and m.epoch(vpn) != last[1]):
            cpu.violation("lost_dma_write", page=vpn, detail=f"DMA word of CPU {cpu.id} on page {vpn} holds {v:#x}, expected {last[0]:#x}")
        hold_until = now_ns() + self.config.pin_hold_us * 1000
        while True:  # the device writes through the pinned page, not through the page table
            self.oracle.seq += 1
            v = vpn << 32 | (self.oracle.seq & 0xFFFFFFFF)
            m.frames.store64(off, v)
            if now_ns() >= hold_until:
                break
            until = now_ns() + 20_000
            while now_ns() < until:
                cpu.interrupt_point()
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
    def step(self) -> None:
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
        cpu, m = self.cpu, self.m
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


ROLES: dict[str, type[Role]] = {
    "app": App,
    "gup-fast": Gup,
    "gup-slow": GupSlow,
    "mmap": Mmap,
    "zap": Zap,
    "khugepaged": Khugepaged,
}

__all__ = ["run_cpu", "ROLES", "STOP_WATCHDOG", "STOP_FAILED"]
