"""`ptlab kernel` and `ptlab fidelity`: the live kernel's pmd-clear beside the simulation's.

`kernel` runs the probe of ptlab.core.probe.kernel_probe (C threads: MADV_COLLAPSE under faults,
mmap() and GUP pins; a baseline phase with the collapser idle, then the loaded phase) and
writes one result file per phase.  `fidelity` sets a kernel run beside a simulated pmd-clear
run.  Hosts that cannot collapse and bad input raise ConfigError, which ptlab.cli.main turns
into one line and exit code 2.
"""

from __future__ import annotations

import math
import platform
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from ptlab.cli.output import console as _console
from ptlab.core.analysis.compare import ALPHA, fmt_num, fmt_us
from ptlab.core.machine.errors import ConfigError

if TYPE_CHECKING:
    from ptlab.core.probe.kernel_probe import FidelityReport, KernelRun


class FidelityFormat(str, Enum):
    """How `ptlab fidelity` presents its table."""

    TABLE = "table"
    MD = "md"


_KERNEL_HELP = """\
Measure the host kernel's own pmd-clear: madvise(MADV_COLLAPSE) goes through collapse_huge_page() (mmap_lock for write, PMD cleared and flushed, copy, install).

C threads (each pinned to its own core when there are enough cores, else the collapser keeps one core and the load threads share the others): a collapser loops MADV_COLLAPSE over --ranges 2 MiB ranges (re-splitting each after every collapse so there is always work); one thread faults pages of the collapsing VMA and one of another VMA (MADV_DONTNEED of --zap-pages pages, then a timed touch of each); one churns mmap()/munmap(); with --pin, one does O_DIRECT reads into the collapsing VMA, pinning pages so that collapses meet real GUP pins.  The same load runs first with the collapser idle (baseline), then with it running (loaded); each phase lasts --duration seconds and is written to its own Arrow file in --out, in the same schema as `ptlab run` (strategy kernel-madv-collapse).

Needs Linux >= 6.1 with transparent hugepages not set to `never`.  Nothing under /sys is changed; the THP settings are recorded in the files.

Example:  ptlab kernel --duration 10 --out results/kernel
"""

_FIDELITY_HELP = """\
Hold a kernel run beside a simulated pmd-clear run: same-VMA fault p50/p99/p99.9 with and without a collapse in flight, the other-VMA fault and mmap() ratios (during ÷ without collapse), each latency also as a multiple of the run's median collapse, and the dilation (sim ÷ kernel).  The column "relation" is the simulation's relative number over the kernel's: 1.0 means the simulation reproduces who stalls and by how much relative to a collapse.

Give the kernel run's *-loaded.arrow file (its *-baseline.arrow beside it is picked up too, or give it) and one file from `ptlab run --strategy pmd-clear`, in any order.

Example:  ptlab fidelity results/kernel/kernel-*-loaded.arrow results/pmd-clear-o9.arrow
"""


def kernel(
    duration: Annotated[float, typer.Option("--duration", help="Seconds per phase (baseline and loaded).")] = 10.0,
    ranges: Annotated[int, typer.Option("--ranges", help="2 MiB PMD ranges in the collapsing VMA.")] = 8,
    out: Annotated[Path, typer.Option("--out", help="Directory for the two result files.")] = Path("results"),
    pin: Annotated[bool, typer.Option("--pin/--no-pin", help="Run the O_DIRECT pin thread where the file system allows.")] = True,
    gap_us: Annotated[int, typer.Option("--gap-us", help="Idle µs after each collapse (0: back to back), so that the loaded phase also has time without a collapse in flight.")] = 200,
    zap_pages: Annotated[int, typer.Option("--zap-pages", help="Pages per MADV_DONTNEED in the fault threads (divides 512); each is then faulted back in and timed.")] = 64,
    idle_load: Annotated[bool, typer.Option("--idle-load/--no-idle-load", help="Run the load threads under SCHED_IDLE, so the per-CPU LRU drain that every MADV_COLLAPSE waits for is not held off by them.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the threads' page choices.")] = 0,
    pin_dir: Annotated[Path | None, typer.Option("--pin-dir", help="Directory for the O_DIRECT file (default: the temp directory).")] = None,
) -> None:
    from ptlab.core.probe import kernel_probe as kp
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    config = kp.ProbeConfig(duration_s=duration, ranges=ranges, pin=pin, gap_us=gap_us,
                            zap_pages=zap_pages, idle_load=idle_load, seed=seed,
                            pin_dir=str(pin_dir) if pin_dir else None)
    host = kp.check_host()
    console = _console()  # results: stdout, never cut when piped
    thp = host["thp"]
    console.print(
        f"kernel {platform.release()}: THP enabled={thp['enabled']} defrag={thp['defrag']} "
        f"max_ptes_none={thp['khugepaged'].get('max_ptes_none')}; measuring MADV_COLLAPSE over "
        f"{ranges} × 2 MiB, {duration:g} s per phase"
    )
    with Progress(TextColumn("{task.description:<9}"), BarColumn(), TextColumn("{task.fields[secs]}"),
                  TimeRemainingColumn(), console=_console(stderr=True), transient=False) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, elapsed: float, total: float) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, secs="")
            bar.update(tasks[phase], completed=elapsed, secs=f"{elapsed:4.1f}/{total:.1f} s")

        run = kp.run_probe(config, out, progress=progress, host_check=host)
    _print_kernel_summary(console, run)


