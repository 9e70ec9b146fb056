"""One run ("cell") of one strategy: build the machine in shared memory on this node, start one
Ray actor per simulated CPU beside it, open the gate, watch for deadlocks and dead CPUs, gather
the events, run the end-of-run oracle, write the result file, and leave nothing behind.

Ray carries control only (start, stop, gather): the hot path is shared memory.  The actors are
placed on this node (node affinity, or the bundles of the placement group a sweep reserved), so
their segments are local.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from ptlab.core.analysis.results import write_run
from ptlab.core.kernel.oracle import check_machine, lock_dump
from ptlab.core.kernel.roles import (
    STOP_FAILED,
    STOP_VIOLATION,
    STOP_WATCHDOG,
    assign_roles,
    run_cpu,
)
from ptlab.core.machine._prims import now_ns
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.errors import RunFailed
from ptlab.core.machine.events import to_columns
from ptlab.core.machine.layout import (
    CPU_PID,
    CPU_PROGRESS,
    CPU_STATE,
    GATE,
    MAX_CPUS,
    PARKED,
    QUIESCE,
    READY,
    ST_DONE,
    STOP,
    T0,
)
from ptlab.core.machine.mm import VMA_COLLAPSE, VMA_OTHER, Machine

START_TIMEOUT_S = 120.0


def _cpu_actor_class() -> Any:
    import ray

    @ray.remote(max_restarts=0)
    class CpuActor:
        """One simulated CPU: a process of its own, attached to the machine's segments."""

        def run(self, prefix: str, config: dict[str, Any], cpu_id: int, role: str, seed: int, pin_core: int | None) -> dict[str, Any]:
            return run_cpu(prefix, RunConfig.from_dict(config), cpu_id, role, seed, pin_core)

        def pid(self) -> int:
            return os.getpid()

    return CpuActor


