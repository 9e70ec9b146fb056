"""The engine behind ``ptlab check``: run the correctness cells on the real backend, judge each
run by what it had to produce, and print the matrix, the mutation score or the catch-rate table.

Verdicts (core/kernel/bugs.py ``verdict``): a bug or mutant cell passes only when one of its expected
violation kinds appears ("caught with wrong kind X" otherwise); a run that could not complete —
a CPU raised, the watchdog saw no progress, a CPU process died — is a failed run, never a catch;
a clean cell counts only when its positive control (the same settings plus one step deleted)
was caught.  Exit status: 3 when a run failed, 1 when a cell is not as expected, else 0.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptlab.core.kernel.bugs import CheckCase, first_catch_s, verdict
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import RunFailed
from ptlab.core.machine.mutants import MUTANTS, Score
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@dataclass
class CellRun:
    """One run of one cell: the violation kinds it produced, or why it failed."""

    case: CheckCase
    seed: int
    kinds: dict[str, int] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    duration_s: float = 0.0

    @property
    def judged(self) -> tuple[bool, str]:
        return verdict(self.case, self.kinds, self.error)


def run_cells(jobs: Sequence[tuple[CheckCase, int, float]], out: Path | None, address: str | None, console: Console) -> list[CellRun]:
    """Run (case, seed, seconds) one after another on the embedded (or given) Ray, with one
    progress bar.  ``out``: where the result files go (None: keep only the verdicts).  A cell
    that must be caught ends at its first violation of an expected kind (``stop_on``): its
    seconds are a budget, and the verdict needs only whether and when the catch came."""
    from ptlab.cluster.cell import CpuPool, run_cell
    from ptlab.cluster.sweep import connect
    from ptlab.core.analysis.results import read_run

    started = connect(address)
    runs: list[CellRun] = []
    pool = CpuPool()  # the runs are sequential: each reuses the CPU processes of the last
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("check", total=len(jobs))
            for case, seed, duration in jobs:
                progress.update(task, description=f"{case.strategy} {case.label} {case.flush} o{case.order} seed {seed}")
                config = RunConfig(duration_s=duration, seed=seed, stop_on=tuple(case.expect), **case.params())
                run = CellRun(case, seed, duration_s=config.warmup_s + duration)
                try:
                    res = run_cell(config, out, pool=pool)
                    meta = read_run(res).meta if isinstance(res, Path) else res["meta"]  # type: ignore[index]
                    run.kinds = dict(meta["summary"]["violation_kinds"])
                    run.violations = list(meta["violations"])
                except RunFailed as e:
                    run.error = str(e)
                runs.append(run)
                progress.advance(task)
    finally:
        pool.close()
        if started:
            import ray

            ray.shutdown()
    return runs


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _mark(ok: bool) -> str:
    return "[green]✓" if ok else "[red]✗"


def matrix_table(cases: Sequence[CheckCase], runs: dict[CheckCase, CellRun]) -> tuple[Table, int, int]:
    """The correctness matrix, one row per cell.  Returns (table, cells not as expected, runs
    that failed)."""
    table = Table(title="ptlab check: the correctness matrix")
    for col in ("strategy", "bugs", "flush", "order", "expected", "observed", "positive control", ""):
        table.add_column(col)
    bad = failed = 0
    for case in cases:
        run = runs[case]
        ok, observed = run.judged
        failed += bool(run.error)
        control = ""
        if case.control is not None:
            crun = runs[case.control]
            cok, cobs = crun.judged
            failed += bool(crun.error)
            control = f"{case.control.bugs[-1]}: {cobs}"
            if ok and not cok:
                observed += " (does not count: control not caught)"
            ok = ok and cok
        bad += not ok
        expected = "clean" if not case.expect else "caught: " + ", ".join(case.expect[:3]) + ("…" if len(case.expect) > 3 else "")
        table.add_row(case.strategy, case.label, case.flush, str(case.order), expected, _short(observed), _short(control, 60), _mark(ok))
    return table, bad, failed


def mutation_table(cases: Sequence[CheckCase], runs: dict[CheckCase, CellRun]) -> tuple[Table, Table, Score]:
    """The mutation score: every non-equivalent mutant killed with an expected kind, and the
    equivalent ones with their reasons."""
    score = Score()
    table = Table(title="ptlab check --mutants: every safety step deleted")
    table.add_column("mutant", no_wrap=True)
    for col in ("step", "cell", "observed", ""):
        table.add_column(col)
    for case in cases:
        run = runs[case]
        ok, observed = run.judged
        name = case.bugs[0]
        (score.killed if ok else score.failed if run.error else score.survived).append(name)
        cell = f"{case.strategy} o{case.order} {case.flush} {'+'.join(f'{n}{r}' for r, n in case.cpus.items())}"
        table.add_row(name, _short(MUTANTS[name].step, 50), cell, _short(observed), _mark(ok))
    eq = Table(title="equivalent mutants (no run can tell them from the original here)")
    eq.add_column("mutant")
    eq.add_column("step")
    eq.add_column("why it is equivalent")
    for m in MUTANTS.values():
        if m.equivalent:
            score.equivalent.append(m.name)
            eq.add_row(m.name, m.step, m.equivalent)
    return table, eq, score


def registry_lines() -> list[str]:
    """``ptlab check --mutants --list``: every safety step, its mutant and what must see it."""
    lines = ["Safety steps and their mutants (inject one with --inject-bug NAME --unsafe):", ""]
    for m in MUTANTS.values():
        lines.append(f"{m.name}{'  (an injectable bug)' if m.is_bug else ''}")
        lines.append(f"    step:   {m.step}")
        lines.append(f"    where:  {m.where}")
        if m.equivalent:
            lines.append(f"    equivalent: {m.equivalent}")
        else:
            assert m.cell is not None
            c = m.cell
            cpus = ", ".join(f"{r} {n}" for r, n in c.params()["cpus"].items())
            lines.append(f"    killed by: {', '.join(m.kinds)}")
            lines.append(f"    cell:   {c.strategy}, order {c.order}, {c.flush} flush, CPUs: {cpus}" + (f" ({m.notes})" if m.notes else ""))
            lines.append(f"    test:   {m.test if '::' in m.test else 'tests/test_mutants.py::' + m.test}")
        lines.append("")
    n_eq = sum(bool(m.equivalent) for m in MUTANTS.values())
    lines.append(f"{len(MUTANTS)} safety steps: {len(MUTANTS) - n_eq} mutants to kill, {n_eq} equivalent")
    return lines


def _quantile(xs: list[float], q: float) -> str:
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))]:.2f}" if xs else "-"


def catch_rate_table(cases: Sequence[CheckCase], runs: Sequence[CellRun]) -> tuple[Table, int, int]:
    """Catch probability and time to first catch per bug/mutant over its seeded runs.
    Returns (table, cells not caught in every run, runs that failed)."""
    table = Table(title="catch probability and time to first catch (s from the start gate, warm-up included)")
    for col in ("bug / mutant", "cell", "runs", "caught", "P(catch)", "first catch p50", "p90", "max", "wrong kind", "failed", ""):
        table.add_column(col, justify="right" if col not in ("bug / mutant", "cell", "") else "left")
    not_always = failed_runs = 0
    for case in cases:
        mine = [r for r in runs if r.case is case]
        caught = [r for r in mine if r.judged[0]]
        failed = [r for r in mine if r.error]
        wrong = [r for r in mine if not r.error and r.kinds and not r.judged[0]]
        firsts = sorted(first_catch_s(case, r.violations) or r.duration_s for r in caught)
        p = len(caught) / len(mine) if mine else 0.0
        not_always += p < 1.0
        failed_runs += len(failed)

        cell = f"{case.strategy} o{case.order} {case.flush} {'+'.join(f'{n}{r}' for r, n in case.cpus.items())}"
        table.add_row(case.label, cell, str(len(mine)), str(len(caught)), f"{p:.2f}", f"{statistics.median(firsts):.2f}" if firsts else "-", _quantile(firsts, 0.9), f"{max(firsts):.2f}" if firsts else "-", str(len(wrong)), str(len(failed)), _mark(p == 1.0))
    return table, not_always, failed_runs


__all__ = ["CellRun", "catch_rate_table", "matrix_table", "mutation_table", "registry_lines", "run_cells"]
