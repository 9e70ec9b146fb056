"""`ptlab compare`, `ptlab plot`, `ptlab show`: views of result files.

The Arrow files are the artefact; these commands only read them.  Bad input (a missing or
corrupt file, a file from a newer ptlab, an unwritable output) raises ResultFileError or
ConfigError, which ptlab.cli.main turns into one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from ptlab.cli.output import console
from ptlab.core.machine.errors import ConfigError


class OutputFormat(str, Enum):
    """How `ptlab compare` presents its result."""

    TABLE = "table"
    MD = "md"
    TEXT = "text"
    JSON = "json"
    CSV = "csv"
    ARROW = "arrow"


class ShowFormat(str, Enum):
    """How `ptlab show` presents one file."""

    TABLE = "table"
    MD = "md"
    JSON = "json"
    CSV = "csv"


# Help texts: one line per paragraph (the help formatter re-wraps paragraphs to the terminal).
_COMPARE_HELP = """\
Compare collapse strategies across result files: latency distributions, who waits and how, collapse rates and result codes, and ratios against a baseline with significance.

Give result files (.arrow) or directories holding them (searched recursively, e.g. a sweep's output). Runs of one strategy with the same parameters are repeats and are pooled; runs with other parameters (another order, an injected bug) form separate groups, shown as strategy#N, each measured against the baseline's group with the same parameters.

Per strategy and op: count, median, p90, p99, p99.9 and max latency in µs; spin time (CPU burned) and sleep time per collapse, split by the role of the CPU that waited; mmap() latency; collapses per second (harmonic mean over repeats) and result-code counts.

Each strategy is compared with the baseline: ratio of medians with a bootstrap 95% interval and a Mann-Whitney U test. A difference is "significant" only when p < 0.05 and the interval excludes 1; otherwise it says "not significant".

Files from hosts with a different CPU model, core count or kernel release are refused (the machine's effect would mix with the strategy's) unless --force.

Formats: table (the terminal view; piped, as wide as it needs), md (Markdown), text (plain ASCII, at most 72 columns, strategies side by side with ratios and a * for a significant difference: for a mailing-list reply), json (every table, stable keys), csv (one number per row: section, strategy, config, key, stat, value, text), arrow (the csv's table as an Arrow IPC file with dictionary-encoded strings and its format version in the metadata; needs --out).

Examples:

  ptlab compare results/run-*.arrow

  ptlab compare sweep-out/ --format text

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

The file's content checksum is checked first: a damaged file is refused (exit 2).

Formats: table (the terminal view), md (Markdown), json (every section, stable keys), csv (one value per row: section, key, stat, value).

Example:  ptlab show results/pmd-clear-o9.arrow
"""

_EXPORT_HELP = """\
Write result files in another format.  --parquet writes FILE.parquet beside each FILE (or into --out DIR): the same events and metadata, checked on reading and given a fresh checksum.  Parquet is what DuckDB, Spark and polars scan natively (a sweep's merged dataset is Parquet already).

Example:  ptlab export --parquet results/runs/ptl-hold-o4-*.arrow
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
        typer.Argument(metavar="FILE|DIR...", help="Result files (.arrow, .parquet) or directories of them.",
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
                     help="table, md, text (72 columns, for a mail), json, csv, or arrow "
                          "(needs --out); see above."),
    ] = OutputFormat.TABLE,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE",
                     help="Write to FILE (atomically) instead of stdout."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Compare even if the files come from incompatible hosts "
                                     "(different CPU model, core count or kernel release)."),
    ] = False,
) -> None:
    from ptlab.core.analysis.compare import (
        compare_paths,
        render_csv,
        render_json,
        render_mail_text,
        render_markdown,
        render_rich,
        render_text,
        write_comparison_arrow,
    )

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
        print(f"wrote {out} ({cmp.to_arrow().num_rows:,} rows)", file=sys.stderr)
        return
    if fmt is OutputFormat.TABLE and out is None:
        con = console()
        for r in render_rich(cmp):
            con.print(r)
        return
    render = {OutputFormat.MD: render_markdown, OutputFormat.TEXT: render_mail_text,
              OutputFormat.JSON: render_json, OutputFormat.CSV: render_csv,
              OutputFormat.TABLE: render_text}[fmt]
    _emit(render(cmp), out)


