"""Locks on shared words across real processes: rwsem exclusion and writer fairness, folio lock
sleep/wake, folio refcounts and pins, and the clear error when a lock's owner is SIGKILLed.

Children are simulated CPUs in spawned processes (tests/_procs.py); every wait has a bound, and
the Lab's watchdog sets STOP so a broken lock makes its waiter raise instead of hanging.
"""

from __future__ import annotations

import os
import signal
import time

import ptlab.core.machine.locks as locks
import pytest
from _procs import Lab, busy_until, flag, log
from ptlab.core.machine._prims import now_ns
from ptlab.core.machine.errors import OwnerDied
from ptlab.core.machine.layout import CPU_STATE, GUP_PIN_COUNTING_BIAS, ST_SLEEP
from ptlab.core.machine.mm import Machine
from ptlab.core.machine.shm import SHM_DIR

# flag words
READERS_IN, WRITERS_IN, MAX_READERS, VIOLATIONS, GO, DONE, STREAM_STOP, ACQUIRED = range(8)


def _max_update(aux, off, value):
    while (cur := aux.load64(off)) < value and not aux.cas64(off, cur, value):
        pass


# ---- rwsem ----------------------------------------------------------------------------------
def _rwsem_worker(m, cpu, aux, mode, n, hold_us):
    """n critical sections of the anon_vma rwsem, recording who is inside in shared counters."""
    sem = m.anon_vma
    aux.fetch_add64(flag(GO), 1)
    while aux.load64(flag(GO)) < 2:
        pass
    for _ in range(n):
        if mode == "read":
            sem.down_read(cpu)
            inside = aux.fetch_add64(flag(READERS_IN), 1) + 1
            _max_update(aux, flag(MAX_READERS), inside)
            if aux.load64(flag(WRITERS_IN)):
                aux.fetch_add64(flag(VIOLATIONS), 1)
            busy_until(now_ns() + hold_us * 1000)
            aux.fetch_add64(flag(READERS_IN), -1)
            sem.up_read(cpu)
        else:
            sem.down_write(cpu)
            if aux.fetch_add64(flag(WRITERS_IN), 1) != 0 or aux.load64(flag(READERS_IN)):
                aux.fetch_add64(flag(VIOLATIONS), 1)
            busy_until(now_ns() + hold_us * 1000)
            aux.fetch_add64(flag(WRITERS_IN), -1)
            sem.up_write(cpu)
        aux.fetch_add64(flag(DONE), 1)


@pytest.mark.parametrize(
    "modes",
    [("read", "read"), ("write", "read"), ("write", "write")],
    ids=["readers-overlap", "writer-excludes-reader", "writer-excludes-writer"],
)
def test_rwsem_readers_overlap_writer_is_alone(modes):
    n = 300
    with Lab(nr_cpus=3) as lab:
        for i, mode in enumerate(modes):
            lab.start(_rwsem_worker, 1 + i, mode, n, 100)
        lab.join(timeout=60)
        aux = lab.aux
        assert aux.load64(flag(DONE)) == 2 * n
        assert aux.load64(flag(VIOLATIONS)) == 0, "a writer shared the rwsem"
        if modes == ("read", "read"):
            assert aux.load64(flag(MAX_READERS)) == 2, "two readers never held the rwsem together"
        st = lab.m.anon_vma.statistics()
        assert st["writer"] == -1 and st["readers"] == [] and st["waiting_writers"] == 0


def _reader_stream(m, cpu, aux, hold_s, limit_s):
    """Take the rwsem for read again and again, holding it while asleep, until told to stop (or
    limit_s passed: a starved writer then gets in late and the test sees how late)."""
    sem = m.anon_vma
    end = time.monotonic() + limit_s
    while not aux.load64(flag(STREAM_STOP)) and time.monotonic() < end:
        sem.down_read(cpu)
        inside = aux.fetch_add64(flag(READERS_IN), 1) + 1
        _max_update(aux, flag(MAX_READERS), inside)
        time.sleep(hold_s)
        aux.fetch_add64(flag(READERS_IN), -1)
        sem.up_read(cpu)