class CpuPool:
    """CPU actors kept between the runs of one driver that runs cells one after another
    (`ptlab check`): a run takes the actors it needs and gives them back when it completed;
    a run that failed, was stopped by the watchdog or raised kills its actors as before, so a
    stuck or half-attached process is never reused.  Starting a Ray actor is a new Python
    process (seconds on a loaded 2-core host); a pooled one is ready at once.  Pooled actors
    reserve no Ray CPUs: the runs that share them are sequential."""

    def __init__(self) -> None:
        self.idle: list[Any] = []

    def take(self, n: int, node_id: str) -> list[Any]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        CpuActor = _cpu_actor_class()
        got, self.idle = self.idle[:n], self.idle[n:]
        strat = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        got += [CpuActor.options(scheduling_strategy=strat, num_cpus=0).remote() for _ in range(n - len(got))]
        return got

    def give(self, actors: list[Any]) -> None:
        self.idle.extend(actors)

    def close(self) -> None:
        import ray

        for a in self.idle:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.idle = []

    def __enter__(self) -> CpuPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_run_id(config: RunConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{config.strategy}-o{config.order}-{stamp}-{secrets.token_hex(3)}"


def run_cell(
    config: RunConfig,
    out_dir: Path | str | None,
    *,
    run_id: str | None = None,
    placement_group: Any = None,
    progress: Callable[[str, float], None] | None = None,
    extra_meta: dict[str, Any] | None = None,
    pool: CpuPool | None = None,
) -> Path | dict[str, Any]:
    """Run one cell and write ``out_dir/<run_id>.arrow``; returns its path (or, when out_dir is
    None, the columns and metadata).  Raises RunFailed if a CPU died or Ray failed.  ``pool``:
    take the CPU actors from it and give them back after a run that completed."""
    if config.backend == "virtual":
        return run_virtual_cell(config, out_dir, run_id=run_id, progress=progress, extra_meta=extra_meta)
    import ray
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    run_id = run_id or make_run_id(config)
    roles = assign_roles(config)
    n = len(roles)
    say = progress or (lambda msg, frac: None)
    host_cores = os.cpu_count() or 1
    oversub = n / host_cores
    pin = n <= host_cores and placement_group is None  # a sweep packs several cells per node
    node_id = ray.get_runtime_context().get_node_id()
    CpuActor = _cpu_actor_class()
    m = Machine.create(config, token=run_id.rsplit("-", 1)[-1])
    actors: list[Any] = []
    completed = False
    try:
        driver = CpuContext(m, MAX_CPUS - 1, "app", config, capacity=1)
        m.ctl.store64(m.L.cpu(MAX_CPUS - 1) + CPU_PID, os.getpid())
        say("populating memory", 0.0)
        m.populate(driver, VMA_COLLAPSE)
        m.populate(driver, VMA_OTHER)
        say("starting CPUs", 0.05)
        # one Ray CPU per simulated CPU; oversubscribed runs share the node's CPUs (recorded)
        share = 1.0 if placement_group is not None else min(1.0, _node_cpus(ray, node_id) / n)
        if pool is not None and placement_group is None:
            actors = pool.take(n, node_id)
        for i in range(n - len(actors)):
            if placement_group is not None:
                strat = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=i)
            else:
                strat = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
            actors.append(CpuActor.options(scheduling_strategy=strat, num_cpus=share).remote())
        refs = [
            a.run.remote(m.prefix, config.to_dict(), i, roles[i], config.seed, (i % host_cores) if pin else None)
            for i, a in enumerate(actors)
        ]
        ref_cpu = {r: i for i, r in enumerate(refs)}
        deadline = time.monotonic() + START_TIMEOUT_S
        while m.ctl.load32(READY) < n:
            done, _ = ray.wait(refs, timeout=0.05)
            if done:
                _raise_dead(ray, done, ref_cpu, roles, m)
            if time.monotonic() > deadline:
                raise RunFailed(f"the {n} CPU actors did not start within {START_TIMEOUT_S:.0f} s (is the Ray cluster short of CPUs?)")
        t0 = now_ns()
        m.ctl.store64(T0, t0)
        m.ctl.store32(GATE, 1)
        m.ctl.futex_wake(GATE, 1 << 30)
        total_s = config.warmup_s + config.duration_s
        results, watchdog, quiescent, checks = _monitor(ray, m, refs, ref_cpu, roles, config, t0, total_s, say)
        # a run that could not complete is a failed run (exit 3), never a finding: a stall the
        # watchdog saw (with its lock dump), or a CPU that raised (cpu_exception) or died
        if watchdog:
            raise RunFailed(f"watchdog: {watchdog['detail']}")
        errors = [r["error"] for r in results if r["error"]]
        if errors:
            raise RunFailed(errors[0])
        violations = [v for r in results for v in r["violations"]] + quiescent
        stop = m.ctl.load32(STOP)
        if stop == 0:  # every CPU finished its last operation: quiescent
            violations.extend(check_machine(m))
        say("writing results", 0.98)
        cols = _columns(results, run_id, config, t0)
        # the wall-clock time of t_start_ns = 0 (the end of the warm-up): the monotonic clock
        # of now_ns() mapped onto the system clock, read together
        t0_unix_ns = time.time_ns() - (now_ns() - t0) + int(config.warmup_s * 1e9)
        meta = {
            "run_id": run_id,
            "kind": "sim",
            "started_at": datetime.fromtimestamp(t0_unix_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds"),
            "t0_unix_ns": t0_unix_ns,
            "params": config.to_dict(),
            "host": _host(n, oversub, node_id),
            "calibration": _calibration() if out_dir is not None else [],  # the dilation of a file kept
            "violations": _relative(violations, t0),
            "summary": _summary(cols, violations, results),
            "roles": roles,
            "cpu_stats": {f"cpu{r['cpu']}": r["stats"] for r in results},
            "access_sample": 8,
            "quiescent_checks": checks,
            "stopped": "violation" if stop == STOP_VIOLATION else "time",
            **(extra_meta or {}),
        }
        completed = True
    finally:
        m.ctl.cas32(STOP, 0, STOP_FAILED)
        if pool is not None and completed:
            pool.give(actors)  # every CPU returned from run(): the processes are idle
        else:
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        m.close()
    if out_dir is None:
        return {"columns": cols, "meta": meta}
    return write_run(Path(out_dir) / f"{run_id}.arrow", cols, meta)


def run_virtual_cell(
    config: RunConfig,
    out_dir: Path | str | None,
    *,
    run_id: str | None = None,
    progress: Callable[[str, float], None] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path | dict[str, Any]:
    """One cell on the virtual-time backend (core/backends/virtual.py), in this process: the same result
    file, with times in virtual ns, ``clock: virtual`` and the cost table it used in the
    metadata.  Deterministic: the same config gives the same file contents on any host."""
    from ptlab.core.analysis.costs import load_costs
    from ptlab.core.backends.virtual import fit, run_virtual

    run_id = run_id or make_run_id(config)
    say = progress or (lambda msg, frac: None)
    table = load_costs(None)
    say("fitting the cost table", 0.02)
    flat, fitted = fit(table)
    say("running in virtual time", 0.05)
    out = run_virtual(config, flat)
    results = out["results"]
    violations = [v for r in results for v in r["violations"]] + out["violations"]
    say("writing results", 0.98)
    cols = _columns(results, run_id, config, 0)
    n = len(out["roles"])
    meta = {
        "run_id": run_id,
        "kind": "sim",
        "params": config.to_dict(),
        "host": _host(n, 0.0, ""),
        "clock": "virtual",
        "costs": {**table.to_dict(), "fitted": fitted, "charged": out["costs"]},
        "speed": out["speed"],
        **({"placement": out["placement"]} if "placement" in out else {}),  # CPUs sharing cores
        "calibration": [],
        "violations": violations,
        "summary": _summary(cols, violations, results),
        "roles": out["roles"],
        "cpu_stats": {f"cpu{r['cpu']}": r["stats"] for r in results},
        "access_sample": 8,
        "quiescent_checks": 0,
        **(extra_meta or {}),
    }
    if out_dir is None:
        return {"columns": cols, "meta": meta}
    return write_run(Path(out_dir) / f"{run_id}.arrow", cols, meta)


def _node_cpus(ray: Any, node_id: str) -> float:
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive"):
            return float(node.get("Resources", {}).get("CPU", 1.0)) or 1.0
    return 1.0


def _raise_dead(ray: Any, done: list[Any], ref_cpu: dict[Any, int], roles: list[str], m: Machine) -> None:
    for r in done:
        cpu = ref_cpu[r]
        try:
            ray.get(r)
        except Exception as e:  # RayActorError and friends
            m.ctl.cas32(STOP, 0, STOP_FAILED)
            pid = m.ctl.load64(m.L.cpu(cpu) + CPU_PID)
            raise RunFailed(f"simulated CPU {cpu} ({roles[cpu]}) died: {_death_reason(e, pid)}") from None


def _death_reason(e: BaseException, pid: int = 0) -> str:
    """Why a CPU actor died, in a few words, from Ray's exception (whose text is ten lines of
    troubleshooting advice).  A process that vanished without an exit of its own ("connection
    error ... End of file") was killed by a signal -- SIGKILL, a crash, the kernel's OOM
    killer; Ray cannot say which, so neither can we.  Otherwise the exception's own first
    line."""
    text = " ".join(str(e).split())
    who = f"its process (pid {pid})" if pid else "its process"
    if "NODE_OUT_OF_MEMORY" in text or "memory monitor" in text.lower():
        return f"{who} was killed by Ray's memory monitor (the node ran out of memory)"
    if "End of file" in text or "SYSTEM_ERROR" in text or "SIGKILL" in text:
        return f"{who} was killed by a signal (SIGKILL, a crash or the OOM killer; no exit status)"
    if "INTENDED" in text or "ray.kill" in text:
        return f"{who} was stopped (ray.kill)"
    first = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return first[0][:200] if first else type(e).__name__


def _monitor(ray: Any, m: Machine, refs: list[Any], ref_cpu: dict[Any, int], roles: list[str], config: RunConfig, t0: int, total_s: float, say: Callable[[str, float], None]) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, Any]], int]:
    """Wait for the CPUs.  Every ``quiesce_s`` park them all between operations and check the
    machine's invariants (a quiescent point); a CPU with no progress for watchdog_s turns into
    a failed run with a dump of every lock's holder and waiters (a deadlock is a result, never
    a hang).  Returns the CPUs' results, the watchdog's report, the quiescent findings and
    how many quiescent checks ran."""
    n = len(refs)
    last = [m.ctl.load64(m.L.cpu(i) + CPU_PROGRESS) for i in range(n)]
    changed = [time.monotonic()] * n
    pending = list(refs)
    results: dict[int, dict[str, Any]] = {}
    watchdog = None
    found: list[dict[str, Any]] = []
    checks = 0
    start = time.monotonic()
    next_quiesce = start + config.warmup_s + config.quiesce_s if config.quiesce_s else float("inf")
    end = start + total_s
    hard_deadline = end + config.watchdog_s + 60
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
        for r in done:
            cpu = ref_cpu[r]
            try:
                results[cpu] = ray.get(r)
            except Exception:
                _raise_dead(ray, [r], ref_cpu, roles, m)
        now = time.monotonic()
        say("running", min(0.97, (now_ns() - t0) / 1e9 / total_s))
        if watchdog is None and pending and now >= next_quiesce and now < end - 0.3:
            checked = _quiescent_check(m, n, config)
            if checked is None:
                next_quiesce = float("inf")  # CPUs that cannot park: the watchdog decides
            else:
                found.extend(checked)
                checks += 1
                if any(v["kind"] in config.stop_on for v in checked):  # the first catch ends the run
                    m.ctl.cas32(STOP, 0, STOP_VIOLATION)
                    m.ctl.futex_wake(STOP, 1 << 30)
                parked_for = time.monotonic() - now
                changed = [c + parked_for for c in changed]  # parking is not a lack of progress
                now = time.monotonic()
                next_quiesce = now + config.quiesce_s
        if watchdog is None:
            for i in range(n):
                p = m.ctl.load64(m.L.cpu(i) + CPU_PROGRESS)
                if p != last[i] or m.ctl.load32(m.L.cpu(i) + CPU_STATE) == ST_DONE:
                    last[i], changed[i] = p, now
                elif now - changed[i] > config.watchdog_s:
                    dump = lock_dump(m, roles)
                    watchdog = {
                        "kind": "deadlock",
                        "cpu": i,
                        "role": roles[i],
                        "page": -1,
                        "strategy": config.strategy,
                        "phase": "watchdog",
                        "t_ns": now_ns(),
                        "detail": f"no progress on CPU {i} ({roles[i]}) for {config.watchdog_s:g} s; " + "; ".join(dump),
                    }
                    m.ctl.cas32(STOP, 0, STOP_WATCHDOG)
                    m.ctl.futex_wake(STOP, 1 << 30)
                    break
        if now > hard_deadline:
            raise RunFailed("the run did not end: CPUs did not stop after the watchdog fired")
    return [results[i] for i in range(n)], watchdog, found, checks


