"""Lazy TLB and kernel threads, as forced interleavings (tests/_stepper.py).

- khugepaged is a kernel thread: never in mm_cpumask, never a flush target, so a flush never
  waits for it, however long it runs without an interrupt point.
- A CPU that sleeps goes lazy (x86): flushers skip it but its TLB keeps its entries; when it
  runs the mm again it compares its flush generation with the mm's and flushes only if behind.
  So a collapse that forgets its flush leaves a stale translation alive across the sleep, and
  the oracle sees the write that goes through it.
"""

from __future__ import annotations

import threading

import pytest
from _stepper import Stepper
from ptlab.core.kernel import strategies
from ptlab.core.kernel.khugepaged import collapse_range
from ptlab.core.kernel.paths import Oracle, access_store
from ptlab.core.machine.layout import CPU_IPI_NGEN, MM_CPUMASK, MM_TLB_GEN

VPN = 5


def test_khugepaged_is_not_in_mm_cpumask_and_never_delays_a_flush():
    with Stepper(strategy="ptl-hold", order=4) as st:
        a = st.cpu(0, "app")
        k = st.cpu(1, "khugepaged")
        mask = st.m.ctl.load64(MM_CPUMASK)
        assert mask >> a.id & 1 and not mask >> k.id & 1
        # khugepaged in a long loop with no interrupt point (isolate, rmap, release, scan)
        busy, release = threading.Event(), threading.Event()

        def long_loop() -> None:
            busy.set()
            release.wait(30)

        job = st.start(k, long_loop)
        assert busy.wait(10)
        k.ctl.store32(k.ipi_flag_off, 0)
        st.run(a, lambda: a.flush_tlb_range(0, 512))  # completes while khugepaged is busy
        assert not job.done.is_set()
        assert k.stats["ipis_serviced"] == 0
        release.set()
        st.join(job)
        # its own flushes reach the app CPU but do no local flush
        st.run(a, lambda: a.tlb_fill(VPN, 7, True))
        st.run(k, lambda: k.flush_tlb_range(VPN, VPN + 1))
        assert VPN not in a.tlb


def _sleep_through_collapse(bugs: tuple[str, ...]) -> tuple[str, list[str], bool]:
    """CPU 0 writes page VPN (TLB filled), sleeps; khugepaged collapses its range; CPU 0 wakes
    and writes again.  Returns the collapse result, the violation kinds, and whether the stale
    entry was still in CPU 0's TLB when it woke."""
    with Stepper(strategy="ptl-hold", order=4, inject_bugs=bugs, unsafe=bool(bugs)) as st:
        a = st.cpu(0, "app")
        k = st.cpu(1, "khugepaged")
        o = Oracle()
        st.run(a, lambda: access_store(a, o, VPN))
        old = a.tlb[VPN]
        st.run(a, a.leave_cpumask)  # about to sleep: lazy, entries kept
        assert a.tlb.get(VPN) == old
        result, _ = st.run(k, lambda: collapse_range(k, strategies.get("ptl-hold", k.bugs), 0, 4))
        st.run(a, a.join_cpumask)  # switch_mm back: catch up if behind
        kept = a.tlb.get(VPN) == old
        st.run(a, lambda: access_store(a, o, VPN))
        return result, [v["kind"] for v in st.violations()], kept


def test_lazy_cpu_catches_up_after_a_flush_it_missed():
    result, kinds, kept = _sleep_through_collapse(())
    assert result == "SCAN_SUCCEED"
    assert not kept, "the flush generation moved while the CPU was lazy: it must flush on return"
    assert kinds == []


def test_missing_flush_survives_a_sleep_and_is_caught():
    result, kinds, kept = _sleep_through_collapse(("ptl-hold-no-flush",))
    assert result == "SCAN_SUCCEED"
    assert kept, "no flush happened: a lazy CPU keeps its entries"
    assert kinds, "the write through the stale translation went unseen"


@pytest.mark.parametrize("merged", [False, True])
def test_flush_generation_rule_partial_or_full(merged):
    """flush_tlb_func(): one request one generation ahead is a partial flush; requests merged
    in the mailbox (two flushers while IRQs were off) are a full flush; both end at the mm's
    generation."""
    with Stepper(strategy="ptl-hold", order=4, populate=False, cpus={"app": 3}) as st:
        a, b, c = st.cpu(0, "app"), st.cpu(1, "app"), st.cpu(2, "app")
        irqs_off, go = threading.Event(), threading.Event()

        def section() -> None:
            a.tlb_fill(1, 11, True)
            a.tlb_fill(100, 12, True)
            a.local_irq_disable()
            irqs_off.set()
            go.wait(30)
            a.local_irq_enable()  # takes whatever was posted meanwhile, in one go

        job = st.start(a, section)
        assert irqs_off.wait(10)
        flushes = [st.start(b, lambda: b.flush_tlb_range(1, 2))]
        if merged:
            flushes.append(st.start(c, lambda: c.flush_tlb_range(3, 4)))
        st.wait_for(lambda: a.ctl.load64(a.base + CPU_IPI_NGEN) == len(flushes), "the requests posted")
        go.set()
        st.join(job)
        for f in flushes:
            st.join(f)
        assert 1 not in a.tlb
        assert (100 in a.tlb) is (not merged)
        assert a.local_gen == a.ctl.load64(MM_TLB_GEN)
