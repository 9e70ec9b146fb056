"""Issue 9 item 7, requirement c) "no ordinary page table walker can grab the folio": the rmap
walker, the page-table walker and VMA changes (core/kernel/walkers.py) beside a collapse.

Forced with the in-process stepper (no timing luck, no wall-clock limit): a collapse is parked
mid-copy and each walker runs against it; it must wait (spin on the PTL, sleep on mmap_lock or
anon_vma) or back off (the folio is locked, cannot be derived from the page table) as the
kernel's would, and the oracle must stay clean.  Then the checks are shown to fire: a pmd-clear
without anon_vma_lock_write lets remove_migration_ptes() miss its entries behind the cleared
PMD, a page-table walker without the PTL finds an old folio mid-collapse, and a corrupted
machine makes the walker's consistency check fire.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ptlab.core.kernel import strategies
from ptlab.core.kernel import walkers as W
from ptlab.core.kernel.khugepaged import collapse_range
from ptlab.core.kernel.oracle import check_machine, lock_name
from ptlab.core.kernel.paths import Oracle, access_load, access_store, zap_range
from ptlab.core.machine.layout import (
    _PRESENT,
    _WRITE,
    CPU_STATE,
    CPU_WAITING,
    PG_ISOLATED,
    PG_LRU,
    ST_SLEEP,
    ST_SPIN,
    STOP,
    is_migration_entry,
    pte_mk_migration,
)

sys.path.insert(0, str(Path(__file__).parent))
from _stepper import Stepper  # noqa: E402

ORDER = 4
NR = 1 << ORDER
OLD = 1  # a page of the collapsing range [0, NR)
OTHER = 100  # a page of the same PTE table, outside the range
CPUS = {"app": 1, "khugepaged": 1, "rmap-walk": 1, "pt-walk": 1, "vma-change": 1}
STRATEGIES = ("pmd-clear", "ptl-hold", "migration-entry")


class Lab:
    """A stepper machine with one CPU of every role and the app's oracle."""

    def __init__(self, st: Stepper) -> None:
        self.st = st
        self.a = st.cpu(0, "app")
        self.k = st.cpu(1, "khugepaged")
        self.r = st.cpu(2, "rmap-walk")
        self.p = st.cpu(3, "pt-walk")
        self.v = st.cpu(4, "vma-change")
        self.o = Oracle()

    def store(self, *vpns: int) -> None:
        for vpn in vpns:
            assert self.st.run(self.a, lambda vpn=vpn: access_store(self.a, self.o, vpn))

    def pte(self, vpn: int) -> int:
        m = self.st.m
        return m.ptep_get(m.pmdp_get(vpn >> 9) >> 12, vpn & 511)

    def folio_of(self, vpn: int) -> tuple[int, int]:
        """(pfn, the folio's index) of the page mapped at vpn."""
        pfn = self.pte(vpn) >> 12
        return pfn, vpn - (pfn - self.st.m.folio_head(pfn))

    def collapse(self) -> Any:
        k = self.k
        return self.st.start(k, lambda: collapse_range(k, strategies.get(self.st.config.strategy, k.bugs), 0, ORDER))

    def clean(self) -> None:
        assert self.st.violations() == []
        assert check_machine(self.st.m) == []


def _waiting_on(st: Stepper, cpu: Any, state: int, name: str) -> None:
    """Poll (no deadline of its own: the stepper's watchdog ends a stuck test) until ``cpu``
    spins (ST_SPIN) or sleeps (ST_SLEEP) on a lock whose name starts with ``name``."""
    base, ctl = st.m.L.cpu(cpu.id), st.m.ctl
    while not (ctl.load32(base + CPU_STATE) == state and lock_name(st.m, ctl.load32(base + CPU_WAITING)).startswith(name)):
        assert not ctl.load32(STOP), f"CPU {cpu.id} never waited on {name}"
        time.sleep(0.001)


