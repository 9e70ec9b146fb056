"""Calibration: what each primitive costs from Python, beside a C reference, in the same run.

Every time in a ptlab result is the time of Python code driving real atomics, spins and futex
sleeps.  Calibration says how much slower than C each step ran -- the *dilation* -- so that "the
PTL was held 40 µs" can be read in kernel terms, and so that a result from a slower host is not
mistaken for a slower strategy.  Each primitive runs here beside a reference loop of the same
extension (``ptlab.core._prims.ref_*``) on the same words of the same shared segments, with the
same process placement, in the same run; batches of the two are interleaved so that drift
(frequency, a noisy neighbour) lands on both.

A row is ``{primitive, unit, median, p99, reference_median, ratio}``:

  - unit ``ns/op``: one batch's mean ns per operation; median and p99 are over the batches.
    The Python number includes its ``for`` loop (about 11 ns here), the C loop's is ~0.3 ns:
    a Python primitive is never used without some Python around it, so this is the honest
    per-call cost (an upper bound on the call alone);
  - unit ``ns``: per event -- one copy, one wake-up, one TLB-flush round trip;
  - ``ratio`` = median / reference_median (None without a reference), always a time ratio
    (> 1: Python is slower).  For the copies the fraction of memcpy bandwidth is 1 / ratio,
    so "≥ 50 % of memcpy bandwidth" reads ``ratio <= 2``.

Primitives (``run_calibration``; ``quick_calibration`` runs the ones marked q, in-process):

  q load64 store64 cas64 fetch_add64   one Region call; ref_loop of the same op
  q spin_lock_unlock         SpinLock.lock + unlock (the machine's ptl[0], as the kernel paths
                             take it); ref_loop spin_lock_unlock on the same kind of word
  q spin_lock_unlock_raw     Region.spin_lock + spin_unlock, without the lock class
    spin_contended           two processes x locked increments of a plain counter (SpinLock),
                             each on its own core when there are two, started together batch by
                             batch; a batch's value is the slower process's ns per increment.
                             ref_spin_contended in the same two processes, the same way.  Both
                             counters are checked for exactness.
  q rwsem_read_pair rwsem_write_pair   anon_vma down/up, uncontended (no C reference)
  q folio_lock_unlock        folio_lock + folio_unlock, uncontended (no C reference)
    futex_wake_to_run        waker stamps the clock and FUTEX_WAKEs; the sleeper, in another
                             process, reads the clock when it runs.  Waker and sleeper each
                             pinned to its own core (as a run pins its CPUs); the reference is
                             the same ping-pong between two pthreads with the same pinning
    futex_wake_to_run_same_core   the same with both on one core (no idle-exit latency)
  q copy_4k                  Machine.copy_page of one 4 KiB frame; ref_copy of 4 KiB
  q copy_2m                  one Region.copy of a 2 MiB folio; ref_copy (memcpy) of 2 MiB
  q copy_2m_pages            512 x Machine.copy_page, as __collapse_huge_page_copy() runs it
    tlb_flush_1 tlb_flush_2  flush_tlb_range() round trip in ipi mode to 1 and 2 target CPU
                             processes that loop on interrupt_point() (no C reference).  With
                             fewer than 3 usable cores the two targets share one core and yield
                             to each other in their loop, so no more processes spin than there
                             are cores.

``kernel_costs`` (``ptlab calibrate --kernel``, at the end of this module) is a different
measurement: not Python beside C, but what each *kernel* step costs this host's kernel, for the
virtual clock -- C loops of ``ptlab.core._kprobe`` (cost_*) time loads, atomics, cache-line
transfers, page copies and clears, TLB walks, IPI round trips (membarrier), wake-ups, context
switches, faults, mmap() and MADV_COLLAPSE; the rest is cited or derived, and core/costs.py
holds and checks the table.

The second processes are started with multiprocessing's spawn (never Ray, never fork: the caller
may hold threads), attach by name, and are killed if they overrun; the creator unlinks every
segment in ``finally``.  As with any spawn user, a script that calls ``run_calibration()`` must
keep its top level under ``if __name__ == "__main__":`` (the ptlab command and pytest do).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ptlab.core import _prims
from ptlab.core._prims import Region, now_ns
from ptlab.core.config import RunConfig
from ptlab.core.cpu import CpuContext, attached_cpu
from ptlab.core.errors import ConfigError, RunFailed
from ptlab.core.layout import MM_CPUMASK
from ptlab.core.machine import Machine
from ptlab.core.shm import Namespace

Progress = Callable[[str, float], None]

CALIBRATION_FILE = "calibration.arrow"
# Bump when the columns or their meaning change; stored in the file's metadata.
CALIBRATION_FORMAT = 1

SCHEMA = pa.schema(
    [
        pa.field("primitive", pa.string(), nullable=False),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("median", pa.float64(), nullable=False),
        pa.field("p99", pa.float64(), nullable=False),
        pa.field("reference_median", pa.float64(), nullable=True),
        pa.field("ratio", pa.float64(), nullable=True),
    ]
)

# Targets from the project's issue: primitive -> (text, check(row) -> bool).
TARGETS: dict[str, tuple[str, Callable[[Mapping[str, Any]], bool]]] = {
    "cas64": ("≤ 60 ns", lambda r: r["median"] <= 60.0),
    "spin_lock_unlock": (
        "≤ 120 ns, ≤ 12×",
        lambda r: r["median"] <= 120.0 and r["ratio"] is not None and r["ratio"] <= 12.0,
    ),
    "futex_wake_to_run": ("p50 ≤ 1.5×", lambda r: r["ratio"] is not None and r["ratio"] <= 1.5),
    "copy_2m": ("≥ 50 % of memcpy", lambda r: r["ratio"] is not None and r["ratio"] <= 2.0),
}

# ---- the scratch segment (beside the machine's own) ------------------------------------------
S_READY = 0  # u32: children attached and registered
S_STOP = 4  # u32: parent -> children: stop looping
S_BARRIER = 8  # u32: children's phase barrier
S_FUTEX = 64  # u32 futex word of the wake-to-run ping-pong (own line)
S_STAMP = 72  # i64: the waker's clock stamp
S_WORD = 128  # i64: the word of the single-word atomics (own line)
S_RESULTS = 4096  # f64[2 slots][2 phases][MAX_BATCHES]
MAX_BATCHES = 64
S_SAMPLES = S_RESULTS + 2 * 2 * MAX_BATCHES * 8  # f64 futex samples
MAX_SAMPLES = 8192
SCRATCH = {"scratch": S_SAMPLES + MAX_SAMPLES * 8}

CHILD_START_S = 60.0  # spawn + imports; generous for a loaded CI host
CHILD_RUN_S = 60.0


def _config(nr_cpus: int) -> RunConfig:
    # the smallest machine: one PMD of pages, 3072 frames (12 MiB), ipi flushes, split PTLs
    return RunConfig(cpus={"app": nr_cpus}, nr_pmds=1, flush="ipi", duration_s=1.0, warmup_s=0.0)


def _row(primitive: str, unit: str, values: Sequence[float], ref: Sequence[float] | None) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    median = float(np.median(v))
    ref_median = float(np.median(np.asarray(ref, dtype=np.float64))) if ref else None
    return {
        "primitive": primitive,
        "unit": unit,
        "median": median,
        "p99": float(np.percentile(v, 99)),
        "reference_median": ref_median,
        "ratio": median / ref_median if ref_median else None,
    }


class _Lab:
    """A small machine plus the scratch segment, with CPU 0 registered in this process."""

    def __init__(self, nr_cpus: int) -> None:
        self.config = _config(nr_cpus)
        self.m = Machine.create(self.config)
        try:
            self.scratch = Namespace.create(SCRATCH)
        except BaseException:
            self.m.close()
            raise
        self.s = self.scratch["scratch"].region
        self.cpu = CpuContext(self.m, 0, "app", self.config, capacity=1)
        self.cpu.register()

    def close(self) -> None:
        try:
            self.cpu.rec.close()
        finally:
            try:
                self.scratch.close()
            finally:
                self.m.close()


@contextmanager
def _lab(nr_cpus: int) -> Iterator[_Lab]:
    lab = _Lab(nr_cpus)
    try:
        yield lab
    finally:
        lab.close()


# ---- in-process measurements ------------------------------------------------------------------
# Each Python batch returns its mean ns per operation; locals are bound outside the loop, as a
# hot kernel path in ptlab binds them.

def _b_load(r: Region, off: int, n: int) -> float:
    op = r.load64
    t0 = now_ns()
    for _ in range(n):
        op(off)
    return (now_ns() - t0) / n


def _b_store(r: Region, off: int, n: int) -> float:
    op = r.store64
    t0 = now_ns()
    for _ in range(n):
        op(off, 1)
    return (now_ns() - t0) / n


def _b_cas(r: Region, off: int, n: int) -> float:
    op = r.cas64
    t0 = now_ns()
    for _ in range(n):
        op(off, 0, 0)  # succeeds: the word stays 0 (the reference succeeds every time too)
    return (now_ns() - t0) / n


def _b_fetch_add(r: Region, off: int, n: int) -> float:
    op = r.fetch_add64
    t0 = now_ns()
    for _ in range(n):
        op(off, 1)
    return (now_ns() - t0) / n


def _b_spin_class(lab: _Lab, n: int) -> float:
    ptl, cpu = lab.m.ptl(0), lab.cpu
    lock, unlock = ptl.lock, ptl.unlock
    t0 = now_ns()
    for _ in range(n):
        lock(cpu)
        unlock(cpu)
    return (now_ns() - t0) / n


def _b_spin_raw(r: Region, off: int, me: int, ipi_off: int, n: int) -> float:
    lock, unlock = r.spin_lock, r.spin_unlock
    t0 = now_ns()
    for _ in range(n):
        lock(off, me, ipi_off, 20_000_000)
        unlock(off)
    return (now_ns() - t0) / n


def _b_rwsem_read(lab: _Lab, n: int) -> float:
    sem, cpu = lab.m.anon_vma, lab.cpu
    down, up = sem.down_read, sem.up_read
    t0 = now_ns()
    for _ in range(n):
        down(cpu)
        up(cpu)
    return (now_ns() - t0) / n


def _b_rwsem_write(lab: _Lab, n: int) -> float:
    sem, cpu = lab.m.anon_vma, lab.cpu
    down, up = sem.down_write, sem.up_write
    t0 = now_ns()
    for _ in range(n):
        down(cpu)
        up(cpu)
    return (now_ns() - t0) / n


def _b_folio(lab: _Lab, n: int) -> float:
    fl, cpu = lab.m.folio_locks, lab.cpu
    lock, unlock = fl.folio_lock, fl.folio_unlock
    t0 = now_ns()
    for _ in range(n):
        lock(cpu, 0)
        unlock(cpu, 0)
    return (now_ns() - t0) / n


def _b_copy_page(lab: _Lab, dst: int, src: int, n: int) -> float:
    copy_page = lab.m.copy_page
    t0 = now_ns()
    for _ in range(n):
        copy_page(dst, src)
    return (now_ns() - t0) / n


def _b_copy_2m(lab: _Lab, dst: int, src: int, n: int) -> float:
    frames, ps = lab.m.frames, lab.m.page_size
    t0 = now_ns()
    for _ in range(n):
        frames.copy(dst * ps, src * ps, 512 * ps)
    return (now_ns() - t0) / n


def _b_copy_2m_pages(lab: _Lab, dst: int, src: int, n: int) -> float:
    copy_page = lab.m.copy_page
    t0 = now_ns()
    for _ in range(n):
        for j in range(512):
            copy_page(dst + j, src + j)
    return (now_ns() - t0) / n


def _paired(py: Callable[[], float], ref: Callable[[], float] | None, batches: int) -> tuple[list[float], list[float] | None]:
    """Interleave Python and reference batches (one untimed warm-up each)."""
    py()
    if ref:
        ref()
    xs: list[float] = []
    rs: list[float] = []
    for _ in range(batches):
        xs.append(py())
        if ref:
            rs.append(ref())
    return xs, (rs if ref else None)


def _in_process(lab: _Lab, scale: float, say: Progress, frac0: float, frac1: float) -> list[dict[str, Any]]:
    """The primitives that need no second process.  ``scale`` shrinks batches for quick runs."""
    m, s = lab.m, lab.s
    ctl = m.ctl
    batches = max(5, int(40 * scale))

    def n(base: int) -> int:
        return max(16, int(base * scale))

    rows: list[dict[str, Any]] = []
    steps: list[tuple[str, str, Callable[[], float], Callable[[], float] | None]] = []

    def word_op(name: str, fn: Callable[[Region, int, int], float]) -> None:
        steps.append(
            (
                name,
                "ns/op",
                lambda: fn(s, S_WORD, n(20_000)),
                lambda: _prims.ref_loop(s, name, S_WORD, n(200_000)),
            )
        )

    for name, fn in (("load64", _b_load), ("store64", _b_store), ("cas64", _b_cas), ("fetch_add64", _b_fetch_add)):
        word_op(name, fn)
    raw = m.ptl(1)  # a free PTL word: same layout as the class's lock, no stats touched

    def ref_spin() -> float:
        return float(_prims.ref_loop(ctl, "spin_lock_unlock", raw.off, n(200_000)))

    steps += [
        ("spin_lock_unlock", "ns/op", lambda: _b_spin_class(lab, n(10_000)), ref_spin),
        (
            "spin_lock_unlock_raw",
            "ns/op",
            lambda: _b_spin_raw(ctl, raw.off, lab.cpu.owner_tag, lab.cpu.ipi_flag_off, n(10_000)),
            ref_spin,
        ),
        ("rwsem_read_pair", "ns/op", lambda: _b_rwsem_read(lab, n(5_000)), None),
        ("rwsem_write_pair", "ns/op", lambda: _b_rwsem_write(lab, n(5_000)), None),
        ("folio_lock_unlock", "ns/op", lambda: _b_folio(lab, n(5_000)), None),
    ]
    # frames 0..511 -> 1024..1535: two distinct 2 MiB ranges (the machine has 3072 frames)
    src, dst = 0, 1024
    fr, ps = m.frames, m.page_size
    steps += [
        (
            "copy_4k",
            "ns",
            lambda: _b_copy_page(lab, dst, src, n(2_000)),
            lambda: _prims.ref_copy(fr, dst * ps, src * ps, ps, n(2_000)),
        ),
        (
            "copy_2m",
            "ns",
            lambda: _b_copy_2m(lab, dst, src, max(2, n(8))),
            lambda: _prims.ref_copy(fr, dst * ps, src * ps, 512 * ps, max(2, n(8))),
        ),
        (
            "copy_2m_pages",
            "ns",
            lambda: _b_copy_2m_pages(lab, dst, src, max(1, n(4))),
            lambda: _prims.ref_copy(fr, dst * ps, src * ps, 512 * ps, max(2, n(8))),
        ),
    ]
    for i, (name, unit, py, ref) in enumerate(steps):
        say(name, frac0 + (frac1 - frac0) * i / len(steps))
        xs, rs = _paired(py, ref, batches)
        rows.append(_row(name, unit, xs, rs))
    return rows


# ---- child processes ------------------------------------------------------------------------
def _spawn() -> Any:
    return multiprocessing.get_context("spawn")


def _child(job: str, prefix: str, scratch_prefix: str, config: dict[str, Any], cpu_id: int, pin: int | None, args: dict[str, Any]) -> None:
    """Entry point of a calibration child: attach, register as CPU ``cpu_id``, run ``job``."""
    scratch = Namespace.attach(scratch_prefix, SCRATCH)
    try:
        with attached_cpu(RunConfig.from_dict(config), prefix, cpu_id, pin_core=pin) as cpu:
            try:
                _JOBS[job](cpu.m, cpu, scratch["scratch"], **args)
            finally:
                cpu.leave_cpumask()
    finally:
        scratch.close()


def _barrier(s: Region, parties: int, generation: int) -> None:
    s.fetch_add32(S_BARRIER, 1)
    deadline = now_ns() + int(CHILD_START_S * 1e9)
    while s.load32(S_BARRIER) < parties * generation:
        if s.load32(S_STOP) or now_ns() > deadline:
            raise TimeoutError("calibration barrier: the other process did not arrive")


def _job_spin_contended(m: Machine, cpu: CpuContext, seg: Any, slot: int, batches: int, n: int, ref_n: int) -> None:
    """Locked increments of a plain counter, batch by batch in step with the other process
    (a barrier before each batch, so that the two always compete)."""
    s = seg.region
    res = seg.view(np.float64, S_RESULTS, 2 * 2 * MAX_BATCHES)
    lock, ctl = m.ptl(0), m.ctl
    counter = m.ptl(3).off  # a plain word on its own line, protected by ptl[0]
    s.fetch_add32(S_READY, 1)
    gen = 0
    for b in range(batches):
        gen += 1
        _barrier(s, 2, gen)
        t0 = now_ns()
        for _ in range(n):
            lock.lock(cpu)
            ctl.store64(counter, ctl.load64(counter) + 1)  # load + store: only the lock makes it exact
            lock.unlock(cpu)
        res[(slot * 2 + 0) * MAX_BATCHES + b] = now_ns() - t0
    for b in range(batches):
        gen += 1
        _barrier(s, 2, gen)
        res[(slot * 2 + 1) * MAX_BATCHES + b] = ref_n * _prims.ref_spin_contended(ctl, m.ptl(2).off, m.ptl(4).off, ref_n)


def _job_futex_sleeper(m: Machine, cpu: CpuContext, seg: Any, n: int) -> None:
    """The sleeper's half of the ref_futex_wake_to_run protocol, on a word in shared memory."""
    s = seg.region
    out = seg.view(np.float64, S_SAMPLES, MAX_SAMPLES)
    wait, wake, load32, store32 = s.futex_wait, s.futex_wake, s.load32, s.store32
    s.fetch_add32(S_READY, 1)
    for i in range(n):
        store32(S_FUTEX, 1)  # my turn to sleep
        while load32(S_FUTEX) == 1:
            if wait(S_FUTEX, 1, 1_000_000_000) == 2 and load32(S_STOP):
                return
        t = now_ns()
        out[i] = t - s.load64(S_STAMP)
        store32(S_FUTEX, 3)  # tell the waker I ran
        wake(S_FUTEX, 1)


