"""The crossover map: when does sleeping beat spinning?

The seed thread's question is a cost trade-off.  Under ``ptl-hold`` a thread that faults on the
range being collapsed spins on the PTL for the whole copy (``spin_lock()`` in
``do_anonymous_page()`` after ``pte_offset_map_lock()``): it "nukes one unit of computation".
Under ``migration-entry`` it sleeps in ``migration_entry_wait_on_locked()`` and pays a wake-up;
under ``pmd-clear`` (``collapse_huge_page()``: mmap_write_lock, the whole PMD cleared) the
per-VMA lock fails, the fault sleeps on mmap_lock and every mmap() of the process waits too.
Which one costs least depends on the collapse order (how long the copy holds things), on how
many threads fault, on how much the PTL covers (split: one page table; mm-wide: the mm's
``page_table_lock``) and on what keeps the VMA stable during a B or C collapse (the whole
mmap_lock for read, or only the collapsing VMA's per-VMA lock).

This module is the analysis half of ``ptlab crossover`` (the command fans the cells out over
Ray; see cli/commands_crossover.py):

* :class:`Preset` / :data:`PRESETS` -- the grid: orders × faulting (app) CPUs × PTL mode ×
  strategy variant (:data:`VARIANTS`: pmd-clear, and ptl-hold / migration-entry with each VMA
  stability choice), one mmap CPU and one khugepaged in every cell, on the virtual-time backend
  (core/backends/virtual.py); per (PTL mode, CPU count, seed) a baseline cell, the same load without
  khugepaged; and a few cells repeated with another seed to measure seed-to-seed noise.
* :func:`cell_metrics` -- one cell's numbers from its result file (or the same columns in
  memory): CPU time burned spinning per collapse (all CPUs' spin ÷ SCAN_SUCCEED, and, with
  :func:`add_baseline`, the spin the collapses *added* over the baseline, which is what the
  map shows), fault stall p50/p99 in the collapsing VMA, mmap() stall p50/p99, collapse
  throughput; and what produced them (the cost table's and the model source's digests).
* :func:`winner_map` -- per panel (PTL mode × stability) and metric, which strategy wins each
  (order, CPUs) cell and by how much (runner-up ÷ winner, or runner-up − winner where the
  winner's value is <= 0), and whether that margin is inside the seed-to-seed noise of the
  two (:func:`noise_bands`, :func:`band_for`).
* :func:`plot_map`, :func:`plot_real` -- the README's headline figure, and the virtual-time
  points beside the real-backend ones.
* :func:`write_metrics` / :func:`read_metrics` -- the committed table (CSV, one row per cell).

Units: every time is ns (virtual ns for virtual cells), rates per second of the run's clock.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError

# The strategy variants of the map: (strategy, vma_stability).  pmd-clear has one (it always
# takes mmap_lock for write); B and C come with either stability choice.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("pmd-clear", "mmap-lock"),
    ("ptl-hold", "mmap-lock"),
    ("ptl-hold", "vma-lock"),
    ("migration-entry", "mmap-lock"),
    ("migration-entry", "vma-lock"),
)
STRATEGIES = ("pmd-clear", "ptl-hold", "migration-entry")
STABILITIES = ("mmap-lock", "vma-lock")
PTL_MODES = ("split", "mm")

# The metrics of the heat maps: column -> (title, what it measures).  Lower is better for all.
MAP_METRICS: dict[str, tuple[str, str]] = {
    "added_spin_per_collapse_ns": ("CPU burned", "spinning the collapses added (all CPUs, less the same load without khugepaged) per successful collapse"),
    "fault_p99_ns": ("fault stall", "p99 fault latency in the collapsing VMA"),
    "mmap_p99_ns": ("mmap() stall", "p99 latency of mmap()/mprotect()/munmap()"),
}
SPIN_VS_SLEEP = ("ptl-hold", "migration-entry")
# The rows of the figure: (metric, contenders).  The second row is the thread's own question,
# spinning (B) against sleeping (C), with pmd-clear left out.
MAP_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("added_spin_per_collapse_ns", STRATEGIES),
    ("added_spin_per_collapse_ns", SPIN_VS_SLEEP),
    ("fault_p99_ns", STRATEGIES),
    ("mmap_p99_ns", STRATEGIES),
)

# the mmap role's operations: each takes mmap_write_lock_killable() (vm_mmap_pgoff(),
# do_mprotect_pkey(), __vm_munmap()), so each waits out a pmd-clear collapse
MMAP_OPS = ("mmap", "mprotect", "munmap")
VMA_COLLAPSE, VMA_OTHER = 0, 1

# The columns of the metrics table, in order (keys first).
KEY_COLUMNS = ("backend", "strategy", "vma_stability", "variant", "ptl", "order", "app_cpus", "seed")
METRIC_COLUMNS = (
    "duration_s",
    "collapses",
    "collapses_ok",
    "collapse_per_s",
    "collapse_p50_ns",
    "added_spin_per_collapse_ns",
    "added_sleep_per_collapse_ns",
    "spin_total_ns",
    "sleep_total_ns",
    "spin_per_collapse_ns",
    "spin_app_per_collapse_ns",
    "spin_mmap_per_collapse_ns",
    "spin_khugepaged_per_collapse_ns",
    "sleep_per_collapse_ns",
    "sleeps_per_collapse",
    "faults",
    "fault_p50_ns",
    "fault_p99_ns",
    "faults_during",
    "fault_during_p99_ns",
    "other_faults",
    "other_fault_p99_ns",
    "mmap_ops",
    "mmap_p50_ns",
    "mmap_p99_ns",
    "violations",
    "wall_s",
    "virtual_ns_per_wall_s",
    # where the waiting goes: per op class of the app and mmap CPUs, count, spin, sleep (ns)
    *[f"{cls}_{x}" for cls in ("fault", "zap", "mmapop") for x in ("n", "spin_ns", "sleep_ns")],
    "khugepaged_spin_ns",
    "khugepaged_sleep_ns",
    # what produced the numbers: the cost table the cell charged, the model's source
    "costs_sha",
    "model_sha",
)
COLUMNS = KEY_COLUMNS + METRIC_COLUMNS
INT_COLUMNS = {"order", "app_cpus", "seed", "collapses", "collapses_ok", "faults", "faults_during",
                "other_faults", "mmap_ops", "violations", "fault_n", "zap_n", "mmapop_n"}
# op classes of the other CPUs, for the table's "where the waiting goes" columns (role, ops)
OP_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fault": ("app", ("fault",)),
    "zap": ("app", ("zap",)),
    "mmapop": ("mmap", MMAP_OPS),
}
BASELINE = "baseline"  # the variant name of a cell without khugepaged
# metrics that are differences (they can be <= 0): margins and noise are absolute (ns) for them
ADDITIVE = frozenset({"added_spin_per_collapse_ns", "added_sleep_per_collapse_ns"})
_STR_COLUMNS = {"backend", "strategy", "vma_stability", "variant", "ptl", "costs_sha", "model_sha"}


def variant_name(strategy: str, stability: str) -> str:
    """``pmd-clear``, ``ptl-hold/vma-lock``, ...: pmd-clear has no stability choice."""
    return strategy if strategy in ("pmd-clear", BASELINE) else f"{strategy}/{stability}"


# ------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Preset:
    """A crossover grid.  Every cell: ``app_cpus`` CPUs of a multi-threaded application (the
    ``random`` workload: loads and stores to random pages, 90 % in the collapsing VMA, with
    ``think_ns`` of its own work between two, and now and then a MADV_DONTNEED of a few pages,
    which it faults back in later), one CPU churning mmap()/mprotect()/munmap() on other VMAs,
    and one khugepaged, on the virtual-time backend.  The faults a collapse causes come on top
    of the load's own: a thread that touches the range being collapsed finds it pte_none
    (ptl-hold; then spins on the PTL), a migration entry (migration-entry; sleeps) or the PMD
    cleared (pmd-clear; sleeps on mmap_lock).  Cells with fewer than ``scale_below`` app CPUs
    run ``scale_below / app_cpus`` times longer, so that they see about as many faults.  No
    warm-up: CPU totals and event counts then cover the same window.  Each (PTL, CPU count,
    seed) also gets a baseline cell, the same load without khugepaged.  ``noise_*`` name the
    cells repeated with ``noise_seeds`` (split PTL, every variant) to measure how much a
    metric moves from seed to seed."""

    name: str
    orders: tuple[int, ...]
    apps: tuple[int, ...]
    ptls: tuple[str, ...] = PTL_MODES
    variants: tuple[tuple[str, str], ...] = VARIANTS
    duration_s: float = 0.02
    scale_below: int = 8
    think_ns: int = 2000
    nr_pmds: int = 4
    workload: str = "random"
    seed: int = 0
    noise_orders: tuple[int, ...] = ()
    noise_apps: tuple[int, ...] = ()
    noise_seeds: tuple[int, ...] = ()
    description: str = ""

    def duration_for(self, app: int) -> float:
        """Virtual seconds of a cell with ``app`` faulting CPUs."""
        return self.duration_s * max(1.0, self.scale_below / app)

    def base_config(self, strategy: str, stability: str, order: int, app: int, ptl: str, seed: int,
                    backend: str = "virtual", duration_s: float | None = None,
                    khugepaged: int = 1) -> RunConfig:
        """The RunConfig of one cell.  Raises ConfigError for a cell the model refuses."""
        return RunConfig(
            strategy=strategy,
            vma_stability=stability,
            order=order,
            cpus={"app": app, "mmap": 1, "khugepaged": khugepaged},
            ptl=ptl,
            duration_s=self.duration_for(app) if duration_s is None else duration_s,
            warmup_s=0.0,
            workload=self.workload,
            think_ns=self.think_ns,
            nr_pmds=self.nr_pmds,
            seed=seed,
            backend=backend,
            quiesce_s=0.0,  # a quiescent point parks every CPU: no stall of the model's own
        )

    def baseline_config(self, app: int, ptl: str, seed: int) -> RunConfig:
        """The same load with no khugepaged: what the app and mmap CPUs spin and sleep without
        any collapse (the order and strategy do not matter; `ptlab kernel` runs its load with
        the collapser idle for the same reason)."""
        return self.base_config("pmd-clear", "mmap-lock", min(self.orders), app, ptl, seed, khugepaged=0)

    def configs(self) -> list[RunConfig]:
        """Every cell of the grid: the map (seed ``seed``), then the noise repeats, each with
        its baselines (one per PTL mode, CPU count and seed)."""
        out = [
            self.base_config(s, stab, o, a, p, self.seed)
            for p in self.ptls for (s, stab) in self.variants for o in self.orders for a in self.apps
        ]
        out += [self.baseline_config(a, p, self.seed) for p in self.ptls for a in self.apps]
        for seed in self.noise_seeds:
            out += [
                self.base_config(s, stab, o, a, "split", seed)
                for (s, stab) in self.variants for o in self.noise_orders for a in self.noise_apps
            ]
            out += [self.baseline_config(a, "split", seed) for a in self.noise_apps]
        return out

    def real_configs(self, orders: Sequence[int], duration_s: float) -> list[RunConfig]:
        """The real-backend points that 2 host cores allow: 1 app CPU (3 simulated CPUs),
        split PTL, mmap-lock stability, each strategy at each order, on the process backend;
        and their baseline (no khugepaged)."""
        base = self.base_config("pmd-clear", "mmap-lock", min(orders), 1, "split", self.seed,
                                backend="process", duration_s=duration_s, khugepaged=0)
        return [
            self.base_config(s, "mmap-lock", o, 1, "split", self.seed, backend="process", duration_s=duration_s)
            for s in STRATEGIES for o in orders
        ] + [base]


PRESETS: dict[str, Preset] = {
    # the committed reference sweep: 160 map cells, 30 noise repeats, 11 baselines
    "reference": Preset(
        name="reference",
        orders=(2, 4, 6, 8),
        apps=(1, 4, 16, 64),
        duration_s=0.02,
        noise_orders=(4, 8),
        noise_apps=(1, 16, 64),
        noise_seeds=(1,),
        description="orders 2,4,6,8 x app CPUs 1,4,16,64 x PTL split/mm x 5 variants, 0.02 virtual s per cell (x8/N below 8 CPUs)",
    ),
    # a quick look (and the tests' grid): 2 orders x 2 CPU counts, split only
    "quick": Preset(
        name="quick",
        orders=(2, 8),
        apps=(1, 4),
        ptls=("split",),
        duration_s=0.003,
        noise_orders=(8,),
        noise_apps=(4,),
        noise_seeds=(1,),
        description="orders 2,8 x app CPUs 1,4 x split PTL x 5 variants, 0.003 virtual s per cell (x8/N below 8 CPUs)",
    ),
}


def preset(name: str, *, orders: Sequence[int] | None = None, apps: Sequence[int] | None = None,
           ptls: Sequence[str] | None = None, duration_s: float | None = None) -> Preset:
    """A named preset with axes replaced.  Raises ConfigError naming the flag on bad input."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not a choice; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    changes: dict[str, Any] = {}
    if orders is not None:
        bad = [o for o in orders if not 2 <= o <= 8]
        if bad or not orders:
            raise ConfigError(f"--order {bad[0] if bad else '(none)'}: the crossover map is over the mTHP orders 2..8 (ptl-hold and migration-entry refuse order 9)")
        changes["orders"] = tuple(dict.fromkeys(orders))
    if apps is not None:
        bad = [a for a in apps if not 1 <= a <= 124]
        if bad or not apps:
            raise ConfigError(f"--app {bad[0] if bad else '(none)'}: faulting CPUs must be 1..124 (each cell adds one mmap CPU and one khugepaged; at most 127 CPUs)")
        changes["apps"] = tuple(dict.fromkeys(apps))
    if ptls is not None:
        bad = [x for x in ptls if x not in PTL_MODES]
        if bad or not ptls:
            raise ConfigError(f"--ptl {bad[0] if bad else '(none)'!r} is not a choice; choose split or mm (give both for both)")
        changes["ptls"] = tuple(dict.fromkeys(ptls))
    if duration_s is not None:
        if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and 0 < duration_s <= 10):
            raise ConfigError(f"--duration must be 0 < SECONDS <= 10 virtual seconds (got {duration_s})")
        changes["duration_s"] = float(duration_s)
    if changes:
        # noise repeats only where the grid still has those points
        o = changes.get("orders", p.orders)
        a = changes.get("apps", p.apps)
        changes["noise_orders"] = tuple(x for x in p.noise_orders if x in o)
        changes["noise_apps"] = tuple(x for x in p.noise_apps if x in a)
        if "split" not in changes.get("ptls", p.ptls):
            changes["noise_seeds"] = ()
        from dataclasses import replace

        p = replace(p, **changes)
    p.configs()  # validate every cell now, before any Ray time is spent
    return p