def _quiescent_check(m: Machine, n: int, config: RunConfig) -> list[dict[str, Any]] | None:
    """Park every running CPU between operations, check the invariants, release them.  None
    when the CPUs do not all park within a second (a CPU stuck in an operation)."""
    ctl = m.ctl
    ctl.store32(QUIESCE, 1)
    try:
        deadline = time.monotonic() + min(1.0, config.watchdog_s / 2)
        while True:
            running = sum(ctl.load32(m.L.cpu(i) + CPU_STATE) != ST_DONE for i in range(n))
            if ctl.load32(PARKED) >= running:
                break
            if time.monotonic() > deadline or ctl.load32(STOP):
                return None
            time.sleep(0.0005)
        if running < n:
            return []  # a CPU already finished: the end-of-run check covers this point
        found = check_machine(m)
        for v in found:
            v["phase"] = "quiescent"
            v["t_ns"] = now_ns()
        return found
    finally:
        ctl.store32(QUIESCE, 0)
        ctl.futex_wake(QUIESCE, 1 << 30)


def _columns(results: list[dict[str, Any]], run_id: str, config: RunConfig, t0: int) -> dict[str, Any]:
    parts = [to_columns(r["rows"], r["crows"], r["cpu"], run_id, config.strategy, t0) for r in results]
    cols: dict[str, Any] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        if isinstance(vals[0], list):
            cols[key] = [x for v in vals for x in v]
        else:
            cols[key] = np.concatenate(vals)
    warm = int(config.warmup_s * 1e9)
    keep = np.asarray(cols["t_start_ns"]) >= warm
    for key, v in cols.items():
        if isinstance(v, list):
            cols[key] = [x for x, k in zip(v, keep) if k]
        else:
            cols[key] = v[keep]
    cols["t_start_ns"] = cols["t_start_ns"] - warm
    # the CPUs record virtual page numbers; the file holds byte addresses (as the kernel
    # probe's), -1 where an event has none (an mmap() records before its VMA exists)
    addr = np.asarray(cols["addr"], dtype=np.int64)
    cols["addr"] = np.where(addr >= 0, addr * config.page_size, -1)
    order = np.argsort(cols["t_start_ns"], kind="stable")
    for key, v in cols.items():
        cols[key] = [v[i] for i in order] if isinstance(v, list) else v[order]
    return cols