def _emit(text: str, out: Path | None) -> None:
    """``text`` to stdout, or atomically to ``out`` (with a note on stderr)."""
    from ptlab.core.analysis.results import atomic_write_bytes

    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_bytes(out, text.encode())
        print(f"wrote {out}", file=sys.stderr)


def plot(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(metavar="FILE|DIR...", help="Result files (.arrow, .parquet) or directories of them.",
                       show_default=False),
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="DIR", help="Directory for the PNGs (created if missing)."),
    ] = Path("figures"),
) -> None:
    from ptlab.core.analysis.plots import plot_paths

    if not paths:
        raise ConfigError("no result files given; e.g. `ptlab plot results/*.arrow --out figures`")
    report = plot_paths(paths, out)
    for p in report.written:
        print(f"wrote {p}")
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}")


def show(
    path: Annotated[
        Path | None, typer.Argument(metavar="FILE", help="One result file (.arrow or .parquet).", show_default=False)
    ] = None,
    fmt: Annotated[
        ShowFormat,
        typer.Option("--format", "-f", help="table, md, json or csv (see above)."),
    ] = ShowFormat.TABLE,
) -> None:
    from ptlab.core.analysis.results import read_run

    if path is None:
        raise ConfigError("no result file given; e.g. `ptlab show results/pmd-clear-o9.arrow`")
    run = read_run(path)
    if fmt is ShowFormat.TABLE:
        con = console()
        for r in show_renderables(run):
            con.print(r)
        return
    sections = show_sections(run)
    if fmt is ShowFormat.JSON:
        _emit(json.dumps(show_json(run, sections), indent=1, sort_keys=True, default=str) + "\n", None)
    elif fmt is ShowFormat.CSV:
        _emit(show_csv(sections), None)
    else:
        _emit(show_markdown(run, sections), None)


def export(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(metavar="FILE...", help="Result files to export.", show_default=False),
    ] = None,
    parquet: Annotated[bool, typer.Option("--parquet", help="Write Parquet (the one format so far).")] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="DIR", help="Directory for the exported files (default: beside each file)."),
    ] = None,
) -> None:
    from ptlab.core.analysis.results import export_parquet, find_result_files

    if not paths:
        raise ConfigError("no result file given; e.g. `ptlab export --parquet results/runs/run.arrow`")
    if not parquet:
        raise ConfigError("choose the format to export to: --parquet")
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the exported files")
    files = [f for f in find_result_files(paths) if f.suffix != ".parquet"]
    if not files:
        raise ConfigError("nothing to export: the files given are Parquet already")
    for f in files:
        dest = (out if out is not None else f.parent) / (f.stem + ".parquet")
        export_parquet(f, dest)
        print(f"wrote {dest}")


# --- show: one file's sections, in every format ----------------------------------------------

@dataclass(frozen=True)
class Section:
    """One table of `ptlab show`: a title, column names and rows of raw values (numbers stay
    numbers until a view formats them)."""

    name: str
    title: str
    columns: tuple[str, ...]
    rows: list[list[Any]]
    caption: str = ""


