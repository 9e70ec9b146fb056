"""The host kernel's own step costs for the virtual clock (`ptlab calibrate --kernel`): the
measurements in C (core/probe/_kprobe.c) and the table derived from them (core/analysis/costs.py).
It lives with the kernel probe because it measures the host kernel."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ptlab.core.machine import _prims
from ptlab.core.machine.errors import ConfigError

Progress = Callable[[str, float], None]


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# ---- the kernel cost table (`ptlab calibrate --kernel`) ----------------------------------------
# What each kernel step costs the host kernel, in ns, for the virtual clock (core/analysis/costs.py holds
# and checks the table).  The C loops are in ptlab.core.probe._kprobe (cost_*): no Python runs inside
# a timed window.  Two statistics, said in every source text: a loop of back-to-back operations
# gives one mean per batch, and the table takes the lower quartile of the batch means (the host's
# two cores are shared, and interference only ever adds time); an event timed on its own (a
# fault, a collapse, an IPI) is taken at its median, as `ptlab kernel` reports them.

KERNEL_COST_PAGES = 512  # HPAGE_PMD_NR: MADV_COLLAPSE collapses PMD order only


def _q25(xs: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), 25))


def _p50(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def _vmstat() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if v.strip().isdigit():
                    out[k] = int(v)
    except OSError:
        pass
    return out


def kernel_result_latencies(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The host kernel's median same-VMA fault (no collapse in flight) and median successful
    MADV_COLLAPSE, in ns, from a `ptlab kernel` run: either of its two files, the other phase
    found beside it through the metadata.  Raises ConfigError naming --kernel-result."""
    from ptlab.core.analysis.results import ResultFileError, read_run
    from ptlab.core.probe.kernel_probe import KIND, SUCCEED, Events

    p = Path(path)
    try:
        run = read_run(p)
    except ResultFileError as e:
        raise ConfigError(f"--kernel-result: {e}") from None
    if run.meta.get("kind") != KIND:
        raise ConfigError(
            f"--kernel-result {p}: not a `ptlab kernel` result (kind {run.meta.get('kind')!r}); "
            f"give its -loaded.arrow or -baseline.arrow file"
        )
    params = run.meta.get("params") or {}
    runs = {params.get("phase"): run}
    for phase, name in (params.get("files") or {}).items():
        if phase not in runs and name and (p.parent / name).exists():
            try:
                runs[phase] = read_run(p.parent / name)
            except ResultFileError:
                pass
    loaded, baseline = runs.get("loaded"), runs.get("baseline")
    if loaded is None:
        raise ConfigError(
            f"--kernel-result {p}: the run's loaded phase (…-loaded.arrow, the one with "
            f"collapses) is neither given nor beside it"
        )
    ev = Events.from_table(loaded.table)
    coll = ev.latency_ns[ev.select(op="collapse") & (ev.result == SUCCEED)]
    if not len(coll):
        raise ConfigError(f"--kernel-result {loaded.path}: the kernel made no successful collapse")
    if baseline is not None:
        evb = Events.from_table(baseline.table)
        faults, fault_from = evb.lat(op="fault", vma="same"), f"{baseline.path.name}, same-VMA faults"
    else:
        faults = ev.lat(op="fault", vma="same", during=False)
        fault_from = f"{loaded.path.name}, same-VMA faults with no collapse in flight"
    if not len(faults):
        raise ConfigError(f"--kernel-result {p}: the run has no same-VMA faults")
    return {
        "path": str(p),
        "run_id": loaded.meta.get("run_id"),
        "fault_p50_ns": float(np.median(faults)),
        "fault_n": int(len(faults)),
        "fault_from": fault_from,
        "collapse_p50_ns": float(np.median(coll)),
        "collapse_n": int(len(coll)),
        "collapse_from": f"{loaded.path.name}, SCAN_SUCCEED collapses",
    }


