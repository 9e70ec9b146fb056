"""Forced interleavings in one process: simulated CPUs as threads over one real machine.

A ``Stepper`` creates a machine in shared memory (populated like a run's), gives out CPU
contexts that are threads of this process, and lets a test park a CPU at a named point of a
kernel path (any ``cpu.chaos(point)`` call), run other CPUs' operations to completion or to
their own points, then resume it.  Nothing depends on timing: a test says "CPU 1 runs the
collapse up to ``collapse_after_flush``; CPU 0 faults on page 5; CPU 1 goes on" and gets
exactly that order.  A parked CPU keeps taking flush IPIs (a preempted CPU still takes
interrupts), so a flush from another CPU never waits on it.

Sleeps are real futex sleeps (the GIL is released), spins are real spins (the C spin loop
returns to Python every few ms, so other threads run).  A watchdog sets the machine's STOP
word after ``limit_s``: a stuck CPU raises ``Stopped`` and the test fails instead of hanging.

    with Stepper(strategy="migration-entry", order=4) as st:
        k = st.cpu(1, "khugepaged")
        a = st.cpu(0, "app")
        job = st.start(k, lambda: collapse_range(k, strategies.get(...), 0, 4), park_at="collapse_after_flush")
        st.wait_parked(k)
        ...
        st.resume(k)
        result = st.join(job)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.cpu import CpuContext
from ptlab.core.machine.layout import MAX_CPUS, STOP
from ptlab.core.machine.mm import VMA_COLLAPSE, VMA_OTHER, Machine


class Job:
    """One operation run on a CPU's thread: its result or its exception."""

    def __init__(self, cpu: CpuContext, fn: Callable[[], Any]) -> None:
        self.cpu = cpu
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # reported by Stepper.join
            self.error = e
        finally:
            self.done.set()


class CpuThread:
    """A simulated CPU's thread: runs its jobs in order; between jobs it is a CPU running user
    code that touches nothing shared: it stays in mm_cpumask and takes flush IPIs."""

    def __init__(self, cpu: CpuContext) -> None:
        self.cpu = cpu
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=0.0005)
            except queue.Empty:
                self.cpu.interrupt_point()
                continue
            if job is None:
                return
            job.run()


class Stepper:
    """One machine, CPUs as threads of this process, named park points; always close()."""

    def __init__(self, limit_s: float = 30.0, populate: bool = True, **config: Any) -> None:
        config.setdefault("cpus", {"app": 1, "khugepaged": 1})
        config.setdefault("nr_pmds", 1)
        self.config = RunConfig(**config)
        self.m = Machine.create(self.config)
        self._cpus: list[CpuContext] = []
        self._threads: dict[int, CpuThread] = {}
        self._parked: dict[int, threading.Event] = {}
        self._go: dict[int, threading.Event] = {}
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._stop_after, args=(limit_s,), daemon=True)
        self._watchdog.start()
        try:
            if populate:
                driver = CpuContext(self.m, MAX_CPUS - 1, "app", self.config, capacity=1)
                self.m.populate(driver, VMA_COLLAPSE)
                self.m.populate(driver, VMA_OTHER)
                driver.rec.close()
        except BaseException:
            self.close()
            raise

    def _stop_after(self, limit_s: float) -> None:
        if not self._done.wait(limit_s):
            self.m.ctl.store32(STOP, 1)  # lock and IPI waits check it and raise Stopped

    def cpu(self, cpu_id: int, role: str = "app") -> CpuContext:
        """A registered CPU (its pid is this process's; it is in mm_cpumask unless the role is
        a kernel thread)."""
        c = CpuContext(self.m, cpu_id, role, self.config, capacity=10_000)
        c.register()
        self._cpus.append(c)
        self._threads[cpu_id] = CpuThread(c)
        return c

    # -- parking ----------------------------------------------------------------------------
    def park_at(self, cpu: CpuContext, point: str, times: int = 1) -> None:
        """Make ``cpu`` stop at its next ``times`` passes of ``point`` until resume()."""
        parked = self._parked.setdefault(cpu.id, threading.Event())
        go = self._go.setdefault(cpu.id, threading.Event())
        left = [times]

        def hook() -> None:
            if left[0] <= 0:
                return
            left[0] -= 1
            go.clear()
            parked.set()
            while not go.wait(0.0005):
                cpu.interrupt_point()  # a preempted CPU still takes interrupts
                cpu.check_stop()
            parked.clear()

        cpu.hooks[point] = hook

    def on(self, cpu: CpuContext, point: str, fn: Callable[[], None]) -> None:
        """Run fn (on cpu's thread) when cpu passes point."""
        cpu.hooks[point] = fn

    def wait_parked(self, cpu: CpuContext, timeout: float = 20.0, job: Job | None = None) -> None:
        ev = self._parked.setdefault(cpu.id, threading.Event())
        deadline = time.monotonic() + timeout
        while not ev.wait(0.01):
            if job is not None and job.done.is_set():
                raise AssertionError(f"CPU {cpu.id} finished ({job.error or job.result!r}) without reaching its park point")
            if time.monotonic() > deadline:
                raise AssertionError(f"CPU {cpu.id} did not reach its park point within {timeout:g} s")

    def resume(self, cpu: CpuContext) -> None:
        self._go.setdefault(cpu.id, threading.Event()).set()

    # -- running ----------------------------------------------------------------------------
    def start(self, cpu: CpuContext, fn: Callable[[], Any]) -> Job:
        """Queue fn on cpu's thread (jobs of one CPU run in order, never two at once)."""
        job = Job(cpu, fn)
        self._threads[cpu.id].jobs.put(job)
        return job

    def run(self, cpu: CpuContext, fn: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Run fn on its own thread to completion (so it may sleep or spin) and return its result."""
        return self.join(self.start(cpu, fn), timeout)

    def join(self, job: Job, timeout: float = 20.0) -> Any:
        if not job.done.wait(timeout):
            raise AssertionError(f"CPU {job.cpu.id}'s operation did not finish within {timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.result

    def wait_for(self, pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        """Poll pred until true (a progress condition, not a time limit: the timeout only turns
        a hang into a failure naming ``what``)."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.0005)

    def blocked(self, job: Job, settle_s: float = 0.05) -> bool:
        """True when the job has not finished after settle_s (it sleeps or spins on something)."""
        return not job.done.wait(settle_s)

    def violations(self) -> list[dict[str, Any]]:
        return [v for c in self._cpus for v in c.violations]

    def close(self) -> None:
        self._done.set()
        self.m.ctl.store32(STOP, 1)
        for ev in self._go.values():
            ev.set()
        for t in self._threads.values():
            t.jobs.put(None)
        for t in self._threads.values():
            t.thread.join(5.0)
        for c in self._cpus:
            c.rec.close()
        self.m.close()

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
