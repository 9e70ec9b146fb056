"""A stand-in for ``run_cell`` that exercises a sweep's plumbing without simulating anything.

``ptlab sweep --dry-run`` runs every cell with :func:`dry_cell`: it holds a real (tiny)
shared-memory segment named like a run's (``ptlab.<pid>.<token>.dry``), sleeps for the cell's
warm-up plus duration, and writes a valid result file of synthetic events whose metadata records
the Ray node it ran on.  That is enough to check a cluster before a long sweep: placement on
every node, result transfer, merging, node loss, Ctrl-C clean-up.  The tests and the sweep
benchmark use it too.  Latencies in its events are random numbers, not measurements
(``kind = "dry"`` in the metadata says so).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from ptlab.core.analysis.results import write_run
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import RunFailed

SHM_DIR = Path("/dev/shm")


def dry_cell(
    config: RunConfig,
    out_dir: Path,
    *,
    run_id: str | None = None,
    placement_group: Any = None,
    actors: bool = False,
    fail_once_dir: str | None = None,
    crash_once_dir: str | None = None,
    sleep_s: float | None = None,
) -> Path:
    """Sleep ``warmup_s + duration_s`` seconds (or ``sleep_s``) and write ``out_dir/<run_id>.arrow``.

    Same signature and contract as ``ptlab.cluster.cell.run_cell``.  Test knobs (bind them with
    functools.partial): ``actors`` starts one 1-CPU actor per simulated CPU in the placement
    group's bundles and records their node ids (``host.actor_node_ids``); ``fail_once_dir``
    raises RunFailed on a cell's first attempt, ``crash_once_dir`` kills the process on it
    (a marker file per run id in that directory remembers the attempt).
    """
    import ray

    run_id = run_id or secrets.token_hex(8)
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    for marker_dir, crash in ((fail_once_dir, False), (crash_once_dir, True)):
        if marker_dir:
            marker = Path(marker_dir) / f"{run_id}.attempted"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(node_id)
                if crash:
                    os._exit(1)
                raise RunFailed(f"dry cell {run_id}: injected failure on the first attempt")

    actor_nodes: list[str] = []
    handles = []
    if actors:
        handles = _start_actors(config.nr_cpus, placement_group)
        actor_nodes = ray.get([h.node_id.remote() for h in handles])

    seg = SHM_DIR / f"ptlab.{os.getpid()}.{run_id}.dry"
    try:
        if SHM_DIR.is_dir():
            seg.write_bytes(b"\0" * 4096)
        t0 = time.perf_counter_ns()
        time.sleep(config.warmup_s + config.duration_s if sleep_s is None else sleep_s)
        elapsed_ns = time.perf_counter_ns() - t0
    finally:
        for h in handles:
            ray.kill(h)
        seg.unlink(missing_ok=True)

    columns = _synthetic_events(config, run_id, elapsed_ns)
    meta = {
        "run_id": run_id,
        "kind": "dry",
        "params": config.to_dict(),
        "host": {
            "hostname": socket.gethostname(),
            "node_id": node_id,
            "pid": os.getpid(),
            "cores": os.cpu_count(),
            "simulated_cpus": config.nr_cpus,
            "actor_node_ids": actor_nodes,
        },
        "calibration": [],
        "violations": [],
        "summary": {"duration_s": elapsed_ns / 1e9},
    }
    return write_run(Path(out_dir) / f"{run_id}.arrow", columns, meta)


def _synthetic_events(config: RunConfig, run_id: str, elapsed_ns: int) -> dict[str, Any]:
    rng = np.random.default_rng(config.seed)
    cpus: list[tuple[int, str]] = []
    for role, n in sorted(config.cpus.items()):
        cpus.extend((len(cpus), role) for _ in range(n))
    per_cpu = 50
    rows = len(cpus) * per_cpu
    ops = {"khugepaged": "collapse", "mmap": "mmap", "zap": "zap", "gup-fast": "gup_fast",
           "gup-slow": "gup_slow"}  # fmt: skip
    cpu_col = [c for c, _ in cpus for _ in range(per_cpu)]
    role_col = [r for _, r in cpus for _ in range(per_cpu)]
    return {
        "run_id": [run_id] * rows,
        "strategy": [config.strategy] * rows,
        "cpu": cpu_col,
        "role": role_col,
        "op": [ops.get(r, "fault") for r in role_col],
        "t_start_ns": np.sort(rng.integers(0, max(1, elapsed_ns), rows)),
        "latency_ns": rng.lognormal(9.0, 1.0, rows).astype(np.int64),
        "result": ["SCAN_SUCCEED" if r == "khugepaged" else "" for r in role_col],
        "order": [config.order if r == "khugepaged" else 0 for r in role_col],
    }


def _start_actors(n: int, placement_group: Any) -> list[Any]:
    import ray
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    handles = []
    for i in range(n):
        if placement_group is not None:
            strategy: Any = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=i
            )
        else:
            strategy = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
        handles.append(_DryCpu.options(scheduling_strategy=strategy).remote())
    return handles


def _dry_cpu_class() -> Any:
    import ray

    @ray.remote(num_cpus=1)
    class DryCpu:
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return DryCpu


class _LazyActor:
    """Defers ``ray.remote`` until first use so importing this module does not import Ray."""

    _cls: Any = None

    def options(self, **kw: Any) -> Any:
        if _LazyActor._cls is None:
            _LazyActor._cls = _dry_cpu_class()
        return _LazyActor._cls.options(**kw)


_DryCpu = _LazyActor()
