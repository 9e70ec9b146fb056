"""One simulated CPU as seen from its own process: its TLB, its IPI mailbox, its interrupt
points, its sleeps, its accounting, its event recorder and its oracle state.

TLB and shootdown (DESIGN.md "TLB and shootdowns"):
  - the TLB is private (a dict vpn -> pfn << 1 | writable, FIFO-evicted at ``tlb_entries``); a
    hit reads and writes the frame directly, without any lock — exactly why a collapse flushes;
  - the mm carries a flush generation (x86's mm->context.tlb_gen) that every flush bumps before
    it sends anything (inc_mm_tlb_gen), and each CPU remembers the generation its TLB has caught
    up to (cpu_tlbstate.ctxs[].tlb_gen);
  - ``flush_tlb_range`` in ``ipi`` mode merges the range into each target's mailbox (atomic
    min/max, with the highest requested generation), raises its IPI flag and waits for every ack;
    a target services it at its interrupt points (between accesses, inside spin loops, while
    itself waiting for acks) with x86's flush_tlb_func() rule: nothing if already up to date, a
    partial flush of the range only when this one request takes it exactly one generation
    forward to the mm's, else a full flush — unless its IRQs are off (GUP-fast), in which case
    the ack waits for local_irq_enable;
  - in ``broadcast`` mode (arm64 TLBI, AMD INVLPGB) the flusher publishes the range in a ring and
    does not wait: every access checks the ring generation first, IRQs off or not, so the
    entries die without the target's cooperation and GUP-fast is *not* quiesced;
  - a CPU about to sleep goes lazy (x86): it leaves the flush targets (tlb_is_not_lazy() makes
    flushers skip it) but *keeps* its TLB entries; when it runs the mm again
    (switch_mm_irqs_off) it compares its generation with the mm's and flushes everything only if
    it is behind.  A flush that never happened therefore leaves stale translations alive across
    sleeps, where the oracle can see them;
  - a kernel thread (khugepaged) never runs the mm's user half: it is never in mm_cpumask, never
    the target of a flush, and its own flushes do no local flush.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

from ptlab.core.machine._prims import CpuBase, now_ns
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import OwnerDied, Stopped
from ptlab.core.machine.events import OP, PHASES, RESULT, ROLE, WAIT, Recorder, pack
from ptlab.core.machine.layout import (
    BCAST,
    BCAST_RING,
    COLLAPSE_PHASE,
    COLLAPSING,
    CPU_ALIVE,
    CPU_IN_ACCESS,
    CPU_IPI_ACK,
    CPU_IPI_END,
    CPU_IPI_FLAG,
    CPU_IPI_GEN,
    CPU_IPI_NGEN,
    CPU_IPI_REQ,
    CPU_IPI_START,
    CPU_IRQ_OFF,
    CPU_PID,
    CPU_PROGRESS,
    CPU_STATE,
    CPU_WAITING,
    MM_CPUMASK,
    MM_TLB_GEN,
    ST_IPI_WAIT,
    ST_RUN,
    STOP,
    STOP_VIOLATION,
    TLB_GEN,
    cpumask_cpus,
    cpumask_slot,
)
from ptlab.core.machine.mm import Machine
from ptlab.core.machine.shm import pid_alive

NO_RANGE_START = 1 << 62
BCAST_CLAIM = 56  # ctl header: i64 claim counter for the broadcast ring
IPI_BUDGET_NS = 20_000_000


class CpuContext(CpuBase):
    """Per-process state of one simulated CPU.  Its lock-facing fields (id, owner_tag,
    ipi_flag_off, spin_ns, sleep_ns, wait_max, wait_kind) live in the C base, where the locks' one-call
    fast paths read and account into them (core/machine/locks.py)."""

    def __init__(self, m: Machine, cpu_id: int, role: str, config: RunConfig, *, sample: int = 8, capacity: int = 200_000, tlb_entries: int = 64, seed: int = 0) -> None:
        self.m = m
        self.id = cpu_id
        self.owner_tag = cpu_id + 1
        self.role = role
        self.role_code = ROLE[role]
        self.config = config
        self.strategy = config.strategy
        self.bugs = frozenset(config.inject_bugs)
        self.stop_on = frozenset(config.stop_on)
        self.broadcast = config.flush == "broadcast"
        self.nr_cpus = config.nr_cpus
        L = m.L
        self.base = L.cpu(cpu_id)
        self.ipi_flag_off = self.base + CPU_IPI_FLAG
        self.ctl = m.ctl
        self.tlb: dict[int, int] = {}
        self.tlb_entries = tlb_entries
        self.tlb_gen = self.ctl.load64(TLB_GEN)  # broadcast ring generation applied
        self.local_gen = self.ctl.load64(MM_TLB_GEN)  # flush generation this TLB is up to date with
        # khugepaged is a kernel thread: not in mm_cpumask, no flush IPIs, no user TLB entries;
        # so are the rmap walker (kswapd/kcompactd) and the page-table walker (another process
        # reading /proc/pid/smaps or calling process_madvise(): it never runs this mm)
        # (with --collapse-context madvise the collapser is a thread of the process calling
        # MADV_COLLAPSE, in mm_cpumask like any other: it touches the range it re-splits)
        self.kthread = role in ("rmap-walk", "pt-walk") or (role == "khugepaged" and config.collapse_context != "madvise")
        self.irqs_off = False
        self.spin_ns = 0
        self.sleep_ns = 0
        self.wait_max = 0
        self.wait_kind = ""
        self.phase = ""
        self.violations: list[dict[str, Any]] = []
        self.rng = random.Random((seed << 8) ^ cpu_id)
        self.chaos_on = config.chaos
        self.sample = sample
        self.rec = Recorder(capacity, max(1000, capacity // 20))
        self.stats: dict[str, int] = {"ipis_serviced": 0, "tlb_flush_all": 0, "sleeps": 0}
        self._progress = 0
        # test hooks: point name -> callable run when this CPU passes ``chaos(point)``; the
        # in-process stepper (tests/_stepper.py) parks a CPU here to force an interleaving
        self.hooks: dict[str, Callable[[], None]] = {}
        self.wait_timed_out = False  # the last futex_sleep ended by its timeout (core/machine/locks.py)
        # the clock (ns): wall-clock perf counter here; the scheduled backend gives a virtual one
        self.now: Callable[[], int] = now_ns
        # the scheduled backend's story: called with each named kernel step when tracing
        self.on_step: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ registration
    def register(self) -> None:
        ctl = self.ctl
        ctl.store64(self.base + CPU_PID, os.getpid())
        ctl.store32(self.base + CPU_ALIVE, 1)
        ctl.store64(self.base + CPU_IPI_START, NO_RANGE_START)
        ctl.store64(self.base + CPU_IPI_END, -1)
        self.join_cpumask()

    def join_cpumask(self) -> None:
        """switch_mm_irqs_off() back into the mm: rejoin the flush targets (a full barrier before
        any page-table read), then catch up if a flush happened while we were lazy."""
        if self.kthread:
            return
        self.ctl.fetch_or64(*cpumask_slot(self.id))
        if not self.broadcast:
            mm_gen = self.ctl.load64(MM_TLB_GEN)
            if self.local_gen < mm_gen:
                self.tlb_flush_all()
                self.local_gen = mm_gen

    def leave_cpumask(self) -> None:
        """Go lazy (enter_lazy_tlb): flushers stop targeting this CPU, but its TLB keeps its
        entries.  A request already posted is serviced first, so no flusher waits on a sleeper."""
        if self.kthread:
            return
        off, bit = cpumask_slot(self.id)
        self.ctl.fetch_and64(off, ~bit)
        if self.ctl.load32(self.ipi_flag_off):
            self.service_ipi()
        self.stats["lazy"] = self.stats.get("lazy", 0) + 1

    def tlb_flush_all(self) -> None:
        self.tlb.clear()
        self.stats["tlb_flush_all"] += 1

    # ------------------------------------------------------------------ interrupts
    def interrupt_point(self) -> None:
        """Between accesses and inside spin loops: take a pending flush IPI unless IRQs are off."""
        if not self.irqs_off and self.ctl.load32(self.ipi_flag_off):
            self.service_ipi()

    def service_ipi(self) -> None:
        """The IPI handler: flush_tlb_func() with x86's generation rule, then ack.

        The kernel queues one flush_tlb_info per request (a csd); here concurrent requests
        merge into one mailbox (``post_flush``), so the order of the takes matters.  A poster
        writes its range before its generation, and the handler takes the generation before
        the range: whenever the handler sees a request's generation it also sees that
        request's whole range, so the partial flush of flush_tlb_func() covers it.  A range
        taken without its generation (the poster was between the two) comes with an mm
        generation already past the one taken, which forces a full flush.  The flag is cleared
        with an exchange, a full barrier before the request count is read (a plain store
        could pass that load and wipe a flag posted meanwhile)."""
        self.charge("ipi_handler")
        ctl, b = self.ctl, self.base
        ctl.xchg32(b + CPU_IPI_FLAG, 0)
        req = ctl.load64(b + CPU_IPI_REQ)
        new_gen = ctl.xchg64(b + CPU_IPI_GEN, 0)
        start = ctl.xchg64(b + CPU_IPI_START, NO_RANGE_START)
        end = ctl.xchg64(b + CPU_IPI_END, -1)
        nreq = ctl.xchg64(b + CPU_IPI_NGEN, 0)
        if start <= end:
            self.flush_tlb_func(start, end, new_gen if nreq == 1 else -1)
        ctl.store64(b + CPU_IPI_ACK, req)
        self.stats["ipis_serviced"] += 1

    def flush_tlb_func(self, start: int, end: int, new_gen: int) -> None:
        """flush_tlb_func() (arch/x86/mm/tlb.c): nothing when already up to date; a partial
        flush only when this request takes us from local_gen to the mm's generation in one step
        (``new_gen`` -1: several requests were merged, so no single one does); else a full
        flush.  Both bring local_gen to the mm's generation."""
        mm_gen = self.ctl.load64(MM_TLB_GEN)
        if self.local_gen >= mm_gen:
            return
        if new_gen == self.local_gen + 1 == mm_gen:
            self.tlb_drop(start, end)
        else:
            self.tlb_flush_all()
        self.local_gen = mm_gen

    def local_irq_disable(self) -> None:
        self.irqs_off = True
        self.ctl.store32(self.base + CPU_IRQ_OFF, 1)

    def local_irq_enable(self) -> None:
        self.irqs_off = False
        self.ctl.store32(self.base + CPU_IRQ_OFF, 0)
        self.interrupt_point()

    # ------------------------------------------------------------------ TLB
    def tlb_drop(self, start: int, end: int) -> None:
        """Drop translations for vpns in [start, end)."""
        tlb = self.tlb
        if end - start >= len(tlb):
            for v in [v for v in tlb if start <= v < end]:
                del tlb[v]
        else:
            for v in range(start, end):
                tlb.pop(v, None)

    def tlb_fill(self, vpn: int, pfn: int, write: bool) -> None:
        tlb = self.tlb
        if len(tlb) >= self.tlb_entries:
            del tlb[next(iter(tlb))]
        tlb[vpn] = pfn << 1 | write

    def check_broadcast(self) -> None:
        """Apply broadcast invalidations published since our last look (hardware, IRQs or not)."""
        gen = self.ctl.load64(TLB_GEN)
        if gen == self.tlb_gen:
            return
        if gen - self.tlb_gen >= BCAST_RING:
            self.tlb.clear()
        else:
            for g in range(self.tlb_gen + 1, gen + 1):
                slot = BCAST + (g % BCAST_RING) * 16
                self.tlb_drop(self.ctl.load64(slot), self.ctl.load64(slot + 8))
            # a slot is rewritten by the claim BCAST_RING after it, before that claim is
            # published: if such a claim was made, a range just read may not be its own
            if self.ctl.load64(BCAST_CLAIM) - self.tlb_gen >= BCAST_RING:
                self.tlb.clear()
        self.tlb_gen = gen

    def flush_tlb_range(self, start: int, end: int) -> int:
        """flush_tlb_range(vma, start, end) over vpns [start, end) -> flush_tlb_mm_range():
        inc_mm_tlb_gen(), the local flush (not for a kernel thread), then the remote one.
        Returns ns until complete."""
        t0 = self.now()
        if self.on_step is not None:
            self.on_step(f"flush_tlb_range [{start}, {end})")
        gen = self.ctl.fetch_add64(MM_TLB_GEN, 1) + 1  # a full barrier after the PTE changes
        if not self.kthread:
            self.flush_tlb_func(start, end, gen)
        if self.broadcast:
            self._broadcast(start, end)
        else:
            self._ipi_and_wait(start, end, self._cpumask_others(), gen)
        return self.now() - t0

    def tlb_remove_table_sync_one(self) -> int:
        """An empty IPI to every other CPU, waiting for each (mm/mmu_gather.c): after it, no
        IRQs-off GUP-fast walker that started before can still be in the old table."""
        t0 = self.now()
        if self.on_step is not None:
            self.on_step("tlb_remove_table_sync_one")
        others = [c for c in range(self.nr_cpus) if c != self.id]
        self._ipi_and_wait(NO_RANGE_START, -1, others)
        return self.now() - t0

    def _cpumask_others(self) -> list[int]:
        return [c for c in cpumask_cpus(self._cpumask_words()) if c != self.id and c < self.nr_cpus]

    def _cpumask_words(self) -> list[int]:
        return [self.ctl.load64(MM_CPUMASK + 8 * w) for w in range((self.nr_cpus + 63) >> 6)]

    def _broadcast(self, start: int, end: int) -> None:
        ctl = self.ctl
        g = ctl.fetch_add64(BCAST_CLAIM, 1) + 1
        slot = BCAST + (g % BCAST_RING) * 16
        ctl.store64(slot, start)
        ctl.store64(slot + 8, end)
        while not ctl.cas64(TLB_GEN, g - 1, g):  # publish in claim order
            self.interrupt_point()
            self.check_stop()
            self.cpu_relax()
        # the invalidation completes when no access through an old translation is in flight
        # (the DSB after a TLBI): wait for each CPU's in-access flag, never for its cooperation
        L = self.m.L
        for c in range(self.nr_cpus):
            if c != self.id:
                while ctl.load32(L.cpu(c) + CPU_IN_ACCESS):
                    if not self.irqs_off and ctl.load32(self.ipi_flag_off):
                        self.service_ipi()
                    self.cpu_relax()

    def access_begin(self) -> None:
        """Broadcast mode: mark a load/store in flight (pairs with _broadcast's wait); the
        xchg is a full barrier before the generation check that follows."""
        self.ctl.xchg32(self.base + CPU_IN_ACCESS, 1)

    def access_end(self) -> None:
        self.ctl.store32(self.base + CPU_IN_ACCESS, 0)

    def post_flush(self, c: int, start: int, end: int, gen: int) -> int:
        """Post a flush request to CPU c's mailbox and raise its IPI flag; returns the request
        number its ack must reach.  The range goes in before the generation (service_ipi takes
        them in the other order)."""
        ctl, b = self.ctl, self.m.L.cpu(c)
        if start <= end:
            while True:  # merge the range: atomic min on start, max on end
                s = ctl.load64(b + CPU_IPI_START)
                if s <= start or ctl.cas64(b + CPU_IPI_START, s, start):
                    break
            while True:
                e = ctl.load64(b + CPU_IPI_END)
                if e >= end or ctl.cas64(b + CPU_IPI_END, e, end):
                    break
            while True:  # the highest generation asked for, and how many asked
                g = ctl.load64(b + CPU_IPI_GEN)
                if g >= gen or ctl.cas64(b + CPU_IPI_GEN, g, gen):
                    break
            ctl.fetch_add64(b + CPU_IPI_NGEN, 1)
        want = ctl.fetch_add64(b + CPU_IPI_REQ, 1) + 1
        ctl.store32(b + CPU_IPI_FLAG, 1)
        return want

    def _ipi_and_wait(self, start: int, end: int, targets: list[int], gen: int = 0) -> None:
        if not targets:
            return
        ctl, L = self.ctl, self.m.L
        want = {c: self.post_flush(c, start, end, gen) for c in targets}
        ctl.store32(self.base + CPU_STATE, ST_IPI_WAIT)
        t0 = self.now()
        last_check = t0
        try:
            while want:
                words = self._cpumask_words()
                for c in list(want):
                    b = L.cpu(c)
                    # a CPU that went lazy is idle (not in a walk); it catches up when it returns
                    if ctl.load64(b + CPU_IPI_ACK) >= want[c] or not words[c >> 6] >> (c & 63) & 1:
                        del want[c]
                if not want:
                    break
                # interrupts stay on while smp_call_function_many waits: two flushers must not deadlock
                if not self.irqs_off and ctl.load32(self.ipi_flag_off):
                    self.service_ipi()
                self.cpu_relax()
                now = self.now()
                if now - last_check > IPI_BUDGET_NS:
                    last_check = now
                    self.check_stop()
                    for c in want:
                        if not self.cpu_alive(c):
                            raise OwnerDied(f"CPU {c} died before acking a TLB-flush IPI from CPU {self.id}")
        finally:
            ctl.store32(self.base + CPU_STATE, ST_RUN)
        waited = self.now() - t0
        if waited > 0:
            self.account_spin(waited, "tlb")

    # ------------------------------------------------------------------ sleeping
    def futex_sleep(self, region: Any, off: int, expected: int, timeout_ns: int) -> int:
        """Sleep on a futex word as a CPU going idle: go lazy first (leave the flush targets,
        keep the TLB) and switch back to the mm on wake.  Returns ns asleep."""
        self.leave_cpumask()
        t0 = self.now()
        self.wait_timed_out = region.futex_wait(off, expected, timeout_ns) == 2  # the lost wake-up check
        dt = self.now() - t0
        self.join_cpumask()
        self.stats["sleeps"] += 1
        return dt

    def idle(self, ns: int) -> None:
        """Nothing to do for ns: the CPU enters the idle loop (lazy TLB) and comes back."""
        self.futex_sleep(self.ctl, STOP, 0, ns)

    # ------------------------------------------------------------------ accounting
    def account_spin(self, ns: int, kind: str) -> None:
        self.spin_ns += ns
        if ns > self.wait_max:
            self.wait_max, self.wait_kind = ns, kind

    def account_sleep(self, ns: int, kind: str) -> None:
        self.sleep_ns += ns
        if ns > self.wait_max:
            self.wait_max, self.wait_kind = ns, kind

    def set_waiting(self, state: int, lock_id: int) -> None:
        self.ctl.store32(self.base + CPU_STATE, state)
        self.ctl.store32(self.base + CPU_WAITING, lock_id)

    def cpu_alive(self, cpu: int) -> bool:
        pid = self.ctl.load64(self.m.L.cpu(cpu) + CPU_PID)
        return pid <= 0 or pid_alive(pid)

    def check_stop(self) -> None:
        if self.ctl.load32(STOP):
            raise Stopped()

    def progress(self) -> None:
        self._progress += 1
        self.ctl.store64(self.base + CPU_PROGRESS, self._progress)

    def collapsing(self) -> bool:
        return self.ctl.load32(COLLAPSING) > 0

    # ------------------------------------------------------------------ events
    def op_begin(self) -> tuple[int, int, int, bool]:
        """Start timing an operation: (start ns, spin and sleep so far, whether a collapse was
        in flight when it started — what ``during_collapse`` means in every result file)."""
        self.wait_max = 0
        self.wait_kind = ""
        return self.now(), self.spin_ns, self.sleep_ns, self.collapsing()

    def op_end(self, begin: tuple[int, int, int, bool], op: str, result: str, addr: int, vma: int = -1, order: int = 0, during: bool | None = None) -> int:
        t0, s0, z0, started_during = begin
        lat = self.now() - t0
        if self.on_step is not None:
            self.on_step(f"{op} {result} (page {addr})")
        if during is None:
            during = started_during
        self.rec.put(
            t0,
            lat,
            self.spin_ns - s0,
            self.sleep_ns - z0,
            addr,
            pack(OP[op], self.role_code, WAIT[self.wait_kind], RESULT[result], vma, order, during),
        )
        self.progress()
        return lat

    def record_access(self, t0: int, s0: int, z0: int, vpn: int, code: int) -> None:
        """The hot-path recorder for a sampled access: ``code`` is pack() of the access's
        constant fields (op, role, result, vma); the rest is filled in here."""
        if self.wait_kind:
            code |= WAIT[self.wait_kind] << 16
        if self.ctl.load32(COLLAPSING):
            code |= 1 << 52
        self.rec.put(t0, self.now() - t0, self.spin_ns - s0, self.sleep_ns - z0, vpn, code)

    def record_collapse(self, begin: tuple[int, int, int, bool], result: str, addr: int, order: int, phases: list[int]) -> None:
        t0, s0, z0, _ = begin
        lat = self.now() - t0
        if self.on_step is not None:
            self.on_step(f"collapse {result} (page {addr}, order {order})")
        self.rec.put_collapse(
            t0,
            lat,
            self.spin_ns - s0,
            self.sleep_ns - z0,
            addr,
            pack(OP["collapse"], self.role_code, WAIT[self.wait_kind], RESULT[result], 0, order, True),
            phases,
        )
        self.progress()

    # ------------------------------------------------------------------ oracle + chaos
    def violation(self, kind: str, page: int = -1, detail: str = "", phase: str | None = None) -> None:
        """Record a violation with the phase of the collapse in flight when it was detected
        (this CPU's own phase when it is the collapser, else the published one, or "none")."""
        if phase is None:
            phase = self.phase
        if not phase:

            code = self.ctl.load32(COLLAPSE_PHASE)
            phase = PHASES[code - 1] if code > 0 else "none"
        if self.on_step is not None:
            self.on_step(f"VIOLATION {kind}: {detail}")
        if kind in self.stop_on:  # the run's question is answered: end it at once
            self.ctl.cas32(STOP, 0, STOP_VIOLATION)
        if len(self.violations) < 200:
            self.violations.append(
                {
                    "kind": kind,
                    "cpu": self.id,
                    "role": self.role,
                    "page": page,
                    "strategy": self.strategy,
                    "phase": phase,
                    "t_ns": self.now(),
                    "detail": detail,
                }
            )

    def delay(self, ns: int) -> None:
        """Stay busy for ns with interrupts on (a widened race window, a device's DMA burst)."""
        until = self.now() + ns
        while self.now() < until:
            self.interrupt_point()

    def io_wait(self, ns: int) -> None:
        """Wait ns for a device (a pinned page's DMA): the thread would sleep in I/O; here the
        CPU stays busy like ``delay`` (the virtual backend gives a shared core away meanwhile)."""
        self.delay(ns)

    def charge(self, step: str, n: int = 1) -> None:
        """Virtual time: spend the cost-table price of a kernel step n times (the process
        backend pays in real time instead: nothing to do)."""

    def cpu_relax(self) -> None:
        """One iteration of a polling loop (cpu_relax()): nothing here; the scheduled backend
        blocks the CPU until a word it polled changes."""

    def chaos(self, point: str) -> None:
        """Widen a race window at a named point (a short random delay, like fault injection);
        a test hook registered for the point runs first."""
        if self.on_step is not None:
            self.on_step(point)
        if self.hooks:
            hook = self.hooks.get(point)
            if hook is not None:
                hook()
        if self.chaos_on and self.rng.random() < 0.3:
            self.delay(self.rng.randrange(2_000, max(3_000, self.config.chaos_us * 1000)))


_AFFINITY = os.sched_getaffinity(0)  # the cores this process may run on, before any pinning


@contextlib.contextmanager
def attached_cpu(config: RunConfig, prefix: str, cpu_id: int, role: str = "app", pin_core: int | None = None, capacity: int = 1) -> Iterator[CpuContext]:
    """From another process: pin to ``pin_core`` (if given), attach to the machine ``prefix``
    and register as CPU ``cpu_id`` (pid, mm_cpumask); unmaps everything on exit."""
    if pin_core is not None:
        os.sched_setaffinity(0, {pin_core})
    else:  # a process reused from an earlier, pinned run (cluster/cell.py CpuPool) runs anywhere again
        os.sched_setaffinity(0, _AFFINITY)
    m = Machine.attach(config, prefix)
    try:
        cpu = CpuContext(m, cpu_id, role, config, capacity=capacity)
        try:
            cpu.register()
            yield cpu
        finally:
            cpu.rec.close()
    finally:
        m.close()