def show_sections(run: Any) -> list[Section]:
    """The tables of `ptlab show` for one RunResult: parameters, host, runs (merged files),
    events by role and op, collapse results, violations, calibration, summary."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from ptlab.core.analysis.compare import OP_ORDER, ROLE_ORDER, latency_quantiles_us
    from ptlab.core.analysis.results import split_runs

    meta = run.meta
    out: list[Section] = []
    runs = split_runs(run)
    if len(runs) > 1 or meta.get("runs"):
        out.append(Section("runs", "Runs in this file", ("run_id", "strategy", "events", "duration_s"),
                           [[r.run_id, r.strategy, r.table.num_rows, r.duration_s] for r in runs]))
    params = meta.get("params") or {}
    if params:
        out.append(Section("params", "Parameters", ("key", "value"),
                           [[k, v] for k, v in sorted(params.items())]))
    host = meta.get("host") or {}
    if host:
        first = ("hostname", "cpu_model", "cores", "cores_usable", "simulated_cpus", "oversubscription",
                 "kernel_release", "python", "packages", "git_revision", "git_dirty", "node_id")
        keys = [k for k in first if k in host] + sorted(set(host) - set(first))
        out.append(Section("host", "Host", ("key", "value"), [[k, host[k]] for k in keys]))
    table = run.table
    if table.num_rows:
        role = table.column("role").cast(pa.string()).to_numpy(zero_copy_only=False)
        op = table.column("op").cast(pa.string()).to_numpy(zero_copy_only=False)
        lat = table.column("latency_ns").to_numpy()
        spin = table.column("spin_ns").to_numpy()
        sleep = table.column("sleep_ns").to_numpy()
        rows = []
        pairs = sorted(set(zip(role.tolist(), op.tolist(), strict=True)),
                       key=lambda ro: (_rank(ro[0], ROLE_ORDER), _rank(ro[1], OP_ORDER), ro))
        for ro, o in pairs:
            m = (role == ro) & (op == o)
            q = latency_quantiles_us(lat[m])
            rows.append([ro, o, int(m.sum()), q["median_us"], q["p99_us"], q["max_us"],
                         float(spin[m].sum()) / 1e6, float(sleep[m].sum()) / 1e6])
        sample = run.sample_factor("access")
        out.append(Section(
            "events", "Events by role and op (latency in µs)",
            ("role", "op", "count", "median_us", "p99_us", "max_us", "spin_ms", "sleep_ms"), rows,
            f"access rows are a 1-in-{sample} sample of TLB-hit accesses" if sample > 1 else ""))
        coll = table.filter(pc.equal(table.column("op").cast(pa.string()), "collapse"))
        if coll.num_rows:
            codes, counts = np.unique(coll.column("result").cast(pa.string()).to_numpy(zero_copy_only=False),
                                      return_counts=True)
            out.append(Section("results", "Collapse results", ("result", "count", "share_pct"),
                               [[c or "(none)", int(n), 100.0 * n / coll.num_rows]
                                for c, n in sorted(zip(codes.tolist(), counts.tolist(), strict=True),
                                                   key=lambda cn: -cn[1])]))
    violations = meta.get("violations") or []
    vcols = ("kind", "cpu", "page", "strategy", "phase", "t_ns", "detail")
    out.append(Section("violations", f"Correctness violations: {len(violations)}", vcols,
                       [[v.get(c, "") for c in vcols] for v in violations]))
    calibration = meta.get("calibration") or []
    if calibration:
        cols = ("primitive", "unit", "median", "p99", "reference_median", "ratio")
        ratios = [r["ratio"] for r in calibration if isinstance(r.get("ratio"), (int, float))]
        caption = (f"median dilation ×{_num(float(np.median(ratios)))} over {len(ratios)} primitives"
                   if ratios else "")
        out.append(Section("calibration", "Calibration (ratio = median / C reference median: the dilation)",
                           cols, [[r.get(c) for c in cols] for r in calibration], caption))
    summary = meta.get("summary") or {}
    if summary:
        out.append(Section("summary", "Summary", ("key", "value"), [[k, v] for k, v in sorted(summary.items())]))
    return out


def show_renderables(run: Any) -> list[Any]:
    """Rich renderables summarising one RunResult (used by `ptlab show`)."""
    from rich.table import Table
    from rich.text import Text

    meta = run.meta
    started = f"  started {meta['started_at']}" if meta.get("started_at") else ""
    head = (
        f"{run.path}  run {run.run_id}  kind {run.kind}  schema {meta.get('schema_version')}  "
        f"{run.table.num_rows:,} events  {_num(run.duration_s)} s{started}  checksum ok"
    )
    out: list[Any] = [Text(head, style="bold")]
    for sec in show_sections(run):
        if sec.name == "violations" and not sec.rows:
            out.append(Text("correctness violations: none", style="green"))
            continue
        t = Table(title=sec.title, title_justify="left", show_header=sec.columns != ("key", "value"),
                  title_style="bold red" if sec.name == "violations" else None,
                  caption=sec.caption or None, caption_justify="left")
        for c in sec.columns:
            t.add_column(c.removesuffix("_us").removesuffix("_ms").replace("_", " "),
                         justify="right" if _numeric_column(sec, c) else "left", overflow="fold")
        for row in sec.rows:
            _row(t, *(_cell(v) for v in row))
        out.append(t)
    return out


def show_markdown(run: Any, sections: list[Section]) -> str:
    lines = [f"# {run.path}", "",
             f"run `{run.run_id}`, kind `{run.kind}`, schema {run.meta.get('schema_version')}, "
             f"{run.table.num_rows:,} events, {_num(run.duration_s)} s", ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        if sec.caption:
            lines += [f"_{sec.caption}_", ""]
        if not sec.rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(sec.columns) + " |")
        lines.append("|" + "|".join("---:" if _numeric_column(sec, c) else "---" for c in sec.columns) + "|")
        for row in sec.rows:
            lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def show_json(run: Any, sections: list[Section]) -> dict[str, Any]:
    """Stable keys: the file's identity, then each section as a list of {column: value}."""
    import math

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    doc: dict[str, Any] = {
        "path": str(run.path), "run_id": run.run_id, "kind": run.kind,
        "schema_version": run.meta.get("schema_version"), "events": run.table.num_rows,
        "duration_s": run.duration_s, "started_at": run.meta.get("started_at"), "checksum": "ok",
        "params": run.meta.get("params") or {}, "host": run.meta.get("host") or {},
        "summary": run.meta.get("summary") or {},
    }
    for sec in sections:
        if sec.name in ("params", "host", "summary"):
            continue
        doc[sec.name] = [{c: clean(v) for c, v in zip(sec.columns, row, strict=True)} for row in sec.rows]
    return doc


