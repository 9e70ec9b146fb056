"""Every mutant killed deterministically: one forced interleaving per safety step.

For each non-equivalent mutant of core/machine/mutants.py a scenario runs simulated CPUs as threads of
this process over one real machine (tests/_stepper.py), parks them at named points and lets
the others run, so the interleaving that the deleted step exists for happens every time — no
timing luck, no wall-clock limit.  The same scenario runs twice:

  * with the mutant injected: the oracle must report one of the mutant's expected kinds;
  * without it: the oracle must report nothing (the variant that shows the check is not
    simply always firing, and that the step really is what keeps the scenario correct).

The registry itself is held to the code: every ``"mutant-…"`` name used in the kernel paths is
registered and every registered non-equivalent mutant is applied somewhere, has a scenario
here and a real-backend cell; mutants are refused without --unsafe and are not offered by
``ptlab run``/``ptlab strategies``, only by ``ptlab check --mutants --list``.

A wake-up mutant is killed only if the sleeper is really inside futex_wait() when the release
skips its wake (before that, the changed futex word sends it straight back): the scenarios
wait for that state by reading the sleeping thread's /proc/self/task/TID/syscall (futex on the
lock's word), which is a state, not a delay.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ptlab.core.kernel import strategies
from ptlab.core.kernel.khugepaged import collapse_range
from ptlab.core.kernel.oracle import check_machine
from ptlab.core.kernel.paths import (
    DMA_WORD,
    Oracle,
    access_store,
    gup_fast,
    gup_slow,
    translate,
    zap_range,
)
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError, Stopped
from ptlab.core.machine.locks import check_locks_released
from ptlab.core.machine.mutants import MUTANTS, mutant_names

sys.path.insert(0, str(Path(__file__).parent))
from _stepper import Job, Stepper  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGE = 5  # the page every scenario races on (in the collapsed range 0..15)
OTHER = 6
SYS_FUTEX = 202  # x86_64


# ------------------------------------------------------------------------------ helpers
class Run:
    """One scenario's machine: the Stepper, the CPUs, an oracle per CPU."""

    def __init__(self, st: Stepper, roles: dict[str, list[Any]]) -> None:
        self.st = st
        self.m = st.m
        self.roles = roles
        self.oracles: dict[int, Oracle] = {}

    def cpu(self, role: str, k: int = 0) -> Any:
        return self.roles[role][k]

    def store(self, cpu: Any, vpn: int = PAGE) -> Job:
        o = self.oracles.setdefault(cpu.id, Oracle())
        return self.st.start(cpu, lambda: access_store(cpu, o, vpn))

    def collapse(self, start: int = 0) -> Job:
        k = self.cpu("khugepaged")
        st = self.st

        def go() -> str:
            result, _ = collapse_range(k, strategies.get(st.config.strategy, k.bugs), start, st.config.order)
            check_locks_released(self.m, k, f"after a collapse ({result})")  # as the role does
            return result

        return st.start(k, go)

    def kinds(self) -> list[str]:
        found = {v["kind"] for v in self.st.violations()} | {v["kind"] for v in check_machine(self.m)}
        return sorted(found)


def scenario(strategy: str, bugs: tuple[str, ...], order: int = 4, flush: str = "ipi", cpus: dict[str, int] | None = None) -> Any:
    """A Stepper with CPUs of every role in ``cpus`` (ids in assign order: app, gup-fast,
    gup-slow, zap, khugepaged), wrapped in a Run; use as a context manager."""
    cpus = cpus or {"app": 2, "khugepaged": 1}

    class _Ctx:
        def __enter__(self) -> Run:
            self.st = Stepper(strategy=strategy, order=order, flush=flush, cpus=cpus, inject_bugs=bugs, unsafe=bool(bugs))
            roles: dict[str, list[Any]] = {}
            i = 0
            for role in ("app", "gup-fast", "gup-slow", "zap", "khugepaged"):
                for _ in range(cpus.get(role, 0)):
                    roles.setdefault(role, []).append(self.st.cpu(i, role))
                    i += 1
            return Run(self.st, roles)

        def __exit__(self, *exc: object) -> None:
            self.st.close()

    return _Ctx()