# ------------------------------------------------------------------------------ alone
def test_walkers_alone_keep_data_and_counts():
    """Migration moves the data (every word the app wrote is still there, through a new pfn),
    aging clears young bits, MADV_PAGEOUT without swap keeps and puts back every folio,
    mprotect(PROT_READ) write-protects and a write fault makes the page writable again,
    mmap(MAP_FIXED) over a range drops its contents legitimately (the zap epoch)."""
    with Stepper(strategy="migration-entry", order=ORDER, cpus=CPUS) as st:
        lab = Lab(st)
        lab.store(*range(0, 2 * NR), OTHER)
        before = lab.pte(OTHER) >> 12
        assert st.run(lab.r, lambda: W.migrate_folio(lab.r, OTHER)) == "MIGRATEPAGE_SUCCESS"
        assert lab.pte(OTHER) >> 12 != before
        assert st.m.folio_head(before) < 0  # the old folio was freed
        assert st.run(lab.r, lambda: W.shrink_active_folio(lab.r, OTHER)) == "referenced"
        assert st.run(lab.r, lambda: W.shrink_active_folio(lab.r, OTHER)) == "unreferenced"
        acc = st.run(lab.p, lambda: W.madvise_cold_or_pageout(lab.p, 0, W.MADV_PAGES, True))
        assert acc["isolated"] == acc["kept"] == W.MADV_PAGES
        acc = st.run(lab.p, lambda: W.smaps_walk(lab.p, 0, 512))
        assert acc["rss"] == 512 and acc["migration"] == 0
        # a collapse, then the new large folio migrates as one
        assert st.run(lab.k, lambda: collapse_range(lab.k, strategies.get("migration-entry"), 0, ORDER))[0] == "SCAN_SUCCEED"
        big = lab.pte(0) >> 12
        assert st.run(lab.r, lambda: W.migrate_folio(lab.r, 3)) == "MIGRATEPAGE_SUCCESS"
        assert lab.pte(0) >> 12 != big and st.m.folio_order(st.m.folio_head(lab.pte(0) >> 12)) == ORDER
        assert st.run(lab.v, lambda: W.change_protection(lab.v, 0, NR, writable=False)) == "ok"
        assert not lab.pte(2) & _WRITE
        lab.store(2)  # do_wp_page() -> wp_page_reuse()
        assert lab.pte(2) & _WRITE and not lab.pte(3) & _WRITE
        assert st.run(lab.v, lambda: W.change_protection(lab.v, 0, NR, writable=True)) == "ok"
        assert lab.pte(3) & _WRITE
        assert st.run(lab.v, lambda: W.mmap_fixed_over(lab.v, 8, 8)) == 8
        lab.store(*range(0, 2 * NR), OTHER)  # no lost write: pages 8..15 were dropped on purpose
        lab.clean()


def test_mprotect_keeps_the_zero_page_read_only():
    """MM_CP_TRY_CHANGE_WRITABLE upgrades exclusive anon folios only: a zero-page PTE stays
    read-only through mprotect(PROT_READ|PROT_WRITE)."""
    with Stepper(strategy="ptl-hold", order=ORDER, cpus=CPUS) as st:
        lab = Lab(st)
        st.run(lab.a, lambda: zap_range(lab.a, 5, 1))
        st.run(lab.a, lambda: access_load(lab.a, lab.o, 5, 1))  # a read fault maps the zero page
        assert lab.pte(5) >> 12 == st.m.zero_pfn
        st.run(lab.v, lambda: W.change_protection(lab.v, 0, NR, writable=False))
        st.run(lab.v, lambda: W.change_protection(lab.v, 0, NR, writable=True))
        assert lab.pte(5) >> 12 == st.m.zero_pfn and not lab.pte(5) & _WRITE
        lab.store(5)  # wp_page_copy(): a private page
        lab.clean()


