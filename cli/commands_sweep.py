"""``ptlab sweep``: a grid of runs fanned out over a Ray cluster, with a live view per node.

The grid comes from flags, from a TOML file (``--config``), or from the sweep being resumed;
flags given on top replace those axes.  The grid is validated before Ray starts, so a bad
grid costs no cluster time and gives one error line (exit 2).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from ptlab.core.machine.errors import ConfigError, RunFailed

ROLE_FLAGS = ("app", "gup-fast", "gup-slow", "mmap", "zap", "khugepaged")

_LIST = "Several values: repeat the option or separate them with commas."


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` command to ``app``."""
    app.command("sweep", no_args_is_help=False)(sweep)


def sweep(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            help="TOML sweep file (see docs/cluster.md).",
            show_default=False,
        ),
    ] = None,
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy",
            "-s",
            metavar="NAMES",
            help=f"Strategies: pmd-clear, ptl-hold, migration-entry (default: all three). {_LIST}",
            show_default=False,
        ),
    ] = None,
    order: Annotated[
        list[str] | None,
        typer.Option(
            "--order",
            metavar="ORDERS",
            help="Collapse orders 2..9 (9 = PMD THP); ranges like 4-9 work. (default: 9)",
            show_default=False,
        ),
    ] = None,
    app_cpus: Annotated[
        list[str] | None,
        typer.Option(
            "--app",
            metavar="COUNTS",
            help="Simulated CPUs running the app role; each value is an axis point (default: 1).",
            show_default=False,
        ),
    ] = None,
    gup_fast: Annotated[
        list[str] | None,
        typer.Option(
            "--gup-fast",
            metavar="COUNTS",
            help="CPUs running GUP-fast pins (default: 0).",
            show_default=False,
        ),
    ] = None,
    gup_slow: Annotated[
        list[str] | None,
        typer.Option(
            "--gup-slow",
            metavar="COUNTS",
            help="CPUs running GUP-slow (default: 0).",
            show_default=False,
        ),
    ] = None,
    mmap_cpus: Annotated[
        list[str] | None,
        typer.Option(
            "--mmap",
            metavar="COUNTS",
            help="CPUs running mmap()/munmap() churn (default: 0).",
            show_default=False,
        ),
    ] = None,
    zap: Annotated[
        list[str] | None,
        typer.Option(
            "--zap",
            metavar="COUNTS",
            help="CPUs running MADV_DONTNEED (default: 0).",
            show_default=False,
        ),
    ] = None,
    khugepaged: Annotated[
        list[str] | None,
        typer.Option(
            "--khugepaged",
            metavar="COUNTS",
            help="CPUs running khugepaged (default: 1).",
            show_default=False,
        ),
    ] = None,
    workload: Annotated[
        list[str] | None,
        typer.Option(
            "--workload",
            "-w",
            metavar="NAMES",
            help="Access patterns (default: random).",
            show_default=False,
        ),
    ] = None,
    flush: Annotated[
        list[str] | None,
        typer.Option(
            "--flush",
            metavar="MODES",
            help="TLB flush modes: ipi, broadcast (default: ipi).",
            show_default=False,
        ),
    ] = None,
    ptl: Annotated[
        list[str] | None,
        typer.Option(
            "--ptl",
            metavar="MODES",
            help="PTL granularity: split, mm (default: split).",
            show_default=False,
        ),
    ] = None,
    vma_locks: Annotated[
        list[str] | None,
        typer.Option(
            "--vma-locks",
            metavar="ON|OFF",
            help="Per-VMA locks: on, off (default: on).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        list[str] | None,
        typer.Option(
            "--seed", metavar="SEEDS", help="Base seeds (default: 0).", show_default=False
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            "--repeats",
            "-r",
            metavar="N",
            help="Runs of each grid point, each with its own seed (default: 1).",
            show_default=False,
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration",
            "-d",
            metavar="SECONDS",
            help="Seconds each cell measures (default: 3).",
            show_default=False,
        ),
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option(
            "--warmup",
            metavar="SECONDS",
            help="Seconds of warm-up per cell (default: 0.3).",
            show_default=False,
        ),
    ] = None,
    set_params: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Any other run parameter, KEY=VALUE (e.g. --set nr_pmds=8).",
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            metavar="auto|HOST:PORT",
            help="Join a running Ray cluster: auto, or HEAD_IP:PORT. Without it Ray starts embedded on 127.0.0.2.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Results directory (default: results/sweeps/<sweep-id>).",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="DIR",
            help="Continue the sweep in this directory: finished cells are skipped.",
            show_default=False,
        ),
    ] = None,
    max_attempts: Annotated[
        int,
        typer.Option(
            "--max-attempts",
            metavar="N",
            help="Tries of a failing cell (a lost node does not count).",
        ),
    ] = 3,
    node_wait: Annotated[
        float | None,
        typer.Option(
            "--node-wait",
            metavar="SECONDS",
            help="Seconds a cell that fits no node waits for one to join (default: 0 embedded, 300 with --address).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Run the plumbing only: each cell sleeps for its duration and writes synthetic events.",
        ),
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Live view (on a terminal).")
    ] = True,
) -> None:
    """Run a grid of runs across a Ray cluster: one node per cell, one Arrow file per cell plus a merged dataset (hive-partitioned Parquet, by strategy), and a manifest (resumable).

    Exit status: 0 every cell done and clean, 1 a cell's run found a correctness violation, 2 bad input (the whole grid is checked before Ray starts), 3 a cell failed (after its attempts) or the sweep could not run.  A node that dies is reported in one line; its cells run again elsewhere.  Ray's own logs stay in Ray's session log directory (/tmp/ray/session_latest/logs by default).
    """
    roles = {"app": app_cpus, "gup-fast": gup_fast, "gup-slow": gup_slow, "mmap": mmap_cpus,
             "zap": zap, "khugepaged": khugepaged}  # fmt: skip
    # errors (ConfigError, ResultFileError, RunFailed) go to ptlab.cli.main: one line, exit code
    _sweep(
        config=config, strategy=strategy, order=order, roles=roles, workload=workload,
        flush=flush, ptl=ptl, vma_locks=vma_locks, seed=seed, repeats=repeats,
        duration=duration, warmup=warmup, set_params=set_params, address=address, out=out,
        resume=resume, max_attempts=max_attempts, node_wait=node_wait, dry_run=dry_run,
        progress=progress,
    )  # fmt: skip