def parked_or_blocked(st: Stepper, cpu: Any, job: Job, settle_s: float = 0.3) -> bool:
    """True when ``cpu`` reaches its park point, False when the job is still blocked (spinning
    or asleep on a lock) after settle_s — the two outcomes a scenario branches on, each a
    state: a CPU that parks parks at once, one that waits on a lock never gets there."""
    ev = st._parked.setdefault(cpu.id, threading.Event())
    if ev.wait(settle_s):
        return True
    assert not job.done.is_set(), f"CPU {cpu.id} finished ({job.error or job.result!r}) instead of parking or blocking"
    return False


def wait_in_futex(st: Stepper, cpu: Any, region: str, off: int) -> None:
    """Poll until ``cpu``'s thread is inside futex_wait() on word ``off`` of segment ``region``
    (the stepper's watchdog ends a stuck test)."""
    base = st.m.ns[region].view(__import__("numpy").uint8, 0, 1).ctypes.data
    addr = f"{base + off:#x}"
    tid = st._threads[cpu.id].thread.native_id
    path = Path(f"/proc/self/task/{tid}/syscall")
    while True:
        fields = path.read_text().split()
        if fields and fields[0] == str(SYS_FUTEX) and fields[1] == addr:
            return
        assert not st.m.ctl.load32(4), f"CPU {cpu.id} never slept on {region}+{off:#x}"
        time.sleep(0.001)


def dma_and_check(r: Run, g: Any, vpn: int, head: int, pfn: int) -> None:
    """What the GUP role does with a pin (core/kernel/roles.py Gup.step): write through the pin like a
    DMA engine, unpin, then the device's last write must be visible through the page table."""
    m = r.m
    word = DMA_WORD + g.id
    v = vpn << 32 | 0xD0A
    epoch = m.epoch(vpn)
    m.frames.store64(m.page_word_off(pfn, word), v)
    m.unpin_folio(g, head)
    pfn2 = translate(g, vpn, False)
    if pfn2 >= 0:
        seen = m.frames.load64(m.page_word_off(pfn2, word))
        if g.broadcast:
            g.access_end()
        if seen != v and m.epoch(vpn) == epoch:
            g.violation("lost_dma_write", page=vpn, detail=f"DMA write {v:#x} not visible after unpin (found {seen:#x})")


# ------------------------------------------------------------------------------ scenarios
Scenario = Callable[[tuple[str, ...]], list[str]]
SCENARIOS: dict[str, Scenario] = {}


def for_mutants(*names: str) -> Callable[[Scenario], Scenario]:
    def deco(fn: Scenario) -> Scenario:
        for n in names:
            SCENARIOS[n] = fn
        return fn

    return deco


def _strategy_of(bugs: tuple[str, ...], default: str) -> str:
    return MUTANTS[bugs[0]].cell.strategy if bugs and MUTANTS[bugs[0]].cell else default  # type: ignore[union-attr]


def stale_tlb(strategy: str) -> Scenario:
    def run(bugs: tuple[str, ...]) -> list[str]:
        """App A has page PAGE in its TLB; a collapse runs; A stores again.  Without the flush
        the store goes through the stale translation into the freed old frame."""
        with scenario(strategy, bugs) as r:
            a = r.cpu("app")
            r.st.join(r.store(a))
            assert r.st.join(r.collapse()) == "SCAN_SUCCEED"
            r.st.join(r.store(a))
            return r.kinds()

    return run


SCENARIOS["ptl-hold-no-flush"] = stale_tlb("ptl-hold")
SCENARIOS["mutant-migration-no-flush"] = stale_tlb("migration-entry")
SCENARIOS["mutant-pmd-clear-no-flush"] = stale_tlb("pmd-clear")


@for_mutants("mutant-zap-no-flush", "mutant-zap-no-epoch-bump")
def zap_then_store(bugs: tuple[str, ...]) -> list[str]:
    """A stores PAGE (TLB filled), B zaps PAGE's 8 pages, A stores again: without the zap's
    flush A writes the freed frame; without the epoch bump the oracle cannot tell the zap from
    a lost write."""
    with scenario("ptl-hold", bugs) as r:
        a, b = r.cpu("app", 0), r.cpu("app", 1)
        r.st.join(r.store(a))
        assert r.st.run(b, lambda: zap_range(b, 0, 8)) > 0
        r.st.join(r.store(a))
        return r.kinds()


