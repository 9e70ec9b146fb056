"""``ptlab bench``: the cost of the simulation's own steps, in one process, without contention,
each beside its target and the host kernel's figure for the same step.

  access_tlb_hit      a store through the TLB, oracle check included, recorded 1 in 8 as the
                      app role records them (``access_sample``)                (target ≤ 0.25 µs)
  access_recorded     the same access with every one recorded (what recording costs)
  fault_anon          an uncontended anonymous page fault (zap, then touch)    (target ≤ 4 µs)
  collapse_<s>_o4     one uncontended order-4 collapse, each strategy          (target ≤ 40 µs)
  collapse_<s>_o9     one uncontended order-9 collapse (pmd-clear only)        (target ≤ 600 µs)
  spin_lock_unlock    SpinLock.lock + unlock through the class the paths use   (target ≤ 60 ns)

The ``kernel`` column is the host kernel's figure for the step and ``dilation`` = median ÷
kernel: how much longer the simulation takes for it, and so how much longer a critical section
lasts here than in the kernel (the spin-vs-sleep answer of the process backend is only as good
as that).  The figures come from the host's cost table (``ptlab calibrate --kernel``:
results/costs/<hostname>.json, else the committed core/analysis/costs_default.json) and, when
given, a ``ptlab kernel`` result (fault and MADV_COLLAPSE medians); each row's ``kernel_from``
says which.  Targets are printed, never asserted: a loaded host moves every number.

``build`` says whether the hot paths ran compiled or as plain Python (core/machine/build.py;
``PTLAB_PURE=1`` is the switch), so two benches can be set side by side.
"""

from __future__ import annotations

import datetime as _dt
import json
import socket
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ptlab.core.analysis.costs import CostTable, default_out, load_costs
from ptlab.core.kernel import strategies
from ptlab.core.kernel.khugepaged import collapse_range
from ptlab.core.kernel.paths import Oracle, access_store, zap_range
from ptlab.core.machine._prims import now_ns
from ptlab.core.machine.build import build_info
from ptlab.core.machine.config import PTE_LEVEL_ONLY, RunConfig
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.events import OP, RESULT, pack
from ptlab.core.machine.mm import VMA_COLLAPSE, Machine

BENCH_FORMAT = 1  # the JSON of `ptlab bench --json`; 1: first version
ACCESS_SAMPLE = 8  # the app role records one TLB-hit access in this many (CpuContext.sample)

# step -> target median in µs; None: shown without a target
TARGETS_US: dict[str, float | None] = {
    "access_tlb_hit": 0.25,
    "access_recorded": None,
    "fault_anon": 4.0,
    "collapse_o4": 40.0,
    "collapse_o9": 600.0,
    "spin_lock_unlock": 0.060,
}


def target_us(step: str) -> float | None:
    """The target of a step (``collapse_<strategy>_o<k>`` shares ``collapse_o<k>``'s)."""
    if step.startswith("collapse_"):
        return TARGETS_US.get("collapse_" + step.rsplit("_", 1)[1])
    return TARGETS_US.get(step)


def _row(name: str, samples_ns: list[float], note: str = "") -> dict[str, Any]:
    s = sorted(samples_ns)
    med = round(statistics.median(s) / 1000, 4) if s else None  # None: no sample (no collapse succeeded)
    p99 = round(s[min(len(s) - 1, int(len(s) * 0.99))] / 1000, 4) if s else None
    target = target_us(name)
    return {
        "step": name,
        "median_us": med,
        "p99_us": p99,
        "n": len(s),
        "target_us": target,
        "ok": None if target is None or med is None else med <= target,
        "kernel_us": None,
        "dilation": None,
        "kernel_from": "",
        "note": note,
    }


# ------------------------------------------------------------------------------ kernel figures
def host_cost_table() -> CostTable:
    """This host's cost table (results/costs/<hostname>.json from `ptlab calibrate --kernel`)
    when there is one, else the committed default."""
    own = default_out()
    return load_costs(own if own.exists() else None)


