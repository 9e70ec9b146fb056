"""``ptlab crossover``: the map that answers the seed thread -- when does sleeping beat spinning?

Runs a preset grid (core/analysis/crossover.py) on the virtual-time backend, one Ray task per cell (a
virtual cell is one process: every simulated CPU is a greenlet of it, so a 64-CPU cell needs
one core, not 66), on the embedded Ray or a cluster (``--address``); each task runs the cell,
reads its result file back and returns only the cell's metrics, so gigabytes of events never
travel (``--keep-events DIR`` keeps the Arrow files).  Optionally (``--real``) the
real-backend points that the host's cores allow run after it.  Writes, under ``--out``:

  metrics.csv     one row per cell (keys, then the metrics; NaN as an empty field)
  real.csv        the process-backend points (with --real)
  map.txt         the winner map as text
  crossover.json  the preset, the cost table the cells charged, host, speed per CPU count

and the figures ``crossover.png`` (the heat maps) and ``crossover-real.png`` (virtual vs
real) under ``--figures``.  ``--from DIR`` redraws everything from a finished DIR (with
``--real``, after running the real-backend points again).  Cells that ran with different cost
tables or model sources (the tree changed during the sweep) are reported, exit 3.  A sweep with
failed cells writes ``metrics-partial.csv`` (``real-partial.csv``) instead, so a complete table
is never replaced by a partial one; when the first cells all fail (a broken tree or install)
it stops at once.

Exit status: 0 done and clean, 1 a cell's oracle found a violation, 2 bad input, 3 a cell
could not complete (the others are still written).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from ptlab.core.machine.errors import ConfigError, RunFailed

_LIST = "Several values: repeat the option or separate them with commas."


def register(app: typer.Typer) -> None:
    """Add the ``crossover`` command to ``app``."""
    app.command("crossover", short_help="The crossover map: which strategy wins where (virtual time).")(crossover)


def crossover(
    preset_name: Annotated[str, typer.Option("--preset", metavar="[reference|quick]", help="The grid: reference (the committed sweep: 201 cells, about 8 min on 2 cores) or quick (28 small cells, seconds).")] = "reference",
    order: Annotated[list[str] | None, typer.Option("--order", metavar="ORDERS", help=f"Replace the preset's orders (2..8). {_LIST}", show_default=False)] = None,
    app_cpus: Annotated[list[str] | None, typer.Option("--app", metavar="COUNTS", help=f"Replace the preset's faulting CPU counts (1..124). {_LIST}", show_default=False)] = None,
    ptl: Annotated[list[str] | None, typer.Option("--ptl", metavar="MODES", help=f"Replace the preset's PTL modes (split, mm). {_LIST}", show_default=False)] = None,
    duration: Annotated[float | None, typer.Option("--duration", "-d", metavar="SECONDS", help="Virtual seconds per cell (default: the preset's).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where the tables go.")] = Path("results/crossover"),
    figures: Annotated[Path, typer.Option("--figures", metavar="DIR", help="Where the figures go.")] = Path("results/figures"),
    address: Annotated[str | None, typer.Option("--address", metavar="ADDR", help="A Ray cluster (auto or host:port); default: an embedded Ray on this machine.", show_default=False)] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="N", help="Cells in flight at once (0: one per CPU of the cluster).")] = 0,
    real: Annotated[bool, typer.Option("--real/--no-real", help="Also run the real-backend points (1 app CPU, split PTL, each strategy and order) on this machine.")] = False,
    real_duration: Annotated[float, typer.Option("--real-duration", metavar="SECONDS", help="Wall seconds per real-backend run.")] = 3.0,
    keep_events: Annotated[Path | None, typer.Option("--keep-events", metavar="DIR", help="Also keep each virtual cell's Arrow result file here.", show_default=False)] = None,
    from_dir: Annotated[Path | None, typer.Option("--from", metavar="DIR", help="Run no virtual cell: redraw the map and figures from DIR's metrics.csv (and real.csv); with --real, run the real-backend points again into DIR.", show_default=False)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="A progress bar on stderr.")] = True,
) -> None:
    """Sweep orders x faulting CPUs x PTL mode x strategy (with each VMA-stability choice for ptl-hold and migration-entry) in virtual time, and draw which strategy wins -- for CPU burned spinning per collapse, for fault stall and for mmap() stall -- and by how much.

    Exit status: 0 clean, 1 a cell found a correctness violation, 2 bad input, 3 a cell could not complete.
    """
    from ptlab.cli.output import EXIT_FAILED, EXIT_VIOLATION
    from ptlab.cluster.grid import parse_ints, split_list
    from ptlab.core.analysis import crossover as X

    if real_duration <= 0 or real_duration > 600:
        raise ConfigError(f"--real-duration must be 0 < SECONDS <= 600 (got {real_duration})")
    if jobs < 0:
        raise ConfigError(f"--jobs must be 0 (one per CPU) or a positive number of cells (got {jobs})")
    for flag, d in (("--out", out), ("--figures", figures), ("--keep-events", keep_events)):
        if d is not None and d.exists() and not d.is_dir():
            raise ConfigError(f"{flag} {d} is a file, not a directory")
    if from_dir is not None:
        if order or app_cpus or ptl or duration is not None or keep_events is not None or address is not None:
            raise ConfigError("--from DIR reuses DIR's virtual cells; drop --order/--app/--ptl/--duration/--keep-events/--address")
        rows = X.add_baseline(X.read_metrics(from_dir / "metrics.csv"))
        if not real:
            real_rows = X.add_baseline(X.read_metrics(from_dir / "real.csv")) if (from_dir / "real.csv").exists() else []
            for problem in X.mixed_inputs(rows):
                print(f"ptlab: warning: {problem}", file=sys.stderr)
            _report(rows, real_rows, from_dir, figures, None)
            return
        out = from_dir
        orders = sorted({int(r["order"]) for r in rows if r["strategy"] != X.BASELINE and r.get("backend") == "virtual"})
        p = X.preset(preset_name, orders=orders or None)
        configs: list[Any] = []
    else:
        p = X.preset(
            preset_name,
            orders=parse_ints(order, "--order") if order else None,
            apps=parse_ints(app_cpus, "--app") if app_cpus else None,
            ptls=split_list(ptl) if ptl else None,
            duration_s=duration,
        )
        configs = p.configs()
    real_configs = p.real_configs(p.orders, real_duration) if real else []
    if real and address is None and (os.cpu_count() or 1) < 2:
        raise ConfigError("--real needs at least 2 host cores (3 simulated CPUs spin and sleep for real)")
    for flag, d in (("--out", out), ("--figures", figures), ("--keep-events", keep_events)):
        try:
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{flag} {d}: cannot create it ({e.strerror})") from None

    from ptlab.cli.output import ray_output_to_log
    from ptlab.cluster.sweep import connect

    failures: list[str] = []
    t0 = time.time()
    wall = 0.0
    loadavg0 = os.getloadavg()
    quiet_ray = ray_output_to_log()
    real_rows: list[dict[str, Any]] = []
    with quiet_ray as ray_log:
        started = connect(address)
        quiet_ray.ray_started()
        try:
            if configs:
                rows, fails = _run_virtual(configs, jobs, keep_events, progress)
                rows = X.add_baseline(rows)
                failures += [f"{f} ({ray_log.where()})" for f in fails]
                # a sweep with failed cells never replaces a complete table
                X.write_metrics(rows, out / ("metrics-partial.csv" if fails else "metrics.csv"))
                wall = time.time() - t0
            if real_configs:
                real_rows, fails = _run_real(real_configs, progress)
                real_rows = X.add_baseline(real_rows)
                failures += fails
                X.write_metrics(real_rows, out / ("real-partial.csv" if fails else "real.csv"))
        finally:
            if started:
                import ray

                ray.shutdown()
    failures += X.mixed_inputs(rows)
    if configs:
        manifest: dict[str, Any] | None = {
            "preset": dataclasses.asdict(p),
            "cells": len(configs),
            "real_cells": len(real_configs),
            "sweep_wall_s": round(wall, 1),
            "loadavg_before": [round(x, 2) for x in loadavg0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "address": address or "embedded",
            "failures": failures,
        }
    else:
        manifest = None
    _report(rows, real_rows, out, figures, manifest)
    for f in failures:
        print(f"ptlab: error: {f}", file=sys.stderr)
    if any(int(r.get("violations", 0)) for r in rows + real_rows):
        raise typer.Exit(EXIT_VIOLATION)
    if failures:
        raise typer.Exit(EXIT_FAILED)


def _report(rows: list[dict[str, Any]], real_rows: list[dict[str, Any]], out: Path, figures: Path,
            manifest: dict[str, Any] | None) -> None:
    """Write map.txt, crossover.json (when a manifest is given) and the figures; print the map
    and the speed table."""
    from ptlab.core.analysis import crossover as X
    from ptlab.core.analysis.results import atomic_write_bytes

    if not rows:
        raise ConfigError("no virtual cells to draw a map from")
    panels = X.all_panels(rows)
    text = X.map_text(panels)
    atomic_write_bytes(out / "map.txt", text.encode())
    X.plot_map(panels, figures / "crossover.png")
    drawn = [str(figures / "crossover.png")]
    if real_rows:
        X.plot_real(rows, real_rows, figures / "crossover-real.png")
        drawn.append(str(figures / "crossover-real.png"))
    speed = X.speed_table(rows)
    if manifest is not None:
        manifest = dict(manifest)
        manifest["noise_bands"] = {m: {f"{v}@{a}": b for (v, a), b in sorted(bands.items())}
                                   for m, bands in X.noise_bands(rows).items()}
        manifest["speed"] = speed
        manifest["costs"] = _costs_used()
        used = {r.get("costs_sha") for r in rows if r.get("costs_sha")}
        if used and used != {manifest["costs"]["sha"]}:
            print(f"ptlab: warning: the cells charged cost table(s) {', '.join(sorted(used))}, but the table now is "
                  f"{manifest['costs']['sha']}: crossover.json records the current one", file=sys.stderr)
        manifest["host"] = _host()
        X.write_manifest(out / "crossover.json", manifest)
    print(text, end="")
    print("\nvirtual-time speed (median over cells):")
    print(f"{'app CPUs':>9} {'sim CPUs':>9} {'cells':>6} {'virtual ns / wall s':>20} {'wall s / cell':>14}")
    for s in speed:
        print(f"{s['app_cpus']:>9} {s['simulated_cpus']:>9} {s['cells']:>6} {s['virtual_ns_per_wall_s']:>20,.0f} {s['wall_s_per_cell']:>14.2f}")
    print(f"\nwrote {out / 'metrics.csv'}, {out / 'map.txt'}; figures: {', '.join(drawn)}")


def _costs_used() -> dict[str, Any]:
    from ptlab.core.analysis.costs import load_costs
    from ptlab.core.analysis.crossover import digest
    from ptlab.core.backends.virtual import costs_from, fit

    table = load_costs(None)
    flat, fitted = fit(table)
    charged = costs_from(flat).entries
    return {"sha": digest(charged), "charged": charged, "fitted": fitted, "sources": table.to_dict()}


def _host() -> dict[str, Any]:
    try:
        from ptlab.core.analysis.host import fingerprint

        return dict(fingerprint())
    except Exception:  # a fingerprint is context, never a reason to lose a finished sweep
        return {}


# ------------------------------------------------------------------------------ the cells
def _virtual_cell(params: dict[str, Any], keep: bool) -> tuple[dict[str, Any], bytes | None]:
    """Body of one Ray task: run one virtual cell into a private temp dir, read the result
    file back and return its metrics (and the file's bytes when asked)."""
    from ptlab.cluster.cell import run_cell
    from ptlab.core.analysis.crossover import metrics_from_file, source_fingerprint
    from ptlab.core.machine.config import RunConfig

    config = RunConfig.from_dict(params)
    with tempfile.TemporaryDirectory(prefix="ptlab-crossover-") as tmp:
        path = Path(run_cell(config, Path(tmp)))  # type: ignore[arg-type]
        metrics = metrics_from_file(path)
        metrics["model_sha"] = source_fingerprint()
        data = path.read_bytes() if keep else None
    return metrics, data


FAIL_FAST = 4  # this many failed cells and none done: the sweep stops (a broken install or tree)


def _run_virtual(configs: list[Any], jobs: int, keep: Path | None, show: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Fan the virtual cells out as Ray tasks (one CPU each; at most ``jobs`` in flight, 0:
    the cluster's CPUs), biggest first so the long cells do not come last.  Returns the
    metrics rows and one line per failed cell.  Ctrl-C cancels the tasks in flight."""
    import ray
    from ptlab.cli.commands_run import _progress

    task = ray.remote(num_cpus=1, max_retries=0)(_virtual_cell)
    limit = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue = sorted(configs, key=lambda c: -c.nr_cpus)
    rows: list[dict[str, Any]] = []
    fails: list[str] = []
    flying: dict[Any, Any] = {}
    first_error = ""
    try:
        with _progress(show) as bars:
            bar = bars.add_task("crossover cells", total=len(queue), status=f"0/{len(queue)}")
            while queue or flying:
                while queue and len(flying) < limit:
                    c = queue.pop(0)
                    flying[task.remote(c.to_dict(), keep is not None)] = c
                done, _ = ray.wait(list(flying), num_returns=1, timeout=1.0)
                for ref in done:
                    c = flying.pop(ref)
                    try:
                        metrics, data = ray.get(ref)
                    except Exception as e:  # RunFailed inside the task, a dead worker
                        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                        first_error = first_error or first
                        what = f"{c.strategy}/{c.vma_stability} order {c.order}" if c.cpus.get("khugepaged") else "baseline"
                        fails.append(f"cell {what} app {c.cpus['app']} ptl {c.ptl} seed {c.seed} failed: {first[:300]}")
                        continue
                    rows.append(metrics)
                    if keep is not None and data is not None:
                        from ptlab.core.analysis.results import atomic_write_bytes

                        what = f"{c.strategy}-{c.vma_stability}-o{c.order}" if c.cpus.get("khugepaged") else "baseline"
                        name = f"{what}-{c.ptl}-a{c.cpus['app']}-s{c.seed}.arrow"
                        atomic_write_bytes(keep / name, data)
                n = len(rows) + len(fails)
                bars.update(bar, completed=n, status=f"{n}/{n + len(queue) + len(flying)}")
                if len(fails) >= FAIL_FAST and not rows:  # the same error in every cell: stop
                    for ref in flying:
                        ray.cancel(ref, force=True)
                    raise RunFailed(f"the first {len(fails)} cells failed, the last with: {first_error[:300]}")
    except KeyboardInterrupt:
        for ref in flying:
            ray.cancel(ref, force=True)
        raise
    return rows, fails


def _run_real(configs: list[Any], show: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The process-backend points, one after another on this node (each needs all its CPUs
    at once; 3 simulated CPUs on 2 cores are oversubscribed ×1.5, which the files record)."""
    from ptlab.cli.commands_run import run_configs
    from ptlab.core.analysis.crossover import metrics_from_file, source_fingerprint

    with tempfile.TemporaryDirectory(prefix="ptlab-crossover-real-") as tmp:
        labels = [f"real {c.strategy} order {c.order}" for c in configs]
        try:
            done = run_configs(configs, Path(tmp), None, labels, progress=show)
        except (ImportError, OSError) as e:  # a broken install or tree: one line, the table stays
            return [], [f"the real-backend points could not run: {type(e).__name__}: {e}"]
        rows = [{**metrics_from_file(path), "model_sha": source_fingerprint()} for _, path, err in done if path is not None]
        fails = [f"real {c.strategy} order {c.order}: {err}" for c, path, err in done if path is None]
    return rows, fails


__all__ = ["crossover", "register"]

