"""The page allocator's list work in one C call (core/machine/_prims.c Buddy) against its Python steps.

On the process backend's Regions Machine runs alloc_folio()/free_folio() through _prims.Buddy and
frees a collapse's old folios as one batch (folios_put(), release_locked_folios(): the kernel's
free_unref_folios() through the per-CPU lists, one zone->lock hold for the batch).  The same
sequence of allocator operations on two machines side by side — one with the Buddy, one running
the Python steps (the scheduled backend's path) — must leave the same words behind: folio
metadata, free-list heads and counts, frames (poison and zeroes), and record the same violations
(free_mapped, free_locked, double_free, refcount_underflow, use_after_free, and list_del
corruption).  The negative control: a Buddy that frees a batch in another order leaves other
free lists, and the comparison sees it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.errors import Stopped
from ptlab.core.machine.layout import FOLIO_FIELDS, PG_ISOLATED, POISON_FREE
from ptlab.core.machine.mm import FREE_HEADS, MAX_ORDER, NR_FREE, Machine


def _config() -> RunConfig:
    return RunConfig(strategy="pmd-clear", order=9, cpus={"khugepaged": 1}, nr_pmds=2)


def _state(m: Machine) -> dict[str, object]:
    out: dict[str, object] = {name: m.f[name].tolist() for name in FOLIO_FIELDS}
    out["free_heads"] = [m.ctl.load32(FREE_HEADS + 4 * o) for o in range(MAX_ORDER + 1)]
    out["nr_free"] = m.ctl.load32(NR_FREE)
    frames = m.ns["frames"].view(__import__("numpy").uint8, 0, m.L.nr_frames * m.page_size)
    out["frames"] = hashlib.sha256(frames.tobytes()).hexdigest()
    return out


def _violations(cpu: CpuContext) -> list[tuple[str, int]]:
    """As a sorted list: a batch's puts all come before its frees, so an underflow found by a
    put is recorded before the checks of the frees that precede it in the per-folio order."""
    return sorted((v["kind"], v["page"]) for v in cpu.violations)


def _script(m: Machine, cpu: CpuContext) -> list[object]:
    """Allocations and frees of every kind, the collapse's batched release, and the folios that
    fail free_folio()'s checks; returns what each step returned."""
    out: list[object] = []
    small = [m.alloc_folio(cpu, 0, zero=True) for _ in range(40)]
    large = [m.alloc_folio(cpu, o) for o in (4, 2, 9, 3)]
    out += small + large
    for h in small[::3]:  # single frees (faults thrown away, zaps)
        m.folio_put(cpu, h)
    m.folio_put(cpu, large[1])
    # a collapse's release: locked, isolated, one extra reference each; some mapped twice
    old = [h for h in small if h not in small[::3]][:16]
    for h in old:
        assert m.folio_locks.folio_trylock(cpu, h)
        m.folio_test_set_flag(h, PG_ISOLATED, True)
        m.folio_ref_add(h, 1)
    m.folio_ref_add(old[3], 1)  # still referenced after the release: not freed
    m.release_locked_folios(cpu, old, PG_ISOLATED)
    out.append([m.folio_ref_count(h) for h in old])
    # a batch with folios that fail the checks: mapped, locked, already free, underflowing
    rest = [h for h in small if h not in small[::3] and h not in old]
    m.folio_mapcount_add(rest[1], 1)
    assert m.folio_locks.folio_trylock(cpu, rest[2])
    m.folio_ref_add(rest[4], 1)
    m.folios_put(cpu, rest[:6] + [small[0]])  # small[0] was freed above: an underflow
    m.folio_put(cpu, small[3])  # freed above too: another underflow, through folio_put
    m.folios_put(cpu, [large[0], large[2], large[3]])
    # a stale write into a freed frame, seen when it is handed out again
    m.frames.store64(large[0] * m.page_size + 8 * 3, 7)
    out += [m.alloc_folio(cpu, o, zero=bool(o & 1)) for o in (4, 0, 1, 9, 5)]
    out.append(m.nr_free())
    return out