@for_mutants("no-sync-ipi")
def table_freed_under_gup_fast(bugs: tuple[str, ...]) -> list[str]:
    """2ba99c5e0881: GUP-fast reads PMD 0 and stops (IRQs off); pmd-clear collapses PMD 0 to a
    THP; the app zaps the THP (zap_huge_pmd frees the deposited table) and faults PAGE back
    (reusing the table); GUP-fast goes on inside the freed table — unless the sync IPI waited."""
    with scenario("pmd-clear", bugs, order=9, flush="broadcast", cpus={"app": 1, "gup-fast": 1, "khugepaged": 1}) as r:
        st, a, g = r.st, r.cpu("app"), r.cpu("gup-fast")
        st.park_at(g, "gup_fast_after_pmd_read")
        walk = st.start(g, lambda: gup_fast(g, PAGE))
        st.wait_parked(g, job=walk)
        collapse = r.collapse()
        if st.blocked(collapse, settle_s=0.3):  # the sync IPI waits for the IRQs-off walk
            st.resume(g)
            head, _ = st.join(walk)
            if head >= 0:
                st.run(g, lambda: g.m.unpin_folio(g, head))
        assert st.join(collapse) == "SCAN_SUCCEED"
        assert st.run(a, lambda: zap_range(a, 0, 512)) == 512
        st.join(r.store(a))
        st.resume(g)
        head, _ = st.join(walk)
        if head >= 0:
            st.run(g, lambda: g.m.unpin_folio(g, head))
        return r.kinds()


@for_mutants("mutant-gup-fast-no-pte-recheck")
def gup_fast_grabs_during_copy(bugs: tuple[str, ...]) -> list[str]:
    """Broadcast TLBI (the flush does not wait for IRQs-off walkers): GUP-fast reads PAGE's PTE
    and stops before its grab; ptl-hold clears, flushes, checks the references and copies; then
    GUP-fast grabs the old folio — only its PTE re-check sees the PTE is gone."""
    with scenario("ptl-hold", bugs, flush="broadcast", cpus={"app": 1, "gup-fast": 1, "khugepaged": 1}) as r:
        st, g, k = r.st, r.cpu("gup-fast"), r.cpu("khugepaged")
        st.park_at(g, "gup_fast_after_pte_read")
        walk = st.start(g, lambda: gup_fast(g, PAGE))
        st.wait_parked(g, job=walk)
        st.park_at(k, "collapse_after_copy")
        collapse = r.collapse()
        st.wait_parked(k, job=collapse)
        st.resume(g)
        head, pfn = st.join(walk)
        st.resume(k)
        assert st.join(collapse) == "SCAN_SUCCEED"
        if head >= 0:
            st.run(g, lambda: dma_and_check(r, g, PAGE, head, pfn))
        return r.kinds()


@for_mutants("mutant-fault-no-pte-recheck")
def fault_spins_through_the_collapse(bugs: tuple[str, ...]) -> list[str]:
    """ptl-hold clears and flushes PAGE; A's store faults (pte_none), allocates and spins on the
    PTL; the collapse installs the new folio; A gets the PTL — only vmf_pte_changed() keeps it
    from mapping its zeroed page over the new one."""
    with scenario("ptl-hold", bugs) as r:
        st, a, k = r.st, r.cpu("app"), r.cpu("khugepaged")
        st.join(r.store(a))
        st.park_at(k, "collapse_after_flush")
        collapse = r.collapse()
        st.wait_parked(k, job=collapse)
        fault = r.store(a)
        assert st.blocked(fault)  # spinning on the PTL
        st.resume(k)
        assert st.join(collapse) == "SCAN_SUCCEED"
        st.join(fault)
        st.join(r.store(a))
        return r.kinds()


