"""Real processes for the primitive tests: a small machine, CPUs in spawned children, an event log.

A ``Lab`` creates a machine and an ``aux`` segment (handshake words and an event log) in this
process, starts simulated CPUs as spawned children that attach by name, and on ``close()`` kills
what is still running and unlinks everything.  A watchdog thread sets the machine's STOP word
after ``limit_s``, so a lock bug makes the waiting side raise ``Stopped`` (a failure) instead of
hanging the test run.

The event log follows trio's tests: each side appends ``"<event> <cpu>"`` with an atomic
fetch-add on the entry count, and a test compares the sequence with the one it expects.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

from ptlab.core.machine._prims import Region, now_ns
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.cpu import CpuContext, attached_cpu
from ptlab.core.machine.layout import MM_CPUMASK, STOP
from ptlab.core.machine.mm import Machine
from ptlab.core.machine.shm import Namespace

SPAWN = multiprocessing.get_context("spawn")

# aux segment: u32 log count at 0, flags (i64 words, one per line) from 64, log entries from 4096
LOG_N = 0
FLAGS = 64
NR_FLAGS = 48
LOG = 4096
LOG_MAX = 1024
AUX = {"aux": LOG + LOG_MAX * 16}

EVENTS = (
    "lock", "unlock", "locked", "unlocked", "trylock_failed", "woken", "irq_off", "irq_on",
    "flush", "flushed", "ready", "woke", "down_write", "up_write", "sleeping",
)


def flag(i: int) -> int:
    """Byte offset of handshake word i in the aux segment (each on its own cache line)."""
    assert 0 <= i < NR_FLAGS
    return FLAGS + i * 64


def log(aux: Region, cpu: int, event: str) -> None:
    i = aux.fetch_add32(LOG_N, 1)
    if i < LOG_MAX:
        aux.store64(LOG + i * 16, now_ns())
        aux.store64(LOG + i * 16 + 8, cpu << 16 | EVENTS.index(event))


def read_log(aux: Region) -> list[str]:
    out = []
    for i in range(min(aux.load32(LOG_N), LOG_MAX)):
        code = aux.load64(LOG + i * 16 + 8)
        out.append(f"{EVENTS[code & 0xFFFF]} {code >> 16}")
    return out


def _entry(fn: Callable[..., None], prefix: str, aux_prefix: str, config: dict[str, Any], cpu_id: int, pin: int | None, args: tuple[Any, ...]) -> None:
    """A child CPU: attach, register (pid, mm_cpumask), run fn(m, cpu, aux, *args), detach."""
    ns = Namespace.attach(aux_prefix, AUX)
    try:
        with attached_cpu(RunConfig.from_dict(config), prefix, cpu_id, pin_core=pin) as cpu:
            fn(cpu.m, cpu, ns["aux"].region, *args)
    finally:
        ns.close()


class Lab:
    """One machine + aux segment + child CPUs; always close() (use it as a context manager)."""

    def __init__(self, nr_cpus: int = 3, limit_s: float = 20.0, **config: Any) -> None:
        self.config = RunConfig(cpus={"app": nr_cpus}, nr_pmds=1, duration_s=1.0, warmup_s=0.0, **config)
        self.m = Machine.create(self.config)
        try:
            self.ns = Namespace.create(AUX)
        except BaseException:
            self.m.close()
            raise
        self.aux = self.ns["aux"].region
        self.procs: list[Any] = []
        self._cpus: list[CpuContext] = []
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._stop_after, args=(limit_s,), daemon=True)
        self._watchdog.start()

    def _stop_after(self, limit_s: float) -> None:
        if not self._done.wait(limit_s):
            self.m.ctl.store32(STOP, 1)  # every lock wait and IPI wait checks it: they raise Stopped

    def cpu(self, cpu_id: int = 0) -> CpuContext:
        """A CPU in this process (registered: its pid is this process's, it is in mm_cpumask)."""
        c = CpuContext(self.m, cpu_id, "app", self.config, capacity=1)
        c.register()
        self._cpus.append(c)
        return c

    def start(self, fn: Callable[..., None], cpu_id: int, *args: Any, pin: int | None = None) -> Any:
        p = SPAWN.Process(
            target=_entry,
            args=(fn, self.m.prefix, self.ns.prefix, self.config.to_dict(), cpu_id, pin, args),
            daemon=True,
        )
        p.start()
        self.procs.append(p)
        return p

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        """Poll pred until true; fail (naming ``what``) on timeout or when a child failed."""
        deadline = time.monotonic() + timeout
        while not pred():
            for p in self.procs:
                if p.exitcode not in (None, 0):
                    raise AssertionError(f"child CPU process failed (exit {p.exitcode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.001)

    def wait_flag(self, i: int, value: int = 1, timeout: float = 15.0) -> None:
        self.wait(lambda: self.aux.load64(flag(i)) >= value, f"flag {i} >= {value}", timeout)

    def join(self, timeout: float = 20.0) -> None:
        """Wait for every child to exit with status 0."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            assert not p.is_alive(), f"child CPU process {p.pid} did not finish within {timeout:g} s"
            assert p.exitcode == 0, f"child CPU process {p.pid} failed (exit {p.exitcode})"

    def in_cpumask(self, cpu_id: int) -> bool:
        return bool(self.m.ctl.load64(MM_CPUMASK) >> cpu_id & 1)

    def log(self) -> list[str]:
        return read_log(self.aux)

    def close(self) -> None:
        self._done.set()
        self.m.ctl.store32(STOP, 1)
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for c in self._cpus:
            c.rec.close()
        try:
            self.ns.close()
        finally:
            self.m.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def busy_until(t_ns: int, poll: Callable[[], None] | None = None) -> None:
    while now_ns() < t_ns:
        if poll is not None:
            poll()
