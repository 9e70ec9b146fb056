"""Acceptance tests of the kernel paths, the strategies and the oracle, run for real: one Ray
actor per simulated CPU on the session's embedded Ray, shared memory in /dev/shm."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ptlab.core.bugs import check_cases
from ptlab.core.config import RunConfig
from ptlab.core.errors import RunFailed
from ptlab.core.results import read_run

pytestmark = pytest.mark.usefixtures("ray_local")

STRATEGIES = ("pmd-clear", "ptl-hold", "migration-entry")


def run(tmp_path: Path, **kw) -> tuple[dict, object]:
    from ptlab.cluster.cell import run_cell

    r = read_run(run_cell(RunConfig(**kw), tmp_path))
    return r.meta, r.table.to_pandas()


@pytest.mark.parametrize("flush", ["ipi", "broadcast"])
@pytest.mark.parametrize("order", [4, 9])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_safe_strategy_collapses_cleanly(tmp_path, strategy, order, flush):
    meta, df = run(tmp_path, strategy=strategy, order=order, flush=flush, duration_s=2.0, cpus={"app": 1, "gup-fast": 1, "khugepaged": 1})
    ok = int(((df.op == "collapse") & (df.result == "SCAN_SUCCEED")).sum())
    assert ok >= 20, meta["summary"]
    assert meta["violations"] == [], meta["violations"][:3]
    # the GUP CPU really pinned pages during the run
    assert (df.op == "dma").sum() > 0


BUG_CASES = [c for c in check_cases() if c.bugs and len(c.bugs) == 1 and c.expect_caught]


@pytest.mark.parametrize("case", BUG_CASES, ids=lambda c: c.label)
def test_injected_bug_is_caught(tmp_path, case):
    meta, _ = run(tmp_path, duration_s=6.0, **case.params())
    v = meta["violations"]
    assert v, f"{case.label} was not caught: {meta['summary']}"
    assert all(x["kind"] and x["phase"] for x in v)
    assert {x["strategy"] for x in v} == {case.strategy}


def test_quiescent_points_check_the_invariants_mid_run(tmp_path):
    """The driver parks every CPU between operations once a second and checks refcounts,
    mappings and the free poison: a leaked folio is reported while the run goes on."""
    meta, _ = run(tmp_path, strategy="ptl-hold", order=4, duration_s=4.0, quiesce_s=0.5, cpus={"app": 1, "khugepaged": 1}, inject_bugs=("ptl-hold-unlocked-copy",), unsafe=True, chaos=True, workload="hotset", nr_pmds=1)
    assert meta["quiescent_checks"] >= 3
    assert any(v["phase"] == "quiescent" for v in meta["violations"]), meta["summary"]
    clean, _ = run(tmp_path, strategy="ptl-hold", order=4, duration_s=2.0, quiesce_s=0.5, cpus={"app": 1, "khugepaged": 1})
    assert clean["quiescent_checks"] >= 2 and clean["violations"] == []


KNOWN = [c for c in check_cases() if set(c.bugs) & {"gup-fast-no-pmd-recheck", "no-sync-ipi"}]


@pytest.mark.parametrize("case", KNOWN, ids=lambda c: f"{c.label}-{c.flush}")
def test_known_answers_gup_fast_pmd_recheck_and_sync_ipi(tmp_path, case):
    """70cbc3cc78a9 / 2ba99c5e0881: both missing is caught only on a broadcast-flush machine;
    either one alone keeps GUP-fast safe in both flush modes."""
    meta, df = run(tmp_path, duration_s=6.0, **case.params())
    assert int((df.op == "collapse").sum()) >= 20
    if case.expect_caught:
        kinds = {x["kind"] for x in meta["violations"]}
        assert "lost_dma_write" in kinds, meta["summary"]
    else:
        assert meta["violations"] == [], meta["violations"][:3]


def test_injecting_a_bug_needs_unsafe():
    from ptlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--unsafe"):
        RunConfig(inject_bugs=("rfc-v1",))


@pytest.fixture(scope="module")
def signatures(tmp_path_factory):
    """One run per strategy with an app CPU and khugepaged (2 busy CPUs on 2 cores)."""
    out = tmp_path_factory.mktemp("sig")
    return {s: run(out, strategy=s, order=9, duration_s=3.0, cpus={"app": 1, "khugepaged": 1}) for s in STRATEGIES}


def _waiting_faults(df):
    """Faults in the collapsing VMA that started during a collapse and had to wait."""
    f = df[(df.op == "fault") & df.during_collapse & (df.vma == 0)]
    return f[(f.spin_ns > 0) | (f.sleep_ns > 0)]


def _dominant(f) -> str:
    return f.waited_on.value_counts().idxmax()


def test_signature_ptl_hold_faults_spin_and_do_not_sleep(signatures):
    meta, df = signatures["ptl-hold"]
    f = _waiting_faults(df)
    assert _dominant(f) == "ptl"
    assert (f[f.waited_on == "ptl"].spin_ns > 0).all()
    assert f.sleep_ns.sum() == 0
    # the fault saw pte_none, allocated and zeroed a folio, spun, and threw it away
    assert (f.result == "thrown_away").any()


def test_signature_migration_entry_faults_sleep_in_migration_wait(signatures):
    meta, df = signatures["migration-entry"]
    f = _waiting_faults(df)
    assert _dominant(f) == "migration"
    waits = f[f.waited_on == "migration"]
    assert (waits.sleep_ns > 0).all() and (waits.result == "retry").all()
    # they sleep rather than spin: the PTL is held only for the unmap and the remap
    assert f.spin_ns.sum() < f.sleep_ns.sum()
    assert np.median(waits.spin_ns) == 0


def test_signature_pmd_clear_faults_sleep_on_mmap_lock(signatures):
    meta, df = signatures["pmd-clear"]
    f = _waiting_faults(df)
    assert _dominant(f) == "mmap_lock"
    assert (f[f.waited_on == "mmap_lock"].sleep_ns > 0).all()
    assert f.spin_ns.sum() < 0.01 * f.sleep_ns.sum()  # at most a brief zone-lock spin


def test_signature_pmd_clear_mmap_waits_for_the_collapse(tmp_path):
    meta, df = run(tmp_path, strategy="pmd-clear", order=9, duration_s=3.0, cpus={"mmap": 1, "zap": 1, "khugepaged": 1})
    mm = df[(df.op == "mmap") & df.during_collapse]
    waited = mm[(mm.waited_on == "mmap_lock") & (mm.sleep_ns > 0)]
    assert len(waited) > 0
    # and it takes far longer than an mmap() outside a collapse
    calm = df[(df.op == "mmap") & ~df.during_collapse]
    assert np.median(waited.latency_ns) > 5 * np.median(calm.latency_ns)


def test_watchdog_turns_a_leaked_ptl_into_a_failed_run(tmp_path):
    t0 = time.monotonic()
    meta, _ = run(tmp_path, strategy="ptl-hold", order=4, duration_s=30.0, watchdog_s=2.0, cpus={"app": 1, "khugepaged": 1}, inject_bugs=("test-ptl-leak",), unsafe=True)
    assert time.monotonic() - t0 < 25
    dl = [v for v in meta["violations"] if v["kind"] == "deadlock"]
    assert dl, meta["violations"]
    assert "ptl[" in dl[0]["detail"] and "held by CPU 1 (khugepaged)" in dl[0]["detail"]


def _cpu_actor_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"CpuActor" in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_sigkilled_cpu_fails_the_run_naming_it(tmp_path):
    from ptlab.cluster.cell import run_cell

    killed = []

    def killer():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            pids = _cpu_actor_pids()
            if len(pids) >= 2 and any(p.name.startswith("ptlab.") for p in Path("/dev/shm").iterdir()):
                time.sleep(1.5)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    th = threading.Thread(target=killer)
    th.start()
    try:
        with pytest.raises(RunFailed, match=r"simulated CPU \d \((app|khugepaged)\) died"):
            run_cell(RunConfig(strategy="ptl-hold", order=4, duration_s=8.0, cpus={"app": 1, "khugepaged": 1}), tmp_path)
    finally:
        th.join()
    assert killed
    assert not list(tmp_path.glob("*.arrow"))