def kernel_figures(table: CostTable, kernel_result: Mapping[str, Any] | None = None) -> dict[str, tuple[float, str]]:
    """step -> (the host kernel's figure in µs, where it comes from).

    ``kernel_result``: the medians of a `ptlab kernel` run (``fault_p50_ns``,
    ``collapse_p50_ns``, ``fault_from``, ``collapse_from``, as
    ptlab.core.probe.kernel_costs.kernel_result_latencies returns them); without one, the
    `ptlab kernel` run the cost table was derived from (its ``meta.kernel_result``), else the
    table's own measurements."""
    where = Path(str(table.meta.get("path", "cost table"))).name
    host = (table.meta.get("host") or {}).get("hostname")
    if host and host != socket.gethostname():
        where += f", made on host {host}"
    inputs = table.meta.get("inputs") or {}
    out: dict[str, tuple[float, str]] = {
        "access_tlb_hit": (table.ns("load_hit") / 1000, f"{where}: load_hit (a store that hits the TLB and L1)"),
        "spin_lock_unlock": (table.ns("atomic") / 1000, f"{where}: atomic (lock cmpxchg; the unlock is a plain store)"),
    }
    kr = dict(kernel_result) if kernel_result else None
    kr_where = "ptlab kernel"
    if kr is None and table.meta.get("kernel_result"):
        kr = dict(table.meta["kernel_result"])
        kr_where = f"{where}: its `ptlab kernel` run"
    if kr and kr.get("fault_p50_ns"):
        out["fault_anon"] = (kr["fault_p50_ns"] / 1000, f"{kr_where} ({kr.get('fault_from', 'faults')}), median")
    elif inputs.get("fault_p50_ns"):
        out["fault_anon"] = (inputs["fault_p50_ns"] / 1000, f"{where}: the host's 4 KiB fault, median")
    if kr and kr.get("collapse_p50_ns"):
        out["collapse_o9"] = (kr["collapse_p50_ns"] / 1000, f"{kr_where}: MADV_COLLAPSE, SCAN_SUCCEED median")
    elif (inputs.get("collapse") or {}).get("p50_ns_by_present_pages", {}).get("512"):
        out["collapse_o9"] = (inputs["collapse"]["p50_ns_by_present_pages"]["512"] / 1000, f"{where}: MADV_COLLAPSE of 512 present pages, median")
    # this kernel has no mTHP collapse: the order-4 figure is the cost model's (the virtual
    # backend's price of the same collapse), from the order-9 measurements it was fitted to
    n = 16
    o4 = (table.ns("collapse_fixed") + n * (table.ns("collapse_per_page") + table.ns("copy_page"))
          + table.ns("alloc_page") + (n - 1) * table.ns("alloc_large_per_page"))
    out["collapse_o4"] = (o4 / 1000, f"{where}: derived (no mTHP collapse in this kernel): collapse_fixed + 16 × (collapse_per_page + copy_page) + a 16-page allocation")
    return out


def add_kernel_columns(rows: list[dict[str, Any]], figures: Mapping[str, tuple[float, str]]) -> None:
    """Fill ``kernel_us``, ``dilation`` (median ÷ kernel) and ``kernel_from`` of each row that
    has a kernel figure."""
    for r in rows:
        step = r["step"]
        key = "collapse_" + step.rsplit("_", 1)[1] if step.startswith("collapse_") else step
        if key == "access_recorded":
            key = "access_tlb_hit"
        fig = figures.get(key)
        if fig is None or not fig[0] > 0:
            continue
        r["kernel_us"] = kernel = round(fig[0], 6)
        r["kernel_from"] = fig[1]
        r["dilation"] = None if r["median_us"] is None else round(r["median_us"] / kernel, 1)