def _print_kernel_summary(console: Any, run: KernelRun) -> None:
    from rich.table import Table

    loaded, base = run.summaries["loaded"], run.summaries["baseline"]
    meta_params = run.params["loaded"]
    c = loaded["collapse"]
    results = ", ".join(f"{k} {v:,}" for k, v in sorted(c["results"].items(), key=lambda kv: -kv[1]))
    rate = f"{100 * c['success_rate']:.1f}%" if c["success_rate"] is not None else "—"
    cs = c["succeeded_latency"]
    console.print(
        f"collapses: {c['count']:,} ({c['per_s']:,.0f}/s), success {rate} ({results}); "
        f"collapse p50 {fmt_us(cs['median_us'])} µs, p99 {fmt_us(cs['p99_us'])} µs"
    )
    pinning = meta_params["pinning"]
    console.print(
        f"{pinning['threads']} threads on cores {pinning['cores']}: {pinning['policy']} "
        f"(oversubscription {pinning['oversubscription']:g}); pins: {meta_params['pin_source']['how']}"
    )
    table = Table(title="latency, µs (p50 / p99)", title_justify="left")
    for col in ("op", "baseline (collapser idle)", "loaded, no collapse", "loaded, during collapse",
                "asleep per collapse, µs"):
        table.add_column(col, justify="left" if col == "op" else "right")
    labels = {"fault_same": "fault, same VMA", "fault_other": "fault, other VMA", "mmap": "mmap()",
              "munmap": "munmap()", "dma": "O_DIRECT pin (dma)"}
    for key, label in labels.items():
        if key not in loaded:
            continue
        row = loaded[key]
        table.add_row(
            label,
            _pair(base.get(key, {}).get("all")),
            _pair(row["no_collapse"]),
            _pair(row["during_collapse"]),
            fmt_us(row["asleep_per_collapse_us"]),
        )
    console.print(table)
    if loaded.get("overflow"):
        console.print(f"[yellow]event buffers overflowed (events not recorded): {loaded['overflow']}[/]")
    console.print(f"baseline: {run.baseline}")
    console.print(f"loaded:   {run.loaded}")


def _pair(s: dict[str, Any] | None) -> str:
    if not s or not s.get("count"):
        return "—"
    return f"{fmt_us(s['median_us'])} / {fmt_us(s['p99_us'])}  (n={s['count']:,})"


# --------------------------------------------------------------------------------------------
# fidelity


FIDELITY_COLUMNS = ("metric", "kernel idle", "kernel", "kernel ÷ collapse", "sim", "sim ÷ collapse",
                    "sim/kernel", "relation")