@pytest.mark.timeout(60)
def test_rwsem_writer_is_not_starved_by_a_stream_of_readers():
    limit_s = 1e9  # the readers stop only when told, after the writer got in
    with Lab(nr_cpus=4, limit_s=30) as lab:
        for i in range(3):  # three overlapping readers: the reader count never drops to zero
            lab.start(_reader_stream, 1 + i, 0.003, limit_s)
            time.sleep(0.001)
        lab.wait(lambda: lab.aux.load64(flag(MAX_READERS)) >= 2, "overlapping readers")
        time.sleep(0.05)
        me = lab.cpu(0)
        # a starved writer would wait until the Lab's watchdog stops the machine (Stopped)
        lab.m.anon_vma.down_write(me)
        readers_inside = lab.aux.load64(flag(READERS_IN))
        lab.m.anon_vma.up_write(me)
        lab.aux.store64(flag(STREAM_STOP), 1)
        lab.join()
    assert readers_inside == 0


# ---- folio lock --------------------------------------------------------------------------------
PFN = 7


def _folio_locker(m, cpu, aux):
    locks.SLEEP_SLICE_NS = 60_000_000_000  # only a wake-up can end the sleep, never a timeout
    fl = m.folio_locks
    if not fl.folio_trylock(cpu, PFN):
        log(aux, cpu.id, "trylock_failed")
    slept = fl.folio_lock(cpu, PFN)
    log(aux, cpu.id, "locked")
    aux.store64(flag(ACQUIRED), slept)
    fl.folio_unlock(cpu, PFN)


def _folio_waiter(m, cpu, aux):
    """migration_entry_wait_on_locked(): wait until unlocked, without taking the lock."""
    locks.SLEEP_SLICE_NS = 60_000_000_000
    fl = m.folio_locks
    ticket = fl.folio_wait_unlocked_prepare(PFN)
    fl.folio_wait_unlocked(cpu, PFN, ticket)
    log(aux, cpu.id, "woken")


@pytest.mark.timeout(60)
def test_folio_lock_waiters_sleep_and_unlock_wakes_them():
    with Lab(nr_cpus=3) as lab:
        m, aux = lab.m, lab.aux
        me = lab.cpu(0)
        fl = m.folio_locks
        assert fl.folio_trylock(me, PFN)
        log(aux, 0, "lock")
        lab.start(_folio_locker, 1)
        lab.wait(lambda: lab.log() == ["lock 0", "trylock_failed 1"], "the trylock to fail")
        lab.start(_folio_waiter, 2)
        waiters = m.off["waiters"] + PFN * 4

        def both_asleep() -> bool:
            return (
                m.folio.load32(waiters) == 2
                and all(m.ctl.load32(m.L.cpu(c) + CPU_STATE) == ST_SLEEP for c in (1, 2))
                and not lab.in_cpumask(1)
                and not lab.in_cpumask(2)  # a sleeping CPU leaves mm_cpumask
            )

        lab.wait(both_asleep, "both waiters asleep on the folio")
        time.sleep(0.05)
        assert lab.log() == ["lock 0", "trylock_failed 1"], "a waiter got past a held folio lock"
        assert fl.folio_test_locked(PFN)
        log(aux, 0, "unlock")
        fl.folio_unlock(me, PFN)
        lab.join(timeout=10)  # a missed wake-up would sleep for 60 s
        events = lab.log()
        assert events[:3] == ["lock 0", "trylock_failed 1", "unlock 0"]
        assert set(events[3:]) == {"locked 1", "woken 2"}
        assert aux.load64(flag(ACQUIRED)) > 0  # it slept before getting the lock
        assert not fl.folio_test_locked(PFN) and m.folio.load32(waiters) == 0