# ------------------------------------------------------------------------------ measurements
def run_bench(progress: Callable[[str], None] | None = None, scale: float = 1.0) -> list[dict[str, Any]]:
    """Measure every step (``scale`` < 1 takes fewer samples: tests).  Returns the rows, without
    kernel columns (add_kernel_columns)."""
    say = progress or (lambda s: None)

    def n(base: int) -> int:
        return max(3, int(base * scale))

    rows: list[dict[str, Any]] = []
    config = RunConfig(strategy="pmd-clear", order=9, cpus={"app": 1}, nr_pmds=4)
    m = Machine.create(config)
    cpu = None
    try:
        cpu = CpuContext(m, 0, "app", config, capacity=300_000)
        cpu.register()
        m.populate(cpu, VMA_COLLAPSE)
        oracle = Oracle()
        say("accesses")
        vpns = list(range(48))  # fits the 64-entry TLB: every access after the first hits
        for v in vpns:
            access_store(cpu, oracle, v)
        code = pack(OP["access"], cpu.role_code, 0, RESULT["ok"], 0, 0, False)

        def accesses(every: int) -> list[float]:
            """Batch means (ns) of TLB-hit stores, one in ``every`` recorded as App.step does."""
            out = []
            k = 0
            for _ in range(n(30)):
                t0 = now_ns()
                for v in vpns * 20:
                    k += 1
                    record = k % every == 0
                    if record:
                        cpu.wait_kind = ""
                        a0, s0, z0 = cpu.now(), cpu.spin_ns, cpu.sleep_ns
                    access_store(cpu, oracle, v)
                    if record:
                        cpu.record_access(a0, s0, z0, v, code)
                    cpu.interrupt_point()
                out.append((now_ns() - t0) / (len(vpns) * 20))
                cpu.rec.n = 0
            return out

        sampled = accesses(ACCESS_SAMPLE)
        rows.append(_row("access_tlb_hit", sampled, f"store + oracle check + interrupt point; 1 in {ACCESS_SAMPLE} recorded"))
        every = accesses(1)
        overhead = statistics.median(every) / statistics.median(sampled) - 1
        rows.append(_row("access_recorded", every, f"every access recorded: {overhead:+.0%} over 1 in {ACCESS_SAMPLE}"))
        say("faults")
        faults = []
        for k in range(n(400)):
            v = 64 + (k * 8) % (m.L.vma0_pmds * 512 - 64)
            zap_range(cpu, v, 1)
            t0 = now_ns()
            access_store(cpu, oracle, v)
            faults.append(now_ns() - t0)
        rows.append(_row("fault_anon", faults, "zeroed order-0 folio, per-VMA lock, PTL"))
        say("spin_lock")
        ptl = m.ptl(0)
        lock, unlock = ptl.lock, ptl.unlock
        spins = []
        for _ in range(n(30)):
            t0 = now_ns()
            for _ in range(1000):
                lock(cpu)
                unlock(cpu)
            spins.append((now_ns() - t0) / 1000)
        rows.append(_row("spin_lock_unlock", spins, f"{ptl.name}, uncontended, through SpinLock"))
    finally:
        if cpu is not None:
            cpu.rec.close()
        m.close()
    for strategy in strategies.STRATEGIES:
        for order in (4, 9):
            if order == 9 and strategy in PTE_LEVEL_ONLY:
                continue  # RunConfig refuses it: only pmd-clear models a PMD-order collapse
            say(f"{strategy} order {order}")
            rows.append(_bench_collapse(strategy, order, n(3) if scale < 1 else 3))
    spin = next(i for i, r in enumerate(rows) if r["step"] == "spin_lock_unlock")
    rows.append(rows.pop(spin))  # last, as in the table
    return rows


def _bench_collapse(strategy: str, order: int, rounds: int) -> dict[str, Any]:
    config = RunConfig(strategy=strategy, order=order, cpus={"khugepaged": 1}, nr_pmds=4)
    m = Machine.create(config)
    samples: list[float] = []
    try:
        cpu = CpuContext(m, 0, "khugepaged", config, capacity=10)
        cpu.register()
        try:
            m.populate(cpu, VMA_COLLAPSE)
            mod = strategies.get(strategy)
            n = 1 << order
            # refill a collapsed range with order-0 pages (zap, then touch) between collapses
            oracle = Oracle()
            starts = list(range(0, m.L.vma0_pmds * 512, n))[:16]
            for rep in range(rounds):
                for s in starts:
                    if rep:
                        zap_range(cpu, s, n)
                        for v in range(s, s + n):
                            access_store(cpu, oracle, v)
                    t0 = now_ns()
                    result, _ = collapse_range(cpu, mod, s, order)
                    if result == "SCAN_SUCCEED":
                        samples.append(now_ns() - t0)
        finally:
            cpu.rec.close()
    finally:
        m.close()
    return _row(f"collapse_{strategy}_o{order}", samples, f"{len(samples)} collapses of {1 << order} pages")


def bench_document(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What `ptlab bench --json FILE` writes: the rows, the build, the host and the date."""
    return {
        "bench_format": BENCH_FORMAT,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "build": build_info().to_dict(),
        "rows": rows,
    }


def write_bench(rows: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(bench_document(rows), indent=1, allow_nan=False) + "\n")
    return p