@for_mutants("mutant-fault-no-ptl", "ptl-hold-unlocked-copy")
def fault_during_ptl_hold_collapse(bugs: tuple[str, ...]) -> list[str]:
    """ptl-hold has cleared and flushed PAGE (mid-copy); A faults on it.  The PTL (held by the
    collapse, taken by the fault) is all that keeps A's fresh page from being overwritten."""
    with scenario("ptl-hold", bugs) as r:
        st, a, k = r.st, r.cpu("app"), r.cpu("khugepaged")
        st.join(r.store(a))
        st.park_at(k, "collapse_mid_copy")
        collapse = r.collapse()
        st.wait_parked(k, job=collapse)
        fault = r.store(a)
        if st.blocked(fault):  # spinning on the PTL the collapse holds
            st.resume(k)
            st.join(collapse)
            st.join(fault)
        else:
            st.join(fault)
            st.resume(k)
            st.join(collapse)
        st.join(r.store(a))
        return r.kinds()


@for_mutants("mutant-fault-no-mmap-lock", "mutant-pmd-clear-no-vma-write", "pmd-clear-read-lock")
def fault_during_pmd_clear(bugs: tuple[str, ...]) -> list[str]:
    """pmd-clear has cleared the PMD (not yet flushed: A never touched PAGE, so it has no
    translation); A faults on PAGE.  mmap_lock for write and the VMA write lock are what make A
    wait instead of installing a new table that pmd_populate() then overwrites."""
    with scenario("pmd-clear", bugs) as r:
        st, a, k = r.st, r.cpu("app"), r.cpu("khugepaged")
        st.park_at(k, "collapse_after_pmd_clear")
        collapse = r.collapse()
        st.wait_parked(k, job=collapse)
        fault = r.store(a)
        if st.blocked(fault):  # asleep on mmap_lock
            st.resume(k)
            st.join(collapse)
            st.join(fault)
        else:
            st.join(fault)
            st.resume(k)
            st.join(collapse)
        st.join(r.store(a))
        return r.kinds()


def pin_during_collapse(strategy: str, park: str | None) -> Scenario:
    def run(bugs: tuple[str, ...]) -> list[str]:
        """GUP-fast pins PAGE (before the collapse, or while it is parked at ``park``: isolated,
        PTEs still present); the collapse must see the pin and back off, restoring everything;
        then the DMA write through the pin must be visible through the page table, and an app
        store to another page of the range must find its value."""
        with scenario(strategy, bugs, cpus={"app": 1, "gup-fast": 1, "khugepaged": 1}) as r:
            st, a, g, k = r.st, r.cpu("app"), r.cpu("gup-fast"), r.cpu("khugepaged")
            st.join(r.store(a, OTHER))
            if park:
                st.park_at(k, park)
                collapse = r.collapse()
                st.wait_parked(k, job=collapse)
            head, pfn = st.run(g, lambda: gup_fast(g, PAGE))
            assert head >= 0
            if park:
                st.resume(k)
            else:
                collapse = r.collapse()
            st.join(collapse)
            st.run(g, lambda: dma_and_check(r, g, PAGE, head, pfn))
            st.join(r.store(a, OTHER))
            return r.kinds()

    return run


SCENARIOS["migration-no-refcheck"] = pin_during_collapse("migration-entry", None)
SCENARIOS["migration-refcheck-before-unmap"] = pin_during_collapse("migration-entry", "collapse_before_unmap")
SCENARIOS["mutant-migration-no-restore"] = pin_during_collapse("migration-entry", "collapse_before_unmap")
SCENARIOS["mutant-ptl-hold-no-refcheck"] = pin_during_collapse("ptl-hold", "collapse_before_unmap")
SCENARIOS["mutant-ptl-hold-no-restore"] = pin_during_collapse("ptl-hold", "collapse_before_unmap")
SCENARIOS["mutant-ptl-hold-backoff-keeps-ptl"] = pin_during_collapse("ptl-hold", "collapse_before_unmap")
SCENARIOS["mutant-isolate-no-release"] = pin_during_collapse("ptl-hold", None)
SCENARIOS["mutant-pmd-clear-no-refcheck"] = pin_during_collapse("pmd-clear", None)
SCENARIOS["mutant-pmd-clear-no-restore"] = pin_during_collapse("pmd-clear", None)