def _job_tlb_target(m: Machine, cpu: CpuContext, seg: Any, share: bool) -> None:
    """A CPU between accesses: take flush IPIs at interrupt points until told to stop."""
    s = seg.region
    ip, stop = cpu.interrupt_point, s.load32
    s.fetch_add32(S_READY, 1)
    if share:
        yield_ = os.sched_yield
        while not stop(S_STOP):
            ip()
            yield_()
    else:
        while not stop(S_STOP):
            ip()


_JOBS: dict[str, Callable[..., None]] = {
    "spin_contended": _job_spin_contended,
    "futex_sleeper": _job_futex_sleeper,
    "tlb_target": _job_tlb_target,
}


class _Children:
    """Calibration children of one measurement: started by spawn, always reaped."""

    def __init__(self, lab: _Lab) -> None:
        self.lab = lab
        self.procs: list[Any] = []

    def start(self, job: str, cpu_id: int, pin: int | None, **args: Any) -> None:
        p = _spawn().Process(
            target=_child,
            args=(job, self.lab.m.prefix, self.lab.scratch.prefix, self.lab.config.to_dict(), cpu_id, pin, args),
            name=f"ptlab-calibrate-{job}-{cpu_id}",
            daemon=True,
        )
        p.start()
        self.procs.append(p)

    def wait_ready(self, count: int) -> None:
        deadline = time.monotonic() + CHILD_START_S
        while self.lab.s.load32(S_READY) < count:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RunFailed(f"calibration: {count} child processes did not start within {CHILD_START_S:.0f} s")
            time.sleep(0.002)

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.exitcode not in (None, 0):
                raise RunFailed(f"calibration: child process {p.name} failed (exit code {p.exitcode})")

    def join(self, timeout: float = CHILD_RUN_S) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                raise RunFailed(f"calibration: child process {p.name} did not finish within {timeout:.0f} s")
        self._check_alive()

    def close(self) -> None:
        """Stop, then kill what is left; reset the scratch words for the next measurement."""
        s = self.lab.s
        s.store32(S_STOP, 1)
        s.futex_wake(S_FUTEX, 1 << 30)
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        self.procs.clear()
        for off in (S_READY, S_STOP, S_BARRIER, S_FUTEX):
            s.store32(off, 0)