# ------------------------------------------------------------------------------ beside a collapse
# What each walker does while a collapse of [0, NR) is parked mid-copy: ("done", result) — it
# completes at once — or (ST_SPIN / ST_SLEEP, lock) — it waits on that lock until the collapse
# is over.  "*_old" picks a page of the range through the page table (the LRU pick): in every
# strategy the old folio cannot be derived from it any more.  "isolate_old" tries the old folio
# itself (as an LRU scan that still had it would): it is locked by the collapse.
DONE = "done"
EXPECT: dict[str, dict[str, tuple[Any, str]]] = {
    "pmd-clear": {
        "smaps": (ST_SLEEP, "mmap_lock"),  # mmap_lock is held for write
        "madv_pageout": (ST_SLEEP, "mmap_lock"),
        "referenced_old": (DONE, "-EBUSY"),  # the PMD is cleared
        "migrate_old": (DONE, "-EBUSY"),
        "isolate_old": (DONE, "-EAGAIN"),
        "referenced_other": (DONE, "contended"),  # anon_vma_trylock_read() fails: reclaim moves on
        "migrate_other": (ST_SLEEP, "anon_vma"),  # try_to_migrate() waits for anon_vma_lock_write
        "mprotect": (ST_SLEEP, "mmap_lock"),
        "munmap": (ST_SLEEP, "mmap_lock"),
    },
    "ptl-hold": {
        "smaps": (ST_SPIN, "ptl"),  # the collapse holds the PTL through the copy
        "madv_pageout": (ST_SPIN, "ptl"),
        "referenced_old": (DONE, "-EBUSY"),  # the PTEs are none
        "migrate_old": (DONE, "-EBUSY"),
        "isolate_old": (DONE, "-EAGAIN"),
        "referenced_other": (ST_SPIN, "ptl"),  # page_vma_mapped_walk() takes the PTL
        "migrate_other": (ST_SPIN, "ptl"),
        "mprotect": (ST_SLEEP, "mmap_lock"),  # the collapse holds mmap_lock for read
        "munmap": (ST_SLEEP, "mmap_lock"),
    },
    "migration-entry": {
        "smaps": (DONE, "ok"),  # reads the locked old folios through the migration entries
        "madv_pageout": (DONE, "ok"),  # skips the migration entries
        "referenced_old": (DONE, "-EBUSY"),  # a migration entry is not present
        "migrate_old": (DONE, "-EBUSY"),
        "isolate_old": (DONE, "-EAGAIN"),
        "referenced_other": (DONE, "referenced"),  # the PTL is free during the copy
        "migrate_other": (DONE, "MIGRATEPAGE_SUCCESS"),
        "mprotect": (ST_SLEEP, "mmap_lock"),
        "munmap": (ST_SLEEP, "mmap_lock"),
    },
}


def _action(lab: Lab, name: str, old: tuple[int, int], other: tuple[int, int]) -> tuple[Any, Any]:
    """(cpu, fn) of one walker action."""
    r, p, v = lab.r, lab.p, lab.v

    def isolate_old() -> str:
        head, why = W.folio_isolate_lru(r, old[0], keep_locked=False)
        if head >= 0:
            W.folio_putback_lru(r, head, locked=False)
        return why

    def smaps() -> str:
        acc = W.smaps_walk(p, 0, 512)
        if lab.st.config.strategy == "migration-entry":
            assert acc["migration"] == NR
        return "ok"

    def pageout() -> str:
        W.madvise_cold_or_pageout(p, 0, W.MADV_PAGES, True)
        return "ok"

    return {
        "smaps": (p, smaps),
        "madv_pageout": (p, pageout),
        "referenced_old": (r, lambda: W.shrink_active_folio(r, OLD)),
        "migrate_old": (r, lambda: W.migrate_folio(r, OLD)),
        "isolate_old": (r, isolate_old),
        "referenced_other": (r, lambda: W.shrink_active_one(r, *other)),
        "migrate_other": (r, lambda: W.migrate_one(r, *other)),
        "mprotect": (v, lambda: W.change_protection(v, 0, NR, writable=False)),
        "munmap": (v, lambda: str(W.mmap_fixed_over(v, NR, 8))),
    }[name]


