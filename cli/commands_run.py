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
from ptlab.core.bugs import BUG_TEXT, STRATEGY_TEXT, check_cases
from ptlab.core.config import BUGS, FlushMode, PtlMode, RunConfig, Strategy
from ptlab.core.errors import ConfigError, RunFailed
from ptlab.workloads.mixes import MIXES, default_cpus, get_mix
from ptlab.workloads.patterns import Workload
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)
err = Console(stderr=True)


class StrategyChoice(str, Enum):
    PMD_CLEAR = "pmd-clear"
    PTL_HOLD = "ptl-hold"
    MIGRATION_ENTRY = "migration-entry"
    ALL = "all"


def _writable_dir(out: Path) -> Path:
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


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def run_configs(configs: list[RunConfig], out: Path, address: str | None, labels: list[str] | None = None) -> list[tuple[RunConfig, Path | None, str]]:
    """Run configs one after another on the embedded (or given) Ray with a progress bar each.
    Returns (config, path or None, error) per run; a failed run does not stop the others."""
    from ptlab.cluster.cell import run_cell
    from ptlab.cluster.sweep import connect

    started = connect(address)
    results: list[tuple[RunConfig, Path | None, str]] = []
    try:
        with _progress() as progress:
            for k, c in enumerate(configs):
                label = labels[k] if labels else f"{c.strategy} order {c.order}"
                task = progress.add_task(label, total=1.0, status="starting")

                def say(msg: str, frac: float, task: Any = task) -> None:
                    progress.update(task, completed=frac, status=msg)

                try:
                    path = run_cell(c, out, progress=say)
                    progress.update(task, completed=1.0, status="done")
                    results.append((c, Path(path), ""))  # type: ignore[arg-type]
                except RunFailed as e:
                    progress.update(task, status="[red]failed")
                    results.append((c, None, str(e)))
    finally:
        if started:
            import ray

            ray.shutdown()
    return results


