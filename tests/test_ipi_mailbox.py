"""TLB-flush delivery: the IPI mailbox over every interleaving of a poster and the handler,
and the broadcast ring when a slot is rewritten under its reader.

Concurrent flush requests to one CPU merge into its mailbox (range, highest generation, count,
request number, flag: CpuContext.post_flush); the handler (CpuContext.service_ipi) takes them
and runs flush_tlb_func()'s generation rule — a partial flush only when the request takes the
CPU from its local generation to the mm's in one step.  The kernel delivers each request whole
(one flush_tlb_info per csd), so the merge must never make the handler flush a partial range
for a generation whose range it has not taken whole.

The scenario: CPU 0 has pages 0..63 in its TLB (its 64 entries) and is up to date with
generation 5, but still has the request of generation 5 (a zap of pages 40..47) in its
mailbox, flag up.  CPU 1 changed the range (generation 6) and posts [0, 64) while CPU 0
handles its mailbox.
Every interleaving of the two at each of their shared-word operations is run (stateless
depth-first search, each schedule replayed from the same start); at the end, with CPU 0 having
handled whatever is left, no page of the range may still be in its TLB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import greenlet
from _stepper import Stepper
from ptlab.core.machine.cpu import NO_RANGE_START, CpuContext
from ptlab.core.machine.layout import (
    CPU_IPI_ACK,
    CPU_IPI_END,
    CPU_IPI_FLAG,
    CPU_IPI_GEN,
    CPU_IPI_NGEN,
    CPU_IPI_REQ,
    CPU_IPI_START,
    MM_TLB_GEN,
)

N = 64  # the range CPU 1 flushes: as many pages as a TLB holds
OPS = ("load32", "load64", "store32", "store64", "xchg32", "xchg64", "cas32", "cas64", "fetch_add32", "fetch_add64")


class Yielding:
    """A region that hands control back to the scheduler before every operation on a watched
    word (the other methods pass through)."""

    def __init__(self, inner: Any, watched: set[int], before: Callable[[], None]) -> None:
        self._inner, self._watched, self._before = inner, watched, before

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)
        if name not in OPS:
            return fn

        def op(off: int, *args: int) -> Any:
            if off in self._watched:
                self._before()
            return fn(off, *args)

        return op


@contextlib.contextmanager
def two_cpus() -> Iterator[tuple[Stepper, CpuContext, CpuContext]]:
    """A machine and two registered CPUs driven only from this thread (no CPU threads: nothing
    but the schedule touches the mailbox)."""
    with Stepper(populate=False) as st:
        cpus = [CpuContext(st.m, i, "app", st.config, capacity=16) for i in (0, 1)]
        try:
            for c in cpus:
                c.register()
            yield st, cpus[0], cpus[1]
        finally:
            for c in cpus:
                c.rec.close()


def _explore(service: Callable[[Any], None]) -> tuple[int, list[tuple[list[int], list[int]]]]:
    """Run every interleaving; returns (schedules run, [(schedule, pages left in CPU 0's TLB)])."""
    with two_cpus() as (st, a, f):
        return _search(st, a, f, service)


def _search(st: Stepper, a: CpuContext, f: CpuContext, service: Callable[[Any], None]) -> tuple[int, list[tuple[list[int], list[int]]]]:
    ctl = st.m.ctl
    b = st.m.L.cpu(a.id)
    # the words both sides touch (the mm's generation is already 6; the ack only the handler writes)
    watched = {b + x for x in (CPU_IPI_FLAG, CPU_IPI_REQ, CPU_IPI_START, CPU_IPI_END, CPU_IPI_GEN, CPU_IPI_NGEN)}
    real = a.ctl
    main = greenlet.getcurrent()
    bad: list[tuple[list[int], list[int]]] = []

    def reset() -> None:
        a.tlb.clear()
        for v in range(N):
            a.tlb_fill(v, 1000 + v, True)
        a.local_gen = 5
        for off, v in ((CPU_IPI_START, 40), (CPU_IPI_END, 48), (CPU_IPI_GEN, 5), (CPU_IPI_NGEN, 1), (CPU_IPI_REQ, 1), (CPU_IPI_ACK, 0)):
            ctl.store64(b + off, v)
        ctl.store32(b + CPU_IPI_FLAG, 1)
        ctl.store64(MM_TLB_GEN, 6)  # CPU 1's flush_tlb_range() has moved the generation

    def run(schedule: list[int]) -> tuple[list[int], list[int]]:
        """Run one schedule (choices at each step: 0 = handler, 1 = poster), extending it with
        the first runnable task; returns the full schedule and how many tasks were runnable
        at each step."""
        reset()
        tasks = [greenlet.greenlet(lambda: service(a), parent=main), greenlet.greenlet(lambda: f.post_flush(a.id, 0, N, 6), parent=main)]
        yield_to_main = lambda: main.switch()  # noqa: E731
        a.ctl = Yielding(real, watched, yield_to_main)
        f.ctl = Yielding(real, watched, yield_to_main)
        done, taken, width = [False, False], [], []
        try:
            while not all(done):
                runnable = [i for i in (0, 1) if not done[i]]
                k = len(taken)
                pick = schedule[k] if k < len(schedule) else runnable[0]
                assert pick in runnable
                taken.append(pick)
                width.append(len(runnable))
                tasks[pick].switch()
                if tasks[pick].dead:
                    done[pick] = True
        finally:
            a.ctl = f.ctl = real
        if a.ctl.load32(b + CPU_IPI_FLAG):  # what is left in the mailbox is handled next
            service(a)
        assert ctl.load64(b + CPU_IPI_ACK) >= 2, "both requests must be acknowledged"
        left = sorted(v for v in range(N) if v in a.tlb)
        if left:
            bad.append((taken, left))
        return taken, width

    # stateless depth-first search over the schedules
    runs = 0
    stack: list[list[int]] = [[]]
    while stack:
        prefix = stack.pop()
        taken, width = run(prefix)
        runs += 1
        for k in range(len(prefix), len(taken)):
            if width[k] == 2:
                stack.append(taken[:k] + [1 - taken[k]])
    return runs, bad


def test_every_interleaving_of_a_post_and_the_handler_flushes_the_whole_range():
    runs, bad = _explore(lambda cpu: cpu.service_ipi())
    assert runs > 500  # the search really interleaved them
    assert not bad, f"{len(bad)} of {runs} schedules left stale pages, e.g. {bad[0][1][:8]}… after {bad[0][0]}"


def _service_range_first(cpu: Any) -> None:
    """The handler taking the range before the generation (the order this mailbox had before):
    it can see a generation whose range it took only in part."""
    ctl, b = cpu.ctl, cpu.base
    ctl.xchg32(b + CPU_IPI_FLAG, 0)
    req = ctl.load64(b + CPU_IPI_REQ)
    start = ctl.xchg64(b + CPU_IPI_START, NO_RANGE_START)
    end = ctl.xchg64(b + CPU_IPI_END, -1)
    new_gen = ctl.xchg64(b + CPU_IPI_GEN, 0)
    nreq = ctl.xchg64(b + CPU_IPI_NGEN, 0)
    if start <= end:
        cpu.flush_tlb_func(start, end, new_gen if nreq == 1 else -1)
    ctl.store64(b + CPU_IPI_ACK, req)


def test_the_search_catches_a_handler_that_takes_the_range_first():
    """The check above fails on the range-first handler: a partial flush of [40, 64) for
    generation 6 while pages 0..39 of CPU 1's request were left behind."""
    runs, bad = _explore(_service_range_first)
    assert bad, f"no stale page in {runs} schedules"
    assert any(left[0] == 0 and left[-1] < 40 for _, left in bad)


def test_a_lone_request_is_a_partial_flush():
    """The generation rule still allows the partial flush: one request, one step behind."""
    with two_cpus() as (st, a, f):
        for v in range(N):
            a.tlb_fill(v, 1000 + v, True)
        a.local_gen = st.m.ctl.load64(MM_TLB_GEN)
        st.m.ctl.store64(MM_TLB_GEN, a.local_gen + 1)
        f.post_flush(a.id, 10, 20, a.local_gen + 1)
        a.service_ipi()
        assert [v for v in range(N) if v not in a.tlb] == list(range(10, 20))


def test_a_broadcast_slot_rewritten_under_the_reader_clears_the_tlb():
    """Broadcast mode: invalidation g's range sits in ring slot g % BCAST_RING until the claim
    BCAST_RING later rewrites it — before that claim is published.  A CPU reading slot g just
    after the rewrite drops the wrong range; it must notice the claim and flush everything."""
    from ptlab.core.machine.cpu import BCAST_CLAIM
    from ptlab.core.machine.layout import BCAST, BCAST_RING, TLB_GEN

    with two_cpus() as (st, a, _):
        ctl = st.m.ctl
        for v in range(N):
            a.tlb_fill(v, 1000 + v, True)
        g0 = ctl.load64(TLB_GEN)
        a.tlb_gen = g0
        g = g0 + 1
        slot = BCAST + (g % BCAST_RING) * 16
        ctl.store64(slot, 0)
        ctl.store64(slot + 8, N)  # invalidation g: [0, N), published
        ctl.store64(BCAST_CLAIM, g)
        ctl.store64(TLB_GEN, g)
        # BCAST_RING claims later, one flusher has claimed g + BCAST_RING and rewritten slot g
        ctl.store64(BCAST_CLAIM, g + BCAST_RING)
        ctl.store64(slot, 5000)
        ctl.store64(slot + 8, 5008)
        a.check_broadcast()
        assert not [v for v in range(N) if v in a.tlb]
