"""Sweep throughput and per-cell overhead on a loopback cluster (run by hand, not in CI).

    RAY_AUTH_MODE=disabled .venv/bin/python tests/bench_sweep.py [--cells 8] [--duration 2]
                                                                  [--long 20] [--long-cells 4]

Cells are dry cells (``ptlab sweep --dry-run``: sleep for the cell's duration, write a small
result file), so what is measured is the sweep's own cost.  For 1 node and for 2 nodes (one
core each, ``ray.cluster_utils.Cluster`` on 127.0.0.2/127.0.0.3) it prints:

  * cells per minute, against the ideal (nodes × 60 / duration);
  * per-cell overhead from throughput: wall × nodes / cells − duration (everything that is not
    the cell's own run: placement, task start, result transfer, file writes, driver loop);
  * the parts, from the manifest's timestamps: submit → cell start (placement + task start),
    cell end → result written by the driver (gather), and the gap between one cell's end and
    the next cell's start on the same core (turnaround);

then the same overhead for ``--long``-second cells as a fraction of the cell's run time, and
with ``--actors`` cells that start one actor per simulated CPU in their placement group (what
``run_cell`` does; that start-up is part of the cell's own run time, column ``run s``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ptlab.cluster.drycell import dry_cell  # noqa: E402
from ptlab.cluster.grid import SweepSpec  # noqa: E402
from ptlab.cluster.sweep import run_sweep  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

MiB = 2**20


def grid(cells: int, duration: float) -> SweepSpec:
    return SweepSpec(
        strategies=("pmd-clear",), orders=(9,), cpus=({"app": 1, "khugepaged": 0},),
        seeds=tuple(range(cells)), base={"duration_s": duration, "warmup_s": 0.0},
    )  # fmt: skip


def measure(
    nodes: int, cells: int, duration: float, out: Path, actors: bool = False
) -> dict[str, float]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.2",
                        "object_store_memory": 100 * MiB, "include_dashboard": False},
    )  # fmt: skip
    for i in range(1, nodes):
        cluster.add_node(
            num_cpus=1, node_ip_address=f"127.0.0.{2 + i}", object_store_memory=100 * MiB
        )
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        # one warm-up cell per node first: worker processes exist on a long-running cluster
        run_sweep(grid(nodes, 0.2), out / "warm", cell_fn=dry_cell)
        time.sleep(2)  # let the warm-up's placement groups go: the sweep starts on an idle cluster
        t = time.time()
        fn = functools.partial(dry_cell, actors=True) if actors else dry_cell
        report = run_sweep(grid(cells, duration), out / "run", cell_fn=fn)
        wall = time.time() - t
        first_start = min(r.started_at for r in report.cells) - t
        tail = time.time() - max(r.gathered_at for r in report.cells) - (time.time() - t - wall)
    finally:
        ray.shutdown()
        cluster.shutdown()
    recs = report.cells
    assert report.status == "complete", report.status
    start = [r.started_at - r.submitted_at for r in recs]
    gather = [r.gathered_at - r.ended_at for r in recs]
    turn = []
    by_node: dict[str, list] = {}
    for r in recs:
        by_node.setdefault(r.node_id, []).append(r)
    for rs in by_node.values():
        rs.sort(key=lambda r: r.started_at)
        turn += [b.started_at - a.ended_at for a, b in zip(rs, rs[1:], strict=False)]
    run = statistics.mean(r.run_s for r in recs)
    return {
        "nodes": nodes,
        "cells": cells,
        "duration_s": duration,
        "wall_s": wall,
        "cells_per_min": cells / wall * 60,
        "ideal_per_min": nodes * 60 / duration,
        "overhead_s": wall * nodes / cells - duration,
        "cell_run_s": run,
        "start_s_median": statistics.median(start),
        "start_s_max": max(start),
        "gather_s_median": statistics.median(gather),
        "turnaround_s_median": statistics.median(turn) if turn else float("nan"),
        "used_nodes": len(by_node),
        "first_start_s": first_start,
        "tail_s": tail,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--long", type=float, default=20.0, help="duration of the long cells (0: skip)")
    ap.add_argument("--long-cells", type=int, default=4)
    ap.add_argument(
        "--actors",
        action="store_true",
        help="also run cells that start their CPU actors (as run_cell does): the "
        "actor start shows in 'run s' beyond the cell's duration",
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptlab-bench-") as tmp:
        for nodes in (1, 2):
            rows.append(measure(nodes, args.cells, args.duration, Path(tmp) / f"n{nodes}"))
        if args.long > 0:
            rows.append(measure(2, args.long_cells, args.long, Path(tmp) / "long"))
        if args.actors:
            rows.append(measure(2, args.cells, args.duration, Path(tmp) / "actors", actors=True))
    print(f"{'nodes':>5} {'cells':>5} {'cell s':>6} {'wall s':>7} {'cells/min':>9} {'ideal':>6} "
          f"{'overhead s':>10} {'% of cell':>9} {'start s':>7} {'gather s':>8} {'turn s':>6} "
          f"{'run s':>6} {'first s':>7} {'tail s':>6}")  # fmt: skip
    for r in rows:
        print(
            f"{r['nodes']:>5} {r['cells']:>5} {r['duration_s']:>6.1f} {r['wall_s']:>7.2f} "
            f"{r['cells_per_min']:>9.1f} {r['ideal_per_min']:>6.1f} {r['overhead_s']:>10.3f} "
            f"{100 * r['overhead_s'] / r['duration_s']:>8.1f}% {r['start_s_median']:>7.3f} "
            f"{r['gather_s_median']:>8.3f} {r['turnaround_s_median']:>6.3f} "
            f"{r['cell_run_s']:>6.3f} {r['first_start_s']:>7.3f} {r['tail_s']:>6.3f}"
        )
    if len(rows) >= 2:
        print(
            f"2 nodes vs 1: {rows[1]['cells_per_min'] / rows[0]['cells_per_min']:.2f}x cells per minute"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
