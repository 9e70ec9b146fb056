"""Several simulated CPUs on one core (core/backends/virtual.py PlacedWorld, ``--placement``).

What is checked: only one CPU of a shared core runs at a time (and a multiplexer that lets
them all run is caught by the same check); a SCHED_IDLE CPU gives its core to a waking normal
one at its next safe point, while a waking SCHED_IDLE CPU waits for the tick after the
running one's slice; a placed run is deterministic and its CPUs do wait for their core; with no
core shared the run is the one it was without placements (same events, bit for bit); the
placement spec and a kernel run's recorded threads turn into the same placement, and bad specs
are one clear error.
"""

from __future__ import annotations

import pytest
from ptlab.core.analysis.costs import load_costs
from ptlab.core.backends import virtual as V
from ptlab.core.backends.scheduled import CostModel
from ptlab.core.backends.virtual import (
    NICE_0_WEIGHT,
    WEIGHT_IDLEPRIO,
    PlacedWorld,
    Placement,
    base_slice_ns,
    costs_from,
    run_virtual,
)
from ptlab.core.machine.config import RunConfig, parse_placement
from ptlab.core.machine.errors import ConfigError
from test_vtime import _digest  # the same digest of a run's events

FLAT = load_costs(None).as_ns()
COSTS = costs_from(FLAT)
SWITCH = COSTS.get("context_switch")
TICK = V.TICK_NS


def _world(cores: tuple[int, ...], idle: tuple[bool, ...]) -> PlacedWorld:
    p = Placement(cores, idle, base_slice_ns(len(set(cores))), TICK, SWITCH)
    return PlacedWorld(None, cost=CostModel(COSTS), quantum_ns=0, placement=p)


def _busy(world: PlacedWorld, spans: list[tuple[int, int, int]], i: int, total_ns: int, chunk_ns: int = 10_000) -> None:
    """A CPU's user-space loop: run ``total_ns`` in chunks, a preemption point after each
    (what VirtualCpu.preempt_point does when no spinlock is held), recording each chunk."""
    world.acquire_core()
    done = 0
    while done < total_ns:
        t0 = world.now()
        world.delay(chunk_ns)
        spans.append((i, t0, world.now()))
        done += chunk_ns
        if world.preempt_due():
            world.yield_core()
    world.release_core()


def _overlaps(spans: list[tuple[int, int, int]], cores: tuple[int, ...]) -> list[tuple]:
    """Pairs of busy spans of two different CPUs on one core that overlap in virtual time."""
    bad = []
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            (i, s0, e0), (j, s1, e1) = spans[a], spans[b]
            if i != j and cores[i] == cores[j] and s0 < e1 and s1 < e0:
                bad.append((spans[a], spans[b]))
    return bad


def _three_on_one_core(world: PlacedWorld) -> list[tuple[int, int, int]]:
    spans: list[tuple[int, int, int]] = []
    for i in range(3):
        world.spawn(lambda i=i: _busy(world, spans, i, 6_000_000))  # 6 ms each: several slices
    assert world.run() == "done"
    return spans


def test_only_one_cpu_of_a_shared_core_runs_at_a_time():
    cores = (1, 1, 1)
    world = _world(cores, (True, True, True))
    spans = _three_on_one_core(world)
    assert _overlaps(spans, cores) == []
    # they took turns, a slice (rounded up to the tick) at a time, and paid the switches
    assert sum(world.preempted) >= 3
    ends = [max(e for i, _, e in spans if i == k) for k in range(3)]
    assert max(ends) >= 18_000_000  # 3 x 6 ms of work on one core
    assert all(n > 0 for n in world.runq_ns)


def test_the_overlap_check_fires_when_the_core_is_not_shared_out(monkeypatch):
    """The positive control: a multiplexer that lets every CPU run at once is caught."""
    monkeypatch.setattr(PlacedWorld, "acquire_core", lambda self: None)
    monkeypatch.setattr(PlacedWorld, "release_core", lambda self: None)
    cores = (1, 1, 1)
    spans = _three_on_one_core(_world(cores, (True, True, True)))
    assert _overlaps(spans, cores)


def _waker_meets_busy(waker_idle: bool) -> tuple[int, int]:
    """CPU 0 (SCHED_IDLE) runs 10 ms of user work; CPU 1 runs, sleeps 100 µs, then wants the
    core back.  Returns (when CPU 1 asked, when it ran)."""
    world = _world((1, 1), (True, waker_idle))
    spans: list[tuple[int, int, int]] = []
    seen: list[int] = []

    def waker() -> None:
        world.acquire_core()
        seen.append(world.now() + 100_000)
        world.sleep(100_000)  # gives the core to CPU 0, wants it back 100 µs later
        seen.append(world.now())
        world.release_core()

    world.spawn(lambda: _busy(world, spans, 0, 10_000_000))
    world.spawn(waker)
    assert world.run() == "done"
    return seen[0], seen[1]


def test_a_sched_idle_cpu_yields_to_a_waking_normal_one():
    asked, ran = _waker_meets_busy(waker_idle=False)
    # check_preempt_wakeup_fair(): preempted at the busy CPU's next safe point (a 10 µs chunk)
    assert ran - asked <= 10_000 + SWITCH + 1


def test_a_waking_sched_idle_cpu_waits_for_the_tick():
    asked, ran = _waker_meets_busy(waker_idle=True)
    # idle wakees preempt nobody: it runs when CPU 0's slice has ended, noticed at the tick
    assert ran >= TICK
    assert ran - asked > base_slice_ns(1)


