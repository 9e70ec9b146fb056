"""The one-call fast paths (locks in one C call, batched page work) against the Python steps they replace.

- Locks: on the process backend's Region, SpinLock/RwSem/FolioLocks run each operation in one
  C call (core/machine/_prims.c SpinLockBase, RwSemBase, FolioLocksBase); on any other region
  (the scheduled backend's) they run their ``_py_*`` methods.  Both must leave the same words
  behind after every operation, on two machines driven side by side.
- A contended spin that wins in C does its accounting in C: the CPU's spin_ns, the lock's
  contended count and spin_ns all agree with what lock() returned.
- Batches: Region.copy_pages and Region.fetch_add32_each do what the per-page calls do, and the
  scheduled backend's SchedRegion runs them as exactly those calls (the same scheduling points in
  the same order); Collapse.copy() keeps its park point and interrupt points where the per-page
  loop had them.

Each equivalence check is shown to fire on a variant that differs (a sabotaged step).
"""

from __future__ import annotations

import threading

import numpy as np
from ptlab.core.backends.scheduled import SchedRegion
from ptlab.core.kernel.khugepaged import Collapse
from ptlab.core.machine import _prims
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.layout import FOLIO_FIELDS, MM_LOCK_SEQ, NAMED_LOCKS, VMA_LOCK_SEQ
from ptlab.core.machine.mm import Machine


def _config() -> RunConfig:
    return RunConfig(strategy="ptl-hold", order=4, cpus={"app": 2}, nr_pmds=2)


def _words(m: Machine) -> dict[str, list[int]]:
    """Every word a lock operation may touch: each named lock's line and ptl[0]'s, and the
    first VMA's struct, and the folio arrays of the first frames."""
    out = {}
    for name in NAMED_LOCKS:
        off = m.L.named_lock(name)
        out[name] = [m.ctl.load64(off + 8 * k) for k in range(8)]
    out["ptl[0]"] = [m.ctl.load64(m.L.ptl(0) + 8 * k) for k in range(8)]
    out["vma[0]"] = [m.ctl.load64(m.L.vma(0) + 8 * k) for k in range(8)]
    for name in FOLIO_FIELDS:
        out[name] = m.f[name][:8].tolist()
    return out


def _vma_write_lock(m: Machine, cpu: CpuContext) -> None:
    """vm_lock_seq = mm_lock_seq, as vma_start_write() leaves it (no readers to wait for)."""
    m.ctl.store64(m.L.vma(0) + VMA_LOCK_SEQ, m.ctl.load64(MM_LOCK_SEQ))


# op name -> (fast call, python call): each takes (machine, cpu)
OPS = {
    "spin lock": (lambda m, c: m.ptl(0).lock(c), lambda m, c: m.ptl(0)._py_lock(c)),
    "spin trylock (held)": (lambda m, c: m.ptl(0).trylock(c), lambda m, c: m.ptl(0)._py_trylock(c)),
    "spin unlock": (lambda m, c: m.ptl(0).unlock(c), lambda m, c: m.ptl(0)._py_unlock(c)),
    "spin trylock": (lambda m, c: m.zone_lock.trylock(c), lambda m, c: m.zone_lock._py_trylock(c)),
    "zone unlock": (lambda m, c: m.zone_lock.unlock(c), lambda m, c: m.zone_lock._py_unlock(c)),
    "down_read": (lambda m, c: m.mmap_lock.down_read(c), lambda m, c: m.mmap_lock._py_down_read(c)),
    "down_read again": (lambda m, c: m.mmap_lock.down_read(c), lambda m, c: m.mmap_lock._py_down_read(c)),
    "down_write_trylock (read held)": (lambda m, c: m.mmap_lock.down_write_trylock(c), lambda m, c: m.mmap_lock._py_down_write_trylock(c)),
    "up_read": (lambda m, c: m.mmap_lock.up_read(c), lambda m, c: m.mmap_lock._py_up_read(c)),
    "up_read last": (lambda m, c: m.mmap_lock.up_read(c), lambda m, c: m.mmap_lock._py_up_read(c)),
    "down_write": (lambda m, c: m.anon_vma.down_write(c), lambda m, c: m.anon_vma._py_down_write(c)),
    "down_read_trylock (write held)": (lambda m, c: m.anon_vma.down_read_trylock(c), lambda m, c: m.anon_vma._py_down_read_trylock(c)),
    "up_write": (lambda m, c: m.anon_vma.up_write(c), lambda m, c: m.anon_vma._py_up_write(c)),
    "folio_lock": (lambda m, c: m.folio_locks.folio_lock(c, 3), lambda m, c: m.folio_locks._py_folio_lock(c, 3)),
    "folio_trylock (held)": (lambda m, c: m.folio_locks.folio_trylock(c, 3), lambda m, c: m.folio_locks._py_folio_trylock(c, 3)),
    "folio_unlock": (lambda m, c: m.folio_locks.folio_unlock(c, 3), lambda m, c: m.folio_locks._py_folio_unlock(c, 3)),
    "folio_trylock": (lambda m, c: m.folio_locks.folio_trylock(c, 5), lambda m, c: m.folio_locks._py_folio_trylock(c, 5)),
    "folio_unlock 5": (lambda m, c: m.folio_locks.folio_unlock(c, 5), lambda m, c: m.folio_locks._py_folio_unlock(c, 5)),
    "vma_start_read": (lambda m, c: m.vma_locks[0].vma_start_read(c), lambda m, c: m.vma_locks[0]._py_vma_start_read(c)),
    "vma_end_read": (lambda m, c: m.vma_locks[0].vma_end_read(c), lambda m, c: m.vma_locks[0]._py_vma_end_read(c)),
    "vma write-locked (by hand)": (_vma_write_lock, _vma_write_lock),
    "vma_start_read (write-locked)": (lambda m, c: m.vma_locks[0].vma_start_read(c), lambda m, c: m.vma_locks[0]._py_vma_start_read(c)),
}