def _side_by_side(script: Callable[[Machine, CpuContext], list[object]], sabotage: Callable[[Machine], None] | None = None) -> tuple[bool, bool, bool]:
    """Run ``script`` on a machine with the Buddy and on one running the Python steps: (same
    results, same words, same violations)."""
    config = _config()
    ma, mb = Machine.create(config), Machine.create(config)
    try:
        assert ma._buddy is not None
        mb._buddy = None  # the scheduled backend's path
        if sabotage:
            sabotage(ma)
        a, b = CpuContext(ma, 0, "khugepaged", config, capacity=1), CpuContext(mb, 0, "khugepaged", config, capacity=1)
        try:
            ra, rb = script(ma, a), script(mb, b)
            return ra == rb, _state(ma) == _state(mb), _violations(a) == _violations(b) != []
        finally:
            a.rec.close()
            b.rec.close()
    finally:
        ma.close()
        mb.close()


def test_the_buddy_in_c_leaves_the_words_and_violations_its_python_steps_leave():
    assert _side_by_side(_script) == (True, True, True)


def test_the_buddy_comparison_sees_a_batch_freed_in_another_order():
    """The negative control: the same folios freed in reverse order build other free lists."""

    class Reversed:
        def __init__(self, buddy):
            self.b = buddy

        def free(self, heads):
            return self.b.free(list(heads)[::-1])

        def __getattr__(self, name):
            return getattr(self.b, name)

    def sabotage(m: Machine) -> None:
        m._buddy = Reversed(m._buddy)

    same_results, same_words, _ = _side_by_side(_script, sabotage)
    assert not same_words


def test_a_corrupted_free_list_is_recorded_by_either_path():
    """__list_del_entry_valid(): the C allocation hands a corrupted list to the Python steps,
    which record list_del corruption and end the run, on both machines alike."""

    def corrupt(m: Machine, cpu: CpuContext) -> list[object]:
        pfn = m.alloc_folio(cpu, 0)
        head = m.ctl.load32(FREE_HEADS)  # the order-0 list's first block (the split's remains)
        m._rf.store32(m._o_order + head * 4, 3)  # no longer an order-0 block
        with pytest.raises(Stopped):
            m.alloc_folio(cpu, 0)
        return [pfn, head]

    assert _side_by_side(corrupt) == (True, True, True)


def test_the_scheduled_backends_machine_runs_the_python_steps():
    class Wrapped:
        def __init__(self, r):
            self.r = r

        def __getattr__(self, name):
            return getattr(self.r, name)

    m = Machine.create(_config(), wrap=lambda name, r: Wrapped(r))
    try:
        assert m._buddy is None
        cpu = CpuContext(m, 0, "khugepaged", _config(), capacity=1)
        try:
            h = m.alloc_folio(cpu, 2)
            m.folios_put(cpu, [h])
            assert m.folio_head(h) == -1 and m.frames.load64(h * m.page_size) == POISON_FREE
        finally:
            cpu.rec.close()
    finally:
        m.close()


def test_folios_of_a_small_range_is_np_unique_without_its_cost():
    """Collapse.folios_of() counts a small snapshot's folios with a dict instead of np.unique():
    the same heads (sorted, same dtype) and counts, so the batched rmap updates after it touch
    the same words in the same order.  The negative control: the dict's own (first-seen) order
    is not np.unique()'s, and the comparison sees it."""
    import numpy as np
    from ptlab.core.kernel.khugepaged import Collapse

    config = _config()
    m = Machine.create(config)
    try:
        cpu = CpuContext(m, 0, "khugepaged", config, capacity=1)
        try:
            rng = np.random.default_rng(7)
            heads = m.f["head"]
            heads[:200] = rng.integers(0, 60, size=200)  # frames 0..199 belong to folios 0..59
            c = Collapse(cpu=cpu, start=0, order=4)
            unordered = 0
            for n in (1, 5, 16, 64, 65, 200):
                pfns = rng.permutation(200)[:n].astype(np.int64)
                got, want = c.folios_of(pfns), np.unique(heads[pfns], return_counts=True)
                assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
                assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
                first_seen = list(dict.fromkeys(heads[pfns].tolist()))
                unordered += first_seen != want[0].tolist()
            assert unordered  # the check would see a result left in first-seen order
        finally:
            cpu.rec.close()
    finally:
        m.close()
