"""Figures from result files: where the time goes, per strategy.

Four views of the same events (all repeats of a strategy pooled), each a PNG sized for a
README (800 px wide) with units on every axis:

* ``latency-cdf-fault.png``, ``latency-cdf-mmap.png`` -- the distribution of page-fault and
  mmap() latency per strategy: the CDF on a log time axis (µs) and, beside it, the tail
  (1 - CDF, log scale), where a 1 ms PTL spin at p99.9 shows up.
* ``waits-per-collapse.png`` -- spin and sleep time per collapse, stacked by the role of the
  CPU that waited (computed as in ``ptlab compare``: events that started during a collapse).
  Spinning burns a CPU; sleeping does not: the two panels keep them apart.
* ``timeline.png`` -- accesses, faults and collapses per second over the run (mean over
  repeats), to see stalls and warm-up.
* ``collapse-phases.png`` -- the mean time of each phase of a collapse attempt (lock wait,
  unmap, flush, refcheck, copy, install), stacked per strategy.

A figure without data (no mmap() events, no collapses, ...) is skipped with a note, never an
error.  Drawing uses matplotlib's object API on the Agg canvas, so it needs no display and
leaves pyplot's global state alone.  Every PNG is written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ptlab.core.analysis.compare import ROLE_ORDER, display_names, group_runs, waits_table
from ptlab.core.analysis.results import PHASE_COLUMNS, RunResult, atomic_write_bytes, read_runs
from ptlab.core.machine.errors import ConfigError

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 4.5, 100  # 800 x 450 px
MAX_CDF_POINTS = 4000

_STRATEGY_COLORS = {
    "pmd-clear": "#1f77b4", "ptl-hold": "#d62728", "migration-entry": "#2ca02c",
    "kernel-madv-collapse": "#7f7f7f",
}
_EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e")
_ROLE_COLORS = {
    "app": "#4c72b0", "gup-fast": "#dd8452", "gup-slow": "#c44e52", "mmap": "#8172b3",
    "zap": "#937860", "khugepaged": "#55a868",
}
_PHASE_COLORS = ("#8da0cb", "#fc8d62", "#e78ac3", "#a6d854", "#66c2a5", "#ffd92f")


class NoData(Exception):
    """A figure has nothing to show; the message says what is missing."""


@dataclass(frozen=True)
class PlotReport:
    """What plot_runs did: the PNGs written and the figures skipped (file name, reason)."""

    written: tuple[Path, ...]
    skipped: tuple[tuple[str, str], ...]


_LINESTYLES = ("-", "--", ":", "-.")


def _color(name: str, names: Sequence[str]) -> str:
    """Colour of a group: its strategy's (``ptl-hold#2`` is ptl-hold)."""
    strategy = name.split("#")[0]
    if strategy in _STRATEGY_COLORS:
        return _STRATEGY_COLORS[strategy]
    extra = list(dict.fromkeys(n.split("#")[0] for n in names if n.split("#")[0] not in _STRATEGY_COLORS))
    return _EXTRA_COLORS[extra.index(strategy) % len(_EXTRA_COLORS)]


def _linestyle(name: str) -> str:
    """Line style of a group: solid for a strategy's first group, then dashed, dotted, ..."""
    _, _, n = name.partition("#")
    return _LINESTYLES[(int(n) - 1) % len(_LINESTYLES)] if n else "-"


