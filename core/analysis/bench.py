"""``ptlab bench``: the cost of the simulation's own steps, in one process, without contention.

  access_tlb_hit      a store through the TLB, oracle check included          (target ≤ 2 µs)
  access_recorded     the same access with its event recorded                  (recording ≤ 10 %)
  fault_anon          an uncontended anonymous page fault (zap, then touch)    (target ≤ 25 µs)
  collapse_<s>_o<k>   one uncontended collapse of a fully populated range     (order 9 ≤ 5 ms)

These are the numbers to hold against the kernel's (kernel-brief.md §7) to see the dilation;
``calibrate`` gives the primitives underneath them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from ptlab.core.kernel import strategies
from ptlab.core.kernel.khugepaged import collapse_range
from ptlab.core.kernel.paths import Oracle, access_store, zap_range
from ptlab.core.machine._prims import now_ns
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.events import OP, RESULT, pack
from ptlab.core.machine.mm import VMA_COLLAPSE, Machine

TARGETS_US = {"access_tlb_hit": 2.0, "fault_anon": 25.0, "collapse_o9": 5000.0}


def _row(name: str, samples_ns: list[float], target_us: float | None, note: str = "") -> dict[str, Any]:
    s = sorted(samples_ns)
    med = statistics.median(s) / 1000
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))] / 1000
    return {
        "step": name,
        "median_us": round(med, 3),
        "p99_us": round(p99, 3),
        "target_us": target_us,
        "ok": None if target_us is None else med <= target_us,
        "note": note,
    }


def run_bench(progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    say = progress or (lambda s: None)
    rows: list[dict[str, Any]] = []
    config = RunConfig(strategy="pmd-clear", order=9, cpus={"app": 1}, nr_pmds=4)
    m = Machine.create(config)
    try:
        cpu = CpuContext(m, 0, "app", config, capacity=300_000)
        cpu.register()
        m.populate(cpu, VMA_COLLAPSE)
        oracle = Oracle()
        say("accesses")
        vpns = list(range(48))  # fits the 64-entry TLB: every access after the first hits
        for v in vpns:
            access_store(cpu, oracle, v)
        batches = []
        for _ in range(30):
            t0 = now_ns()
            for v in vpns * 20:
                access_store(cpu, oracle, v)
                cpu.interrupt_point()
            batches.append((now_ns() - t0) / (len(vpns) * 20))
        rows.append(_row("access_tlb_hit", batches, TARGETS_US["access_tlb_hit"], "store + oracle check + interrupt point"))
        rec = []
        code = pack(OP["access"], cpu.role_code, 0, RESULT["ok"], 0, 0, False)
        for _ in range(30):
            t0 = now_ns()
            for v in vpns * 20:
                a0, s0, z0 = now_ns(), cpu.spin_ns, cpu.sleep_ns  # as App.step does
                access_store(cpu, oracle, v)
                cpu.record_access(a0, s0, z0, v, code)
                cpu.interrupt_point()
            rec.append((now_ns() - t0) / (len(vpns) * 20))
        cpu.rec.n = 0
        overhead = statistics.median(rec) / statistics.median(batches) - 1
        rows.append(_row("access_recorded", rec, None, f"every access recorded: +{overhead:.0%}; runs record 1 in 8 (+{overhead / 8:.1%})"))
        say("faults")
        faults = []
        for k in range(400):
            v = 64 + (k * 8) % (m.L.vma0_pmds * 512 - 64)
            zap_range(cpu, v, 1)
            t0 = now_ns()
            access_store(cpu, oracle, v)
            faults.append(now_ns() - t0)
        rows.append(_row("fault_anon", faults, TARGETS_US["fault_anon"], "zeroed order-0 folio, per-VMA lock, PTL"))
    finally:
        cpu.rec.close()
        m.close()
    for strategy in strategies.STRATEGIES:
        for order in (4, 9):
            say(f"{strategy} order {order}")
            rows.append(_bench_collapse(strategy, order))
    return rows


def _bench_collapse(strategy: str, order: int) -> dict[str, Any]:
    config = RunConfig(strategy=strategy, order=order, cpus={"khugepaged": 1}, nr_pmds=4)
    m = Machine.create(config)
    samples = []
    try:
        cpu = CpuContext(m, 0, "khugepaged", config, capacity=10)
        cpu.register()
        m.populate(cpu, VMA_COLLAPSE)
        mod = strategies.get(strategy)
        n = 1 << order
        # refill a collapsed range with order-0 pages (zap, then touch) between collapses
        oracle = Oracle()
        starts = list(range(0, m.L.vma0_pmds * 512, n))[:16]
        for rep in range(3):
            for s in starts:
                if rep:
                    zap_range(cpu, s, n)
                    for v in range(s, s + n):
                        access_store(cpu, oracle, v)
                t0 = now_ns()
                result, _ = collapse_range(cpu, mod, s, order)
                if result == "SCAN_SUCCEED":
                    samples.append(now_ns() - t0)
        cpu.rec.close()
    finally:
        m.close()
    target = TARGETS_US["collapse_o9"] if order == 9 else None
    return _row(f"collapse_{strategy}_o{order}", samples or [float("nan")], target, f"{len(samples)} collapses of {1 << order} pages")
