"""``ptlab explore``: search the interleavings of one configuration on the scheduled backend
(core/backends/scheduled.py, cluster/explore.py), stop at the first violation, print the command that replays
it and the shrunk counterexample as a per-CPU story; ``--replay FILE`` / ``--replay-seed S``
re-run one schedule with full tracing and write its events as Arrow (plus a ``step`` column);
``--bench`` measures scheduling steps per second.

Exit status: 0 clean, 1 a violation, 2 bad input, 3 a schedule that could not complete (a
model exception, or no end within --max-steps).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from ptlab.cli.output import EXIT_FAILED, EXIT_VIOLATION, console
from ptlab.core.machine.config import (
    FlushMode,
    HolesMode,
    PtlMode,
    RunConfig,
    Strategy,
    VmaStability,
)
from ptlab.core.machine.errors import ConfigError
from ptlab.workloads.patterns import Workload

DEFAULT_SCHEDULES = 1500  # about a minute on this 2-core machine with 2 workers (measured: 1000 in 40 s)
ROLE_OPTS = ("app", "gup-fast", "gup-slow", "mmap", "zap", "rmap-walk", "pt-walk", "vma-change", "khugepaged")


def register(app: typer.Typer) -> None:
    app.command("explore")(explore_cmd)


def explore_cmd(
    strategy: Annotated[Strategy, typer.Option("--strategy", "-s", help="Collapse strategy to explore.")] = Strategy.PMD_CLEAR,
    order: Annotated[int, typer.Option(help="Target folio order: 2..8 mTHP, 9 PMD THP (pmd-clear only).")] = 4,
    app_cpus: Annotated[int | None, typer.Option("--app", help="CPUs loading/storing and faulting (default with no role flag: 2 app, 1 gup-fast, 1 khugepaged).")] = None,
    gup_fast: Annotated[int | None, typer.Option("--gup-fast", help="CPUs pinning with GUP-fast and writing through the pin.")] = None,
    gup_slow: Annotated[int | None, typer.Option("--gup-slow", help="CPUs pinning with GUP-slow.")] = None,
    mmap: Annotated[int | None, typer.Option("--mmap", help="CPUs churning mmap()/mprotect()/munmap() on other VMAs.")] = None,
    zap: Annotated[int | None, typer.Option("--zap", help="CPUs doing MADV_DONTNEED of random ranges.")] = None,
    rmap_walk: Annotated[int | None, typer.Option("--rmap-walk", help="CPUs walking the rmap (reclaim aging, migration).")] = None,
    pt_walk: Annotated[int | None, typer.Option("--pt-walk", help="CPUs walking page tables (smaps, MADV_COLD).")] = None,
    vma_change: Annotated[int | None, typer.Option("--vma-change", help="CPUs changing the collapsing VMA (mprotect, MAP_FIXED).")] = None,
    khugepaged: Annotated[int | None, typer.Option("--khugepaged", help="CPUs running khugepaged with the strategy.")] = None,
    mix: Annotated[str | None, typer.Option(help="A named role mix (see `ptlab run --help`); per-role flags override it.")] = None,
    workload: Annotated[Workload, typer.Option(help="Access pattern (the hot set is shared by app, GUP and zap CPUs).")] = Workload.HOTSET,
    seed: Annotated[int, typer.Option(help="First schedule: schedules are seed .. seed+N-1 (each the workload's and the scheduler's seed).")] = 0,
    flush: Annotated[FlushMode, typer.Option(help="ipi (x86: a flush waits for every ack) or broadcast (TLBI/INVLPGB).")] = FlushMode.IPI,
    ptl: Annotated[PtlMode, typer.Option(help="split: one PTE lock per page table; mm: one page_table_lock.")] = PtlMode.SPLIT,
    vma_locks: Annotated[bool, typer.Option("--vma-locks/--no-vma-locks", help="Per-VMA locks for faults.")] = True,
    unsafe: Annotated[bool, typer.Option("--unsafe", help="Allow --inject-bug (known-broken kernel paths).")] = False,
    inject_bug: Annotated[list[str] | None, typer.Option("--inject-bug", help="Inject a named bug or mutant (repeatable); see `ptlab strategies`. Needs --unsafe.")] = None,
    chaos: Annotated[bool, typer.Option("--chaos", help="The process backend's random delays at race points (here: one more point each).")] = False,
    pin_hold_us: Annotated[int, typer.Option(help="How long a pin is held: the device writes through it every 20 µs.")] = 1000,
    stress_target: Annotated[str, typer.Option("--stress-target", "--pin-target", metavar="[workload|collapse]", help="Where GUP and zap CPUs act: where the workload goes, or in the range being collapsed.")] = "workload",
    nr_pmds: Annotated[int, typer.Option(help="Size of the collapsing VMA in PMDs (512 pages each).")] = 1,
    zap_pages: Annotated[int, typer.Option(help="Pages per MADV_DONTNEED of app and zap CPUs (512: whole PMDs, so a THP is zapped whole by zap_huge_pmd instead of split).")] = 8,
    frames: Annotated[int, typer.Option(help="Physical frames (0: sized from the VMA).")] = 0,
    max_ptes_none: Annotated[int, typer.Option(help="khugepaged max_ptes_none (0..511).")] = 511,
    mthp_fault_order: Annotated[int, typer.Option(help="Faults on an all-none aligned range allocate this order (0: off).")] = 0,
    holes: Annotated[HolesMode, typer.Option(help="migration-entry only: mark or backoff (see `ptlab run --help`).")] = HolesMode.MARK,
    vma_stability: Annotated[VmaStability, typer.Option(help="ptl-hold / migration-entry: mmap-lock or vma-lock.")] = VmaStability.MMAP_LOCK,
    scheduler: Annotated[str, typer.Option("--scheduler", metavar="random[:P[:Q[:L[:H]]]]|pct[:D]", help="random: switch CPUs with probability P at a point, Q at a named race point or a delay, parking the preempted CPU until the next one passes about L named points (default 0.05:0.5:3); with H > 0, a CPU preempted inside a GUP-fast walk is held with probability H until another CPU frees a page table; pct: probabilistic concurrency testing of depth D.")] = "random",
    depth: Annotated[int | None, typer.Option(help="PCT depth (bugs needing up to DEPTH-1 preemptions); implies --scheduler pct.")] = None,
    pct_k: Annotated[int, typer.Option("--pct-k", help="PCT's expected steps per schedule (0: measured from one schedule).")] = 0,
    schedules: Annotated[int, typer.Option("--schedules", "-n", help=f"Schedules to run (default {DEFAULT_SCHEDULES}: about a minute on 2 cores).")] = DEFAULT_SCHEDULES,
    ops: Annotated[list[str] | None, typer.Option("--ops", metavar="ROLE=N", help="Operations per CPU of a role (repeatable; caps: CPUs other than khugepaged stop when the collapses are done).")] = None,
    empty: Annotated[float, typer.Option(help="Share of the collapsing VMA unpopulated at the start (so faults race collapses).")] = 0.25,
    max_steps: Annotated[int, typer.Option(help="Scheduling steps after which a schedule counts as not ending.")] = 400_000,
    workers: Annotated[int, typer.Option(help="Parallel workers (Ray tasks); 1 runs in this process without Ray.")] = os.cpu_count() or 1,
    batch: Annotated[int, typer.Option(help="Schedules per Ray task (0: sized from --schedules and --workers).")] = 0,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (auto or host:port); default: an embedded Ray on loopback.")] = None,
    replay: Annotated[Path | None, typer.Option("--replay", metavar="FILE", help="Re-run the schedule in a replay file with full tracing.")] = None,
    replay_seed: Annotated[int | None, typer.Option("--replay-seed", metavar="S", help="Re-run schedule S of these flags with full tracing.")] = None,
    no_shrink: Annotated[bool, typer.Option("--no-shrink", help="Do not shrink a failing schedule.")] = False,
    shrink_budget: Annotated[int, typer.Option(help="Schedules the shrinker may run.")] = 400,
    bench: Annotated[bool, typer.Option("--bench", help="Measure scheduling steps per second and schedules per minute on one core.")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="With --bench: where the time goes (cProfile).")] = False,
    bench_seconds: Annotated[float, typer.Option(help="With --bench: how long to measure.")] = 10.0,
    catalog: Annotated[bool, typer.Option("--catalog", help="Explore every injectable bug and mutant (or those named by --inject-bug) in its own cell: schedules to the first catch of an expected kind from --base-seeds base seeds, at most --schedules each.")] = False,
    base_seeds: Annotated[int, typer.Option(help="With --catalog: how many base seeds (0, 100000, 200000, ...).")] = 20,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for replay files and traces.")] = Path("results/explore"),
) -> None:
    """Explore the interleavings of one configuration on the deterministic backend: every
    simulated CPU a task of this process, every shared-memory operation a scheduling point.
    Stops at the first violation and prints it, the command that replays it, and a shrunk
    counterexample (fewest CPUs, operations and preemptions) as a per-CPU story.  A clean
    exploration prints what it covered.

    Exit status: 0 clean, 1 a violation, 2 bad input, 3 a schedule that could not complete.
    """
    from ptlab.cluster import explore as ex

    flags = {"app": app_cpus, "gup-fast": gup_fast, "gup-slow": gup_slow, "mmap": mmap, "zap": zap,
             "rmap-walk": rmap_walk, "pt-walk": pt_walk, "vma-change": vma_change, "khugepaged": khugepaged}
    if replay is not None and replay_seed is not None:
        raise ConfigError("--replay and --replay-seed: give one of them")
    if replay is not None:
        rf = ex.ReplayFile.read(replay)
        _replay(rf.plan, rf.seed, rf, out, source=str(replay))
        return
    if catalog:
        if schedules < 1 or workers < 1 or base_seeds < 1:
            raise ConfigError("--catalog needs --schedules, --workers and --base-seeds of at least 1")
        _catalog(tuple(inject_bug or ()), base_seeds, schedules, workers, address)
        return
    if mix:
        from ptlab.workloads.mixes import get_mix

        cpus = get_mix(mix)
        cpus.update({r: n for r, n in flags.items() if n is not None})
        cpus = {r: n for r, n in cpus.items() if n}
    elif any(v is not None for v in flags.values()):
        cpus = {r: n for r, n in flags.items() if n}
    else:
        cpus = dict(ex.EXPLORE_CPUS)
    bugs = tuple(inject_bug or ())
    if not 1 <= zap_pages <= 512 * max(1, nr_pmds):
        raise ConfigError(f"--zap-pages must be 1..{512 * max(1, nr_pmds)} (the collapsing VMA's pages; got {zap_pages})")
    config = RunConfig(strategy=strategy.value, order=order, cpus=cpus, workload=workload.value, seed=seed, flush=flush.value,
                       ptl=ptl.value, vma_locks=vma_locks, inject_bugs=bugs, unsafe=unsafe, chaos=chaos, pin_hold_us=pin_hold_us,
                       nr_pmds=nr_pmds, nr_frames=frames, zap_pages=zap_pages, max_ptes_none=max_ptes_none, mthp_fault_order=mthp_fault_order,
                       holes=holes.value, vma_stability=vma_stability.value, stress_target=stress_target)
    if depth is not None:
        if not 1 <= depth <= 10:
            raise ConfigError(f"--depth {depth} is out of range; PCT depths are 1..10")
        if not (scheduler == "random" or scheduler.startswith("pct")):
            raise ConfigError(f"--depth applies to PCT; drop it or use --scheduler pct (got --scheduler {scheduler})")
        scheduler = f"pct:{depth}"
    ex.parse_scheduler(scheduler)
    op_caps = ex.validate_ops(ops or ())
    for name, v, lo in (("--schedules", schedules, 1), ("--workers", workers, 1), ("--max-steps", max_steps, 100),
                        ("--shrink-budget", shrink_budget, 1)):
        if v < lo:
            raise ConfigError(f"{name} must be at least {lo} (got {v})")
    if batch < 0 or pct_k < 0:
        raise ConfigError(f"{'--batch' if batch < 0 else '--pct-k'} must be >= 0")
    if not 0 <= empty < 1:
        raise ConfigError(f"--empty must be in [0, 1) (got {empty})")
    if bench_seconds <= 0:
        raise ConfigError(f"--bench-seconds must be positive (got {bench_seconds})")
    from ptlab.core.kernel.bugs import expected_kinds

    plan = ex.Plan(config, scheduler, op_caps, pct_k or 20_000, max_steps, empty, ex.EXPLORE_TAIL, expected_kinds(bugs) if bugs else ())
    if scheduler.startswith("pct") and not pct_k:
        probe = plan.run(seed, ex.RandomPoints(seed))  # PCT's k: the length of a schedule of these flags
        plan = ex.Plan(config, scheduler, op_caps, _round_k(probe.steps), max_steps, empty, ex.EXPLORE_TAIL, plan.expect)
    if bench:
        _bench(plan, bench_seconds, seed, profile)
        return
    if replay_seed is not None:
        _replay(plan, replay_seed, None, out, source=f"seed {replay_seed}")
        return
    _explore(plan, schedules, seed, workers, batch, address, out, no_shrink, shrink_budget)


def _round_k(steps: int) -> int:
    return max(1000, -(-int(steps * 1.25) // 1000) * 1000)


# ------------------------------------------------------------------------------------ explore
def _explore(plan: Any, schedules: int, base: int, workers: int, batch: int, address: str | None, out: Path,
             no_shrink: bool, shrink_budget: int) -> None:
    from ptlab.cluster import explore as ex
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    con, err = console(), console(stderr=True)
    cfg = plan.config
    what = f"{cfg.strategy} order {cfg.order}, CPUs {_cpus_text(cfg.cpus)}" + (f", bugs {'+'.join(cfg.inject_bugs)}" if cfg.inject_bugs else "")
    err.print(f"exploring {what}: {schedules} schedules from seed {base}, scheduler {plan.scheduler}"
              + (f" (k={plan.k})" if plan.scheduler.startswith("pct") else "")
              + (f", {workers} workers" if workers > 1 or address else ", in this process"))
    with Progress(TextColumn("[bold]schedules"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("explore", total=schedules)
        res = ex.explore(plan, schedules, base, workers=workers, address=address, batch=batch,
                         progress=lambda done, total: bar.update(task, completed=done))
    rate = f"{res.runs / res.seconds * 60:,.0f} schedules/min" if res.seconds else ""
    con.print(f"{res.runs} schedules, {res.steps:,} scheduling steps in {res.seconds:.1f} s ({rate}; "
              f"{res.steps_per_s:,.0f} steps/s per worker)")
    if res.stop is None:
        _coverage(con, plan, res, schedules)
        return
    stop = res.stop
    seed = stop["seed"]
    verdict = {"caught": "VIOLATION", "wrong_kind": "VIOLATION (not a kind the injected bug is expected to produce)",
               "failed": "RUN FAILED"}[stop["status"]]
    con.print(f"\n[bold red]{verdict}[/] in schedule {seed}: {ex.describe_violation(stop['violation'])}")
    if plan.expect and stop["status"] == "caught":
        con.print(f"  expected for {'+'.join(cfg.inject_bugs)}: one of {', '.join(plan.expect)}")
    rf = ex.replay_file_for(plan, seed)
    stem = _stem(plan, seed)
    path = rf.write(out / f"{stem}.replay.json")
    con.print("\nreplay it (bit for bit, full trace):")
    con.print(f"  ptlab explore --replay {shlex.quote(str(path))}")
    con.print(f"  {_seed_command(plan, seed)}")
    if rf.trace_hash != stop["trace_hash"]:
        err.print(f"[yellow]warning:[/] schedule {seed} gave trace hash {rf.trace_hash} here, {stop['trace_hash']} on its worker")
    if no_shrink:
        raise typer.Exit(EXIT_FAILED if stop["status"] == "failed" else EXIT_VIOLATION)
    with err.status("shrinking") as st:
        sh = ex.shrink(plan, seed, stop["kind"], budget=shrink_budget, progress=lambda msg: st.update(f"shrinking: {msg}"))
    spath = sh.replay_file().write(out / f"{stem}-shrunk.replay.json")
    r0_cpus = plan.config.nr_cpus
    con.print(f"\nshrunk counterexample ({sh.trials} schedules tried): {sh.plan.config.nr_cpus} CPUs (from {r0_cpus}: "
              f"{_cpus_text(sh.plan.config.cpus)}), operations {_ops_text(sh)}, {sh.preemptions} preemption(s), "
              f"{sh.result.steps} steps; {ex.describe_violation(sh.result.first)}")
    con.print(f"  ptlab explore --replay {shlex.quote(str(spath))}\n")
    for line in ex.render_timeline(sh.result):
        con.print(line, markup=False, highlight=False)
    raise typer.Exit(EXIT_FAILED if stop["status"] == "failed" else EXIT_VIOLATION)


def _coverage(con: Any, plan: Any, res: Any, schedules: int) -> None:
    from ptlab.cluster import explore as ex
    from ptlab.core.kernel.khugepaged import PHASES

    pairs = res.cover
    during = {(p, s) for p, s in pairs if p != "none"}
    steps = sorted({s for _, s in pairs})
    con.print(f"[green]clean[/]: no violation in {res.runs} schedules.")
    con.print(f"coverage: {len(pairs)} distinct (collapse phase x step of another CPU) pairs, {len(during)} with a "
              f"collapse phase in flight; {len(steps)} kinds of step met a collapse phase")
    phases = ("none", *PHASES)
    w = max([len(s) for s in steps] + [4])
    con.print("  " + "step".ljust(w) + "  " + " ".join(p[:8].rjust(8) for p in phases), markup=False, highlight=False)
    for s in steps:
        con.print("  " + s.ljust(w) + "  " + " ".join(("x" if (p, s) in pairs else ".").rjust(8) for p in phases), markup=False, highlight=False)
    d = ex.pct_depth(plan.scheduler)
    n = plan.config.nr_cpus
    if d is None:
        con.print(f"scheduler {plan.scheduler}: no probability bound (--scheduler pct gives one); for reference, "
                  f"PCT of depth 2 over {res.runs} schedules of ~{max(1, res.steps // max(1, res.runs))} steps: "
                  f"{ex.pct_bound(n, max(1, res.steps // max(1, res.runs)), 2, res.runs):.3g}")
    else:
        p1 = ex.pct_bound(n, plan.k, d)
        con.print(f"PCT depth {d}, k={plan.k}, n={n}: a bug of depth {d} is found by one schedule with probability >= "
                  f"1/(n k^(d-1)) = {p1:.3g}, by these {res.runs} schedules with >= {ex.pct_bound(n, plan.k, d, res.runs):.3g}"
                  + "".join(f"; depth {dd}: {ex.pct_bound(n, plan.k, dd, res.runs):.3g}" for dd in range(1, d)))


# ------------------------------------------------------------------------------------ replay
def _replay(plan: Any, seed: int, rf: Any, out: Path, source: str) -> None:
    from ptlab.cluster import explore as ex

    con, err = console(), console(stderr=True)
    r = rf.run(trace=True) if rf is not None else plan.run(seed, trace=True)
    if rf is not None and rf.trace_hash and r.trace_hash != rf.trace_hash:
        err.print(f"[yellow]warning:[/] trace hash {r.trace_hash} differs from the recorded {rf.trace_hash}: the model changed since the file was written")
    elif rf is not None:
        con.print(f"replayed {source}: trace hash {r.trace_hash} (as recorded)")
    path = ex.write_trace(out / f"{_stem(plan, seed)}-{r.trace_hash}.arrow", r, plan, seed, source)
    con.print(f"schedule {seed} of {plan.config.strategy} ({plan.scheduler}): {r.outcome}, {r.steps} steps, trace hash {r.trace_hash}")
    for line in ex.render_timeline(r, max_rows=10**9):
        con.print(line, markup=False, highlight=False)
    v = ex.judge(plan, r)
    con.print(f"\n{'clean' if not v.bad else ex.describe_violation(v.violation)}")
    con.print(f"trace: {path}")
    if v.bad:
        raise typer.Exit(EXIT_FAILED if v.status == "failed" else EXIT_VIOLATION)


# ------------------------------------------------------------------------------------ catalog
def _catalog(names: tuple[str, ...], base_seeds: int, budget: int, workers: int, address: str | None) -> None:
    import statistics

    from ptlab.cluster import explore as ex
    from rich.table import Table

    con, err = console(), console(stderr=True)
    cases = ex.catalog(names)
    known = {c.label for c in ex.catalog()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--inject-bug {unknown[0]}: not in the catalog of bugs and mutants with an expected kind; see `ptlab check --mutants --list`")
    err.print(f"{len(cases)} bugs and mutants x {base_seeds} base seeds, at most {budget} schedules each")
    done = [0]

    def say(label: str, res: dict[str, Any]) -> None:
        done[0] += 1
        err.print(f"  [{done[0]}/{len(cases) * base_seeds}] {label} base {res['base']}: "
                  + (f"caught after {res['n']} ({res['kind']})" if res["n"] else f"not within {budget}"), highlight=False)

    res = ex.catalog_run(cases, base_seeds, budget, workers=workers, address=address, progress=say)
    table = Table(title=f"ptlab explore --catalog: schedules to the first catch ({base_seeds} base seeds, budget {budget})")
    for col in ("bug / mutant", "strategy", "order", "flush", "CPUs", "caught", "median", "worst", "kinds", "s/schedule"):
        table.add_column(col, justify="right" if col in ("order", "caught", "median", "worst", "s/schedule") else "left")
    missed = 0
    for c in cases:
        rs = res[c.label]
        ns = [r["n"] for r in rs if r["n"]]
        missed += len(rs) - len(ns)
        runs = sum(r["runs"] for r in rs) or 1
        cfg = c.plan.config
        table.add_row(c.label, cfg.strategy, str(cfg.order), cfg.flush, _cpus_text(cfg.cpus), f"{len(ns)}/{len(rs)}",
                      f"{statistics.median(ns):g}" if ns else "-", str(max(ns)) if len(ns) == len(rs) else f">{budget}",
                      ", ".join(sorted({r["kind"] for r in rs if r["kind"]})), f"{sum(r['seconds'] for r in rs) / runs:.3f}")
    con.print(table)
    if missed:
        raise typer.Exit(EXIT_VIOLATION)


# ------------------------------------------------------------------------------------ bench
def _bench(plan: Any, seconds: float, seed: int, profile: bool) -> None:
    from ptlab.cluster import explore as ex

    con, err = console(), console(stderr=True)
    with err.status(f"measuring for {seconds:g} s"):
        b = ex.bench(plan, seconds, seed, profile)
    cfg = plan.config
    con.print(f"{cfg.strategy} order {cfg.order}, CPUs {_cpus_text(cfg.cpus)}, scheduler {plan.scheduler}: "
              f"{b['steps_per_s']:,.0f} scheduling steps/s, {b['schedules_per_min']:,.0f} schedules/min per core "
              f"({b['steps_per_schedule']:,.0f} steps, {b['seconds'] / b['schedules'] * 1e3:.0f} ms per schedule; "
              f"{b['schedules']} schedules in {b['seconds']:.1f} CPU s, {b['wall_s']:.1f} s wall, load average {b['load']:.1f})")
    for row in b.get("profile", []):
        con.print(f"  {row['share'] * 100:5.1f} %  {row['own_s']:7.2f} s  {row['calls']:>9}  {row['function']}", markup=False, highlight=False)


# ------------------------------------------------------------------------------------ helpers
def _cpus_text(cpus: Any) -> str:
    return ", ".join(f"{n} {r}" for r, n in cpus.items() if n)


def _ops_text(sh: Any) -> str:
    roles = sorted(set(sh.result.roles))
    return ", ".join(f"{r}={sh.plan.all_ops[r]}" for r in roles)


def _stem(plan: Any, seed: int) -> str:
    bugs = "+".join(plan.config.inject_bugs) or "safe"
    return f"{plan.config.strategy}-o{plan.config.order}-{bugs}-s{seed}"


def _seed_command(plan: Any, seed: int) -> str:
    """The ``ptlab explore ... --replay-seed S`` line that re-runs schedule ``seed`` of ``plan``."""
    from ptlab.cluster import explore as ex

    c = plan.config
    argv = ["ptlab", "explore", "-s", c.strategy, "--order", str(c.order)]
    for role in ROLE_OPTS:
        if c.cpus.get(role):
            argv += [f"--{role}", str(c.cpus[role])]
    if c.workload != Workload.HOTSET.value:
        argv += ["--workload", c.workload]
    for name, default in (("flush", "ipi"), ("ptl", "split"), ("holes", "mark"), ("vma_stability", "mmap-lock")):
        if getattr(c, name) != default:
            argv += [f"--{name.replace('_', '-')}", str(getattr(c, name))]
    if not c.vma_locks:
        argv.append("--no-vma-locks")
    if c.stress_target != "workload":
        argv += ["--stress-target", c.stress_target]
    for b in c.inject_bugs:
        argv += ["--inject-bug", b]
    if c.inject_bugs:
        argv.append("--unsafe")
    if c.chaos:
        argv.append("--chaos")
    for name, default in (("pin_hold_us", 1000), ("nr_pmds", 1), ("nr_frames", 0), ("max_ptes_none", 511), ("mthp_fault_order", 0), ("zap_pages", 8)):
        if getattr(c, name) != default:
            argv += ["--frames" if name == "nr_frames" else f"--{name.replace('_', '-')}", str(getattr(c, name))]
    if plan.scheduler != "random":
        argv += ["--scheduler", plan.scheduler]
    if plan.scheduler.startswith("pct"):
        argv += ["--pct-k", str(plan.k)]
    for role, n in sorted(plan.ops.items()):
        if ex.EXPLORE_OPS.get(role) != n:
            argv += ["--ops", f"{role}={n}"]
    if plan.empty != ex.EXPLORE_EMPTY:
        argv += ["--empty", f"{plan.empty:g}"]
    if plan.max_steps != 400_000:
        argv += ["--max-steps", str(plan.max_steps)]
    argv += ["--replay-seed", str(seed)]
    return shlex.join(argv)


__all__ = ["register"]