def _summary_line(path: Path) -> tuple[str, int]:
    from ptlab.core.results import read_run

    r = read_run(path)
    s = r.meta["summary"]
    coll = s.get("collapses", {})
    ok = coll.get("SCAN_SUCCEED", 0)
    total = sum(coll.values())
    n_v = s.get("violations", 0)
    dur = r.meta["params"]["duration_s"]
    ev = s.get("events", {})
    verdict = "[green]clean[/]" if n_v == 0 else f"[red]{n_v} violation(s): {', '.join(f'{k}×{v}' for k, v in s['violation_kinds'].items())}[/]"
    line = (
        f"{r.meta['params']['strategy']:16} order {r.meta['params']['order']}: {ok}/{total} collapses succeeded "
        f"({ok / dur:.0f}/s), {ev.get('fault', 0)} faults, {ev.get('access', 0) * r.meta.get('access_sample', 1)} accesses; {verdict}\n"
        f"    {path}"
    )
    return line, n_v


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        strategy: Annotated[StrategyChoice, typer.Option("--strategy", "-s", help="Collapse strategy to run; 'all' runs the three back to back and compares them.")] = StrategyChoice.ALL,
        order: Annotated[int, typer.Option(help="Target folio order: 2..8 are mTHP sizes, 9 is a PMD THP (2 MiB with 4 KiB pages).")] = 9,
        duration: Annotated[float, typer.Option("--duration", "-d", help="Measured seconds per run (after a short warm-up that is discarded).")] = 3.0,
        app_cpus: Annotated[int | None, typer.Option("--app", help="CPUs loading/storing through the TLB, faulting, and freeing memory now and then.")] = None,
        gup_fast: Annotated[int | None, typer.Option("--gup-fast", help="CPUs pinning pages with GUP-fast and writing through the pin like DMA.")] = None,
        gup_slow: Annotated[int | None, typer.Option("--gup-slow", help="CPUs pinning pages with GUP-slow (mmap_lock + PTL).")] = None,
        mmap: Annotated[int | None, typer.Option("--mmap", help="CPUs churning mmap()/mprotect()/munmap() on other VMAs of the mm.")] = None,
        zap: Annotated[int | None, typer.Option("--zap", help="CPUs doing MADV_DONTNEED of random ranges.")] = None,
        khugepaged: Annotated[int | None, typer.Option("--khugepaged", help="CPUs running khugepaged with the strategy.")] = None,
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
        nr_pmds: Annotated[int, typer.Option(help="Size of the collapsing VMA in PMDs (512 pages each).")] = 4,
        frames: Annotated[int, typer.Option(help="Physical frames (0: sized from the VMA).")] = 0,
        max_ptes_none: Annotated[int, typer.Option(help="khugepaged max_ptes_none (0..511), scaled down for mTHP orders.")] = 511,
        mthp_fault_order: Annotated[int, typer.Option(help="Faults on an all-none aligned range allocate this order (0: off, 2..8).")] = 0,
        watchdog: Annotated[float, typer.Option(help="Seconds without progress on a CPU before the run fails with a lock dump.")] = 10.0,
        address: Annotated[str | None, typer.Option(help="Ray cluster address (auto or host:port); default: an embedded Ray on 127.0.0.2.")] = None,
        no_compare: Annotated[bool, typer.Option("--no-compare", help="Skip the comparison table at the end.")] = False,
    ) -> None:
        """Run collapse strategies for real and compare them (the default: all three).

        Exit status: 0 when the oracle found nothing, 1 when it found a violation, 2 on bad
        input, 3 when a run could not complete (a CPU process died, Ray failed).
        """
        strategies = [s.value for s in Strategy] if strategy == StrategyChoice.ALL else [strategy.value]
        cpus = _cpus_from_flags(mix, {"app": app_cpus, "gup-fast": gup_fast, "gup-slow": gup_slow, "mmap": mmap, "zap": zap, "khugepaged": khugepaged})
        bugs = tuple(inject_bug or ())
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
                nr_pmds=nr_pmds,
                nr_frames=frames,
                max_ptes_none=max_ptes_none,
                mthp_fault_order=mthp_fault_order,
                watchdog_s=watchdog,
            )
            for s in strategies
        ]
        _writable_dir(out)
        n = configs[0].nr_cpus
        cores = os.cpu_count() or 1
        if n > cores:
            err.print(f"[yellow]warning:[/] {n} simulated CPUs on {cores} host cores (oversubscription {n / cores:.1f}): spinning CPUs will see lock-holder preemption; the ratio is recorded in every result file")
        results = run_configs(configs, out, address)
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
        if len(paths) > 1 and not no_compare:
            from ptlab.core.compare import compare_paths, render_rich

            for r in render_rich(compare_paths(paths, baseline="pmd-clear")):
                console.print(r)
        if failed:
            raise typer.Exit(3)
        if found:
            raise typer.Exit(1)

    @app.command()
    def check(
        duration: Annotated[float, typer.Option("--duration", "-d", help="Seconds per cell (stress runs with chaos on).")] = 5.0,
        orders: Annotated[list[int] | None, typer.Option("--order", help="Orders for the safe strategies (repeatable; default 4 and 9).")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the result files.")] = Path("results/check"),
        address: Annotated[str | None, typer.Option(help="Ray cluster address; default: embedded.")] = None,
    ) -> None:
        """The correctness matrix: every safe strategy must stay clean and every injected bug
        must be caught — with the known answers for GUP-fast's PMD re-check (70cbc3cc78a9) and
        the sync IPI (2ba99c5e0881) on both flush modes.  Exit 0 when every cell is as
        expected, 1 otherwise."""
        cases = check_cases(tuple(orders or (4, 9)))
        configs = [RunConfig(duration_s=duration, **case.params()) for case in cases]
        _writable_dir(out)
        labels = [f"{c.strategy} {c.label} {c.flush} o{c.order}" for c in cases]
        results = run_configs(configs, out, address, labels)
        table = Table(title="ptlab check: the correctness matrix")
        for col in ("strategy", "bugs", "flush", "order", "expected", "observed", "violations", ""):
            table.add_column(col)
        bad = 0
        from ptlab.core.results import read_run

        for case, (_, path, error) in zip(cases, results):
            if path is None:
                observed, kinds, ok = "run failed", error, False
            else:
                s = read_run(path).meta["summary"]
                caught = s["violations"] > 0
                observed = "caught" if caught else "clean"
                kinds = ", ".join(f"{k}×{v}" for k, v in s["violation_kinds"].items())
                ok = caught == case.expect_caught
            bad += not ok
            table.add_row(case.strategy, case.label, case.flush, str(case.order), "caught" if case.expect_caught else "clean", observed, kinds[:60], "[green]✓" if ok else "[red]✗")
        console.print(table)
        if bad:
            err.print(f"[red]{bad} cell(s) not as expected[/]")
            raise typer.Exit(1)

    @app.command()
    def bench() -> None:
        """The simulation's own step costs in one process, without contention: a TLB-hit
        access, event recording, an anonymous fault, one collapse per strategy and order —
        each against its target.  Set them beside `ptlab calibrate` and the kernel's numbers."""
        from ptlab.core.bench import run_bench

        with console.status("measuring") as status:
            rows = run_bench(lambda s: status.update(f"measuring {s}"))
        table = Table(title="ptlab bench (µs)")
        for col in ("step", "median", "p99", "target", "", "note"):
            table.add_column(col, justify="right" if col in ("median", "p99", "target") else "left")
        for r in rows:
            mark = "" if r["ok"] is None else ("[green]✓" if r["ok"] else "[red]✗")
            table.add_row(r["step"], f"{r['median_us']:.2f}", f"{r['p99_us']:.2f}", "" if r["target_us"] is None else f"≤ {r['target_us']:g}", mark, r["note"])
        console.print(table)

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
            console.print(textwrap.indent(textwrap.fill(text, width - 4), "    ") + "\n")


__all__ = ["register", "run_configs"]
