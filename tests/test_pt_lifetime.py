"""Page-table lifetime, and 2ba99c5e0881 replayed as a forced interleaving.

An order-9 pmd-clear collapse detaches the PTE table and deposits it behind the new huge PMD;
MADV_DONTNEED of the whole 2 MiB (zap_huge_pmd) withdraws it and pte_free()s it at once, with no
IPI and no RCU; a fault then gets the same table back from the allocator.  A GUP-fast walk that
read the PMD before the collapse and still has IRQs off is then reading a freed (and reused)
table — unless something waited for it: the collapse's flush IPI (x86: the IRQs-off walk delays
the ack) or tlb_remove_table_sync_one() (needed where the flush is a broadcast TLBI).
"""

from __future__ import annotations

import pytest
from _stepper import Stepper
from ptlab.core.kernel import strategies
from ptlab.core.kernel.khugepaged import collapse_range
from ptlab.core.kernel.oracle import check_machine
from ptlab.core.kernel.paths import Oracle, access_store, gup_fast, zap_range

VPN = 5
CPUS = {"gup-fast": 1, "khugepaged": 1, "app": 1}


def _replay(flush: str, bugs: tuple[str, ...]) -> tuple[bool, list[str], str]:
    """GUP-fast reads PMD 0 and stops; khugepaged collapses PMD 0 to a THP; the app zaps the
    THP (freeing the deposited table) and faults page VPN back (reusing it); GUP-fast goes on.
    Returns (whether the collapse had to wait for the walk, violation kinds, GUP's outcome)."""
    with Stepper(strategy="pmd-clear", order=9, flush=flush, cpus=CPUS, inject_bugs=bugs, unsafe=bool(bugs)) as st:
        g, k, a = st.cpu(0, "gup-fast"), st.cpu(1, "khugepaged"), st.cpu(2, "app")
        st.park_at(g, "gup_fast_after_pmd_read")
        walk = st.start(g, lambda: gup_fast(g, VPN))
        st.wait_parked(g, job=walk)
        collapse = st.start(k, lambda: collapse_range(k, strategies.get("pmd-clear", k.bugs), 0, 9))
        waited = st.blocked(collapse, settle_s=0.3)
        if waited:  # the IPI (flush or sync) cannot be acked while the walk has IRQs off
            st.resume(g)
            st.join(walk)
            assert st.join(collapse)[0] == "SCAN_SUCCEED"
        else:
            assert st.join(collapse)[0] == "SCAN_SUCCEED"
        o = Oracle()
        assert st.run(a, lambda: zap_range(a, 0, 512)) == 512  # zap_huge_pmd: pte_free(deposited)
        assert st.run(a, lambda: access_store(a, o, VPN))  # a fault gets the freed table back
        st.resume(g)
        head, _ = st.join(walk)
        if head >= 0:
            st.run(g, lambda: g.m.unpin_folio(g, head))
        kinds = [v["kind"] for v in st.violations()] + [v["kind"] for v in check_machine(st.m)]
        return waited, kinds, "pinned" if head >= 0 else "fallback"


@pytest.mark.parametrize("bugs", [("no-sync-ipi",), ("gup-fast-no-pmd-recheck", "no-sync-ipi")])
def test_2ba99c5e0881_no_sync_ipi_on_broadcast_tlbi_walks_a_freed_table(bugs):
    waited, kinds, _ = _replay("broadcast", bugs)
    assert not waited, "nothing waits for an IRQs-off walk on a broadcast-TLBI machine"
    assert "pt_use_after_free" in kinds


def test_2ba99c5e0881_fixed_sync_ipi_waits_for_the_walk():
    waited, kinds, _ = _replay("broadcast", ())
    assert waited, "tlb_remove_table_sync_one() must wait for the IRQs-off walk"
    assert kinds == []


@pytest.mark.parametrize("bugs", [(), ("no-sync-ipi",)])
def test_on_x86_the_flush_ipi_already_waits_for_the_walk(bugs):
    waited, kinds, _ = _replay("ipi", bugs)
    assert waited
    assert kinds == []


def test_freed_tables_are_poisoned_and_accounted():
    with Stepper(strategy="pmd-clear", order=9) as st:
        a = st.cpu(0, "app")
        m = st.m
        assert check_machine(m) == []
        t = m.pmdp_get(0) >> 12
        # freeing a table that a PMD still reaches is a page-table use after free
        st.run(a, lambda: m.pte_free(a, t))
        assert "pt_use_after_free" in {v["kind"] for v in check_machine(m)}
        # a write into a free table is seen when it is handed out again
        m.set_pte_at(t, 3, 0)
        m.set_pmd(0, 0)
        got = st.run(a, lambda: m.alloc_pte_table(a))
        assert got == t
        assert "pt_use_after_free" in {v["kind"] for v in a.violations}