@for_mutants("mutant-gup-slow-no-mmap-lock")
def gup_slow_during_pmd_clear(bugs: tuple[str, ...]) -> list[str]:
    """pmd-clear has cleared the PMD; GUP-slow pins PAGE.  Its mmap_read_lock makes it wait for
    the collapse; without it, it faults a new table and page in, which pmd_populate() drops."""
    with scenario("pmd-clear", bugs, cpus={"app": 1, "gup-slow": 1, "khugepaged": 1}) as r:
        st, g, k = r.st, r.cpu("gup-slow"), r.cpu("khugepaged")
        st.park_at(k, "collapse_after_pmd_clear")
        collapse = r.collapse()
        st.wait_parked(k, job=collapse)
        pin = st.start(g, lambda: gup_slow(g, PAGE))
        if st.blocked(pin):  # asleep on mmap_lock
            st.resume(k)
            st.join(collapse)
            head, pfn = st.join(pin)
            st.run(g, lambda: dma_and_check(r, g, PAGE, head, pfn))
        else:
            head, pfn = st.join(pin)
            st.resume(k)
            st.join(collapse)
            st.run(g, lambda: dma_and_check(r, g, PAGE, head, pfn))
        return r.kinds()


@for_mutants("mutant-gup-slow-no-ptl")
def gup_slow_reads_pte_then_collapse(bugs: tuple[str, ...]) -> list[str]:
    """GUP-slow reads PAGE's PTE under the PTL and stops before the grab; ptl-hold needs that
    PTL to clear the PTEs.  Without it the collapse runs its reference check before the grab."""
    with scenario("ptl-hold", bugs, cpus={"app": 1, "gup-slow": 1, "khugepaged": 1}) as r:
        st, g, k = r.st, r.cpu("gup-slow"), r.cpu("khugepaged")
        st.park_at(g, "gup_slow_after_pte_read")
        pin = st.start(g, lambda: gup_slow(g, PAGE))
        st.wait_parked(g, job=pin)
        st.park_at(k, "collapse_after_copy")
        collapse = r.collapse()
        if parked_or_blocked(st, k, collapse):  # no PTL held by GUP: the collapse got past
            st.resume(g)
            head, pfn = st.join(pin)
            st.resume(k)
            st.join(collapse)
        else:  # spinning on the PTL GUP-slow holds
            st.resume(g)
            head, pfn = st.join(pin)
            st.join(collapse)
        st.run(g, lambda: dma_and_check(r, g, PAGE, head, pfn))
        return r.kinds()


def zap_while_parked(point: str) -> Scenario:
    def run(bugs: tuple[str, ...]) -> list[str]:
        """migration-entry is parked at ``point``; A zaps PAGE's 8 pages and stores PAGE again
        (a fresh page).  The PTL (the collapse's and the zap's) and the install's re-check keep
        the zap and the fresh page from being undone by the collapse."""
        with scenario("migration-entry", bugs) as r:
            st, a, k = r.st, r.cpu("app"), r.cpu("khugepaged")
            st.join(r.store(a))
            st.park_at(k, point)
            collapse = r.collapse()
            st.wait_parked(k, job=collapse)
            zap = st.start(a, lambda: zap_range(a, 0, 8))
            if st.blocked(zap):  # spinning on the PTL the collapse holds
                st.resume(k)
                st.join(collapse)
                st.join(zap)
                st.join(r.store(a))
            else:
                st.join(zap)
                store = r.store(a)  # a fresh page, unless the collapse's PTL holds it off
                if st.blocked(store):
                    st.resume(k)
                    st.join(collapse)
                    st.join(store)
                else:
                    st.join(store)
                    st.resume(k)
                    st.join(collapse)
            st.join(r.store(a))
            return r.kinds()

    return run


SCENARIOS["mutant-zap-no-ptl"] = zap_while_parked("collapse_before_unmap")
SCENARIOS["mutant-migration-unmap-no-ptl"] = zap_while_parked("collapse_before_unmap")
SCENARIOS["mutant-migration-install-no-ptl"] = zap_while_parked("collapse_install_after_read")
SCENARIOS["mutant-migration-install-no-recheck"] = zap_while_parked("collapse_after_copy")