@pytest.mark.parametrize("action", list(EXPECT["pmd-clear"]))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_walker_waits_or_backs_off_while_a_collapse_copies(strategy, action):
    how, what = EXPECT[strategy][action]
    with Stepper(strategy=strategy, order=ORDER, cpus=CPUS) as st:
        lab = Lab(st)
        lab.store(*range(0, 2 * NR), OTHER)
        old, other = lab.folio_of(OLD), lab.folio_of(OTHER)
        cpu, fn = _action(lab, action, old, other)
        st.park_at(lab.k, "collapse_mid_copy")
        coll = lab.collapse()
        st.wait_parked(lab.k, job=coll)
        job = st.start(cpu, fn)
        if how == DONE:
            assert st.join(job) == what
        else:
            _waiting_on(st, cpu, how, what)
            assert not job.done.is_set()
        st.resume(lab.k)
        assert st.join(coll)[0] == "SCAN_SUCCEED"
        st.join(job)
        lab.store(*range(0, 2 * NR), OTHER)  # every write the app made is still there
        assert st.run(lab.p, lambda: W.smaps_walk(lab.p, 0, 512))["migration"] == 0
        if action == "mprotect":
            st.run(lab.v, lambda: W.change_protection(lab.v, 0, NR, writable=True))
        lab.clean()


# ------------------------------------------------------------------------------ the checks fire
@pytest.mark.parametrize("bug", [(), ("pmd-clear-no-anon-vma-lock",)], ids=["safe", "no-anon-vma-lock"])
def test_remove_migration_ptes_behind_a_cleared_pmd(bug):
    """A migration unmapped a folio of the same PTE table (OTHER) and is between
    try_to_migrate() and remove_migration_ptes() when a pmd-clear collapse of [0, NR) clears the
    PMD.  Safe: the collapse holds anon_vma_lock_write, so remove_migration_ptes() sleeps on
    anon_vma until the PMD is back, then finds its entry.  Without it, the rmap walk finds no
    table behind the PMD and leaves the migration entry: walker_missed_mapping."""
    with Stepper(strategy="pmd-clear", order=ORDER, cpus=CPUS, inject_bugs=bug, unsafe=bool(bug)) as st:
        lab = Lab(st)
        lab.store(*range(0, NR), OTHER)
        st.park_at(lab.r, "migrate_after_unmap")
        mig = st.start(lab.r, lambda: W.migrate_folio(lab.r, OTHER))
        st.wait_parked(lab.r, job=mig)
        assert is_migration_entry(lab.pte(OTHER))
        st.park_at(lab.k, "collapse_after_flush")
        coll = lab.collapse()
        st.wait_parked(lab.k, job=coll)
        assert st.m.pmdp_get(0) == 0  # the PMD is cleared
        st.resume(lab.r)
        if bug:
            assert st.join(mig) == "MIGRATEPAGE_SUCCESS"
            assert [v["kind"] for v in st.violations()] == ["walker_missed_mapping"]
        else:
            _waiting_on(st, lab.r, ST_SLEEP, "anon_vma")
        st.resume(lab.k)
        assert st.join(coll)[0] == "SCAN_SUCCEED"
        assert st.join(mig) == "MIGRATEPAGE_SUCCESS"
        lab.store(*range(0, NR), OTHER)
        assert lab.pte(OTHER) & _PRESENT
        kinds = [v["kind"] for v in st.violations()]
        assert kinds == (["walker_missed_mapping"] if bug else [])
        assert check_machine(st.m) == []  # the oracle repaired the entry it reported


@pytest.mark.parametrize("bug", [(), ("pt-walk-no-ptl",)], ids=["ptl", "no-ptl"])
@pytest.mark.parametrize("cold", [False, True], ids=["pageout", "cold"])
def test_page_table_walker_without_the_ptl_finds_an_old_folio(bug, cold):
    """migration-entry, parked after isolating the old folios under the PTL and before turning
    their PTEs into migration entries.  A page-table walker that takes the PTL spins until the
    entries are in and then skips them; one that reads the PTEs without it derives the old
    folios from them mid-collapse: walker_grabbed_collapsing_folio."""
    with Stepper(strategy="migration-entry", order=ORDER, cpus=CPUS, inject_bugs=bug, unsafe=bool(bug)) as st:
        lab = Lab(st)
        lab.store(*range(0, NR))
        st.park_at(lab.k, "collapse_before_unmap")
        coll = lab.collapse()
        st.wait_parked(lab.k, job=coll)
        job = st.start(lab.p, lambda: W.madvise_cold_or_pageout(lab.p, 0, W.MADV_PAGES, not cold))
        if bug:
            st.join(job)
            kinds = {v["kind"] for v in st.violations()}
            assert kinds == {"walker_grabbed_collapsing_folio"}
            assert len(st.violations()) == NR  # every old folio of the range
        else:
            _waiting_on(st, lab.p, ST_SPIN, "ptl")
        st.resume(lab.k)
        assert st.join(coll)[0] == "SCAN_SUCCEED"
        st.join(job)
        lab.store(*range(0, NR))
        if not bug:
            lab.clean()