@contextmanager
def _children(lab: _Lab) -> Iterator[_Children]:
    ch = _Children(lab)
    try:
        yield ch
    finally:
        ch.close()


@contextmanager
def _pinned(core: int | None) -> Iterator[None]:
    """Pin this thread to one host core for a measurement, restoring the mask afterwards."""
    if core is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _spin_contended(lab: _Lab, batches: int = 20, n: int = 2_000, ref_n: int = 20_000) -> dict[str, Any]:
    cores = _cores()
    m = lab.m
    for off in (m.ptl(3).off, m.ptl(4).off):
        m.ctl.store64(off, 0)
    with _children(lab) as ch:
        for slot in range(2):
            ch.start("spin_contended", 1 + slot, cores[slot % len(cores)] if len(cores) >= 2 else None,
                     slot=slot, batches=batches, n=n, ref_n=ref_n)
        ch.wait_ready(2)
        ch.join()
    got, ref_got = m.ctl.load64(m.ptl(3).off), m.ctl.load64(m.ptl(4).off)
    if got != 2 * batches * n or ref_got != 2 * batches * ref_n:
        raise RunFailed(
            f"calibration: the spinlock lost updates ({got} of {2 * batches * n} Python, "
            f"{ref_got} of {2 * batches * ref_n} C increments): the lock is broken"
        )
    # per batch: the slower process's ns per increment (the two started it together)
    res = lab.scratch["scratch"].view(np.float64, S_RESULTS, 2 * 2 * MAX_BATCHES).reshape(2, 2, MAX_BATCHES)
    py = (res[:, 0, :batches].max(axis=0) / n).tolist()
    ref = (res[:, 1, :batches].max(axis=0) / ref_n).tolist()
    return _row("spin_contended", "ns/op", py, ref)


