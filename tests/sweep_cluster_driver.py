"""Multi-node sweep scenarios on a loopback Ray cluster, run in their own process (the test
session's embedded Ray must not see this cluster).  Prints one JSON line with what it saw.

    python tests/sweep_cluster_driver.py OUT_DIR

Two nodes with one core each (the head on $PTLAB_TEST_RAY_IP, default 127.0.0.2; the second
on the same address with 100 added to its last byte).  Scenario "spread": 4 one-second cells
whose CPU actors are really started in the cells' placement groups.  Scenario "node-loss": 6
one-second cells; when the second node is running a cell, it is removed.  The driver joins the
cluster through ptlab.cluster.sweep.connect, as ``ptlab sweep --address`` does.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ptlab.cluster.drycell import dry_cell  # noqa: E402
from ptlab.cluster.grid import SweepSpec  # noqa: E402
from ptlab.cluster.sweep import run_sweep  # noqa: E402
from ptlab.core.analysis.results import read_run  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

MiB = 2**20


def result_nodes(out: Path) -> dict[str, dict]:
    """cell id -> node ids recorded inside its result file."""
    seen = {}
    for f in sorted((out / "cells").glob("*.arrow")):
        host = read_run(f).meta["host"]
        seen[f.stem] = {"node": host["node_id"], "actors": host.get("actor_node_ids", [])}
    return seen


def merged_cells(out: Path) -> dict[str, list[int]]:
    """cell id -> [part files holding it, its event rows] in the merged dataset."""
    import pyarrow.dataset as ds

    seen: dict[str, list[int]] = {}
    for part in sorted((out / "merged").rglob("part-*.parquet")):
        seen.setdefault(part.stem.removeprefix("part-"), [0, 0])[0] += 1
    table = ds.dataset(out / "merged", format="parquet", partitioning="hive").to_table(
        columns=["cell_id"]
    )
    counts = table.unify_dictionaries().group_by("cell_id").aggregate([("cell_id", "count")])
    for row in counts.to_pylist():
        seen.setdefault(row["cell_id"], [0, 0])[1] += row["cell_id_count"]
    return seen


def loopback_pair() -> tuple[str, str]:
    """The head's address and the second node's (last byte + 100): distinct per test
    session, so concurrent sessions' clusters do not meet."""
    head = os.environ.get("PTLAB_TEST_RAY_IP", "127.0.0.2")
    a, b, c, d = head.split(".")
    last = int(d) + 100 if int(d) + 100 <= 254 else int(d) - 100
    return head, f"{a}.{b}.{c}.{last}"


def main(out_root: str) -> None:
    from ptlab.cluster.sweep import connect

    out_root_p = Path(out_root)
    t0 = time.time()
    head_ip, second_ip = loopback_pair()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": head_ip,
            "object_store_memory": 100 * MiB,
            "include_dashboard": False,
        },
    )
    second = cluster.add_node(
        num_cpus=1, node_ip_address=second_ip, object_store_memory=100 * MiB
    )
    connect(cluster.address)
    head_id = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    second_id = nodes[second_ip]
    report: dict = {"startup_s": time.time() - t0, "head": head_id, "second": second_id,
                    "second_ip": second_ip}
    base = {"duration_s": 1.0, "warmup_s": 0.0}
    one_cpu = ({"app": 1, "khugepaged": 0},)
    try:
        # 1. cells land on both nodes; each cell's CPU actors run where the cell does
        t = time.time()
        spec = SweepSpec(
            strategies=("pmd-clear", "ptl-hold"), orders=(4, 5), cpus=one_cpu, base=base
        )
        out = out_root_p / "spread"
        rep = run_sweep(spec, out, cell_fn=functools.partial(dry_cell, actors=True))
        report["spread"] = {
            "status": rep.status, "done": rep.done, "total": rep.total, "elapsed_s": time.time() - t,
            "results": result_nodes(out), "manifest_nodes": {c.cell_id: c.node_id for c in rep.cells},
        }  # fmt: skip

        # 2. a node dies mid-sweep: its cell reruns on the other node, nothing lost or doubled
        t = time.time()
        removed: dict = {}
        armed: dict = {}

        def kill_second(p) -> None:
            # once the second node has finished a cell and is well into its next one
            if removed:
                return
            for n in p.nodes:
                if n.node_id == second_id and n.done and n.running:
                    armed.setdefault("at", p.elapsed_s)
                    if p.elapsed_s - armed["at"] >= 0.6:
                        cluster.remove_node(second)
                        removed.update(at_s=p.elapsed_s, done_before=p.done, second_done=n.done)

        spec = SweepSpec(strategies=("pmd-clear", "ptl-hold", "migration-entry"), orders=(4, 5),
                         cpus=one_cpu, base={"duration_s": 1.5, "warmup_s": 0.0})  # fmt: skip
        out = out_root_p / "node-loss"
        rep = run_sweep(spec, out, cell_fn=dry_cell, on_progress=kill_second)
        manifest = json.loads((out / "manifest.json").read_text())
        report["node_loss"] = {
            "status": rep.status, "done": rep.done, "total": rep.total, "elapsed_s": time.time() - t,
            "removed": removed, "results": result_nodes(out), "merged": merged_cells(out),
            "history": {cid: c["history"] for cid, c in manifest["cells"].items()},
            "grid": manifest["grid"],
            "lost_lines": [lost.line() for lost in rep.lost_nodes],
            "timing": {c.cell_id: [round(c.started_at - t, 2), round(c.ended_at - t, 2), c.node_ip] for c in rep.cells},
        }  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    report["total_s"] = time.time() - t0
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