# ----------------------------------------------------------------------------- per-cell metrics
def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else math.nan


def _per(total: float, n: int) -> float:
    return total / n if n else math.nan


def cell_metrics(table_or_cols: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The crossover numbers of one run, from its event columns (a pyarrow Table as
    ``read_run`` returns it, or the ``{"columns": ...}`` dict of ``run_cell(..., None)``) and
    its metadata.

    CPU burned: ``spin_ns`` of every CPU (``cpu_stats``, the whole run: app CPUs on the PTL or
    a lock, khugepaged and the mmap CPU waiting for flush acks or locks) divided by the
    SCAN_SUCCEED collapses; when the run had a warm-up, the spin total is scaled to the
    measured window (an approximation; crossover cells have none).  Fault stall: latency of
    ``fault`` events in the collapsing VMA (p50, p99; also those that started during a
    collapse, and the other VMA's).  mmap() stall: latency of the mmap role's
    mmap/mprotect/munmap.  Throughput: SCAN_SUCCEED per second of the run's clock.
    Every time in ns; a metric without data is NaN."""
    cols = _columns(table_or_cols)
    params = dict(meta.get("params") or {})
    op = cols["op"]
    lat = cols["latency_ns"].astype(np.int64)
    spin = cols["spin_ns"].astype(np.int64)
    sleep = cols["sleep_ns"].astype(np.int64)
    vma = cols["vma"].astype(np.int64)
    res = cols["result"]
    during = cols["during_collapse"].astype(bool)
    role = cols["role"]
    summary = meta.get("summary") or {}
    warm = float(params.get("warmup_s", 0.0) or 0.0)
    dur = float(summary.get("duration_s") or params.get("duration_s") or 0.0)
    nominal = float(params.get("duration_s") or dur or 0.0)
    coll = op == "collapse"
    ok = coll & (res == "SCAN_SUCCEED")
    n_ok = int(ok.sum())
    roles = list(meta.get("roles") or [])
    stats = meta.get("cpu_stats") or {}
    spin_by_role: dict[str, float] = {}
    sleep_total, sleeps = 0.0, 0
    for i, r in enumerate(roles):
        st = stats.get(f"cpu{i}") or {}
        spin_by_role[r] = spin_by_role.get(r, 0.0) + float(st.get("spin_ns", 0))
        sleep_total += float(st.get("sleep_ns", 0))
        sleeps += int(st.get("sleeps", 0))
    window = nominal / (warm + nominal) if warm > 0 and nominal > 0 else 1.0
    spin_total = sum(spin_by_role.values()) * window
    fault0 = (op == "fault") & (vma == VMA_COLLAPSE)
    fault1 = (op == "fault") & (vma == VMA_OTHER)
    mm = np.isin(op, MMAP_OPS) & (role == "mmap")
    speed = meta.get("speed") or {}
    cpus = params.get("cpus") or {}
    baseline = int(cpus.get("khugepaged", 0)) == 0
    strategy = BASELINE if baseline else str(params.get("strategy", ""))
    classes: dict[str, Any] = {}
    for cls, (who, ops) in OP_CLASSES.items():
        sel = (role == who) & np.isin(op, ops)
        classes[f"{cls}_n"] = int(sel.sum())
        classes[f"{cls}_spin_ns"] = float(spin[sel].sum()) * 1.0
        classes[f"{cls}_sleep_ns"] = float(sleep[sel].sum()) * 1.0
    kh = [i for i, r in enumerate(roles) if r == "khugepaged"]
    classes["khugepaged_spin_ns"] = sum(float((stats.get(f"cpu{i}") or {}).get("spin_ns", 0)) for i in kh) * window
    classes["khugepaged_sleep_ns"] = sum(float((stats.get(f"cpu{i}") or {}).get("sleep_ns", 0)) for i in kh) * window
    return {
        "backend": str(params.get("backend", "process")),
        "strategy": strategy,
        "vma_stability": str(params.get("vma_stability", "mmap-lock")),
        "variant": variant_name(strategy, str(params.get("vma_stability", "mmap-lock"))),
        "ptl": str(params.get("ptl", "split")),
        "order": 0 if baseline else int(params.get("order", 0)),
        "app_cpus": int((params.get("cpus") or {}).get("app", 0)),
        "seed": int(params.get("seed", 0)),
        "duration_s": nominal,
        "collapses": int(coll.sum()),
        "collapses_ok": n_ok,
        "collapse_per_s": n_ok / nominal if nominal > 0 else math.nan,
        "collapse_p50_ns": _pct(lat[ok], 50),
        "spin_per_collapse_ns": _per(spin_total, n_ok),
        "spin_app_per_collapse_ns": _per(spin_by_role.get("app", 0.0) * window, n_ok),
        "spin_mmap_per_collapse_ns": _per(spin_by_role.get("mmap", 0.0) * window, n_ok),
        "spin_khugepaged_per_collapse_ns": _per(spin_by_role.get("khugepaged", 0.0) * window, n_ok),
        "sleep_per_collapse_ns": _per(sleep_total * window, n_ok),
        "sleeps_per_collapse": _per(sleeps * window, n_ok),
        "faults": int(fault0.sum()),
        "fault_p50_ns": _pct(lat[fault0], 50),
        "fault_p99_ns": _pct(lat[fault0], 99),
        "faults_during": int((fault0 & during).sum()),
        "fault_during_p99_ns": _pct(lat[fault0 & during], 99),
        "other_faults": int(fault1.sum()),
        "other_fault_p99_ns": _pct(lat[fault1], 99),
        "mmap_ops": int(mm.sum()),
        "mmap_p50_ns": _pct(lat[mm], 50),
        "mmap_p99_ns": _pct(lat[mm], 99),
        "violations": int(summary.get("violations", len(meta.get("violations") or []))),
        "wall_s": float(speed.get("wall_s", math.nan)),
        "virtual_ns_per_wall_s": float(speed.get("virtual_ns_per_wall_s", math.nan)),
        "costs_sha": digest((meta.get("costs") or {}).get("charged")) if meta.get("costs") else "",
        "model_sha": "",  # filled in by whoever ran the cell (source_fingerprint())
        "added_spin_per_collapse_ns": math.nan,  # filled in by add_baseline()
        "added_sleep_per_collapse_ns": math.nan,
        "spin_total_ns": spin_total,
        "sleep_total_ns": sleep_total * window,
        **classes,
    }


def digest(obj: Any) -> str:
    """12 hex digits of the SHA-256 of ``obj`` as canonical JSON (a cost table's identity)."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


_FINGERPRINT: list[str] = []


def source_fingerprint() -> str:
    """A hash of the source files of the model modules this process has loaded (ptlab.core,
    ptlab.workloads; this analysis module aside), read once, at the first call -- after the
    process's first cell, so it is the code that process runs even if the tree changes later
    (a Ray worker keeps the modules it imported).  Two cells with different fingerprints ran
    different model code: the tree changed during the sweep and a new worker picked it up."""
    if _FINGERPRINT:
        return _FINGERPRINT[0]
    import hashlib
    import sys

    h = hashlib.sha256()
    for name in sorted(sys.modules):
        if not name.startswith(("ptlab.core", "ptlab.workloads")) or name == __name__:
            continue
        path = getattr(sys.modules[name], "__file__", None) or ""
        if path.endswith(".py"):
            try:
                h.update(name.encode() + b"\0" + Path(path).read_bytes())
            except OSError:
                h.update(name.encode() + b"\0?")
    _FINGERPRINT.append(h.hexdigest()[:12])
    return _FINGERPRINT[0]


def mixed_inputs(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """What makes a table's cells incomparable: more than one cost table, or more than one
    model source, among its virtual cells (one line each; empty when consistent)."""
    rows = [r for r in rows if r.get("backend", "virtual") == "virtual"]
    out = []
    for col, what in (("costs_sha", "cost tables"), ("model_sha", "versions of the model's source")):
        seen: dict[str, int] = {}
        for r in rows:
            if r.get(col):
                seen[str(r[col])] = seen.get(str(r[col]), 0) + 1
        if len(seen) > 1:
            counts = ", ".join(f"{k} ({n} cells)" for k, n in sorted(seen.items(), key=lambda kv: -kv[1]))
            out.append(f"the cells ran with {len(seen)} different {what}: {counts}; the tree changed during the sweep, run it again on a quiet tree")
    return out


def _columns(table_or_cols: Any) -> dict[str, np.ndarray]:
    names = ("op", "latency_ns", "spin_ns", "sleep_ns", "vma", "result", "during_collapse", "role")
    if isinstance(table_or_cols, Mapping):
        src = table_or_cols.get("columns", table_or_cols)
        return {n: np.asarray(src[n], dtype=object if n in ("op", "result", "role") else None) for n in names}
    import pyarrow as pa

    out: dict[str, np.ndarray] = {}
    for n in names:
        col = table_or_cols.column(n)
        if pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        arr = col.to_numpy(zero_copy_only=False)
        out[n] = arr.astype(object) if n in ("op", "result", "role") else arr
    return out


def add_baseline(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows with ``added_spin_per_collapse_ns`` and ``added_sleep_per_collapse_ns`` filled
    in: how much more the machine spun (slept) with the collapses than without them, per
    successful collapse -- the spin (sleep) of all CPUs per second of the cell, less that of
    its baseline cell (the same load, PTL mode, CPU count and seed, without khugepaged; else
    the lowest seed), times the cell's duration, divided by its SCAN_SUCCEED collapses.
    NaN without a baseline or a successful collapse.

    Why not all CPUs' spin ÷ collapses (``spin_per_collapse_ns``, kept in the table): the load
    spins on its own -- every MADV_DONTNEED flushes the TLB of every CPU running the mm and
    waits for the acks, and faulters wait on each other's PTL -- and that grows with the CPU
    count far faster than what the collapses add, so the raw ratio mostly counts the load.
    The difference includes every effect of a collapse on the machine: khugepaged's own
    spinning (its TLB-flush waits, its lock waits), faulters spinning on the PTL it holds,
    and also less spinning where a collapse stops the load (CPUs asleep on mmap_lock do not
    fault or zap meanwhile, and sleeping CPUs are lazy-TLB, so the load's flushes wait for
    fewer acks).  So it can be negative: a strategy that parks the app burns less CPU than
    the app would have -- and loses the app's work instead, which the stall maps show."""
    rows = [dict(r) for r in rows]
    base: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in sorted((r for r in rows if r["strategy"] == BASELINE), key=lambda r: -int(r["seed"])):
        base[(r["backend"], r["ptl"], int(r["app_cpus"]), int(r["seed"]))] = r
        base[(r["backend"], r["ptl"], int(r["app_cpus"]), None)] = r  # the lowest seed wins
    for r in rows:
        if r["strategy"] == BASELINE:
            continue
        b = base.get((r["backend"], r["ptl"], int(r["app_cpus"]), int(r["seed"]))) \
            or base.get((r["backend"], r["ptl"], int(r["app_cpus"]), None))
        n_ok = int(r.get("collapses_ok") or 0)
        dur, bdur = float(r.get("duration_s") or 0), float(b.get("duration_s") or 0) if b else 0.0
        if b is None or not n_ok or dur <= 0 or bdur <= 0:
            r["added_spin_per_collapse_ns"] = r["added_sleep_per_collapse_ns"] = math.nan
            continue
        for kind in ("spin", "sleep"):
            mine, theirs = r.get(f"{kind}_total_ns"), b.get(f"{kind}_total_ns")
            if not (_finite(mine) and _finite(theirs)):
                r[f"added_{kind}_per_collapse_ns"] = math.nan
                continue
            r[f"added_{kind}_per_collapse_ns"] = (float(mine) - float(theirs) * dur / bdur) / n_ok
    return rows


def metrics_from_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`cell_metrics` of one result file.  Raises ResultFileError for a bad file."""
    from ptlab.core.analysis.results import read_run

    r = read_run(path)
    return cell_metrics(r.table, r.meta)


# ---------------------------------------------------------------------------- the table on disk
def write_metrics(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """The metrics table as CSV (one row per cell, :data:`COLUMNS`; NaN as an empty field),
    sorted by its keys, written atomically."""
    from ptlab.core.analysis.results import atomic_write_bytes

    rows = sorted(rows, key=lambda r: tuple(r[k] for k in KEY_COLUMNS))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in COLUMNS])
    return atomic_write_bytes(Path(path), buf.getvalue().encode())


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if abs(v) < 1e6 else f"{v:.0f}"
    return str(v)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics CSV.  Raises ConfigError when it is missing or not one."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no crossover table here (run `ptlab crossover` first)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in KEY_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"{p}: not a crossover metrics table (no column {missing[0]!r})")
    rows = []
    for raw in reader:
        row: dict[str, Any] = {}
        for k, v in raw.items():
            if k in _STR_COLUMNS:
                row[k] = v
            elif k in INT_COLUMNS:
                row[k] = int(v) if v not in ("", None) else 0
            else:
                row[k] = float(v) if v not in ("", None) else math.nan
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------- the map
@dataclass(frozen=True)
class MapCell:
    """One (order, CPUs) cell of one panel: the winner (lowest value), its value, the
    runner-up's ratio to it (>= 1) and difference, every contender's value, and whether the
    margin lies inside the seed-to-seed noise band of the metric (``tie``: the ratio for a
    latency, the difference for an :data:`ADDITIVE` metric)."""

    order: int
    app_cpus: int
    winner: str  # strategy name, "" when fewer than two contenders have a value
    value: float
    runner_up: str
    margin: float  # runner-up / winner; inf when the winner's value is <= 0
    tie: bool
    diff: float = math.nan  # runner-up - winner (ns for times)
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    """One heat map: one metric, one PTL mode, one VMA-stability choice for B and C, and the
    strategies that contend."""

    metric: str
    ptl: str
    stability: str
    orders: tuple[int, ...]
    apps: tuple[int, ...]
    cells: tuple[MapCell, ...]
    bands: Mapping[int, float]  # app CPUs -> the widest noise band of the column's contenders
    contenders: tuple[str, ...] = STRATEGIES

    @property
    def title(self) -> str:
        name = MAP_METRICS.get(self.metric, (self.metric, ""))[0]
        return name if set(self.contenders) == set(STRATEGIES) else f"{name}, {' vs '.join(_INITIAL[s] for s in self.contenders)}"

    def cell(self, order: int, app: int) -> MapCell:
        for c in self.cells:
            if c.order == order and c.app_cpus == app:
                return c
        raise KeyError((order, app))


def _virtual_map_rows(rows: Iterable[Mapping[str, Any]], seed: int | None) -> list[Mapping[str, Any]]:
    out = [r for r in rows if r.get("backend", "virtual") == "virtual"]
    if seed is None:
        seeds = sorted({int(r["seed"]) for r in out})
        seed = seeds[0] if seeds else 0
    return [r for r in out if int(r["seed"]) == seed]


Bands = Mapping[tuple[str, int], float]  # (variant, app CPUs) -> seed-to-seed spread


def noise_bands(rows: Iterable[Mapping[str, Any]], metrics: Iterable[str] = MAP_METRICS) -> dict[str, dict[tuple[str, int], float]]:
    """Per metric, variant and faulting-CPU count, the largest seed-to-seed spread among the
    cells run with more than one seed (over the orders repeated): the ratio max ÷ min over
    the seeds of one cell, or for an :data:`ADDITIVE` metric the difference max - min (ns).
    A winner whose margin is inside the band of the winner or of the runner-up is drawn as a
    tie: one seed cannot tell the two apart (see :func:`band_for` for counts not repeated)."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("backend", "virtual") != "virtual" or r["strategy"] == BASELINE:
            continue
        key = (r["variant"], r["ptl"], int(r["order"]), int(r["app_cpus"]))
        groups.setdefault(key, []).append(r)
    bands: dict[str, dict[tuple[str, int], float]] = {}
    for m in metrics:
        per: dict[tuple[str, int], float] = {}
        for (variant, _, _, app), g in groups.items():
            vals = [float(r[m]) for r in g if _finite(r.get(m))]
            if len(vals) < 2:
                continue
            if m in ADDITIVE:
                spread = max(vals) - min(vals)
            elif min(vals) > 0:
                spread = max(vals) / min(vals)
            else:
                continue
            per[(variant, app)] = max(per.get((variant, app), spread), spread)
        bands[m] = per
    return bands


def band_for(bands: Bands, metric: str, variant: str, app: int) -> float:
    """The noise band of ``variant``'s ``metric`` at ``app`` faulting CPUs: measured there;
    else the larger of those measured at the nearest CPU counts (log scale: 4 sits between 1
    and 16); a variant never repeated takes the largest band of any variant there; no
    repeats at all: no band (1.0, or 0.0 for an additive metric)."""
    mine = {a: v for (var, a), v in bands.items() if var == variant}
    if not mine:
        mine = {}
        for (_, a), v in bands.items():
            mine[a] = max(mine.get(a, v), v)
    if not mine:
        return 0.0 if metric in ADDITIVE else 1.0
    if app in mine:
        return mine[app]
    dist = {a: abs(math.log2(a) - math.log2(app)) for a in mine}
    near = min(dist.values())
    return max(v for a, v in mine.items() if dist[a] == near)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def winner_map(rows: Iterable[Mapping[str, Any]], metric: str, ptl: str, stability: str, *,
               bands: Bands | None = None, seed: int | None = None,
               contenders: Sequence[str] = STRATEGIES) -> Panel:
    """The heat map of ``metric`` (lower wins) for one PTL mode and one VMA-stability choice:
    pmd-clear against ptl-hold and migration-entry with ``stability`` (or only the
    ``contenders`` named), in every (order, app CPUs) cell of the map rows (virtual backend,
    the lowest seed unless ``seed``); ``bands``: the metric's noise bands
    (:func:`noise_bands`).  Raises ConfigError when the rows hold no such panel."""
    rows = _virtual_map_rows(rows, seed)
    want = {("pmd-clear", "mmap-lock"), ("ptl-hold", stability), ("migration-entry", stability)}
    want = {w for w in want if w[0] in contenders}
    mine = [r for r in rows if r["ptl"] == ptl and (r["strategy"], r["vma_stability"]) in want]
    if not any(r["strategy"] != "pmd-clear" for r in mine):
        raise ConfigError(f"no ptl-hold or migration-entry cells with --ptl {ptl} and vma-stability {stability} in the table")
    orders = tuple(sorted({int(r["order"]) for r in mine}))
    apps = tuple(sorted({int(r["app_cpus"]) for r in mine}))
    cells = []
    names = {r["strategy"]: r["variant"] for r in mine}
    band = {(s, a): band_for(bands or {}, metric, names[s], a) for s in names for a in apps}
    used = {a: max(band[(s, a)] for s in names) for a in apps}
    for o in orders:
        for a in apps:
            vals = {r["strategy"]: float(r[metric]) for r in mine
                    if int(r["order"]) == o and int(r["app_cpus"]) == a and _finite(r.get(metric))}
            ranked = sorted(vals.items(), key=lambda kv: (kv[1], STRATEGIES.index(kv[0])))
            if len(ranked) < 2:
                cells.append(MapCell(o, a, "", math.nan, "", math.nan, False, values=vals))
                continue
            (w, wv), (ru, rv) = ranked[0], ranked[1]
            margin = rv / wv if wv > 0 else (1.0 if rv == wv else math.inf)
            b = max(band[(w, a)], band[(ru, a)])
            tie = (rv - wv) <= b if metric in ADDITIVE else margin <= b
            cells.append(MapCell(o, a, w, wv, ru, margin, tie, diff=rv - wv, values=vals))
    return Panel(metric, ptl, stability, orders, apps, tuple(cells), used, tuple(contenders))


def all_panels(rows: Sequence[Mapping[str, Any]],
               map_rows: Iterable[tuple[str, Sequence[str]]] = MAP_ROWS) -> list[Panel]:
    """Every panel of the map, in figure order: the :data:`MAP_ROWS`, then (ptl, stability)
    columns; panels the table has no cells for are left out."""
    map_rows = list(map_rows)
    bands = noise_bands(rows, {m for m, _ in map_rows})
    out = []
    have = {(r["ptl"], r["vma_stability"]) for r in rows
            if r.get("backend", "virtual") == "virtual" and r["strategy"] in SPIN_VS_SLEEP}
    for m, contenders in map_rows:
        for ptl in PTL_MODES:
            for stab in STABILITIES:
                if (ptl, stab) in have:
                    out.append(winner_map(rows, m, ptl, stab, bands=bands.get(m, {}), contenders=contenders))
    return out


def win_counts(panel: Panel) -> dict[str, int]:
    """How many cells of a panel each strategy wins outright (ties not counted)."""
    out = {s: 0 for s in STRATEGIES}
    for c in panel.cells:
        if c.winner and not c.tie:
            out[c.winner] += 1
    return out


def fmt_time(ns: float, *, ascii_only: bool = False) -> str:
    """``12.3µs``, ``4.7ms``: three significant digits in the unit that keeps them short."""
    us = "us" if ascii_only else "µs"
    v = ns / 1e3
    return f"{v / 1e3:.3g}ms" if abs(v) >= 1000 else f"{v:.3g}{us}"


def margin_label(c: MapCell, metric: str, *, ascii_only: bool = False) -> str:
    """How much a cell's winner wins by: ``×2.3`` (runner-up ÷ winner), or for an additive
    metric whose winner is <= 0 (a ratio means nothing there) ``Δ12µs`` (runner-up - winner);
    ``≈`` inside the noise band, ``n/a`` without two contenders.  ``ascii_only``: x, d, us, ~."""
    if not c.winner:
        return "n/a"
    if c.tie:
        return "~" if ascii_only else "≈"
    x, d = ("x", "d") if ascii_only else ("×", "Δ")
    if metric in ADDITIVE and c.value <= 0:
        return f"{d}{fmt_time(c.diff, ascii_only=ascii_only)}"
    if math.isinf(c.margin):
        return f"{x}inf" if ascii_only else "×∞"
    return f"{x}{c.margin:.2f}" if c.margin < 10 else f"{x}{c.margin:.0f}"


def map_text(panels: Sequence[Panel]) -> str:
    """The map as plain ASCII: one block per panel, a row per order, a column per CPU count,
    each cell the winner's letter and its margin (:func:`margin_label`)."""
    initial = _INITIAL
    lines = ["A = pmd-clear, B = ptl-hold, C = migration-entry (lower wins); xN = runner-up / winner,",
             "dN us = runner-up - winner; ~ = inside the seed-to-seed noise of the metric (a tie)"]
    for p in panels:
        lines.append("")
        lines.append(f"{p.title}: PTL {p.ptl}, B/C with {p.stability}")
        lines.append("order \\ app CPUs " + "".join(f"{a:>13}" for a in p.apps))
        for o in p.orders:
            cells = []
            for a in p.apps:
                c = p.cell(o, a)
                text = margin_label(c, p.metric, ascii_only=True)
                cells.append(f"{(initial[c.winner] + ' ' + text) if c.winner else text:>13}")
            lines.append(f"{o:>16} " + "".join(cells))
        fmt = (lambda b: fmt_time(b, ascii_only=True)) if p.metric in ADDITIVE else (lambda b: f"x{b:.2f}")
        lines.append(f"{'noise band':>16} " + "".join(f"{fmt(p.bands[a]):>13}" for a in p.apps))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the figures
_COLORS = {"pmd-clear": "#1f77b4", "ptl-hold": "#d62728", "migration-entry": "#2ca02c"}
_INITIAL = {"pmd-clear": "A", "ptl-hold": "B", "migration-entry": "C"}
_LABELS = {"pmd-clear": "pmd-clear (A)", "ptl-hold": "ptl-hold (B, spins)", "migration-entry": "migration-entry (C, sleeps)"}


def _blend(hex_color: str, t: float) -> tuple[float, float, float]:
    """The colour faded toward white: t = 0 white, t = 1 the full colour."""
    h = hex_color.lstrip("#")
    rgb = [int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    return tuple(1 - t * (1 - c) for c in rgb)  # type: ignore[return-value]


def _strength(c: MapCell) -> float:
    """How strongly a cell is coloured: a tie faint, a win by x4 or more full."""
    if not c.winner:
        return 0.0
    if c.tie:
        return 0.18
    m = min(c.margin, 4.0) if not math.isinf(c.margin) else 4.0
    return 0.35 + 0.65 * math.log(m) / math.log(4.0)


def plot_map(panels: Sequence[Panel], out: str | os.PathLike[str], *, title: str = "") -> Path:
    """The heat maps: one row per metric, one column per (PTL mode, stability) panel; each cell
    coloured by the winning strategy (stronger = wider margin), labelled with runner-up ÷
    winner (``≈`` inside the seed-to-seed noise).  Raises ConfigError when there is nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not panels:
        raise ConfigError("no crossover cells to draw")
    prows = list(dict.fromkeys((p.metric, p.contenders) for p in panels))
    metrics = list(dict.fromkeys(p.metric for p in panels))
    cols = list(dict.fromkeys((p.ptl, p.stability) for p in panels))
    fig = Figure(figsize=(2.7 * len(cols) + 0.6, 2.45 * len(prows) + 1.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(prows), len(cols), squeeze=False)
    for p in panels:
        ax = axes[prows.index((p.metric, p.contenders))][cols.index((p.ptl, p.stability))]
        img = np.ones((len(p.orders), len(p.apps), 3))
        for c in p.cells:
            i, j = p.orders.index(c.order), p.apps.index(c.app_cpus)
            if c.winner:
                img[i, j] = _blend(_COLORS[c.winner], _strength(c))
        ax.imshow(img, origin="lower", aspect="auto")
        for c in p.cells:
            i, j = p.orders.index(c.order), p.apps.index(c.app_cpus)
            label = margin_label(c, p.metric)
            ax.text(j, i, label, ha="center", va="center", fontsize=8.5,
                    color="white" if _strength(c) > 0.75 else "black")
        ax.set_xticks(range(len(p.apps)), [str(a) for a in p.apps], fontsize=8)
        ax.set_yticks(range(len(p.orders)), [str(o) for o in p.orders], fontsize=8)
        r, k = prows.index((p.metric, p.contenders)), cols.index((p.ptl, p.stability))
        if r == len(prows) - 1:
            ax.set_xlabel("faulting CPUs", fontsize=8)
        if k == 0:
            ax.set_ylabel(f"{p.title}\norder", fontsize=9)
        if r == 0:
            ax.set_title(f"PTL {'mm-wide' if p.ptl == 'mm' else 'split'}, B/C {p.stability}", fontsize=9)
    handles = [Patch(color=_COLORS[s], label=_LABELS[s]) for s in STRATEGIES]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    notes = "; ".join(f"{MAP_METRICS[m][0]}: {MAP_METRICS[m][1]}" for m in metrics if m in MAP_METRICS)
    fig.suptitle(title or "Which strategy wins (lower is better)\n×N = runner-up ÷ winner, Δ = runner-up − winner, "
                 "≈ = within the seed-to-seed noise", fontsize=10)
    fig.text(0.5, 0.045, notes, ha="center", fontsize=6.5, wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return _save(fig, out)


def plot_real(virtual: Sequence[Mapping[str, Any]], real: Sequence[Mapping[str, Any]],
              out: str | os.PathLike[str]) -> Path:
    """Virtual time beside the real backend, where 2 cores allow it (1 app CPU, split PTL,
    mmap-lock): all CPUs' spin per collapse and the fault p99 against the order, per strategy;
    virtual as lines, real (process backend) as dashed lines with open markers.  (Not the spin
    *added* over the baseline: on an oversubscribed host the real baseline's own spinning
    swings by more than that.)  Raises ConfigError when either side has no points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def pick(rows: Sequence[Mapping[str, Any]], backend: str) -> list[Mapping[str, Any]]:
        return [r for r in rows if r.get("backend") == backend and int(r["app_cpus"]) == 1
                and r["ptl"] == "split" and r["vma_stability"] == "mmap-lock" and int(r["seed"]) == min(int(x["seed"]) for x in rows)]

    v, p = pick(virtual, "virtual"), pick(real, "process")
    if not v or not p:
        raise ConfigError("the virtual-vs-real figure needs 1-app-CPU cells of both backends (run `ptlab crossover --real`)")
    fig = Figure(figsize=(8.0, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("spin_per_collapse_ns", "spin per collapse, all CPUs (µs)", "log"),
              ("fault_p99_ns", "fault p99, collapsing VMA (µs)", "log"))
    for ax, (metric, ylabel, scale) in zip(axes, panels):
        for s in STRATEGIES:
            for rows, style, mk, lab in ((v, "-", "o", "virtual"), (p, "--", "s", "real")):
                pts = sorted((int(r["order"]), float(r[metric]) / 1e3) for r in rows if r["strategy"] == s and _finite(r.get(metric)))
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker=mk, color=_COLORS[s], mfc="white" if lab == "real" else _COLORS[s],
                            label=f"{s} {lab}")
        ax.set_yscale(scale)
        ax.set_xlabel("collapse order")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6.5, ncol=1)
    fig.suptitle("1 faulting CPU, split PTL: virtual time (kernel costs) vs the real process backend", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: Any, out: str | os.PathLike[str]) -> Path:
    from ptlab.core.analysis.results import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(Path(out), buf.getvalue())


def write_manifest(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> Path:
    """``crossover.json``: the preset, the cost table, host, speed figures (atomic)."""
    from ptlab.core.analysis.results import atomic_write_bytes

    return atomic_write_bytes(Path(path), (json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n").encode())


def speed_table(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Virtual ns per wall second by faulting CPUs (virtual cells): median over the cells with
    that many app CPUs, with the median wall seconds per cell."""
    by: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("backend", "virtual") == "virtual" and _finite(r.get("virtual_ns_per_wall_s")):
            by.setdefault(int(r["app_cpus"]), []).append(r)
    out = []
    for a in sorted(by):
        g = by[a]
        out.append({
            "app_cpus": a,
            "simulated_cpus": a + 2,
            "cells": len(g),
            "virtual_ns_per_wall_s": float(np.median([float(r["virtual_ns_per_wall_s"]) for r in g])),
            "wall_s_per_cell": float(np.median([float(r["wall_s"]) for r in g])),
        })
    return out


__all__ = [
    "BASELINE", "COLUMNS", "MAP_METRICS", "MAP_ROWS", "PRESETS", "SPIN_VS_SLEEP", "VARIANTS", "MapCell", "Panel", "Preset",
    "add_baseline", "all_panels",
    "band_for", "cell_metrics", "digest", "fmt_time", "mixed_inputs", "source_fingerprint", "map_text", "margin_label", "metrics_from_file", "noise_bands", "plot_map", "plot_real",
    "preset", "read_metrics", "speed_table", "variant_name", "win_counts", "winner_map",
    "write_manifest", "write_metrics",
]
