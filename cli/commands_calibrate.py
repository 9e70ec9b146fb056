"""`ptlab calibrate`: what each primitive costs from Python beside its C reference.

Measures (ptlab.core.analysis.calibrate), prints the table with the project's targets, and writes
``DIR/calibration.arrow``.  An unwritable --out raises ConfigError before anything is measured,
which ptlab.cli.main turns into one line and exit code 2; a failed measurement raises RunFailed
(exit code 3).

With --kernel it measures the kernel cost table instead (ptlab.core.probe.kernel_costs.kernel_costs,
held by ptlab.core.analysis.costs): what each kernel step costs the host kernel, for the virtual clock,
printed with the source of every entry and written as JSON to --out FILE (default
results/costs/<hostname>.json).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from ptlab.cli.output import console as _console
from ptlab.core.machine.errors import ConfigError

_HELP = """\
Measure each primitive of the simulated machine from Python beside a C reference loop of the same extension, in the same run: atomic load/store/CAS/fetch-add, spinlock pair (the lock class and the raw calls) uncontended and contended by two processes, rwsem pairs, futex wake-to-run p50/p99 between two processes, folio lock pair, 4 KiB and 2 MiB frame copies (reference: memcpy), and the TLB-flush round trip to 1 and 2 target CPU processes.

ratio = median / C reference median: how many times slower than C the step ran (the dilation of every time in a result file). For copies the fraction of memcpy bandwidth is 1 / ratio.

Writes DIR/calibration.arrow (columns primitive, unit, median, p99, reference_median, ratio). --quick runs only the in-process subset that every result file embeds (under half a second).

With --kernel: the kernel cost table for the virtual clock instead -- what each kernel step costs this host's kernel (a cache-hitting load, an atomic, a cache-line transfer, a 4 KiB copy and clear, a TLB walk, an IPI round trip via membarrier, a futex wake-up, a context switch, a fault, mmap()+munmap(), the LRU drain and the collapse's fixed and per-page work), measured by C loops where user space can time it and cited where it cannot, each with its source.  --kernel-result FILE anchors the fault and collapse entries on a `ptlab kernel` run; --repeat N keeps each measurement's least disturbed of N passes.  Writes --out FILE (default results/costs/<hostname>.json); --quick takes about a second.

Examples:

  ptlab calibrate --out results

  ptlab calibrate --kernel --kernel-result results/kernel/kernel-...-loaded.arrow