def _side_by_side(python_ops: dict) -> list[str]:
    """Run OPS on two machines (CPU 1 on each), the fast calls on one and ``python_ops`` on the
    other; the ops whose results or words differ."""
    config = _config()
    ma, mb = Machine.create(config), Machine.create(config)
    diffs = []
    try:
        a, b = CpuContext(ma, 1, "app", config, capacity=1), CpuContext(mb, 1, "app", config, capacity=1)
        a.register()
        b.register()
        try:
            for name, (fast, _) in OPS.items():
                ra, rb = fast(ma, a), python_ops[name](mb, b)
                if ra != rb or _words(ma) != _words(mb):
                    diffs.append(name)
        finally:
            a.rec.close()
            b.rec.close()
    finally:
        ma.close()
        mb.close()
    return diffs


def test_each_lock_op_in_one_c_call_leaves_the_words_its_python_steps_leave():
    assert isinstance(CpuContext.__mro__[1], type) and CpuContext.__mro__[1] is _prims.CpuBase
    assert _side_by_side({name: py for name, (_, py) in OPS.items()}) == []


def test_the_side_by_side_check_sees_a_step_that_differs():
    """The negative control: a down_read whose Python steps forget the readers mask."""

    def down_read_no_mask(m, c):
        sem = m.mmap_lock
        s = sem.r.load64(sem.off)
        return 0 if sem._read_ok(s) and sem.r.cas64(sem.off, s, s + 1) else sem._wait(c, False)

    ops = {name: py for name, (_, py) in OPS.items()}
    ops["down_read"] = down_read_no_mask
    assert "down_read" in _side_by_side(ops)


def _spin_accounting_holds(cpu: CpuContext, lock, before: tuple[int, int, int], spins: list[int]) -> bool:
    contended = lock.r.load64(lock.off + 16) - before[1]
    spin_ns = lock.r.load64(lock.off + 24) - before[2]
    won_after_spin = [s for s in spins if s > 0]
    return cpu.spin_ns - before[0] == sum(spins) == spin_ns and contended == len(won_after_spin)


def test_a_contended_spin_won_in_c_is_accounted_in_c():
    """A C thread (no GIL) hammers ptl[1] with lock/increment/unlock while this CPU takes it over
    and over; every acquisition that had to spin shows up, once, in the CPU's spin_ns and in the
    lock's own counters.  Runs until at least one acquisition was contended."""
    config = _config()
    m = Machine.create(config)
    try:
        cpu = CpuContext(m, 1, "app", config, capacity=1)
        cpu.register()
        lock, counter = m.ptl(1), m.L.ptl(1) + 32  # a spare word of the lock's own line
        before = (cpu.spin_ns, lock.r.load64(lock.off + 16), lock.r.load64(lock.off + 24))
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                _prims.ref_spin_contended(m.ctl, lock.off, counter, 20_000)

        t = threading.Thread(target=hammer)
        t.start()
        spins: list[int] = []
        try:
            while sum(1 for s in spins if s > 0) < 3:
                spins.append(lock.lock(cpu))
                lock.unlock(cpu)
        finally:
            stop.set()
            t.join()
        assert _spin_accounting_holds(cpu, lock, before, spins)
        assert cpu.wait_kind == "ptl" and cpu.wait_max == max(spins)
        # the negative control: one acquisition fewer and the books no longer balance
        assert not _spin_accounting_holds(cpu, lock, before, [s for s in spins if s > 0][1:])
        cpu.rec.close()
    finally:
        m.close()