def _num(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if unit == "µs":
        return fmt_us(v)
    if unit == "%":
        return f"{fmt_num(v)}%"
    if unit == "n":
        return f"{v:,.0f}"
    return fmt_num(v)


def _with_p(v: float | None, p: float | None) -> str:
    s = _num(v, "×")
    if s == "—":
        return s
    return f"{s}×" + (" (n.s.)" if p is None or p >= ALPHA else "")


def fidelity_cells(report: FidelityReport) -> list[list[str]]:
    """The fidelity table as rows of strings (one view for the terminal and Markdown)."""
    rows = []
    for r in report.rows:
        metric = f"{r.metric} ({r.unit})" if r.unit in ("µs", "%") else r.metric
        if r.unit == "×":
            kernel, sim = _with_p(r.kernel, r.kernel_p), _with_p(r.sim, r.sim_p)
        else:
            kernel, sim = _num(r.kernel, r.unit), _num(r.sim, r.unit)
        rel = report.relation(r)
        rows.append([
            metric,
            _num(r.kernel_idle, r.unit),
            kernel,
            _num(report.kernel_rel(r), "×"),
            sim,
            _num(report.sim_rel(r), "×"),
            _num(report.dilation(r), "×"),
            _num(rel, "×"),
        ])
    return rows


def fidelity_markdown(report: FidelityReport) -> str:
    lines = [
        f"kernel: `{report.kernel_file}`" + (f" (baseline `{report.baseline_file}`)" if report.baseline_file else ""),
        f"sim: `{report.sim_file}`",
        "",
        "| " + " | ".join(FIDELITY_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(FIDELITY_COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in fidelity_cells(report)]
    lines += ["", _headline(report) + ".", "", _FOOTER]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


_FOOTER = (
    "÷ collapse: the latency as a multiple of the run's median successful collapse. "
    "sim/kernel: dilation. relation: sim ÷ kernel of the relative number (1 = same relation). "
    "Ratios: during ÷ without a collapse in flight; (n.s.) = Mann-Whitney U p ≥ 0.05. "
    "Asleep per collapse: sleep of the events that started during a collapse, summed, "
    "per collapse (independent of how many events a thread makes)."
)


def _headline(report: FidelityReport) -> str:
    parts = [f"{name} ×{_num(v, '×')}" for name, v in report.headline().items()]
    return "dilation (sim ÷ kernel): " + ", ".join(parts)


def fidelity(
    files: Annotated[list[Path], typer.Argument(metavar="KERNEL_FILE(S) SIM_FILE",
                                                help="The kernel run's -loaded.arrow (and optionally -baseline.arrow) and one pmd-clear simulated run, or two (one per backend: process and virtual, shown side by side).",
                                                show_default=False)],
    fmt: Annotated[FidelityFormat, typer.Option("--format", help="Terminal table or Markdown.")] = FidelityFormat.TABLE,
) -> None:
    from ptlab.core.probe.kernel_probe import fidelity as build

    if len(files) < 2:
        raise ConfigError("fidelity needs a kernel result file and a simulated result file")
    from ptlab.core.analysis.results import read_meta

    kinds = {f: read_meta(f).get("kind") for f in files}
    kernel_files = [f for f in files if kinds[f] == "kernel"]
    sims = [f for f in files if kinds[f] != "kernel"]
    clocks = {f: read_meta(f).get("clock", "real") for f in sims}
    if len(sims) == 2 and len(set(clocks.values())) == 2:
        _fidelity_side_by_side([build([*kernel_files, f]) for f in sims], [clocks[f] for f in sims], fmt)
        return
    report = build(files)
    if fmt is FidelityFormat.MD:
        typer.echo(fidelity_markdown(report), nl=False)
        return
    from rich.table import Table

    console = _console()
    console.print(f"kernel: {report.kernel_file}" + (f"  (baseline {report.baseline_file})" if report.baseline_file else ""))
    console.print(f"sim:    {report.sim_file}")
    table = Table()
    for col in FIDELITY_COLUMNS:
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=col == "metric")
    for row in fidelity_cells(report):
        table.add_row(*row)
    console.print(table)
    console.print(_headline(report))
    console.print(_FOOTER)
    for n in report.notes:
        console.print(f"[yellow]note:[/] {n}")


def _fidelity_side_by_side(reports: list[FidelityReport], labels: list[str], fmt: FidelityFormat) -> None:
    """The kernel beside a process-backend run and a virtual-time run of the same load."""
    k = reports[0]
    cols = ["metric", "kernel idle", "kernel", "kernel ÷ collapse"]
    for label in labels:
        cols += [label, f"{label} ÷ collapse", f"{label}/kernel", f"{label} relation"]
    per = [fidelity_cells(r) for r in reports]
    rows = []
    for i, base in enumerate(per[0]):
        row = base[:4]
        for cells in per:
            row += cells[i][4:8]
        rows.append(row)
    heads = [f"{label}: {r.sim_file}; " + _headline(r) for label, r in zip(labels, reports)]
    if fmt is FidelityFormat.MD:
        lines = [f"kernel: `{k.kernel_file}`", *[f"- {h}" for h in heads], "",
                 "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        notes = [f"note ({label}): {n}" for label, r in zip(labels, reports) for n in r.notes]
        typer.echo("\n".join([*lines, "", _FOOTER, *notes]))
        return
    from rich.table import Table

    console = _console()
    console.print(f"kernel: {k.kernel_file}")
    for h in heads:
        console.print(h)
    table = Table()
    for col in cols:
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=col == "metric")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(_FOOTER)
    for label, r in zip(labels, reports):
        for n in r.notes:
            console.print(f"[yellow]note ({label}):[/] {n}")


def register(app: typer.Typer) -> None:
    app.command("kernel", help=_KERNEL_HELP)(kernel)
    app.command("fidelity", help=_FIDELITY_HELP)(fidelity)
