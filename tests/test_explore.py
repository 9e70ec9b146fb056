"""``ptlab explore`` on the scheduled backend: a bug is found and its replay file reproduces the
same violation and trace hash (Shuttle's round trip); the shrunk counterexample still fails
and is no bigger; safe strategies stay clean while their positive controls are caught; bad
input is one line and exit 2.  Every test is deterministic (no timing, no wall-clock limit)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from ptlab.cli.main import main
from ptlab.cluster.explore import (
    HOLD_UNTIL,
    Plan,
    PreemptionScheduler,
    RandomPoints,
    Recording,
    ReplayFile,
    catalog,
    decode_decisions,
    encode_decisions,
    explore,
    first_catch,
    judge,
    make_scheduler,
    pct_bound,
    render_timeline,
    replay_file_for,
    shrink,
)
from ptlab.core.backends.scheduled import ReplayScheduler, SchedResult
from ptlab.core.kernel.bugs import CONTROL, expected_kinds
from ptlab.core.machine.config import RunConfig

PIN = {"app": 2, "gup-fast": 1, "khugepaged": 1}


def plan_for(strategy: str = "ptl-hold", bugs: tuple[str, ...] = (), cpus: dict[str, int] | None = None, **kw) -> Plan:
    cfg = RunConfig(strategy=strategy, order=4, cpus=cpus or PIN, workload="hotset", nr_pmds=1, pin_hold_us=1000,
                    inject_bugs=bugs, unsafe=bool(bugs))
    return Plan(cfg, expect=expected_kinds(bugs) if bugs else (), **kw)


NO_FLUSH = plan_for(bugs=("ptl-hold-no-flush",))


def first_failure(plan: Plan, n: int = 30) -> dict:
    ex = explore(plan, n, 0)
    assert ex.stop is not None and ex.stop["status"] == "caught", f"nothing caught in {n} schedules"
    return ex.stop


# ------------------------------------------------------------------------------ the round trip
def test_bug_found_and_its_replay_file_reproduces_it(tmp_path: Path) -> None:
    stop = first_failure(NO_FLUSH)
    assert stop["kind"] in NO_FLUSH.expect
    rf = replay_file_for(NO_FLUSH, stop["seed"])
    assert rf.trace_hash == stop["trace_hash"]  # the same schedule, run again: the same trace
    path = rf.write(tmp_path / "x.replay.json")
    back = ReplayFile.read(path)
    assert back.decisions == rf.decisions and back.plan == NO_FLUSH
    r = back.run(trace=True)  # replayed from the decision list, fully traced
    assert r.trace_hash == stop["trace_hash"]
    assert judge(back.plan, r).kind == stop["kind"]
    assert r.first == stop["violation"]
    # the same seed under the same flags (--replay-seed) is the same run too
    assert NO_FLUSH.run(stop["seed"], trace=True).trace_hash == stop["trace_hash"]


def test_a_changed_decision_is_a_different_trace() -> None:
    """The variant that makes the round trip fail: one decision changed, another trace."""
    r = NO_FLUSH.run(0)
    runnable_alt = next(i for i, c in enumerate(r.decisions) if c != r.decisions[0])
    changed = list(r.decisions)
    changed[0] = r.decisions[runnable_alt]
    try:
        r2 = NO_FLUSH.run(0, ReplayScheduler(changed))
    except RuntimeError:  # the new choice was not runnable there: the replay says so
        return
    assert r2.trace_hash != r.trace_hash


def test_preemptions_replay_the_schedule_exactly() -> None:
    for seed in range(3):
        rec = Recording(make_scheduler(NO_FLUSH.scheduler, seed, NO_FLUSH.k))
        r = NO_FLUSH.run(seed, rec)
        again = NO_FLUSH.run(seed, PreemptionScheduler(rec.preempt, rec.forced))
        assert again.trace_hash == r.trace_hash
    # and without them it is another schedule
    assert NO_FLUSH.run(0, PreemptionScheduler({}, {})).trace_hash != NO_FLUSH.run(0).trace_hash


def test_decision_encoding_round_trips() -> None:
    d = [0, 0, 0, 3, 1, 1, 2, 0, 0]
    assert encode_decisions(d) == "0*3,3,1*2,2,0*2"
    assert decode_decisions(encode_decisions(d)) == d
    assert decode_decisions("") == []


# ------------------------------------------------------------------------------ shrinking
def test_shrunk_counterexample_still_fails_and_is_no_bigger(tmp_path: Path) -> None:
    stop = first_failure(NO_FLUSH)
    orig = NO_FLUSH.run(stop["seed"], Recording(make_scheduler(NO_FLUSH.scheduler, stop["seed"], NO_FLUSH.k)))
    rec = Recording(make_scheduler(NO_FLUSH.scheduler, stop["seed"], NO_FLUSH.k))
    NO_FLUSH.run(stop["seed"], rec)
    sh = shrink(NO_FLUSH, stop["seed"], stop["kind"], budget=120)
    r = sh.result
    assert any(v["kind"] == stop["kind"] for v in r.violations)
    assert sh.plan.config.nr_cpus <= NO_FLUSH.config.nr_cpus
    assert all(n <= NO_FLUSH.all_ops[role] for role, n in sh.plan.all_ops.items() if role in sh.plan.config.cpus)
    assert sh.preemptions <= len(rec.preempt)
    assert r.steps <= orig.steps
    # its replay file reproduces it bit for bit
    back = ReplayFile.read(sh.replay_file().write(tmp_path / "s.replay.json"))
    assert back.shrunk and back.run().trace_hash == r.trace_hash
    # the story is a per-CPU table that ends at the violation
    lines = render_timeline(r)
    assert lines[0].split()[0] == "step" and any("!! " + stop["kind"] in ln for ln in lines)


def test_shrink_refuses_a_schedule_that_does_not_fail() -> None:
    clean = plan_for()
    with pytest.raises(ValueError, match="does not fail"):
        shrink(clean, 0, "use_after_free", budget=5)


# ------------------------------------------------------------------------------ safe stays clean
@pytest.mark.parametrize("strategy", ["pmd-clear", "ptl-hold", "migration-entry"])
def test_safe_strategy_stays_clean_and_its_control_is_caught(strategy: str) -> None:
    """A few hundred schedules (100 per strategy) of the safe strategy find nothing, and the
    same exploration with one safety step deleted (its positive control) is caught."""
    safe = explore(plan_for(strategy), 100, 0)
    assert safe.stop is None and safe.runs == 100
    assert any(p != "none" for p, _ in safe.cover)  # other CPUs' steps met collapse phases
    control = plan_for(strategy, (CONTROL[strategy],))
    caught = explore(control, 100, 0)
    assert caught.stop is not None and caught.stop["status"] == "caught"


def test_lost_wakeup_is_told_from_a_deadlock() -> None:
    """A futex sleeper whose word changed after it slept, and nobody woke: lost_wakeup (the
    mutant deletes rwsem_wake()); without the mutant the same schedules end."""
    cpus = {"app": 2, "khugepaged": 1}
    buggy = explore(plan_for("pmd-clear", ("mutant-rwsem-no-wake",), cpus), 10, 0)
    assert buggy.stop is not None and buggy.stop["kind"] == "lost_wakeup"
    assert buggy.stop["outcome"] == "deadlock"
    fine = explore(plan_for("pmd-clear", (), cpus), buggy.stop["seed"] + 1, 0)
    assert fine.stop is None


# ------------------------------------------------------------------------------ verdicts
def _result(violations: list[dict], outcome: str = "done", errors: list[str] | None = None) -> SchedResult:
    return SchedResult(outcome, violations, 10, [], "h", "s", errors or [], [], [], [])


def test_judge_counts_a_catch_only_before_the_run_failed() -> None:
    p = plan_for(bugs=("ptl-hold-no-flush",))
    lost = {"kind": "lost_write", "step": 5}
    boom = {"kind": "cpu_exception", "step": 7}
    other = {"kind": "mapcount_mismatch", "step": 3}
    assert judge(p, _result([other, lost, boom])).status == "caught"
    assert judge(p, _result([boom, lost])).status == "failed"
    assert judge(p, _result([other])).status == "wrong_kind"
    assert judge(p, _result([])).status == "clean"
    assert judge(p, _result([], "budget")).kind == "budget"
    assert judge(plan_for(), _result([other])).status == "caught"  # nothing expected: any kind


def test_pct_bound() -> None:
    assert pct_bound(2, 10, 1) == pytest.approx(0.5)
    assert pct_bound(2, 10, 2) == pytest.approx(1 / 20)
    assert pct_bound(2, 10, 2, 20) == pytest.approx(1 - (19 / 20) ** 20)
    assert pct_bound(4, 5000, 3, 10_000) < 1e-3


def test_pct_exploration_reports_coverage() -> None:
    p = plan_for("migration-entry", scheduler="pct:2", k=8000)
    ex = explore(p, 10, 0)
    assert ex.stop is None and ex.runs == 10 and ex.steps > 0
    kinds = {s for _, s in ex.cover}
    assert "fault ok" in kinds or "store" in kinds


def test_random_points_prefers_named_points() -> None:
    class W:
        named = ["", "", ""]

    s = RandomPoints(1, p=0.0, q=1.0, park=0)
    s.attach(W())
    s.start(3)
    assert all(s.pick([0, 1, 2], 0, i) == 0 for i in range(50))  # p = 0: never leaves
    W.named[0] = "gup_fast_after_grab"
    assert all(s.pick([0, 1, 2], 0, i) != 0 for i in range(50))  # q = 1: always


class _Task:
    state = 0  # not DONE


class _World:
    """What RandomPoints reads of a world: the named point of each CPU, the tasks, IPIs."""

    def __init__(self, n: int) -> None:
        self.named = [""] * n
        self.tasks = [_Task() for _ in range(n)]
        self.pending: set[int] = set()

    def ipi_pending(self, t: int) -> bool:
        return t in self.pending


def test_a_held_cpu_waits_for_its_release_point() -> None:
    """Preempted inside a GUP-fast walk with H = 1, CPU 0 is held: it does not run while
    another CPU can, however often they switch, until another CPU passes the release point
    (a page table freed); with H = 0 the same preemption is an ordinary short park."""
    point, release = "gup_fast_after_pmd_read", HOLD_UNTIL["gup_fast_after_pmd_read"][0]
    w = _World(3)
    s = RandomPoints(7, p=1.0, q=1.0, park=3, hold=1.0)
    s.attach(w)
    s.start(3)
    w.named[0] = point
    cur = s.pick([0, 1, 2], 0, 0)
    assert cur != 0 and 0 in s.held
    w.named[0] = ""
    for i in range(200):  # p = 1: CPUs 1 and 2 switch at every point, never to CPU 0
        w.named[cur] = "fault_after_pte_read" if i % 3 else ""
        nxt = s.pick([0, 1, 2], cur, i)
        w.named[cur] = ""
        assert nxt != 0
        cur = nxt
    w.pending.add(0)  # a flush IPI for CPU 0 (interrupts on): it is picked to take it, still held
    assert s.pick([0, 1, 2], cur, 201) == 0 and 0 in s.held
    w.pending.clear()
    w.named[0] = point  # back at its point, the handler done: it is switched away again
    assert s.pick([0, 1, 2], 0, 202) != 0 and 0 in s.held
    w.named[0] = ""
    other = 1 if cur != 1 else 2
    w.named[other] = release
    s.pick([0, 1, 2], other, 203)
    assert 0 not in s.held  # another CPU freed a page table: the hold is over
    # only held CPUs besides the running one: it goes on; the running one blocked: a held CPU
    # runs (nothing else can), and running ends its hold
    s.held[0] = (release,)
    w.named[1] = "fault_after_pte_read"
    assert s.pick([0, 1], 1, 204) == 1
    w.named[1] = ""
    assert s.pick([0], -1, 205) == 0
    s.pick([0, 1], 0, 206)
    assert 0 not in s.held
    # H = 0: no hold, the short park of the default scheduler
    s0 = RandomPoints(7, p=1.0, q=1.0, park=3)
    s0.attach(w)
    s0.start(3)
    w.named[0] = point
    assert s0.pick([0, 1, 2], 0, 0) != 0 and not s0.held and 0 in s0.until


# ------------------------------------------------------------------------------ the catalog's hard two
# Both need a THP zapped whole (zap_huge_pmd) in a schedule (cluster/explore.py EXPLORE_CELLS);
# no-sync-ipi also a GUP-fast walk held inside the table the collapse deposits until the zap
# frees it.  Schedules to the first catch are deterministic: these budgets cannot flake.
HARD = {"no-sync-ipi": 600, "mutant-pmd-install-no-lock": 600}


@pytest.mark.parametrize("base", [0, 100_000])
@pytest.mark.parametrize("name", sorted(HARD))
def test_catalog_catches_the_order_9_pair_and_the_catch_replays(name: str, base: int) -> None:
    (case,) = catalog([name])
    res = first_catch(case.plan.to_dict(), base, HARD[name])
    assert res["n"] is not None and res["kind"] in case.plan.expect, res
    seed = base + res["n"] - 1
    ex = explore(case.plan, 1, seed, stop_on="caught")
    assert ex.stop is not None and ex.stop["kind"] == res["kind"]
    rf = replay_file_for(case.plan, seed)
    assert rf.trace_hash == ex.stop["trace_hash"]
    r = rf.run()  # from the decision list alone
    assert r.trace_hash == ex.stop["trace_hash"] and judge(case.plan, r).kind == res["kind"]


def test_the_order_9_pair_needs_its_cell() -> None:
    """The variants that make the catches fail: the schedules that catch no-sync-ipi from base
    seed 0 catch nothing with 8-page zaps (the THP is split, never zapped whole) or without the
    hold (no walk stays in the table until it is freed); and the same cell without the bug
    (tlb_remove_table_sync_one() waits for the held walk) is clean."""
    (case,) = catalog(["no-sync-ipi"])
    n = first_catch(case.plan.to_dict(), 0, HARD["no-sync-ipi"])["n"]
    assert n is not None
    cfg = case.plan.config
    for plan in (replace(case.plan, config=cfg.replace(zap_pages=8)), replace(case.plan, scheduler="random")):
        assert explore(plan, n, 0, stop_on="caught").stop is None
    safe = replace(case.plan, config=cfg.replace(inject_bugs=(), unsafe=False), expect=())
    assert explore(safe, n, 0).stop is None


# ------------------------------------------------------------------------------ the command line
def test_cli_explore_finds_replays_and_writes_the_trace(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["explore", "-s", "ptl-hold", "--inject-bug", "ptl-hold-no-flush", "--unsafe", "--workers", "1",
            "-n", "20", "--shrink-budget", "40", "-o", str(out)]
    assert main(argv) == 1
    text = capsys.readouterr().out
    assert "VIOLATION in schedule" in text and "shrunk counterexample" in text
    replay_line = next(ln for ln in text.splitlines() if "--replay-seed" in ln)
    files = sorted(out.glob("*.replay.json"))
    assert len(files) == 2  # the schedule found and its shrunk form
    original = next(f for f in files if "shrunk" not in f.name)
    recorded = json.loads(original.read_text())
    assert main(["explore", "--replay", str(original), "-o", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"trace hash {recorded['trace_hash']} (as recorded)" in text
    # --replay-seed with the printed flags is the same schedule
    seed_argv = replay_line.split()[1:]  # without "ptlab"
    assert main([*seed_argv[:-2], "-o", str(out), *seed_argv[-2:]]) == 1
    assert recorded["trace_hash"] in capsys.readouterr().out
    from ptlab.core.analysis.results import read_run

    traces = sorted(out.glob("*.arrow"))
    assert traces
    run = read_run(traces[0])  # a checked result file: the usual columns plus step
    assert run.meta["kind"] == "sched" and run.table.column_names[-1] == "step"
    steps = run.table.column("step").to_pylist()
    assert steps == sorted(steps) and run.meta["schedule"]["trace_hash"] in traces[0].name


def test_cli_explore_clean_prints_coverage(tmp_path: Path, capsys) -> None:
    assert main(["explore", "-s", "migration-entry", "--workers", "1", "-n", "5", "--scheduler", "pct:2", "-o", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "clean" in text and "coverage:" in text and "PCT depth 2" in text


BAD = [
    (["--scheduler", "nope"], "--scheduler"),
    (["--scheduler", "random:2"], "--scheduler"),
    (["--scheduler", "pct:x"], "--scheduler"),
    (["--scheduler", "random:0.05:0.5:3:2"], "--scheduler"),
    (["--zap-pages", "0"], "--zap-pages"),
    (["--zap-pages", "513"], "--zap-pages"),
    (["--depth", "0"], "--depth"),
    (["--ops", "app"], "--ops"),
    (["--ops", "nope=3"], "--ops"),
    (["--ops", "app=0"], "--ops"),
    (["--ops", "app=x"], "--ops"),
    (["--schedules", "0"], "--schedules"),
    (["--workers", "0"], "--workers"),
    (["--empty", "1.5"], "--empty"),
    (["--inject-bug", "rfc-v1"], "--unsafe"),
    (["--inject-bug", "nope", "--unsafe"], "unknown bug"),
    (["--order", "12"], "out of range"),
    (["-s", "ptl-hold", "--order", "9"], "--order 9"),
    (["--replay", "/nonexistent/x.json"], "--replay"),
    (["--replay", "NOTJSON"], "not a ptlab replay file"),
    (["--replay", "WRONG"], "not a ptlab replay file"),
    (["--replay", "NOTJSON", "--replay-seed", "3"], "--replay-seed"),
    (["--bogus"], "No such option"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_is_one_line_and_exit_2(extra: list[str], needle: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "NOTJSON").write_text("{not json")
    (tmp_path / "WRONG").write_text(json.dumps({"hello": 1}))
    extra = [str(tmp_path / a) if a in ("NOTJSON", "WRONG") else a for a in extra]
    rc = main(["explore", "--workers", "1", "-n", "1", "-o", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ Ray
@pytest.mark.skipif(os.environ.get("PTLAB_SKIP_RAY") == "1", reason="PTLAB_SKIP_RAY=1")
def test_ray_workers_find_the_same_first_failure() -> None:
    """Batches fanned out over Ray stop at the same (lowest) failing schedule as a sequential
    run: no batch starts after it, the ones in flight are waited for (and leave no shared
    memory behind)."""
    plan = plan_for("ptl-hold", ("mutant-isolate-no-release",))  # first caught in a later batch
    local = explore(plan, 60, 0, batch=4)
    assert local.stop is not None
    remote = explore(plan, 60, 0, workers=2, batch=4)
    assert remote.stop is not None
    assert remote.stop["seed"] == local.stop["seed"] and remote.stop["trace_hash"] == local.stop["trace_hash"]