def _summary(cols: dict[str, Any], violations: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    op = np.asarray(cols["op"], dtype=object)
    res = np.asarray(cols["result"], dtype=object)
    ops, counts = np.unique(op, return_counts=True) if len(op) else ([], [])
    coll = res[op == "collapse"]
    cres, ccounts = np.unique(coll, return_counts=True) if len(coll) else ([], [])
    kinds: dict[str, int] = {}
    for v in violations:
        kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
    # measured: from the end of the warm-up to the end of the last recorded event (the CPUs
    # stop at the nominal end, or earlier when something stopped them); rates divide by it
    t = np.asarray(cols["t_start_ns"], dtype=np.int64)
    end_ns = int((t + np.asarray(cols["latency_ns"], dtype=np.int64)).max()) if len(t) else 0
    return {
        "duration_s": end_ns / 1e9,
        "events": {str(k): int(c) for k, c in zip(ops, counts)},
        "collapses": {str(k): int(c) for k, c in zip(cres, ccounts)},
        "violations": len(violations),
        "violation_kinds": kinds,
        "dropped_events": sum(r["stats"]["dropped_events"] for r in results),
    }


def _relative(violations: list[dict[str, Any]], t0: int) -> list[dict[str, Any]]:
    out = []
    for v in violations:
        v = dict(v)
        if v.get("t_ns"):
            v["t_ns"] = int(v["t_ns"]) - t0
        out.append(v)
    return out


def _host(n: int, oversub: float, node_id: str) -> dict[str, Any]:
    try:
        from ptlab.core.analysis.host import fingerprint

        host = dict(fingerprint())
    except ImportError:
        import platform

        host = {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    host.update({"simulated_cpus": n, "oversubscription": round(oversub, 3), "node_id": node_id})
    return host


def _calibration() -> list[dict[str, Any]]:
    try:
        from ptlab.core.analysis.calibrate import quick_calibration
    except ImportError:
        return []
    return quick_calibration()
