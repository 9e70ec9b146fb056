"""Issue 9 items 2, 3 and 8, forced with the in-process stepper (no timing luck, no wall clock):

- holes in a migration-entry collapse: ``--holes mark`` (a faulting CPU sleeps on the new, locked
  folio until the install, then maps it), ``--holes backoff`` (a hole filled during the collapse
  undoes it: SCAN_PAGE_FILLED, the fault's page survives), and the proposal as first written
  (bug ``migration-holes-open``: the fault fills the hole and the collapse still says
  SCAN_SUCCEED — which collapse_range() now flags as ``partial_collapse``); entries zapped
  during a collapse stay zapped, with their own result codes;
- what keeps the VMA stable (``--vma-stability``): with ``vma-lock`` an mmap() of another VMA
  completes while a collapse is parked mid-copy, with ``mmap-lock`` it waits for the collapse;
- read faults map the shared zero page, a write to it gets a private page (wp_page_copy), the
  scan counts zero-page PTEs as none, and a collapse over them succeeds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ptlab.cli.main import main
from ptlab.core.kernel import strategies
from ptlab.core.kernel.khugepaged import collapse_range, scan_pmd
from ptlab.core.kernel.oracle import check_machine
from ptlab.core.kernel.paths import (
    FIRST_CHURN_SLOT,
    Oracle,
    access_load,
    access_store,
    do_mmap,
    mm_lock_seq,
    mmap_write_unlock,
    zap_range,
)
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError
from ptlab.core.machine.layout import (
    _PRESENT,
    _WRITE,
    CPU_STATE,
    CPU_WAITING,
    ST_SLEEP,
    STOP,
    is_migration_entry,
    pte_mk,
)
from ptlab.core.machine.mm import VMA_COLLAPSE, VMA_OTHER

sys.path.insert(0, str(Path(__file__).parent))
from _stepper import Stepper  # noqa: E402

ORDER = 4
NR = 1 << ORDER
HOLE = 3  # the page of the range that is a hole when the collapse starts


def _collapse(st: Stepper, k: Any) -> Any:
    return st.start(k, lambda: collapse_range(k, strategies.get(st.config.strategy, k.bugs), 0, ORDER))


def _pte(st: Stepper, vpn: int) -> int:
    m = st.m
    return m.ptep_get(m.pmdp_get(vpn >> 9) >> 12, vpn & 511)


def _wait_sleeping_on(st: Stepper, cpu: Any, lock_id: int) -> None:
    """Poll (no deadline of its own: the stepper's watchdog ends a stuck test) until ``cpu``
    sleeps on the lock ``lock_id`` (rwsem/VMA lock id, or 100000 + pfn for a folio lock)."""
    base, ctl = st.m.L.cpu(cpu.id), st.m.ctl
    while not (ctl.load32(base + CPU_STATE) == ST_SLEEP and ctl.load32(base + CPU_WAITING) == lock_id):
        assert not ctl.load32(STOP), f"CPU {cpu.id} never slept on lock {lock_id}"
        time.sleep(0.001)


def _clean(st: Stepper) -> None:
    assert st.violations() == []
    assert check_machine(st.m) == []


# ------------------------------------------------------------------------------ item 2: holes
def test_holes_open_fills_the_hole_and_is_flagged():
    """Today's code (kept as the bug migration-holes-open): a fault fills a hole while the
    collapse copies, the install keeps the fault's page, and the result is SCAN_SUCCEED — with
    the new folio mapped in 15 of 16 entries.  collapse_range() flags that as partial_collapse."""
    with Stepper(strategy="migration-entry", order=ORDER, inject_bugs=("migration-holes-open",), unsafe=True) as st:
        a, k = st.cpu(0, "app"), st.cpu(1, "khugepaged")
        o = Oracle()
        st.run(a, lambda: zap_range(a, HOLE, 1))
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        assert _pte(st, HOLE) == 0  # the hole is open while the collapse is parked
        assert st.run(a, lambda: access_store(a, o, HOLE))  # fills it without waiting
        fault_pfn = _pte(st, HOLE) >> 12
        st.resume(k)
        result, _ = st.join(job)
        assert result == "SCAN_SUCCEED"
        assert _pte(st, HOLE) >> 12 == fault_pfn  # the fault's page stayed
        target = _pte(st, 0) >> 12
        assert st.m.folio_mapcount(target) == NR - 1
        assert [v["kind"] for v in st.violations()] == ["partial_collapse"]


def test_holes_mark_faulter_sleeps_then_maps_the_new_folio():
    with Stepper(strategy="migration-entry", order=ORDER, holes="mark") as st:
        a, k = st.cpu(0, "app"), st.cpu(1, "khugepaged")
        o = Oracle()
        st.run(a, lambda: zap_range(a, HOLE, 1))
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        marker = _pte(st, HOLE)
        assert is_migration_entry(marker)  # a hole marker: a migration entry to the new folio
        target = (marker >> 12) - HOLE
        assert st.m.folio_head(target) == target and st.m.folio_locks.folio_test_locked(target)
        store = st.start(a, lambda: access_store(a, o, HOLE))
        _wait_sleeping_on(st, a, 100_000 + target)  # migration_entry_wait() on the new folio
        assert not store.done.is_set()
        st.resume(k)
        assert st.join(job)[0] == "SCAN_SUCCEED"
        assert st.join(store) is True
        pte = _pte(st, HOLE)
        assert pte & _PRESENT and pte >> 12 == target + HOLE  # the fault mapped the new folio
        assert st.m.frames.load64((target + HOLE) * st.m.page_size + a.id * 8) == o.mine[HOLE][0]
        assert a.sleep_ns > 0 and a.spin_ns == 0
        assert st.m.folio_mapcount(target) == NR
        _clean(st)


def test_holes_backoff_keeps_the_faults_page():
    with Stepper(strategy="migration-entry", order=ORDER, holes="backoff") as st:
        a, k = st.cpu(0, "app"), st.cpu(1, "khugepaged")
        o = Oracle()
        st.run(a, lambda: zap_range(a, HOLE, 1))
        before = st.m.ptes_range(st.m.pmdp_get(0) >> 12, 0, NR)
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        assert _pte(st, HOLE) == 0
        assert st.run(a, lambda: access_store(a, o, HOLE))  # the hole is open: no wait
        fault_pte = _pte(st, HOLE)
        st.resume(k)
        assert st.join(job)[0] == "SCAN_PAGE_FILLED"
        after = st.m.ptes_range(st.m.pmdp_get(0) >> 12, 0, NR)
        expect = before.copy()
        expect[HOLE] = fault_pte
        assert (after == expect).all()  # every other entry back to its old folio
        assert st.m.frames.load64((fault_pte >> 12) * st.m.page_size + a.id * 8) == o.mine[HOLE][0]
        assert st.run(a, lambda: access_store(a, o, HOLE))  # its own word is still there
        _clean(st)


@pytest.mark.parametrize("holes", ["mark", "backoff"])
def test_zapped_entries_stay_zapped(holes):
    """MADV_DONTNEED of migration entries during the copy: those entries stay none after the
    install (never resurrected) and the collapse says SCAN_PTE_ZAPPED; with the whole range
    zapped, nothing is mapped and it says SCAN_RANGE_ZAPPED (the new folio is freed)."""
    with Stepper(strategy="migration-entry", order=ORDER, holes=holes) as st:
        a, k = st.cpu(0, "app"), st.cpu(1, "khugepaged")
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        st.run(a, lambda: zap_range(a, 5, 2))
        st.resume(k)
        assert st.join(job)[0] == "SCAN_PTE_ZAPPED"
        ptes = [_pte(st, v) for v in range(NR)]
        assert ptes[5] == ptes[6] == 0
        target = ptes[0] >> 12
        assert all(ptes[v] >> 12 == target + v for v in range(NR) if v not in (5, 6))
        assert st.m.folio_mapcount(target) == NR - 2
        _clean(st)

        free = st.m.nr_free()
        st.park_at(k, "collapse_mid_copy")
        job = st.start(k, lambda: collapse_range(k, strategies.get("migration-entry"), NR, ORDER))
        st.wait_parked(k, job=job)
        st.run(a, lambda: zap_range(a, NR, NR))
        st.resume(k)
        assert st.join(job)[0] == "SCAN_RANGE_ZAPPED"
        assert all(_pte(st, v) == 0 for v in range(NR, 2 * NR))
        assert st.m.nr_free() == free + NR  # the old pages are freed, the new folio too
        _clean(st)


@pytest.mark.parametrize("strategy,holes", [("ptl-hold", "mark"), ("migration-entry", "mark"), ("migration-entry", "backoff")])
def test_success_maps_the_whole_range(strategy, holes):
    with Stepper(strategy=strategy, order=ORDER, holes=holes) as st:
        a, k = st.cpu(0, "app"), st.cpu(1, "khugepaged")
        st.run(a, lambda: zap_range(a, HOLE, 2))
        assert st.join(_collapse(st, k))[0] == "SCAN_SUCCEED"
        target = _pte(st, 0) >> 12
        assert [_pte(st, v) >> 12 for v in range(NR)] == [target + v for v in range(NR)]
        _clean(st)


# ------------------------------------------------------------------------------ item 3: VMA stability
@pytest.mark.parametrize("stability", ["mmap-lock", "vma-lock"])
@pytest.mark.parametrize("strategy", ["ptl-hold", "migration-entry"])
def test_mmap_during_a_parked_copy(strategy, stability):
    """A collapse parked halfway through its copy: with the per-VMA lock an mmap() of another
    VMA completes; with mmap_lock held for read it sleeps on mmap_lock until the collapse ends."""
    with Stepper(strategy=strategy, order=ORDER, vma_stability=stability, cpus={"app": 1, "mmap": 1, "khugepaged": 1}) as st:
        mm, k = st.cpu(1, "mmap"), st.cpu(2, "khugepaged")
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        mapping = st.start(mm, lambda: do_mmap(mm, FIRST_CHURN_SLOT))
        if stability == "vma-lock":
            st.join(mapping)
            assert not job.done.is_set()  # the collapse is still parked mid-copy
            assert st.m.vma_range(FIRST_CHURN_SLOT)[2] & 1
        else:
            _wait_sleeping_on(st, mm, st.m.mmap_lock.lock_id)
            assert not mapping.done.is_set()
        st.resume(k)
        assert st.join(job)[0] == "SCAN_SUCCEED"
        st.join(mapping)
        _clean(st)


def test_pmd_clear_mmap_waits():
    with Stepper(strategy="pmd-clear", order=ORDER, cpus={"app": 1, "mmap": 1, "khugepaged": 1}) as st:
        mm, k = st.cpu(1, "mmap"), st.cpu(2, "khugepaged")
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        mapping = st.start(mm, lambda: do_mmap(mm, FIRST_CHURN_SLOT))
        _wait_sleeping_on(st, mm, st.m.mmap_lock.lock_id)
        st.resume(k)
        assert st.join(job)[0] == "SCAN_SUCCEED"
        st.join(mapping)
        _clean(st)


def test_vma_lock_falls_back_to_mmap_lock_when_the_vma_is_write_locked():
    """uffd_lock_vma()'s fallback: the collapsing VMA is write-locked by an mmap writer, so
    lock_vma_under_rcu() fails; the collapse then waits on mmap_lock, read-locks the VMA under it
    and drops mmap_lock again before its copy."""
    with Stepper(strategy="migration-entry", order=ORDER, vma_stability="vma-lock", cpus={"app": 1, "mmap": 1, "khugepaged": 1}) as st:
        mm, k = st.cpu(1, "mmap"), st.cpu(2, "khugepaged")
        m = st.m

        def write_lock() -> None:
            m.mmap_lock.down_write(mm)
            m.vma_locks[VMA_COLLAPSE].vma_start_write(mm, mm_lock_seq(mm))

        st.run(mm, write_lock)
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        _wait_sleeping_on(st, k, m.mmap_lock.lock_id)
        st.run(mm, lambda: mmap_write_unlock(mm))
        st.wait_parked(k, job=job)
        assert m.mmap_lock.statistics()["readers"] == []  # mmap_lock is not held across the copy
        st.run(mm, lambda: do_mmap(mm, FIRST_CHURN_SLOT))
        st.resume(k)
        assert st.join(job)[0] == "SCAN_SUCCEED"
        _clean(st)


def test_vma_stability_is_refused_for_pmd_clear_and_without_vma_locks(capsys, tmp_path):
    with pytest.raises(ConfigError, match="pmd-clear always takes mmap_lock for write"):
        RunConfig(strategy="pmd-clear", vma_stability="vma-lock")
    with pytest.raises(ConfigError, match="needs per-VMA locks"):
        RunConfig(strategy="ptl-hold", vma_stability="vma-lock", vma_locks=False)
    with pytest.raises(ConfigError, match="migration-entry only"):
        RunConfig(strategy="ptl-hold", holes="backoff")
    for argv, needle in (
        (["run", "-s", "pmd-clear", "--vma-stability", "vma-lock"], "pmd-clear always takes mmap_lock"),
        (["run", "-s", "ptl-hold", "--holes", "backoff"], "migration-entry only"),
        (["run", "--holes", "nope"], "nope"),
    ):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------ MADV_DONTNEED's locks
SECOND_PMD = 512  # a page of the collapsing VMA under another PTE table than the collapsing range


@pytest.mark.parametrize("strategy", ["ptl-hold", "migration-entry"])
@pytest.mark.parametrize("how", ["vma-lock", "no-vma-locks", "crosses-vma-end"])
def test_zap_beside_a_mmap_lock_collapse_takes_only_the_vma_lock(strategy, how):
    """MADV_DONTNEED under the per-VMA lock (do_madvise(): MADVISE_VMA_READ_LOCK,
    try_vma_read_lock()): a collapse holding mmap_lock for read is parked mid-copy and an mmap()
    is queued behind it for write.  A zap of the collapsing VMA completes meanwhile — it holds
    only the VMA's read lock, which neither excludes.  Where the VMA lock cannot serve
    (``--no-vma-locks``, or a range that ends beyond the VMA: is_vma_lock_sufficient()), it falls
    back to mmap_read_lock() and sleeps behind the queued writer, as every zap did before."""
    with Stepper(strategy=strategy, order=ORDER, vma_stability="mmap-lock", vma_locks=how != "no-vma-locks", nr_pmds=2,
                 cpus={"app": 1, "mmap": 1, "khugepaged": 1}) as st:
        a, mm, k = st.cpu(0, "app"), st.cpu(1, "mmap"), st.cpu(2, "khugepaged")
        m = st.m
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        mapping = st.start(mm, lambda: do_mmap(mm, FIRST_CHURN_SLOT))
        _wait_sleeping_on(st, mm, m.mmap_lock.lock_id)  # a writer queued behind the collapse
        end = m.vma_range(VMA_COLLAPSE)[1]
        start, nr = (end - 4, 8) if how == "crosses-vma-end" else (SECOND_PMD, 8)
        zap = st.start(a, lambda: zap_range(a, start, nr))
        if how == "vma-lock":
            assert st.join(zap) >= 0
            assert not job.done.is_set() and not mapping.done.is_set()  # both still where they were
            assert m.mmap_lock.statistics()["readers"] == [k.id]  # the zap never took mmap_lock
        else:
            _wait_sleeping_on(st, a, m.mmap_lock.lock_id)
        st.resume(k)
        assert st.join(job)[0] == "SCAN_SUCCEED"
        st.join(mapping)
        st.join(zap)
        _clean(st)


@pytest.mark.parametrize("vma", ["same", "other"])
def test_pmd_clear_excludes_a_zap_of_the_collapsing_vma_only(vma):
    """pmd-clear holds mmap_lock for write and vma_start_write()s the collapsing VMA: a zap of
    that VMA cannot read-lock it, falls back to mmap_read_lock() and sleeps until the collapse
    is over; a zap of another VMA read-locks its own VMA and completes meanwhile (the kernel's
    other-VMA zaps never sleep in a collapse)."""
    with Stepper(strategy="pmd-clear", order=ORDER, nr_pmds=2, cpus={"app": 1, "khugepaged": 1}) as st:
        a, k = st.cpu(0, "app"), st.cpu(1, "khugepaged")
        m = st.m
        st.park_at(k, "collapse_mid_copy")
        job = _collapse(st, k)
        st.wait_parked(k, job=job)
        start = SECOND_PMD if vma == "same" else m.vma_range(VMA_OTHER)[0]
        zap = st.start(a, lambda: zap_range(a, start, 8))
        if vma == "same":
            _wait_sleeping_on(st, a, m.mmap_lock.lock_id)
        else:
            st.join(zap)
            assert not job.done.is_set()
        st.resume(k)
        assert st.join(job)[0] == "SCAN_SUCCEED"
        st.join(zap)
        _clean(st)


# ------------------------------------------------------------------------------ item 8: zero page
def test_read_fault_maps_the_zero_page_and_a_write_copies_it():
    with Stepper(strategy="migration-entry", order=ORDER, cpus={"app": 2, "khugepaged": 1}) as st:
        a, b = st.cpu(0, "app"), st.cpu(1, "app")
        oa, ob = Oracle(), Oracle()
        m = st.m
        st.run(a, lambda: zap_range(a, 7, 1))
        free = m.nr_free()
        assert st.run(a, lambda: access_load(a, oa, 7, b.id)) == 0
        assert st.run(b, lambda: access_load(b, ob, 7, a.id)) == 0  # b caches the zero page too
        pte = _pte(st, 7)
        assert pte >> 12 == m.zero_pfn and pte & _PRESENT and not pte & _WRITE
        assert m.nr_free() == free  # no folio allocated
        assert m.folio_head(m.zero_pfn) == -1 and m.folio_ref_count(m.zero_pfn) == 0
        assert b.tlb[7] >> 1 == m.zero_pfn
        _clean(st)
        assert st.run(a, lambda: access_store(a, oa, 7))  # do_wp_page -> wp_page_copy
        pte = _pte(st, 7)
        assert pte >> 12 != m.zero_pfn and pte & _WRITE
        assert m.nr_free() == free - 1
        # ptep_clear_flush(): b's read-only zero-page translation is gone; it sees a's write
        assert st.run(b, lambda: access_load(b, ob, 7, a.id)) == oa.mine[7][0]
        _clean(st)


def test_zapping_a_zero_page_pte_flushes_it():
    """zap_pte_range() flushes every present PTE it clears, the zero page's too (no folio to
    put, but a CPU may cache the read-only translation): after a zap and a write fault, a CPU
    that had read the zero page sees the new page."""
    with Stepper(strategy="migration-entry", order=ORDER, cpus={"app": 2, "khugepaged": 1}) as st:
        a, b = st.cpu(0, "app"), st.cpu(1, "app")
        oa, ob = Oracle(), Oracle()
        st.run(a, lambda: zap_range(a, 7, 1))
        assert st.run(b, lambda: access_load(b, ob, 7, a.id)) == 0
        assert b.tlb[7] >> 1 == st.m.zero_pfn
        free = st.m.nr_free()
        assert st.run(a, lambda: zap_range(a, 7, 1)) == 0  # no folio freed ...
        assert st.m.nr_free() == free
        assert 7 not in b.tlb  # ... but the translation is gone
        assert st.run(a, lambda: access_store(a, oa, 7))
        assert st.run(b, lambda: access_load(b, ob, 7, a.id)) == oa.mine[7][0]
        _clean(st)


def test_zero_page_checks_fire():
    """The oracle's zero-page checks, each made to fail: a write into the zero page, and a
    writable PTE of it."""
    with Stepper(strategy="pmd-clear", order=ORDER) as st:
        a = st.cpu(0, "app")
        m = st.m
        st.run(a, lambda: zap_range(a, 7, 1))
        st.run(a, lambda: access_load(a, Oracle(), 7, 1))
        _clean(st)
        m.frames.store64(m.zero_pfn * m.page_size + 8, 1)
        assert [v["kind"] for v in check_machine(m)] == ["zero_page_written"]
        m.frames.store64(m.zero_pfn * m.page_size + 8, 0)
        t = m.pmdp_get(0) >> 12
        m.set_pte_at(t, 7, pte_mk(m.zero_pfn, write=True))
        assert [v["kind"] for v in check_machine(m)] == ["zero_page_writable"]
        m.set_pte_at(t, 7, 0)


@pytest.mark.parametrize("max_none,expect", [(0, "SCAN_EXCEED_NONE_PTE"), (511, "SCAN_SUCCEED")])
def test_scan_counts_zero_page_ptes_as_none(max_none, expect):
    with Stepper(strategy="ptl-hold", order=ORDER, max_ptes_none=max_none) as st:
        a, k = st.cpu(0, "app"), st.cpu(1, "khugepaged")
        st.run(a, lambda: zap_range(a, 2, 1))
        st.run(a, lambda: access_load(a, Oracle(), 2, 1))
        assert _pte(st, 2) >> 12 == st.m.zero_pfn
        assert st.run(k, lambda: scan_pmd(k, 0, ORDER)) == expect


@pytest.mark.parametrize("strategy,holes", [("pmd-clear", "mark"), ("ptl-hold", "mark"), ("migration-entry", "mark"), ("migration-entry", "backoff")])
def test_collapse_over_zero_page_ptes(strategy, holes):
    """Zero-page PTEs are holes to the collapse: zero-filled in the new folio, and a CPU that
    cached the read-only zero-page translation sees the writes made after the collapse."""
    with Stepper(strategy=strategy, order=ORDER, holes=holes, cpus={"app": 2, "khugepaged": 1}) as st:
        a, b, k = st.cpu(0, "app"), st.cpu(1, "app"), st.cpu(2, "khugepaged")
        oa, ob = Oracle(), Oracle()
        m = st.m
        st.run(a, lambda: zap_range(a, 2, 2))
        for v in (2, 3):
            assert st.run(b, lambda v=v: access_load(b, ob, v, a.id)) == 0
        free = m.nr_free()
        assert st.join(_collapse(st, k))[0] == "SCAN_SUCCEED"
        target = _pte(st, 0) >> 12
        assert [_pte(st, v) >> 12 for v in range(NR)] == [target + v for v in range(NR)]
        assert all(_pte(st, v) & _WRITE for v in (2, 3))
        assert m.nr_free() == free - NR + (NR - 2)  # the new folio in, the 14 old pages out
        assert m.frames.find_not64((target + 2) * m.page_size, 2 * m.words_per_page, 0) == -1  # zero-filled
        assert st.run(a, lambda: access_store(a, oa, 2))
        assert st.run(b, lambda: access_load(b, ob, 2, a.id)) == oa.mine[2][0]
        _clean(st)