# ---- refcount --------------------------------------------------------------------------------
def test_folio_refcount_try_get_freeze_and_pin_bias():
    with Lab(nr_cpus=1) as lab:
        m: Machine = lab.m
        cpu = lab.cpu(0)
        small = m.alloc_folio(cpu, 0)
        assert m.folio_ref_count(small) == 1
        assert m.folio_try_get(small) and m.folio_ref_count(small) == 2
        m.folio_put(cpu, small)
        # frozen: the count is 0 and no one can take a reference
        assert not m.folio_ref_freeze(small, 2)  # the expected count is wrong: no freeze
        assert m.folio_ref_freeze(small, 1)
        assert m.folio_ref_count(small) == 0
        assert not m.folio_try_get(small)
        assert m.try_grab_folio(small, pin=True) == -1
        m.folio_ref_unfreeze(small, 1)
        # FOLL_PIN on a small folio adds GUP_PIN_COUNTING_BIAS
        assert m.try_grab_folio(small, pin=True) == small
        assert m.folio_ref_count(small) == 1 + GUP_PIN_COUNTING_BIAS == 1025
        assert m.folio_pincount(small) == 1
        m.unpin_folio(cpu, small)
        assert m.folio_ref_count(small) == 1 and m.folio_pincount(small) == 0
        # ... on a large folio it adds 1 (and 1 to pincount), through any of its pages
        large = m.alloc_folio(cpu, 4)
        assert m.try_grab_folio(large + 5, pin=True) == large
        assert m.folio_ref_count(large) == 2 and m.folio_pincount(large) == 1
        m.unpin_folio(cpu, large)
        assert m.folio_ref_count(large) == 1
        # a plain get (FOLL_GET) adds 1 either way
        assert m.try_grab_folio(small, pin=False) == small and m.folio_ref_count(small) == 2
        m.folio_put(cpu, small)
        # freed at zero: try-get fails, and a grab of a freed page fails
        free_before = m.nr_free()
        m.folio_put(cpu, small)
        assert m.folio_ref_count(small) == 0 and m.nr_free() == free_before + 1
        assert not m.folio_try_get(small)
        assert m.try_grab_folio(small, pin=True) == -1
        assert cpu.violations == []


# ---- a lock owner killed with SIGKILL -------------------------------------------------------------
def _hold_and_hang(m, cpu, aux, which):
    if which == "spinlock":
        m.ptl(0).lock(cpu)
    elif which == "rwsem":
        m.mmap_lock.down_write(cpu)
    else:
        assert m.folio_locks.folio_trylock(cpu, PFN)
    log(aux, cpu.id, "locked")
    time.sleep(120)  # killed long before


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("spinlock", r"ptl\[0\] is held by CPU 1, whose process died"),
        ("rwsem", r"mmap_lock is held for write by CPU 1, whose process died"),
        ("folio", rf"folio lock of pfn {PFN} is held by CPU 1, whose process died"),
    ],
)
def test_waiter_of_a_killed_owner_gets_a_clear_error_and_shm_is_clean(which, message):
    with Lab(nr_cpus=2) as lab:
        prefixes = (lab.m.prefix, lab.ns.prefix)
        child = lab.start(_hold_and_hang, 1, which)
        lab.wait(lambda: lab.log() == ["locked 1"], "the child to take the lock")
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)  # reap it: a zombie still answers kill(pid, 0)
        assert child.exitcode == -signal.SIGKILL
        me = lab.cpu(0)
        # the waiter notices the dead owner (OwnerDied), not the test's STOP watchdog (Stopped)
        with pytest.raises(OwnerDied, match=message):
            if which == "spinlock":
                lab.m.ptl(0).lock(me)
            elif which == "rwsem":
                lab.m.mmap_lock.down_read(me)
            else:
                lab.m.folio_locks.folio_lock(me, PFN)
    leftovers = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefixes)]
    assert leftovers == []