class _World:
    """Records the scheduling points a SchedRegion makes (kind, region, offset, length)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, int, int, int]] = []

    def point(self, kind: int, rid: int, off: int, n: int = 0) -> None:
        self.points.append((kind, rid, off, n))

    def written(self, rid: int, off: int) -> None:
        pass

    def note_read(self, rid: int, off: int, width: int, value: int) -> None:
        pass


def _per_page(sr: SchedRegion, dst: int, srcs: list[int], ps: int) -> None:
    for j, s in enumerate(srcs):
        if s < 0:
            sr.fill64(dst + j * ps, ps // 8, 0)
        else:
            sr.copy(dst + j * ps, s, ps)


def test_batches_do_what_the_per_page_calls_do_at_the_same_scheduling_points():
    ps = 4096
    fast, slow = bytearray(ps * 16), bytearray(ps * 16)
    for buf in (fast, slow):
        for p in range(4):
            buf[p * ps : (p + 1) * ps] = bytes([p + 1]) * ps
    srcs = np.array([0, -1, 2 * ps, ps, -1], dtype=np.int64)
    rf, rs = _prims.Region(fast), _prims.Region(slow)
    rf.copy_pages(8 * ps, srcs, ps)
    w_batch, w_loop = _World(), _World()
    SchedRegion(w_batch, rs, 3).copy_pages(8 * ps, srcs, ps)
    assert bytes(fast) == bytes(slow)
    _per_page(SchedRegion(w_loop, _prims.Region(bytearray(ps * 16)), 3), 8 * ps, srcs.tolist(), ps)
    assert w_batch.points == w_loop.points and len(w_loop.points) == len(srcs)
    # the negative control: the same pages in another order make other points
    w_other = _World()
    _per_page(SchedRegion(w_other, _prims.Region(bytearray(ps * 16)), 3), 8 * ps, srcs.tolist()[::-1], ps)
    assert w_other.points != w_batch.points

    offs, deltas = np.array([0, 8, 0, 4], dtype=np.int64), np.array([5, -2, 1, 7], dtype=np.int64)
    ra, rb = _prims.Region(bytearray(64)), _prims.Region(bytearray(64))
    ra.fetch_add32_each(offs, deltas)
    w_batch, w_loop = _World(), _World()
    SchedRegion(w_batch, rb, 1).fetch_add32_each(offs, deltas)
    sr = SchedRegion(w_loop, _prims.Region(bytearray(64)), 1)
    for o, d in zip(offs.tolist(), deltas.tolist()):
        sr.fetch_add32(o, d)
    assert [ra.load32(o) for o in (0, 4, 8)] == [rb.load32(o) for o in (0, 4, 8)] == [6, 7, -2]
    assert w_batch.points == w_loop.points


class _CopyProbe:
    """Stands in for the CPU and the machine of a Collapse: records what copy() does, in order."""

    page_size = 4096

    def __init__(self) -> None:
        self.events: list[object] = []
        self.m = self

    # the machine
    def pte_none_or_zero(self, ptes: np.ndarray) -> np.ndarray:
        return ptes == 0

    def copy_pages(self, dst: int, src_offs: np.ndarray) -> None:
        self.events += [("page", dst + j, s // self.page_size if s >= 0 else -1) for j, s in enumerate(src_offs.tolist())]

    # the CPU
    def charge(self, step: str, n: int = 1) -> None:
        pass

    def chaos(self, point: str) -> None:
        self.events.append(point)

    def interrupt_point(self) -> None:
        self.events.append("interrupt")


def _per_page_copy_events(ptes: list[int], target: int) -> list[object]:
    """What the per-page loop of __collapse_huge_page_copy() did before it was batched."""
    out: list[object] = []
    half = len(ptes) // 2
    for j, pte in enumerate(ptes):
        if j == half:
            out.append("collapse_mid_copy")
        out.append(("page", target + j, -1 if pte == 0 else pte >> 12))
        if j & 15 == 15:
            out.append("interrupt")
    out.append("collapse_after_copy")
    return out


def test_the_batched_collapse_copy_keeps_its_park_point_and_interrupt_points():
    for order in range(2, 10):
        nr = 1 << order
        ptes = np.array([0 if j % 5 == 3 else (1000 + j) << 12 | 1 for j in range(nr)], dtype=np.int64)
        probe = _CopyProbe()
        c = Collapse.__new__(Collapse)
        c.cpu, c.target = probe, 7000  # type: ignore[assignment]
        Collapse.copy(c, ptes)
        assert probe.events == _per_page_copy_events(ptes.tolist(), 7000), order
    # the negative control: a park point a page late is seen
    late = _per_page_copy_events(ptes.tolist(), 7000)
    i = late.index("collapse_mid_copy")
    late[i], late[i + 1] = late[i + 1], late[i]
    assert probe.events != late


def _none_or_zero_by_fields(ptes: np.ndarray, zero_pfn: int) -> np.ndarray:
    """pte_none() || (pte_present() && pte_pfn() == zero_pfn), field by field."""
    return (ptes == 0) | (((ptes & 1) != 0) & ((ptes >> 12) == zero_pfn))


def test_pte_none_or_zero_as_one_masked_compare_agrees_field_by_field():
    config = _config()
    m = Machine.create(config)
    try:
        z = m.zero_pfn
        rng = np.random.default_rng(0)
        pfns = rng.choice([0, 1, z - 1, z, z + 1, 1 << 40], size=4000)
        flags = rng.integers(0, 64, size=4000)
        ptes = np.concatenate([(pfns << 12) | flags, [0, -1, z << 12, z << 12 | 1, z << 12 | 0x21, -(1 << 12) | 1]]).astype(np.int64)
        want = _none_or_zero_by_fields(ptes, z)
        assert (m.pte_none_or_zero(ptes) == want).all() and want.any() and not want.all()
        # the negative control: the same check sees a formula that forgets the present bit
        assert not (_none_or_zero_by_fields(ptes, z) == ((ptes == 0) | ((ptes >> 12) == z))).all()
    finally:
        m.close()


def test_range_clears_and_epoch_bumps_are_the_per_entry_calls_in_one():
    """Machine.ptep_get_and_clear_range and bump_epochs do what the per-entry calls do, and the
    scheduled backend runs them as exactly those calls (zap_range, zap_epoch)."""
    ptes = np.array([0, 5 << 12 | 1, -7, 9 << 12 | 3], dtype=np.int64)
    a, b = _prims.Region(bytearray(64)), _prims.Region(bytearray(64))
    for j, v in enumerate(ptes.tolist()):
        a.store64(8 + 8 * j, v)
        b.store64(8 + 8 * j, v)
    out = np.empty(len(ptes), dtype=np.int64)
    a.get_and_clear64(8, out)
    assert out.tolist() == ptes.tolist() and all(a.load64(8 + 8 * j) == 0 for j in range(len(ptes)))
    w_batch, w_loop = _World(), _World()
    out2 = np.empty(len(ptes), dtype=np.int64)
    SchedRegion(w_batch, b, 2).get_and_clear64(8, out2)
    sr = SchedRegion(w_loop, _prims.Region(bytearray(64)), 2)
    loop = [sr.xchg64(8 + 8 * j, 0) for j in range(len(ptes))]
    assert out2.tolist() == ptes.tolist() and loop == [0] * len(ptes)
    assert w_batch.points == w_loop.points
    # the negative control: one exchange short makes other points
    w_short = _World()
    for j in range(len(ptes) - 1):
        SchedRegion(w_short, _prims.Region(bytearray(64)), 2).xchg64(8 + 8 * j, 0)
    assert w_short.points != w_batch.points

    config = _config()
    m = Machine.create(config)
    try:
        before = [m.epoch(v) for v in range(20)]
        m.bump_epochs(3, 10)
        m.bump_epochs(5, 2)
        after = [m.epoch(v) for v in range(20)]
        assert [x - y for x, y in zip(after, before)] == [0, 0, 0, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    finally:
        m.close()
