"""``ptlab run``, ``ptlab check`` and ``ptlab strategies``: run the strategies for real, prove
the oracle, and explain what each strategy and bug does."""

from __future__ import annotations

import os
import tempfile
import textwrap
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from ptlab.cli.output import EXIT_FAILED, EXIT_VIOLATION, ray_output_to_log
from ptlab.cli.output import console as _console
from ptlab.core.kernel.bugs import BUG_TEXT, STRATEGY_TEXT, CheckCase, check_cases, expected_kinds
from ptlab.core.machine.config import (
    BUGS,
    FlushMode,
    HolesMode,
    PtlMode,
    RunConfig,
    Strategy,
    VmaStability,
)
from ptlab.core.machine.errors import ConfigError, RunFailed
from ptlab.workloads.mixes import MIXES, default_cpus, get_mix
from ptlab.workloads.patterns import Workload
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# results to stdout, progress and warnings to stderr; piped, neither is cut at 80 columns
console = _console()
err = _console(stderr=True)


class StrategyChoice(str, Enum):
    PMD_CLEAR = "pmd-clear"
    PTL_HOLD = "ptl-hold"
    MIGRATION_ENTRY = "migration-entry"
    ALL = "all"


def _writable_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; give a directory for the result files")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".ptlab-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write results to {out}: {e.strerror}; pick another --out") from None
    return out


def _cpus_from_flags(mix: str | None, flags: dict[str, int | None]) -> dict[str, int]:
    if mix:
        cpus = get_mix(mix)
    elif any(v is not None for v in flags.values()):
        cpus = {}
    else:
        cpus = default_cpus(os.cpu_count() or 1)
    for role, n in flags.items():
        if n is not None:
            cpus[role] = n
    return {r: n for r, n in cpus.items() if n}


def _placement_spec(spec: str, cpus: dict[str, int]) -> str:
    """``--placement``: a spec as given, or a `ptlab kernel` result file turned into one (the
    core and policy its thread of each role ran with).  Raises ConfigError."""
    if not spec or not (spec.endswith(".arrow") or Path(spec).is_file()):
        return spec
    from ptlab.core.analysis.results import read_meta
    from ptlab.core.probe.kernel_probe import KIND, sim_placement

    if not Path(spec).is_file():
        raise ConfigError(f"--placement {spec}: no such file; give a `ptlab kernel` result file or CORE[:idle],...")
    meta = read_meta(spec)
    if meta.get("kind") != KIND:
        raise ConfigError(f"--placement {spec} is not a `ptlab kernel` result file; give one, or CORE[:idle],...")
    return sim_placement(meta.get("params") or {}, RunConfig(cpus=cpus, backend="virtual"))


def _progress(show: bool = True) -> Progress:
    """The bars go to stderr (results go to stdout); ``show=False`` (``--no-progress``,
    ``--quiet``) draws nothing."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=_console(stderr=True, quiet=not show),
        transient=False,
        disable=not show,
    )


def run_configs(configs: list[RunConfig], out: Path, address: str | None, labels: list[str] | None = None, *, progress: bool = True) -> list[tuple[RunConfig, Path | None, str]]:
    """Run configs one after another on the embedded (or given) Ray with a progress bar each
    (on stderr; none when ``progress`` is False).  Ray's own output goes to a log file in
    Ray's log directory, not to the terminal.  Returns (config, path or None, error) per run;
    a failed run does not stop the others, and its error is one line that ends by saying
    where Ray's logs are."""
    from ptlab.cluster.cell import run_cell
    from ptlab.cluster.sweep import connect

    results: list[tuple[RunConfig, Path | None, str]] = []
    quiet_ray = ray_output_to_log()
    with quiet_ray as ray_log:
        # virtual-time runs are one process each: Ray only for the process backend
        started = connect(address) if any(c.backend == "process" for c in configs) else False
        quiet_ray.ray_started()
        try:
            with _progress(progress) as bars:
                for k, c in enumerate(configs):
                    label = labels[k] if labels else f"{c.strategy} order {c.order}"
                    task = bars.add_task(label, total=1.0, status="starting")

                    def say(msg: str, frac: float, task: Any = task) -> None:
                        bars.update(task, completed=frac, status=msg)

                    try:
                        path = run_cell(c, out, progress=say)
                        bars.update(task, completed=1.0, status="done")
                        results.append((c, Path(path), ""))  # type: ignore[arg-type]
                    except RunFailed as e:
                        bars.update(task, status="[red]failed")
                        results.append((c, None, f"{e} ({ray_log.where()})"))
        finally:
            if started:
                import ray

                ray.shutdown()
    return results