def build_spec(
    *,
    config: Path | None,
    resume: Path | None,
    strategy: list[str] | None,
    order: list[str] | None,
    roles: dict[str, list[str] | None],
    workload: list[str] | None,
    flush: list[str] | None,
    ptl: list[str] | None,
    vma_locks: list[str] | None,
    seed: list[str] | None,
    repeats: int | None,
    duration: float | None,
    warmup: float | None,
    set_params: list[str] | None,
) -> Any:
    """The SweepSpec: stored (resume) or TOML or defaults, then the flags on top.
    Raises ConfigError."""
    from ptlab.cluster.grid import (
        SweepSpec,
        cpus_product,
        load_toml,
        parse_bools,
        parse_ints,
        parse_set,
        split_list,
    )
    from ptlab.cluster.sweep import load_manifest

    if config is not None:
        spec = load_toml(config)
    elif resume is not None and load_manifest(resume).get("spec"):
        spec = SweepSpec.from_dict(load_manifest(resume)["spec"])
    else:
        spec = SweepSpec()
    changes: dict[str, Any] = {}
    if strategy:
        changes["strategies"] = split_list(strategy)
    if order:
        changes["orders"] = parse_ints(order, "--order")
    given_roles = {r: parse_ints(v, f"--{r}") for r, v in roles.items() if v}
    if given_roles:
        changes["cpus"] = list(cpus_product(given_roles))
    if workload:
        changes["workloads"] = split_list(workload)
    if flush:
        changes["flush"] = split_list(flush)
    if ptl:
        changes["ptl"] = split_list(ptl)
    if vma_locks:
        changes["vma_locks"] = parse_bools(vma_locks, "--vma-locks")
    if seed:
        changes["seeds"] = parse_ints(seed, "--seed")
    if repeats is not None:
        changes["repeats"] = repeats
    base = dict(spec.base)
    if duration is not None:
        base["duration_s"] = duration
    if warmup is not None:
        base["warmup_s"] = warmup
    base.update(parse_set(set_params))
    changes["base"] = base
    return spec.replace(**changes)