@for_mutants("mutant-alloc-no-zone-lock")
def two_allocations(bugs: tuple[str, ...]) -> list[str]:
    """A's fault reads the head of the free list and stops; B's fault allocates.  zone->lock is
    what keeps B from taking the very same block."""
    with scenario("ptl-hold", bugs) as r:
        st, a, b = r.st, r.cpu("app", 0), r.cpu("app", 1)
        st.run(a, lambda: zap_range(a, 0, 8))  # PAGE and OTHER are holes now
        st.park_at(a, "alloc_after_head_read")
        fa = r.store(a, PAGE)
        st.wait_parked(a, job=fa)
        fb = r.store(b, OTHER)
        if st.blocked(fb):  # spinning on zone->lock
            st.resume(a)
            st.join(fa)
            st.join(fb)
        else:
            st.join(fb)
            st.resume(a)
            try:
                st.join(fa)
            except Stopped:  # A's block is gone from the list: list_del corruption ends the run
                return r.kinds()
        st.join(r.store(b, OTHER))
        return r.kinds()


@for_mutants("mutant-pmd-install-no-lock")
def two_faults_install_a_table(bugs: tuple[str, ...]) -> list[str]:
    """PMD 0 is none (its THP zapped whole); A's fault has checked it is still none and stops
    before pmd_install(); B faults on another page of it.  The PMD lock makes one installer win."""
    with scenario("pmd-clear", bugs, order=9) as r:
        st, a, b = r.st, r.cpu("app", 0), r.cpu("app", 1)
        assert st.join(r.collapse()) == "SCAN_SUCCEED"
        assert st.run(a, lambda: zap_range(a, 0, 512)) == 512  # zap_huge_pmd: the PMD is none
        st.park_at(a, "pmd_install_after_check")
        fa = r.store(a, PAGE)
        st.wait_parked(a, job=fa)
        fb = r.store(b, OTHER)
        if st.blocked(fb):  # spinning on the PMD lock
            st.resume(a)
            st.join(fa)
            st.join(fb)
        else:
            st.join(fb)
            st.resume(a)
            st.join(fa)
        st.join(r.store(a, PAGE))
        st.join(r.store(b, OTHER))
        return r.kinds()


@for_mutants("mutant-folio-unlock-no-wake")
def migration_waiter(bugs: tuple[str, ...]) -> list[str]:
    """A faults on a migration entry and sleeps on the old folio's lock; the collapse installs
    the new folio and unlocks the old ones — the wake-up A must get."""
    with scenario("migration-entry", bugs) as r:
        st, a, k = r.st, r.cpu("app"), r.cpu("khugepaged")
        st.park_at(k, "collapse_after_copy")
        collapse = r.collapse()
        st.wait_parked(k, job=collapse)
        fault = r.store(a)
        head = st.m.folio_head(st.m.ptep_get(st.m.pmdp_get(0) >> 12, PAGE) >> 12)
        wait_in_futex(st, a, "folio", st.m.off["wake_seq"] + head * 4)
        st.resume(k)
        st.join(collapse)
        st.join(fault)
        return r.kinds()


@for_mutants("mutant-rwsem-no-wake")
def mmap_lock_sleeper(bugs: tuple[str, ...]) -> list[str]:
    """pmd-clear holds mmap_lock for write; A's fault sleeps on it (the VMA is write-locked);
    mmap_write_unlock() must wake A."""
    with scenario("pmd-clear", bugs) as r:
        st, a, k = r.st, r.cpu("app"), r.cpu("khugepaged")
        st.park_at(k, "collapse_after_copy")
        collapse = r.collapse()
        st.wait_parked(k, job=collapse)
        fault = r.store(a)
        wait_in_futex(st, a, "ctl", st.m.mmap_lock.off + 8)
        st.resume(k)
        st.join(collapse)
        st.join(fault)
        return r.kinds()