def test_page_table_walker_without_the_ptl_is_kept_out_by_pmd_clear():
    """Under pmd-clear the same careless walker finds nothing: it needs mmap_lock for read,
    which the collapse holds for write."""
    with Stepper(strategy="pmd-clear", order=ORDER, cpus=CPUS, inject_bugs=("pt-walk-no-ptl",), unsafe=True) as st:
        lab = Lab(st)
        lab.store(*range(0, NR))
        st.park_at(lab.k, "collapse_mid_copy")
        coll = lab.collapse()
        st.wait_parked(lab.k, job=coll)
        job = st.start(lab.p, lambda: W.madvise_cold_or_pageout(lab.p, 0, W.MADV_PAGES, True))
        _waiting_on(st, lab.p, ST_SLEEP, "mmap_lock")
        st.resume(lab.k)
        assert st.join(coll)[0] == "SCAN_SUCCEED"
        st.join(job)
        lab.clean()


def _corrupt_mapcount(lab: Lab) -> None:
    lab.st.m.folio_mapcount_add(lab.st.m.folio_head(lab.pte(5) >> 12), -1)


def _corrupt_refcount(lab: Lab) -> None:
    assert lab.st.run(lab.k, lambda: collapse_range(lab.k, strategies.get("ptl-hold"), 0, ORDER))[0] == "SCAN_SUCCEED"
    lab.st.m.folio_ref_add(lab.st.m.folio_head(lab.pte(5) >> 12), -1)


def _corrupt_free_frame(lab: Lab) -> None:
    m, pte = lab.st.m, lab.pte(5)
    lab.st.run(lab.a, lambda: zap_range(lab.a, 5, 1))  # frees the folio
    m.set_pte_at(m.pmdp_get(0) >> 12, 5, pte)  # ... and a PTE still maps it


def _corrupt_migration_entry(lab: Lab) -> None:
    m = lab.st.m
    m.set_pte_at(m.pmdp_get(0) >> 12, 5, pte_mk_migration(lab.pte(5)))  # its folio is not locked


def _corrupt_owned(lab: Lab) -> None:
    m = lab.st.m
    m.folio_test_set_flag(m.folio_head(lab.pte(5) >> 12), PG_ISOLATED, True)  # "a collapse owns it"


@pytest.mark.parametrize(
    "corrupt, kind",
    [
        (_corrupt_mapcount, "walker_inconsistent"),
        (_corrupt_refcount, "walker_inconsistent"),
        (_corrupt_free_frame, "walker_inconsistent"),
        (_corrupt_migration_entry, "walker_inconsistent"),
        (_corrupt_owned, "walker_grabbed_collapsing_folio"),
    ],
    ids=["mapcount", "refcount", "free-frame", "unlocked-migration-entry", "owned"],
)
@pytest.mark.parametrize("walker", ["smaps", "madv_cold", "mprotect"])
def test_a_walker_sees_a_corrupted_machine(corrupt, kind, walker):
    """Each condition of the walkers' view check fires when the machine is made to break it
    (the variants that show the check works); the same walk on the intact machine is clean
    (every other test here)."""
    with Stepper(strategy="ptl-hold", order=ORDER, cpus=CPUS) as st:
        lab = Lab(st)
        corrupt(lab)
        if walker == "smaps":
            st.run(lab.p, lambda: W.smaps_walk(lab.p, 0, 512))
        elif walker == "madv_cold":
            st.run(lab.p, lambda: W.madvise_cold_or_pageout(lab.p, 0, W.MADV_PAGES, False))
        else:
            st.run(lab.v, lambda: W.change_protection(lab.v, 0, NR, writable=False))
        assert kind in {v["kind"] for v in st.violations()}


