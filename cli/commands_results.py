"""`ptlab compare`, `ptlab plot`, `ptlab show`: views of result files.

The Arrow files are the artefact; these commands only read them.  Bad input (a missing or
corrupt file, a file from a newer ptlab, an unwritable output) raises ResultFileError or
ConfigError, which ptlab.cli.main turns into one line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from ptlab.core.errors import ConfigError


class OutputFormat(str, Enum):
    """How `ptlab compare` presents its result."""

    TABLE = "table"
    MD = "md"
    ARROW = "arrow"


# Help texts: one line per paragraph (the help formatter re-wraps paragraphs to the terminal).
_COMPARE_HELP = """\
Compare collapse strategies across result files: latency distributions, who waits and how, collapse rates and result codes, and ratios against a baseline with significance.

Give result files (.arrow) or directories holding them (searched recursively, e.g. a sweep's output). Runs of one strategy with the same parameters are repeats and are pooled; runs with other parameters (another order, an injected bug) form separate groups, shown as strategy#N, each measured against the baseline's group with the same parameters.

Per strategy and op: count, median, p90, p99, p99.9 and max latency in µs; spin time (CPU burned) and sleep time per collapse, split by the role of the CPU that waited; mmap() latency; collapses per second (harmonic mean over repeats) and result-code counts.

Each strategy is compared with the baseline: ratio of medians with a bootstrap 95% interval and a Mann-Whitney U test. A difference is "significant" only when p < 0.05 and the interval excludes 1; otherwise it says "not significant".

Files from hosts with a different CPU model, core count or kernel release are refused (the machine's effect would mix with the strategy's) unless --force.

Examples:

  ptlab compare results/run-*.arrow

  ptlab compare sweep-out/ --baseline ptl-hold --format md --out comparison.md

  ptlab compare sweep-out/ --format arrow --out comparison.arrow
"""

_PLOT_HELP = """\
Draw PNG figures (800 px wide) from result files or directories into --out DIR.

latency-cdf-fault.png, latency-cdf-mmap.png: latency CDF and tail per strategy (log µs). waits-per-collapse.png: spin vs sleep ms per collapse, stacked by the role that waited. timeline.png: accesses, faults and collapses per second. collapse-phases.png: mean time of each collapse phase.

A figure without data (e.g. no mmap() events) is skipped with a note.

Example:  ptlab plot sweep-out/ --out figures/
"""

_SHOW_HELP = """\
Summarise one result file: run parameters, host fingerprint, event counts and latency by role and op, collapse result codes, correctness violations, and the calibration table (how much slower each primitive ran than its C reference: the dilation of every time in the file).

Example:  ptlab show results/pmd-clear-o9.arrow
"""


def _check_writable_file(out: Path) -> None:
    """Fail early (before any work) when ``out`` cannot be created; creates nothing."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot write {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {out}: no write permission in {probe}; choose another --out")


def compare(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(metavar="FILE|DIR...", help="Result files (.arrow) or directories of them.",
                       show_default=False),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", "-b", metavar="STRATEGY",
                     help="Strategy the others are measured against (default: pmd-clear "
                          "if present -- today's kernel -- else the first strategy); a group "
                          "label such as 'pmd-clear [order=4]' picks one group for all."),
    ] = None,
    fmt: Annotated[
        OutputFormat,
        typer.Option("--format", "-f",
                     help="table: terminal tables; md: Markdown for a README or a mail; "
                          "arrow: one long Arrow table (section, strategy, key, stat, value, "
                          "text) for pandas/DuckDB -- needs --out."),
    ] = OutputFormat.TABLE,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE",
                     help="Write to FILE (atomically) instead of the terminal."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Compare even if the files come from incompatible hosts "
                                     "(different CPU model, core count or kernel release)."),
    ] = False,
) -> None:
    from ptlab.core.compare import (
        compare_paths,
        render_markdown,
        render_rich,
        render_text,
        write_comparison_arrow,
    )
    from ptlab.core.results import atomic_write_bytes

    if not paths:
        raise ConfigError("no result files given; e.g. `ptlab compare results/*.arrow` or a sweep directory")
    if fmt is OutputFormat.ARROW and out is None:
        raise ConfigError("--format arrow writes a binary file; add --out FILE.arrow")
    if out is not None:
        _check_writable_file(out)
    cmp = compare_paths(paths, baseline=baseline, force=force)
    if fmt is OutputFormat.ARROW:
        assert out is not None
        write_comparison_arrow(cmp, out)
        print(f"wrote {out} ({cmp.to_arrow().num_rows} rows)", file=sys.stderr)
    elif fmt is OutputFormat.MD:
        text = render_markdown(cmp)
        if out is None:
            sys.stdout.write(text)
        else:
            atomic_write_bytes(out, text.encode())
            print(f"wrote {out}", file=sys.stderr)
    elif out is not None:
        atomic_write_bytes(out, render_text(cmp).encode())
        print(f"wrote {out}", file=sys.stderr)
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=160)  # a pipe or a file: no reason to wrap at 80 columns
        for r in render_rich(cmp):
            console.print(r)