"""


def _fmt(v: Any) -> str:
    """ns in the one number format (ptlab.core.analysis.compare.fmt_num), µs from 10 µs up; — for none."""
    from ptlab.core.analysis.compare import fmt_num

    if v is None:
        return "—"
    if v >= 10_000:
        return f"{fmt_num(v / 1000)} µs"
    return f"{fmt_num(v)} ns"


def render(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The calibration rows as a rich Table, with a target column where the project sets one.
    Times are per operation for unit ns/op (one batch's mean) and per event for unit ns."""
    from ptlab.core.analysis.calibrate import check_targets
    from rich import box
    from rich.table import Table
    from rich.text import Text

    targets = check_targets(rows)
    t = Table(
        title="Calibration: ratio = median / C reference median",
        title_justify="left",
        caption="ns/op rows: per operation (batch means); ns rows: per event.  "
        "Copies: the fraction of memcpy bandwidth is 1 / ratio.",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    t.add_column("primitive", no_wrap=True)
    for c in ("median", "p99", "C ref", "ratio"):
        t.add_column(c, justify="right", no_wrap=True)
    t.add_column("target")
    for r in rows:
        ratio = r.get("ratio")
        target = targets.get(r["primitive"])
        cell = Text("")
        if target:
            cell = Text(f"{target[0]} {'✓' if target[1] else '✗ missed'}", style="green" if target[1] else "red")
        t.add_row(r["primitive"], _fmt(r["median"]), _fmt(r["p99"]), _fmt(r.get("reference_median")),
                  "—" if ratio is None else f"×{ratio:.3g}", cell)
    return t


def render_costs(table: Any) -> Any:
    """A kernel cost table (core.costs.CostTable) as a rich Table: entry, ns, kind, source."""
    from rich import box
    from rich.table import Table

    t = Table(
        title="Kernel cost table: virtual ns charged per kernel step",
        title_justify="left",
        caption="measured: timed here by a C loop; cited: a published figure; derived: "
        "arithmetic over other entries (spelled out in the source).",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    t.add_column("entry", no_wrap=True)
    t.add_column("ns", justify="right", no_wrap=True)
    t.add_column("kind", no_wrap=True)
    t.add_column("source", overflow="fold")  # wraps on a terminal, whole lines when piped
    style = {"measured": "green", "cited": "yellow", "derived": "cyan"}
    for name, e in table.entries.items():
        t.add_row(name, _fmt(e.ns), f"[{style.get(e.kind, '')}]{e.kind}[/]", e.source)
    return t


def _kernel_costs(out: Path | None, quick: bool, kernel_result: Path | None, repeat: int) -> None:
    from ptlab.core.analysis import costs
    from ptlab.core.probe import kernel_costs as cal
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if repeat < 1:
        raise ConfigError(f"--repeat must be at least 1 (got {repeat})")
    path = costs.resolve_out(out)  # before measuring: a bad --out costs nothing
    if kernel_result is not None and not kernel_result.exists():
        raise ConfigError(f"--kernel-result {kernel_result}: no such file")
    anchor = cal.kernel_result_latencies(kernel_result) if kernel_result is not None else None
    console = _console()  # results on stdout, never cut when piped; the bar on stderr
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(),
                  console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task("measuring", total=1.0)

        def say(step: str, frac: float) -> None:
            bar.update(task, description=step, completed=frac)

        table = cal.kernel_costs(quick=quick, progress=say, anchor=anchor, repeat=repeat)
    console.print(render_costs(table))
    console.print(f"wrote {costs.write_costs(table, path)}")


def calibrate(
    out: Annotated[Path | None, typer.Option("--out", help="Directory for calibration.arrow (created if missing; default results/calibration); with --kernel the cost table's FILE.json or a directory for it (default results/costs/<hostname>.json).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Only the in-process subset (no second process; under 0.5 s); with --kernel, small samples (about a second).")] = False,
    kernel: Annotated[bool, typer.Option("--kernel", help="Measure the kernel cost table for the virtual clock instead (see above).")] = False,
    kernel_result: Annotated[Path | None, typer.Option("--kernel-result", help="With --kernel: a `ptlab kernel` result file whose median fault and collapse anchor fault_entry and the collapse entries.")] = None,
    repeat: Annotated[int, typer.Option("--repeat", metavar="N", help="With --kernel: measure N times and keep each measurement's least disturbed pass (on a shared host interference only adds time).")] = 1,
) -> None:
    from ptlab.core.analysis import calibrate as cal
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if kernel:
        _kernel_costs(out, quick, kernel_result, repeat)
        return
    if kernel_result is not None:
        raise ConfigError("--kernel-result needs --kernel (it anchors the kernel cost table)")
    if repeat != 1:
        raise ConfigError("--repeat needs --kernel (it repeats the kernel cost measurements)")
    out = Path("results/calibration") if out is None else out
    cal.check_out_dir(out)  # before measuring: a bad --out costs nothing
    console = _console()  # results on stdout, never cut when piped; the bar on stderr
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(),
                  console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task("calibrating", total=1.0)

        def say(step: str, frac: float) -> None:
            bar.update(task, description=step, completed=frac)

        rows = cal.quick_calibration(progress=say) if quick else cal.run_calibration(progress=say)
    console.print(render(rows))
    path = cal.write_calibration(rows, out)
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add `calibrate` to ``app``."""
    app.command("calibrate", help=_HELP,
                short_help="Measure each primitive beside its C reference (the dilation).")(calibrate)