def show_csv(sections: list[Section]) -> str:
    """One value per row: section, key (the row's first cell), stat (the column), value."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "key", "stat", "value"])
    for sec in sections:
        for i, row in enumerate(sec.rows):
            key = row[0] if sec.columns[0] != "kind" else i
            if sec.name == "events":
                key = f"{row[0]}/{row[1]}"
            for c, v in zip(sec.columns, row, strict=True):
                if c in ("key", "role", "op") or (c == sec.columns[0] and sec.name != "violations"):
                    continue
                w.writerow([sec.name, key, c, "" if v is None else (
                    json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)])
    return buf.getvalue()


def _numeric_column(sec: Section, col: str) -> bool:
    i = sec.columns.index(col)
    vals = [r[i] for r in sec.rows if r[i] is not None and r[i] != ""]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def _row(table: Any, *cells: Any) -> None:
    """Add a row of plain text (values such as "[0, 1]" are not rich markup)."""
    from rich.text import Text

    table.add_row(*(Text(str(c)) for c in cells))


def _rank(v: str, order: tuple[str, ...]) -> int:
    return order.index(v) if v in order else len(order)


def _num(v: Any) -> str:
    from ptlab.core.analysis.compare import fmt_num

    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return fmt_num(v)
    return "" if v is None else str(v)


def _cell(v: Any) -> str:
    """A value as table text: numbers in the one number format, records spelled out whole
    (never cut: a long one wraps in its column)."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items()) or "—"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v) if v else "—"
    if v is None:
        return "—"
    return _num(v)


def register(app: typer.Typer) -> None:
    """Add compare, plot, show and export to ``app``."""
    app.command("compare", help=_COMPARE_HELP,
                short_help="Compare strategies across result files, with significance.")(compare)
    app.command("plot", help=_PLOT_HELP, short_help="Draw PNG figures from result files.")(plot)
    app.command("show", help=_SHOW_HELP, short_help="Summarise one result file.")(show)
    app.command("export", help=_EXPORT_HELP,
                short_help="Write result files as Parquet (DuckDB, Spark, polars).")(export)