def test_quiescent_check_finds_an_isolation_never_put_back():
    """The end-of-run oracle: a mapped folio left off the LRU (a walker or collapse that
    isolated it and never put it back) is reported as folio_off_lru."""
    with Stepper(strategy="ptl-hold", order=ORDER, cpus=CPUS) as st:
        lab = Lab(st)
        assert check_machine(st.m) == []
        st.m.folio_test_set_flag(st.m.folio_head(lab.pte(7) >> 12), PG_LRU, False)
        assert [v["kind"] for v in check_machine(st.m)] == ["folio_off_lru"]


# ------------------------------------------------------------------------------ CLI and real runs
def test_walker_flags_and_mix(tmp_path, capsys):
    from ptlab.cli.main import main
    from ptlab.core.machine.config import RunConfig
    from ptlab.workloads.mixes import get_mix

    c = RunConfig(cpus=get_mix("walkers"))
    assert {"rmap-walk", "pt-walk", "vma-change"} <= set(c.cpus)
    for argv, needle in ((["run", "--rmap-walk", "-1"], "--rmap-walk"), (["run", "--pt-walk", "x"], "--pt-walk"), (["run", "--vma-change", "-2"], "--vma-change")):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "pmd-clear-no-anon-vma-lock" in out and "pt-walk-no-ptl" in out


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_real_run_with_every_walker_is_clean(tmp_path, strategy):
    """The process backend: app, khugepaged and one CPU of each walker for 2 s; every walker
    really walked and the oracle found nothing."""
    from ptlab.cluster.cell import run_cell
    from ptlab.core.analysis.results import read_run
    from ptlab.core.machine.config import RunConfig

    # 2 s runs (each one clean) until every walker has walked and 10 collapses succeeded,
    # however slowly a loaded host lets them go
    ops = ("folio_referenced", "migrate", "smaps", "madv_cold", "madv_pageout", "mprotect", "munmap")
    seen: set[str] = set()
    collapsed = migrated = 0
    for seed in range(15):
        r = read_run(run_cell(RunConfig(strategy=strategy, order=ORDER, duration_s=2.0, seed=seed, cpus=CPUS, workload="hotset", nr_pmds=1), tmp_path))
        df = r.table.to_pandas()
        assert r.meta["violations"] == [], r.meta["violations"][:3]
        collapsed += int(((df.op == "collapse") & (df.result == "SCAN_SUCCEED")).sum())
        migrated += int((df[df.op == "migrate"].result == "MIGRATEPAGE_SUCCESS").sum())
        seen |= set(df.op.unique()) & set(ops)
        if collapsed >= 10 and migrated and seen == set(ops):
            break
    assert collapsed >= 10 and migrated, (collapsed, migrated)
    assert seen == set(ops), set(ops) - seen


# ------------------------------------------------------------------------------ scheduled backend
SCHED_SEEDS = range(20)


@pytest.mark.parametrize(
    "strategy, bug, walker, kind",
    [
        ("pmd-clear", "pmd-clear-no-anon-vma-lock", "rmap-walk", "walker_missed_mapping"),
        ("migration-entry", "pt-walk-no-ptl", "pt-walk", "walker_grabbed_collapsing_folio"),
    ],
)
def test_scheduled_executions_catch_the_bug_and_stay_clean_without_it(strategy, bug, walker, kind):
    """The deterministic backend (random schedules, fixed seeds): the bug is caught in some of
    20 executions, and the same 20 executions without it are clean."""
    from ptlab.core.backends.scheduled import make_scheduler, run_scheduled
    from ptlab.core.machine.config import RunConfig

    cpus = {"app": 1, walker: 1, "khugepaged": 1}

    def kinds(bugs: tuple[str, ...], seed: int) -> set[str]:
        c = RunConfig(strategy=strategy, order=ORDER, cpus=cpus, nr_pmds=1, workload="hotset", inject_bugs=bugs, unsafe=bool(bugs))
        r = run_scheduled(c, make_scheduler("random", seed))
        assert r.outcome in ("done", "violation"), (r.outcome, r.errors)
        return {v["kind"] for v in r.violations}

    assert any(kind in kinds((bug,), s) for s in SCHED_SEEDS)
    assert all(kinds((), s) == set() for s in SCHED_SEEDS)
