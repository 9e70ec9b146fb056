"""Virtual time at kernel cost: the scheduled backend with a clock per CPU that every kernel
step advances by its price in a measured cost table (core/analysis/costs.py), and a scheduler that
always runs the CPU with the earliest clock.

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

import random
import time
from typing import Any

from ptlab.core.backends.scheduled import CostModel, Costs, World
from ptlab.core.machine.config import RunConfig
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


class VirtualCpu(CpuContext):
    """A CPU whose clock is the world's virtual clock for it."""

    world: World
    costs: Costs

    def delay(self, ns: int) -> None:
        self.world.delay(ns)
        self.interrupt_point()

    def cpu_relax(self) -> None:
        self.world.relax()

    def idle(self, ns: int) -> None:
        self.leave_cpumask()
        self.world.delay(ns)
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
    world = World(None, cost=CostModel(costs, *bookkeeping(config)), quantum_ns=QUANTUM_NS)
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
            c.register()
            cpus.append(c)

        def task_for(c: VirtualCpu, role: str) -> Any:
            def task() -> None:
                runner = ROLES[role](c, random.Random(config.seed * 1000 + c.id))
                try:
                    while c.now() < end:
                        runner.step()
                        c.interrupt_point()
                finally:
                    runner.finish()
                    c.leave_cpumask()

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
                "stats": {**c.stats, "dropped_events": c.rec.dropped, "spin_ns": c.spin_ns, "sleep_ns": c.sleep_ns},
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
        return {"results": results, "violations": end_violations, "speed": speed, "costs": costs.entries, "roles": roles}
    finally:
        world.abandon()
        for c in cpus:
            c.rec.close()
        m.close()


__all__ = ["QUANTUM_NS", "VirtualCpu", "costs_from", "run_virtual"]