def _summary_line(path: Path) -> tuple[str, int]:
    """One run's result line (rich markup) and its number of violations.  Rates use the
    measured duration (summary.duration_s); accesses are scaled up from the 1-in-N sample."""
    from ptlab.core.analysis.compare import fmt_num
    from ptlab.core.analysis.results import read_run

    r = read_run(path)
    s = r.meta["summary"]
    coll = s.get("collapses", {})
    ok = coll.get("SCAN_SUCCEED", 0)
    total = sum(coll.values())
    n_v = s.get("violations", 0)
    dur = r.duration_s or 1.0
    ev = s.get("events", {})
    verdict = "[green]clean[/]" if n_v == 0 else f"[red]{n_v:,} violation(s): {', '.join(f'{k}×{v:,}' for k, v in s['violation_kinds'].items())}[/]"
    line = (
        f"{r.meta['params']['strategy']:16} order {r.meta['params']['order']}: {ok:,}/{total:,} collapses succeeded "
        f"({fmt_num(ok / dur)}/s), {ev.get('fault', 0):,} faults, {ev.get('access', 0) * r.sample_factor('access'):,} accesses; {verdict}\n"
        f"    {path}"
    )
    return line, n_v


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        strategy: Annotated[StrategyChoice, typer.Option("--strategy", "-s", help="Collapse strategy to run; 'all' runs the three back to back and compares them.")] = StrategyChoice.ALL,
        order: Annotated[int, typer.Option(help="Target folio order: 2..8 are mTHP sizes (4 = 64 KiB, the thread's case), 9 is a PMD THP (2 MiB; pmd-clear only).")] = 4,
        duration: Annotated[float, typer.Option("--duration", "-d", help="Measured seconds per run (after a short warm-up that is discarded).")] = 3.0,
        app_cpus: Annotated[int | None, typer.Option("--app", help="CPUs loading/storing through the TLB, faulting, and freeing memory now and then.")] = None,
        gup_fast: Annotated[int | None, typer.Option("--gup-fast", help="CPUs pinning pages with GUP-fast and writing through the pin like DMA.")] = None,
        gup_slow: Annotated[int | None, typer.Option("--gup-slow", help="CPUs pinning pages with GUP-slow (mmap_lock + PTL).")] = None,
        mmap: Annotated[int | None, typer.Option("--mmap", help="CPUs churning mmap()/mprotect()/munmap() on other VMAs of the mm.")] = None,
        zap: Annotated[int | None, typer.Option("--zap", help="CPUs doing MADV_DONTNEED of random ranges.")] = None,
        khugepaged: Annotated[int | None, typer.Option("--khugepaged", help="CPUs running khugepaged with the strategy.")] = None,
        rmap_walk: Annotated[int | None, typer.Option("--rmap-walk", help="CPUs walking the rmap of the collapsing VMA's folios like reclaim and compaction: folio_referenced(), migration (requirement c).")] = None,
        pt_walk: Annotated[int | None, typer.Option("--pt-walk", help="CPUs walking the collapsing VMA's page tables like smaps and MADV_COLD/MADV_PAGEOUT (requirement c).")] = None,
        vma_change: Annotated[int | None, typer.Option("--vma-change", help="CPUs calling mprotect() and mmap(MAP_FIXED) on sub-ranges of the collapsing VMA itself (requirement c).")] = None,
        mix: Annotated[str | None, typer.Option(help=f"A named role mix ({', '.join(MIXES)}); per-role flags override it. Default: sized to this host's cores.")] = None,
        workload: Annotated[Workload, typer.Option(help="Access pattern of app CPUs (and where pins and holes go).")] = Workload.RANDOM,
        seed: Annotated[int, typer.Option(help="Random seed (patterns, chaos).")] = 0,
        flush: Annotated[FlushMode, typer.Option(help="ipi: a flush waits for every CPU's ack (x86); broadcast: TLBI/INVLPGB, no ack, GUP-fast not quiesced.")] = FlushMode.IPI,
        ptl: Annotated[PtlMode, typer.Option(help="split: one PTE lock per page table; mm: one mm-wide page_table_lock.")] = PtlMode.SPLIT,
        vma_locks: Annotated[bool, typer.Option("--vma-locks/--no-vma-locks", help="Per-VMA locks for faults (else every fault takes mmap_lock for read).")] = True,
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the result files (one Arrow file per run).")] = Path("results/runs"),
        unsafe: Annotated[bool, typer.Option("--unsafe", help="Allow --inject-bug (known-broken kernel paths).")] = False,
        inject_bug: Annotated[list[str] | None, typer.Option("--inject-bug", help="Inject a named bug (repeatable); see `ptlab strategies`. Needs --unsafe.")] = None,
        chaos: Annotated[bool, typer.Option("--chaos", help="Random short delays at named race points (fault injection).")] = False,
        pin_hold_us: Annotated[int, typer.Option(help="How long a GUP pin is held while the 'device' writes through it (µs).")] = 200,
        stress_target: Annotated[str, typer.Option("--stress-target", metavar="[workload|collapse]", help="Where GUP and zap CPUs act: where the workload goes, or in the range being collapsed (pins then held until that collapse is over).")] = "workload",
        nr_pmds: Annotated[int, typer.Option(help="Size of the collapsing VMA in PMDs (512 pages each).")] = 4,
        frames: Annotated[int, typer.Option(help="Physical frames (0: sized from the VMA).")] = 0,
        max_ptes_none: Annotated[int, typer.Option(help="khugepaged max_ptes_none (0..511), scaled down for mTHP orders.")] = 511,
        mthp_fault_order: Annotated[int, typer.Option(help="Faults on an all-none aligned range allocate this order (0: off, 2..8).")] = 0,
        watchdog: Annotated[float, typer.Option(help="Seconds without progress on a CPU before the run fails with a lock dump.")] = 10.0,
        holes: Annotated[HolesMode, typer.Option(help="migration-entry only: mark = hole markers faulters sleep on (the new folio, locked); backoff = holes stay open, a filled hole undoes the collapse (SCAN_PAGE_FILLED). The others keep holes closed with their locks: with -s all it goes to migration-entry only; -s pmd-clear/ptl-hold refuse backoff.")] = HolesMode.MARK,
        vma_stability: Annotated[VmaStability, typer.Option(help="ptl-hold and migration-entry: hold mmap_lock for read across the collapse (mmap-lock, as proposed) or only the collapsing VMA's per-VMA read lock (vma-lock). pmd-clear always takes mmap_lock for write: with -s all it goes to the other two only; -s pmd-clear refuses vma-lock.")] = VmaStability.MMAP_LOCK,
        zap_pages: Annotated[int, typer.Option(help="Pages per MADV_DONTNEED of the app, zap and refault CPUs.", metavar="N")] = 8,
        backend: Annotated[str, typer.Option(help="process: one real OS process per simulated CPU, wall-clock time (the benchmark); virtual: kernel-cost virtual time in one process, deterministic, any number of CPUs (core/backends/virtual.py).", metavar="[process|virtual]")] = "process",
        think_ns: Annotated[int | None, typer.Option(help="App CPUs: ns of their own work between two accesses (default 0; 2000 with --backend virtual).", metavar="NS")] = None,
        collapse_context: Annotated[str, typer.Option(help="khugepaged: the daemon's scan (mmap_read_trylock); madvise: MADV_COLLAPSE's path, as `ptlab kernel` drives it (mmap_lock for read, LRU drain, order 9, pmd-clear).", metavar="[khugepaged|madvise]")] = "khugepaged",
        placement: Annotated[str, typer.Option(help="--backend virtual: the core each CPU runs on, CPUs on one core taking turns as under the kernel's fair scheduler: CORE or CORE:idle (SCHED_IDLE) per CPU in CPU-id order (1:idle,1:idle,0), probe:N (`ptlab kernel`'s placement on N cores), or a `ptlab kernel` result file (its threads' cores). Default: a core per CPU.", metavar="SPEC|KERNEL_FILE")] = "",
        address: Annotated[str | None, typer.Option(help="Ray cluster address (auto or host:port); default: an embedded Ray on 127.0.0.2.")] = None,
        no_compare: Annotated[bool, typer.Option("--no-compare", help="Skip the comparison table at the end.")] = False,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars (they go to stderr; results go to stdout).")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the one-line result of each run and errors: no progress bars, warnings or comparison table.")] = False,
    ) -> None:
        """Run collapse strategies for real and compare them (the default: all three).

        Results go to stdout (one line per run, then the comparison), progress bars and warnings to stderr.

        Exit status: 0 when the oracle found nothing, 1 when it found a violation, 2 on bad input, 3 when a run could not complete (a CPU process died, Ray failed).
        """
        strategies = [s.value for s in Strategy] if strategy == StrategyChoice.ALL else [strategy.value]
        cpus = _cpus_from_flags(mix, {"app": app_cpus, "gup-fast": gup_fast, "gup-slow": gup_slow, "mmap": mmap, "zap": zap, "khugepaged": khugepaged, "rmap-walk": rmap_walk, "pt-walk": pt_walk, "vma-change": vma_change})
        bugs = tuple(inject_bug or ())
        placement = _placement_spec(placement, cpus)
        configs = [
            RunConfig(
                strategy=s,
                order=order,
                duration_s=duration,
                cpus=cpus,
                workload=workload.value,
                seed=seed,
                flush=flush.value,
                ptl=ptl.value,
                vma_locks=vma_locks,
                inject_bugs=bugs,
                unsafe=unsafe,
                chaos=chaos,
                pin_hold_us=pin_hold_us,
                stress_target=stress_target,
                nr_pmds=nr_pmds,
                nr_frames=frames,
                max_ptes_none=max_ptes_none,
                mthp_fault_order=mthp_fault_order,
                watchdog_s=watchdog,
                # with -s all each flag goes to the strategies it applies to (see --help)
                holes=holes.value if s == Strategy.MIGRATION_ENTRY.value or strategy != StrategyChoice.ALL else HolesMode.MARK.value,
                vma_stability=vma_stability.value if s != Strategy.PMD_CLEAR.value or strategy != StrategyChoice.ALL else VmaStability.MMAP_LOCK.value,
                backend=backend,
                zap_pages=zap_pages,
                think_ns=think_ns if think_ns is not None else (2000 if backend == "virtual" else 0),
                collapse_context=collapse_context,
                warmup_s=0.0 if backend == "virtual" else 0.3,
                placement=placement,
            )
            for s in strategies
        ]
        _writable_dir(out)
        n = configs[0].nr_cpus
        cores = os.cpu_count() or 1
        if n > cores and not quiet and configs[0].backend == "process":
            err.print(f"[yellow]warning:[/] {n} simulated CPUs on {cores} host cores (oversubscription {n / cores:.1f}): spinning CPUs will see lock-holder preemption; the ratio is recorded in every result file")
        results = run_configs(configs, out, address, progress=not (quiet or no_progress))
        found = failed = 0
        paths = []
        for c, path, error in results:
            if path is None:
                err.print(f"[red]{c.strategy}: run failed:[/] {error}")
                failed += 1
                continue
            line, n_v = _summary_line(path)
            console.print(line)
            found += n_v
            paths.append(path)
        if len(paths) > 1 and not no_compare and not quiet:
            from ptlab.core.analysis.compare import compare_paths, render_rich

            for r in render_rich(compare_paths(paths, baseline="pmd-clear")):
                console.print(r)
        if failed:
            raise typer.Exit(EXIT_FAILED)
        if found:
            raise typer.Exit(EXIT_VIOLATION)

    @app.command()
    def check(
        duration: Annotated[float, typer.Option("--duration", "-d", help="Seconds per clean cell, and the budget of its positive control (stress runs with chaos on).")] = 5.0,
        budget: Annotated[float, typer.Option("--budget", help="Seconds a bug or mutant cell may take to be caught: it ends at its first catch of an expected kind.", metavar="SECONDS")] = 30.0,
        orders: Annotated[list[int] | None, typer.Option("--order", help="Orders for the safe strategies (repeatable; default 4 and 9).")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the result files (not written by --catch-rate).")] = Path("results/check"),
        address: Annotated[str | None, typer.Option(help="Ray cluster address; default: embedded.")] = None,
        mutants: Annotated[bool, typer.Option("--mutants", help="Run one cell per safety step deleted (the mutants) and print the mutation score.")] = False,
        list_only: Annotated[bool, typer.Option("--list", help="With --mutants: list every safety step, its mutant and what must see it; run nothing.")] = False,
        only: Annotated[list[str] | None, typer.Option("--only", help="Only these bugs/mutants (repeatable).")] = None,
        catch_rate: Annotated[int, typer.Option("--catch-rate", help="Run each bug (with --mutants: each bug and mutant) this many times with seeds 0..N-1 and print its catch probability and time to first catch.")] = 0,
        no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (it goes to stderr; the table goes to stdout).")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (errors and the table only).")] = False,
    ) -> None:
        """The correctness matrix: every safe strategy must stay clean beside a positive control
        that is caught under the same settings, and every injected bug must be caught with the
        violation kinds it must produce — with the known answers for GUP-fast's PMD re-check
        (70cbc3cc78a9) and the sync IPI (2ba99c5e0881) on both flush modes.  --mutants does the
        same for every safety step (mutation testing).  A bug or mutant cell ends at its first
        catch of an expected kind (at most --budget seconds); a clean cell runs --duration, and
        its control must be caught within that.  A run that could not complete (a CPU
        raised, a watchdog stall) is a failed run, never a catch.  Exit 0 when every cell is as
        expected, 1 when one is not, 3 when a run failed."""
        from ptlab.cli import check_matrix as cm
        from ptlab.core.kernel.bugs import mutant_cases
        from ptlab.core.machine.mutants import MUTANTS

        if catch_rate < 0:
            raise ConfigError(f"--catch-rate must be a number of runs >= 1 (got {catch_rate})")
        if not 0 < budget <= 3600:
            raise ConfigError(f"--budget must be 0 < SECONDS <= 3600 (got {budget})")
        for name in only or ():
            if name not in MUTANTS and name not in BUGS:
                raise ConfigError(f"--only {name!r} is neither a bug nor a mutant; see `ptlab strategies` and `ptlab check --mutants --list`")
            if MUTANTS.get(name) and MUTANTS[name].equivalent:
                raise ConfigError(f"--only {name}: that mutant is equivalent ({MUTANTS[name].equivalent}); nothing can catch it")
        if list_only:
            if not mutants:
                raise ConfigError("--list lists the mutants: use it with --mutants")
            typer.echo("\n".join(cm.registry_lines()))
            return
        if mutants:
            cases = mutant_cases(tuple(only or ()))
            if catch_rate:  # the whole table: every mutant and every bug cell of the matrix
                seen = {c.label for c in cases}
                cases += [c for c in check_cases((4, 9)) if c.expect and c.label not in seen and (not only or set(c.bugs) & set(only))]
        else:
            cases = check_cases(tuple(orders or (4, 9)))
            if only:
                cases = [c for c in cases if set(c.bugs) & set(only)]
            elif catch_rate:
                cases = [c for c in cases if c.expect]
        def seconds(c: CheckCase) -> float:  # a cell to be caught runs until its catch, within the budget
            return budget if c.expect else duration

        for c in cases:  # validate every cell before any Ray or shared memory is touched
            RunConfig(duration_s=seconds(c), **c.params())
            if c.control is not None:
                RunConfig(duration_s=duration, **c.control.params())
        if catch_rate:
            jobs = [(c, seed, seconds(c)) for c in cases for seed in range(catch_rate)]
            runs = cm.run_cells(jobs, None, address, _console(stderr=True, quiet=quiet or no_progress))
            table, not_always, failed = cm.catch_rate_table(cases, runs)
            console.print(table)
            if failed:
                raise typer.Exit(3)
            if not_always:
                err.print(f"[red]{not_always} bug(s)/mutant(s) not caught in every run[/]")
                raise typer.Exit(1)
            return
        _writable_dir(out)
        # a positive control must be caught within its clean cell's duration
        jobs = [(c, 0, seconds(c)) for c in cases] + [(c.control, 0, duration) for c in cases if c.control is not None]
        runs = {r.case: r for r in cm.run_cells(jobs, out, address, _console(stderr=True, quiet=quiet or no_progress))}
        if mutants:
            table, eq, score = cm.mutation_table(cases, runs)
            console.print(table)
            console.print(eq)
            console.print(f"[bold]mutation score:[/] {score}")
            bad, failed = len(score.survived), len(score.failed)
        else:
            table, bad, failed = cm.matrix_table(cases, runs)
            console.print(table)
        if failed:
            err.print(f"[red]{failed} run(s) failed (a CPU raised or the watchdog fired): never a catch[/]")
            raise typer.Exit(3)
        if bad:
            err.print(f"[red]{bad} cell(s) not as expected[/]")
            raise typer.Exit(1)

    @app.command()
    def bench(
        json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows, the build and the host to this JSON file (to keep and compare the numbers).", metavar="FILE")] = None,
        kernel_result: Annotated[Path | None, typer.Option(help="A `ptlab kernel` result file (-loaded.arrow or -baseline.arrow): its fault and MADV_COLLAPSE medians are the kernel column's. Default: the run the host's cost table was made from.", metavar="FILE")] = None,
        costs: Annotated[Path | None, typer.Option(help="The cost table for the kernel column. Default: results/costs/<hostname>.json (`ptlab calibrate --kernel`), else the committed default.", metavar="FILE")] = None,
    ) -> None:
        """The simulation's own step costs in one process, without contention — a TLB-hit
        access, an anonymous fault, one collapse per strategy and order, spin_lock + unlock —
        each against its target and beside the host kernel's figure, with the dilation
        (simulation over kernel).  Below the table: which build ran (compiled, or pure with
        PTLAB_PURE=1)."""
        from ptlab.core.analysis.bench import (
            add_kernel_columns,
            host_cost_table,
            kernel_figures,
            run_bench,
            write_bench,
        )
        from ptlab.core.analysis.compare import fmt_num
        from ptlab.core.analysis.costs import load_costs
        from ptlab.core.machine.build import build_info

        if json_out is not None:
            if json_out.is_dir():
                raise ConfigError(f"--json {json_out} is a directory; give a file name")
            if not json_out.parent.is_dir():
                raise ConfigError(f"--json {json_out}: no directory {json_out.parent}")
        table_costs = load_costs(costs) if costs is not None else host_cost_table()
        latencies = None
        if kernel_result is not None:
            from ptlab.core.probe.kernel_costs import kernel_result_latencies

            latencies = kernel_result_latencies(kernel_result)
        with console.status("measuring") as status:
            rows = run_bench(lambda s: status.update(f"measuring {s}"))
        add_kernel_columns(rows, kernel_figures(table_costs, latencies))
        table = Table(title="ptlab bench (µs; dilation = median ÷ kernel)")
        for col in ("step", "median", "p99", "target", "", "kernel", "dilation", "note"):
            table.add_column(col, justify="right" if col in ("median", "p99", "target", "kernel", "dilation") else "left")
        for r in rows:
            mark = "" if r["ok"] is None else ("[green]✓" if r["ok"] else "[red]✗")
            note = r["note"] + (f"; kernel: {r['kernel_from']}" if r["kernel_from"] else "")
            table.add_row(r["step"], fmt_num(r["median_us"]), fmt_num(r["p99_us"]),
                          "" if r["target_us"] is None else f"≤ {fmt_num(r['target_us'])}", mark,
                          "" if r["kernel_us"] is None else fmt_num(r["kernel_us"]),
                          "" if r["dilation"] is None else f"×{fmt_num(r['dilation'])}", note)
        console.print(table)
        console.print(build_info().describe(), highlight=False)
        if json_out is not None:
            write_bench(rows, json_out)

    @app.command()
    def strategies() -> None:
        """Each strategy and each injectable bug: what it does and which requirement
        (a) GUP-fast cannot grab, b) no CPU can read/write, c) no walker can grab) it keeps or breaks."""
        width = min(100, console.width)
        console.print("[bold]Strategies[/] (--strategy)\n")
        for name, text in STRATEGY_TEXT.items():
            console.print(f"[bold cyan]{name}[/]")
            console.print(textwrap.indent(textwrap.fill(text, width - 4), "    ") + "\n")
        console.print("[bold]Injectable bugs[/] (--inject-bug NAME --unsafe; repeat to combine)\n")
        for name in BUGS:
            if name not in BUG_TEXT:
                continue
            strat, breaks, text = BUG_TEXT[name]
            console.print(f"[bold red]{name}[/]  (strategy {strat}; breaks {breaks})")
            console.print(textwrap.indent(textwrap.fill(text, width - 4), "    "))
            kinds = expected_kinds((name,))
            if kinds:
                caught = f"caught by: {', '.join(kinds)}"
                if name == "gup-fast-no-pmd-recheck":
                    caught += " (together with no-sync-ipi on a broadcast flush)"
                console.print(textwrap.indent(textwrap.fill(caught, width - 4), "    "), highlight=False)
            console.print()
        console.print("Every other safety step has a mutant (not offered here): `ptlab check --mutants --list`.")


__all__ = ["register", "run_configs"]
