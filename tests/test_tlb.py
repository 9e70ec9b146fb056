"""TLB shootdown across real CPU processes: an IRQ-off section (GUP-fast) holds up a flush in
``ipi`` mode and not in ``broadcast`` mode; a sleeping CPU never holds one up; a CPU spinning on
a lock still takes the IPI; a CPU that dies with IRQs off makes the flush fail with a clear
error instead of hanging.

Each test records the order of events ("irq_off 1", "flush 0", ...) and compares it with the
sequence the kernel's rules allow.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from _procs import Lab, busy_until, flag, log
from ptlab.core.machine._prims import now_ns
from ptlab.core.machine.errors import OwnerDied
from ptlab.core.machine.layout import MM_CPUMASK

VPN, PFN = 5, 7
HOLD_S = 0.3
STILL_CACHED, WAKE, IN_MASK_AFTER_WAKE = 0, 1, 2


def _irq_off_section(m, cpu, aux):
    """GUP-fast: a TLB entry, then an IRQs-off walk of HOLD_S during which a flush arrives."""
    cpu.tlb_fill(VPN, PFN, True)
    cpu.local_irq_disable()
    log(aux, cpu.id, "irq_off")
    busy_until(now_ns() + int(HOLD_S * 1e9), cpu.interrupt_point)  # interrupt points do nothing now
    log(aux, cpu.id, "irq_on")
    cpu.local_irq_enable()  # takes the pending IPI (ipi mode)
    cpu.check_broadcast()  # the next access applies published invalidations (broadcast mode)
    aux.store64(flag(STILL_CACHED), 1 + (VPN in cpu.tlb))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["ipi", "broadcast"])
def test_flush_waits_for_an_irq_off_section_only_in_ipi_mode(mode):
    with Lab(nr_cpus=2, flush=mode) as lab:
        me = lab.cpu(0)
        lab.start(_irq_off_section, 1)
        lab.wait(lambda: lab.log() == ["irq_off 1"], "the IRQs-off section")
        log(lab.aux, 0, "flush")
        me.flush_tlb_range(0, 512)
        log(lab.aux, 0, "flushed")
        lab.join()
        events = lab.log()
        assert lab.aux.load64(flag(STILL_CACHED)) == 1, "the flushed entry survived in the other CPU's TLB"
    if mode == "ipi":
        # the ack waits for local_irq_enable(): the flush completes after the section
        assert events == ["irq_off 1", "flush 0", "irq_on 1", "flushed 0"]
    else:
        # TLBI broadcast needs no cooperation: done while the other CPU still has IRQs off
        assert events == ["irq_off 1", "flush 0", "flushed 0", "irq_on 1"]


def _sleeper(m, cpu, aux):
    cpu.tlb_fill(VPN, PFN, True)
    log(aux, cpu.id, "sleeping")
    word = flag(WAKE)
    while not aux.load32(word):
        cpu.futex_sleep(aux, word, 0, 10_000_000_000)  # leaves mm_cpumask, drops its TLB
    log(aux, cpu.id, "woke")
    aux.store64(flag(STILL_CACHED), 1 + (VPN in cpu.tlb))
    aux.store64(flag(IN_MASK_AFTER_WAKE), 1 + bool(m.ctl.load64(MM_CPUMASK) >> cpu.id & 1))


@pytest.mark.timeout(60)
def test_a_sleeping_cpu_does_not_block_a_flush():
    with Lab(nr_cpus=2, flush="ipi") as lab:
        me = lab.cpu(0)
        lab.start(_sleeper, 1)
        lab.wait(lambda: lab.log() == ["sleeping 1"] and not lab.in_cpumask(1), "the CPU to sleep")
        log(lab.aux, 0, "flush")
        me.flush_tlb_range(0, 512)
        log(lab.aux, 0, "flushed")
        lab.aux.store32(flag(WAKE), 1)
        lab.aux.futex_wake(flag(WAKE), 1)
        lab.join()
        assert lab.log() == ["sleeping 1", "flush 0", "flushed 0", "woke 1"]
        assert lab.aux.load64(flag(STILL_CACHED)) == 1, "a sleeper kept its TLB"
        assert lab.aux.load64(flag(IN_MASK_AFTER_WAKE)) == 2, "the CPU did not rejoin mm_cpumask on wake"


def _spin_on_ptl(m, cpu, aux):
    cpu.tlb_fill(VPN, PFN, True)
    log(aux, cpu.id, "lock")
    m.ptl(0).lock(cpu)  # spins: the holder flushes meanwhile
    log(aux, cpu.id, "locked")
    aux.store64(flag(STILL_CACHED), 1 + (VPN in cpu.tlb))
    m.ptl(0).unlock(cpu)


@pytest.mark.timeout(60)
def test_a_cpu_spinning_on_a_lock_takes_the_flush_ipi():
    """The PTL holder flushes while another CPU spins on that PTL: interrupts are on while
    spinning, so the IPI is taken and there is no deadlock (the watchdog would raise Stopped)."""
    with Lab(nr_cpus=2, flush="ipi", limit_s=10) as lab:
        me = lab.cpu(0)
        ptl = lab.m.ptl(0)
        ptl.lock(me)
        lab.start(_spin_on_ptl, 1)
        lab.wait(lambda: lab.log() == ["lock 1"], "the other CPU to spin")
        time.sleep(0.02)
        me.flush_tlb_range(0, 512)
        log(lab.aux, 0, "flushed")
        ptl.unlock(me)
        lab.join()
        assert lab.log() == ["lock 1", "flushed 0", "locked 1"]
        assert lab.aux.load64(flag(STILL_CACHED)) == 1


def _irq_off_forever(m, cpu, aux):
    cpu.local_irq_disable()
    log(aux, cpu.id, "irq_off")
    time.sleep(120)  # killed long before


@pytest.mark.timeout(60)
def test_a_flush_to_a_dead_cpu_raises_naming_it():
    with Lab(nr_cpus=2, flush="ipi") as lab:
        me = lab.cpu(0)
        child = lab.start(_irq_off_forever, 1)
        lab.wait(lambda: lab.log() == ["irq_off 1"], "the IRQs-off CPU")
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        # the flush notices the death (OwnerDied) instead of waiting for the test's STOP watchdog
        with pytest.raises(OwnerDied, match=r"CPU 1 died before acking a TLB-flush IPI from CPU 0"):
            me.flush_tlb_range(0, 512)