@contextmanager
def _idle_busy(core: int | None) -> Iterator[None]:
    """Keep host ``core`` busy with a SCHED_IDLE thread of this process (a C loop that releases
    the GIL, in short batches until told to stop): a task woken there preempts it at once, as
    it preempts `ptlab kernel`'s SCHED_IDLE load, and the core never halts."""
    if core is None or not hasattr(os, "SCHED_IDLE"):
        yield
        return
    import threading

    from ptlab.core.probe import _kprobe as kp

    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        started.set()  # before SCHED_IDLE: a busy host may not run an idle thread for long
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except OSError:
            pass
        while not stop.is_set():
            kp.cost_loop("load_hit", 1, 200_000, core)

    th = threading.Thread(target=spin, name="ptlab-idle-busy", daemon=True)
    th.start()
    started.wait()
    try:
        yield
    finally:
        stop.set()
        try:  # back to the normal policy, so that it gets to see the stop
            os.sched_setscheduler(th.native_id or 0, os.SCHED_OTHER, os.sched_param(0))
        except (OSError, TypeError):
            pass
        th.join()


class _Costs:
    """The table as it is filled in: name -> (ns, source, kind), plus the raw inputs."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[float, str, str]] = {}
        self.inputs: dict[str, Any] = {}

    def measured(self, name: str, ns: float, source: str) -> None:
        self.rows[name] = (ns, f"measured: {source}", "measured")

    def cited(self, name: str, why: str = "") -> None:
        from ptlab.core.analysis.costs import CITED

        ns, source = CITED[name]
        self.rows[name] = (ns, source + (f"; {why}" if why else ""), "cited")

    def derived(self, name: str, ns: float, source: str) -> None:
        if not ns > 0:
            source = f"{source}; CLAMPED to 1 ns: the arithmetic gave {ns:.0f} ns"
            ns = 1.0
        self.rows[name] = (ns, f"derived: {source}", "derived")

    def ns(self, name: str) -> float:
        return self.rows[name][0]


def _fmt_ns(ns: float) -> str:
    return f"{ns / 1000:.2f} µs" if ns >= 10_000 else f"{ns:.1f} ns"


def _measure_raw(quick: bool, say: Progress, frac0: float, frac1: float) -> dict[str, Any]:
    """One pass of every C measurement: the statistic of each (see the section comment) and
    what the source texts need.  Times in ns; None where a measurement could not be made."""
    from ptlab.core.probe import _kprobe as kp

    cores = _cores()
    c0 = cores[0]
    c1 = cores[1] if len(cores) >= 2 else None
    s = 0.15 if quick else 1.0

    def n(x: int, lo: int = 3) -> int:
        return max(lo, int(x * s))

    def step(name: str, at: float) -> None:
        say(name, frac0 + (frac1 - frac0) * at)

    r: dict[str, Any] = {"c0": c0, "c1": c1, "cores": cores}
    step("load_hit, atomic, rwsem", 0.0)
    r["batches"] = b = n(40, 8)
    r["load_hit"] = _q25(kp.cost_loop("load_hit", b, n(200_000, 20_000), c0))
    r["atomic"] = _q25(kp.cost_loop("atomic", b, n(200_000, 20_000), c0))
    r["rwsem"] = _q25(kp.cost_loop("rwsem", b, n(100_000, 10_000), c0))
    r["futex_syscall"] = _q25(kp.cost_loop("futex_wake", b, n(10_000, 1_000), c0))

    step("copy_page, zero_page", 0.1)
    r["runs"] = runs = n(60, 8)
    pmd = 2 << 20
    r["copy"] = _p50(kp.cost_copy("copy", pmd, pmd, runs, c0))
    r["copy_cold"] = _p50(kp.cost_copy("copy", 32 * pmd, pmd, n(32, 8), c0))
    r["zero"] = _p50(kp.cost_copy("zero", pmd, pmd, runs, c0))
    r["zero_cold"] = _p50(kp.cost_copy("zero", 32 * pmd, pmd, n(32, 8), c0))

    step("tlb_walk", 0.2)
    pages, tn = 16384, n(200_000, 40_000)
    r["tlb_pages"] = pages
    small: list[float] = []
    huge: list[float] = []
    thp = 0
    for _ in range(n(4, 2)):  # interleaved, so a noisy neighbour lands on both
        small += kp.cost_tlb_walk(pages, 5, tn, False, c0)
        before = _vmstat().get("thp_fault_alloc", 0)
        huge += kp.cost_tlb_walk(pages, 5, tn, True, c0)
        thp += _vmstat().get("thp_fault_alloc", 0) - before
    r["tlb_small"], r["tlb_huge"] = _q25(small), _q25(huge)
    r["tlb_huge_ok"] = thp >= n(4, 2) * pages // 512

    step("line_transfer", 0.3)
    r["line_batches"] = lb = n(400, 60)
    r["line"] = _q25(kp.cost_line_transfer(lb, 64, c0, c1)) if c1 is not None else None

    step("ipi_round_trip", 0.35)
    r["mb_error"] = None
    r["mb_ipi"] = r["mb_base"] = None
    r["mb_sent"] = 0
    if c1 is not None:
        try:
            mb = kp.cost_membarrier(n(600, 150), c0, c1)
        except OSError as e:
            r["mb_error"] = os.strerror(e.errno or 0)
        else:
            target = np.asarray(mb["target"], dtype=np.float64)
            alone = np.asarray(mb["alone"], dtype=np.float64)
            if mb["ipis"]:
                sent = np.asarray(mb["ipis"]) > 0
                r["mb_how"] = "calls during which that core took a function-call interrupt (/proc/interrupts)"
            else:  # no count: the IPI calls are the slow mode, far above the no-IPI calls
                sent = target > np.percentile(alone, 99) + 1000
                r["mb_how"] = "calls slower than the no-IPI p99 + 1 µs (/proc/interrupts has no count)"
            quiet = target[~sent]
            r["mb_alone"] = float(np.median(alone))
            r["mb_base"] = float(np.median(quiet)) if len(quiet) >= 20 else float(np.median(alone))
            r["mb_sent"], r["mb_calls"] = int(sent.sum()), int(len(target))
            r["mb_ipi"] = float(np.median(target[sent])) if sent.sum() >= 5 else None

    step("futex_wake_to_run", 0.45)
    nw = n(1000, 150)
    skip = max(5, nw // 10)
    with _idle_busy(c1):
        w = _prims.ref_futex_wake_to_run(nw + skip, c0, c1 if c1 is not None else -1)[skip:]
    r["w2r"], r["w2r_n"] = _p50(w), len(w)

    step("context_switch", 0.55)
    r["ctx_batches"] = cb = n(120, 20)
    r["ctxsw"] = _q25(kp.cost_context_switch(cb, 50, c0))

    step("mmap_body", 0.6)
    r["mmap_n"] = nm = n(3000, 300)
    r["mmap"] = _p50(kp.cost_mmap(nm, 64 << 10, c0))

    step("faults", 0.65)
    rounds = n(200, 20)
    f = kp.cost_fault(64, rounds + 1, c0)[64:]  # round 0 also allocates the page table
    r["fault"], r["fault_n"] = _p50(f), len(f)
    before = _vmstat()
    r["thp_n"] = nt = n(40, 8)
    thp_lat = kp.cost_thp_fault(nt, c0, 1)
    after = _vmstat()
    ok = after.get("thp_fault_alloc", 0) - before.get("thp_fault_alloc", 0) >= nt
    r["thp"] = _p50(thp_lat) if ok else None

    points = (8, 512) if quick else (8, 64, 256, 512)
    crounds, per = (2, 2) if quick else (8, 3)  # interleaved, so drift lands on every point
    r["collapse_rounds"], r["collapse_n"] = crounds, crounds * per
    samples: dict[int, list[float]] = {k: [] for k in points}
    drains: list[float] = []
    errors: dict[str, int] = {}
    failed = False
    for rnd in range(crounds):
        step(f"collapse (round {rnd + 1} of {crounds})", 0.75 + 0.25 * rnd / crounds)
        for k in points:
            try:
                res = kp.cost_collapse(per, c0, c1 if c1 is not None else -1, k)
            except OSError as e:
                errors[os.strerror(e.errno or 0)] = errors.get(os.strerror(e.errno or 0), 0) + 1
                failed = True
                break
            for e, cnt in res["errors"].items():
                errors[os.strerror(e)] = errors.get(os.strerror(e), 0) + cnt
            samples[k] += res["collapse"]
            drains += res["drain"]
        if failed or errors.get(os.strerror(22)):  # EINVAL: no MADV_COLLAPSE here
            break
    r["collapse"] = {k: _p50(v) for k, v in samples.items() if len(v) >= max(2, crounds * per // 2)}
    r["collapse_errors"] = errors
    r["drain"] = _p50(drains) if drains else None
    r["drain_n"] = len(drains)
    return r


# How the passes of --repeat combine: interference only ever adds time to these, so each takes
# its least disturbed pass (the minimum); the LRU drain is the exception -- a starved load leaves
# nothing to drain and makes it *faster* -- so it takes the median of the passes.
# The TLB walk is a difference of two chases, which interference can move either way (a
# neighbour thrashing the caches slows the small-page chase most, or both alike): it takes the
# pass with the median difference.
_RAW_MIN = ("load_hit", "atomic", "rwsem", "futex_syscall", "copy", "copy_cold", "zero",
            "zero_cold", "line", "mb_ipi", "mb_base", "mb_alone", "w2r", "ctxsw", "mmap", "fault",
            "thp")


def _merge_raw(passes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    r = dict(passes[0])
    for key in _RAW_MIN:
        vals = [p[key] for p in passes if p.get(key) is not None]
        r[key] = min(vals) if vals else None
    drains = [p["drain"] for p in passes if p.get("drain") is not None]
    r["drain"] = float(np.median(drains)) if drains else None
    r["drain_n"] = sum(p.get("drain_n", 0) for p in passes)
    walk = sorted(passes, key=lambda p: p["tlb_small"] - p["tlb_huge"])[len(passes) // 2]
    r["tlb_small"], r["tlb_huge"] = walk["tlb_small"], walk["tlb_huge"]
    r["tlb_huge_ok"] = all(p["tlb_huge_ok"] for p in passes)
    r["mb_sent"] = sum(p.get("mb_sent", 0) for p in passes)
    r["mb_calls"] = sum(p.get("mb_calls", 0) for p in passes)
    if any(p.get("mb_ipi") is None for p in passes):
        ok = [p for p in passes if p.get("mb_ipi") is not None]
        r["mb_ipi"] = min(p["mb_ipi"] for p in ok) if ok else None
        r["mb_base"] = min(p["mb_base"] for p in ok) if ok else r["mb_base"]
    ks = set.intersection(*(set(p["collapse"]) for p in passes))
    r["collapse"] = {k: min(p["collapse"][k] for p in passes) for k in sorted(ks)}
    r["collapse_errors"] = {}
    for p in passes:
        for e, c in p["collapse_errors"].items():
            r["collapse_errors"][e] = r["collapse_errors"].get(e, 0) + c
    return r


def kernel_costs(quick: bool = False, kernel_result: str | os.PathLike[str] | None = None,
                 progress: Progress | None = None, anchor: Mapping[str, Any] | None = None,
                 repeat: int = 1) -> Any:
    """Measure the kernel cost table on this host and return it (a core.costs.CostTable).

    ``quick``: small samples (about a second; for tests and a first look), else a few seconds.
    ``kernel_result``: a `ptlab kernel` result file; its median fault and collapse then anchor
    fault_entry, collapse_fixed and collapse_per_page, else this host's own minimal fault loop
    and MADV_COLLAPSE loop do.  Entries that user space cannot time are cited (core.costs.CITED).
    ``anchor``: kernel_result_latencies(kernel_result) when the caller has read it already.
    ``repeat``: measure that many times and keep, per measurement, the least disturbed pass
    (see _RAW_MIN): on a shared host, interference only ever adds time.
    Raises ConfigError for an unusable --kernel-result or repeat < 1; never leaves a mapping
    or a thread behind (the C loops clean up before returning).
    """
    from ptlab.core.analysis.costs import CostEntry, CostTable, table_meta

    if repeat < 1:
        raise ConfigError(f"--repeat must be at least 1 (got {repeat})")
    say = progress or (lambda msg, frac: None)
    kres = dict(anchor) if anchor is not None else (
        kernel_result_latencies(kernel_result) if kernel_result is not None else None)
    load0 = list(os.getloadavg())
    passes = []
    for i in range(repeat):
        tag = f"pass {i + 1}/{repeat}: " if repeat > 1 else ""
        passes.append(_measure_raw(quick, lambda m, f, tag=tag: say(tag + m, f),
                                   i / repeat, (i + 1) / repeat))
    raw = _merge_raw(passes)
    t = _derive(raw, kres, repeat)
    say("done", 1.0)
    meta = table_meta({
        "method": ("quick" if quick else "full") + (f", best of {repeat} passes" if repeat > 1 else ""),
        "kernel_result": kres,
        "inputs": t.inputs,
        "loadavg_before": load0,
    })
    entries = {k: CostEntry(ns=float(v[0]), source=v[1], kind=v[2]) for k, v in t.rows.items()}
    return CostTable(entries=entries, meta=meta)


def _derive(raw: Mapping[str, Any], kres: Mapping[str, Any] | None, repeat: int) -> _Costs:
    """The table from the measurements: every entry with its source."""
    t = _Costs()
    c0, c1, cores = raw["c0"], raw["c1"], raw["cores"]
    t.inputs["cores"] = {"self": c0, "other": c1, "usable": cores}
    q25 = "the lower quartile of the batch means"
    if repeat > 1:
        q25 += f", the least of {repeat} passes"
    p50 = "the least of the passes' medians" if repeat > 1 else "median"
    b = raw["batches"]

    t.measured("load_hit", raw["load_hit"], f"a dependent load chain on one L1-resident line (p = *p), {b} batches; {q25}")
    t.measured("atomic", raw["atomic"], f"back-to-back lock xadd on a private line (__atomic_fetch_add), {b} batches; {q25}")
    t.measured("rwsem_op", raw["rwsem"], f"pthread_rwlock_rdlock + unlock uncontended (a stand-in for down_read + up_read: two atomics), {b} batches; {q25}")
    t.measured("futex_syscall", raw["futex_syscall"], f"futex(FUTEX_WAKE_PRIVATE) on a word nobody waits on, {b} batches; {q25}")

    runs = raw["runs"]
    t.inputs["copy_page_cold_ns"] = raw["copy_cold"]
    t.inputs["zero_page_cold_ns"] = raw["zero_cold"]
    t.measured("copy_page", raw["copy"], (
        f"rep movsb of 4 KiB (x86 copy_mc_enhanced_fast_string, the collapse's copy) over a 2 MiB run "
        f"into another, both recently touched (the collapse copies pages the faulting threads just "
        f"wrote); {p50} of {runs} runs of 512 pages.  Through a 64 MiB pool (not cached): "
        f"{_fmt_ns(raw['copy_cold'])}"))
    t.measured("zero_page", raw["zero"], (
        f"rep stosb of 4 KiB (x86 clear_page_erms) over a recently used 2 MiB run (faults clear "
        f"pages just freed to the per-CPU lists); {p50} of {runs} runs of 512 pages.  Through a "
        f"64 MiB pool: {_fmt_ns(raw['zero_cold'])}"))

    small, huge, pages = raw["tlb_small"], raw["tlb_huge"], raw["tlb_pages"]
    t.inputs["tlb_walk"] = {"small_ns": small, "huge_ns": huge, "thp": raw["tlb_huge_ok"]}
    if raw["tlb_huge_ok"] and small - huge > 0:
        t.measured("tlb_walk", small - huge, (
            f"a random pointer chase over one line in each of {pages} pages (64 MiB, beyond the "
            f"STLB's reach) with 4 KiB pages ({_fmt_ns(small)} per load) minus the same lines in "
            f"2 MiB pages ({_fmt_ns(huge)}), interleaved: the page walk, its entries cached; "
            f"the lower quartile of each chase's batch means"
            + (f", the pass with the median difference of {repeat}" if repeat > 1 else "")))
    else:
        why = ("no THP for the 2 MiB-page buffer" if not raw["tlb_huge_ok"]
               else f"the 4 KiB-page chase was not slower ({small - huge:.1f} ns)")
        t.cited("tlb_walk", f"not measured here: {why}")
    t.cited("tlb_flush_local")

    if raw["line"] is not None:
        t.measured("line_transfer", raw["line"], (
            f"two threads on host cores {c0} and {c1} pass a counter on one line back and forth, "
            f"{raw['line_batches']} batches of 64 round trips; half the round trip; {q25}"))
    else:
        t.cited("line_transfer")

    t.cited("ipi_per_target")
    if c1 is None:
        t.cited("ipi_round_trip", "one usable core: no IPI target")
    elif raw["mb_error"]:
        t.cited("ipi_round_trip", f"membarrier unavailable here ({raw['mb_error']})")
    else:
        t.inputs["membarrier"] = {k: raw.get(k) for k in ("mb_alone", "mb_base", "mb_ipi", "mb_sent", "mb_calls")}
        ipi, base = raw["mb_ipi"], raw["mb_base"]
        if ipi is not None and ipi > base:
            t.measured("ipi_round_trip", ipi - base, (
                f"membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) from core {c0} while a thread of "
                f"the process runs on core {c1}: the {p50} of the {raw['mb_how']} "
                f"({_fmt_ns(ipi)}; {raw['mb_sent']} of {raw['mb_calls']} calls) minus that of the "
                f"calls that IPI nobody ({_fmt_ns(base)})"))
        else:
            t.cited("ipi_round_trip", f"membarrier sent {raw['mb_sent']} IPIs of {raw['mb_calls']} "
                    f"calls (core {c1} busy): too few to time")

    where = (f"cores {c0} -> {c1}, core {c1} kept busy by a SCHED_IDLE thread as `ptlab kernel`'s "
             f"load keeps it (an idle vCPU would add its wake-from-halt)" if c1 is not None
             else f"core {c0} (one usable core)")
    t.measured("futex_wake_to_run", raw["w2r"], (
        f"FUTEX_WAKE stamp to the sleeper running again, two pthreads on {where}, the sleeper "
        f"asleep 20 µs first (ptlab.core.machine._prims.ref_futex_wake_to_run); {p50} of {raw['w2r_n']}"))
    t.measured("context_switch", raw["ctxsw"], (
        f"two threads pinned to core {c0} hand it to each other with futex wait/wake (perf bench "
        f"sched pipe's shape), {raw['ctx_batches']} batches of 50 round trips; half the round "
        f"trip; {q25}"))
    t.measured("mmap_body", raw["mmap"], (
        f"mmap() + munmap() of an untouched 64 KiB anonymous region (no page faults), {p50} of "
        f"{raw['mmap_n']}"))

    t.inputs["fault_p50_ns"] = fault_p50 = raw["fault"]
    t.inputs["thp_fault_p50_ns"] = thp_p50 = raw["thp"]
    t.cited("alloc_page")
    alloc = t.ns("alloc_page")
    zero = t.ns("zero_page")
    if kres is not None:
        fault_ns = kres["fault_p50_ns"]
        fault_src = f"the host kernel's median fault in {kres['fault_from']} ({kres['fault_n']} faults)"
    else:
        fault_ns = fault_p50
        fault_src = (f"the {p50} of {raw['fault_n']} write faults of a minimal loop here (mmap "
                     f"anon, touch each of 64 pages, MADV_DONTNEED, repeat)")
    t.derived("fault_entry", fault_ns - zero - alloc, (
        f"{fault_src}, {_fmt_ns(fault_ns)}, minus zero_page ({_fmt_ns(zero)}) minus alloc_page "
        f"({_fmt_ns(alloc)})"))
    per = (thp_p50 - fault_p50) / 511 - zero if thp_p50 is not None else 0.0
    if thp_p50 is not None and per > 0:
        t.derived("alloc_large_per_page", per, (
            f"a THP fault here ({_fmt_ns(thp_p50)}, {p50} of {raw['thp_n']}: "
            f"do_huge_pmd_anonymous_page, order-9 allocation and 512 clears) minus the 4 KiB fault "
            f"({_fmt_ns(fault_p50)}), per each of the 511 extra pages, minus zero_page"))
    else:
        t.cited("alloc_large_per_page", "no THP fault measured here" if thp_p50 is None
                else f"the THP fault arithmetic gave {per:.1f} ns")

    _derive_collapse(t, raw, kres, p50)
    return t


def _derive_collapse(t: _Costs, raw: Mapping[str, Any], kres: Mapping[str, Any] | None, p50: str) -> None:
    """lru_drain, collapse_fixed, collapse_per_page from the MADV_COLLAPSE loop (and the
    kernel run's median collapse when anchored)."""
    c1, cores = raw["c1"], raw["cores"]
    meds: dict[int, float] = raw["collapse"]
    errors = raw["collapse_errors"]
    t.inputs["collapse"] = {"p50_ns_by_present_pages": meds, "errors": errors}
    # The IPIs of one collapse_huge_page(), by the kernel's code (kernel-brief.md §1.3 steps 8-9):
    # pmdp_collapse_flush() -> flush_tlb_range() IPIs the other CPUs running the mm (here the
    # load's one core), tlb_remove_table_sync_one() IPIs every other online CPU and waits.
    online = os.cpu_count() or len(cores)
    ipi = t.ns("ipi_round_trip")
    ipis_ns = (ipi + ipi + max(0, online - 2) * t.ns("ipi_per_target")) if online > 1 else 0.0
    nipi_src = ("the two IPI rounds of collapse_huge_page() -- pmdp_collapse_flush() to the core "
                "running the load, tlb_remove_table_sync_one() to every other online CPU -- "
                "at ipi_round_trip (+ ipi_per_target per extra target)")
    copy, zero, alloc = t.ns("copy_page"), t.ns("zero_page"), t.ns("alloc_page")
    alloc9 = alloc + 511 * t.ns("alloc_large_per_page")
    if raw["drain"] is not None:
        t.measured("lru_drain", raw["drain"], (
            f"MADV_COLLAPSE on a range that is already PMD-mapped: madvise_collapse() runs "
            f"lru_add_drain_all() and finds SCAN_PMD_MAPPED at once, so this is the drain plus the "
            f"madvise() call; a SCHED_IDLE thread faults pages on core {c1} meanwhile, as `ptlab "
            f"kernel`'s load does; median of {raw['drain_n']}"
            + (" (the median of the passes' medians)" if p50 != "median" else "")))
    else:
        t.derived("lru_drain", t.ns("futex_wake_to_run") + t.ns("context_switch"), (
            "no MADV_COLLAPSE here: one queue_work_on() + flush_work() round trip, "
            "futex_wake_to_run + context_switch"))
    drain = t.ns("lru_drain")
    parts = (f"lru_drain ({_fmt_ns(drain)}), the order-9 allocation (alloc_page + 511 × "
             f"alloc_large_per_page = {_fmt_ns(alloc9)}) and {nipi_src} ({_fmt_ns(ipis_ns)})")
    if len(meds) >= 2:
        ks = np.array(sorted(meds), dtype=np.float64)
        ys = np.array([meds[int(k)] for k in ks])
        slope, icpt = (float(x) for x in np.polyfit(ks, ys, 1))
        # t(k) = A + k (copy + per_page) + (512 - k) zero: absent pages are cleared, not copied
        per_page_m = slope - copy + zero
        fixed_all = icpt - KERNEL_COST_PAGES * zero  # A: drain, allocation, IPIs and the rest
        t.inputs["collapse"].update({"slope_ns_per_page": slope, "intercept_ns": icpt})
        fit = (f"MADV_COLLAPSE of a 2 MiB range with {', '.join(str(int(k)) for k in ks)} of 512 "
               f"pages present (the rest pte_none, cleared instead of copied), {raw['collapse_n']} "
               f"each in {raw['collapse_rounds']} interleaved rounds, medians"
               f"{' (each the least of the passes)' if p50 != 'median' else ''} "
               f"{', '.join(_fmt_ns(meds[int(k)]) for k in ks)}: a line through them gives "
               f"{_fmt_ns(slope)} per present page and {_fmt_ns(icpt)} at none")
        fixed_m = fixed_all - drain - alloc9 - ipis_ns
        note = ""
        if fixed_m < 0:  # the parts taken out exceed the fit's value at none: noise
            note = (f" (that leaves {_fmt_ns(fixed_m)}: the fixed work is within this host's "
                    f"noise of zero, taken as 0)")
            fixed_m = 0.0
        t.inputs["collapse"]["fixed_fit_ns"] = fixed_m
        t.inputs["collapse"]["per_page_small_folios_ns"] = per_page_m
        if kres is not None:
            total = kres["collapse_p50_ns"]
            rest = total - drain - alloc9 - ipis_ns - KERNEL_COST_PAGES * copy
            mine = fixed_m + KERNEL_COST_PAGES * max(per_page_m, 0.0)
            share = fixed_m / mine if mine > 0 else 1.0
            if per_page_m <= 0:
                note += (f" (the fit's per-page work came out at {_fmt_ns(per_page_m)}: noise, "
                         f"taken as 0)")
            # both parts at least 1 ns, and they add up to the kernel's number exactly
            per_page = max(1.0, rest * (1.0 - share) / KERNEL_COST_PAGES)
            fixed = rest - KERNEL_COST_PAGES * per_page
            if fixed < 1.0:
                fixed, per_page = 1.0, (rest - 1.0) / KERNEL_COST_PAGES
            anchor = (f"; anchored on the host kernel's median collapse {_fmt_ns(total)} "
                      f"({kres['collapse_from']}, {kres['collapse_n']}): what it leaves after the "
                      f"drain, allocation, IPIs and 512 copies ({_fmt_ns(rest)}) is split between "
                      f"fixed and per-page work as the fit here splits it ({share:.1%} fixed).  "
                      f"`ptlab kernel` re-splits each PMD before collapsing it again, so its "
                      f"collapses take 511 pages of one PTE-mapped large folio (isolated once) and "
                      f"one small page: per page they cost less than the 512 small folios here "
                      f"({_fmt_ns(per_page_m)} per page)")
            t.derived("collapse_per_page", per_page, (
                f"{fit}; per page: the slope minus copy_page plus zero_page{note}{anchor}"))
            t.derived("collapse_fixed", fixed, (
                f"{fit}; fixed: that value minus 512 × zero_page, minus {parts}{note}{anchor}"))
        else:
            t.derived("collapse_per_page", per_page_m, (
                f"{fit}; per page: the slope minus copy_page plus zero_page"))
            t.derived("collapse_fixed", fixed_m, (
                f"{fit}; fixed: that value minus 512 × zero_page, minus {parts}{note}"))
    else:
        why = f"MADV_COLLAPSE failed here ({', '.join(errors) or 'no successful collapse'})"
        mig = 1100.0  # kernel-brief.md §7: migrate 4 KiB end to end ~1.1 µs/page (Shivank Garg)
        t.derived("collapse_per_page", mig - copy, (
            f"{why}: migrating 4 KiB end to end costs ~1.1 µs (kernel-brief.md §7, Shivank Garg's "
            f"RFC v3 on Zen 3: unmap, flush, copy, remap) minus copy_page"))
        total = kres["collapse_p50_ns"] if kres is not None else 185_000.0
        src = (f"the host kernel's median collapse {_fmt_ns(total)} ({kres['collapse_from']})" if kres
               else "an order-9 MADV_COLLAPSE of ~0.16-0.21 ms (core/probe/kernel_probe.py, 2-vCPU VM)")
        t.derived("collapse_fixed", total - drain - alloc9 - ipis_ns
                  - KERNEL_COST_PAGES * (copy + t.ns("collapse_per_page")),
                  f"{why}: {src} minus {parts} minus 512 × (copy_page + collapse_per_page)")
