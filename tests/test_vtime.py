"""Virtual time at kernel cost (core/backends/virtual.py, the World's cost model in core/backends/scheduled.py).

What is checked: runs are deterministic (same config, same numbers); a spinner's clock runs
while it spins and jumps to the release; a sleeper pays the wake-to-run latency; spinlock
waiters are served in queue order (qspinlock); the model's bookkeeping costs nothing; the
fitted fault matches the host kernel's; a 64-CPU configuration runs; the result file says
``clock: virtual`` and embeds its cost table.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from ptlab.core.analysis.costs import load_costs
from ptlab.core.backends.scheduled import K_LOAD, K_RMW, CostModel, Costs, World
from ptlab.core.backends.virtual import costs_from, fit, run_virtual
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.events import to_columns

TABLE = load_costs(None)
FLAT = TABLE.as_ns()


def _digest(out: dict) -> str:
    h = hashlib.sha256()
    for r in out["results"]:
        cols = to_columns(r["rows"], r["crows"], r["cpu"], "x", "s", 0)
        for key in ("t_start_ns", "latency_ns", "spin_ns", "sleep_ns", "addr"):
            h.update(np.asarray(cols[key]).tobytes())
    return h.hexdigest()


def _config(**kw) -> RunConfig:
    base = dict(strategy="ptl-hold", order=4, cpus={"app": 2, "khugepaged": 1}, duration_s=0.001, warmup_s=0.0,
                nr_pmds=1, workload="hotset", think_ns=500, quiesce_s=0, backend="virtual")
    base.update(kw)
    return RunConfig(**base)


def test_a_virtual_run_is_deterministic():
    a = run_virtual(_config(), FLAT)
    b = run_virtual(_config(), FLAT)
    assert _digest(a) == _digest(b)
    assert a["speed"]["steps"] == b["speed"]["steps"]
    c = run_virtual(_config(seed=1), FLAT)
    assert _digest(c) != _digest(a)


def test_spinners_queue_in_order_and_their_clock_runs_to_the_release():
    """Three CPUs take one spinlock (the holder keeps it 10 µs): the waiters get it in the order
    they queued, each having spun until the release before it."""
    from ptlab.core.machine.mm import Machine

    cfg = _config(cpus={"app": 3})
    world = World(None, cost=CostModel(costs_from(FLAT)), quantum_ns=0)
    m = Machine.create(cfg, wrap=world.region)
    order: list[tuple[int, int, int]] = []
    try:
        lock = m.pmd_lock

        class Cpu:
            def __init__(self, i: int) -> None:
                self.id, self.owner_tag, self.ipi_flag_off = i, i + 1, -1

            def set_waiting(self, *a) -> None: ...
            def interrupt_point(self) -> None: ...
            def check_stop(self) -> None: ...
            def account_spin(self, ns: int, kind: str) -> None: ...
            def cpu_alive(self, c: int) -> bool:
                return True

        def body(i: int, start_ns: int):
            def run() -> None:
                cpu = Cpu(i)
                world.delay(start_ns)  # arrive in order 0, 1, 2
                spun = lock.lock(cpu)
                order.append((i, world.now(), spun))
                world.delay(10_000)  # hold it 10 µs
                lock.unlock(cpu)
            return run

        for i in range(3):
            world.spawn(body(i, i * 100))
        assert world.run() == "done"
    finally:
        world.abandon()
        m.close()
    assert [o[0] for o in order] == [0, 1, 2]
    (_, t0, s0), (_, t1, s1), (_, t2, s2) = order
    assert s0 == 0 and s1 > 9_000 and s2 > 19_000  # CPU 2 waited for two holders
    assert t1 >= t0 + 10_000 and t2 >= t1 + 10_000


def test_a_sleeper_pays_the_wake_to_run_latency():
    from ptlab.core.machine.mm import Machine

    cfg = _config(cpus={"app": 2})
    world = World(None, cost=CostModel(costs_from(FLAT)), quantum_ns=0)
    m = Machine.create(cfg, wrap=world.region)
    woke: list[int] = []
    try:
        word = 4  # STOP: nobody else uses it here

        def sleeper() -> None:
            m.ctl.futex_wait(word, 0, -1)
            woke.append(world.now())

        def waker() -> None:
            world.delay(50_000)
            m.ctl.futex_wake(word, 1)
            woke.append(world.now())

        world.spawn(sleeper)
        world.spawn(waker)
        assert world.run() == "done"
    finally:
        world.abandon()
        m.close()
    t_sleeper, t_waker = woke[1], woke[0]
    assert t_sleeper - t_waker >= FLAT["futex_wake_to_run"] * 0.99


def test_bookkeeping_costs_nothing_and_shared_lines_cost_a_transfer():
    model = CostModel(Costs({**FLAT, "mmap_call": 1, "ipi_handler": 1, "collapse_page_rest": 0}), {(0, 12)}, [(1, 100, 200)])
    assert model.op(0, K_RMW, 0, 12, 0) == 0  # COLLAPSING: the oracle's flag
    assert model.op(0, K_LOAD, 1, 150, 0) == 0  # a free range
    first = model.op(0, K_RMW, 0, 256, 0)
    assert model.op(0, K_RMW, 0, 256, 0) == first  # still ours: no transfer
    assert model.op(1, K_LOAD, 0, 256, 0) == pytest.approx(FLAT["line_transfer"], abs=1)
    assert model.op(1, K_LOAD, 0, 256, 0) == pytest.approx(FLAT["load_hit"], abs=1)


def test_the_fit_makes_the_uncontended_fault_the_kernels():
    from ptlab.core.backends.virtual import _uncontended_fault_ns

    flat, fitted = fit(TABLE)
    kernel = (TABLE.meta.get("kernel_result") or {}).get("fault_p50_ns")
    if not kernel:
        pytest.skip("the default cost table carries no kernel result to fit against")
    assert "fault_entry" in fitted and "collapse_page_rest" in fitted
    assert _uncontended_fault_ns(flat) == pytest.approx(kernel, rel=0.02)


def test_sixty_four_faulting_cpus_run_on_this_machine():
    out = run_virtual(_config(cpus={"app": 64, "khugepaged": 1}, nr_pmds=4, duration_s=0.0002, workload="random"), FLAT)
    assert len(out["results"]) == 65
    assert all(len(r["rows"]) for r in out["results"][:64])
    assert out["violations"] == []


def test_virtual_result_file_says_its_clock_and_embeds_the_costs(tmp_path):
    from ptlab.cluster.cell import run_cell
    from ptlab.core.analysis.results import read_run

    r = read_run(run_cell(_config(duration_s=0.0005), tmp_path))
    assert r.meta["clock"] == "virtual"
    assert set(r.meta["costs"]["entries"]) == set(TABLE.entries)
    assert r.meta["speed"]["virtual_ns_per_wall_s"] > 0
    assert r.meta["params"]["backend"] == "virtual"
    assert len(r.table) > 0


def test_madvise_collapse_context_mirrors_the_kernel_probe():
    """MADV_COLLAPSE's path: a thread of the process (in mm_cpumask: it re-touches the range it
    re-splits) collapses order 9 with the LRU drain inside the collapse window; clean."""
    cfg = _config(strategy="pmd-clear", order=9, collapse_context="madvise", workload="refault", zap_pages=64,
                  cpus={"app": 2, "khugepaged": 1}, nr_pmds=2, duration_s=0.003)
    out = run_virtual(cfg, FLAT)
    assert out["violations"] == [] and not any(r["violations"] for r in out["results"])
    k = out["results"][-1]
    cols = to_columns(k["rows"], k["crows"], k["cpu"], "x", "s", 0)
    coll = np.asarray(cols["latency_ns"])[np.asarray(cols["op"], dtype=object) == "collapse"]
    assert len(coll) >= 2 and np.median(coll) > FLAT["lru_drain"]  # the drain is inside the window