def plot(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(metavar="FILE|DIR...", help="Result files (.arrow) or directories of them.",
                       show_default=False),
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="DIR", help="Directory for the PNGs (created if missing)."),
    ] = Path("figures"),
) -> None:
    from ptlab.core.plots import plot_paths

    if not paths:
        raise ConfigError("no result files given; e.g. `ptlab plot results/*.arrow --out figures`")
    report = plot_paths(paths, out)
    for p in report.written:
        print(f"wrote {p}")
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}")


def show(
    path: Annotated[
        Path | None, typer.Argument(metavar="FILE", help="One result file (.arrow).", show_default=False)
    ] = None,
) -> None:
    from ptlab.core.results import read_run
    from rich.console import Console

    if path is None:
        raise ConfigError("no result file given; e.g. `ptlab show results/pmd-clear-o9.arrow`")
    console = Console()
    for r in show_renderables(read_run(path)):
        console.print(r)


def show_renderables(run: Any) -> list[Any]:
    """Rich renderables summarising one RunResult (used by `ptlab show`)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from ptlab.core.compare import OP_ORDER, ROLE_ORDER, fmt_us, latency_quantiles_us
    from ptlab.core.results import split_runs
    from rich.table import Table
    from rich.text import Text

    meta = run.meta
    out: list[Any] = []
    runs = split_runs(run)
    head = (
        f"{run.path}  run {run.run_id}  kind {run.kind}  schema {meta.get('schema_version')}  "
        f"{run.table.num_rows:,} events  {run.duration_s:.3g} s"
    )
    out.append(Text(head, style="bold"))
    if len(runs) > 1 or meta.get("runs"):
        t = Table(title="Runs in this file", title_justify="left")
        for c in ("run_id", "strategy", "events", "duration s"):
            t.add_column(c)
        for r in runs:
            _row(t, r.run_id, r.strategy, f"{r.table.num_rows:,}", f"{r.duration_s:.3g}")
        out.append(t)

    params = meta.get("params") or {}
    if params:
        t = Table(title="Parameters", title_justify="left", show_header=False)
        t.add_column("key")
        t.add_column("value")
        for k, v in sorted(params.items()):
            _row(t, k, _short(v))
        out.append(t)

    host = meta.get("host") or {}
    if host:
        t = Table(title="Host", title_justify="left", show_header=False)
        t.add_column("key")
        t.add_column("value")
        first = ("hostname", "cpu_model", "cores", "cores_usable", "simulated_cpus", "oversubscription",
                 "kernel_release", "python", "packages", "git_revision", "git_dirty", "node_id")
        for k in [k for k in first if k in host] + sorted(set(host) - set(first)):
            _row(t, k, _short(host[k]))
        out.append(t)

    table = run.table
    if table.num_rows:
        role = table.column("role").cast(pa.string()).to_numpy(zero_copy_only=False)
        op = table.column("op").cast(pa.string()).to_numpy(zero_copy_only=False)
        lat = table.column("latency_ns").to_numpy()
        spin = table.column("spin_ns").to_numpy()
        sleep = table.column("sleep_ns").to_numpy()
        t = Table(title="Events by role and op (latency in µs)", title_justify="left")
        for c in ("role", "op", "count", "median", "p99", "max", "spin ms", "sleep ms"):
            t.add_column(c, justify="left" if c in ("role", "op") else "right")
        pairs = sorted(set(zip(role.tolist(), op.tolist(), strict=True)),
                       key=lambda ro: (_rank(ro[0], ROLE_ORDER), _rank(ro[1], OP_ORDER), ro))
        for ro, o in pairs:
            m = (role == ro) & (op == o)
            q = latency_quantiles_us(lat[m])
            _row(t, ro, o, f"{int(m.sum()):,}", fmt_us(q["median_us"]), fmt_us(q["p99_us"]),
                      fmt_us(q["max_us"]), f"{spin[m].sum() / 1e6:.3g}", f"{sleep[m].sum() / 1e6:.3g}")
        out.append(t)
        coll = table.filter(pc.equal(table.column("op").cast(pa.string()), "collapse"))
        if coll.num_rows:
            codes, counts = np.unique(coll.column("result").cast(pa.string()).to_numpy(zero_copy_only=False),
                                      return_counts=True)
            t = Table(title="Collapse results", title_justify="left")
            t.add_column("result")
            t.add_column("count", justify="right")
            t.add_column("share", justify="right")
            for c, n in sorted(zip(codes.tolist(), counts.tolist(), strict=True), key=lambda cn: -cn[1]):
                _row(t, c or "(none)", f"{n:,}", f"{100 * n / coll.num_rows:.1f}%")
            out.append(t)
    else:
        out.append(Text("no events"))

    violations = meta.get("violations") or []
    if violations:
        t = Table(title=f"Correctness violations: {len(violations)}", title_justify="left",
                  title_style="bold red")
        vcols = ("kind", "cpu", "page", "strategy", "phase", "t_ns", "detail")
        for c in vcols:
            t.add_column(c)
        for v in violations[:10]:
            _row(t, *(_short(v.get(c, "")) for c in vcols))
        if len(violations) > 10:
            t.caption = f"... and {len(violations) - 10} more"
        out.append(t)
    else:
        out.append(Text("correctness violations: none", style="green"))

    calibration = meta.get("calibration") or []
    if calibration:
        t = Table(title="Calibration (ratio = median / C reference median: the dilation)",
                  title_justify="left")
        cols = ("primitive", "unit", "median", "p99", "reference_median", "ratio")
        for c in cols:
            t.add_column(c, justify="left" if c in ("primitive", "unit") else "right")
        for row in calibration:
            _row(t, *(_num(row.get(c)) for c in cols))
        ratios = [row["ratio"] for row in calibration if isinstance(row.get("ratio"), (int, float))]
        if ratios:
            t.caption = f"median dilation ×{float(np.median(ratios)):.3g} over {len(ratios)} primitives"
        out.append(t)
    summary = meta.get("summary") or {}
    if summary:
        out.append(Text("summary: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(summary.items()))))
    return out


def _row(table: Any, *cells: Any) -> None:
    """Add a row of plain text (values such as "[0, 1]" are not rich markup)."""
    from rich.text import Text

    table.add_row(*(Text(str(c)) for c in cells))


def _rank(v: str, order: tuple[str, ...]) -> int:
    return order.index(v) if v in order else len(order)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _short(v: Any, limit: int = 100) -> str:
    if isinstance(v, dict):
        s = ", ".join(f"{k}={x}" for k, x in v.items())
    elif isinstance(v, (list, tuple)):
        s = ", ".join(map(str, v)) if v else "—"
    else:
        s = str(v)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def register(app: typer.Typer) -> None:
    """Add compare, plot and show to ``app``."""
    app.command("compare", help=_COMPARE_HELP)(compare)
    app.command("plot", help=_PLOT_HELP)(plot)
    app.command("show", help=_SHOW_HELP)(show)