def _sweep(
    *,
    config: Path | None,
    strategy: list[str] | None,
    order: list[str] | None,
    roles: dict[str, list[str] | None],
    workload: list[str] | None,
    flush: list[str] | None,
    ptl: list[str] | None,
    vma_locks: list[str] | None,
    seed: list[str] | None,
    repeats: int | None,
    duration: float | None,
    warmup: float | None,
    set_params: list[str] | None,
    address: str | None,
    out: Path | None,
    resume: Path | None,
    max_attempts: int,
    node_wait: float | None,
    dry_run: bool,
    progress: bool,
) -> None:
    from ptlab.cluster.grid import expand
    from ptlab.cluster.sweep import MANIFEST, SweepInterrupted, connect, default_sweep_id, run_sweep

    if resume is not None and out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ConfigError(
            "--resume DIR continues the sweep in DIR; leave out --out (or give the same DIR)"
        )
    if resume is not None and not (Path(resume) / MANIFEST).exists():
        raise ConfigError(
            f"{resume}: no sweep here (no {MANIFEST}); check the directory given to --resume"
        )
    spec = build_spec(
        config=config, resume=resume, strategy=strategy, order=order, roles=roles,
        workload=workload, flush=flush, ptl=ptl, vma_locks=vma_locks, seed=seed,
        repeats=repeats, duration=duration, warmup=warmup, set_params=set_params,
    )  # fmt: skip
    cells = expand(spec)  # validates every cell before any cluster time is spent
    if max_attempts < 1:
        raise ConfigError(f"--max-attempts must be at least 1 (got {max_attempts})")
    if resume is not None:
        out_dir = Path(resume)
    else:
        out_dir = out if out is not None else Path("results") / "sweeps" / default_sweep_id(cells)
        if (out_dir / MANIFEST).exists():
            raise ConfigError(
                f"{out_dir} already holds a sweep; continue it with --resume {out_dir} or choose another --out"
            )
    if address is None:
        import os

        cores = os.cpu_count() or 1
        need = max(c.config.nr_cpus for c in cells)
        if need > cores:
            raise ConfigError(
                f"a cell needs {need} simulated CPUs but this machine has {cores} cores; lower "
                "the CPU counts per role, or run on a cluster with bigger nodes (--address)"
            )
    cell_fn = None
    if dry_run:
        from ptlab.cluster.drycell import dry_cell

        cell_fn = dry_cell

    import ray
    from ptlab.cli.output import EXIT_INTERRUPTED, EXIT_VIOLATION, ray_output_to_log

    quiet_ray = ray_output_to_log()
    with quiet_ray as ray_log:
        started = connect(address)
        quiet_ray.ray_started()
        view = _LiveView(enabled=progress)
        try:
            with view:
                try:
                    report = run_sweep(
                        spec, out_dir, cell_fn=cell_fn, resume=resume is not None,
                        max_attempts=max_attempts, on_progress=view.update,
                        node_wait_s=node_wait if node_wait is not None else (300.0 if address else 0.0),
                        embedded=started and not address, sweep_id=None if resume is not None else out_dir.name,
                    )  # fmt: skip
                except SweepInterrupted as e:
                    r = e.report
                    view.stop()
                    print(
                        f"ptlab: interrupted: {r.done} of {r.total} cells done, kept in {r.out_dir}; "
                        f"continue with: ptlab sweep --resume {r.out_dir}",
                        file=sys.stderr,
                    )
                    raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            if started:
                ray.shutdown()
    for lost in report.lost_nodes:
        print(f"ptlab: {lost.line()}", file=sys.stderr)
    _summary(report)
    if report.failed:
        first = next(c for c in report.cells if c.status == "failed")
        raise RunFailed(
            f"{report.failed} of {report.total} cells failed (first: {first.label}: {first.error}); "
            f"see {report.manifest}; retry them with: ptlab sweep --resume {report.out_dir} "
            f"({ray_log.where()})"
        )
    if report.violations:
        print(f"ptlab: {report.violations} of {report.total} cells found correctness violations "
              f"(the manifest's cells[*].violations)", file=sys.stderr)
        raise typer.Exit(EXIT_VIOLATION)


def _summary(report: Any) -> None:
    nodes = len(report.nodes_used)
    skipped = f" ({report.skipped} from before)" if report.skipped else ""
    print(
        f"sweep {report.sweep_id}: {report.done}/{report.total} cells done{skipped}, "
        f"{report.failed} failed, on {nodes} node{'s' if nodes != 1 else ''} "
        f"in {report.elapsed_s:.1f} s"
    )
    print(f"  cells:    {report.out_dir / 'cells'}/<cell-id>.arrow")
    print(f"  merged:   {report.merged_dir}  (Parquet, hive-partitioned by strategy)")
    print(f"  manifest: {report.manifest}")


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _LiveView:
    """Cells done/running/failed per node and the time left, redrawn in place (rich.Live) on a
    terminal; nothing on a pipe (the manifest has it all)."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.live: Any = None
        self._last = 0.0

    def __enter__(self) -> _LiveView:
        if self.enabled:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            live.__exit__(None, None, None)

    def update(self, p: Any) -> None:
        if self.live is None:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and p.running + p.pending > 0:
            return
        self._last = now
        self.live.update(self.render(p))

    @staticmethod
    def render(p: Any) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        head = Text.assemble(
            (f"sweep {p.sweep_id}  ", "bold"),
            (f"{p.done}/{p.total} done", "green"),
            f"  {p.running} running  {p.pending} queued  ",
            (f"{p.failed} failed", "red" if p.failed else ""),
            f"  {p.retries} retried" if p.retries else "",
            f"  elapsed {_fmt_s(p.elapsed_s)}  ETA {_fmt_s(p.eta_s)}",
        )
        table = Table(box=None, pad_edge=False, show_edge=False)
        for col in ("node", "id", "cores", "running", "done", "failed"):
            table.add_column(col, justify="left" if col in ("node", "id") else "right")
        for n in p.nodes:
            style = "" if n.alive else "dim strike"
            table.add_row(n.ip, n.node_id[:8] + ("" if n.alive else " (dead)"), str(n.cpus),
                          str(n.running), str(n.done), str(n.failed), style=style)  # fmt: skip
        bar = ProgressBar(total=max(1, p.total), completed=p.done, width=60)
        return Group(head, bar, table)