def _groups(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Display name (``strategy`` or ``strategy#N``, as in ptlab compare) -> runs, in order."""
    groups = group_runs(runs)
    names = display_names(groups)
    return {names[g.label]: list(g.runs) for g in groups}


def _footnote(fig: Figure, runs: Sequence[RunResult]) -> None:
    """Under the figure, the parameters of each ``strategy#N`` group (if there are any)."""
    groups = group_runs(runs)
    names = display_names(groups)
    lines = [f"{names[g.label]}: {g.config}" for g in groups if g.config]
    if lines:
        if len(lines) > 8:
            lines = lines[:8] + [f"... and {len(lines) - 8} more (see ptlab compare)"]
        fig.supxlabel("\n".join(lines), fontsize=7, color="0.35", x=0.01, ha="left")


def _figure(ncols: int = 1, nrows: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _latencies_us(runs: Sequence[RunResult], op: str) -> np.ndarray:
    parts = []
    for r in runs:
        t = r.table
        m = pc.equal(t.column("op").cast(pa.string()), op)
        parts.append(t.filter(m).column("latency_ns").to_numpy())
    x = np.concatenate(parts) if parts else np.zeros(0)
    return x.astype(np.float64) / 1e3


def figure_latency_cdf(runs: Sequence[RunResult], op: str, what: str, noun: str) -> Figure:
    """CDF (left) and tail 1 - CDF (right) of the latency of ``op`` per strategy, log µs;
    ``what`` names the op in the title and x label, ``noun`` the events on the y axis.
    Raises NoData when no run has an event of that op."""
    groups = _groups(runs)
    data = {s: np.sort(_latencies_us(rs, op)) for s, rs in groups.items()}
    data = {s: x for s, x in data.items() if len(x)}
    if not data:
        raise NoData(f"no {op} events in the input")
    fig, axes = _figure(2, 1)
    ax_cdf, ax_tail = axes[0]
    floor = min(float(x[x > 0].min()) if (x > 0).any() else 1e-3 for x in data.values())
    for s, x in data.items():
        n = len(x)
        x = np.maximum(x, floor)
        y = np.arange(1, n + 1) / n
        if n > MAX_CDF_POINTS:  # keep the shape and the extreme tail, drop the middle points
            idx = np.unique(np.concatenate([
                np.linspace(0, n - 1, MAX_CDF_POINTS).astype(int), np.arange(max(0, n - 200), n),
            ]))
            x, y = x[idx], y[idx]
        label = f"{s} (n={n:,})"
        style = {"color": _color(s, list(data)), "linestyle": _linestyle(s)}
        ax_cdf.step(x, y, where="post", label=label, **style)
        tail = 1.0 - y + 1.0 / n  # 1/n at the max: the last point stays on a log axis
        ax_tail.step(x, tail, where="post", label=label, **style)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel(f"{what} latency (µs, log scale)")
    ax_cdf.set_ylabel(f"fraction of {noun} ≤ latency")
    ax_cdf.set_ylim(0, 1.02)
    ax_cdf.grid(True, which="both", alpha=0.3)
    if len(data) <= 4:
        ax_cdf.legend(fontsize=8, loc="lower right")
    else:  # many groups: beside the panels, not over the curves
        fig.legend(*ax_cdf.get_legend_handles_labels(), fontsize=7, loc="outside right center")
    ax_tail.set_xscale("log")
    ax_tail.set_yscale("log")
    ax_tail.set_xlabel(f"{what} latency (µs, log scale)")
    ax_tail.set_ylabel(f"fraction of {noun} ≥ latency (tail)")
    for q, label in ((1e-2, "p99"), (1e-3, "p99.9")):
        ax_tail.axhline(q, color="0.6", lw=0.8, ls=":")
        ax_tail.annotate(label, (0.02, q), xycoords=("axes fraction", "data"), fontsize=7,
                         color="0.4", ha="left", va="bottom")
    ax_tail.grid(True, which="major", alpha=0.3)
    fig.suptitle(f"{what} latency per strategy (all repeats pooled)", fontsize=11)
    _footnote(fig, runs)
    return fig


def _bar_height(n_groups: int) -> float:
    """Figure height (inches) for horizontal bars of n groups, at least the standard one."""
    return max(HEIGHT_IN, 1.6 + 0.38 * n_groups)


def figure_waits(runs: Sequence[RunResult]) -> Figure:
    """Spin ms and sleep ms per collapse, stacked by waiter role, one horizontal bar per
    strategy (group).  Raises NoData when no strategy has a collapse or no waiter roles exist."""
    names = display_names(group_runs(runs))
    rows = [r for r in waits_table(runs).to_pylist() if r["spin_ms_per_collapse"] is not None]
    if not rows:
        raise NoData("no collapses (or no non-khugepaged CPUs) in the input")
    for r in rows:  # one bar per group, named as in ptlab compare
        r["strategy"] = names[f"{r['strategy']} [{r['config']}]" if r["config"] else r["strategy"]]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    roles = [ro for ro in ROLE_ORDER if any(r["role"] == ro for r in rows)]
    roles += sorted({r["role"] for r in rows} - set(roles))
    fig = Figure(figsize=(WIDTH_IN, _bar_height(len(strategies))), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True, squeeze=False)
    ys = np.arange(len(strategies))
    for ax, col, title in ((axes[0][0], "spin_ms_per_collapse", "spinning (CPU time burned)"),
                           (axes[0][1], "sleep_ms_per_collapse", "sleeping (blocked, CPU free)")):
        left = np.zeros(len(strategies))
        for role in roles:
            vals = np.array([
                next((r[col] for r in rows if r["strategy"] == s and r["role"] == role), 0.0) or 0.0
                for s in strategies
            ])
            ax.barh(ys, vals, left=left, color=_ROLE_COLORS.get(role, "0.5"), label=role, height=0.6)
            left += vals
        ax.set_xlabel("ms per collapse (sum over waiting CPUs)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        if left.any():
            ax.set_xlim(0, float(left.max()) * 1.1)
        else:
            ax.text(0.5, 0.5, "no waits", transform=ax.transAxes, ha="center", color="0.5")
    axes[0][0].set_yticks(ys, strategies, fontsize=9)
    axes[0][0].invert_yaxis()  # first strategy on top
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="who waited", fontsize=8, title_fontsize=8,
               loc="outside right center")
    fig.suptitle("Who pays for a collapse: waits of events that started during one", fontsize=11)
    _footnote(fig, runs)
    return fig


def figure_timeline(runs: Sequence[RunResult]) -> Figure:
    """Events per second of accesses, faults and collapses over the run in 1-s bins (the last,
    partial bin scaled to its length), mean over the repeats that lasted that long; one panel
    each, log scale when strategies differ by more than 50x.  Raises NoData when none of the
    three ops occurs."""
    groups = _groups(runs)
    ops = (("access", "accesses/s"), ("fault", "faults/s"), ("collapse", "collapses/s"))
    series: dict[str, dict[str, np.ndarray]] = {op: {} for op, _ in ops}
    for s, rs in groups.items():
        for op, _ in ops:
            per_run = []
            for r in rs:
                t = r.table
                starts = t.filter(pc.equal(t.column("op").cast(pa.string()), op)).column("t_start_ns")
                sec = starts.to_numpy() // 1_000_000_000
                duration = r.duration_s if r.duration_s > 0 else 1.0
                nbins = max(1, int(np.ceil(duration)))
                widths = np.minimum(1.0, duration - np.arange(nbins))
                sec = sec[(sec >= 0) & (sec < nbins)]
                # accesses are recorded one in access_sample: scale back to events per second
                per_run.append(np.bincount(sec.astype(np.int64), minlength=nbins) * r.sample_factor(op) / widths)
            if any(c.sum() for c in per_run):
                width = max(len(c) for c in per_run)
                padded = np.array([np.pad(c, (0, width - len(c)), constant_values=np.nan) for c in per_run])
                series[op][s] = np.nanmean(padded, axis=0)
    if not any(series.values()):
        raise NoData("no access, fault or collapse events in the input")
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN * 1.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ops), 1, sharex=True, squeeze=False)
    strategies = list(groups)
    span = max(max(1.0, r.duration_s) for r in runs)
    for (op, label), ax in zip(ops, axes[:, 0], strict=True):
        for s, counts in series[op].items():
            x = np.arange(len(counts)) + 0.5
            ax.plot(x, counts, marker="o", ms=3, color=_color(s, strategies), linestyle=_linestyle(s),
                    label=s)
        if not series[op]:
            ax.text(0.5, 0.5, f"no {op} events", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_ylabel(label)
        peaks = [float(np.max(c)) for c in series[op].values() if np.max(c) > 0]
        if len(peaks) > 1 and max(peaks) > 50 * min(peaks):
            ax.set_yscale("log")
            ax.set_ylabel(label + " (log)")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlim(0, span)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("time since start of measurement (s; each point is one 1-s bin)")
    handles, labels = [], []
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[0, 0].legend(handles, labels, fontsize=8, loc="upper right")
    fig.suptitle("Throughput over time (mean over the repeats running at that time)", fontsize=11)
    _footnote(fig, runs)
    return fig


def figure_phases(runs: Sequence[RunResult]) -> Figure:
    """Mean time per collapse attempt of each phase column, stacked, one horizontal bar per
    strategy (group), in ms; strategies whose phase times are all 0 are named below the axis.
    Raises NoData when there are no collapse events with phase times."""
    means: dict[str, tuple[int, np.ndarray]] = {}
    for s, rs in _groups(runs).items():
        tables = [r.table.filter(pc.equal(r.table.column("op").cast(pa.string()), "collapse")) for r in rs]
        n = sum(t.num_rows for t in tables)
        if not n:
            continue
        sums = np.array([sum(int(pc.sum(t.column(c)).as_py() or 0) for t in tables) for c in PHASE_COLUMNS],
                        dtype=float)
        means[s] = (n, sums / n / 1e6)
    without = [s for s, (_, v) in means.items() if not v.any()]
    means = {s: nv for s, nv in means.items() if s not in without}
    if not means:
        raise NoData("no collapse events with phase times in the input")
    strategies = list(means)
    fig = Figure(figsize=(WIDTH_IN, _bar_height(len(strategies))), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = np.arange(len(strategies))
    left = np.zeros(len(strategies))
    for i, col in enumerate(PHASE_COLUMNS):
        vals = np.array([means[s][1][i] for s in strategies])
        ax.barh(ys, vals, left=left, height=0.6, color=_PHASE_COLORS[i], label=col.removesuffix("_ns"))
        left += vals
    for y, s, end in zip(ys, strategies, left, strict=True):
        ax.annotate(f" {end:.3g} ms, n={means[s][0]:,}", (end, y), ha="left", va="center", fontsize=8)
    ax.set_yticks(ys, strategies, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("ms per collapse attempt (mean)")
    ax.set_xlim(0, float(left.max()) * 1.3)
    if without:  # e.g. the host kernel, which cannot be timed phase by phase
        ax.set_title(f"no phase times recorded for: {', '.join(without)}", fontsize=8, color="0.4")
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(title="phase", fontsize=8, title_fontsize=8, loc="outside right center")
    fig.suptitle("Where a collapse spends its time", fontsize=11)
    _footnote(fig, runs)
    return fig


FIGURES: Mapping[str, Callable[[Sequence[RunResult]], Figure]] = {
    "latency-cdf-fault.png": lambda runs: figure_latency_cdf(runs, "fault", "page-fault", "faults"),
    "latency-cdf-mmap.png": lambda runs: figure_latency_cdf(runs, "mmap", "mmap()", "mmap() calls"),
    "waits-per-collapse.png": figure_waits,
    "timeline.png": figure_timeline,
    "collapse-phases.png": figure_phases,
}


def check_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` if needed and make sure files can be written into it.  Raises
    ConfigError with the reason otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the figures")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {out}: {e.strerror}; choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to output directory {out}: permission denied; choose another --out")
    return out


def plot_runs(runs: Sequence[RunResult], out_dir: str | os.PathLike[str]) -> PlotReport:
    """Draw every figure in FIGURES from ``runs`` into ``out_dir`` (created if missing).

    Returns which PNGs were written and which were skipped for lack of data.  Raises
    ConfigError when ``out_dir`` cannot be written (checked before anything is drawn).
    """
    out = check_output_dir(out_dir)
    written, skipped = [], []
    for name, draw in FIGURES.items():
        try:
            fig = draw(runs)
        except NoData as e:
            skipped.append((name, str(e)))
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        written.append(atomic_write_bytes(out / name, buf.getvalue()))
    return PlotReport(written=tuple(written), skipped=tuple(skipped))


def plot_paths(paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> PlotReport:
    """read_runs(paths) then plot_runs.  Raises ResultFileError for bad input files (checked
    before ``out_dir`` is created) and ConfigError for an unwritable ``out_dir``."""
    runs = read_runs(paths)
    return plot_runs(runs, out_dir)