def _share(idle: tuple[bool, bool]) -> float:
    """Two CPUs on one core, both always runnable for 200 ms: CPU 1's share of that time."""
    world = _world((0, 0), idle)
    spans: list[tuple[int, int, int]] = []
    world.spawn(lambda: _busy(world, spans, 0, 400_000_000, chunk_ns=100_000))
    world.spawn(lambda: _busy(world, spans, 1, 400_000_000, chunk_ns=100_000))
    assert world.run() == "done"
    return sum(min(e, 200_000_000) - s for i, s, e in spans if i == 1 and s < 200_000_000) / 200_000_000


def test_weights_give_sched_idle_its_small_share():
    """vruntime advances by run time x NICE_0_WEIGHT / weight: two normal CPUs share a core
    half and half; a SCHED_IDLE one beside a normal one gets about 3/1027 of it."""
    assert 0.4 < _share((False, False)) < 0.6
    idle = _share((False, True))
    assert 0 < idle <= 2 * TICK / 200_000_000
    assert WEIGHT_IDLEPRIO / (NICE_0_WEIGHT + WEIGHT_IDLEPRIO) < 2 * TICK / 200_000_000


def _config(**kw) -> RunConfig:
    base = dict(strategy="pmd-clear", order=9, collapse_context="madvise", workload="refault", zap_pages=64,
                cpus={"app": 2, "gup-fast": 1, "mmap": 1, "khugepaged": 1}, nr_pmds=2, pin_hold_us=20,
                duration_s=0.004, warmup_s=0.0, think_ns=0, quiesce_s=0, backend="virtual")
    base.update(kw)
    return RunConfig(**base)


def test_a_placed_run_is_deterministic_and_its_cpus_wait_for_their_core():
    a = run_virtual(_config(placement="probe:2"), FLAT)
    b = run_virtual(_config(placement="probe:2"), FLAT)
    assert _digest(a) == _digest(b)
    assert a["placement"]["cores"] == [1, 1, 1, 1, 0] and a["placement"]["sched_idle"] == [True] * 4 + [False]
    load = [r["stats"] for r in a["results"][:4]]
    assert all(s["core"] == 1 for s in load) and sum(s["runq_ns"] for s in load) > 0
    assert a["results"][4]["stats"]["runq_ns"] == 0  # the collapser has its core to itself
    assert a["violations"] == [] and not any(r["violations"] for r in a["results"])
    assert _digest(run_virtual(_config(placement="probe:2", seed=1), FLAT)) != _digest(a)
    assert _digest(run_virtual(_config(), FLAT)) != _digest(a)  # the placement changes the run


def test_without_a_shared_core_the_run_is_unchanged(monkeypatch):
    """The default (a core per CPU) runs on the plain World; forcing the placed world onto a
    placement that shares no core gives the very same events: its fallbacks change nothing."""
    cfg = _config(duration_s=0.002)
    plain = run_virtual(cfg, FLAT)
    assert "placement" not in plain
    one_each = run_virtual(cfg.replace(placement="0,1,2,3,4"), FLAT)
    assert _digest(one_each) == _digest(plain)

    def forced(*a, **kw):
        kw.setdefault("placement", Placement(tuple(range(5)), (False,) * 5, base_slice_ns(5), TICK, SWITCH))
        return PlacedWorld(*a, **kw)

    monkeypatch.setattr(V, "World", forced)
    assert _digest(run_virtual(cfg, FLAT)) == _digest(plain)


def test_placement_specs():
    assert parse_placement("probe:2", 5, 1) == ((1, 1, 1, 1, 0), (True,) * 4 + (False,))
    assert parse_placement("probe:8", 5, 1) == ((0, 1, 2, 3, 4), (False,) * 5)
    assert parse_placement("1:idle, 1:idle,0", 3, 1) == ((1, 1, 0), (True, True, False))
    assert base_slice_ns(2) == 1_500_000 and base_slice_ns(1) == 750_000 and base_slice_ns(64) == 3_000_000
    for bad, msg in (("1,1", "names 2 CPU"), ("a,b,c", "give CORE"), ("1:fifo,1,0", "give CORE"), ("probe:x", "probe:N")):
        with pytest.raises(ConfigError, match=msg):
            parse_placement(bad, 3, 1)
    with pytest.raises(ConfigError, match="--backend virtual"):
        RunConfig(placement="probe:2", cpus={"app": 1, "khugepaged": 1})


def test_a_kernel_runs_threads_become_the_placement():
    from ptlab.core.probe.kernel_probe import sim_placement

    threads = {"collapser": {"cpu": 0, "sched_idle": False}, "fault-same": {"cpu": 1, "sched_idle": True},
               "fault-other": {"cpu": 1, "sched_idle": True}, "mmap": {"cpu": 1, "sched_idle": True},
               "pin": {"cpu": 1, "sched_idle": True}}
    assert sim_placement({"threads": threads}, _config()) == "1:idle,1:idle,1:idle,1:idle,0"
    with pytest.raises(ConfigError, match="no such thread"):
        sim_placement({"threads": threads}, _config(cpus={"app": 2, "zap": 1, "khugepaged": 1}))
    loose = {**threads, "mmap": {"cpu": 1, "pinned": False, "sched_idle": True}}
    with pytest.raises(ConfigError, match="not pinned"):
        sim_placement({"threads": loose}, _config())


@pytest.mark.parametrize("spec,needle", [
    ("1,1,1", "--placement names 3 CPU(s) and the run has 2"),
    ("probe:zero", "--placement probe:N takes a number of cores"),
    ("missing.arrow", "--placement missing.arrow: no such file"),
])
def test_bad_placement_on_the_command_line_is_one_line(tmp_path, spec, needle):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "ptlab.cli.main", "run", "--backend", "virtual", "-s", "pmd-clear",
                        "--app", "1", "--khugepaged", "1", "-d", "0.001", "--placement", spec, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert len(p.stderr.strip().splitlines()) == 1