def _futex_wake_to_run(lab: _Lab, name: str, waker: int | None, sleeper: int | None, n: int = 2_000) -> dict[str, Any]:
    """Python waker here, Python sleeper in a child; the C pair before and after."""
    n = min(n, MAX_SAMPLES)
    skip = min(100, n // 10)  # the first wake-ups of each side pay for cold caches and page faults
    wc = -1 if waker is None else waker
    sc = -1 if sleeper is None else sleeper
    ref = _prims.ref_futex_wake_to_run(n // 2 + skip, wc, sc)[skip:]
    s = lab.s
    with _children(lab) as ch, _pinned(waker):
        ch.start("futex_sleeper", 1, sleeper, n=n)
        ch.wait_ready(1)
        load32, store32, store64, wake, wait = s.load32, s.store32, s.store64, s.futex_wake, s.futex_wait
        deadline = time.monotonic() + CHILD_RUN_S
        for _ in range(n):
            spins = 0
            while load32(S_FUTEX) != 1:  # the sleeper is about to sleep
                spins += 1
                if spins & 0xFFFF == 0:
                    ch._check_alive()
                    if time.monotonic() > deadline:
                        raise RunFailed("calibration: the futex sleeper stopped answering")
            time.sleep(20e-6)  # let it actually go to sleep (the reference's nanosleep(20 µs))
            store64(S_STAMP, now_ns())
            store32(S_FUTEX, 2)
            wake(S_FUTEX, 1)
            while load32(S_FUTEX) == 2:
                if wait(S_FUTEX, 2, 1_000_000_000) == 2:
                    ch._check_alive()
                    if time.monotonic() > deadline:
                        raise RunFailed("calibration: the futex sleeper stopped answering")
        ch.join()
    py = lab.scratch["scratch"].view(np.float64, S_SAMPLES, n)[skip:].tolist()
    ref += _prims.ref_futex_wake_to_run(n // 2 + skip, wc, sc)[skip:]
    return _row(name, "ns", py, ref)


def _tlb_flush(lab: _Lab, targets: int, n: int = 2_000) -> dict[str, Any]:
    cores = _cores()
    share = len(cores) < targets + 1
    me = cores[0]
    pins = [cores[min(1 + t, len(cores) - 1)] if len(cores) >= 2 else None for t in range(targets)]
    cpu = lab.cpu
    with _children(lab) as ch, _pinned(me if len(cores) >= 2 else None):
        for t in range(targets):
            ch.start("tlb_target", 1 + t, pins[t], share=share)
        ch.wait_ready(targets)
        mask = (1 << (targets + 1)) - 1
        while lab.m.ctl.load64(MM_CPUMASK) & mask != mask:
            ch._check_alive()
            time.sleep(0.001)
        samples = [cpu.flush_tlb_range(0, 512) for _ in range(n + 50)][50:]
    return _row(f"tlb_flush_{targets}", "ns", samples, None)


# ---- public API ---------------------------------------------------------------------------------
def quick_calibration(progress: Progress | None = None) -> list[dict[str, Any]]:
    """The in-process subset (atomics, uncontended lock pairs, copies) in well under 0.5 s, with
    no child process: embedded in every result file.  Rows as in :func:`run_calibration`."""
    say = progress or (lambda msg, frac: None)
    with _lab(1) as lab:
        rows = _in_process(lab, 0.1, say, 0.0, 1.0)
    say("done", 1.0)
    return rows


def run_calibration(progress: Progress | None = None) -> list[dict[str, Any]]:
    """Measure every primitive beside its C reference (see the module docstring).

    Returns rows ``{primitive, unit, median, p99, reference_median, ratio}``: units ns/op or
    ns, ratio = median / reference_median (None without a reference).  ``progress(step,
    fraction)`` is called as it goes.  Takes a few seconds (about 4 s on a 2-core VM).
    Raises RunFailed when a child process fails or hangs, or when the spinlock loses an
    update; leaves no shared memory behind.
    """
    say = progress or (lambda msg, frac: None)
    cores = _cores()
    with _lab(3) as lab:
        rows = _in_process(lab, 1.0, say, 0.0, 0.45)
        say("spin_contended", 0.45)
        rows.append(_spin_contended(lab))
        say("futex_wake_to_run", 0.55)
        if len(cores) >= 2:
            rows.append(_futex_wake_to_run(lab, "futex_wake_to_run", cores[0], cores[1]))
        else:
            rows.append(_futex_wake_to_run(lab, "futex_wake_to_run", None, None))
        say("futex_wake_to_run_same_core", 0.7)
        rows.append(_futex_wake_to_run(lab, "futex_wake_to_run_same_core", cores[0], cores[0]))
        say("tlb_flush_1", 0.8)
        rows.append(_tlb_flush(lab, 1))
        say("tlb_flush_2", 0.9)
        rows.append(_tlb_flush(lab, 2))
    say("done", 1.0)
    return rows


def check_targets(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, bool]]:
    """primitive -> (target, met) for the rows that have a target."""
    out = {}
    for r in rows:
        t = TARGETS.get(r["primitive"])
        if t:
            out[r["primitive"]] = (t[0], bool(t[1](r)))
    return out


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Make sure ``out_dir`` can hold the file before anything is measured: create it (and its
    parents) and write and remove a probe file.  Raises ConfigError with the reason."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is not a directory; give a directory for {CALIBRATION_FILE}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{CALIBRATION_FILE}.", suffix=".probe", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out}: {e.strerror or e}; choose another directory") from None
    return out


def calibration_table(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> pa.Table:
    """The rows as an Arrow table of SCHEMA (ratio and reference_median null when absent)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    if meta is not None:
        # not encode_meta(): that stamps the event schema's version, which this file is not
        table = table.replace_schema_metadata({b"ptlab": json.dumps(dict(meta), default=str).encode()})
    return table


def write_calibration(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/calibration.arrow`` atomically (temp file, fsync, rename); returns its
    path.  The metadata (key ``ptlab``) says ``kind: calibration`` and holds the host
    fingerprint.  Raises ConfigError when the directory cannot be created or written."""
    from ptlab.core.results import ResultFileError, write_table

    out = check_out_dir(out_dir)
    try:
        from ptlab.core.host import fingerprint

        host: dict[str, Any] = dict(fingerprint())
    except Exception:  # the file is still useful without it
        host = {}
    meta = {"kind": "calibration", "calibration_format": CALIBRATION_FORMAT, "host": host}
    try:
        return write_table(calibration_table(rows, meta), out / CALIBRATION_FILE)
    except ResultFileError as e:
        raise ConfigError(str(e)) from None


def read_calibration(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a calibration file back into rows."""
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path), "r") as src:
        return ipc.open_file(src).read_all().to_pylist()


# ---- the kernel cost table (`ptlab calibrate --kernel`) ----------------------------------------
# What each kernel step costs the host kernel, in ns, for the virtual clock (core/costs.py holds
# and checks the table).  The C loops are in ptlab.core._kprobe (cost_*): no Python runs inside
# a timed window.  Two statistics, said in every source text: a loop of back-to-back operations
# gives one mean per batch, and the table takes the lower quartile of the batch means (the host's
# two cores are shared, and interference only ever adds time); an event timed on its own (a
# fault, a collapse, an IPI) is taken at its median, as `ptlab kernel` reports them.

KERNEL_COST_PAGES = 512  # HPAGE_PMD_NR: MADV_COLLAPSE collapses PMD order only


def _q25(xs: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), 25))


def _p50(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def _vmstat() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if v.strip().isdigit():
                    out[k] = int(v)
    except OSError:
        pass
    return out


def kernel_result_latencies(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The host kernel's median same-VMA fault (no collapse in flight) and median successful
    MADV_COLLAPSE, in ns, from a `ptlab kernel` run: either of its two files, the other phase
    found beside it through the metadata.  Raises ConfigError naming --kernel-result."""
    from ptlab.core.kernel_probe import KIND, SUCCEED, Events
    from ptlab.core.results import ResultFileError, read_run

    p = Path(path)
    try:
        run = read_run(p)
    except ResultFileError as e:
        raise ConfigError(f"--kernel-result: {e}") from None
    if run.meta.get("kind") != KIND:
        raise ConfigError(
            f"--kernel-result {p}: not a `ptlab kernel` result (kind {run.meta.get('kind')!r}); "
            f"give its -loaded.arrow or -baseline.arrow file"
        )
    params = run.meta.get("params") or {}
    runs = {params.get("phase"): run}
    for phase, name in (params.get("files") or {}).items():
        if phase not in runs and name and (p.parent / name).exists():
            try:
                runs[phase] = read_run(p.parent / name)
            except ResultFileError:
                pass
    loaded, baseline = runs.get("loaded"), runs.get("baseline")
    if loaded is None:
        raise ConfigError(
            f"--kernel-result {p}: the run's loaded phase (…-loaded.arrow, the one with "
            f"collapses) is neither given nor beside it"
        )
    ev = Events.from_table(loaded.table)
    coll = ev.latency_ns[ev.select(op="collapse") & (ev.result == SUCCEED)]
    if not len(coll):
        raise ConfigError(f"--kernel-result {loaded.path}: the kernel made no successful collapse")
    if baseline is not None:
        evb = Events.from_table(baseline.table)
        faults, fault_from = evb.lat(op="fault", vma="same"), f"{baseline.path.name}, same-VMA faults"
    else:
        faults = ev.lat(op="fault", vma="same", during=False)
        fault_from = f"{loaded.path.name}, same-VMA faults with no collapse in flight"
    if not len(faults):
        raise ConfigError(f"--kernel-result {p}: the run has no same-VMA faults")
    return {
        "path": str(p),
        "run_id": loaded.meta.get("run_id"),
        "fault_p50_ns": float(np.median(faults)),
        "fault_n": int(len(faults)),
        "fault_from": fault_from,
        "collapse_p50_ns": float(np.median(coll)),
        "collapse_n": int(len(coll)),
        "collapse_from": f"{loaded.path.name}, SCAN_SUCCEED collapses",
    }


@contextmanager
def _idle_busy(core: int | None) -> Iterator[None]:
    """Keep host ``core`` busy with a SCHED_IDLE thread of this process (a C loop that releases
    the GIL, in short batches until told to stop): a task woken there preempts it at once, as
    it preempts `ptlab kernel`'s SCHED_IDLE load, and the core never halts."""
    if core is None or not hasattr(os, "SCHED_IDLE"):
        yield
        return
    import threading

    from ptlab.core import _kprobe as kp

    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        started.set()  # before SCHED_IDLE: a busy host may not run an idle thread for long
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except OSError:
            pass
        while not stop.is_set():
            kp.cost_loop("load_hit", 1, 200_000, core)

    th = threading.Thread(target=spin, name="ptlab-idle-busy", daemon=True)
    th.start()
    started.wait()
    try:
        yield
    finally:
        stop.set()
        try:  # back to the normal policy, so that it gets to see the stop
            os.sched_setscheduler(th.native_id or 0, os.SCHED_OTHER, os.sched_param(0))
        except (OSError, TypeError):
            pass
        th.join()


class _Costs:
    """The table as it is filled in: name -> (ns, source, kind), plus the raw inputs."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[float, str, str]] = {}
        self.inputs: dict[str, Any] = {}

    def measured(self, name: str, ns: float, source: str) -> None:
        self.rows[name] = (ns, f"measured: {source}", "measured")

    def cited(self, name: str, why: str = "") -> None:
        from ptlab.core.costs import CITED

        ns, source = CITED[name]
        self.rows[name] = (ns, source + (f"; {why}" if why else ""), "cited")

    def derived(self, name: str, ns: float, source: str) -> None:
        if not ns > 0:
            source = f"{source}; CLAMPED to 1 ns: the arithmetic gave {ns:.0f} ns"
            ns = 1.0
        self.rows[name] = (ns, f"derived: {source}", "derived")

    def ns(self, name: str) -> float:
        return self.rows[name][0]


def _fmt_ns(ns: float) -> str:
    return f"{ns / 1000:.2f} µs" if ns >= 10_000 else f"{ns:.1f} ns"


def _measure_raw(quick: bool, say: Progress, frac0: float, frac1: float) -> dict[str, Any]:
    """One pass of every C measurement: the statistic of each (see the section comment) and
    what the source texts need.  Times in ns; None where a measurement could not be made."""
    from ptlab.core import _kprobe as kp

    cores = _cores()
    c0 = cores[0]
    c1 = cores[1] if len(cores) >= 2 else None
    s = 0.15 if quick else 1.0

    def n(x: int, lo: int = 3) -> int:
        return max(lo, int(x * s))

    def step(name: str, at: float) -> None:
        say(name, frac0 + (frac1 - frac0) * at)

    r: dict[str, Any] = {"c0": c0, "c1": c1, "cores": cores}
    step("load_hit, atomic, rwsem", 0.0)
    r["batches"] = b = n(40, 8)
    r["load_hit"] = _q25(kp.cost_loop("load_hit", b, n(200_000, 20_000), c0))
    r["atomic"] = _q25(kp.cost_loop("atomic", b, n(200_000, 20_000), c0))
    r["rwsem"] = _q25(kp.cost_loop("rwsem", b, n(100_000, 10_000), c0))
    r["futex_syscall"] = _q25(kp.cost_loop("futex_wake", b, n(10_000, 1_000), c0))

    step("copy_page, zero_page", 0.1)
    r["runs"] = runs = n(60, 8)
    pmd = 2 << 20
    r["copy"] = _p50(kp.cost_copy("copy", pmd, pmd, runs, c0))
    r["copy_cold"] = _p50(kp.cost_copy("copy", 32 * pmd, pmd, n(32, 8), c0))
    r["zero"] = _p50(kp.cost_copy("zero", pmd, pmd, runs, c0))
    r["zero_cold"] = _p50(kp.cost_copy("zero", 32 * pmd, pmd, n(32, 8), c0))

    step("tlb_walk", 0.2)
    pages, tn = 16384, n(200_000, 40_000)
    r["tlb_pages"] = pages
    small: list[float] = []
    huge: list[float] = []
    thp = 0
    for _ in range(n(4, 2)):  # interleaved, so a noisy neighbour lands on both
        small += kp.cost_tlb_walk(pages, 5, tn, False, c0)
        before = _vmstat().get("thp_fault_alloc", 0)
        huge += kp.cost_tlb_walk(pages, 5, tn, True, c0)
        thp += _vmstat().get("thp_fault_alloc", 0) - before
    r["tlb_small"], r["tlb_huge"] = _q25(small), _q25(huge)
    r["tlb_huge_ok"] = thp >= n(4, 2) * pages // 512

    step("line_transfer", 0.3)
    r["line_batches"] = lb = n(400, 60)
    r["line"] = _q25(kp.cost_line_transfer(lb, 64, c0, c1)) if c1 is not None else None

    step("ipi_round_trip", 0.35)
    r["mb_error"] = None
    r["mb_ipi"] = r["mb_base"] = None
    r["mb_sent"] = 0
    if c1 is not None:
        try:
            mb = kp.cost_membarrier(n(600, 150), c0, c1)
        except OSError as e:
            r["mb_error"] = os.strerror(e.errno or 0)
        else:
            target = np.asarray(mb["target"], dtype=np.float64)
            alone = np.asarray(mb["alone"], dtype=np.float64)
            if mb["ipis"]:
                sent = np.asarray(mb["ipis"]) > 0
                r["mb_how"] = "calls during which that core took a function-call interrupt (/proc/interrupts)"
            else:  # no count: the IPI calls are the slow mode, far above the no-IPI calls
                sent = target > np.percentile(alone, 99) + 1000
                r["mb_how"] = "calls slower than the no-IPI p99 + 1 µs (/proc/interrupts has no count)"
            quiet = target[~sent]
            r["mb_alone"] = float(np.median(alone))
            r["mb_base"] = float(np.median(quiet)) if len(quiet) >= 20 else float(np.median(alone))
            r["mb_sent"], r["mb_calls"] = int(sent.sum()), int(len(target))
            r["mb_ipi"] = float(np.median(target[sent])) if sent.sum() >= 5 else None

    step("futex_wake_to_run", 0.45)
    nw = n(1000, 150)
    skip = max(5, nw // 10)
    with _idle_busy(c1):
        w = _prims.ref_futex_wake_to_run(nw + skip, c0, c1 if c1 is not None else -1)[skip:]
    r["w2r"], r["w2r_n"] = _p50(w), len(w)

    step("context_switch", 0.55)
    r["ctx_batches"] = cb = n(120, 20)
    r["ctxsw"] = _q25(kp.cost_context_switch(cb, 50, c0))

    step("mmap_body", 0.6)
    r["mmap_n"] = nm = n(3000, 300)
    r["mmap"] = _p50(kp.cost_mmap(nm, 64 << 10, c0))

    step("faults", 0.65)
    rounds = n(200, 20)
    f = kp.cost_fault(64, rounds + 1, c0)[64:]  # round 0 also allocates the page table
    r["fault"], r["fault_n"] = _p50(f), len(f)
    before = _vmstat()
    r["thp_n"] = nt = n(40, 8)
    thp_lat = kp.cost_thp_fault(nt, c0, 1)
    after = _vmstat()
    ok = after.get("thp_fault_alloc", 0) - before.get("thp_fault_alloc", 0) >= nt
    r["thp"] = _p50(thp_lat) if ok else None

    points = (8, 512) if quick else (8, 64, 256, 512)
    crounds, per = (2, 2) if quick else (8, 3)  # interleaved, so drift lands on every point
    r["collapse_rounds"], r["collapse_n"] = crounds, crounds * per
    samples: dict[int, list[float]] = {k: [] for k in points}
    drains: list[float] = []
    errors: dict[str, int] = {}
    failed = False
    for rnd in range(crounds):
        step(f"collapse (round {rnd + 1} of {crounds})", 0.75 + 0.25 * rnd / crounds)
        for k in points:
            try:
                res = kp.cost_collapse(per, c0, c1 if c1 is not None else -1, k)
            except OSError as e:
                errors[os.strerror(e.errno or 0)] = errors.get(os.strerror(e.errno or 0), 0) + 1
                failed = True
                break
            for e, cnt in res["errors"].items():
                errors[os.strerror(e)] = errors.get(os.strerror(e), 0) + cnt
            samples[k] += res["collapse"]
            drains += res["drain"]
        if failed or errors.get(os.strerror(22)):  # EINVAL: no MADV_COLLAPSE here
            break
    r["collapse"] = {k: _p50(v) for k, v in samples.items() if len(v) >= max(2, crounds * per // 2)}
    r["collapse_errors"] = errors
    r["drain"] = _p50(drains) if drains else None
    r["drain_n"] = len(drains)
    return r


# How the passes of --repeat combine: interference only ever adds time to these, so each takes
# its least disturbed pass (the minimum); the LRU drain is the exception -- a starved load leaves
# nothing to drain and makes it *faster* -- so it takes the median of the passes.
# The TLB walk is a difference of two chases, which interference can move either way (a
# neighbour thrashing the caches slows the small-page chase most, or both alike): it takes the
# pass with the median difference.
_RAW_MIN = ("load_hit", "atomic", "rwsem", "futex_syscall", "copy", "copy_cold", "zero",
            "zero_cold", "line", "mb_ipi", "mb_base", "mb_alone", "w2r", "ctxsw", "mmap", "fault",
            "thp")


def _merge_raw(passes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    r = dict(passes[0])
    for key in _RAW_MIN:
        vals = [p[key] for p in passes if p.get(key) is not None]
        r[key] = min(vals) if vals else None
    drains = [p["drain"] for p in passes if p.get("drain") is not None]
    r["drain"] = float(np.median(drains)) if drains else None
    r["drain_n"] = sum(p.get("drain_n", 0) for p in passes)
    walk = sorted(passes, key=lambda p: p["tlb_small"] - p["tlb_huge"])[len(passes) // 2]
    r["tlb_small"], r["tlb_huge"] = walk["tlb_small"], walk["tlb_huge"]
    r["tlb_huge_ok"] = all(p["tlb_huge_ok"] for p in passes)
    r["mb_sent"] = sum(p.get("mb_sent", 0) for p in passes)
    r["mb_calls"] = sum(p.get("mb_calls", 0) for p in passes)
    if any(p.get("mb_ipi") is None for p in passes):
        ok = [p for p in passes if p.get("mb_ipi") is not None]
        r["mb_ipi"] = min(p["mb_ipi"] for p in ok) if ok else None
        r["mb_base"] = min(p["mb_base"] for p in ok) if ok else r["mb_base"]
    ks = set.intersection(*(set(p["collapse"]) for p in passes))
    r["collapse"] = {k: min(p["collapse"][k] for p in passes) for k in sorted(ks)}
    r["collapse_errors"] = {}
    for p in passes:
        for e, c in p["collapse_errors"].items():
            r["collapse_errors"][e] = r["collapse_errors"].get(e, 0) + c
    return r


def kernel_costs(quick: bool = False, kernel_result: str | os.PathLike[str] | None = None,
                 progress: Progress | None = None, anchor: Mapping[str, Any] | None = None,
                 repeat: int = 1) -> Any:
    """Measure the kernel cost table on this host and return it (a core.costs.CostTable).

    ``quick``: small samples (about a second; for tests and a first look), else a few seconds.
    ``kernel_result``: a `ptlab kernel` result file; its median fault and collapse then anchor
    fault_entry, collapse_fixed and collapse_per_page, else this host's own minimal fault loop
    and MADV_COLLAPSE loop do.  Entries that user space cannot time are cited (core.costs.CITED).
    ``anchor``: kernel_result_latencies(kernel_result) when the caller has read it already.
    ``repeat``: measure that many times and keep, per measurement, the least disturbed pass
    (see _RAW_MIN): on a shared host, interference only ever adds time.
    Raises ConfigError for an unusable --kernel-result or repeat < 1; never leaves a mapping
    or a thread behind (the C loops clean up before returning).
    """
    from ptlab.core.costs import CostEntry, CostTable, table_meta

    if repeat < 1:
        raise ConfigError(f"--repeat must be at least 1 (got {repeat})")
    say = progress or (lambda msg, frac: None)
    kres = dict(anchor) if anchor is not None else (
        kernel_result_latencies(kernel_result) if kernel_result is not None else None)
    load0 = list(os.getloadavg())
    passes = []
    for i in range(repeat):
        tag = f"pass {i + 1}/{repeat}: " if repeat > 1 else ""
        passes.append(_measure_raw(quick, lambda m, f, tag=tag: say(tag + m, f),
                                   i / repeat, (i + 1) / repeat))
    raw = _merge_raw(passes)
    t = _derive(raw, kres, repeat)
    say("done", 1.0)
    meta = table_meta({
        "method": ("quick" if quick else "full") + (f", best of {repeat} passes" if repeat > 1 else ""),
        "kernel_result": kres,
        "inputs": t.inputs,
        "loadavg_before": load0,
    })
    entries = {k: CostEntry(ns=float(v[0]), source=v[1], kind=v[2]) for k, v in t.rows.items()}
    return CostTable(entries=entries, meta=meta)


def _derive(raw: Mapping[str, Any], kres: Mapping[str, Any] | None, repeat: int) -> _Costs:
    """The table from the measurements: every entry with its source."""
    t = _Costs()
    c0, c1, cores = raw["c0"], raw["c1"], raw["cores"]
    t.inputs["cores"] = {"self": c0, "other": c1, "usable": cores}
    q25 = "the lower quartile of the batch means"
    if repeat > 1:
        q25 += f", the least of {repeat} passes"
    p50 = "the least of the passes' medians" if repeat > 1 else "median"
    b = raw["batches"]

    t.measured("load_hit", raw["load_hit"], f"a dependent load chain on one L1-resident line (p = *p), {b} batches; {q25}")
    t.measured("atomic", raw["atomic"], f"back-to-back lock xadd on a private line (__atomic_fetch_add), {b} batches; {q25}")
    t.measured("rwsem_op", raw["rwsem"], f"pthread_rwlock_rdlock + unlock uncontended (a stand-in for down_read + up_read: two atomics), {b} batches; {q25}")
    t.measured("futex_syscall", raw["futex_syscall"], f"futex(FUTEX_WAKE_PRIVATE) on a word nobody waits on, {b} batches; {q25}")

    runs = raw["runs"]
    t.inputs["copy_page_cold_ns"] = raw["copy_cold"]
    t.inputs["zero_page_cold_ns"] = raw["zero_cold"]
    t.measured("copy_page", raw["copy"], (
        f"rep movsb of 4 KiB (x86 copy_mc_enhanced_fast_string, the collapse's copy) over a 2 MiB run "
        f"into another, both recently touched (the collapse copies pages the faulting threads just "
        f"wrote); {p50} of {runs} runs of 512 pages.  Through a 64 MiB pool (not cached): "
        f"{_fmt_ns(raw['copy_cold'])}"))
    t.measured("zero_page", raw["zero"], (
        f"rep stosb of 4 KiB (x86 clear_page_erms) over a recently used 2 MiB run (faults clear "
        f"pages just freed to the per-CPU lists); {p50} of {runs} runs of 512 pages.  Through a "
        f"64 MiB pool: {_fmt_ns(raw['zero_cold'])}"))

    small, huge, pages = raw["tlb_small"], raw["tlb_huge"], raw["tlb_pages"]
    t.inputs["tlb_walk"] = {"small_ns": small, "huge_ns": huge, "thp": raw["tlb_huge_ok"]}
    if raw["tlb_huge_ok"] and small - huge > 0:
        t.measured("tlb_walk", small - huge, (
            f"a random pointer chase over one line in each of {pages} pages (64 MiB, beyond the "
            f"STLB's reach) with 4 KiB pages ({_fmt_ns(small)} per load) minus the same lines in "
            f"2 MiB pages ({_fmt_ns(huge)}), interleaved: the page walk, its entries cached; "
            f"the lower quartile of each chase's batch means"
            + (f", the pass with the median difference of {repeat}" if repeat > 1 else "")))
    else:
        why = ("no THP for the 2 MiB-page buffer" if not raw["tlb_huge_ok"]
               else f"the 4 KiB-page chase was not slower ({small - huge:.1f} ns)")
        t.cited("tlb_walk", f"not measured here: {why}")
    t.cited("tlb_flush_local")

    if raw["line"] is not None:
        t.measured("line_transfer", raw["line"], (
            f"two threads on host cores {c0} and {c1} pass a counter on one line back and forth, "
            f"{raw['line_batches']} batches of 64 round trips; half the round trip; {q25}"))
    else:
        t.cited("line_transfer")

    t.cited("ipi_per_target")
    if c1 is None:
        t.cited("ipi_round_trip", "one usable core: no IPI target")
    elif raw["mb_error"]:
        t.cited("ipi_round_trip", f"membarrier unavailable here ({raw['mb_error']})")
    else:
        t.inputs["membarrier"] = {k: raw.get(k) for k in ("mb_alone", "mb_base", "mb_ipi", "mb_sent", "mb_calls")}
        ipi, base = raw["mb_ipi"], raw["mb_base"]
        if ipi is not None and ipi > base:
            t.measured("ipi_round_trip", ipi - base, (
                f"membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) from core {c0} while a thread of "
                f"the process runs on core {c1}: the {p50} of the {raw['mb_how']} "
                f"({_fmt_ns(ipi)}; {raw['mb_sent']} of {raw['mb_calls']} calls) minus that of the "
                f"calls that IPI nobody ({_fmt_ns(base)})"))
        else:
            t.cited("ipi_round_trip", f"membarrier sent {raw['mb_sent']} IPIs of {raw['mb_calls']} "
                    f"calls (core {c1} busy): too few to time")

    where = (f"cores {c0} -> {c1}, core {c1} kept busy by a SCHED_IDLE thread as `ptlab kernel`'s "
             f"load keeps it (an idle vCPU would add its wake-from-halt)" if c1 is not None
             else f"core {c0} (one usable core)")
    t.measured("futex_wake_to_run", raw["w2r"], (
        f"FUTEX_WAKE stamp to the sleeper running again, two pthreads on {where}, the sleeper "
        f"asleep 20 µs first (ptlab.core._prims.ref_futex_wake_to_run); {p50} of {raw['w2r_n']}"))
    t.measured("context_switch", raw["ctxsw"], (
        f"two threads pinned to core {c0} hand it to each other with futex wait/wake (perf bench "
        f"sched pipe's shape), {raw['ctx_batches']} batches of 50 round trips; half the round "
        f"trip; {q25}"))
    t.measured("mmap_body", raw["mmap"], (
        f"mmap() + munmap() of an untouched 64 KiB anonymous region (no page faults), {p50} of "
        f"{raw['mmap_n']}"))

    t.inputs["fault_p50_ns"] = fault_p50 = raw["fault"]
    t.inputs["thp_fault_p50_ns"] = thp_p50 = raw["thp"]
    t.cited("alloc_page")
    alloc = t.ns("alloc_page")
    zero = t.ns("zero_page")
    if kres is not None:
        fault_ns = kres["fault_p50_ns"]
        fault_src = f"the host kernel's median fault in {kres['fault_from']} ({kres['fault_n']} faults)"
    else:
        fault_ns = fault_p50
        fault_src = (f"the {p50} of {raw['fault_n']} write faults of a minimal loop here (mmap "
                     f"anon, touch each of 64 pages, MADV_DONTNEED, repeat)")
    t.derived("fault_entry", fault_ns - zero - alloc, (
        f"{fault_src}, {_fmt_ns(fault_ns)}, minus zero_page ({_fmt_ns(zero)}) minus alloc_page "
        f"({_fmt_ns(alloc)})"))
    per = (thp_p50 - fault_p50) / 511 - zero if thp_p50 is not None else 0.0
    if thp_p50 is not None and per > 0:
        t.derived("alloc_large_per_page", per, (
            f"a THP fault here ({_fmt_ns(thp_p50)}, {p50} of {raw['thp_n']}: "
            f"do_huge_pmd_anonymous_page, order-9 allocation and 512 clears) minus the 4 KiB fault "
            f"({_fmt_ns(fault_p50)}), per each of the 511 extra pages, minus zero_page"))
    else:
        t.cited("alloc_large_per_page", "no THP fault measured here" if thp_p50 is None
                else f"the THP fault arithmetic gave {per:.1f} ns")

    _derive_collapse(t, raw, kres, p50)
    return t


def _derive_collapse(t: _Costs, raw: Mapping[str, Any], kres: Mapping[str, Any] | None, p50: str) -> None:
    """lru_drain, collapse_fixed, collapse_per_page from the MADV_COLLAPSE loop (and the
    kernel run's median collapse when anchored)."""
    c1, cores = raw["c1"], raw["cores"]
    meds: dict[int, float] = raw["collapse"]
    errors = raw["collapse_errors"]
    t.inputs["collapse"] = {"p50_ns_by_present_pages": meds, "errors": errors}
    # The IPIs of one collapse_huge_page(), by the kernel's code (kernel-brief.md §1.3 steps 8-9):
    # pmdp_collapse_flush() -> flush_tlb_range() IPIs the other CPUs running the mm (here the
    # load's one core), tlb_remove_table_sync_one() IPIs every other online CPU and waits.
    online = os.cpu_count() or len(cores)
    ipi = t.ns("ipi_round_trip")
    ipis_ns = (ipi + ipi + max(0, online - 2) * t.ns("ipi_per_target")) if online > 1 else 0.0
    nipi_src = ("the two IPI rounds of collapse_huge_page() -- pmdp_collapse_flush() to the core "
                "running the load, tlb_remove_table_sync_one() to every other online CPU -- "
                "at ipi_round_trip (+ ipi_per_target per extra target)")
    copy, zero, alloc = t.ns("copy_page"), t.ns("zero_page"), t.ns("alloc_page")
    alloc9 = alloc + 511 * t.ns("alloc_large_per_page")
    if raw["drain"] is not None:
        t.measured("lru_drain", raw["drain"], (
            f"MADV_COLLAPSE on a range that is already PMD-mapped: madvise_collapse() runs "
            f"lru_add_drain_all() and finds SCAN_PMD_MAPPED at once, so this is the drain plus the "
            f"madvise() call; a SCHED_IDLE thread faults pages on core {c1} meanwhile, as `ptlab "
            f"kernel`'s load does; median of {raw['drain_n']}"
            + (" (the median of the passes' medians)" if p50 != "median" else "")))
    else:
        t.derived("lru_drain", t.ns("futex_wake_to_run") + t.ns("context_switch"), (
            "no MADV_COLLAPSE here: one queue_work_on() + flush_work() round trip, "
            "futex_wake_to_run + context_switch"))
    drain = t.ns("lru_drain")
    parts = (f"lru_drain ({_fmt_ns(drain)}), the order-9 allocation (alloc_page + 511 × "
             f"alloc_large_per_page = {_fmt_ns(alloc9)}) and {nipi_src} ({_fmt_ns(ipis_ns)})")
    if len(meds) >= 2:
        ks = np.array(sorted(meds), dtype=np.float64)
        ys = np.array([meds[int(k)] for k in ks])
        slope, icpt = (float(x) for x in np.polyfit(ks, ys, 1))
        # t(k) = A + k (copy + per_page) + (512 - k) zero: absent pages are cleared, not copied
        per_page_m = slope - copy + zero
        fixed_all = icpt - KERNEL_COST_PAGES * zero  # A: drain, allocation, IPIs and the rest
        t.inputs["collapse"].update({"slope_ns_per_page": slope, "intercept_ns": icpt})
        fit = (f"MADV_COLLAPSE of a 2 MiB range with {', '.join(str(int(k)) for k in ks)} of 512 "
               f"pages present (the rest pte_none, cleared instead of copied), {raw['collapse_n']} "
               f"each in {raw['collapse_rounds']} interleaved rounds, medians"
               f"{' (each the least of the passes)' if p50 != 'median' else ''} "
               f"{', '.join(_fmt_ns(meds[int(k)]) for k in ks)}: a line through them gives "
               f"{_fmt_ns(slope)} per present page and {_fmt_ns(icpt)} at none")
        fixed_m = fixed_all - drain - alloc9 - ipis_ns
        note = ""
        if fixed_m < 0:  # the parts taken out exceed the fit's value at none: noise
            note = (f" (that leaves {_fmt_ns(fixed_m)}: the fixed work is within this host's "
                    f"noise of zero, taken as 0)")
            fixed_m = 0.0
        t.inputs["collapse"]["fixed_fit_ns"] = fixed_m
        t.inputs["collapse"]["per_page_small_folios_ns"] = per_page_m
        if kres is not None:
            total = kres["collapse_p50_ns"]
            rest = total - drain - alloc9 - ipis_ns - KERNEL_COST_PAGES * copy
            mine = fixed_m + KERNEL_COST_PAGES * max(per_page_m, 0.0)
            share = fixed_m / mine if mine > 0 else 1.0
            if per_page_m <= 0:
                note += (f" (the fit's per-page work came out at {_fmt_ns(per_page_m)}: noise, "
                         f"taken as 0)")
            # both parts at least 1 ns, and they add up to the kernel's number exactly
            per_page = max(1.0, rest * (1.0 - share) / KERNEL_COST_PAGES)
            fixed = rest - KERNEL_COST_PAGES * per_page
            if fixed < 1.0:
                fixed, per_page = 1.0, (rest - 1.0) / KERNEL_COST_PAGES
            anchor = (f"; anchored on the host kernel's median collapse {_fmt_ns(total)} "
                      f"({kres['collapse_from']}, {kres['collapse_n']}): what it leaves after the "
                      f"drain, allocation, IPIs and 512 copies ({_fmt_ns(rest)}) is split between "
                      f"fixed and per-page work as the fit here splits it ({share:.1%} fixed).  "
                      f"`ptlab kernel` re-splits each PMD before collapsing it again, so its "
                      f"collapses take 511 pages of one PTE-mapped large folio (isolated once) and "
                      f"one small page: per page they cost less than the 512 small folios here "
                      f"({_fmt_ns(per_page_m)} per page)")
            t.derived("collapse_per_page", per_page, (
                f"{fit}; per page: the slope minus copy_page plus zero_page{note}{anchor}"))
            t.derived("collapse_fixed", fixed, (
                f"{fit}; fixed: that value minus 512 × zero_page, minus {parts}{note}{anchor}"))
        else:
            t.derived("collapse_per_page", per_page_m, (
                f"{fit}; per page: the slope minus copy_page plus zero_page"))
            t.derived("collapse_fixed", fixed_m, (
                f"{fit}; fixed: that value minus 512 × zero_page, minus {parts}{note}"))
    else:
        why = f"MADV_COLLAPSE failed here ({', '.join(errors) or 'no successful collapse'})"
        mig = 1100.0  # kernel-brief.md §7: migrate 4 KiB end to end ~1.1 µs/page (Shivank Garg)
        t.derived("collapse_per_page", mig - copy, (
            f"{why}: migrating 4 KiB end to end costs ~1.1 µs (kernel-brief.md §7, Shivank Garg's "
            f"RFC v3 on Zen 3: unmap, flush, copy, remap) minus copy_page"))
        total = kres["collapse_p50_ns"] if kres is not None else 185_000.0
        src = (f"the host kernel's median collapse {_fmt_ns(total)} ({kres['collapse_from']})" if kres
               else "an order-9 MADV_COLLAPSE of ~0.16-0.21 ms (core/kernel_probe.py, 2-vCPU VM)")
        t.derived("collapse_fixed", total - drain - alloc9 - ipis_ns
                  - KERNEL_COST_PAGES * (copy + t.ns("collapse_per_page")),
                  f"{why}: {src} minus {parts} minus 512 × (copy_page + collapse_per_page)")