@for_mutants("mutant-vma-no-wake")
def vma_writer_waits_for_a_fault(bugs: tuple[str, ...]) -> list[str]:
    """A's fault holds the VMA read lock (stopped after reading the PTE); pmd-clear's
    vma_start_write() sleeps until the last reader leaves; A's vma_end_read() must wake it."""
    with scenario("pmd-clear", bugs) as r:
        st, a, k = r.st, r.cpu("app"), r.cpu("khugepaged")
        st.run(a, lambda: zap_range(a, 0, 8))  # PAGE is a hole: the store faults
        st.park_at(a, "fault_after_pte_read")
        fault = r.store(a)
        st.wait_parked(a, job=fault)
        collapse = r.collapse()
        from ptlab.core.machine.layout import VMA_READERS

        wait_in_futex(st, k, "ctl", st.m.L.vma(0) + VMA_READERS)
        st.resume(a)
        st.join(fault)
        st.join(collapse)
        return r.kinds()


# ------------------------------------------------------------------------------ the tests
KILLABLE = sorted(n for n, m in MUTANTS.items() if not m.equivalent and "::" not in m.test)


@pytest.mark.parametrize("name", KILLABLE)
def test_mutant_is_killed(name: str) -> None:
    kinds = SCENARIOS[name]((name,))
    expected = set(MUTANTS[name].kinds)
    assert kinds, f"{name} was not caught"
    assert set(kinds) & expected, f"{name} caught with wrong kind {kinds} (expected one of {sorted(expected)})"


@pytest.mark.parametrize("name", KILLABLE)
def test_scenario_is_clean_without_the_mutant(name: str) -> None:
    assert SCENARIOS[name](()) == []


def test_every_mutant_has_a_scenario_a_cell_and_a_reason() -> None:
    for name, m in MUTANTS.items():
        if m.equivalent:
            assert m.cell is None and not m.kinds and len(m.equivalent) > 40, name
        else:
            assert m.cell is not None and m.kinds, name
            if "::" in m.test:  # killed deterministically by another module's test
                path, test = m.test.split("::")
                assert f"def {test}(" in (ROOT / path).read_text(), m.test
            else:
                assert name in SCENARIOS, f"{name} has no deterministic scenario"
            RunConfig(inject_bugs=(name,), unsafe=True, **{k: v for k, v in m.cell.params().items()})
    assert set(SCENARIOS) <= set(KILLABLE)


def _code() -> str:
    return "\n".join(p.read_text() for d in ("core", "cluster") for p in (ROOT / d).rglob("*.py") if p.name != "mutants.py")


def test_every_mutant_in_the_code_is_registered_and_every_registered_one_is_applied() -> None:
    used = set(re.findall(r'"(mutant-[a-z0-9-]+)"', _code()))
    assert used <= mutant_names(), f"unregistered mutants in the code: {sorted(used - mutant_names())}"
    applied = {n for n in mutant_names() if not MUTANTS[n].equivalent}
    assert applied <= used, f"registered mutants never applied: {sorted(applied - used)}"


def test_mutants_need_unsafe_and_are_not_offered_by_run(capsys: pytest.CaptureFixture[str]) -> None:
    from ptlab.cli.main import main

    with pytest.raises(ConfigError, match="--unsafe"):
        RunConfig(inject_bugs=("mutant-zap-no-flush",))
    with pytest.raises(ConfigError) as e:
        RunConfig(inject_bugs=("nope",), unsafe=True)
    assert "mutant-" not in str(e.value)
    assert main(["run", "--help"]) == 0
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "mutant-" not in out
    assert main(["check", "--mutants", "--list"]) == 0
    listed = capsys.readouterr().out
    for name, m in MUTANTS.items():
        assert name in listed
        if m.equivalent:
            assert m.equivalent[:40] in listed.replace("\n", " ").replace("    ", " ")


# ------------------------------------------------------------------------------ verdicts
def _case(expect: tuple[str, ...], control_expect: tuple[str, ...] | None = None) -> Any:
    from ptlab.core.kernel.bugs import CheckCase

    c = CheckCase("ptl-hold", ("ptl-hold-no-flush",) if expect else (), "ipi", 4, expect, {"app": 2, "khugepaged": 1})
    if control_expect is not None:
        c = c.with_control("ptl-hold-no-flush")
    return c


