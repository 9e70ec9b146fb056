"""Virtual time at kernel cost: the scheduled backend with a clock per CPU that every kernel
step advances by its price in a measured cost table (core/analysis/costs.py), and a scheduler that
always runs the CPU with the earliest clock.  By default every simulated CPU has a core of its
own; ``--placement`` puts several on one core, taking turns as under the kernel's fair
scheduler (PlacedWorld below), e.g. as `ptlab kernel` ran its threads.

Why: the process backend runs the kernel paths in Python, so critical sections are dilated
×7–×13 while futex sleeps run at native speed — spinning looks worse than it is, and 2 host
cores cannot run "a lot of threads" spinning.  Here every simulated CPU is a core of its own in
virtual time: a spinner's clock runs while it spins (it jumps to the release, plus a cache-line
transfer, instead of iterating), a sleeper pays the wake-to-run latency, a spinlock holder is
never preempted, spinlock waiters are served in queue order (qspinlock), and idle or sleeping
CPUs cost nothing to simulate.  The same kernel paths, strategies and oracle run unchanged.

What a step costs (``CostModel`` in core/backends/scheduled.py and the ``charge`` points in the kernel
paths): a word access hits the cache unless the line was last written by another CPU (a
transfer); an atomic pays the locked RMW; a page copy or clear its measured 4 KiB price; a
fault its exception entry and fixed path; an allocation, a TLB-miss walk, an IPI handler,
mmap()/munmap()'s VMA work, the collapse's fixed work and MADV_COLLAPSE's LRU drain their
table entries.  Runs are deterministic: the same config and seed give the same numbers on any
host.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ptlab.core.backends.scheduled import (
    K_DELAY,
    K_FUTEX_WAIT,
    K_FUTEX_WAKE,
    RUNNABLE,
    CostModel,
    Costs,
    World,
    unscheduled,
)
from ptlab.core.machine._prims import Region
from ptlab.core.machine.config import RunConfig, parse_placement
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.errors import RunFailed

QUANTUM_NS = 50  # a CPU may run ahead of the next one by this much before handing over

# entries the charge points use that the table derives from its measured ones
DERIVED = {
    "mmap_call": lambda t: t["mmap_body"] / 2,
    "ipi_handler": lambda t: max(t["load_hit"], t["ipi_round_trip"] - 2 * t["line_transfer"]),
}
FIT_FAULTS = 64


def costs_from(table: dict[str, float]) -> Costs:
    """The flat {name: ns} of a cost table plus the derived entries (the fitted ones at 0)."""
    entries = dict(table)
    for name, fn in DERIVED.items():
        entries.setdefault(name, fn(entries))
    entries.setdefault("collapse_page_rest", 0.0)
    return Costs(entries)


def bookkeeping(config: RunConfig) -> tuple[set[tuple[int, int]], list[tuple[int, int, int]]]:
    """The words and ranges of the machine that only the model itself uses (rid 0 ctl, 1 pt,
    2 folio): ``during_collapse`` and the phase in flight, progress and watchdog state, lock
    statistics and owner tags, the oracle's zap epochs and page-table lives, and the page
    allocator's shared free lists (the kernel allocates order-0 pages from per-CPU lists,
    without the zone lock and without moving a shared line)."""
    from ptlab.core.machine.layout import (
        COLLAPSE_PHASE,
        COLLAPSING,
        CPU_ALIVE,
        CPU_PID,
        CPU_PROGRESS,
        CPU_STATE,
        CPU_WAITING,
        FOLIO_FIELDS,
        MAX_CPUS,
        NAMED_LOCKS,
        NR_FREE_TABLES,
        PARKED,
        TABLE_FREE_HEAD,
        Layout,
    )
    from ptlab.core.machine.mm import FREE_HEADS, NR_FREE

    L = Layout.for_config(config)
    words = {(0, COLLAPSING), (0, COLLAPSE_PHASE), (0, PARKED), (0, TABLE_FREE_HEAD), (0, NR_FREE_TABLES), (0, NR_FREE)}
    words |= {(0, FREE_HEADS + 4 * o) for o in range(10)}
    for c in range(MAX_CPUS):
        b = L.cpu(c)
        words |= {(0, b + x) for x in (CPU_PID, CPU_PROGRESS, CPU_STATE, CPU_WAITING, CPU_ALIVE)}
    locks = [L.named_lock(n) for n in NAMED_LOCKS] + [L.ptl(t) for t in range(L.nr_tables)]
    for off in locks:
        words |= {(0, off + x) for x in (8, 16, 24, 32, 40, 48)}  # statistics, owner, readers mask
    words.add((0, L.named_lock("zone_lock")))  # pcp lists: no zone lock in the common path
    per = L.nr_frames * 4
    ranges = [
        (1, L.epochs_base, L.deposits_base),  # the oracle's zap epochs
        (1, L.table_life_base, L.pt_size),  # the oracle's page-table lives, the table pool links
        *[(2, FOLIO_FIELDS.index(f) * per, (FOLIO_FIELDS.index(f) + 1) * per) for f in ("lock_owner", "next_free", "prev_free")],
    ]
    return words, ranges


def fit(table: Any) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Fit the two residual entries against the host kernel's own figures in the table's
    metadata (``ptlab calibrate --kernel`` with a `ptlab kernel` result):

      fault_entry         the kernel's median fault minus what the model's fault path costs
                          with fault_entry 0 (its locks, PTE and folio updates, the zeroing);
      collapse_page_rest  per page, the kernel's median MADV_COLLAPSE minus what the model's
                          madvise collapse of a 2 MiB range costs with it at 0 (the copy, the
                          LRU drain, locks, the flush), divided by 512.

    Both measured uncontended on this model, so that the virtual clock's uncontended fault and
    collapse are the kernel's, and contention adds only what the model itself produces.
    Returns the flat table and the provenance of each fitted entry."""
    flat = table.as_ns()
    kr = (table.meta or {}).get("kernel_result") or {}
    fitted: dict[str, dict[str, Any]] = {}
    base = dict(flat)
    base["fault_entry"] = 0.0
    if kr.get("fault_p50_ns"):
        model = _uncontended_fault_ns(base)
        flat["fault_entry"] = max(0.0, kr["fault_p50_ns"] - model)
        fitted["fault_entry"] = {"ns": flat["fault_entry"], "kind": "derived", "source": f"fitted: the host kernel's median fault {kr['fault_p50_ns']:.0f} ns ({kr.get('fault_from', 'kernel result')}) minus the model's fault path at fault_entry 0 ({model:.0f} ns)"}
    base = dict(flat)
    if kr.get("collapse_p50_ns"):
        model = _uncontended_collapse_ns(base)
        flat["collapse_page_rest"] = max(0.0, (kr["collapse_p50_ns"] - model) / 512)
        fitted["collapse_page_rest"] = {"ns": flat["collapse_page_rest"], "kind": "derived", "source": f"fitted: (the host kernel's median MADV_COLLAPSE {kr['collapse_p50_ns'] / 1e3:.1f} µs minus the model's uncontended madvise collapse at 0, {model / 1e3:.1f} µs) / 512 pages"}
    else:
        flat["collapse_page_rest"] = 0.0
    return flat, fitted


