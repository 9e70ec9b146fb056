"""A sweep of *real* cells (the simulator, not dry cells) through placement groups on a
two-node loopback Ray cluster, in its own process.  Prints one JSON line with what it saw.

    python tests/sweep_real_driver.py OUT_DIR

Two nodes of two cores each (see sweep_cluster_driver.loopback_pair for the addresses); four
cells of two simulated CPUs (app + khugepaged, one second each), so the two cells in flight
at a time need a node each: every cell's STRICT_PACK group of two one-CPU bundles fills one
node, and its CPU actors and shared memory stay there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
from ptlab.cluster.grid import SweepSpec  # noqa: E402
from ptlab.cluster.sweep import connect, run_sweep  # noqa: E402
from ptlab.core.analysis.results import read_run, read_runs  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from sweep_cluster_driver import MiB, loopback_pair  # noqa: E402


def main(out_root: str) -> None:
    out = Path(out_root) / "real"
    head_ip, second_ip = loopback_pair()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "node_ip_address": head_ip,
                        "object_store_memory": 100 * MiB, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, node_ip_address=second_ip, object_store_memory=100 * MiB)
    report: dict = {}
    try:
        connect(cluster.address)
        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        spec = SweepSpec(strategies=("pmd-clear", "migration-entry"), orders=(4,), seeds=(0, 1),
                         cpus=({"app": 1, "khugepaged": 1},),
                         base={"duration_s": 1.0, "warmup_s": 0.2})
        t = time.time()
        rep = run_sweep(spec, out)
        cells = {}
        for f in sorted((out / "cells").glob("*.arrow")):
            r = read_run(f)
            s = r.meta["summary"]
            cells[f.stem] = {
                "kind": r.kind, "node": r.meta["host"]["node_id"], "strategy": r.strategy,
                "collapses": sum(s.get("collapses", {}).values()), "faults": s["events"].get("fault", 0),
                "violations": s["violations"], "duration_s": s.get("duration_s"),
                "simulated_cpus": r.meta["host"].get("simulated_cpus"),
            }
        merged = sorted(r.run_id for r in read_runs([out / "merged"]))
        report = {
            "status": rep.status, "done": rep.done, "total": rep.total, "elapsed_s": time.time() - t,
            "nodes": nodes, "cells": cells, "merged": merged,
            "manifest_nodes": {c.cell_id: c.node_id for c in rep.cells},
            "parts": sorted(str(p.relative_to(out)) for p in (out / "merged").rglob("*.parquet")),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