def test_verdict_needs_an_expected_kind_and_a_completed_run() -> None:
    from ptlab.core.kernel.bugs import verdict

    bug = _case(("lost_write", "use_after_free"))
    assert verdict(bug, {"use_after_free": 3}) == (True, "caught: use_after_free×3")
    assert verdict(bug, {"mapcount_mismatch": 1}) == (False, "caught with wrong kind mapcount_mismatch")
    assert verdict(bug, {}) == (False, "missed")
    # a CPU that raised or a watchdog stall is a failed run, never a catch
    assert verdict(bug, {"cpu_exception": 1, "lost_write": 2})[0] is False
    assert verdict(bug, {"deadlock": 1})[1].startswith("run failed")
    assert verdict(bug, {}, "watchdog: no progress")[1] == "run failed: watchdog: no progress"
    clean = _case(())
    assert verdict(clean, {}) == (True, "clean")
    assert verdict(clean, {"stale_read": 1}) == (False, "not clean: stale_read×1")


def test_a_clean_cell_counts_only_with_its_control_caught() -> None:
    from ptlab.cli.check_matrix import CellRun, matrix_table

    clean = _case((), control_expect=())
    assert clean.control is not None and clean.control.bugs == ("ptl-hold-no-flush",) and clean.control.expect
    assert clean.control.params()["cpus"] == clean.params()["cpus"]
    for control_kinds, control_error, want_bad, want_failed in (({"use_after_free": 1}, "", 0, 0), ({}, "", 1, 0), ({"wrong_kind_x": 1}, "", 1, 0), ({}, "watchdog: stall", 1, 1)):
        runs = {clean: CellRun(clean, 0), clean.control: CellRun(clean.control, 0, dict(control_kinds), error=control_error)}
        _, bad, failed = matrix_table([clean], runs)
        assert (bad, failed) == (want_bad, want_failed), control_kinds


def test_check_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from ptlab.cli.main import main

    for argv, needle in (
        (["check", "--only", "nope"], "neither a bug nor a mutant"),
        (["check", "--mutants", "--only", "mutant-split-no-flush"], "equivalent"),
        (["check", "--catch-rate", "-1"], "--catch-rate"),
        (["check", "--budget", "0"], "--budget"),
        (["check", "--list"], "--mutants"),
    ):
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_stop_on_ends_the_run_at_the_first_violation_of_those_kinds():
    """``stop_on`` (the catch-rate table's runs): a violation of another kind is recorded and
    the run goes on; the first of the listed kinds sets STOP (STOP_VIOLATION) at once."""
    from ptlab.core.machine.layout import STOP, STOP_VIOLATION

    with Stepper(strategy="ptl-hold", order=4, stop_on=("lost_write",)) as st:
        a = st.cpu(0, "app")
        a.violation("use_after_free", detail="not a listed kind")
        assert a.ctl.load32(STOP) == 0
        a.violation("lost_write", detail="a listed kind")
        assert a.ctl.load32(STOP) == STOP_VIOLATION
    assert RunConfig.from_dict(RunConfig(stop_on=("lost_write",)).to_dict()).stop_on == ("lost_write",)


def test_a_collapse_meeting_a_freed_folio_in_its_snapshot_ends_the_run_as_free_mapped():
    """The rmap batch of a collapse (Collapse.folios_of): every folio of its PTE snapshot is
    locked and isolated, so a free frame there is a folio freed while mapped (what a zap
    without the PTL leaves): ``free_mapped``, and the run ends (STOP_VIOLATION), never a crash
    of the model.  Frames still in use pass."""
    import numpy as np
    from ptlab.core.kernel.khugepaged import Collapse
    from ptlab.core.machine.layout import STOP, STOP_VIOLATION

    with Stepper(strategy="migration-entry", order=4) as st:
        k = st.cpu(1, "khugepaged")
        c = Collapse(cpu=k, start=0, order=4)
        pfns = (st.m.ptes_range(st.m.pmdp_get(0) >> 12, 0, 16) >> 12)
        heads, counts = c.folios_of(pfns)
        assert (heads >= 0).all() and counts.sum() == 16 and k.ctl.load32(STOP) == 0
        free = int(np.nonzero(st.m.f["head"] < 0)[0][0])
        with pytest.raises(Stopped):
            c.folios_of(np.append(pfns, free))
        assert [v["kind"] for v in k.violations] == ["free_mapped"]
        assert k.ctl.load32(STOP) == STOP_VIOLATION