def _solo_run(flat: dict[str, float], config: RunConfig, body: Any) -> list[int]:
    """Run ``body(cpu)`` on one CPU of a fresh machine in virtual time; returns its samples."""
    from ptlab.core.machine.layout import MAX_CPUS
    from ptlab.core.machine.mm import VMA_COLLAPSE, VMA_OTHER, Machine

    costs = costs_from(flat)
    world = World(None, cost=CostModel(costs, *bookkeeping(config)), quantum_ns=QUANTUM_NS)
    m = Machine.create(config, wrap=world.region)
    out: list[int] = []
    try:
        driver = CpuContext(m, MAX_CPUS - 1, "app", config, capacity=1)
        m.populate(driver, VMA_COLLAPSE)
        m.populate(driver, VMA_OTHER)
        driver.rec.close()
        c = VirtualCpu(m, 0, "khugepaged" if config.cpus.get("khugepaged") else "app", config, capacity=1000)
        c.world, c.costs, c.now = world, costs, world.now
        c.register()
        world.spawn(lambda: out.extend(body(c)))
        world.run()
        c.rec.close()
    finally:
        world.abandon()
        m.close()
    return out


def _uncontended_fault_ns(flat: dict[str, float]) -> float:
    from ptlab.core.kernel.paths import Oracle, access_store, zap_range

    def body(c: VirtualCpu) -> list[int]:
        o, lat = Oracle(), []
        zap_range(c, 0, FIT_FAULTS)
        for vpn in range(FIT_FAULTS):
            t0 = c.now()
            access_store(c, o, vpn)
            lat.append(c.now() - t0)
        return lat

    lat = _solo_run(flat, RunConfig(strategy="pmd-clear", order=4, cpus={"app": 1}, nr_pmds=1, quiesce_s=0), body)
    return float(sorted(lat)[len(lat) // 2])


def _uncontended_collapse_ns(flat: dict[str, float]) -> float:
    from ptlab.core.kernel import strategies
    from ptlab.core.kernel.roles import Khugepaged

    config = RunConfig(strategy="pmd-clear", order=9, cpus={"khugepaged": 1}, nr_pmds=1, collapse_context="madvise")

    def body(c: VirtualCpu) -> list[int]:
        k = Khugepaged(c, random.Random(0))
        k.strategy = strategies.get("pmd-clear")
        return [k.madvise_collapse_step()]

    return float(_solo_run(flat, config, body)[0])


# ------------------------------------------------------------------------------------- placement
# Several simulated CPUs on one core, as `ptlab kernel` runs its load threads on a 2-core host
# (the collapser alone on core 0, four load threads sharing core 1 under SCHED_IDLE).  The
# policy is the kernel's fair class (kernel/sched/fair.c, EEVDF), reduced to what decides who
# runs on a shared core:
#   - one task at a time; it keeps the core until it sleeps (futex wait, idle) or is preempted;
#   - a slice is sysctl_sched_base_slice: 0.75 ms x (1 + ilog2(min(cores, 8)))
#     (normalized_sysctl_sched_base_slice, get_update_sysctl_factor(), SCHED_TUNABLESCALING_LOG);
#     an expired slice is noticed by the next tick (HZ = 250 on the development VM's kernel,
#     CONFIG_HZ in /proc/config.gz) or by update_curr() when another task is enqueued on the core;
#   - then the waiting task of least vruntime runs (pick_eevdf() reduced to its fair share), a
#     task's vruntime advancing by its run time x NICE_0_LOAD / weight: 1024 at nice 0
#     (sched_prio_to_weight[20], kernel/sched/core.c), WEIGHT_IDLEPRIO = 3 under SCHED_IDLE --
#     one fair class, so a SCHED_IDLE task beside a busy normal one gets about 3/1027 of the
#     core; a waking task starts no lower than the core's least vruntime (place_entity());
#   - a waking normal task preempts a SCHED_IDLE one at once; a waking SCHED_IDLE task preempts
#     nobody (check_preempt_wakeup_fair(): "Idle tasks are by definition preempted by non-idle
#     tasks"; "Batch and idle tasks do not preempt non-idle tasks (their preemption is driven by
#     the tick)");
#   - preemption takes effect where the preempted CPU holds no spinlock and has interrupts on:
#     between two operations, at the end of each timed operation (the return to user space) and
#     in user-space work (``delay``) -- a spinlock holder is never preempted, as in the kernel;
#   - handing the core from one task to another costs ``context_switch`` (the cost table's,
#     measured on this host); a task waiting for its core is lazy (out of mm_cpumask, so no
#     flush waits for it) and catches up on its TLB generation when it runs again.
# A CPU alone on its core never enters any of this: the default placement (a core per CPU) runs
# exactly as without it.
NICE_0_WEIGHT = 1024  # sched_prio_to_weight[20], nice 0 (kernel/sched/core.c)
WEIGHT_IDLEPRIO = 3  # SCHED_IDLE (kernel/sched/sched.h)
BASE_SLICE_NS = 750_000  # normalized_sysctl_sched_base_slice (kernel/sched/fair.c)
TICK_NS = 4_000_000  # 1 / CONFIG_HZ, HZ = 250 on the development VM's kernel


@dataclass(frozen=True)
class Placement:
    """Where each simulated CPU runs: its core, whether it is SCHED_IDLE, and the fair-class
    parameters that follow from the number of cores (ns)."""

    cores: tuple[int, ...]
    sched_idle: tuple[bool, ...]
    slice_ns: int
    tick_ns: int
    switch_ns: int

    @property
    def shared(self) -> bool:
        return len(set(self.cores)) < len(self.cores)

    def to_dict(self) -> dict[str, Any]:
        return {"cores": list(self.cores), "sched_idle": list(self.sched_idle), "slice_ns": self.slice_ns,
                "tick_ns": self.tick_ns, "context_switch_ns": self.switch_ns,
                "policy": "EEVDF (fair class): base slice, tick, wake-up preemption of SCHED_IDLE"}


def base_slice_ns(nr_cores: int) -> int:
    """sysctl_sched_base_slice on a host with ``nr_cores`` CPUs (get_update_sysctl_factor())."""
    return BASE_SLICE_NS * (1 + (min(max(nr_cores, 1), 8).bit_length() - 1))


def resolve_placement(config: RunConfig, costs: Costs) -> Placement:
    """The run's placement (``config.placement``; "" = a core per CPU)."""
    if config.placement:
        cores, idle = parse_placement(config.placement, config.nr_cpus, config.cpus.get("khugepaged", 0))
    else:
        cores, idle = tuple(range(config.nr_cpus)), (False,) * config.nr_cpus
    return Placement(cores, idle, base_slice_ns(len(set(cores))), TICK_NS, costs.get("context_switch"))


class _Core:
    """One core shared by several simulated CPUs: who runs, who waits for it."""

    __slots__ = ("id", "owner", "queue", "free_at", "resched_at", "vmin")

    def __init__(self, core_id: int) -> None:
        self.id = core_id
        self.owner: Any = None  # the Task running on it
        self.queue: list[Any] = []  # Tasks runnable and waiting for it, in enqueue order
        self.free_at = 0  # when the last owner let go of it (virtual ns)
        self.resched_at = 0  # the owner is preempted at its first safe point from then on (if anyone waits)
        self.vmin = 0  # the least vruntime of a task that started running here (place_entity floor)


class PlacedWorld(World):
    """The virtual-time world with CPUs multiplexed on shared cores (see the notes above).

    Invariants: a shared core has at most one owner; of the tasks placed on it only the owner
    runs kernel or user work (the others wait in its queue, sleep, or are about to ask for the
    core at the end of a sleep); an owner's clock never runs inside the span another task of the
    core ran (handover at max(clock, free_at))."""

    def __init__(self, *a: Any, placement: Placement, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.placement = placement
        counts = Counter(placement.cores)
        self.cores: dict[int, _Core] = {}
        self.core_of: dict[int, _Core] = {}
        for cpu, core in enumerate(placement.cores):
            if counts[core] > 1:
                self.core_of[cpu] = self.cores.setdefault(core, _Core(core))
        n = len(placement.cores)
        self.idle_policy = list(placement.sched_idle)
        self.vruntime = [0] * n
        self.run_start = [0] * n
        self.slice_end = [0] * n
        self.runq_ns = [0] * n  # time spent runnable, waiting for the core
        self.preempted = [0] * n
        self.switches = [0] * n  # times this CPU was handed a core another task had

    # -- the fair class ---------------------------------------------------------------------
    def _weight(self, i: int) -> int:
        return WEIGHT_IDLEPRIO if self.idle_policy[i] else NICE_0_WEIGHT

    def _account(self, t: Any, at: int) -> None:
        i = t.id
        self.vruntime[i] += max(0, at - self.run_start[i]) * NICE_0_WEIGHT // self._weight(i)
        self.run_start[i] = at

    def _next_tick(self, at: int) -> int:
        tick = self.placement.tick_ns
        return -(-at // tick) * tick

    def _start_on(self, core: _Core, t: Any, at: int) -> None:
        i = t.id
        t.clock = at
        core.owner = t
        self.run_start[i] = at
        self.slice_end[i] = at + self.placement.slice_ns
        core.resched_at = self._next_tick(self.slice_end[i])
        # min_vruntime: the least vruntime on the core, never moving backwards
        core.vmin = max(core.vmin, min(self.vruntime[x.id] for x in (t, *core.queue)))

    def _pick(self, core: _Core) -> Any:
        q = core.queue
        k = min(range(len(q)), key=lambda j: (self.vruntime[q[j].id], j))
        return q.pop(k)

    def _release(self, core: _Core, t: Any) -> None:
        """The owner ``t`` lets go of the core at its clock: the next waiting task gets it a
        context switch later."""
        at = t.clock
        self._account(t, at)
        core.owner = None
        core.free_at = at
        if core.queue:
            nxt = self._pick(core)
            self.switches[nxt.id] += 1
            self._start_on(core, nxt, max(nxt.clock, at) + self.placement.switch_ns)
            nxt.state = RUNNABLE
            heapq.heappush(self.ready, (nxt.clock, nxt.id))

    def _wait_for(self, core: _Core, t: Any) -> None:
        """Queue ``t`` for its busy core and block until the core is handed to it."""
        i = t.id
        self.vruntime[i] = max(self.vruntime[i], core.vmin)  # place_entity(): no credit for sleeping
        owner = core.owner
        now = t.clock
        if self.idle_policy[owner.id] and not self.idle_policy[i]:
            core.resched_at = min(core.resched_at, now)  # a non-idle wakee preempts an idle task
        elif now >= self.slice_end[owner.id]:
            core.resched_at = min(core.resched_at, now)  # update_curr() at enqueue: slice used up
        core.queue.append(t)
        self.block()
        self.runq_ns[i] += t.clock - now

    # -- called from the tasks ----------------------------------------------------------------
    def acquire_core(self) -> None:
        """The current CPU wants to run (at its start, after a sleep): take its core if free,
        else wait for it."""
        t = self.current
        core = self.core_of.get(t.id) if t is not None else None
        if core is None or core.owner is t:
            return
        if core.owner is None:
            at = t.clock
            if core.free_at > at:  # busy until then: a switch from the task that had it
                at = core.free_at + self.placement.switch_ns
                self.switches[t.id] += 1
            self._start_on(core, t, at)
            return
        self._wait_for(core, t)

    def release_core(self) -> None:
        """The current CPU stops running (it sleeps or is done): its core goes to the next."""
        t = self.current
        core = self.core_of.get(t.id) if t is not None else None
        if core is not None and core.owner is t:
            self._release(core, t)

    def preempt_due(self) -> bool:
        t = self.current
        core = self.core_of.get(t.id) if t is not None else None
        return core is not None and core.owner is t and bool(core.queue) and t.clock >= core.resched_at

    def yield_core(self) -> None:
        """At a safe point with a reschedule due: hand the core to the best waiting task if it
        is ahead of us (pick_eevdf), else start a new slice."""
        t = self.current
        core = self.core_of[t.id]
        self._account(t, t.clock)
        i, best = t.id, min(core.queue, key=lambda x: self.vruntime[x.id])
        if self.vruntime[i] < self.vruntime[best.id]:
            self._start_on(core, t, t.clock)  # still the fairest: a new slice
            return
        self.preempted[i] += 1
        self._release(core, t)
        self._wait_for(core, t)

    def sleep(self, ns: int) -> None:
        """Idle for ns off the core (the CPU's idle(): nothing to do), then run again."""
        t = self.current
        if t is None or t.id not in self.core_of:
            self.delay(ns)
            return
        self.release_core()
        t.clock += ns
        self.point(K_DELAY, 0, 0)
        self.acquire_core()

    def futex_wait(self, region: Region, rid: int, off: int, expected: int) -> int:
        t = self.current
        if t is None or t.id not in self.core_of:
            return super().futex_wait(region, rid, off, expected)
        self.point(K_FUTEX_WAIT, rid, off)
        if region.load32(off) != expected:
            return 1
        key = (rid, off)
        self.futexes.setdefault(key, []).append(t)
        t.futex = key
        self.release_core()  # a sleeper gives its core away
        self.block()
        self.acquire_core()  # woken: runnable, and runs once it has its core back
        return 0

    def futex_wake(self, rid: int, off: int, n: int) -> int:
        """As World.futex_wake, but the sleepers placed on shared cores become runnable one
        after another in queue order (wake_up_q() walks the list), 1 ns apart: of several
        woken at once onto one free core, the first in the queue gets it."""
        self.point(K_FUTEX_WAKE, rid, off)
        q = self.futexes.get((rid, off))
        woken = 0
        lat = self.cost.table.futex_wake_to_run
        while q and woken < n:
            t = q.pop(0)
            t.futex = None
            self.wake(t, lat + (woken if t.id in self.core_of else 0))
            woken += 1
        return woken

    def stats(self, i: int) -> dict[str, int]:
        return {"core": self.placement.cores[i], "sched_idle": int(self.placement.sched_idle[i]),
                "runq_ns": self.runq_ns[i], "preempted": self.preempted[i], "core_switches": self.switches[i]}


class VirtualCpu(CpuContext):
    """A CPU whose clock is the world's virtual clock for it."""

    world: World
    costs: Costs
    placed = False  # on a core it shares (PlacedWorld)

    def delay(self, ns: int) -> None:
        self.world.delay(ns)
        self.interrupt_point()
        if self.placed:
            self.preempt_point()

    def cpu_relax(self) -> None:
        self.world.relax()

    def io_wait(self, ns: int) -> None:
        """On a shared core the thread sleeps in I/O and the core runs another (the kernel
        probe's O_DIRECT pin thread); alone on its core it is ``delay``, as before."""
        if self.placed:
            self.idle(ns)
            self.interrupt_point()
        else:
            self.delay(ns)

    def idle(self, ns: int) -> None:
        self.leave_cpumask()
        if self.placed:
            self.world.sleep(ns)  # type: ignore[attr-defined]
        else:
            self.world.delay(ns)
        self.join_cpumask()

    def op_end(self, *a: Any, **k: Any) -> int:
        lat = super().op_end(*a, **k)
        if self.placed:
            self.preempt_point()  # the return to user space
        return lat

    def preempt_point(self) -> None:
        """A point where the CPU may be preempted: a reschedule is due on its core, and it holds
        no spinlock and has interrupts on.  Waiting for its core it is lazy (out of mm_cpumask)."""
        w = self.world
        if not w.preempt_due() or self.irqs_off:  # type: ignore[attr-defined]
            return
        m = self.m
        with unscheduled(w):  # the model's check, not the CPU's work
            if any(lk.r.load32(lk.off) == self.owner_tag for lk in (m.page_table_lock, m.pmd_lock, m.zone_lock, *m._ptls)):
                return
        self.leave_cpumask()
        w.yield_core()  # type: ignore[attr-defined]
        self.join_cpumask()

    def charge(self, step: str, n: int = 1) -> None:
        self.world.charge(self.costs.get(step) * n)

    def cpu_alive(self, cpu: int) -> bool:
        return True


def run_virtual(config: RunConfig, table: dict[str, float], progress: Any = None) -> dict[str, Any]:
    """Run ``config`` for warmup + duration virtual seconds.  Returns the per-CPU results in the
    shape the process backend's CPUs return (rows, crows, violations, stats), the end-of-run
    violations, and speed figures.  Raises RunFailed on a deadlock or a CPU exception."""
    from ptlab.core.kernel.oracle import check_machine, lock_dump
    from ptlab.core.kernel.roles import ROLES, assign_roles
    from ptlab.core.machine.layout import MAX_CPUS
    from ptlab.core.machine.mm import VMA_COLLAPSE, VMA_OTHER, Machine

    costs = costs_from(table)
    placement = resolve_placement(config, costs)
    if placement.shared:
        world: World = PlacedWorld(None, cost=CostModel(costs, *bookkeeping(config)), quantum_ns=QUANTUM_NS, placement=placement)
    else:
        world = World(None, cost=CostModel(costs, *bookkeeping(config)), quantum_ns=QUANTUM_NS)
    placed = world.core_of if isinstance(world, PlacedWorld) else {}
    m = Machine.create(config, wrap=world.region)
    cpus: list[VirtualCpu] = []
    roles = assign_roles(config)
    end = int((config.warmup_s + config.duration_s) * 1e9)
    wall0 = time.perf_counter()
    try:
        driver = CpuContext(m, MAX_CPUS - 1, "app", config, capacity=1)
        m.populate(driver, VMA_COLLAPSE)
        m.populate(driver, VMA_OTHER)
        driver.rec.close()
        capacity = int((config.warmup_s + config.duration_s) * 400_000) + 20_000
        for i, role in enumerate(roles):
            c = VirtualCpu(m, i, role, config, capacity=capacity, seed=config.seed)
            c.world, c.costs, c.now = world, costs, world.now
            c.placed = i in placed
            c.register()
            cpus.append(c)

        def task_for(c: VirtualCpu, role: str) -> Any:
            def task() -> None:
                runner = ROLES[role](c, random.Random(config.seed * 1000 + c.id))
                if c.placed:  # runs once its shared core is free; lazy until then
                    c.leave_cpumask()
                    world.acquire_core()  # type: ignore[attr-defined]
                    c.join_cpumask()
                try:
                    while c.now() < end:
                        runner.step()
                        c.interrupt_point()
                        if c.placed:
                            c.preempt_point()
                finally:
                    runner.finish()
                    c.leave_cpumask()
                    if c.placed:
                        world.release_core()  # type: ignore[attr-defined]

            return task

        for c, role in zip(cpus, roles):
            world.spawn(task_for(c, role))
        outcome = world.run()
        wall = time.perf_counter() - wall0
        if outcome == "deadlock":
            raise RunFailed("deadlock in virtual time: " + "; ".join(lock_dump(m, roles)))
        errors = [f"simulated CPU {t.id} ({roles[t.id]}) raised {type(t.error).__name__}: {t.error}" for t in world.tasks if t.error is not None]
        if errors:
            raise RunFailed(errors[0])
        end_violations = check_machine(m)
        results = []
        for c, role in zip(cpus, roles):
            rows, crows = c.rec.export()
            results.append({
                "cpu": c.id,
                "role": role,
                "rows": rows,
                "crows": crows,
                "violations": c.violations,
                "stats": {**c.stats, "dropped_events": c.rec.dropped, "spin_ns": c.spin_ns, "sleep_ns": c.sleep_ns,
                          **(world.stats(c.id) if isinstance(world, PlacedWorld) else {})},
                "error": "",
                "pid": 0,
            })
        speed = {
            "wall_s": round(wall, 3),
            "steps": world.step,
            "virtual_ns": end,
            "virtual_ns_per_wall_s": round(end / wall) if wall > 0 else 0,
            "steps_per_s": round(world.step / wall) if wall > 0 else 0,
        }
        out = {"results": results, "violations": end_violations, "speed": speed, "costs": costs.entries, "roles": roles}
        if placement.shared:
            out["placement"] = placement.to_dict()
        return out
    finally:
        world.abandon()
        for c in cpus:
            c.rec.close()
        m.close()


__all__ = ["QUANTUM_NS", "Placement", "PlacedWorld", "VirtualCpu", "costs_from", "resolve_placement", "run_virtual"]
