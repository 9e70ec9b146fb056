"""`ptlab calibrate`: what each primitive costs from Python beside its C reference.

Measures (ptlab.core.calibrate), prints the table with the project's targets, and writes
``DIR/calibration.arrow``.  An unwritable --out raises ConfigError before anything is measured,
which ptlab.cli.main turns into one line and exit code 2; a failed measurement raises RunFailed
(exit code 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

_HELP = """\
Measure each primitive of the simulated machine from Python beside a C reference loop of the same extension, in the same run: atomic load/store/CAS/fetch-add, spinlock pair (the lock class and the raw calls) uncontended and contended by two processes, rwsem pairs, futex wake-to-run p50/p99 between two processes, folio lock pair, 4 KiB and 2 MiB frame copies (reference: memcpy), and the TLB-flush round trip to 1 and 2 target CPU processes.

ratio = median / C reference median: how many times slower than C the step ran (the dilation of every time in a result file). For copies the fraction of memcpy bandwidth is 1 / ratio.

Writes DIR/calibration.arrow (columns primitive, unit, median, p99, reference_median, ratio). --quick runs only the in-process subset that every result file embeds (under half a second).

Example:  ptlab calibrate --out results
"""


def _fmt(v: Any) -> str:
    """ns with three significant digits, µs from 10 µs up; — for none."""
    if v is None:
        return "—"
    if v >= 10_000:
        return f"{v / 1000:.1f} µs"
    return f"{v:.3g} ns" if v < 100 else f"{v:.0f} ns"


def render(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The calibration rows as a rich Table, with a target column where the project sets one.
    Times are per operation for unit ns/op (one batch's mean) and per event for unit ns."""
    from ptlab.core.calibrate import check_targets
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


def calibrate(
    out: Annotated[Path, typer.Option("--out", help="Directory for calibration.arrow (created if missing).")] = Path("results/calibration"),
    quick: Annotated[bool, typer.Option("--quick", help="Only the in-process subset (no second process; under 0.5 s).")] = False,
) -> None:
    from ptlab.core import calibrate as cal
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cal.check_out_dir(out)  # before measuring: a bad --out costs nothing
    console = Console()
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("calibrating", total=1.0)

        def say(step: str, frac: float) -> None:
            bar.update(task, description=step, completed=frac)

        rows = cal.quick_calibration(progress=say) if quick else cal.run_calibration(progress=say)
    console.print(render(rows))
    path = cal.write_calibration(rows, out)
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add `calibrate` to ``app``."""
    app.command("calibrate", help=_HELP)(calibrate)
